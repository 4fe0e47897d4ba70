//! Per-job watch channels: every published snapshot reaches the watchers of that job only.
//!
//! Each watched job has one `tokio::sync::watch` channel holding its newest snapshot, so a
//! watcher that falls behind simply sees the newest state when it next looks: progress is
//! coalesced, memory per watcher is constant and the publisher never waits. State transitions
//! a slow watcher would otherwise skip are replayed from the store's transition log (see
//! [`Job::logged_version`]), so nothing that matters is lost. A job nobody watches has no
//! channel, and publishing to it costs one hash lookup.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

mod selector;
mod watch_job;
mod watch_jobs;
pub use selector::{INBOX_LIMIT, JobsSubscription, Pending, Taken};
pub use watch_job::{JobWatch, WatchError, current, newest_of, wait_terminal, wait_until};
pub use watch_jobs::{Cursor, JobsEvent, JobsWatch, WatchJobsError};

use crate::job::{Job, JobId, JobState};

/// The newest snapshot of a job, shared by its watchers; `None` until the first publish after
/// the channel was opened.
pub type Snapshot = Option<Arc<Job>>;

/// What a job's channel holds: the newest snapshot, and how many publishes the channel has
/// seen (also those it ignored as older). A watcher that knows the count it last saw can tell
/// whether it missed a publish: when it did not, no logged transition can hide between two
/// versions it saw, and it need not read the log.
#[derive(Clone, Default)]
struct Slot {
    job: Snapshot,
    publishes: u64,
    /// When `job` was published, on the hub's clock (see [`LiveMark`]).
    published_at: u64,
}

/// A moment on one hub's clock: which hub (`epoch`, drawn at random when the hub is made, so a
/// restarted process never reads another's marks as its own) and nanoseconds since it was
/// made. A `WatchJobs` message carries the mark of when it was queued: a snapshot this hub
/// published after that mark did not reach the stream through the hub in that message or an
/// earlier one. (It may have through the store: a transition read from the log before it was
/// published, which the stream checks against the log, or, on a shared store, a snapshot
/// another replica wrote, which is why marks are only used on a store no one else writes.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveMark {
    /// The hub the mark is from.
    pub epoch: u64,
    /// Nanoseconds since that hub was made.
    pub at: u64,
}

const SHARDS: usize = 32;

/// How many of the newest ended jobs the hub remembers (see [`Hub::latest`]).
const RECENTLY_ENDED: usize = 1024;

/// The snapshots of the jobs that ended last, oldest first out.
#[derive(Default)]
struct RecentlyEnded {
    order: VecDeque<JobId>,
    jobs: HashMap<JobId, Arc<Job>>,
}

impl RecentlyEnded {
    fn insert(&mut self, job: Arc<Job>) {
        let id = job.id;
        if self.jobs.insert(id, job).is_none() {
            self.order.push_back(id);
            // `order` may also hold ids forgotten since: it stays bounded all the same, and
            // evicting one of those only drops a cache entry early.
            while self.order.len() > RECENTLY_ENDED {
                if let Some(old) = self.order.pop_front() {
                    self.jobs.remove(&old);
                }
            }
        }
    }
}

type Shard = Mutex<HashMap<JobId, watch::Sender<Slot>>>;

/// The registry of per-job channels, sharded so that unrelated jobs rarely share a lock.
pub struct Hub {
    shards: Box<[Shard]>,
    hasher: RandomState,
    /// `WatchJobs` subscribers, offered each published snapshot their labels match.
    selectors: selector::Selectors,
    /// Woken when a transition of a job with a webhook is published: the store may have
    /// written a delivery with it (see [`Hub::webhook_wake`]).
    webhook_wake: tokio::sync::Notify,
    /// A watch or wait opened right after its job ended (the usual case for quick jobs)
    /// starts from here instead of reading the store. An ended job changes only by being
    /// removed, which the remover tells the hub ([`Hub::forget`], [`Hub::forget_ended`]).
    recently_ended: Mutex<RecentlyEnded>,
    /// See [`LiveMark`].
    epoch: u64,
    clock_base: std::time::Instant,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            epoch: RandomState::new().hash_one(std::process::id()),
            clock_base: std::time::Instant::now(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            selectors: selector::Selectors::default(),
            webhook_wake: tokio::sync::Notify::new(),
            recently_ended: Mutex::default(),
        }
    }
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn shard(&self, id: &JobId) -> std::sync::MutexGuard<'_, HashMap<JobId, watch::Sender<Slot>>> {
        let index = (self.hasher.hash_one(id) as usize) % self.shards.len();
        // Every critical section is a single map operation that cannot leave the map
        // inconsistent, so a poisoned lock is still safe to use.
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells every watcher of the job about this snapshot. Older versions than the one the
    /// channel holds are ignored, so publishers racing each other never move watchers back.
    ///
    /// The newest snapshot of a RUNNING job is kept even while nobody watches: progress is
    /// not written to the store at every update, so this is where a watch or a status call
    /// opened later finds it. That is at most one snapshot per worker; once the job stops
    /// running, its channel is freed when its watchers are gone.
    ///
    /// Returns a snapshot of the job the channel does not hold (the one this replaced, or
    /// `job` itself when it is not kept), for its owner to refill (`Job::refresh_from`) once
    /// nobody else holds it either; it is dropped after the channel's lock is released.
    pub fn publish(&self, job: Arc<Job>) -> Snapshot {
        // Read before anyone can be offered the snapshot: see `LiveMark`.
        let published_at = self.clock();
        if job.webhook.is_some() && job.logged_version == job.version {
            self.webhook_wake.notify_one();
        }
        self.selectors.publish(&job);
        if job.is_terminal() {
            self.ended().insert(Arc::clone(&job));
        }
        let mut shard = self.shard(&job.id);
        let id = job.id;
        let running = job.state == JobState::Running;
        match shard.get(&id) {
            Some(sender) => {
                let mut unheld = None;
                sender.send_if_modified(|slot| {
                    slot.publishes += 1;
                    match &slot.job {
                        // Counted all the same, so watchers see that a publish went by.
                        Some(held) if held.version >= job.version => {
                            unheld = Some(job);
                            false
                        }
                        _ => {
                            unheld = slot.job.replace(job);
                            slot.published_at = published_at;
                            true
                        }
                    }
                });
                if !running && sender.receiver_count() == 0 {
                    shard.remove(&id);
                }
                unheld
            }
            None if running => {
                let slot = Slot {
                    job: Some(job),
                    publishes: 1,
                    published_at,
                };
                shard.insert(id, watch::channel(slot).0);
                None
            }
            None => Some(job),
        }
    }

    /// Nanoseconds since the hub was made.
    fn clock(&self) -> u64 {
        u64::try_from(self.clock_base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Now, on this hub's clock.
    pub fn mark(&self) -> LiveMark {
        LiveMark {
            epoch: self.epoch,
            at: self.clock(),
        }
    }

    /// The newest snapshot of each unfinished job that this hub keeps one of (running or
    /// watched) and that was published after `mark`; nothing when `mark` is another hub's.
    pub fn unfinished_published_after(&self, mark: LiveMark) -> Vec<Arc<Job>> {
        if mark.epoch != self.epoch {
            return Vec::new();
        }
        let mut newer = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for sender in shard.values() {
                let slot = sender.borrow();
                if let Some(job) = &slot.job
                    && slot.published_at > mark.at
                    && !job.is_terminal()
                {
                    newer.push(Arc::clone(job));
                }
            }
        }
        newer
    }

    /// Notified (one stored permit, never lost) whenever a published snapshot is a transition
    /// of a job with a webhook: the webhook worker waits on it, so a delivery written with a
    /// state goes out as soon as that state is published, without polling.
    pub fn webhook_wake(&self) -> &tokio::sync::Notify {
        &self.webhook_wake
    }

    /// The newest published snapshot of a running (or watched) job, or of one of the jobs
    /// that ended last, if any.
    pub fn latest(&self, id: JobId) -> Snapshot {
        self.shard(&id)
            .get(&id)
            .and_then(|sender| sender.borrow().job.clone())
            .or_else(|| self.ended().jobs.get(&id).cloned())
    }

    /// `job` as read from the store, or the newest published snapshot of it when that is
    /// newer only by progress (the same logged transition). Progress is written to the store
    /// only now and then, so a listing read from it would otherwise show progress older than
    /// what GetStatus and watchers see.
    pub fn with_newest_progress(&self, job: Job) -> Arc<Job> {
        if job.state == JobState::Running
            && let Some(newest) = self.latest(job.id)
            && newest.version > job.version
            && newest.logged_version == job.logged_version
        {
            return newest;
        }
        Arc::new(job)
    }

    /// Forgets an ended job that was removed from the store.
    pub fn forget(&self, id: JobId) {
        self.ended().jobs.remove(&id);
    }

    /// Forgets every ended job remembered: some were removed from the store (by retention).
    pub fn forget_ended(&self) {
        let mut ended = self.ended();
        ended.jobs.clear();
        ended.order.clear();
    }

    fn ended(&self) -> std::sync::MutexGuard<'_, RecentlyEnded> {
        // Each critical section is one map operation: a poisoned lock is still consistent.
        self.recently_ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a subscription to the job's changes. Subscribe first, then read the store: a
    /// change made in between is then seen by at least one of the two.
    pub fn subscribe(self: &Arc<Self>, id: JobId) -> Subscription {
        let receiver = {
            let mut shard = self.shard(&id);
            shard
                .entry(id)
                .or_insert_with(|| watch::channel(Slot::default()).0)
                .subscribe()
        };
        Subscription {
            hub: Arc::clone(self),
            id,
            receiver: Some(receiver),
        }
    }

    /// Opens a subscription to every job of `tenant` (of any tenant when `None`) carrying all
    /// of `labels` (every such job when empty).
    /// Subscribe first, then read the store, as with [`Hub::subscribe`].
    pub fn subscribe_jobs(
        self: &Arc<Self>,
        tenant: Option<String>,
        labels: BTreeMap<String, String>,
    ) -> JobsSubscription {
        JobsSubscription::open(self, tenant, labels)
    }

    /// How many jobs have an open channel (watched, or running).
    pub fn watched_jobs(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    fn release(&self, id: JobId, receiver: watch::Receiver<Slot>) {
        let mut shard = self.shard(&id);
        drop(receiver);
        // A running job's newest snapshot stays for later readers; see `publish`.
        let unused = shard.get(&id).is_some_and(|sender| {
            sender.receiver_count() == 0
                && sender
                    .borrow()
                    .job
                    .as_ref()
                    .is_none_or(|job| job.state != JobState::Running)
        });
        if unused {
            shard.remove(&id);
        }
    }
}

/// One watcher's view of one job's changes; closing it (dropping) frees the job's channel
/// once no one else watches.
pub struct Subscription {
    hub: Arc<Hub>,
    id: JobId,
    receiver: Option<watch::Receiver<Slot>>,
}

impl Subscription {
    /// Waits for a snapshot newer than `after_version` and returns it: the newest one, with any
    /// in-between progress coalesced away.
    pub async fn next_after(&mut self, after_version: i64) -> Arc<Job> {
        self.next_counted(after_version).await.0
    }

    /// [`Subscription::next_after`], with the channel's publish count at that snapshot.
    pub async fn next_counted(&mut self, after_version: i64) -> (Arc<Job>, u64) {
        self.next_matching(after_version, false).await
    }

    /// [`Subscription::next_counted`], that also returns a terminal snapshot no newer than
    /// `after_version`: a job that ended will never get past it, and waiting for that would
    /// be waiting for ever.
    pub async fn next_counted_or_end(&mut self, after_version: i64) -> (Arc<Job>, u64) {
        self.next_matching(after_version, true).await
    }

    async fn next_matching(&mut self, after_version: i64, or_end: bool) -> (Arc<Job>, u64) {
        let Some(receiver) = self.receiver.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            {
                let slot = receiver.borrow_and_update();
                if let Some(job) = slot.job.as_ref()
                    && (job.version > after_version || (or_end && job.is_terminal()))
                {
                    return (Arc::clone(job), slot.publishes);
                }
            }
            // The hub owns the sender for as long as this subscription exists, so `changed`
            // only fails if the hub itself is gone; then nothing will ever change again.
            if receiver.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The newest snapshot seen on the channel, if any was published since it opened.
    pub fn latest(&self) -> Snapshot {
        self.receiver.as_ref().and_then(|r| r.borrow().job.clone())
    }

    /// How many publishes the channel has seen so far.
    pub fn publishes(&self) -> u64 {
        self.receiver.as_ref().map_or(0, |r| r.borrow().publishes)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(receiver) = self.receiver.take() {
            self.hub.release(self.id, receiver);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::sample_job;
    use std::time::{Duration, SystemTime};

    #[test]
    fn the_jobs_that_ended_last_are_remembered_until_removed() {
        let hub = Hub::new();
        let now = SystemTime::now();
        let ended = |_| {
            let mut job = sample_job(1, &[], None);
            job.cancel(
                crate::job::JobError::new("CANCELLED", "CANCELLED", "x"),
                now,
            )
            .unwrap();
            Arc::new(job)
        };
        let first = ended(0);
        hub.publish(Arc::clone(&first));
        assert_eq!(
            hub.latest(first.id),
            Some(Arc::clone(&first)),
            "no channel needed"
        );
        hub.forget(first.id);
        assert_eq!(hub.latest(first.id), None, "removed from the store");

        let jobs: Vec<Arc<Job>> = (0..RECENTLY_ENDED + 5).map(ended).collect();
        for job in &jobs {
            hub.publish(Arc::clone(job));
        }
        assert_eq!(hub.latest(jobs[0].id), None, "the oldest fell out");
        assert!(hub.latest(jobs[RECENTLY_ENDED + 4].id).is_some());
        assert!(hub.ended().jobs.len() <= RECENTLY_ENDED);
        hub.forget_ended();
        assert_eq!(
            hub.latest(jobs[RECENTLY_ENDED + 4].id),
            None,
            "retention ran"
        );

        let queued = Arc::new(sample_job(1, &[], None));
        hub.publish(Arc::clone(&queued));
        assert_eq!(
            hub.latest(queued.id),
            None,
            "only ended jobs are remembered"
        );
    }

    #[tokio::test]
    async fn watcher_gets_newest_snapshot_and_skips_older_ones() {
        let hub = Hub::new();
        let mut job = sample_job(1, &[], None);
        let mut sub = hub.subscribe(job.id);
        job.start(SystemTime::now()).unwrap();
        let v2 = Arc::new(job.clone());
        job.start_action(0, SystemTime::now()).unwrap();
        let v3 = Arc::new(job.clone());
        hub.publish(Arc::clone(&v3));
        hub.publish(v2);
        assert_eq!(sub.next_after(1).await.version, 3, "older publish ignored");
        let waiting = tokio::time::timeout(Duration::from_millis(20), sub.next_after(3)).await;
        assert!(waiting.is_err(), "nothing newer yet");
    }

    #[tokio::test]
    async fn running_and_ended_jobs_keep_their_newest_snapshot_and_queued_ones_nothing() {
        let hub = Hub::new();
        let mut job = sample_job(1, &[], None);
        hub.publish(Arc::new(job.clone()));
        assert!(hub.latest(job.id).is_none(), "queued jobs are not kept");
        job.start(SystemTime::now()).unwrap();
        hub.publish(Arc::new(job.clone()));
        assert_eq!(hub.latest(job.id).unwrap().version, job.version);
        job.cancel(crate::job::JobError::default(), SystemTime::now())
            .unwrap();
        hub.publish(Arc::new(job.clone()));
        assert_eq!(hub.watched_jobs(), 0, "the channel goes with the run");
        assert_eq!(
            hub.latest(job.id).map(|j| j.state),
            Some(crate::job::JobState::Cancelled),
            "the ended snapshot is remembered (recently ended jobs)"
        );
    }

    #[test]
    fn a_stored_job_reads_with_the_newest_progress_but_never_a_newer_transition() {
        let hub = Hub::new();
        let now = SystemTime::now();
        let mut job = sample_job(1, &[], None);
        let queued = job.clone();
        job.start(now).unwrap();
        job.start_action(0, now).unwrap();
        let stored = job.clone();
        assert!(job.report_progress(0, crate::job::Progress::percent(40, ""), now));
        hub.publish(Arc::new(job.clone()));

        let listed = hub.with_newest_progress(stored.clone());
        assert_eq!(listed.version, job.version, "progress the store lacks");
        assert_eq!(listed.progress().percent, 40);
        assert_eq!(
            hub.with_newest_progress(job.clone()).version,
            job.version,
            "the stored copy when it is as new"
        );
        assert_eq!(
            hub.with_newest_progress(queued.clone()).version,
            queued.version,
            "only running jobs take progress"
        );

        // A newer transition is left to the store: a listing filtered on the stored state
        // must not show another one.
        job.cancel(crate::job::JobError::default(), now).unwrap();
        hub.publish(Arc::new(job.clone()));
        let listed = hub.with_newest_progress(stored.clone());
        assert_eq!(listed.state, JobState::Running);
        assert_eq!(listed.version, stored.version);
    }

    #[test]
    fn a_publish_hands_back_the_snapshot_the_channel_no_longer_holds() {
        let hub = Hub::new();
        let now = SystemTime::now();
        let mut job = sample_job(1, &[], None);
        let queued = Arc::new(job.clone());
        assert!(
            Arc::ptr_eq(&hub.publish(Arc::clone(&queued)).unwrap(), &queued),
            "no channel keeps a queued job nobody watches"
        );
        job.start(now).unwrap();
        job.start_action(0, now).unwrap();
        let first = Arc::new(job.clone());
        assert!(
            hub.publish(Arc::clone(&first)).is_none(),
            "kept, nothing replaced"
        );
        assert!(job.report_progress(0, crate::job::Progress::percent(10, ""), now));
        let second = Arc::new(job.clone());
        let unheld = hub.publish(Arc::clone(&second)).unwrap();
        assert!(Arc::ptr_eq(&unheld, &first), "the one it replaced");
        drop(unheld);
        let mut first = first;
        assert!(Arc::get_mut(&mut first).is_some(), "nobody else holds it");
        assert!(
            Arc::ptr_eq(&hub.publish(Arc::clone(&first)).unwrap(), &first),
            "an older snapshot is not kept"
        );
        assert_eq!(hub.latest(job.id).map(|j| j.version), Some(second.version));
    }

    #[tokio::test]
    async fn channels_are_freed_with_their_last_watcher() {
        let hub = Hub::new();
        let job = sample_job(1, &[], None);
        let first = hub.subscribe(job.id);
        let second = hub.subscribe(job.id);
        assert_eq!(hub.watched_jobs(), 1);
        drop(first);
        assert_eq!(hub.watched_jobs(), 1);
        drop(second);
        assert_eq!(hub.watched_jobs(), 0, "channel freed with its last watcher");
    }

    #[tokio::test]
    async fn other_jobs_do_not_wake_a_watcher() {
        let hub = Hub::new();
        let watched = sample_job(1, &[], None);
        let mut other = sample_job(1, &[], None);
        let mut sub = hub.subscribe(watched.id);
        let _other_sub = hub.subscribe(other.id);
        other.start(SystemTime::now()).unwrap();
        hub.publish(Arc::new(other));
        let waiting = tokio::time::timeout(Duration::from_millis(20), sub.next_after(0)).await;
        assert!(waiting.is_err());
        assert!(sub.latest().is_none());
    }

    /// A memory store holding a job that has started its first action, and a hub.
    async fn stored_running_job() -> (Arc<dyn crate::store::Store>, Arc<Hub>, Job) {
        let store: Arc<dyn crate::store::Store> = Arc::new(crate::store::MemoryStore::new());
        let now = SystemTime::now();
        let mut job = sample_job(1, &[], None);
        store.create(&job).await.unwrap();
        job.start(now).unwrap();
        job.start_action(0, now).unwrap();
        store.save(&job).await.unwrap();
        (store, Hub::new(), job)
    }

    /// A replica that read only an older snapshot of a running job (its newer progress was
    /// pushed by another replica, or before a restart, and not stored yet) takes a resume from
    /// a progress version it has not seen and goes on with newer snapshots only. A version no
    /// unstored progress can explain is still refused, and so is any version ahead of a job
    /// that is not running.
    #[tokio::test]
    async fn a_resume_from_unstored_progress_goes_on_and_one_beyond_it_is_refused() {
        use crate::job::{MAX_UNPERSISTED_VERSIONS, Progress};

        let (store, hub, mut job) = stored_running_job().await;
        let now = SystemTime::now();
        let stored = job.version;
        let open = |id, after| JobWatch::open(Arc::clone(&store), &hub, id, after, || None);

        let seen = stored + 40;
        let mut watch = open(job.id, seen)
            .await
            .expect("a version unstored progress explains");
        let mut step = 0;
        let mut progressed = |steps: i64| {
            for _ in 0..steps {
                step += 1;
                assert!(job.report_progress(0, Progress::of(step, 1_000, ""), now));
            }
            Arc::new(job.clone())
        };
        let older = progressed(20);
        let newer = progressed(21);
        assert_eq!(newer.version, seen + 1);
        hub.publish(older);
        hub.publish(Arc::clone(&newer));
        let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("the newer snapshot comes")
            .expect("not the end")
            .expect("no error");
        assert_eq!(next.version, newer.version, "nothing the client had seen");

        let beyond = open(newer.id, newer.version + MAX_UNPERSISTED_VERSIONS).await;
        assert!(
            matches!(beyond, Err(WatchError::FutureVersion { .. })),
            "beyond what unstored progress explains"
        );
        let waiting = sample_job(1, &[], None);
        store.create(&waiting).await.unwrap();
        let ahead = open(waiting.id, waiting.version + 1).await;
        assert!(
            matches!(ahead, Err(WatchError::FutureVersion { .. })),
            "a queued job has no unstored versions"
        );
    }

    /// A version taken on trust at the start (see the test above) that the job then ends
    /// below was never shown to anyone: the watch says so when the job ends, instead of
    /// waiting for ever for a version past it.
    #[tokio::test]
    async fn a_resume_from_a_version_the_job_ends_below_fails_at_its_end() {
        let (store, hub, mut job) = stored_running_job().await;
        let now = SystemTime::now();
        let claimed = job.version + 10;
        let mut watch = JobWatch::open(Arc::clone(&store), &hub, job.id, claimed, || None)
            .await
            .expect("taken on trust: unstored progress could explain it");
        job.cancel(
            crate::job::JobError::new("CANCELLED", "CANCELLED", "x"),
            now,
        )
        .unwrap();
        assert!(job.version < claimed);
        store.save(&job).await.unwrap();
        hub.publish(Arc::new(job.clone()));
        let end = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("the end is told, not waited past")
            .expect("an answer");
        match end {
            Err(WatchError::FutureVersion {
                requested, current, ..
            }) => {
                assert_eq!((requested, current), (claimed, job.version));
            }
            other => panic!("expected FutureVersion, got {other:?}"),
        }
    }

    /// Where this process holds the job's newest snapshot (it runs the job, see
    /// `Executor::newest_in_memory`), nobody was shown a version beyond it: one ahead is
    /// refused at once even while the job runs.
    #[tokio::test]
    async fn a_resume_ahead_of_the_snapshot_held_in_memory_is_refused() {
        let (store, hub, job) = stored_running_job().await;
        let held = Arc::new(job.clone());
        let open = |after| {
            let held = Arc::clone(&held);
            JobWatch::open(Arc::clone(&store), &hub, job.id, after, move || Some(held))
        };
        let ahead = open(job.version + 1).await;
        assert!(
            matches!(ahead, Err(WatchError::FutureVersion { .. })),
            "nothing was shown beyond the held snapshot"
        );
        let mut at = open(job.version).await.expect("its own version resumes");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), at.next())
                .await
                .is_err(),
            "nothing newer yet"
        );
    }
}
