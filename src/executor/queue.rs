//! The scheduler's bookkeeping: which jobs wait in the queue, in which order, and which are
//! owned by a running task. Whoever takes a job out of here owns its next transition, which is
//! what keeps Cancel and the dispatcher from both moving a queued job.

use std::{
    cmp::Reverse,
    collections::{BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::SystemTime,
};

use tokio_util::sync::CancellationToken;

use crate::job::{Job, JobId};

/// Queued jobs whose snapshot the queue keeps, so that starting one needs no store read. A
/// bound, not a cache: past it (a deep backlog) jobs are read from the store when they start,
/// so memory does not grow with the queue.
pub const MAX_QUEUED_SNAPSHOTS: usize = 4096;

/// Higher priority first, then the time the job became ready to run (its submission, or its
/// `schedule_time` if later), then the id. A job back in the queue for a retry or after a
/// restart so takes its old place, and one scheduled for later gets in line at its time
/// rather than at its submission, as the PostgreSQL claim orders (`priority DESC, ready_at,
/// id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct QueueKey {
    priority: Reverse<i32>,
    ready: SystemTime,
    id: JobId,
}

/// A job's place in line (see `QueueKey`), from [`Rank::of`] the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rank {
    /// Higher runs first.
    pub priority: i32,
    /// When the job became ready to run: [`Job::ready_time`].
    pub ready: SystemTime,
}

impl Rank {
    /// `job`'s place in line.
    pub fn of(job: &Job) -> Self {
        Self {
            priority: job.priority,
            ready: job.ready_time(),
        }
    }
}

/// Why an owner task was told to stop its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StopReason {
    /// Not told to stop.
    None = 0,
    /// A client cancelled the job.
    Cancelled = 1,
    /// The attempt ran past the job's timeout.
    Timeout = 2,
    /// The server is shutting down.
    Shutdown = 3,
}

/// The handle through which others stop a job's owner task. The first reason given wins,
/// except that a Cancel outranks a timeout: the client asked for the job to end, so it ends
/// CANCELLED rather than being retried.
#[derive(Debug, Clone, Default)]
pub struct StopHandle {
    token: CancellationToken,
    reason: Arc<AtomicU8>,
    /// Fires on a Cancel, also one that comes after the owner was told to stop for another
    /// reason: the owner stores the request either way.
    cancel: CancellationToken,
}

impl StopHandle {
    /// Asks the owner to stop, unless it was already asked for another reason (see the type).
    pub fn stop(&self, reason: StopReason) {
        let set = |from: StopReason| {
            self.reason
                .compare_exchange(
                    from as u8,
                    reason as u8,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        };
        if !set(StopReason::None) && reason == StopReason::Cancelled {
            set(StopReason::Timeout);
        }
        if reason == StopReason::Cancelled {
            self.cancel.cancel();
        }
        self.token.cancel();
    }

    /// Why the owner was asked to stop.
    pub fn reason(&self) -> StopReason {
        match self.reason.load(Ordering::Acquire) {
            1 => StopReason::Cancelled,
            2 => StopReason::Timeout,
            3 => StopReason::Shutdown,
            _ => StopReason::None,
        }
    }

    /// Fires when the owner is asked to stop.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Fires when a client cancels the job, whatever the reason the owner stops for.
    pub fn cancel_asked(&self) -> &CancellationToken {
        &self.cancel
    }
}

/// Where a queued job waits: its key, and the time it becomes due if it waits in
/// `Scheduler::scheduled` rather than in the queue proper. Handed out with a job a cancel
/// takes from the queue, so that it can be put back there ([`Scheduler::put_back`]).
pub struct Place {
    key: QueueKey,
    tenant: Arc<str>,
    due: Option<SystemTime>,
}

/// Queued and active jobs. Lives behind one mutex, never held across an await.
#[derive(Default)]
pub struct Scheduler {
    /// Queued jobs that may start now, in the order they start.
    queue: BTreeSet<QueueKey>,
    /// Queued jobs scheduled to start later, by when they become due; each moves to `queue`
    /// once it is ([`Scheduler::promote_due`]).
    scheduled: BTreeSet<(SystemTime, QueueKey)>,
    /// Each queued job's place (in `queue` or in `scheduled`) and its tenant.
    queued: HashMap<JobId, Place>,
    active: HashMap<JobId, StopHandle>,
    /// The current snapshot of some queued jobs (at most [`MAX_QUEUED_SNAPSHOTS`]). Only the
    /// executor changes a queued job, and only after taking it out of the queue (`pop`,
    /// `claim`), which drops its snapshot here: one found here is never stale.
    snapshots: HashMap<JobId, Arc<Job>>,
    /// The snapshots of jobs taken out of the queue to run, until their first change is
    /// committed ([`Scheduler::started`]): still their newest, and what a watcher arriving
    /// meanwhile starts from without a store read.
    starting: HashMap<JobId, Arc<Job>>,
    reserved: usize,
    /// Per tenant: jobs queued plus slots reserved. Kept with every move in or out of the
    /// queue, so the per-tenant quota is right across cancel, dispatch, retry and recovery.
    per_tenant: HashMap<Arc<str>, usize>,
}

/// Why [`Scheduler::reserve`] refused a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The whole queue is at its limit.
    Queue,
    /// The tenant's share of the queue is at its limit.
    Tenant,
}

/// Where a job is in the scheduler.
pub enum Holder {
    /// Waiting in the queue; now removed from it, so the caller owns it (and puts it back
    /// where it was with [`Scheduler::put_back`] if it cannot end it).
    Queue(Place),
    /// Owned by a task; here is how to stop it.
    Task(StopHandle),
    /// Not here: ended, unknown, or not enqueued yet.
    Nobody,
}

impl Scheduler {
    /// Jobs queued plus slots reserved by Submits still storing their job.
    pub fn queue_length(&self) -> usize {
        self.queued.len() + self.reserved
    }

    /// Queued jobs that may start now (not counting reserved slots, nor jobs scheduled for
    /// later); call [`Scheduler::promote_due`] first to count those that have become due.
    pub fn ready(&self) -> usize {
        self.queue.len()
    }

    /// Queued jobs scheduled to start later.
    pub fn scheduled(&self) -> usize {
        self.scheduled.len()
    }

    /// When the next job scheduled for later becomes due.
    pub fn next_due(&self) -> Option<SystemTime> {
        self.scheduled.first().map(|(due, _)| *due)
    }

    /// Moves the scheduled jobs due by `now` into the queue proper, where they take their
    /// place by their rank (see `QueueKey`).
    pub fn promote_due(&mut self, now: SystemTime) {
        while let Some(&(due, key)) = self.scheduled.first() {
            if due > now {
                break;
            }
            self.scheduled.pop_first();
            if let Some(place) = self.queued.get_mut(&key.id) {
                place.due = None;
            }
            self.queue.insert(key);
        }
    }

    /// Jobs of `tenant` queued plus slots it has reserved.
    pub fn tenant_queue_length(&self, tenant: &str) -> usize {
        self.per_tenant.get(tenant).copied().unwrap_or(0)
    }

    /// Reserves a queue slot for `tenant` if fewer than `limit` are taken in all and fewer
    /// than `tenant_limit` (when set) by the tenant.
    pub fn reserve(
        &mut self,
        limit: usize,
        tenant: &str,
        tenant_limit: Option<usize>,
    ) -> Result<(), Full> {
        if self.queue_length() >= limit {
            return Err(Full::Queue);
        }
        if tenant_limit.is_some_and(|max| self.tenant_queue_length(tenant) >= max) {
            return Err(Full::Tenant);
        }
        self.reserved += 1;
        self.count_in(tenant);
        Ok(())
    }

    /// Gives back a slot `tenant` reserved, without enqueuing.
    pub fn unreserve(&mut self, tenant: &str) {
        self.reserved = self.reserved.saturating_sub(1);
        self.count_out(tenant);
    }

    fn count_in(&mut self, tenant: &str) {
        match self.per_tenant.get_mut(tenant) {
            Some(count) => *count += 1,
            None => {
                self.per_tenant.insert(Arc::from(tenant), 1);
            }
        }
    }

    fn count_out(&mut self, tenant: &str) {
        if let Some(count) = self.per_tenant.get_mut(tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                // Tenants come and go: an idle one costs nothing.
                self.per_tenant.remove(tenant);
            }
        }
    }

    /// Adds `tenant`'s job to the queue (a no-op if it is already queued).
    #[cfg(test)]
    pub fn enqueue(&mut self, id: JobId, rank: Rank, tenant: &str) {
        self.enqueue_with(id, rank, tenant, None, None);
    }

    /// Adds `tenant`'s job to the queue with its current (stored) snapshot, which [`pop`]
    /// hands back if there was room to keep it. A job `due` later waits apart until then
    /// (see [`Job::due_after`]); it counts as queued meanwhile.
    ///
    /// [`pop`]: Scheduler::pop
    pub fn enqueue_with(
        &mut self,
        id: JobId,
        rank: Rank,
        tenant: &str,
        snapshot: Option<Arc<Job>>,
        due: Option<SystemTime>,
    ) {
        if self.queued.contains_key(&id) {
            return;
        }
        self.starting.remove(&id);
        match snapshot {
            // Room is kept for jobs that start soon, not for those scheduled days ahead.
            Some(job) if due.is_none() && self.snapshots.len() < MAX_QUEUED_SNAPSHOTS => {
                self.snapshots.insert(id, job);
            }
            _ => {
                self.snapshots.remove(&id);
            }
        }
        let key = QueueKey {
            priority: Reverse(rank.priority),
            ready: rank.ready,
            id,
        };
        match due {
            Some(due) => self.scheduled.insert((due, key)),
            None => self.queue.insert(key),
        };
        self.queued.insert(
            id,
            Place {
                key,
                tenant: Arc::from(tenant),
                due,
            },
        );
        self.count_in(tenant);
    }

    /// The snapshot a queued or starting job was queued with, if the queue kept it. Nothing
    /// changes a queued job but a cancel, which takes it out of the queue first, and a
    /// starting job's first change drops it here before it is published: while found here,
    /// it is the job's newest snapshot.
    pub fn held_snapshot(&self, id: JobId) -> Option<Arc<Job>> {
        self.snapshots
            .get(&id)
            .or_else(|| self.starting.get(&id))
            .cloned()
    }

    /// Drops a starting job's snapshot: a change of it is committed and about to be told.
    pub fn started(&mut self, id: JobId) {
        self.starting.remove(&id);
    }

    /// Takes the next job to run (of those due by `now`) and marks it active; with its
    /// snapshot, if the queue kept it.
    pub fn pop(&mut self, now: SystemTime) -> Option<(JobId, StopHandle, Option<Arc<Job>>)> {
        self.promote_due(now);
        let key = self.queue.pop_first()?;
        if let Some(place) = self.queued.remove(&key.id) {
            self.count_out(&place.tenant);
        }
        let handle = StopHandle::default();
        self.active.insert(key.id, handle.clone());
        let snapshot = self.snapshots.remove(&key.id);
        if let Some(job) = &snapshot {
            self.starting.insert(key.id, Arc::clone(job));
        }
        Some((key.id, handle, snapshot))
    }

    /// Marks a job that never went through the queue active, with a fresh stop handle.
    pub fn activate(&mut self, id: JobId) -> StopHandle {
        let handle = StopHandle::default();
        self.active.insert(id, handle.clone());
        handle
    }

    /// Gives an active job a fresh stop handle (after its last one fired for a timeout). A
    /// Cancel that reached the old one carries over.
    pub fn rearm(&mut self, id: JobId) -> StopHandle {
        let handle = StopHandle::default();
        if let Some(old) = self.active.insert(id, handle.clone())
            && old.cancel_asked().is_cancelled()
        {
            handle.stop(StopReason::Cancelled);
        }
        handle
    }

    /// Puts a job [`Scheduler::claim`] took out of the queue back where it was.
    pub fn put_back(&mut self, id: JobId, place: Place) {
        let rank = Rank {
            priority: place.key.priority.0,
            ready: place.key.ready,
        };
        self.enqueue_with(id, rank, &place.tenant, None, place.due);
    }

    /// Forgets an active job whose task ended.
    pub fn finish(&mut self, id: JobId) {
        self.active.remove(&id);
        self.starting.remove(&id);
    }

    /// Takes a job away from wherever it is, for a cancel.
    pub fn claim(&mut self, id: JobId) -> Holder {
        if let Some(place) = self.queued.remove(&id) {
            match place.due {
                Some(due) => self.scheduled.remove(&(due, place.key)),
                None => self.queue.remove(&place.key),
            };
            self.count_out(&place.tenant);
            self.snapshots.remove(&id);
            return Holder::Queue(place);
        }
        match self.active.get(&id) {
            Some(handle) => Holder::Task(handle.clone()),
            None => Holder::Nobody,
        }
    }

    /// The stop handle of the job, if a task here owns it.
    pub fn active_handle(&self, id: JobId) -> Option<StopHandle> {
        self.active.get(&id).cloned()
    }

    /// Every active job, with its stop handle.
    pub fn active_jobs(&self) -> Vec<(JobId, StopHandle)> {
        self.active
            .iter()
            .map(|(id, handle)| (*id, handle.clone()))
            .collect()
    }

    /// Every active job's id.
    pub fn active_ids(&self) -> Vec<JobId> {
        self.active.keys().copied().collect()
    }

    /// Every active job's stop handle.
    pub fn active_handles(&self) -> Vec<StopHandle> {
        self.active.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank in line by priority alone: every job ready at the same moment, so the id
    /// (submission order) decides between equals.
    fn rank(priority: i32) -> Rank {
        Rank {
            priority,
            ready: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn higher_priority_first_then_fifo() {
        let mut s = Scheduler::default();
        let ids: Vec<JobId> = (0..4).map(|_| JobId::generate()).collect();
        s.enqueue(ids[0], rank(0), "t");
        s.enqueue(ids[1], rank(5), "t");
        s.enqueue(ids[2], rank(0), "t");
        s.enqueue(ids[3], rank(5), "t");
        let order: Vec<JobId> =
            std::iter::from_fn(|| s.pop(SystemTime::now()).map(|(id, ..)| id)).collect();
        assert_eq!(order, vec![ids[1], ids[3], ids[0], ids[2]]);
        assert_eq!(s.active_handles().len(), 4);
    }

    #[test]
    fn a_cancel_outranks_a_timeout_but_nothing_else_changes_the_first_reason() {
        let handle = StopHandle::default();
        handle.stop(StopReason::Timeout);
        assert!(!handle.cancel_asked().is_cancelled());
        handle.stop(StopReason::Shutdown);
        assert_eq!(handle.reason(), StopReason::Timeout);
        handle.stop(StopReason::Cancelled);
        assert_eq!(handle.reason(), StopReason::Cancelled);
        assert!(handle.cancel_asked().is_cancelled());
        handle.stop(StopReason::Timeout);
        assert_eq!(handle.reason(), StopReason::Cancelled);

        let rearmed = {
            let mut s = Scheduler::default();
            let id = JobId::generate();
            s.active.insert(id, handle.clone());
            s.rearm(id)
        };
        assert_eq!(
            rearmed.reason(),
            StopReason::Cancelled,
            "a Cancel carries over"
        );

        // A shutdown keeps its reason (the job is re-queued, or ends CANCELLED if the
        // owner stored the request), but the owner still hears of the Cancel.
        let handle = StopHandle::default();
        handle.stop(StopReason::Shutdown);
        handle.stop(StopReason::Cancelled);
        assert_eq!(handle.reason(), StopReason::Shutdown);
        assert!(handle.cancel_asked().is_cancelled());
        assert!(handle.token().is_cancelled());
    }

    #[test]
    fn a_job_back_in_the_queue_takes_its_old_place() {
        let mut s = Scheduler::default();
        let ids: Vec<JobId> = (0..3).map(|_| JobId::generate()).collect();
        // The first job left the queue to run, failed, and comes back for a retry after
        // the two submitted behind it.
        s.enqueue(ids[1], rank(0), "t");
        s.enqueue(ids[2], rank(0), "t");
        s.enqueue(ids[0], rank(0), "t");
        let order: Vec<JobId> =
            std::iter::from_fn(|| s.pop(SystemTime::now()).map(|(id, ..)| id)).collect();
        assert_eq!(order, ids);
    }

    #[test]
    fn claim_takes_a_queued_job_out_of_the_queue() {
        let mut s = Scheduler::default();
        let id = JobId::generate();
        s.enqueue(id, rank(0), "t");
        assert!(matches!(s.claim(id), Holder::Queue(_)));
        assert!(s.pop(SystemTime::now()).is_none());
        assert!(matches!(s.claim(id), Holder::Nobody));
    }

    #[test]
    fn reservations_count_against_the_limit() {
        let mut s = Scheduler::default();
        assert_eq!(s.reserve(2, "t", None), Ok(()));
        assert_eq!(s.reserve(2, "t", None), Ok(()));
        assert_eq!(s.reserve(2, "t", None), Err(Full::Queue));
        s.unreserve("t");
        s.enqueue(JobId::generate(), rank(0), "t");
        assert_eq!(s.queue_length(), 2);
        assert_eq!(s.reserve(2, "t", None), Err(Full::Queue));
    }

    #[test]
    fn tenant_counts_follow_every_move_in_and_out_of_the_queue() {
        let mut s = Scheduler::default();
        let (a1, a2, b1) = (JobId::generate(), JobId::generate(), JobId::generate());
        assert_eq!(s.reserve(100, "a", Some(2)), Ok(()));
        s.unreserve("a");
        s.enqueue(a1, rank(0), "a");
        s.enqueue(a2, rank(0), "a");
        s.enqueue(b1, rank(0), "b");
        assert_eq!(s.reserve(100, "a", Some(2)), Err(Full::Tenant));
        assert_eq!(s.reserve(100, "b", Some(2)), Ok(()));
        s.unreserve("b");
        assert!(matches!(s.claim(a2), Holder::Queue(_)));
        assert_eq!(s.tenant_queue_length("a"), 1);
        let (popped, ..) = s.pop(SystemTime::now()).unwrap();
        assert_eq!(popped, a1);
        assert_eq!(s.tenant_queue_length("a"), 0);
        s.finish(a1);
        s.enqueue_with(a1, rank(0), "a", None, None);
        assert_eq!(s.tenant_queue_length("a"), 1);
        assert_eq!(s.tenant_queue_length("b"), 1);
    }

    #[test]
    fn the_queue_hands_back_a_kept_snapshot_once_and_keeps_a_bounded_number() {
        let mut s = Scheduler::default();
        let job = Arc::new(crate::store::conformance::sample_job(1, &[], None));
        s.enqueue_with(job.id, rank(0), "t", Some(Arc::clone(&job)), None);
        let (id, _, snapshot) = s.pop(SystemTime::now()).unwrap();
        assert_eq!(id, job.id);
        assert_eq!(snapshot.as_deref(), Some(&*job));
        s.finish(id);
        s.enqueue_with(id, rank(0), "t", Some(Arc::clone(&job)), None);
        assert!(matches!(s.claim(id), Holder::Queue(_)));
        assert!(
            s.snapshots.is_empty(),
            "a claimed job's snapshot goes with it"
        );

        for _ in 0..MAX_QUEUED_SNAPSHOTS + 10 {
            let job = Arc::new(crate::store::conformance::sample_job(1, &[], None));
            s.enqueue_with(job.id, rank(0), "t", Some(job), None);
        }
        assert_eq!(s.snapshots.len(), MAX_QUEUED_SNAPSHOTS);
        let popped: Vec<bool> =
            std::iter::from_fn(|| s.pop(SystemTime::now()).map(|(.., kept)| kept.is_some()))
                .collect();
        assert_eq!(
            popped.iter().filter(|kept| **kept).count(),
            MAX_QUEUED_SNAPSHOTS
        );
        assert!(s.snapshots.is_empty());
    }

    #[test]
    fn a_snapshot_is_held_while_queued_and_starting_and_never_after() {
        let mut s = Scheduler::default();
        let job = Arc::new(crate::store::conformance::sample_job(1, &[], None));
        let id = job.id;
        s.enqueue_with(id, rank(0), "t", Some(Arc::clone(&job)), None);
        assert_eq!(s.held_snapshot(id).as_deref(), Some(&*job), "queued");
        s.pop(SystemTime::now()).unwrap();
        assert_eq!(s.held_snapshot(id).as_deref(), Some(&*job), "starting");
        s.started(id);
        assert!(
            s.held_snapshot(id).is_none(),
            "its first change is committed"
        );

        s.finish(id);
        s.enqueue_with(id, rank(0), "t", Some(Arc::clone(&job)), None);
        s.pop(SystemTime::now()).unwrap();
        s.finish(id);
        assert!(
            s.held_snapshot(id).is_none(),
            "its task ended before any change"
        );

        s.enqueue_with(id, rank(0), "t", Some(Arc::clone(&job)), None);
        s.pop(SystemTime::now()).unwrap();
        s.finish(id);
        s.enqueue_with(id, rank(0), "t", None, None);
        assert!(s.held_snapshot(id).is_none(), "requeued without a snapshot");
    }

    #[test]
    fn a_scheduled_job_waits_apart_until_due_then_gets_in_line_at_its_time() {
        let mut s = Scheduler::default();
        let start = SystemTime::now();
        let later = |secs| start + std::time::Duration::from_secs(secs);
        let at = |ready| Rank { priority: 0, ready };
        let ids: Vec<JobId> = (0..4).map(|_| JobId::generate()).collect();
        // Submitted first, but due in 10 s; then one due in 20 s; then two ready at 0 s and
        // 5 s (submitted then), which have waited longer by the time the first is due.
        s.enqueue_with(ids[0], at(later(10)), "t", None, Some(later(10)));
        s.enqueue_with(ids[1], at(later(20)), "t", None, Some(later(20)));
        s.enqueue(ids[2], at(start), "t");
        s.enqueue(ids[3], at(later(5)), "t");
        assert_eq!((s.queue_length(), s.ready(), s.scheduled()), (4, 2, 2));
        assert_eq!(s.tenant_queue_length("t"), 4, "scheduled jobs count");
        let job = Arc::new(crate::store::conformance::sample_job(1, &[], None));
        s.enqueue_with(
            job.id,
            at(later(5)),
            "u",
            Some(Arc::clone(&job)),
            Some(later(5)),
        );
        assert!(s.held_snapshot(job.id).is_none(), "no room taken until due");
        assert!(matches!(s.claim(job.id), Holder::Queue(_)));
        assert_eq!(s.next_due(), Some(later(10)));
        assert_eq!(s.pop(start).map(|(id, ..)| id), Some(ids[2]));
        // Due now, but in line behind the job ready since 5 s.
        assert_eq!(s.pop(later(10)).map(|(id, ..)| id), Some(ids[3]));
        assert_eq!(s.pop(later(10)).map(|(id, ..)| id), Some(ids[0]));
        assert!(s.pop(later(19)).is_none(), "not due yet");
        assert!(matches!(s.claim(ids[1]), Holder::Queue(_)), "cancellable");
        assert_eq!(
            (s.queue_length(), s.scheduled(), s.next_due()),
            (0, 0, None)
        );
        assert!(s.pop(later(30)).is_none());
        assert_eq!(s.tenant_queue_length("t"), 0);
    }
}
