//! The `longrun.v1.Jobs` service: a thin adapter from requests to the executor, the store and
//! the event hub.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use prost::Message;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{
    Limits,
    auth::{check_owner, current_owned, tenant},
    convert::{self, parse_job_id},
    paging::Page,
    pb::{self, jobs_server::Jobs},
    quotas::{SubmitRates, WatchPermit, Watches},
    status::{
        invalid, invalid_field, job_not_finished, job_not_found, shutting_down, watch_status,
    },
    wait,
};
use crate::{
    cancelled::Cancelled,
    events::JobWatch,
    executor::Executor,
    job::{FieldViolation, JobId, TraceContext, WebhookEvents},
    metrics::{Metrics, WatchGuard},
    store::{Deleted, ListQuery},
    webhooks::{CheckedWebhook, WebhookPolicy},
};

/// Serves `longrun.v1.Jobs` over an [`Executor`].
#[derive(Clone)]
pub struct JobsService {
    executor: Executor,
    limits: Arc<Limits>,
    stopping: CancellationToken,
    webhooks: Arc<WebhookPolicy>,
    rates: Arc<SubmitRates>,
    watches: Arc<Watches>,
}

impl JobsService {
    /// A service over `executor`, enforcing `limits`. When `stopping` fires, open watches end
    /// with UNAVAILABLE (clients resume elsewhere or later) and waits return at once.
    pub fn new(executor: Executor, limits: Limits, stopping: CancellationToken) -> Self {
        Self {
            executor,
            watches: Watches::new(&limits),
            limits: Arc::new(limits),
            stopping,
            webhooks: Arc::default(),
            rates: Arc::default(),
        }
    }

    /// The same service, checking Submit's webhooks with `policy` (by default: no default
    /// secret and no allow list, so every internal address is refused).
    pub fn with_webhooks(self, policy: WebhookPolicy) -> Self {
        Self {
            webhooks: Arc::new(policy),
            ..self
        }
    }

    /// The checks of a Submit's webhook that need no network: events, secret, URL form.
    fn validate_webhook(
        &self,
        webhook: pb::Webhook,
    ) -> Result<CheckedWebhook, Vec<FieldViolation>> {
        let events = match pb::WebhookEvents::try_from(webhook.events) {
            Ok(pb::WebhookEvents::Unspecified | pb::WebhookEvents::Terminal) => {
                Some(WebhookEvents::Terminal)
            }
            Ok(pb::WebhookEvents::All) => Some(WebhookEvents::All),
            Err(_) => None,
        };
        let checked =
            self.webhooks
                .validate(&webhook.url, &webhook.secret, events.unwrap_or_default());
        match (events, checked) {
            (Some(_), checked) => checked,
            (None, checked) => {
                let mut violations = vec![FieldViolation::new(
                    "webhook.events",
                    format!("{} is not a WebhookEvents value", webhook.events),
                )];
                violations.extend(checked.err().unwrap_or_default());
                Err(violations)
            }
        }
    }

    /// `job` with its webhook deliveries read from the outbox (none to read without a webhook),
    /// as many of the newest as fit in one response with the job.
    async fn with_deliveries(&self, id: JobId, mut job: pb::Job) -> Result<pb::Job, Status> {
        if job.webhook.is_some() {
            let deliveries: Vec<_> = self
                .executor
                .store()
                .deliveries(id)
                .await?
                .iter()
                .map(convert::webhook_delivery)
                .collect();
            let room = self
                .limits
                .max_message_bytes
                .saturating_sub(RESPONSE_ENVELOPE_BYTES + job.encoded_len());
            let count = deliveries.len();
            job.webhook_deliveries = newest_that_fit(deliveries, room);
            if job.webhook_deliveries.len() < count {
                tracing::debug!(
                    shown = job.webhook_deliveries.len(),
                    count,
                    "the oldest webhook deliveries left out to fit max_message_bytes"
                );
            }
        }
        Ok(job)
    }

    /// Limits each tenant's submissions per second with `rates`.
    pub fn with_submit_rates(mut self, rates: SubmitRates) -> Self {
        self.rates = Arc::new(rates);
        self
    }

    /// Counts a new watch stream against the per-connection and per-tenant limits.
    fn open_watch<T>(&self, request: &Request<T>) -> Result<WatchPermit, Status> {
        self.watches
            .acquire(request.remote_addr(), &tenant(request))
    }

    async fn wait_for(&self, id: JobId, until: Option<Instant>) -> Result<(pb::Job, bool), Status> {
        wait::wait_for(&self.executor, &self.stopping, id, until).await
    }
}

/// What a GetStatus or WaitJob response holds besides its job: the job's own framing, `done`.
const RESPONSE_ENVELOPE_BYTES: usize = 64;

/// The newest of `deliveries` (oldest first) whose `webhook_deliveries` entries take at most
/// `room` bytes, still oldest first. A job's deliveries are not bounded (a job set aside at
/// every shutdown reports QUEUED and RUNNING again each time), and a response that passed
/// `max_message_bytes` would fail the whole call; the newest are the ones a caller looks for.
fn newest_that_fit(
    mut deliveries: Vec<pb::WebhookDelivery>,
    room: usize,
) -> Vec<pb::WebhookDelivery> {
    let mut used = 0;
    let mut first_kept = deliveries.len();
    for (index, delivery) in deliveries.iter().enumerate().rev() {
        // Field 18: a two-byte tag before the length-delimited message.
        used += 1 + crate::job::framed(delivery.encoded_len());
        if used > room {
            break;
        }
        first_kept = index;
    }
    deliveries.drain(..first_kept);
    deliveries
}

fn job_id(field: &str, value: &str) -> Result<JobId, Status> {
    parse_job_id(field, value).map_err(invalid_field)
}

/// The stream, counted in the open-watches gauge and against the watch limits (`permit`) for
/// as long as it lives: both are released when the stream is dropped, which tonic does when it
/// ends, fails, or the client goes away.
pub(super) fn counted<S: Stream + Send + 'static>(
    stream: S,
    metrics: &Arc<Metrics>,
    permit: WatchPermit,
) -> impl Stream<Item = S::Item> + Send + 'static {
    let guard = WatchGuard::open(metrics);
    futures::StreamExt::map(stream, move |item| {
        let _open = (&guard, &permit);
        item
    })
}

/// A watch's messages, ended with UNAVAILABLE (naming the field a client resumes with) as soon
/// as `stopping` fires, so that a draining server does not wait on streams that never end; and
/// with DEADLINE_EXCEEDED at the call's `deadline`, which a client that does not enforce its
/// own (plain HTTP, some Connect clients) relies on the server for, as for a unary wait.
///
/// `next` takes the watch and gives back the next message with the watch to continue with, or
/// `None` for the watch when that message is its last; `None` altogether ends the stream. The
/// shutdown and deadline futures are made once for the stream's life and polled only while the
/// watch waits, and then cheaply (see [`Cancelled`]).
pub(super) fn until_shutdown<W, T, F, Fut>(
    watch: W,
    stopping: CancellationToken,
    deadline: Option<Instant>,
    resume_with: &'static str,
    next: F,
) -> impl Stream<Item = Result<T, Status>> + Send + 'static
where
    W: Send + 'static,
    T: Send + 'static,
    F: FnMut(W) -> Fut + Send + 'static,
    Fut: Future<Output = Option<(Result<T, Status>, Option<W>)>> + Send,
{
    let deadline = deadline.map(|at| Box::pin(tokio::time::sleep_until(at)));
    let state = Some((watch, Cancelled::new(stopping), deadline));
    futures::stream::unfold((state, next), move |(state, mut next)| async move {
        let (watch, mut stopping, mut deadline) = state?;
        // Checked before the next message too: a stream whose messages are always ready
        // (a reader slower than its jobs' changes) would never poll the branch below.
        if deadline.as_ref().is_some_and(|sleep| sleep.is_elapsed()) {
            return Some((Err(deadline_passed(resume_with)), (None, next)));
        }
        let passed = async {
            match deadline.as_mut() {
                Some(sleep) => sleep.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            step = next(watch) => {
                let (item, watch) = step?;
                Some((item, (watch.map(|watch| (watch, stopping, deadline)), next)))
            }
            _ = &mut stopping => {
                let status = shutting_down(format!(
                    "the server is shutting down; resume the watch with {resume_with}"
                ));
                Some((Err(status), (None, next)))
            }
            _ = passed => Some((Err(deadline_passed(resume_with)), (None, next))),
        }
    })
}

fn deadline_passed(resume_with: &str) -> Status {
    Status::deadline_exceeded(format!(
        "the call's deadline passed; resume the watch with {resume_with}"
    ))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchJobResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Jobs for JobsService {
    #[tracing::instrument(skip_all, fields(job_id))]
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let wait = request
            .get_ref()
            .wait
            .and_then(|d| convert::duration("wait", d).ok())
            .filter(|d| !d.is_zero());
        let until = wait.and_then(|w| wait::wait_until(request.metadata(), Some(w)));
        let tenant = tenant(&request);
        let trace = TraceContext::from_headers(request.metadata().as_ref());
        // Every call takes a token, an invalid one too, and an empty bucket is answered before
        // anything is validated: the bucket bounds the work a tenant's calls cost, whatever they
        // hold. A bad request within the rate is told what is wrong with it.
        self.rates.check(&tenant)?;
        let mut request = request.into_inner();
        let webhook = request.webhook.take().map(|w| self.validate_webhook(w));
        // Checked by the executor too, with the actions, for a request valid here; a request
        // refused here is told of it as well.
        let attempts = self
            .executor
            .check_max_attempts(u32::try_from(request.max_attempts).ok());
        // Every violation at once, the webhook's with the rest; the network (the webhook
        // host's DNS) only for a request otherwise valid.
        let (mut spec, webhook) = match (
            convert::new_job(request, &self.limits, self.executor.registry()),
            webhook,
        ) {
            (Ok(spec), None) => (spec, None),
            (Ok(spec), Some(Ok(checked))) => (spec, Some(checked)),
            (Ok(_), Some(Err(mut violations))) => {
                violations.extend(attempts);
                return Err(invalid(violations));
            }
            (Err(mut violations), webhook) => {
                violations.extend(webhook.and_then(Result::err).unwrap_or_default());
                violations.extend(attempts);
                return Err(invalid(violations));
            }
        };
        if let Some(checked) = webhook {
            spec.webhook = Some(self.webhooks.guard(checked).await.map_err(invalid_field)?);
        }
        spec.tenant = tenant.to_string();
        spec.trace = trace;
        let job = self.executor.submit_checked(spec).await?;
        tracing::Span::current().record("job_id", tracing::field::display(job.id));
        let job = match until {
            // Sync mode: the job is returned whatever happens, never hidden behind an error.
            Some(until) => match self.wait_for(job.id, Some(until)).await {
                Ok((job, _)) => job,
                Err(status) => {
                    tracing::warn!(%status, "wait failed; returning the job as submitted");
                    convert::job(&job)
                }
            },
            None => convert::job(&job),
        };
        Ok(Response::new(pb::SubmitResponse { job: Some(job) }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let id = job_id("job_id", &request.get_ref().job_id)?;
        let job = current_owned(&self.executor, &tenant(&request), id).await?;
        let job = self.with_deliveries(id, convert::job(&job)).await?;
        Ok(Response::new(pb::GetStatusResponse { job: Some(job) }))
    }

    type WatchJobStream = WatchStream;

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let tenant = tenant(&request);
        let permit = self.open_watch(&request)?;
        let deadline = wait::call_deadline(request.metadata());
        let request = request.into_inner();
        let id = job_id("job_id", &request.job_id)?;
        if request.after_version < 0 {
            return Err(invalid_field(FieldViolation::new(
                "after_version",
                "must not be negative",
            )));
        }
        check_owner(&self.executor, &tenant, id).await?;
        let store = Arc::clone(self.executor.store());
        let executor = &self.executor;
        let watch = JobWatch::open(store, executor.hub(), id, request.after_version, || {
            executor.newest_in_memory(id)
        })
        .await
        .map_err(watch_status)?
        .pace_progress(self.limits.watch_progress_interval);
        let stream = until_shutdown(
            watch,
            self.stopping.clone(),
            deadline,
            "after_version",
            |mut watch| async move {
                let item = watch
                    .next()
                    .await?
                    .map(|job| pb::WatchJobResponse {
                        job: Some(convert::job(&job)),
                    })
                    .map_err(watch_status);
                Some((item, Some(watch)))
            },
        );
        Ok(Response::new(Box::pin(counted(
            stream,
            self.executor.metrics(),
            permit,
        ))))
    }

    type WatchJobsStream = super::watch_jobs::WatchJobsStream;

    #[tracing::instrument(skip_all)]
    async fn watch_jobs(
        &self,
        request: Request<pb::WatchJobsRequest>,
    ) -> Result<Response<Self::WatchJobsStream>, Status> {
        let permit = self.open_watch(&request)?;
        let tenant = tenant(&request);
        let deadline = wait::call_deadline(request.metadata());
        let stream = super::watch_jobs::open(
            &self.executor,
            &self.limits,
            self.stopping.clone(),
            deadline,
            &tenant,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(Box::pin(counted(
            stream,
            self.executor.metrics(),
            permit,
        ))))
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn wait_job(
        &self,
        request: Request<pb::WaitJobRequest>,
    ) -> Result<Response<pb::WaitJobResponse>, Status> {
        let id = job_id("job_id", &request.get_ref().job_id)?;
        let until = wait::until_timeout(request.metadata(), request.get_ref().timeout)?;
        check_owner(&self.executor, &tenant(&request), id).await?;
        let (job, done) = wait::wait_for_end(
            &self.executor,
            &self.stopping,
            id,
            until,
            format!("job {id}"),
        )
        .await?;
        let job = self.with_deliveries(id, job).await?;
        Ok(Response::new(pb::WaitJobResponse {
            job: Some(job),
            done,
        }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let id = job_id("job_id", &request.get_ref().job_id)?;
        check_owner(&self.executor, &tenant(&request), id).await?;
        let job = self.executor.cancel(id).await?;
        Ok(Response::new(pb::CancelResponse {
            job: Some(convert::job(&job)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let tenant = tenant(&request);
        let request = request.into_inner();
        let mut violations = convert::check_labels("labels", &request.labels, &self.limits);
        let mut states = Vec::new();
        for (i, value) in request.states.iter().enumerate() {
            match convert::domain_job_state(*value) {
                Some(state) => states.push(state),
                // Documented as matching nothing: no job is ever in that state.
                None if *value == pb::JobState::Unspecified as i32 => {}
                None => violations.push(FieldViolation::new(
                    format!("states[{i}]"),
                    format!("{value} is not a job state"),
                )),
            }
        }
        let matches_nothing = !request.states.is_empty() && states.is_empty();
        // The states as a set: the same filter in another order, or with a state twice, is
        // the same query and takes the same tokens.
        let mut state_set = request.states.clone();
        state_set.sort_unstable();
        state_set.dedup();
        let states_text = format!("{state_set:?}");
        let mut labels: Vec<(&String, &String)> = request.labels.iter().collect();
        labels.sort();
        let scope = super::paging::scope(
            ["ListJobs", tenant.as_ref(), &states_text]
                .into_iter()
                .chain(labels.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()])),
        );
        let page = Page::parse(
            request.page_size,
            &request.page_token,
            scope,
            &self.limits,
            "ListJobs",
            &mut violations,
        );
        if !violations.is_empty() {
            return Err(invalid(violations));
        }
        if matches_nothing {
            return Ok(Response::new(pb::ListJobsResponse::default()));
        }
        let query = ListQuery {
            states,
            labels: request.labels.into_iter().collect(),
            tenant: Some(tenant.to_string()),
            ..ListQuery::default()
        };
        self.executor.until_recovered().await?;
        let (jobs, next_page_token) = page
            .read_items(
                &self.executor,
                query,
                self.limits.max_message_bytes,
                convert::job,
            )
            .await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        let id = job_id("job_id", &request.get_ref().job_id)?;
        check_owner(&self.executor, &tenant(&request), id).await?;
        match self.executor.store().delete(id).await? {
            Deleted::Removed => {
                self.executor.hub().forget(id);
                Ok(Response::new(pb::DeleteJobResponse {}))
            }
            Deleted::NotFound => Err(job_not_found(id)),
            Deleted::NotTerminal(job) => Err(job_not_finished(id, job.state)),
        }
    }

    #[tracing::instrument(skip_all)]
    async fn list_actions(
        &self,
        _request: Request<pb::ListActionsRequest>,
    ) -> Result<Response<pb::ListActionsResponse>, Status> {
        let actions = self
            .executor
            .registry()
            .list()
            .into_iter()
            .map(|info| pb::ActionInfo {
                name: info.name,
                description: info.description.description,
                params: info
                    .description
                    .params
                    .into_iter()
                    .map(|p| pb::ParamInfo {
                        name: p.name,
                        r#type: p.kind.as_str().to_owned(),
                        description: p.description,
                        required: p.required,
                    })
                    .collect(),
                uses_input: info.description.uses_input,
            })
            .collect();
        Ok(Response::new(pb::ListActionsResponse { actions }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(version: i64) -> pb::WebhookDelivery {
        pb::WebhookDelivery {
            delivery_id: uuid::Uuid::now_v7().to_string(),
            job_version: version,
            last_error: "HTTP 503".to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn the_newest_deliveries_that_fit_are_kept_in_order() {
        let all: Vec<_> = (1..=10).map(delivery).collect();
        let one = 1 + crate::job::framed(all[0].encoded_len());
        let versions =
            |kept: &[pb::WebhookDelivery]| kept.iter().map(|d| d.job_version).collect::<Vec<_>>();
        assert_eq!(versions(&newest_that_fit(all.clone(), 3 * one)), [8, 9, 10]);
        assert_eq!(
            versions(&newest_that_fit(all.clone(), 3 * one + one - 1)),
            [8, 9, 10]
        );
        assert_eq!(versions(&newest_that_fit(all.clone(), one - 1)), [0i64; 0]);
        assert_eq!(newest_that_fit(all.clone(), 100 * one), all);
        // What is kept is what the response's field takes.
        let kept = newest_that_fit(all, 5 * one);
        let job = pb::Job {
            webhook_deliveries: kept,
            ..Default::default()
        };
        assert_eq!(job.encoded_len(), 5 * one);
    }
}
