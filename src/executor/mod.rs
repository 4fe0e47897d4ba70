//! The executor: a priority queue with a concurrency limit, one owner task per running job,
//! cancellation, timeouts, retries with backoff, crash recovery and graceful shutdown.
//!
//! Every change to a job is saved through the [`Store`] before it is published through the
//! [`Hub`], so nobody is ever told of a state that could be lost.

#[cfg(test)]
mod attempt_tests;
mod queue;
mod run;
mod shared;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    actions::Registry,
    events::{self, Hub, WatchError},
    job::{FieldViolation, IllegalTransition, Job, JobError, JobId, JobState, NewJob},
    metrics::Metrics,
    store::{Created, Store, StoreError},
};
use queue::{Full, Holder, Place, Rank, Scheduler, StopHandle, StopReason};

/// How long Cancel waits for the task holding a job to store the cancel (see
/// [`Executor::cancel`]).
const CANCEL_SETTLE: Duration = Duration::from_secs(5);

fn watch_error(error: WatchError) -> ExecutorError {
    match error {
        WatchError::NotFound(id) => ExecutorError::NotFound(id),
        WatchError::Store(error) => ExecutorError::Store(error),
        // Only asked of watches that resume after a version; none is asked for here.
        WatchError::FutureVersion { id, .. } => ExecutorError::NotFound(id),
    }
}

/// The longest the dispatcher sleeps towards a scheduled job's due time before it looks at
/// the clock again: due times are wall-clock times, and tokio's timers are not.
const MAX_DUE_WAIT: Duration = Duration::from_secs(60);

/// The span a job's run is logged in. Its `trace_id` is recorded by [`record_trace`] once
/// the job is at hand (a queued job may have to be read from the store first). A root span
/// that follows from the one it is made in (the Submit that started the job at once, say):
/// as that one's child it would keep the RPC's span open, for a tracing exporter, until
/// the job ends.
fn job_span(id: JobId) -> tracing::Span {
    let span =
        tracing::info_span!(parent: None, "job", job_id = %id, trace_id = tracing::field::Empty);
    span.follows_from(tracing::Span::current());
    span
}

/// Records, in the current [`job_span`], the trace of the Submit that created `job`, so that
/// the lines of a run started long after that call (or by another process) can still be
/// found from the caller's trace.
fn record_trace(job: &Job) {
    if let Some(trace) = &job.trace {
        tracing::Span::current().record("trace_id", tracing::field::display(trace.trace_id()));
    }
}

/// The job an idempotency key led to, when the Submit that used the key again asked for
/// that same job; an error naming the first differing field otherwise, since answering with
/// a job other than the one asked for would hide the caller's mistake.
fn same_request(difference: Option<String>, existing: Job) -> Result<Job, ExecutorError> {
    match difference {
        None => Ok(existing),
        Some(field) => Err(ExecutorError::IdempotencyKeyReused {
            key: existing.idempotency_key.clone().unwrap_or_default(),
            job_id: existing.id,
            field,
        }),
    }
}

/// What to do with jobs that were RUNNING when the server stopped without finishing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InterruptedPolicy {
    /// Queue them again with `attempt + 1` while they have attempts left; fail the others
    /// with reason `INTERRUPTED`.
    #[default]
    Requeue,
    /// Fail them all with reason `INTERRUPTED`.
    Fail,
}

/// The executor's limits and timings.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Jobs run at once: jobs whose start is being committed or whose handlers are running.
    /// A job whose handlers are done no longer counts while its end is committed.
    pub concurrency: usize,
    /// Jobs waiting in the queue at most; Submit past it is refused.
    pub max_queue_length: usize,
    /// Attempts a job gets when its Submit does not say.
    pub default_max_attempts: u32,
    /// The upper bound for `max_attempts` in a Submit.
    pub max_attempts_limit: u32,
    /// How large a job's results may be together, as sent (see [`crate::job::wire_size`]): an
    /// action whose result would take them past it fails with `RESULT_TOO_LARGE`, so that
    /// the job can still be read back in one response. A server lowers it to what its message
    /// size limit allows ([`ExecutorConfig::results_budget`]).
    pub max_results_bytes: usize,
    /// The wait before the first retry; doubled for each further one.
    pub retry_backoff_initial: Duration,
    /// The longest wait between retries.
    pub retry_backoff_max: Duration,
    /// How long a cancelled or timed-out handler may take to stop before it is dropped.
    pub cancel_grace: Duration,
    /// How often a running job's progress is written to the store at most (progress is
    /// pushed to watchers at once either way); `None` for the store's default, see
    /// [`ExecutorConfig::progress_write_interval`].
    pub progress_persist_interval: Option<Duration>,
    /// What recovery does with jobs found RUNNING at start.
    pub interrupted_policy: InterruptedPolicy,
    /// The size and count limits of a job submitted in-process ([`Executor::submit`]); a
    /// server sets them to the API's own (`Config::limits`).
    pub submit_limits: crate::job::SubmitLimits,
    /// Jobs one tenant may have waiting in the queue, unless `tenant_max_queued` says
    /// otherwise; `None` for no per-tenant limit (only `max_queue_length`).
    pub max_queued_per_tenant: Option<usize>,
    /// Per-tenant overrides of `max_queued_per_tenant`.
    pub tenant_max_queued: BTreeMap<String, usize>,
}

impl ExecutorConfig {
    /// The results budget for responses of at most `max_message_bytes` (see
    /// [`crate::job::job_budget`] for how a job's snapshot is shared out).
    pub fn results_budget(max_message_bytes: usize) -> usize {
        crate::job::results_budget(max_message_bytes)
    }

    /// How often a running job's progress is written to the store at most: as configured,
    /// else 1 s on a store `shared` with other replicas (it is how soon they see progress)
    /// and 10 s on one only this server reads. There, stored progress serves only listings
    /// (which take the newer one from memory, see [`crate::events::Hub::with_newest_progress`])
    /// and whoever opens the database; an interrupted job starts its actions over. Writing it
    /// every second would be most of what a job that reports once a second costs.
    pub fn progress_write_interval(&self, shared: bool) -> Duration {
        self.progress_persist_interval
            .unwrap_or(Duration::from_secs(if shared { 1 } else { 10 }))
    }

    /// How many jobs `tenant` may have waiting, if it is limited.
    pub fn tenant_queue_limit(&self, tenant: &str) -> Option<usize> {
        self.tenant_max_queued
            .get(tenant)
            .copied()
            .or(self.max_queued_per_tenant)
    }
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_queue_length: 100_000,
            default_max_attempts: 1,
            max_attempts_limit: 100,
            max_results_bytes: Self::results_budget(16 * 1024 * 1024),
            retry_backoff_initial: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(60),
            cancel_grace: Duration::from_secs(10),
            progress_persist_interval: None,
            interrupted_policy: InterruptedPolicy::Requeue,
            submit_limits: crate::job::SubmitLimits::default(),
            max_queued_per_tenant: None,
            tenant_max_queued: BTreeMap::new(),
        }
    }
}

/// How often a Cancel of a queued job reads it again after another change won the write: a
/// concurrent Cancel settles it at the first.
const CANCEL_REREADS: u32 = 3;

/// Why an executor operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The request is malformed.
    #[error("invalid request: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldViolation>),
    /// No such job.
    #[error("job {0} not found")]
    NotFound(JobId),
    /// The queue is full.
    #[error("the queue is full ({limit} jobs waiting)")]
    QueueFull {
        /// The configured limit.
        limit: usize,
    },
    /// The tenant has as many jobs waiting as it may.
    #[error("tenant {tenant} has {limit} jobs waiting, its limit")]
    TenantQueueFull {
        /// The tenant.
        tenant: String,
        /// Its limit.
        limit: usize,
    },
    /// The server is shutting down and takes no new jobs.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The idempotency key is held by a job submitted with a different request.
    #[error(
        "idempotency_key {key:?} was already used for job {job_id}, submitted with another \
         request (the first field that differs: {field})"
    )]
    IdempotencyKeyReused {
        /// The key.
        key: String,
        /// The job that holds it.
        job_id: JobId,
        /// The first request field that differs from that job's (`actions[0].params`).
        field: String,
    },
    /// The job's state does not allow the change.
    #[error("job {id}: {source}")]
    Illegal {
        /// The job.
        id: JobId,
        /// The refused transition.
        #[source]
        source: IllegalTransition,
    },
    /// An action's own params check panicked (a bug in its handler).
    #[error(transparent)]
    ValidatePanicked(#[from] crate::actions::ValidatePanicked),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) struct Inner {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    registry: Registry,
    config: ExecutorConfig,
    scheduler: Mutex<Scheduler>,
    wake: Notify,
    permits: Arc<Semaphore>,
    /// Attempts whose handlers run now, each holding one of `permits`: the `jobs_running`
    /// gauge (never above `concurrency`, unlike the jobs that have an owner task, which also
    /// counts jobs committing their end or waiting to be retried).
    attempts_running: std::sync::atomic::AtomicUsize,
    tracker: TaskTracker,
    metrics: Arc<Metrics>,
    accepting: CancellationToken,
    dispatching: CancellationToken,
    /// Fired once [`Executor::recover`] has picked up the previous run's jobs. Submit and
    /// Cancel wait for it: before it, a new job could be mistaken for an interrupted one, and
    /// a cancel could race the recovery's own write of the same job.
    recovered: CancellationToken,
    /// Whether the store is shared by several replicas (see [`Store::shared`]): then QUEUED
    /// jobs are claimed from the store under leases rather than queued in memory, and other
    /// replicas' changes arrive through the store's change feed (see `shared.rs`).
    shared: bool,
    /// Fired by [`Executor::shutdown`] once no job task is left: the lease renewal and the
    /// change feed of shared mode run until then (running jobs keep their leases, and can still
    /// be cancelled from other replicas, while they drain).
    drained: CancellationToken,
    /// Set while runs are being aborted by failed writes (a full disk): the dispatcher starts
    /// no job before it passes, see [`run::StoreBackoff`].
    store_backoff: std::sync::Mutex<run::StoreBackoff>,
    /// Hold back repeats of the log lines of failed writes while one fault (a full disk, a
    /// database that is down) fails them all.
    failure_logs: run::FailureLogs,
    /// On a shared store, the database's count of QUEUED jobs the queue limits are checked
    /// against (see `Inner::reserve_shared_queue`).
    queued_count: std::sync::Mutex<shared::QueuedCount>,
    /// Held by the one Submit that reads that count again, so that the others wait for it
    /// rather than all reading it at once.
    queued_count_read: tokio::sync::Mutex<()>,
}

/// Runs jobs. Cheap to clone; all clones drive the same queue.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

/// A worker slot taken for one job, and the handle that stops it.
struct Worker {
    permit: OwnedSemaphorePermit,
    handle: StopHandle,
}

impl Executor {
    /// Starts an executor over `store`, publishing to `hub`, running `registry`'s handlers.
    /// Call [`Executor::recover`] next to pick up jobs a previous run left unfinished; until
    /// it has, [`Executor::submit`] and [`Executor::cancel`] wait.
    pub fn start(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        registry: Registry,
        config: ExecutorConfig,
    ) -> Self {
        let shared = store.shared().is_some();
        let inner = Arc::new(Inner {
            shared,
            store,
            hub,
            registry,
            permits: Arc::new(Semaphore::new(
                config.concurrency.clamp(1, Semaphore::MAX_PERMITS),
            )),
            attempts_running: std::sync::atomic::AtomicUsize::new(0),
            config,
            scheduler: Mutex::default(),
            wake: Notify::new(),
            tracker: TaskTracker::new(),
            metrics: Arc::new(Metrics::default()),
            accepting: CancellationToken::new(),
            dispatching: CancellationToken::new(),
            recovered: CancellationToken::new(),
            drained: CancellationToken::new(),
            store_backoff: std::sync::Mutex::default(),
            failure_logs: run::FailureLogs::default(),
            queued_count: std::sync::Mutex::default(),
            queued_count_read: tokio::sync::Mutex::const_new(()),
        });
        let dispatcher = Arc::clone(&inner);
        inner
            .tracker
            .spawn(async move { dispatcher.dispatch().await });
        Self { inner }
    }

    /// The store jobs live in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The hub changes are published to.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.inner.hub
    }

    /// The metrics this executor records (and the server exports).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The actions this executor runs.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// A snapshot of job `id` held in memory, without a store read: the newest published one
    /// (jobs running or watched) or, for a queued job, the one it was queued with. `None`
    /// says nothing about whether the job exists. Every job keeps its tenant, so this answers
    /// "whose job is it" in any mode; see [`Executor::newest_in_memory`] for "what is it now".
    pub fn in_memory(&self, id: JobId) -> Option<Arc<Job>> {
        self.inner
            .hub
            .latest(id)
            .or_else(|| self.inner.scheduler().held_snapshot(id))
    }

    /// [`Executor::in_memory`], when that is the job's newest committed (or pushed) state as
    /// of the call: every change this process commits is published after it, so at worst a
    /// change is on its way to the hub's subscribers. Always `None` on a store shared with
    /// other replicas, whose changes reach this process's hub late.
    pub fn newest_in_memory(&self, id: JobId) -> Option<Arc<Job>> {
        if self.inner.shared {
            return None;
        }
        self.in_memory(id)
    }

    /// Job `id` as it is now: the snapshot this process holds when it is the newest, else
    /// the stored one (as [`Executor::wait`] starts from), for a program that embeds the
    /// executor.
    pub async fn get(&self, id: JobId) -> Result<Job, ExecutorError> {
        match self.newest_in_memory(id) {
            Some(job) => Ok(Job::clone(&job)),
            None => self.stored(id).await,
        }
    }

    /// Waits until job `id` has ended (SUCCEEDED, FAILED or CANCELLED), or for at most
    /// `timeout` when one is given, and returns the job as it is then: [`Job::is_terminal`]
    /// tells an end from a timeout. The wait is pushed, not polled (WaitJob's own), and a
    /// shutdown does not end it: drop the future to stop waiting.
    pub async fn wait(&self, id: JobId, timeout: Option<Duration>) -> Result<Job, ExecutorError> {
        let until = timeout.and_then(|timeout| tokio::time::Instant::now().checked_add(timeout));
        let (job, _) = self.wait_for_end(id, until).await.map_err(watch_error)?;
        Ok(Job::clone(&job))
    }

    /// Waits until job `id` is terminal or `until` passes; the job as it is then, and whether
    /// it is terminal. The one wait behind [`Executor::wait`], WaitJob, WaitOperation and
    /// Submit's sync mode.
    pub(crate) async fn wait_for_end(
        &self,
        id: JobId,
        until: Option<tokio::time::Instant>,
    ) -> Result<(Arc<Job>, bool), WatchError> {
        events::wait_terminal(&self.inner.store, &self.inner.hub, id, until, || {
            self.newest_in_memory(id)
        })
        .await
    }

    /// Jobs waiting in the queue now.
    pub fn queue_length(&self) -> usize {
        self.inner.scheduler().queue_length()
    }

    /// Picks up what a previous run left: QUEUED jobs are queued again in their order; RUNNING
    /// ones were interrupted and are re-queued (attempt + 1) or failed with reason
    /// `INTERRUPTED`, as configured. Returns how many jobs were picked up.
    ///
    /// On a store shared by several replicas, picks up nothing: QUEUED jobs are claimed as
    /// workers free up, and RUNNING ones may belong to a live replica; those of a dead one are
    /// re-queued once their lease runs out. Starts following the other replicas instead.
    pub async fn recover(&self) -> Result<usize, ExecutorError> {
        if self.inner.shared {
            Arc::clone(&self.inner).start_shared().await?;
            self.inner.recovered.cancel();
            self.inner.wake.notify_one();
            tracing::info!("serving jobs shared with other replicas");
            return Ok(0);
        }
        let unfinished = self.inner.store.unfinished().await?;
        let count = unfinished.len();
        for mut job in unfinished {
            if job.state == JobState::Running {
                self.inner
                    .settle_interrupted(&mut job, "the server stopped while the job was running")
                    .map_err(|source| ExecutorError::Illegal { id: job.id, source })?;
                self.inner.commit_state(&job).await?;
            }
            if job.state == JobState::Queued {
                let due = job.due_after(SystemTime::now());
                self.inner
                    .scheduler()
                    .enqueue_with(job.id, Rank::of(&job), &job.tenant, None, due);
            }
        }
        self.inner.sync_gauges();
        self.inner.recovered.cancel();
        self.inner.wake.notify_one();
        tracing::info!(jobs = count, "recovered unfinished jobs");
        Ok(count)
    }

    /// Validates, stores and queues a job. With an idempotency key already used, returns the
    /// job that holds it, unchanged (or [`ExecutorError::IdempotencyKeyReused`] when it was
    /// submitted with a different request).
    ///
    /// The job is checked as the API checks a Submit: against the size and count limits the
    /// server serves with ([`ExecutorConfig::submit_limits`]), and its actions against the
    /// registry. A refused job is told every violation at once, and nothing is stored.
    pub async fn submit(&self, spec: NewJob) -> Result<Job, ExecutorError> {
        let mut violations = crate::job::check_submit(&spec, &self.inner.config.submit_limits);
        if !violations.is_empty() {
            // Its actions too, so that every bad field is named at once (as the API does).
            for (i, action) in spec.actions.iter().enumerate() {
                violations.extend(self.inner.registry.validate_action(i, action)?);
            }
            return Err(ExecutorError::Invalid(violations));
        }
        self.submit_checked(spec).await
    }

    /// [`Executor::submit`] for a job whose limits the API's edge has checked already, on its
    /// wire form (where sizes are measured as sent).
    pub(crate) async fn submit_checked(&self, spec: NewJob) -> Result<Job, ExecutorError> {
        let executor = self.clone();
        uninterrupted(&self.inner, |caller_gone| async move {
            executor.submit_uninterrupted(spec, caller_gone).await
        })
        .await
    }

    /// The body of [`Executor::submit_checked`], run by [`uninterrupted`]: it gives up if its
    /// caller is gone before it has changed anything (a Submit that waited out the recovery
    /// or a stalled store, whose client has given up and may submit again).
    async fn submit_uninterrupted(
        &self,
        mut spec: NewJob,
        caller_gone: CancellationToken,
    ) -> Result<Job, ExecutorError> {
        self.until_recovered().await?;
        if self.inner.accepting.is_cancelled() {
            return Err(ExecutorError::ShuttingDown);
        }
        let violations = self.validate(&spec)?;
        if !violations.is_empty() {
            return Err(ExecutorError::Invalid(violations));
        }
        if spec.tenant.is_empty() {
            spec.tenant = crate::job::DEFAULT_TENANT.to_owned();
        }
        let limit = self.inner.config.max_queue_length;
        let tenant_limit = self.inner.config.tenant_queue_limit(&spec.tenant);
        // On a shared store the backlog is the database's, not this replica's queue.
        let shared_reservation = self
            .inner
            .reserve_shared_queue(&spec.tenant, limit, tenant_limit)
            .await;
        if caller_gone.is_cancelled() {
            return Err(ExecutorError::ShuttingDown);
        }
        let (reserved, mut shared_reservation) = match shared_reservation {
            Err(full) => (Err(full), None),
            Ok(shared_reservation) => (
                self.inner
                    .scheduler()
                    .reserve(limit, &spec.tenant, tenant_limit),
                shared_reservation,
            ),
        };
        if let Err(full) = reserved {
            // A retry of a Submit whose answer was lost finds its job, whatever the queue
            // holds now: the job was accepted, and refusing would invite a resubmission under
            // a new key. Looked up only here, so accepted Submits never pay for it.
            if let Some(key) = &spec.idempotency_key
                && let Some(existing) = self
                    .inner
                    .store
                    .by_idempotency_key(&spec.tenant, key)
                    .await?
            {
                return same_request(spec.first_difference(&existing), existing);
            }
            return Err(match full {
                Full::Queue => ExecutorError::QueueFull { limit },
                Full::Tenant => ExecutorError::TenantQueueFull {
                    tenant: spec.tenant,
                    limit: tenant_limit.unwrap_or(0),
                },
            });
        }
        // With the job itself, tells a retry from a different request under the same key,
        // should the store find the key taken: the job holds the server's default when the
        // request set no max_attempts.
        let asked_max_attempts = spec.max_attempts;
        let job = Job::new(
            JobId::generate(),
            spec,
            self.inner.config.default_max_attempts,
            SystemTime::now(),
        );
        if let Some(worker) = self.inner.free_worker(&job) {
            return self.submit_and_start(job, worker).await;
        }
        if let Some(reservation) = &mut shared_reservation {
            reservation.storing(job.id);
        }
        // Held by this Submit while the job is stored: a Cancel that finds the job meanwhile
        // (its id can be listed as soon as the store has it) stops this handle, and the job is
        // cancelled below instead of queued. Otherwise the Cancel would store CANCELLED and
        // this Submit then queue the job's QUEUED snapshot, which would run. On a shared
        // store a Cancel goes through the store, and replicas claim from it.
        let storing = (!self.inner.shared).then(|| self.inner.scheduler().activate(job.id));
        let created = self.inner.store.create(&job).await;
        let created = match created {
            Ok(Created::New) => None,
            Ok(Created::Existing(existing)) => Some(Ok(existing)),
            Err(error) => Some(Err(error)),
        };
        if let Some(outcome) = created {
            let mut scheduler = self.inner.scheduler();
            scheduler.unreserve(&job.tenant);
            if storing.is_some() {
                scheduler.finish(job.id);
            }
            drop(scheduler);
            let existing = outcome?;
            return same_request(
                job.first_difference_as_asked(asked_max_attempts, &existing),
                *existing,
            );
        }
        let shared = Arc::new(job.clone());
        self.inner.metrics.transition(job.state.as_str());
        // Published before the job is queued, so that no later state of it can be published
        // first. Nobody watches a job by id before it exists, but WatchJobs selectors may
        // match it: they learn of new jobs here.
        self.inner.hub.publish(Arc::clone(&shared));
        let cancelled = {
            let mut scheduler = self.inner.scheduler();
            scheduler.unreserve(&job.tenant);
            match &storing {
                Some(handle) => {
                    scheduler.finish(job.id);
                    // Under the lock under which a Cancel stops the handle: the Cancel was
                    // either seen here or finds the job queued.
                    let cancelled = handle.cancel_asked().is_cancelled();
                    if !cancelled {
                        scheduler.enqueue_with(
                            job.id,
                            Rank::of(&job),
                            &job.tenant,
                            Some(shared),
                            job.due_after(SystemTime::now()),
                        );
                    }
                    cancelled
                }
                // A shared store's jobs are claimed from the store, by whichever replica is
                // free first; this one is woken below to try.
                None => false,
            }
        };
        if let Some(reservation) = &mut shared_reservation {
            reservation.queued(job.id);
        }
        if cancelled {
            return self.cancel_while_stored(job).await;
        }
        self.inner.sync_gauges();
        self.inner.wake.notify_one();
        tracing::debug!(job_id = %job.id, "job queued");
        Ok(job)
    }

    /// Ends a job cancelled while its Submit stored it (see `submit_uninterrupted`); the
    /// Cancel waits for this. Should the store fail, the cancellation is tried again in the
    /// background ([`Inner::cancel_stored_until_done`]); meanwhile the job stays out of the
    /// queue, so it does not run.
    async fn cancel_while_stored(&self, job: Job) -> Result<Job, ExecutorError> {
        let mut cancelled = job.clone();
        if let Err(source) = cancelled.cancel(cancelled_error(), SystemTime::now()) {
            // Not for a QUEUED job; should it happen, the job is queued as if not cancelled
            // rather than left out of the queue until a restart.
            tracing::error!(job_id = %job.id, %source, "a job cancelled as it was stored cannot be cancelled; queued");
            let due = job.due_after(SystemTime::now());
            self.inner
                .scheduler()
                .enqueue_with(job.id, Rank::of(&job), &job.tenant, None, due);
            self.inner.sync_gauges();
            self.inner.wake.notify_one();
            return Ok(job);
        }
        match self.inner.commit_state(&cancelled).await {
            Ok(()) => {
                tracing::info!(job_id = %job.id, "job cancelled as it was stored");
                self.inner.sync_gauges();
                Ok(cancelled)
            }
            Err(error) => {
                tracing::warn!(job_id = %job.id, error = %crate::with_causes(&error), "cancelling a job as it was stored failed; trying again");
                let inner = Arc::clone(&self.inner);
                self.inner.tracker.spawn(
                    async move { inner.cancel_stored_until_done(cancelled).await }
                        .in_current_span(),
                );
                Ok(job)
            }
        }
    }

    /// Stores a new job and its start in one go (see [`Inner::free_worker`]): the job's
    /// creation and its RUNNING snapshot go to the store as one write, so they share one
    /// commit instead of waiting for two in turn. Each is still durable before anyone is told
    /// of it, and the handler starts only after both are.
    async fn submit_and_start(&self, job: Job, worker: Worker) -> Result<Job, ExecutorError> {
        let Worker { permit, handle } = worker;
        let mut running = job.clone();
        let now = SystemTime::now();
        let stored = match running
            .start(now)
            .and_then(|()| running.start_action(0, now))
        {
            Ok(()) => self
                .inner
                .store
                .create_started(&job, &running)
                .await
                .map_err(ExecutorError::from),
            Err(source) => Err(ExecutorError::Illegal { id: job.id, source }),
        };
        {
            let mut scheduler = self.inner.scheduler();
            scheduler.unreserve(&job.tenant);
            if stored.is_err() {
                scheduler.finish(job.id);
            }
        }
        if let Err(error) = stored {
            self.inner.sync_gauges();
            return Err(error);
        }
        self.inner.metrics.transition(job.state.as_str());
        self.inner.hub.publish(Arc::new(job.clone()));
        self.inner.metrics.transition(running.state.as_str());
        self.inner.hub.publish(Arc::new(running.clone()));
        self.inner.sync_gauges();
        let runner = Arc::clone(&self.inner);
        let id = job.id;
        let span = job_span(id);
        self.inner.tracker.spawn(
            async move {
                runner
                    .run(id, handle, run::Start::Committed(Box::new(running)), permit)
                    .await;
            }
            .instrument(span),
        );
        tracing::debug!(job_id = %id, "job stored and started");
        Ok(job)
    }

    fn validate(&self, spec: &NewJob) -> Result<Vec<FieldViolation>, ExecutorError> {
        let mut violations = Vec::new();
        for (i, action) in spec.actions.iter().enumerate() {
            violations.extend(self.inner.registry.validate_action(i, action)?);
        }
        violations.extend(self.check_max_attempts(spec.max_attempts));
        Ok(violations)
    }

    /// The violation of a job's `max_attempts` beyond this server's limit, if it is.
    pub(crate) fn check_max_attempts(&self, max_attempts: Option<u32>) -> Option<FieldViolation> {
        let limit = self.inner.config.max_attempts_limit;
        max_attempts
            .filter(|n| *n > limit)
            .map(|_| FieldViolation::new("max_attempts", format!("must be at most {limit}")))
    }

    /// Cancels a job: a queued one at once; a running one by firing its handler's
    /// cancellation token (the job turns CANCELLED when the handler stops, or after the grace
    /// period). A job that has ended is returned unchanged.
    pub async fn cancel(&self, id: JobId) -> Result<Job, ExecutorError> {
        let executor = self.clone();
        uninterrupted(&self.inner, |caller_gone| async move {
            executor.cancel_uninterrupted(id, caller_gone).await
        })
        .await
    }

    /// The body of [`Executor::cancel`], run by [`uninterrupted`]: it gives up if its caller
    /// is gone before it has changed anything.
    async fn cancel_uninterrupted(
        &self,
        id: JobId,
        caller_gone: CancellationToken,
    ) -> Result<Job, ExecutorError> {
        self.until_recovered().await?;
        if caller_gone.is_cancelled() {
            return Err(ExecutorError::ShuttingDown);
        }
        let holder = {
            let mut scheduler = self.inner.scheduler();
            let holder = scheduler.claim(id);
            // Stopped under the lock under which a task hands a job back to the queue (see
            // `hand_over_retry`): the task sees this stop, or this finds the job queued.
            if let Holder::Task(handle) = &holder {
                handle.stop(StopReason::Cancelled);
            }
            holder
        };
        self.inner.sync_gauges();
        match holder {
            Holder::Task(_) => {
                tracing::info!(job_id = %id, "cancel requested for a job held by its task");
                // The task stores the request at once (a running job's handler then gets the
                // grace period to stop), or the cancellation itself (a job between retries,
                // QUEUED to clients, or between actions): answered once that is durable, so
                // an acknowledged Cancel survives a crash. The bound only covers a stalled
                // store, or a job already stopping for its timeout.
                let until = tokio::time::Instant::now() + CANCEL_SETTLE;
                let (job, _) = events::wait_until(
                    &self.inner.store,
                    &self.inner.hub,
                    id,
                    Some(until),
                    || None,
                    |job| job.is_terminal() || job.cancel_requested,
                )
                .await
                .map_err(watch_error)?;
                Ok(Arc::unwrap_or_clone(job))
            }
            Holder::Nobody if self.inner.shared => self.inner.cancel_shared(id).await,
            Holder::Nobody => self.cancel_queued(id).await,
            Holder::Queue(place) => {
                // On a shared store, cancelled as any replica would: this one's lease may have
                // run out, and the job be another's now, QUEUED or already RUNNING there.
                let cancelled = if self.inner.shared {
                    self.inner.cancel_shared(id).await
                } else {
                    self.cancel_queued(id).await
                };
                self.put_back_unless_cancelled(id, place, cancelled)
            }
        }
    }

    /// The end of a Cancel of a job it took out of the queue here: a store's failure puts the
    /// job back where it was (not cancelled, it waits there rather than being lost to the
    /// queue until a restart), unless the job is gone or another replica's now.
    fn put_back_unless_cancelled(
        &self,
        id: JobId,
        place: Place,
        cancelled: Result<Job, ExecutorError>,
    ) -> Result<Job, ExecutorError> {
        match cancelled {
            Err(ExecutorError::Store(error))
                if !matches!(error, StoreError::Missing(_) | StoreError::LeaseLost(_)) =>
            {
                self.inner.scheduler().put_back(id, place);
                self.inner.sync_gauges();
                self.inner.wake.notify_one();
                Err(ExecutorError::Store(error))
            }
            other => other,
        }
    }

    /// Cancels a QUEUED job in the store (nothing runs it); returns it as it is if it is no
    /// longer QUEUED.
    async fn cancel_queued(&self, id: JobId) -> Result<Job, ExecutorError> {
        // Concurrent Cancels of one queued job all read it QUEUED, and only the first write
        // stands: the others read it again and answer with that cancellation.
        let mut attempts = 0;
        loop {
            let mut job = self.stored(id).await?;
            if job.state != JobState::Queued {
                return Ok(job);
            }
            job.cancel(cancelled_error(), SystemTime::now())
                .map_err(|source| ExecutorError::Illegal { id, source })?;
            match self.inner.commit_state(&job).await {
                Ok(()) => {
                    tracing::info!(job_id = %id, "queued job cancelled");
                    return Ok(job);
                }
                Err(StoreError::StaleVersion { .. }) if attempts < CANCEL_REREADS => {
                    attempts += 1;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Whether [`Executor::recover`] has run.
    pub fn is_recovered(&self) -> bool {
        self.inner.recovered.is_cancelled()
    }

    /// Waits until [`Executor::recover`] has run; refuses once shutting down instead. Reads
    /// wait too: until then the store holds what the previous process left (a job RUNNING at
    /// its last saved version, below the versions its watchers were shown).
    pub async fn until_recovered(&self) -> Result<(), ExecutorError> {
        tokio::select! {
            biased;
            _ = self.inner.recovered.cancelled() => Ok(()),
            _ = self.inner.accepting.cancelled() => Err(ExecutorError::ShuttingDown),
        }
    }

    /// Job `id` as stored, never from memory.
    async fn stored(&self, id: JobId) -> Result<Job, ExecutorError> {
        self.inner
            .store
            .get(id)
            .await?
            .ok_or(ExecutorError::NotFound(id))
    }

    /// Stops at once what runs on its own, for a server dropped without serving: new and
    /// waiting calls fail with [`ExecutorError::ShuttingDown`], the dispatcher stops. Jobs it
    /// runs (there are none before recovery, which serving starts) are told to stop.
    pub(crate) fn abandon(&self) {
        let inner = &self.inner;
        inner.stop_taking_jobs();
        for handle in inner.scheduler().active_handles() {
            handle.stop(StopReason::Shutdown);
        }
        inner.drained.cancel();
    }

    /// Stops taking new jobs and lets running ones finish for up to `grace`; then tells the
    /// rest to stop, waits up to the cancel grace period, and returns. Interrupted jobs are
    /// left QUEUED with the same attempt, which a durable store runs again after a restart.
    ///
    /// Only jobs whose handlers run get the grace period. A job waiting out its backoff
    /// before a retry waits in the queue, QUEUED with its `next_attempt_time` stored: a
    /// durable store runs it after the next start once that time has come. One taken from the
    /// queue but not started stays QUEUED too.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.stop_taking_jobs();
        if tokio::time::timeout(grace, inner.tracker.wait())
            .await
            .is_ok()
        {
            inner.drained.cancel();
            inner.release_all().await;
            return;
        }
        let handles = inner.scheduler().active_handles();
        tracing::warn!(
            jobs = handles.len(),
            "shutdown grace period over, stopping running jobs"
        );
        for handle in handles {
            handle.stop(StopReason::Shutdown);
        }
        let bound = inner.config.cancel_grace + Duration::from_secs(1);
        if tokio::time::timeout(bound, inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::error!("some jobs did not stop in time");
        }
        inner.drained.cancel();
        inner.release_all().await;
    }
}

/// Runs `work` to its end in a task of its own, whatever becomes of the caller. A Submit or a
/// Cancel changes the store and the queue in steps with awaits between them, and an RPC's
/// future is dropped when its client goes away or its deadline passes: dropped halfway, a job
/// would be stored and never queued, a queue place never given back, a job taken out of the
/// queue never put back, or a cancellation stored and never told to its watchers. `work` is
/// given a token that fires when the caller is gone, to give up while it has changed nothing.
/// Spawned on the executor's tracker, so that a shutdown waits for it too.
async fn uninterrupted<T, Work, Fut>(inner: &Inner, work: Work) -> Result<T, ExecutorError>
where
    T: Send + 'static,
    Work: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<T, ExecutorError>> + Send + 'static,
{
    let caller_gone = CancellationToken::new();
    let _caller_waits = caller_gone.clone().drop_guard();
    match inner
        .tracker
        .spawn(work(caller_gone).in_current_span())
        .await
    {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // The runtime is shutting down.
        Err(_) => Err(ExecutorError::ShuttingDown),
    }
}

fn cancelled_error() -> JobError {
    JobError::new("CANCELLED", "CANCELLED", "the job was cancelled")
}

impl Inner {
    /// Refuses new and waiting calls, stops dispatching, and lets the job tracker end once its
    /// tasks have: the first steps of every way the executor stops.
    fn stop_taking_jobs(&self) {
        self.accepting.cancel();
        self.dispatching.cancel();
        self.tracker.close();
    }

    /// Ends or re-queues a job found RUNNING with nobody running it (the server, or the
    /// replica that held it, stopped): CANCELLED when a Cancel had reached it (the cancel
    /// stands), else as `interrupted_policy` says. Versions jump past any progress shown but
    /// not stored.
    fn settle_interrupted(&self, job: &mut Job, why: &str) -> Result<(), IllegalTransition> {
        let now = SystemTime::now();
        if job.cancel_requested {
            return job.cancel_interrupted(cancelled_error(), now);
        }
        match self.config.interrupted_policy {
            // A crash (or a replica's) is not the job's fault, but a job that keeps taking its
            // server down with it (an abort, running out of memory) must not run forever:
            // attempts bound it as they bound failures.
            InterruptedPolicy::Requeue if job.attempt < job.max_attempts => job.interrupt(now),
            InterruptedPolicy::Requeue => job.fail_interrupted(
                JobError::new(
                    "ABORTED",
                    "INTERRUPTED",
                    format!("{why}, and it had no attempts left"),
                ),
                now,
            ),
            InterruptedPolicy::Fail => {
                job.fail_interrupted(JobError::new("ABORTED", "INTERRUPTED", why), now)
            }
        }
    }

    fn scheduler(&self) -> MutexGuard<'_, Scheduler> {
        // Scheduler methods never panic halfway through an update; a poisoned lock would only
        // come from a panic elsewhere while holding it, and its data is still consistent.
        self.scheduler.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A worker for `job` right away, if it may skip the queue: this process owns its jobs
    /// (no shared store), the job is due, nothing is queued that should go first, a worker
    /// is free, and the job has no idempotency key (whose owner the store decides). The job
    /// is then marked active, so a cancel finds its task.
    fn free_worker(&self, job: &Job) -> Option<Worker> {
        if self.shared || self.accepting.is_cancelled() || job.idempotency_key.is_some() {
            return None;
        }
        let now = SystemTime::now();
        if job.due_after(now).is_some() {
            return None;
        }
        let mut scheduler = self.scheduler();
        scheduler.promote_due(now);
        if scheduler.ready() > 0 {
            return None;
        }
        let permit = Arc::clone(&self.permits).try_acquire_owned().ok()?;
        let handle = scheduler.activate(job.id);
        Some(Worker { permit, handle })
    }

    /// Saves a change, then tells watchers about it.
    async fn commit(&self, job: &Job) -> Result<(), StoreError> {
        self.store.save(job).await?;
        // Before the publish: once told, the starting snapshot is no longer the newest.
        self.scheduler().started(job.id);
        self.hub.publish(Arc::new(job.clone()));
        Ok(())
    }

    /// Commits a change of the job's own state, and counts it.
    async fn commit_state(&self, job: &Job) -> Result<(), StoreError> {
        self.commit(job).await?;
        self.metrics.transition(job.state.as_str());
        Ok(())
    }

    /// Stores the cancellation of a job cancelled as it was stored (see
    /// `Executor::cancel_while_stored`), trying again with backoff until it is stored, the job
    /// has changed meanwhile (another Cancel stored it, say), or the server stops: then the job
    /// is left QUEUED in the store, as the Cancel that asked for it was told.
    async fn cancel_stored_until_done(&self, cancelled: Job) {
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                () = self.accepting.cancelled() => {
                    tracing::warn!(job_id = %cancelled.id, "server stopping before a cancellation could be stored; the job stays queued");
                    return;
                }
                () = tokio::time::sleep(backoff) => {}
            }
            match self.commit_state(&cancelled).await {
                Ok(()) => {
                    tracing::info!(job_id = %cancelled.id, "job cancelled as it was stored");
                    self.sync_gauges();
                    return;
                }
                Err(StoreError::StaleVersion { .. } | StoreError::Missing(_)) => return,
                Err(error) => {
                    tracing::warn!(job_id = %cancelled.id, error = %crate::with_causes(&error), ?backoff, "storing a cancellation failed; trying again");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Brings the queue and running gauges up to date.
    fn sync_gauges(&self) {
        let (queued, scheduled) = {
            let mut scheduler = self.scheduler();
            // So that jobs whose time has come while every worker was busy count as due.
            scheduler.promote_due(SystemTime::now());
            (scheduler.queue_length(), scheduler.scheduled())
        };
        crate::metrics::set(&self.metrics.queue_depth, queued);
        crate::metrics::set(&self.metrics.scheduled, scheduled);
        crate::metrics::set(
            &self.metrics.running,
            self.attempts_running
                .load(std::sync::atomic::Ordering::Relaxed),
        );
    }

    async fn dispatch(self: Arc<Self>) {
        loop {
            let permit = tokio::select! {
                _ = self.dispatching.cancelled() => return,
                permit = Arc::clone(&self.permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            // A store that failed the last run's writes is given time before the next start:
            // a queued job whose start cannot be stored would otherwise be started, aborted
            // and queued again as fast as the machine goes.
            let hold = self.store_backoff().holds_until();
            if let Some(until) = hold {
                tokio::select! {
                    _ = self.dispatching.cancelled() => return,
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
            let next = self.scheduler().pop(SystemTime::now());
            let Some((id, handle, snapshot)) = next else {
                // Claims only as many as this replica can start now (the permit held and the
                // free ones), so no job waits here that another replica could run.
                if self.shared
                    && self.recovered.is_cancelled()
                    && self.claim(1 + self.permits.available_permits()).await > 0
                {
                    continue;
                }
                // The worker goes back while nothing is queued, so that a Submit can start its
                // job on it at once (`free_worker`); with one worker, holding it here would
                // send every job through the queue.
                drop(permit);
                let next_due = self.scheduler().next_due();
                let idle = async {
                    if self.shared {
                        tokio::time::sleep(shared::IDLE_CLAIM_INTERVAL).await;
                    } else if let Some(due) = next_due {
                        // Woken again before then by a Submit; a wall clock that jumps is
                        // caught up with at the latest a minute later.
                        let wait = due
                            .duration_since(SystemTime::now())
                            .unwrap_or_default()
                            .min(MAX_DUE_WAIT);
                        tokio::time::sleep(wait).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    _ = self.dispatching.cancelled() => return,
                    _ = self.wake.notified() => {}
                    _ = idle => {}
                }
                continue;
            };
            self.sync_gauges();
            let runner = Arc::clone(&self);
            let span = job_span(id);
            self.tracker.spawn(
                async move {
                    runner
                        .run(id, handle, run::Start::Queued(snapshot), permit)
                        .await;
                }
                .instrument(span),
            );
        }
    }
}
