//! The delivery worker: one task that finds due deliveries in the store and sends each as a
//! signed POST, a bounded number at once, recording every attempt.
//!
//! It scans at start (what a previous run left pending: this is what makes a crash between
//! commit and delivery harmless), whenever a transition of a job with a webhook is published,
//! when a retry falls due, and every [`POLL_INTERVAL`] as a safety net. A job's deliveries go
//! one at a time, in version order (the store only offers the oldest pending one of a job).

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rand::Rng as _;
use reqwest::{StatusCode, redirect};
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use super::{
    WebhookConfig,
    body::{BodyWriter, event_type},
    guard::{self, AllowList},
    resolver::GuardedResolver,
    sign,
};
use crate::{
    events::Hub,
    job::{AttemptOutcome, JobId},
    metrics::Metrics,
    store::{DueDelivery, Store},
};

/// The longest the worker sleeps without looking for due deliveries.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The `user-agent` of deliveries.
const USER_AGENT: &str = concat!("longrun-webhooks/", env!("CARGO_PKG_VERSION"));

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The HTTP client could not be built (no TLS roots, …).
    #[error("building the webhook HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// The body writer could not load its descriptors.
    #[error(transparent)]
    Body(#[from] super::body::BodyError),
}

/// How much longer than an attempt's timeout a replica holds the delivery it claimed: time to
/// record the attempt once it has ended.
const DELIVERY_CLAIM_MARGIN: Duration = Duration::from_secs(5);

/// The attempts after a delivery's first that may be in flight at once, of `concurrency`:
/// half, and at least one.
fn retry_slots(concurrency: usize) -> usize {
    (concurrency / 2).max(1)
}

/// How often [`WebhookWorker::flush`] looks whether the outbox is done.
const FLUSH_CHECK_INTERVAL: Duration = Duration::from_millis(20);

/// Sends the outbox's deliveries. Cheap to clone: every clone shares the same state.
#[derive(Clone)]
pub struct WebhookWorker {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    config: Arc<WebhookConfig>,
    allow: Arc<AllowList>,
    client: reqwest::Client,
    bodies: BodyWriter,
    /// Jobs with an attempt in flight, or whose attempt ended since the last scan began: never
    /// two of one job at once.
    in_flight: Arc<Mutex<HashSet<JobId>>>,
    /// Jobs whose attempt ended (and was recorded), to leave `in_flight` when the next scan
    /// begins. Not at once: a scan whose store read began before the record may hold the
    /// delivery as still due, and would send it again (seen on SQLite, whose reads are
    /// awaited on another thread while attempts end).
    ended: Arc<Mutex<Vec<JobId>>>,
    permits: Arc<Semaphore>,
    /// How many permits there are: all free when no attempt is in flight.
    slots: usize,
    /// Held, besides a permit, by the attempts after a delivery's first: half the permits at
    /// most, so receivers that keep failing (timing out, say) never take every slot from
    /// the deliveries of healthy ones.
    retry_permits: Arc<Semaphore>,
    tasks: TaskTracker,
    stopping: CancellationToken,
}

impl WebhookWorker {
    /// A worker over `store`, woken by `hub`'s webhook notifications, until `stopping` fires.
    pub fn new(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        config: WebhookConfig,
        stopping: CancellationToken,
    ) -> Result<Self, WorkerError> {
        let allow = Arc::new(AllowList::new(&config.allow_hosts));
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            // A redirect could lead anywhere, internal addresses included: it fails the
            // attempt instead.
            .redirect(redirect::Policy::none())
            // A proxy would resolve names itself, out of the guard's reach.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver::new(
                Arc::clone(&allow),
                config.timeout,
            )))
            .build()?;
        let concurrency = config.concurrency.clamp(1, Semaphore::MAX_PERMITS);
        Ok(Self {
            store,
            hub,
            metrics,
            config: Arc::new(config),
            allow,
            client,
            bodies: BodyWriter::new()?,
            in_flight: Arc::default(),
            ended: Arc::default(),
            permits: Arc::new(Semaphore::new(concurrency)),
            slots: concurrency,
            retry_permits: Arc::new(Semaphore::new(retry_slots(concurrency))),
            tasks: TaskTracker::new(),
            stopping,
        })
    }

    /// Starts the worker's task; it runs until `stopping` fires, then abandons attempts in
    /// flight (their deliveries stay pending, and the next run sends them again).
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move { self.run().await })
    }

    /// Waits, at most `bound`, until no delivery is due and none is in flight: on shutdown,
    /// so that a job that ended while the server drained has its webhook sent before the
    /// process exits rather than at its next start. A failing delivery waiting out its
    /// backoff is not waited for; it stays in the outbox.
    pub async fn flush(&self, bound: Duration) {
        let until = tokio::time::Instant::now() + bound;
        loop {
            let idle = self.permits.available_permits() >= self.slots
                && matches!(
                    self.store.due_deliveries(SystemTime::now(), 1).await,
                    Ok(due) if due.is_empty()
                );
            if idle || tokio::time::Instant::now() >= until {
                return;
            }
            self.hub.webhook_wake().notify_one();
            tokio::time::sleep(FLUSH_CHECK_INTERVAL).await;
        }
    }

    async fn run(self) {
        loop {
            self.scan().await;
            tokio::select! {
                _ = self.stopping.cancelled() => break,
                _ = self.hub.webhook_wake().notified() => {}
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Starts an attempt for each due delivery that has no attempt of its job in flight, as
    /// far as free permits go.
    async fn scan(&self) {
        let ended: Vec<JobId> = std::mem::take(&mut *lock(&self.ended));
        let busy = {
            let mut in_flight = self.lock_in_flight();
            for job_id in ended {
                in_flight.remove(&job_id);
            }
            in_flight.len()
        };
        // Past the free permits: retries the retry lane cannot take yet are passed over for
        // the first attempts behind them.
        let limit = busy + self.permits.available_permits().max(1) * 4;
        let due = match self.store.due_deliveries(SystemTime::now(), limit).await {
            Ok(due) => due,
            Err(error) => {
                tracing::warn!(error = %crate::with_causes(&error), "reading due webhook deliveries failed; will retry");
                return;
            }
        };
        for delivery in due {
            // Taken first, and only for a retry: a retry finding none leaves the permits to
            // the first attempts further down the list.
            let retry_permit = if delivery.delivery.attempts > 0 {
                match Arc::clone(&self.retry_permits).try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => continue, // a finishing retry wakes the worker again
                }
            } else {
                None
            };
            let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                break; // every permit busy: a finishing attempt wakes the worker again
            };
            if !self.lock_in_flight().insert(delivery.job.id) {
                continue;
            }
            // Replicas sharing a store all see the same due deliveries: one takes each.
            if let Some(shared) = self.store.shared() {
                let claimed = shared
                    .claim_delivery(
                        delivery.delivery.id,
                        SystemTime::now(),
                        // An attempt ends within its timeout; then it is recorded.
                        self.config.timeout.saturating_add(DELIVERY_CLAIM_MARGIN),
                    )
                    .await;
                if !matches!(claimed, Ok(true)) {
                    if let Err(error) = claimed {
                        tracing::warn!(error = %crate::with_causes(&error), "claiming a webhook delivery failed; will retry");
                    }
                    self.lock_in_flight().remove(&delivery.job.id);
                    continue;
                }
            }
            let worker = self.clone();
            let span = tracing::info_span!(
                "webhook_delivery",
                job_id = %delivery.job.id,
                delivery_id = %delivery.delivery.id,
                attempt = delivery.delivery.attempts + 1,
                trace_id = delivery
                    .job
                    .trace
                    .as_ref()
                    .map(|trace| tracing::field::display(trace.trace_id())),
            );
            self.tasks.spawn(
                async move {
                    let job_id = delivery.job.id;
                    tokio::select! {
                        _ = worker.attempt(delivery) => {}
                        _ = worker.stopping.cancelled() => {}
                    }
                    lock(&worker.ended).push(job_id);
                    drop((permit, retry_permit));
                    worker.hub.webhook_wake().notify_one();
                }
                .instrument(span),
            );
        }
        match self.store.pending_deliveries().await {
            Ok(pending) => crate::metrics::set(&self.metrics.webhook_pending, pending),
            Err(error) => tracing::debug!(%error, "counting pending deliveries failed"),
        }
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<JobId>> {
        lock(&self.in_flight)
    }

    /// One attempt of one delivery, recorded in the store.
    async fn attempt(&self, due: DueDelivery) {
        let attempt = due.delivery.attempts.saturating_add(1);
        let outcome = match self.send(&due).await {
            Ok(()) => AttemptOutcome::Delivered {
                at: SystemTime::now(),
            },
            Err(error) if attempt >= self.config.max_attempts => AttemptOutcome::Dead { error },
            Err(error) => AttemptOutcome::Retry {
                retry_at: SystemTime::now() + self.backoff(attempt),
                error,
            },
        };
        let label = match &outcome {
            AttemptOutcome::Delivered { .. } => {
                tracing::info!("webhook delivered");
                "delivered"
            }
            AttemptOutcome::Retry { error, retry_at } => {
                tracing::warn!(%error, retry_in = ?retry_at.duration_since(SystemTime::now()).unwrap_or_default(), "webhook attempt failed; will retry");
                "retry"
            }
            AttemptOutcome::Dead { error } => {
                tracing::error!(%error, attempts = attempt, "webhook delivery is dead: no attempts left");
                "dead"
            }
        };
        self.metrics.webhook_attempt(label);
        match self
            .store
            .record_delivery_attempt(due.delivery.id, &outcome)
            .await
        {
            Ok(_) => {
                if let AttemptOutcome::Retry { retry_at, .. } = outcome {
                    self.wake_at(retry_at);
                }
            }
            // The delivery stays pending and due: it is sent again (at least once holds), but
            // not before a pause, so a store that cannot write does not turn into a flood of
            // requests at the receiver.
            Err(error) => {
                tracing::warn!(error = %crate::with_causes(&error), "recording a webhook attempt failed; pausing this job's deliveries");
                tokio::time::sleep(POLL_INTERVAL.max(self.backoff(attempt))).await;
            }
        }
    }

    /// Wakes the worker when a retry falls due.
    fn wake_at(&self, at: SystemTime) {
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        let hub = Arc::clone(&self.hub);
        let stopping = self.stopping.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(wait) => hub.webhook_wake().notify_one(),
                _ = stopping.cancelled() => {}
            }
        });
    }

    /// The wait after failed attempt number `attempt`: see [`backoff`].
    fn backoff(&self, attempt: u32) -> Duration {
        backoff(
            self.config.backoff,
            self.config.backoff_max,
            attempt,
            rand::rng().random(),
        )
    }

    /// Sends one POST; `Err` says why it does not count as delivered.
    async fn send(&self, due: &DueDelivery) -> Result<(), String> {
        let webhook = due
            .job
            .webhook
            .as_ref()
            .ok_or("the job has no webhook (a store inconsistency)")?;
        let url = guard::parse_url(&webhook.url).map_err(|e| e.to_string())?;
        self.recheck(&url).await?;
        let body = self
            .bodies
            .body(&due.delivery, &due.job)
            .map_err(|e| e.to_string())?;
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let signature = sign::signature(&webhook.secret, timestamp, &body);
        let mut request = self.client.post(url);
        // The receiver's handling joins the trace of the Submit that created the job.
        for (name, value) in due.job.trace.iter().flat_map(|trace| trace.headers()) {
            request = request.header(name, value);
        }
        let response = request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                "longrun-delivery-id",
                due.delivery.id.hyphenated().to_string(),
            )
            .header("longrun-event", event_type(&due.delivery))
            .header("longrun-timestamp", timestamp.to_string())
            .header("longrun-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| describe(&e, self.config.timeout))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else if status.is_redirection() {
            Err(format!("HTTP {status} (redirects are not followed)"))
        } else {
            Err(format!("HTTP {}", status_text(status)))
        }
    }

    /// The delivery-time SSRF check for what the resolver cannot see: IP literals (never
    /// resolved) and names allowed on another port only.
    async fn recheck(&self, url: &reqwest::Url) -> Result<(), String> {
        let literal = matches!(
            url.host(),
            Some(url::Host::Ipv4(_)) | Some(url::Host::Ipv6(_))
        );
        let port = url.port_or_known_default().unwrap_or(0);
        let host = url.host_str().unwrap_or_default();
        // A name allowed on another port only would pass the resolver (which never sees the
        // port): check it in full here, as an IP literal must be.
        let allowed_elsewhere = !self.allow.allows(host, port) && self.allow.allows_name(host);
        if literal || allowed_elsewhere {
            guard::check_url(url, &self.allow, self.config.timeout)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// The wait after failed attempt number `attempt` (from 1): `fraction` (drawn uniformly from
/// [0, 1)) of the exponential ceiling `min(base × 2^(attempt-1), max)` — "full jitter", so
/// receivers that failed together are not all hit again at the same moment.
pub fn backoff(base: Duration, max: Duration, attempt: u32, fraction: f64) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    let ceiling = base.saturating_mul(1 << doublings).min(max);
    ceiling.mul_f64(fraction.clamp(0.0, 1.0))
}

/// `503 Service Unavailable`.
fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// A transport error with its causes, e.g. `connection refused`.
fn describe(error: &reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        return format!("timed out after {timeout:?}");
    }
    crate::with_causes(error)
}

/// Each critical section on the worker's sets is one operation on them: a poisoned lock is
/// still consistent.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_jitters_below_it() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(600);
        let ceilings: Vec<u64> = (1..=12)
            .map(|n| backoff(base, max, n, 1.0).as_secs())
            .collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(backoff(base, max, 3, 0.0), Duration::ZERO);
        assert_eq!(backoff(base, max, 3, 0.5), Duration::from_secs(2));
        assert_eq!(backoff(base, max, u32::MAX, 1.0), max, "no overflow");
    }
}
