//! The owner task of one job: it runs the job's actions in order, applies their progress,
//! honours cancellation and timeouts, and decides between success, retry and failure.

use std::{
    any::Any,
    fmt::Write as _,
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::FutureExt as _;
use serde_json::Value;
use tokio::{sync::OwnedSemaphorePermit, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    ExecutorError, Inner, cancelled_error,
    queue::{Rank, StopHandle, StopReason},
};
use crate::{
    actions::{ActionContext, HandlerError, ProgressReceiver, ProgressReporter},
    cancelled::Cancelled,
    events::Snapshot,
    job::{
        IllegalTransition, Job, JobId, JobState, MAX_RESULT_DEPTH, MAX_UNPERSISTED_VERSIONS,
        Progress, value_too_deep, wire_size,
    },
    log_throttle::LogThrottle,
    store::StoreError,
};

use crate::actions::MAX_PANIC_MESSAGE_BYTES;

/// The failure a handler's panic makes of its action: retryable, as a bug may depend on the
/// input or the moment and the job's `max_attempts` bounds the retries anyway.
pub(super) fn handler_panicked(payload: &(dyn Any + Send)) -> HandlerError {
    let message = format!(
        "the action's handler panicked: {}",
        crate::job::truncate(crate::actions::panic_text(payload), MAX_PANIC_MESSAGE_BYTES)
    );
    HandlerError::new("INTERNAL", "HANDLER_PANICKED", message)
}

/// The wait before attempt `attempt` (2 for the first retry): `initial`, doubled for each
/// retry after the first, plus jitter of up to 25% (`random` in `[0, 1)`); never more than
/// `max`, which the jitter then goes below instead, so capped retries still spread out.
pub(super) fn backoff(initial: Duration, max: Duration, attempt: u32, random: f64) -> Duration {
    let doublings = attempt.saturating_sub(2).min(30);
    let base = initial.saturating_mul(1 << doublings).min(max);
    let jitter = base.mul_f64(random * 0.25);
    match base.checked_add(jitter) {
        Some(wait) if wait <= max => wait,
        _ => max.saturating_sub(jitter),
    }
}

/// The failure of an attempt that ran past the job's timeout.
fn timed_out(job: &Job) -> HandlerError {
    HandlerError::new(
        "DEADLINE_EXCEEDED",
        "TIMEOUT",
        format!(
            "the attempt ran longer than the job's timeout of {:?}",
            job.timeout.unwrap_or_default()
        ),
    )
}

/// The first wait between tries to settle a job whose run a failed write aborted, and the
/// longest (see `Inner::settle_aborted`).
const SETTLE_RETRY_INITIAL: Duration = Duration::from_millis(100);
const SETTLE_RETRY_MAX: Duration = Duration::from_secs(5);

/// Consecutive runs aborted by failed writes, and until when the dispatcher waits because of
/// them: 100 ms after the first, doubling to 5 s (the retry backoff of settling an aborted
/// job), back to none as soon as a run ends without a store failure.
#[derive(Debug, Default)]
pub(super) struct StoreBackoff {
    wait: Option<Duration>,
    until: Option<tokio::time::Instant>,
}

impl StoreBackoff {
    fn failed(&mut self) {
        let wait = self.wait.map_or(SETTLE_RETRY_INITIAL, |wait| {
            (wait * 2).min(SETTLE_RETRY_MAX)
        });
        self.wait = Some(wait);
        self.until = Some(tokio::time::Instant::now() + wait);
    }

    fn succeeded(&mut self) {
        self.wait = None;
        self.until = None;
    }

    /// When the next job may start, if not now.
    pub(super) fn holds_until(&self) -> Option<tokio::time::Instant> {
        self.until
            .filter(|until| *until > tokio::time::Instant::now())
    }
}

/// One [`LogThrottle`] per log line that a lasting store failure repeats for every job.
#[derive(Debug, Default)]
pub(super) struct FailureLogs {
    aborted_runs: LogThrottle,
    settles: LogThrottle,
    progress_saves: Arc<LogThrottle>,
}

/// Whether a run's error says that the job is not this server's any more: on a shared store,
/// another replica took it over (its lease ran out here) or changed it first (cancelled it
/// while it waited here).
fn no_longer_ours(error: &RunError, shared: bool) -> bool {
    shared
        && matches!(
            error,
            RunError::Store(StoreError::LeaseLost(_) | StoreError::StaleVersion { .. })
        )
}

/// Why the owner task gave up on its job before deciding its fate.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// The store failed as a Cancel was carried out of a job this replica had released to the
    /// shared store: only the Cancel is left, to try again as any replica would (asking the
    /// one that may run it by now), never by writing over that replica's run.
    #[error(transparent)]
    CancelAfterRelease(StoreError),
}

/// A running action's progress channel and when its progress was last written.
struct ProgressTracker {
    receiver: ProgressReceiver,
    /// The newest version known to be stored. Raised by background saves only once they
    /// succeed: a failed one must not count, or what watchers were shown could run ahead of
    /// the store by more than [`MAX_UNPERSISTED_VERSIONS`], and the version jump of a job
    /// settled from its stored snapshot would then fall below versions already shown.
    saved_version: Arc<AtomicI64>,
    last_persist: Instant,
    /// A snapshot of the job published earlier that the hub has let go of: the next report
    /// refills it when nobody else holds it any more, instead of cloning the whole job.
    spare: Snapshot,
}

impl ProgressTracker {
    /// A snapshot of `job` to publish: the spare one refilled if it is free, else a clone.
    fn snapshot(&mut self, job: &Job) -> Arc<Job> {
        if let Some(mut spare) = self.spare.take()
            && Arc::get_mut(&mut spare).is_some_and(|held| held.refresh_from(job))
        {
            return spare;
        }
        Arc::new(job.clone())
    }
}

/// Where an owner task takes its job from.
pub(super) enum Start {
    /// Out of the queue, with its (stored) snapshot if the queue kept it: the task starts it.
    Queued(Option<Arc<Job>>),
    /// Started already: RUNNING with its first action started, committed and published (by a
    /// Submit that found a worker free and nothing queued, see `Executor::submit`).
    Committed(Box<Job>),
}

/// A worker slot held by an attempt's handlers, counted in the `jobs_running` gauge for as long
/// as it is held.
struct RunningAttempt<'a> {
    inner: &'a Inner,
    _permit: OwnedSemaphorePermit,
}

impl<'a> RunningAttempt<'a> {
    fn start(inner: &'a Inner, permit: OwnedSemaphorePermit) -> Self {
        inner.attempts_running.fetch_add(1, Ordering::Relaxed);
        inner.sync_gauges();
        Self {
            inner,
            _permit: permit,
        }
    }
}

impl Drop for RunningAttempt<'_> {
    fn drop(&mut self) {
        self.inner.attempts_running.fetch_sub(1, Ordering::Relaxed);
        self.inner.sync_gauges();
    }
}

/// Where a job goes back in the queue: its place in line, its tenant, and when it is due if
/// later (a retry's backoff).
struct Requeue {
    rank: Rank,
    tenant: String,
    due: Option<SystemTime>,
}

/// What the tries of settling an aborted run did on a shared store: given up the job's lease,
/// and learnt then that a Cancel had marked it.
#[derive(Default)]
struct Released {
    lease: bool,
    marked: bool,
}

/// Whether a job's task handed the job over (to the queue or another replica) and is done
/// with it.
enum Handed {
    Over,
    No,
}

/// How one attempt ended.
enum Attempt {
    Succeeded,
    Failed(HandlerError),
    Stopped(StopReason),
}

impl Inner {
    /// Owns job `id` from the moment it leaves the queue until it ends, goes back to the
    /// queue, or the server stops.
    pub(super) async fn run(
        self: Arc<Self>,
        id: JobId,
        handle: StopHandle,
        start: Start,
        permit: OwnedSemaphorePermit,
    ) {
        let outcome = self.run_owned(id, start, &handle, permit).await;
        let outcome = match outcome {
            Ok(Some(job)) => self.hand_over_retry(job, &handle).await,
            other => other.map(|_| Handed::No),
        };
        let mut requeue = match outcome {
            Ok(Handed::Over) => {
                // The queue (or, on a shared store, any replica) holds the job now.
                self.store_backoff().succeeded();
                self.sync_gauges();
                self.wake.notify_one();
                return;
            }
            Ok(Handed::No) => {
                self.store_backoff().succeeded();
                None
            }
            Err(error) if no_longer_ours(&error, self.shared) => {
                tracing::warn!(error = %crate::with_causes(&error), "job no longer held by this replica; its run stopped");
                None
            }
            Err(RunError::CancelAfterRelease(error)) => {
                self.store_backoff().failed();
                tracing::warn!(error = %crate::with_causes(&error), "cancelling the released job failed; trying again");
                let released = Released {
                    lease: true,
                    marked: true,
                };
                self.settle_aborted(id, released).await
            }
            Err(error) => {
                self.store_backoff().failed();
                if let Some(held_back) = self.failure_logs.aborted_runs.admit() {
                    tracing::error!(
                        %error,
                        held_back,
                        "job run aborted; settling it as interrupted once the store takes writes"
                    );
                }
                self.settle_aborted(id, Released::default()).await
            }
        };
        let requeued = loop {
            {
                let mut scheduler = self.scheduler();
                // A Cancel stops this task's handle under this lock. One that came after the
                // settling last looked (it was storing the job) is carried out now, by
                // settling again, instead of queuing a job whose canceller waits for its end.
                let cancel_came = requeue.is_some()
                    && scheduler
                        .active_handle(id)
                        .is_some_and(|handle| handle.cancel_asked().is_cancelled());
                if !cancel_came {
                    scheduler.finish(id);
                    // Queued only now that this task no longer holds it, or the dispatcher
                    // could hand it to a new task whose hold `finish` would then forget.
                    let Some(Requeue { rank, tenant, due }) = requeue else {
                        break false;
                    };
                    scheduler.enqueue_with(id, rank, &tenant, None, due);
                    break true;
                }
            }
            requeue = self.settle_aborted(id, Released::default()).await;
        };
        if requeued {
            self.wake.notify_one();
        }
        self.sync_gauges();
    }

    pub(super) fn store_backoff(&self) -> std::sync::MutexGuard<'_, StoreBackoff> {
        // Each critical section is one assignment: a poisoned lock is still consistent.
        self.store_backoff.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Settles a job whose run a failed write aborted (a full disk, a storage error). The job
    /// stands as last stored, RUNNING most likely, with no handler left: without this it would
    /// stay so, its watchers and waiters with it, until the next start recovered it. It is
    /// settled as that recovery would (re-queued with `attempt + 1`, failed `INTERRUPTED`
    /// when out of attempts, CANCELLED when a cancel came), retried with backoff until the
    /// store takes the write. A shutdown ends the retries: the next start recovers it then.
    /// Returns where the job is to be queued again here, if it is. `released`: what was done
    /// already on a shared store.
    async fn settle_aborted(&self, id: JobId, mut released: Released) -> Option<Requeue> {
        let mut wait = SETTLE_RETRY_INITIAL;
        let mut cancel_tried = false;
        loop {
            // A Cancel that came for the aborted run carries over.
            let handle = self.scheduler().rearm(id);
            let cancel_asked = handle.cancel_asked().is_cancelled();
            match self.try_settle_aborted(id, &handle, &mut released).await {
                Ok(queued) => {
                    tracing::info!(job_id = %id, "aborted job settled");
                    return queued;
                }
                Err(error) if no_longer_ours(&error, self.shared) => return None,
                Err(RunError::Illegal(error)) => {
                    tracing::error!(error = %crate::with_causes(&error), "the aborted job cannot be settled; recovery at the next start will");
                    return None;
                }
                Err(error) => {
                    if let Some(held_back) = self.failure_logs.settles.admit() {
                        tracing::warn!(error = %crate::with_causes(&error), retry_in = ?wait, held_back, "settling the aborted job failed");
                    }
                }
            }
            if self.dispatching.is_cancelled() {
                tracing::warn!(job_id = %id, "shutting down: the aborted job is left to recovery at the next start");
                return None;
            }
            // A Cancel is tried at once, once, so that it is answered as soon as it can be;
            // after that the backoff holds, or a store that fails at once would be spun on.
            cancel_tried |= cancel_asked;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.dispatching.cancelled() => {}
                _ = handle.cancel_asked().cancelled(), if !cancel_tried => {}
            }
            wait = (wait * 2).min(SETTLE_RETRY_MAX);
        }
    }

    /// One try of [`Inner::settle_aborted`]; where the job is to be queued again here, if it
    /// ends QUEUED on a single server. `released`: what the tries before did on a shared store.
    async fn try_settle_aborted(
        &self,
        id: JobId,
        handle: &StopHandle,
        released: &mut Released,
    ) -> Result<Option<Requeue>, RunError> {
        let cancel_asked = handle.cancel_asked().is_cancelled();
        if released.lease {
            // Any replica's now (running it, maybe): only a Cancel is left to carry out, as
            // any replica would (asking the one that runs it).
            if released.marked || cancel_asked {
                self.cancel_released(id).await?;
            }
            return Ok(None);
        }
        let Some(mut job) = self.store.get(id).await? else {
            return Ok(None);
        };
        if job.state == JobState::Running {
            if cancel_asked && !job.cancel_requested {
                job.request_cancel(SystemTime::now())?;
            }
            self.settle_interrupted(&mut job, "storing the job's state failed while it ran")?;
            self.commit_state(&job).await?;
        }
        if job.state != JobState::Queued {
            return Ok(None);
        }
        if let Some(shared) = self.store.shared() {
            // Still leased here (its save keeps the lease, and a retry's release may be what
            // failed): given up, or this replica's renewals would keep every replica, itself
            // too, from claiming it until the shutdown.
            // The mark may be older than this try: a retry's hand-over released the job
            // and then failed to cancel it.
            released.marked = shared.release(id).await? || job.cancel_requested;
            released.lease = true;
            if released.marked || cancel_asked {
                self.cancel_released(id).await?;
            }
            return Ok(None);
        }
        if cancel_asked {
            // A Cancel came as the attempt ended in a retry whose hand-over then failed.
            self.cancel_instead_of_retry(&mut job).await?;
            return Ok(None);
        }
        Ok(Some(Requeue {
            rank: Rank::of(&job),
            due: job.due_after(SystemTime::now()),
            tenant: job.tenant,
        }))
    }

    /// Cancels a QUEUED job whose retry is committed, which a Cancel reached as its attempt
    /// ended.
    async fn cancel_instead_of_retry(&self, job: &mut Job) -> Result<(), RunError> {
        job.cancel(cancelled_error(), SystemTime::now())?;
        self.commit_state(job).await?;
        tracing::info!("job cancelled instead of retried");
        Ok(())
    }

    /// Cancels a job this replica has let go of, as any replica would; a store's failure is
    /// for the caller to try again.
    async fn cancel_released(&self, id: JobId) -> Result<(), RunError> {
        match self.cancel_shared(id).await {
            Ok(_) => Ok(()),
            Err(ExecutorError::Store(error)) => Err(error.into()),
            Err(error) => {
                tracing::warn!(error = %crate::with_causes(&error), "cancelling the released job failed");
                Ok(())
            }
        }
    }

    /// Runs one attempt and settles the job; returns it when it is to be retried. `permit`, the
    /// worker slot, is given back as soon as the attempt's handlers are done.
    async fn run_owned(
        &self,
        id: JobId,
        start: Start,
        handle: &StopHandle,
        permit: OwnedSemaphorePermit,
    ) -> Result<Option<Job>, RunError> {
        let (mut job, started_action) = match start {
            Start::Committed(job) => {
                let running = job.running_action();
                (*job, running)
            }
            Start::Queued(snapshot) => {
                // The queue's snapshot is the stored one (see `Scheduler::snapshots`): no
                // read needed.
                let stored = match snapshot {
                    Some(job) => Some(Arc::unwrap_or_clone(job)),
                    None => self.store.get(id).await?,
                };
                let Some(mut job) = stored else {
                    return Ok(None);
                };
                if job.state != JobState::Queued {
                    // Cancelled (or deleted) while it waited in the queue.
                    return Ok(None);
                }
                if job.cancel_requested {
                    // A Cancel reached it while its last attempt ran on a replica that did not
                    // carry it out (see `SharedStore::claim`).
                    job.cancel(cancelled_error(), SystemTime::now())?;
                    self.commit_state(&job).await?;
                    tracing::info!("job cancelled as asked during its last attempt");
                    return Ok(None);
                }
                if self.dispatching.is_cancelled() {
                    // Taken out of the queue just as the shutdown began: no handler runs
                    // yet, so the job stays QUEUED for the next start rather than holding the
                    // shutdown for its grace period.
                    return Ok(None);
                }
                // Committed together with the first action's start: one durable write, and
                // nobody is told of a RUNNING job whose action has not started yet.
                job.start(SystemTime::now())?;
                (job, None)
            }
        };
        super::record_trace(&job);
        tracing::info!(attempt = job.attempt, "job started");

        let permit = RunningAttempt::start(self, permit);
        let outcome = self.run_attempt(&mut job, handle, started_action).await?;
        // The slot bounds running handlers, and this job's are done: the next job starts while
        // this one's end is committed (the two writes often share a commit), and the slot
        // stays free while a retry waits out its backoff. Holding it through that commit
        // left every slot idle for one fsync per job, which capped no-op jobs at about
        // `concurrency` per fsync time.
        drop(permit);
        let now = SystemTime::now();
        let cancel_asked = handle.cancel_asked().is_cancelled();
        let error = match outcome {
            Attempt::Succeeded => {
                job.succeed(now)?;
                self.commit_state(&job).await?;
                tracing::info!("job succeeded");
                None
            }
            Attempt::Stopped(StopReason::Shutdown) if !job.cancel_requested && !cancel_asked => {
                job.set_aside(now)?;
                self.commit_state(&job).await?;
                tracing::info!(
                    "job stopped by shutdown, left queued to run the same attempt again"
                );
                None
            }
            Attempt::Failed(error) if !cancel_asked => Some(error),
            // Stopped by a Cancel, or one reached the job as its attempt was failing or its
            // handler stopping for the shutdown (and was stored): the client wants the job to
            // end, not to be tried again. The handler may have stopped before the request
            // could be stored. (A timeout is reported as a failure, never as a stop.)
            Attempt::Stopped(_) | Attempt::Failed(_) => {
                job.cancel_requested |= cancel_asked;
                job.cancel(cancelled_error(), now)?;
                self.commit_state(&job).await?;
                tracing::info!("job cancelled");
                None
            }
        };
        if let Some(error) = error {
            // The error in the line itself (quoted: a handler's message may hold newlines).
            let reason = error.error.to_string();
            if error.retryable && job.has_attempts_left() {
                let backoff = self.backoff(job.attempt.saturating_add(1));
                job.retry(now, backoff)?;
                self.commit_state(&job).await?;
                tracing::info!(
                    attempt = job.attempt - 1,
                    error = ?reason,
                    "attempt failed"
                );
                return Ok(Some(job));
            }
            job.fail(error.error, now)?;
            self.commit_state(&job).await?;
            tracing::info!(error = ?reason, "job failed");
        }
        Ok(None)
    }

    /// Runs the job's remaining actions in order; stops at the first that does not succeed,
    /// or before the next one once the attempt is out of time (see the job's timeout).
    /// `started_action`: an action whose start is committed already, to run first.
    async fn run_attempt(
        &self,
        job: &mut Job,
        handle: &StopHandle,
        started_action: Option<usize>,
    ) -> Result<Attempt, RunError> {
        // A timeout past the clock's range (only a job stored by a program that skipped the
        // checks could have one) is no limit, not a panic that would strand the job.
        let deadline = job
            .timeout
            .and_then(|timeout| Instant::now().checked_add(timeout));
        let attempt_done = CancellationToken::new();
        let _stop_timer = attempt_done.clone().drop_guard();
        if let Some(deadline) = deadline {
            let timer = handle.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => timer.stop(StopReason::Timeout),
                    _ = attempt_done.cancelled() => {}
                }
            });
        }
        let mut first_action = started_action.is_none();
        let mut started_action = started_action;
        // Results kept from an earlier attempt count too.
        let mut results_size: usize = job
            .actions
            .iter()
            .filter_map(|action| action.result.as_ref())
            .map(wire_size)
            .sum();
        loop {
            let index = match started_action.take() {
                Some(index) => index,
                None => {
                    let Some(index) = job.next_action() else {
                        break;
                    };
                    let reason = handle.reason();
                    if !matches!(reason, StopReason::None | StopReason::Timeout) {
                        return Ok(Attempt::Stopped(reason));
                    }
                    // Out of time: the attempt fails here, as a timeout (never as a stop, which
                    // would make it CANCELLED, nor as the next action's failure, which would
                    // start a handler only to stop it). The deadline is read as well, for a
                    // timer that has not fired yet. An attempt's first start is always made,
                    // as the job's own start is committed with it.
                    let out_of_time = reason == StopReason::Timeout
                        || deadline.is_some_and(|deadline| Instant::now() >= deadline);
                    if out_of_time && !first_action {
                        return Ok(Attempt::Failed(timed_out(job)));
                    }
                    job.start_action(index, SystemTime::now())?;
                    // This write also carries what came just before and was not told to anyone
                    // yet: the job's start, or the previous action's success. Each change is in
                    // memory only until then, so fewer fsyncs, and watchers never see a state
                    // the store does not have.
                    if first_action {
                        self.commit_state(job).await?;
                        first_action = false;
                    } else {
                        self.commit(job).await?;
                    }
                    index
                }
            };
            let started = std::time::Instant::now();
            let result = self.run_action(job, index, handle, deadline).await?;
            let outcome = match &result {
                Ok(_) => "succeeded",
                Err(_) if handle.token().is_cancelled() => "stopped",
                Err(_) => "failed",
            };
            self.metrics
                .action_ran(&job.actions[index].name, outcome, started);
            let now = SystemTime::now();
            match result {
                Ok(value) => match self.result_fits(index, &value, results_size) {
                    Ok(size) => {
                        results_size += size;
                        // Saved with the next action's start, or with the job's own end.
                        job.succeed_action(index, value, now)?;
                    }
                    Err(error) => {
                        job.fail_action(index, error.error.clone(), now)?;
                        return Ok(Attempt::Failed(error));
                    }
                },
                Err(_) if handle.reason() == StopReason::Timeout => {
                    let error = timed_out(job);
                    job.fail_action(index, error.error.clone(), now)?;
                    return Ok(Attempt::Failed(error));
                }
                Err(_) if handle.token().is_cancelled() => {
                    return Ok(Attempt::Stopped(handle.reason()));
                }
                // Saved with the retry or the job's failure.
                Err(error) => {
                    job.fail_action(index, error.error.clone(), now)?;
                    return Ok(Attempt::Failed(error));
                }
            }
        }
        Ok(Attempt::Succeeded)
    }

    /// The size of action `index`'s result as sent, when the job can still be read back with
    /// it after the results before it (`results_size` bytes); else the permanent failure the
    /// action ends with: nested past what protobuf decoders read, or past the results budget.
    fn result_fits(
        &self,
        index: usize,
        value: &Value,
        results_size: usize,
    ) -> Result<usize, HandlerError> {
        // Depth first: measuring the size walks all of it.
        if let Some(path) = value_too_deep(value, MAX_RESULT_DEPTH) {
            return Err(HandlerError::permanent(
                "RESOURCE_EXHAUSTED",
                "RESULT_TOO_DEEP",
                format!(
                    "action {index}'s result{path} nests deeper than the {MAX_RESULT_DEPTH} \
                     levels a result may take, and the job could not be read back"
                ),
            ));
        }
        let size = wire_size(value);
        let budget = self.config.max_results_bytes;
        if results_size + size > budget {
            return Err(HandlerError::permanent(
                "RESOURCE_EXHAUSTED",
                "RESULT_TOO_LARGE",
                format!(
                    "action {index}'s result is {size} bytes as sent; with the job's other \
                     results it would pass the {budget} bytes a job's results may take (see \
                     max_message_bytes), and the job could not be read back"
                ),
            ));
        }
        Ok(size)
    }

    /// Runs one action's handler, applying its progress as it comes. Once the job is told to
    /// stop, the handler gets the grace period to return; after that it is dropped.
    async fn run_action(
        &self,
        job: &mut Job,
        index: usize,
        handle: &StopHandle,
        deadline: Option<Instant>,
    ) -> Result<Result<Value, HandlerError>, RunError> {
        let action = &job.actions[index];
        let Some(handler) = self.registry.get(&action.name) else {
            return Ok(Err(HandlerError::permanent(
                "UNIMPLEMENTED",
                "UNKNOWN_ACTION",
                format!("this server has no action named {:?}", action.name),
            )));
        };
        let (progress, progress_rx) = ProgressReporter::channel();
        let ctx = ActionContext {
            job_id: job.id,
            action_index: index,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            labels: job.labels.clone(),
            tenant: job.tenant.clone(),
            params: action.params.clone(),
            input: action.input.clone(),
            progress,
            cancel: handle.token().child_token(),
            deadline,
            trace: job.trace.clone(),
        };
        let span = tracing::info_span!("action", index, name = %action.name);
        let mut tracker = ProgressTracker {
            receiver: progress_rx,
            saved_version: Arc::new(AtomicI64::new(job.version)),
            last_persist: Instant::now(),
            spare: None,
        };
        // A panic would otherwise unwind through this task and leave the job RUNNING with
        // nobody to end it. Whatever the handler's future held is dropped unused after one,
        // hence the assertion. A handler written without `async_trait` may panic before it
        // returns its future, so the call is guarded as well as the polls.
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| handler.run(ctx)));
        let handler_run = match started {
            Ok(handler_run) => handler_run,
            Err(payload) => return Ok(Err(self.panicked(job, index, payload))),
        };
        // Reports made while the handler is polled are taken by the `next()` branch right
        // after, in the same poll, so they need not wake this task (see `actions::progress`).
        let mut run = tracker.receiver.polling(
            AssertUnwindSafe(tracing::Instrument::instrument(handler_run, span)).catch_unwind(),
        );
        let mut grace_ends: Option<Instant> = None;
        // Made once, not at every turn of the loop (every progress report), and cheap to poll
        // again (see `Cancelled`). The Cancel one is only polled once the owner is stopping:
        // a Cancel fires `stop` too (see `StopHandle::stop`), and one that comes later finds
        // the grace period.
        let mut stop = Cancelled::new(handle.token().clone());
        let mut cancel_asked = Cancelled::new(handle.cancel_asked().clone());
        loop {
            let grace = async {
                match grace_ends {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                result = &mut run => {
                    let reported = tracker.receiver.take();
                    self.apply_progress(job, index, &mut tracker, reported, true).await?;
                    return Ok(result.unwrap_or_else(|payload| Err(self.panicked(job, index, payload))));
                }
                // The stop branches come before the reports: each fires once, and a handler
                // that reports at every poll while ignoring its cancellation would otherwise
                // keep them from ever being polled, and never be stopped.
                _ = &mut stop, if grace_ends.is_none() => {
                    grace_ends = Some(Instant::now() + self.config.cancel_grace);
                }
                // Also when the handler is already stopping for the job's timeout or a
                // shutdown: the Cancel is answered once this is stored, and decides the end.
                _ = &mut cancel_asked, if grace_ends.is_some() && !job.cancel_requested => {
                    // Stored before the handler is waited for: a server that dies meanwhile
                    // ends the job CANCELLED at its restart instead of running it again.
                    job.request_cancel(SystemTime::now())?;
                    self.commit(job).await?;
                    tracker.saved_version.fetch_max(job.version, Ordering::AcqRel);
                }
                _ = grace => {
                    tracing::warn!(grace = ?self.config.cancel_grace, "handler ignored its cancellation; dropped");
                    return Ok(Err(HandlerError::cancelled()));
                }
                reported = tracker.receiver.next() => {
                    self.apply_progress(job, index, &mut tracker, Some(reported), false).await?;
                    // A handler that reports and yields at every step (`yield_now`) is ready
                    // again at once, and so is its next report: without this, this loop would
                    // never hand its thread back to the runtime until the handler is done,
                    // starving the other tasks there (watch streams, other jobs' calls).
                    tokio::task::coop::consume_budget().await;
                }
            }
        }
    }

    /// Logs a handler's panic and turns it into its action's failure.
    fn panicked(&self, job: &Job, index: usize, payload: Box<dyn Any + Send>) -> HandlerError {
        let error = handler_panicked(&*payload);
        tracing::error!(
            job_id = %job.id,
            action = index,
            attempt = job.attempt,
            panic = %error.error.message,
            "an action's handler panicked; its attempt fails"
        );
        error
    }

    /// Applies the newest reported progress, if any. Unless `last` (the handler has returned,
    /// and the state change that follows saves and publishes a newer version anyway),
    /// publishes it at once — progress is not a transition, so watchers need not wait for the
    /// disk — and writes it when enough time has gone by (in the background) or enough
    /// versions (waiting, so the store never falls more than [`MAX_UNPERSISTED_VERSIONS`]
    /// behind what was shown).
    async fn apply_progress(
        &self,
        job: &mut Job,
        index: usize,
        tracker: &mut ProgressTracker,
        reported: Option<Progress>,
        last: bool,
    ) -> Result<(), RunError> {
        let Some(progress) = reported else {
            return Ok(());
        };
        if !job.report_progress(index, progress, SystemTime::now()) || last {
            return Ok(());
        }
        let snapshot = tracker.snapshot(job);
        tracker.spare = self.hub.publish(Arc::clone(&snapshot));
        let saved = tracker.saved_version.load(Ordering::Acquire);
        if job.version - saved >= MAX_UNPERSISTED_VERSIONS - 1 {
            self.store.save(job).await?;
            tracker
                .saved_version
                .fetch_max(job.version, Ordering::AcqRel);
        } else if tracker.last_persist.elapsed() >= self.config.progress_write_interval(self.shared)
        {
            let store = Arc::clone(&self.store);
            let failure_log = Arc::clone(&self.failure_logs.progress_saves);
            let saved_version = Arc::clone(&tracker.saved_version);
            self.tracker.spawn(async move {
                match store.save(&snapshot).await {
                    Ok(()) => {
                        saved_version.fetch_max(snapshot.version, Ordering::AcqRel);
                    }
                    // A state change saved a newer version first: nothing is lost.
                    Err(StoreError::StaleVersion { .. }) => {}
                    Err(error) => {
                        if let Some(held_back) = failure_log.admit() {
                            tracing::warn!(error = %crate::with_causes(&error), held_back, "saving progress failed");
                        }
                    }
                }
            });
        } else {
            return Ok(());
        }
        tracker.last_persist = Instant::now();
        Ok(())
    }

    /// Hands a job whose retry is committed (QUEUED, due at its `next_attempt_time`) over to
    /// the queue, or on a shared store to whichever replica claims it once due: nothing here
    /// waits out the backoff, so it holds across a restart, and a shutdown has no wait to end.
    /// A Cancel that reached the job as its attempt ended cancels it instead. The last check
    /// and the hand-over are one step under the scheduler's lock, under which a Cancel stops
    /// the task's handle: a Cancel either finds the job queued or is seen here.
    async fn hand_over_retry(&self, mut job: Job, handle: &StopHandle) -> Result<Handed, RunError> {
        let next_attempt_time = job
            .next_attempt_time
            .map(|time| {
                // Not `to_string()`, which panics past year 9999: an embedder's backoff may
                // be that long (`serve` refuses it), and a log line is not worth a panic.
                let mut text = String::new();
                let _ = write!(text, "{}", humantime::format_rfc3339_millis(time));
                text
            })
            .unwrap_or_default();
        tracing::info!(
            attempt = job.attempt,
            next_attempt_time,
            "job will be retried"
        );
        let cancel_asked = || handle.cancel_asked().is_cancelled();
        if let Some(shared) = self.store.shared() {
            if !cancel_asked() {
                // The stored `next_attempt_time` keeps every replica from claiming it early.
                // A Cancel made on another replica while the attempt ended may have marked
                // the job without its notice reaching this one yet: the release tells.
                let marked = shared.release(job.id).await?;
                let mut scheduler = self.scheduler();
                if !marked && !cancel_asked() {
                    scheduler.finish(job.id);
                    return Ok(Handed::Over);
                }
                drop(scheduler);
                // The job is anyone's now: cancelled as any replica would. Should the store
                // fail, the Cancel is tried again until it is carried out: one made here is in
                // no mark that another replica would see.
                self.cancel_released(job.id)
                    .await
                    .map_err(|error| match error {
                        RunError::Store(error) => RunError::CancelAfterRelease(error),
                        other => other,
                    })?;
                return Ok(Handed::No);
            }
        } else {
            let mut scheduler = self.scheduler();
            if !cancel_asked() {
                let due = job.due_after(SystemTime::now());
                let (id, rank, tenant) = (job.id, Rank::of(&job), job.tenant.clone());
                scheduler.finish(id);
                scheduler.enqueue_with(id, rank, &tenant, Some(Arc::new(job)), due);
                return Ok(Handed::Over);
            }
        }
        self.cancel_instead_of_retry(&mut job).await?;
        Ok(Handed::No)
    }

    /// The wait before attempt `attempt`: exponential from the initial backoff, capped, with
    /// up to 25% random jitter so retries of many jobs do not all land at once.
    fn backoff(&self, attempt: u32) -> Duration {
        backoff(
            self.config.retry_backoff_initial,
            self.config.retry_backoff_max,
            attempt,
            rand::random::<f64>(),
        )
    }
}
