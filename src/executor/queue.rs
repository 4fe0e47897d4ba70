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
};

use tokio_util::sync::CancellationToken;

use crate::job::JobId;

/// Higher priority first, then submission order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct QueueKey {
    priority: Reverse<i32>,
    seq: u64,
    id: JobId,
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

/// The handle through which others stop a job's owner task. The first reason given wins.
#[derive(Debug, Clone, Default)]
pub struct StopHandle {
    token: CancellationToken,
    reason: Arc<AtomicU8>,
}

impl StopHandle {
    /// Asks the owner to stop, unless it was already asked for another reason.
    pub fn stop(&self, reason: StopReason) {
        let _ = self.reason.compare_exchange(
            StopReason::None as u8,
            reason as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
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
}

/// Queued and active jobs. Lives behind one mutex, never held across an await.
#[derive(Default)]
pub struct Scheduler {
    queue: BTreeSet<QueueKey>,
    queued: HashMap<JobId, QueueKey>,
    active: HashMap<JobId, StopHandle>,
    reserved: usize,
    next_seq: u64,
}

/// Where a job is in the scheduler.
pub enum Holder {
    /// Waiting in the queue; now removed from it, so the caller owns it.
    Queue,
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

    /// Jobs owned by a task (running, or waiting out a retry backoff).
    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    /// Reserves a queue slot if fewer than `limit` are taken.
    pub fn reserve(&mut self, limit: usize) -> bool {
        if self.queue_length() >= limit {
            return false;
        }
        self.reserved += 1;
        true
    }

    /// Gives back a reserved slot, without enqueuing.
    pub fn unreserve(&mut self) {
        self.reserved = self.reserved.saturating_sub(1);
    }

    /// Adds a job to the queue (a no-op if it is already queued).
    pub fn enqueue(&mut self, id: JobId, priority: i32) {
        if self.queued.contains_key(&id) {
            return;
        }
        let key = QueueKey {
            priority: Reverse(priority),
            seq: self.next_seq,
            id,
        };
        self.next_seq += 1;
        self.queue.insert(key);
        self.queued.insert(id, key);
    }

    /// Takes the next job to run and marks it active.
    pub fn pop(&mut self) -> Option<(JobId, StopHandle)> {
        let key = self.queue.pop_first()?;
        self.queued.remove(&key.id);
        let handle = StopHandle::default();
        self.active.insert(key.id, handle.clone());
        Some((key.id, handle))
    }

    /// Gives an active job a fresh stop handle (after its last one fired for a timeout).
    pub fn rearm(&mut self, id: JobId) -> StopHandle {
        let handle = StopHandle::default();
        self.active.insert(id, handle.clone());
        handle
    }

    /// Moves an active job back to the queue (after a retry backoff).
    pub fn requeue(&mut self, id: JobId, priority: i32) {
        self.active.remove(&id);
        self.enqueue(id, priority);
    }

    /// Forgets an active job whose task ended.
    pub fn finish(&mut self, id: JobId) {
        self.active.remove(&id);
    }

    /// Takes a job away from wherever it is, for a cancel.
    pub fn claim(&mut self, id: JobId) -> Holder {
        if let Some(key) = self.queued.remove(&id) {
            self.queue.remove(&key);
            return Holder::Queue;
        }
        match self.active.get(&id) {
            Some(handle) => Holder::Task(handle.clone()),
            None => Holder::Nobody,
        }
    }

    /// Every active job's stop handle.
    pub fn active_handles(&self) -> Vec<StopHandle> {
        self.active.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_priority_first_then_fifo() {
        let mut s = Scheduler::default();
        let ids: Vec<JobId> = (0..4).map(|_| JobId::generate()).collect();
        s.enqueue(ids[0], 0);
        s.enqueue(ids[1], 5);
        s.enqueue(ids[2], 0);
        s.enqueue(ids[3], 5);
        let order: Vec<JobId> = std::iter::from_fn(|| s.pop().map(|(id, _)| id)).collect();
        assert_eq!(order, vec![ids[1], ids[3], ids[0], ids[2]]);
        assert_eq!(s.active_handles().len(), 4);
    }

    #[test]
    fn claim_takes_a_queued_job_out_of_the_queue() {
        let mut s = Scheduler::default();
        let id = JobId::generate();
        s.enqueue(id, 0);
        assert!(matches!(s.claim(id), Holder::Queue));
        assert!(s.pop().is_none());
        assert!(matches!(s.claim(id), Holder::Nobody));
    }

    #[test]
    fn reservations_count_against_the_limit() {
        let mut s = Scheduler::default();
        assert!(s.reserve(2));
        assert!(s.reserve(2));
        assert!(!s.reserve(2));
        s.unreserve();
        s.enqueue(JobId::generate(), 0);
        assert_eq!(s.queue_length(), 2);
        assert!(!s.reserve(2));
    }

    #[test]
    fn first_stop_reason_wins() {
        let handle = StopHandle::default();
        handle.stop(StopReason::Timeout);
        handle.stop(StopReason::Cancelled);
        assert_eq!(handle.reason(), StopReason::Timeout);
        assert!(handle.token().is_cancelled());
    }
}
