//! A resumable watch of one job: the logged transitions after the client's version, then the
//! current snapshot, then every change as it happens, until the terminal one. Built on the
//! hub's coalescing channel plus the store's transition log, so a slow reader costs constant
//! memory and still never misses a state transition.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{Hub, Subscription};
use crate::{
    job::{Job, JobId},
    store::{Store, StoreError},
};

/// Why a watch cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// No such job (never existed, or already removed).
    #[error("job {0} not found")]
    NotFound(JobId),
    /// The client asked to resume after a version the job has not reached (nor could have
    /// shown: see [`Job::may_have_shown`]).
    #[error("job {id} is at version {current}; cannot resume after version {requested}")]
    FutureVersion {
        /// The job.
        id: JobId,
        /// The version asked for.
        requested: i64,
        /// The job's current version.
        current: i64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One open watch. Yields snapshots with strictly rising versions and ends after a terminal one.
pub struct JobWatch {
    store: Arc<dyn Store>,
    subscription: Subscription,
    id: JobId,
    last_sent: i64,
    /// The channel's publish count as of the newest snapshot this watch knows of; see
    /// [`JobWatch::fill`].
    publishes_seen: u64,
    pending: VecDeque<Arc<Job>>,
    done: bool,
    /// See [`JobWatch::pace_progress`].
    progress_interval: Duration,
    /// When the last snapshot was yielded, while progress is paced.
    yielded_at: Option<Instant>,
}

impl JobWatch {
    /// Opens a watch of job `id` that resumes after `after_version` (0: from now).
    ///
    /// `in_memory` is asked, once subscribed, for the job's newest snapshot held in memory
    /// (see `Executor::newest_in_memory`); the store is read only when it has none, or one
    /// older than `after_version`.
    pub async fn open(
        store: Arc<dyn Store>,
        hub: &Arc<Hub>,
        id: JobId,
        after_version: i64,
        in_memory: impl FnOnce() -> Option<Arc<Job>>,
    ) -> Result<Self, WatchError> {
        // Subscribe before reading, so a change in between is seen by one or the other.
        let subscription = hub.subscribe(id);
        // Every publish counted here was of a change committed before the read below, so
        // `current` covers it: only publishes after this count can bring anything newer.
        let publishes_seen = subscription.publishes();
        let (current, known_newest) = newest(&store, hub, id, after_version, in_memory).await?;
        // A version ahead of the store's that only unstored progress can explain is honoured:
        // the watch goes on from it, and the next snapshot it yields is newer. Not when this
        // process holds the job's newest version: nothing was shown beyond that.
        let ahead = current.version < after_version;
        if ahead && (known_newest || !current.may_have_shown(after_version)) {
            return Err(WatchError::FutureVersion {
                id,
                requested: after_version,
                current: current.version,
            });
        }
        let mut pending = VecDeque::new();
        if after_version > 0 {
            pending.extend(
                store
                    .transitions(id, after_version)
                    .await?
                    .into_iter()
                    .filter(|job| job.version < current.version)
                    .map(Arc::new),
            );
        }
        let done = current.version == after_version && current.is_terminal();
        if current.version > after_version {
            pending.push_back(current);
        }
        Ok(Self {
            store,
            subscription,
            id,
            last_sent: after_version,
            publishes_seen,
            pending,
            done,
            progress_interval: Duration::ZERO,
            yielded_at: None,
        })
    }

    /// Yields progress-only changes at most once per `interval` after the last snapshot,
    /// coalesced to the newest; state changes (and the progress they carry) are never held
    /// back. A client reads from a buffer that HTTP/2 flow control lets the server fill (up to
    /// the client's window, megabytes once grown): a reader slower than the reports would
    /// otherwise read a backlog of old progress, and the job's end behind it.
    pub fn pace_progress(mut self, interval: Duration) -> Self {
        self.progress_interval = interval;
        self
    }

    /// The next snapshot, or `None` once the terminal one has been yielded. Fails with
    /// [`WatchError::FutureVersion`] when the job ends at or below the version the watch
    /// resumed after: a version nobody was shown, taken on trust at the start.
    pub async fn next(&mut self) -> Option<Result<Arc<Job>, WatchError>> {
        if self.pending.is_empty()
            && !self.done
            && let Err(error) = self.fill().await
        {
            self.done = true;
            return Some(Err(error));
        }
        let job = self.pending.pop_front()?;
        self.last_sent = job.version;
        if !self.progress_interval.is_zero() {
            self.yielded_at = Some(Instant::now());
        }
        if job.is_terminal() {
            self.done = true;
            self.pending.clear();
        }
        Some(Ok(job))
    }

    /// Waits for the next change; when versions were coalesced away and a logged transition
    /// may be among them, replays the log first.
    ///
    /// Versions also skip without anything lost: the executor commits several changes as one
    /// (a job's start with its first action's start), and nobody is told of the ones in
    /// between. Every logged change is published once committed, so when this watch has seen
    /// every publish (the count moved by exactly one) none can hide in the gap, and the log
    /// read is skipped.
    async fn fill(&mut self) -> Result<(), WatchError> {
        let (mut newest, mut publishes) =
            self.subscription.next_counted_or_end(self.last_sent).await;
        if let Some(not_before) = self
            .yielded_at
            .and_then(|at| at.checked_add(self.progress_interval))
        {
            // Progress only (no logged change since the last one yielded): held until the
            // interval is over, replaced by newer reports meanwhile, let through at once
            // when a state change comes.
            while newest.logged_version <= self.last_sent && Instant::now() < not_before {
                tokio::select! {
                    _ = tokio::time::sleep_until(not_before) => break,
                    (job, count) = self.subscription.next_counted_or_end(newest.version) => {
                        newest = job;
                        publishes = count;
                    }
                }
            }
        }
        if newest.version <= self.last_sent {
            return Err(WatchError::FutureVersion {
                id: self.id,
                requested: self.last_sent,
                current: newest.version,
            });
        }
        let missed_a_publish = publishes != self.publishes_seen + 1;
        self.publishes_seen = publishes;
        let skipped_some = newest.version > self.last_sent + 1;
        if skipped_some && missed_a_publish && newest.logged_version > self.last_sent {
            let missed = self.store.transitions(self.id, self.last_sent).await?;
            self.pending.extend(
                missed
                    .into_iter()
                    .filter(|job| job.version < newest.version)
                    .map(Arc::new),
            );
        }
        self.pending.push_back(newest);
        Ok(())
    }
}

/// The job's newest snapshot: the store's, or the hub's when it holds a newer one (progress
/// that was pushed but not written yet).
pub async fn current(store: &Arc<dyn Store>, hub: &Hub, id: JobId) -> Result<Job, WatchError> {
    let stored = store.get(id).await?.ok_or(WatchError::NotFound(id))?;
    Ok(newest_of(stored, hub))
}

/// `stored`, or the hub's snapshot of its job when that is newer (progress that was pushed
/// but not written yet).
pub fn newest_of(stored: Job, hub: &Hub) -> Job {
    match hub.latest(stored.id) {
        Some(live) if live.version > stored.version => Job::clone(&live),
        _ => stored,
    }
}

/// The job's newest snapshot once subscribed: the one held in memory if it is at least
/// `at_least`, else [`current`]; and whether it is known to be the newest version anyone was
/// shown (`in_memory` had the job).
async fn newest(
    store: &Arc<dyn Store>,
    hub: &Hub,
    id: JobId,
    at_least: i64,
    in_memory: impl FnOnce() -> Option<Arc<Job>>,
) -> Result<(Arc<Job>, bool), WatchError> {
    let held = in_memory();
    let known_newest = held.is_some();
    match held {
        Some(job) if job.version >= at_least => Ok((job, true)),
        // When held but older than asked for, the store cannot be newer than what this
        // process holds: it is read to tell a removed job from one that is not.
        _ => Ok((Arc::new(current(store, hub, id).await?), known_newest)),
    }
}

/// Waits until job `id` is terminal or `until` passes; returns the job as it is then, and
/// whether it is terminal. `in_memory` as for [`JobWatch::open`].
pub async fn wait_terminal(
    store: &Arc<dyn Store>,
    hub: &Arc<Hub>,
    id: JobId,
    until: Option<Instant>,
    in_memory: impl FnOnce() -> Option<Arc<Job>>,
) -> Result<(Arc<Job>, bool), WatchError> {
    wait_until(store, hub, id, until, in_memory, Job::is_terminal).await
}

/// Waits until a snapshot of job `id` satisfies `done` or `until` passes; returns the job as
/// it is then, and whether it satisfies `done`. `in_memory` as for [`JobWatch::open`].
pub async fn wait_until(
    store: &Arc<dyn Store>,
    hub: &Arc<Hub>,
    id: JobId,
    until: Option<Instant>,
    in_memory: impl FnOnce() -> Option<Arc<Job>>,
    done: impl Fn(&Job) -> bool,
) -> Result<(Arc<Job>, bool), WatchError> {
    let mut subscription = hub.subscribe(id);
    let (mut job, _) = newest(store, hub, id, 0, in_memory).await?;
    let deadline = async {
        match until {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    while !done(&job) {
        tokio::select! {
            next = subscription.next_after(job.version) => job = next,
            _ = &mut deadline => return Ok((job, false)),
        }
    }
    Ok((job, true))
}
