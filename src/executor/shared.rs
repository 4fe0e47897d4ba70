//! Shared mode: the executor of one replica among several on one store (see
//! [`SharedStore`]). Jobs are claimed from the store under leases when workers are free, the
//! leases are renewed while held, a reaper on every replica re-queues the RUNNING jobs of
//! replicas that died, and the store's change feed brings every replica's transitions to this
//! replica's watchers, new QUEUED jobs to its dispatcher and cancels to the job's owner.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use tracing::Instrument;

use super::{
    ExecutorError, Inner, cancelled_error,
    queue::{Full, Rank, StopReason},
};
use crate::{
    job::{Job, JobId, JobState},
    store::{Change, SharedStore, StoreError},
};

/// How often an idle dispatcher claims anyway: a safety net for a wake-up that was missed
/// (a notification arrives only while the feed is connected).
pub(super) const IDLE_CLAIM_INTERVAL: Duration = Duration::from_secs(1);
/// RUNNING jobs whose lease ran out that one reaper pass re-queues at most.
const REAP_BATCH: usize = 256;
/// Attempts at cancelling a job that keeps changing under the cancel (claimed, started).
const CANCEL_TRIES: usize = 5;
/// How old the database's count of QUEUED jobs may be for a Submit well below the queue
/// limits, and for one at them (which is refused only on a count this fresh).
const QUEUED_COUNT_MAX_AGE: Duration = Duration::from_secs(1);
const QUEUED_COUNT_MAX_AGE_AT_LIMIT: Duration = Duration::from_millis(100);

/// The database's count of QUEUED jobs, the jobs this replica queued since it was read, and
/// the Submits it let through that are still being stored: what the queue limits are checked
/// against on a shared store. Replicas together may go past a limit by what the others queued
/// since this replica's count (at most a second's worth); one replica alone never does.
#[derive(Default)]
pub(super) struct QueuedCount {
    read_at: Option<Instant>,
    /// The database's count, and the jobs this replica queued since it was read.
    queued: Tally,
    /// Submits past the check and not yet stored (or refused): counted until they are, as a
    /// count read meanwhile may not hold them yet.
    pending: Tally,
    /// The jobs this replica queued since the count was read: counted in `queued` by this
    /// replica alone, so the one that claims them knows to count them out at once (a count
    /// that says full is only read again after 100 ms, and would refuse Submits that fit).
    queued_here: HashSet<JobId>,
    /// The jobs of Submits past the check whose create is under way: one claimed before its
    /// Submit counts it as queued (the row commits, and the feed wakes a claim, first) moves
    /// to `claimed_early`, and is then never counted.
    storing: HashSet<JobId>,
    claimed_early: HashSet<JobId>,
}

/// Jobs in all and per tenant.
#[derive(Default)]
struct Tally {
    total: u64,
    per_tenant: HashMap<String, u64>,
}

impl Tally {
    fn add(&mut self, tenant: &str) {
        self.total += 1;
        *self.per_tenant.entry(tenant.to_owned()).or_default() += 1;
    }

    fn remove(&mut self, tenant: &str) {
        self.total = self.total.saturating_sub(1);
        if let Some(count) = self.per_tenant.get_mut(tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_tenant.remove(tenant);
            }
        }
    }

    fn of(&self, tenant: &str) -> u64 {
        self.per_tenant.get(tenant).copied().unwrap_or(0)
    }
}

impl QueuedCount {
    fn full(&self, tenant: &str, limit: usize, tenant_limit: Option<usize>) -> Option<Full> {
        let at = |count: u64, limit: usize| count >= u64::try_from(limit).unwrap_or(u64::MAX);
        if at(self.queued.total + self.pending.total, limit) {
            return Some(Full::Queue);
        }
        tenant_limit
            .filter(|limit| at(self.queued.of(tenant) + self.pending.of(tenant), *limit))
            .map(|_| Full::Tenant)
    }

    fn older_than(&self, age: Duration) -> bool {
        self.read_at.is_none_or(|read_at| read_at.elapsed() >= age)
    }
}

/// A Submit's place in a shared store's queue limits, from the check until its job is stored:
/// dropped, it counts as a job queued (see [`QueuedReservation::queued`]) or as nothing.
pub(super) struct QueuedReservation<'a> {
    inner: &'a Inner,
    tenant: String,
    /// The job being stored, once known.
    storing: Option<JobId>,
    queued: bool,
}

impl QueuedReservation<'_> {
    /// The job `id` is about to be stored: a claim that takes it before [`Self::queued`] is
    /// told knows it is one of this replica's.
    pub(super) fn storing(&mut self, id: JobId) {
        self.storing = Some(id);
        self.inner.queued_count().storing.insert(id);
    }

    /// The job `id` was stored QUEUED: it counts until the next read of the database's count,
    /// or until this replica claims it (unless it did already).
    pub(super) fn queued(&mut self, id: JobId) {
        if self.queued {
            return;
        }
        self.queued = true;
        self.storing = None;
        let mut count = self.inner.queued_count();
        count.pending.remove(&self.tenant);
        count.storing.remove(&id);
        if !count.claimed_early.remove(&id) {
            count.queued.add(&self.tenant);
            count.queued_here.insert(id);
        }
    }
}

impl Drop for QueuedReservation<'_> {
    fn drop(&mut self) {
        if !self.queued {
            let mut count = self.inner.queued_count();
            count.pending.remove(&self.tenant);
            if let Some(id) = self.storing {
                count.storing.remove(&id);
                count.claimed_early.remove(&id);
            }
        }
    }
}

impl Inner {
    /// On a shared store, checks the database's backlog against the queue limit and `tenant`'s
    /// quota, and holds a place for the Submit while its job is stored; `Ok(None)` on a single
    /// server, whose own queue is the backlog. Reads the count again when it is a second old,
    /// or when it says full and is older than 100 ms, so that the edge is judged on a fresh
    /// count. A count that cannot be read lets the Submit through (the limits protect the
    /// service; the create that follows fails anyway if the database is down).
    pub(super) async fn reserve_shared_queue(
        &self,
        tenant: &str,
        limit: usize,
        tenant_limit: Option<usize>,
    ) -> Result<Option<QueuedReservation<'_>>, Full> {
        let Some(shared) = self.shared_store() else {
            return Ok(None);
        };
        let stale = |count: &QueuedCount| {
            count.older_than(QUEUED_COUNT_MAX_AGE)
                || (count.full(tenant, limit, tenant_limit).is_some()
                    && count.older_than(QUEUED_COUNT_MAX_AGE_AT_LIMIT))
        };
        if stale(&self.queued_count()) {
            let _reading = self.queued_count_read.lock().await;
            // Another Submit may have read it while this one waited.
            if stale(&self.queued_count()) {
                match shared.queued_counts().await {
                    Ok(counts) => {
                        let mut count = self.queued_count();
                        count.read_at = Some(Instant::now());
                        count.queued_here.clear();
                        count.queued = Tally {
                            total: counts.iter().map(|(_, n)| n).sum(),
                            per_tenant: counts.into_iter().collect(),
                        };
                    }
                    Err(error) => {
                        tracing::warn!(error = %crate::with_causes(&error), "the queue limits are not checked for this Submit");
                        return Ok(None);
                    }
                }
            }
        }
        // The check and the hold in one critical section: concurrent Submits on this replica
        // each see the others'.
        let mut count = self.queued_count();
        if let Some(full) = count.full(tenant, limit, tenant_limit) {
            return Err(full);
        }
        count.pending.add(tenant);
        Ok(Some(QueuedReservation {
            inner: self,
            tenant: tenant.to_owned(),
            storing: None,
            queued: false,
        }))
    }

    fn queued_count(&self) -> std::sync::MutexGuard<'_, QueuedCount> {
        // Each critical section leaves the count whole: a poisoned lock is still consistent.
        self.queued_count.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shared store; only called in shared mode.
    fn shared_store(&self) -> Option<&dyn SharedStore> {
        self.store.shared()
    }

    /// Starts following the store's feed and the lease renewal and reaper tasks; they stop
    /// when the executor stops dispatching.
    pub(super) async fn start_shared(self: Arc<Self>) -> Result<(), ExecutorError> {
        let Some(shared) = self.shared_store() else {
            return Ok(());
        };
        let mut feed = shared.feed().await?;
        // Never zero: the intervals below are fractions of it.
        let lease = shared.lease().max(Duration::from_millis(3));

        // Not tracked: shutdown waits for the job tasks, and these serve them until then.
        let inner = Arc::clone(&self);
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    _ = inner.drained.cancelled() => return,
                    change = feed.recv() => change,
                };
                match change {
                    Some(change) => inner.apply_change(change),
                    None => return,
                }
            }
        });

        let inner = Arc::clone(&self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(lease / 3);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut renewed_at = Instant::now();
            loop {
                tokio::select! {
                    _ = inner.drained.cancelled() => return,
                    _ = every.tick() => {}
                }
                renewed_at = inner.renew(renewed_at, lease).await;
            }
        });

        let inner = Arc::clone(&self);
        self.tracker.spawn(async move {
            let mut every = tokio::time::interval(lease / 2);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = inner.dispatching.cancelled() => return,
                    _ = every.tick() => {}
                }
                if let Err(error) = inner.reap().await {
                    tracing::warn!(error = %crate::with_causes(&error), "re-queuing the jobs of a stopped replica failed");
                }
            }
        });
        Ok(())
    }

    /// Renews this replica's leases; returns when they were last renewed. Stops the jobs it
    /// runs that it no longer holds, so that a job never runs here and on the replica that took
    /// it over at once for longer than a renewal interval: those whose lease was not renewed
    /// (taken over), and all of them once no renewal has succeeded for a whole lease (every one
    /// may have been taken over). Their saves are refused from then on anyway (see
    /// [`StoreError::LeaseLost`]); this stops handlers that would not save for a long time.
    async fn renew(&self, renewed_at: Instant, lease: Duration) -> Instant {
        let Some(shared) = self.shared_store() else {
            return renewed_at;
        };
        // Taken before the renewal: a job claimed while it runs is not renewed by it, and
        // must not be taken for one that was lost.
        let before = self.scheduler().active_jobs();
        match shared.renew_leases().await {
            Ok(renewal) => {
                let held: HashSet<JobId> = renewal.held.into_iter().collect();
                // A task that let its job go while the renewal ran (a retry handed over,
                // released) lost nothing.
                let active: HashSet<JobId> = self.scheduler().active_ids().into_iter().collect();
                for (id, handle) in before {
                    if held.contains(&id) || !active.contains(&id) {
                        continue;
                    }
                    // Harmless for a run that is over, and needed for one that is not.
                    handle.stop(StopReason::Shutdown);
                    // A job that ended here while the renewal ran is not held any more either
                    // (only unfinished jobs are): that is no loss to warn of.
                    let ended = matches!(
                        self.store.get(id).await,
                        Ok(Some(job)) if job.state.is_terminal()
                    );
                    if !ended {
                        tracing::warn!(job_id = %id, "lease lost to another replica; stopping the job here");
                    }
                }
                // Normally the notification came first; this covers one the feed missed.
                for id in renewal.cancel_requested {
                    if let Some(handle) = self.scheduler().active_handle(id)
                        && handle.reason() == StopReason::None
                    {
                        tracing::info!(job_id = %id, "cancel requested by another replica");
                        handle.stop(StopReason::Cancelled);
                    }
                }
                Instant::now()
            }
            Err(error) => {
                // The next tick tries again; the lease outlasts two missed renewals.
                tracing::warn!(error = %crate::with_causes(&error), "renewing leases failed");
                if renewed_at.elapsed() >= lease {
                    for (id, handle) in before {
                        tracing::warn!(job_id = %id, "lease could not be renewed in time; stopping the job here");
                        handle.stop(StopReason::Shutdown);
                    }
                }
                renewed_at
            }
        }
    }

    /// Passes a change from the feed on: the hub gets every snapshot (it ignores the versions it
    /// has, so this replica's own are harmless), the dispatcher wakes for a QUEUED job, and the
    /// job's task stops on a cancel request.
    fn apply_change(&self, change: Change) {
        match change {
            Change::Event(job) => {
                let queued = job.state == JobState::Queued;
                self.hub.publish(job);
                if queued {
                    self.wake.notify_one();
                }
            }
            Change::Cancel(id) => {
                if let Some(handle) = self.scheduler().active_handle(id) {
                    tracing::info!(job_id = %id, "cancel requested by another replica");
                    handle.stop(StopReason::Cancelled);
                }
            }
        }
    }

    /// Claims up to `limit` QUEUED jobs into the local queue; returns how many.
    pub(super) async fn claim(&self, limit: usize) -> usize {
        let Some(shared) = self.shared_store() else {
            return 0;
        };
        let running_here = self.scheduler().active_ids();
        match shared.claim(limit, &running_here).await {
            Ok(jobs) => {
                let count = jobs.len();
                {
                    let mut queued = self.queued_count();
                    for job in &jobs {
                        if queued.queued_here.remove(&job.id) {
                            queued.queued.remove(&job.tenant);
                        } else if queued.storing.remove(&job.id) {
                            queued.claimed_early.insert(job.id);
                        }
                    }
                }
                let mut scheduler = self.scheduler();
                for job in jobs {
                    let job = Arc::new(job);
                    // Claimed only once due, by the database's clock: never held back here.
                    scheduler.enqueue_with(
                        job.id,
                        Rank::of(&job),
                        &job.tenant,
                        Some(Arc::clone(&job)),
                        None,
                    );
                }
                count
            }
            Err(error) => {
                tracing::warn!(error = %crate::with_causes(&error), "claiming jobs failed");
                0
            }
        }
    }

    /// Re-queues (or fails, as `interrupted_policy` says, like recovery after a restart) the
    /// RUNNING jobs whose replica stopped renewing their lease.
    async fn reap(&self) -> Result<(), StoreError> {
        let Some(shared) = self.shared_store() else {
            return Ok(());
        };
        for mut job in shared.expired(REAP_BATCH).await? {
            let id = job.id;
            let span = super::job_span(id);
            async {
                super::record_trace(&job);
                let changed =
                    self.settle_interrupted(&mut job, "the replica running the job stopped");
                if let Err(error) = changed {
                    tracing::warn!(error = %crate::with_causes(&error), "cannot re-queue a job whose lease ran out");
                    return;
                }
                match shared.save_expired(&job).await {
                    Ok(()) => {
                        tracing::info!(
                            attempt = job.attempt,
                            state = job.state.as_str(),
                            "the replica running the job stopped; job taken over"
                        );
                        self.metrics.transition(job.state.as_str());
                        let queued = job.state == JobState::Queued;
                        self.hub.publish(Arc::new(job));
                        if queued {
                            self.wake.notify_one();
                        }
                    }
                    // Renewed after all, or another replica's reaper was first.
                    Err(StoreError::LeaseLost(_) | StoreError::StaleVersion { .. }) => {}
                    Err(error) => tracing::warn!(error = %crate::with_causes(&error), "re-queuing the job failed"),
                }
            }
            .instrument(span)
            .await;
        }
        Ok(())
    }

    /// Cancels a job as any replica can, whichever holds it: a QUEUED one at once (the version
    /// check makes a replica that claimed it meanwhile lose either its start or this cancel,
    /// and this one then tries again; a cancel that stands clears the claimer's lease), a
    /// RUNNING one by asking its replica.
    pub(super) async fn cancel_shared(&self, id: JobId) -> Result<Job, ExecutorError> {
        let shared = self.shared_store().ok_or(ExecutorError::NotFound(id))?;
        let mut tries = 0;
        loop {
            tries += 1;
            let mut job = self
                .store
                .get(id)
                .await?
                .ok_or(ExecutorError::NotFound(id))?;
            match job.state {
                JobState::Queued => {
                    job.cancel(cancelled_error(), SystemTime::now())
                        .map_err(|source| ExecutorError::Illegal { id, source })?;
                    match self.commit_state(&job).await {
                        Ok(()) => {
                            tracing::info!(job_id = %id, "queued job cancelled");
                            return Ok(job);
                        }
                        // Changed meanwhile, or claimed by another replica after this one's
                        // lease on it ran out (the store no longer counts it as held here).
                        Err(StoreError::StaleVersion { .. } | StoreError::LeaseLost(_))
                            if tries < CANCEL_TRIES =>
                        {
                            continue;
                        }
                        Err(error) => return Err(error.into()),
                    }
                }
                JobState::Running => {
                    if !shared.request_cancel(id).await? {
                        // No longer RUNNING (back in the queue for a retry, or ended) since
                        // read: read it again.
                        if tries < CANCEL_TRIES {
                            continue;
                        }
                        return Err(ExecutorError::Store(StoreError::backend(
                            format!("cancelling job {id}"),
                            "the job kept changing state",
                        )));
                    }
                    tracing::info!(job_id = %id, "cancel requested from the replica running it");
                    // Stored now (the column), before the running replica has heard of it.
                    job.cancel_requested = true;
                    return Ok(job);
                }
                _ => return Ok(job),
            }
        }
    }

    /// Gives up the QUEUED jobs this replica holds (claimed and not started, or interrupted by
    /// the shutdown), so other replicas need not wait for their leases to run out.
    pub(super) async fn release_all(&self) {
        if let Some(shared) = self.shared_store() {
            match shared.release_all().await {
                Ok(released) => tracing::info!(jobs = released, "released queued jobs"),
                Err(error) => {
                    tracing::warn!(error = %crate::with_causes(&error), "releasing queued jobs failed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_count_is_full_at_the_queue_limit_or_at_a_tenant_s_quota() {
        let mut count = QueuedCount {
            read_at: Some(Instant::now()),
            queued: Tally {
                total: 5,
                per_tenant: [("a".to_owned(), 3), ("b".to_owned(), 2)].into(),
            },
            pending: Tally::default(),
            queued_here: HashSet::new(),
            storing: HashSet::new(),
            claimed_early: HashSet::new(),
        };
        assert!(matches!(count.full("a", 5, None), Some(Full::Queue)));
        assert!(count.full("a", 6, None).is_none());
        assert!(matches!(count.full("a", 6, Some(3)), Some(Full::Tenant)));
        assert!(count.full("b", 6, Some(3)).is_none());
        assert!(
            count.full("new", 6, Some(1)).is_none(),
            "a tenant with none queued"
        );
        // Submits still being stored count too.
        count.pending.add("b");
        assert!(matches!(count.full("a", 6, None), Some(Full::Queue)));
        assert!(matches!(count.full("b", 7, Some(3)), Some(Full::Tenant)));
        count.pending.remove("b");
        assert!(count.full("b", 7, Some(3)).is_none());
        assert!(!count.older_than(Duration::from_secs(1)));
        assert!(
            QueuedCount::default().older_than(Duration::from_secs(1)),
            "never read"
        );
    }
}
