//! The `longrun.v1.Jobs` service: a thin adapter from requests to the executor, the store and
//! the event hub.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use super::{
    Limits,
    convert::{self, parse_job_id},
    pb::{self, jobs_server::Jobs},
    status::{invalid, invalid_field, job_not_found},
};
use crate::{
    events::{JobWatch, WatchError, current, wait_terminal},
    executor::Executor,
    job::{FieldViolation, JobId},
    metrics::{Metrics, WatchGuard},
    store::{Deleted, ListQuery},
};

/// How long before the caller's deadline a waiting call answers, so the answer arrives in time.
const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

/// Serves `longrun.v1.Jobs` over an [`Executor`].
#[derive(Clone)]
pub struct JobsService {
    executor: Executor,
    limits: Arc<Limits>,
    stopping: CancellationToken,
}

impl JobsService {
    /// A service over `executor`, enforcing `limits`. When `stopping` fires, open watches end
    /// with UNAVAILABLE (clients resume elsewhere or later) and waits return at once.
    pub fn new(executor: Executor, limits: Limits, stopping: CancellationToken) -> Self {
        Self {
            executor,
            limits: Arc::new(limits),
            stopping,
        }
    }

    /// When a waiting call must answer: at `wait` from now, or just before the call's own
    /// deadline (`grpc-timeout`), whichever comes first.
    fn wait_until(metadata: &MetadataMap, wait: Option<Duration>) -> Option<Instant> {
        let now = Instant::now();
        let by_deadline = grpc_timeout(metadata).map(|t| now + t.saturating_sub(DEADLINE_MARGIN));
        let by_wait = wait.map(|w| now + w);
        match (by_deadline, by_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    async fn wait_for(&self, id: JobId, until: Option<Instant>) -> Result<(pb::Job, bool), Status> {
        let wait = wait_terminal(self.executor.store(), self.executor.hub(), id, until);
        let (job, done) = tokio::select! {
            waited = wait => waited.map_err(watch_status)?,
            _ = self.stopping.cancelled() => {
                let job = self.executor.store().get(id).await?.ok_or_else(|| job_not_found(id))?;
                let done = job.is_terminal();
                (Arc::new(job), done)
            }
        };
        Ok((convert::job(&job), done))
    }
}

/// Parses the `grpc-timeout` header: digits followed by a unit (H, M, S, m, u, n).
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

fn watch_status(error: WatchError) -> Status {
    match error {
        WatchError::NotFound(id) => job_not_found(id),
        WatchError::FutureVersion { .. } => {
            invalid_field(FieldViolation::new("after_version", error.to_string()))
        }
        WatchError::Store(error) => error.into(),
    }
}

fn job_id(field: &str, value: &str) -> Result<JobId, Status> {
    parse_job_id(field, value).map_err(invalid_field)
}

/// The stream, counted in the open-watches gauge for as long as it lives.
pub(super) fn counted<S: Stream + Send + 'static>(
    stream: S,
    metrics: &Arc<Metrics>,
) -> impl Stream<Item = S::Item> + Send + 'static {
    let guard = WatchGuard::open(metrics);
    futures::StreamExt::map(stream, move |item| {
        let _open = &guard;
        item
    })
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
        let until = wait.and_then(|w| Self::wait_until(request.metadata(), Some(w)));
        let spec = convert::new_job(request.into_inner(), &self.limits).map_err(invalid)?;
        let job = self.executor.submit(spec).await?;
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
        let job = current(self.executor.store(), self.executor.hub(), id)
            .await
            .map_err(watch_status)?;
        Ok(Response::new(pb::GetStatusResponse {
            job: Some(convert::job(&job)),
        }))
    }

    type WatchJobStream = WatchStream;

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let request = request.into_inner();
        let id = job_id("job_id", &request.job_id)?;
        if request.after_version < 0 {
            return Err(invalid_field(FieldViolation::new(
                "after_version",
                "must not be negative",
            )));
        }
        let store = Arc::clone(self.executor.store());
        let watch = JobWatch::open(store, self.executor.hub(), id, request.after_version)
            .await
            .map_err(watch_status)?;
        let stopping = self.stopping.clone();
        let stream = futures::stream::unfold(Some(watch), move |watch| {
            let stopping = stopping.clone();
            async move {
                let mut watch = watch?;
                let item = tokio::select! {
                    item = watch.next() => item?,
                    _ = stopping.cancelled() => {
                        let status = Status::unavailable(
                            "the server is shutting down; resume the watch with after_version",
                        );
                        return Some((Err(status), None));
                    }
                };
                let item = item
                    .map(|job| pb::WatchJobResponse {
                        job: Some(convert::job(&job)),
                    })
                    .map_err(Status::from);
                Some((item, Some(watch)))
            }
        });
        Ok(Response::new(Box::pin(counted(
            stream,
            self.executor.metrics(),
        ))))
    }

    type WatchJobsStream = super::watch_jobs::WatchJobsStream;

    #[tracing::instrument(skip_all)]
    async fn watch_jobs(
        &self,
        request: Request<pb::WatchJobsRequest>,
    ) -> Result<Response<Self::WatchJobsStream>, Status> {
        let stream = super::watch_jobs::open(
            &self.executor,
            &self.limits,
            self.stopping.clone(),
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(Box::pin(counted(
            stream,
            self.executor.metrics(),
        ))))
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn wait_job(
        &self,
        request: Request<pb::WaitJobRequest>,
    ) -> Result<Response<pb::WaitJobResponse>, Status> {
        let id = job_id("job_id", &request.get_ref().job_id)?;
        let timeout = request
            .get_ref()
            .timeout
            .map(|d| convert::duration("timeout", d))
            .transpose()
            .map_err(invalid_field)?;
        let until = Self::wait_until(request.metadata(), timeout);
        let (job, done) = self.wait_for(id, until).await?;
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
        let limit = match usize::try_from(request.page_size) {
            Ok(0) => self.limits.default_page_size,
            Ok(n) if n <= self.limits.max_page_size => n,
            _ => {
                violations.push(FieldViolation::new(
                    "page_size",
                    format!("must be between 0 and {}", self.limits.max_page_size),
                ));
                0
            }
        };
        let before = if request.page_token.is_empty() {
            None
        } else {
            match parse_job_id("page_token", &request.page_token) {
                Ok(id) => Some(id),
                Err(_) => {
                    violations.push(FieldViolation::new(
                        "page_token",
                        "is not a token from a previous ListJobs response",
                    ));
                    None
                }
            }
        };
        if !violations.is_empty() {
            return Err(invalid(violations));
        }
        if matches_nothing {
            return Ok(Response::new(pb::ListJobsResponse::default()));
        }
        let query = ListQuery {
            states,
            labels: request.labels.into_iter().collect(),
            before,
            // One more than asked tells whether another page exists.
            limit: limit + 1,
        };
        let mut jobs = self.executor.store().list(&query).await?;
        let next_page_token = if jobs.len() > limit {
            jobs.truncate(limit);
            jobs.last()
                .map(|job| job.id.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(convert::job).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        let id = job_id("job_id", &request.get_ref().job_id)?;
        match self.executor.store().delete(id).await? {
            Deleted::Removed => Ok(Response::new(pb::DeleteJobResponse {})),
            Deleted::NotFound => Err(job_not_found(id)),
            Deleted::NotTerminal(job) => Err(Status::failed_precondition(format!(
                "job {id} is {}; only a job that has ended can be deleted (cancel it first)",
                job.state
            ))),
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

    fn metadata(timeout: &str) -> MetadataMap {
        let mut map = MetadataMap::new();
        map.insert("grpc-timeout", timeout.parse().unwrap());
        map
    }

    #[test]
    fn grpc_timeout_header_is_parsed() {
        assert_eq!(
            grpc_timeout(&metadata("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(grpc_timeout(&metadata("3S")), Some(Duration::from_secs(3)));
        assert_eq!(
            grpc_timeout(&metadata("2H")),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(grpc_timeout(&metadata("9x")), None);
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }
}
