//! A resumable watch of many jobs: every job carrying some labels, optionally only the
//! snapshots in some states.
//!
//! Logged transitions are always delivered from the store's global event log, in sequence
//! order, so the cursor a message carries (its event's number) means exactly "everything up to
//! here has been seen". Publishes from different jobs reach the hub in any order (each job's
//! owner publishes after its own commit), so cursors taken from live publishes could run ahead
//! of a transition still on its way; reading the log instead cannot. The live inbox is used to
//! wake up and for progress, which is not logged and only needs to be the newest.
//!
//! Per job, the stream remembers the newest version delivered, so versions only rise and
//! nothing is delivered twice, whether it came from the initial snapshot, the log or the inbox.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;

use super::{Hub, JobsSubscription, LiveMark};
use crate::{
    job::{Job, JobId, JobState},
    store::{EventPage, Store, StoreError},
};

/// Events read from the store at a time: bounds the memory a far-behind resume takes.
const EVENT_PAGE: usize = 256;

/// Why a watch cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WatchJobsError {
    /// Events after the cursor were removed (retention or DeleteJob of some job, which may
    /// or may not have matched): resuming would silently miss them.
    #[error(
        "events up to {removed_through} were removed with their jobs; cannot resume after \
         {after}: watch again without a cursor"
    )]
    HistoryGone {
        /// The cursor asked for.
        after: i64,
        /// The highest event removed.
        removed_through: i64,
    },
    /// The cursor is ahead of every event this store has numbered.
    #[error("the newest event is {head}; cannot resume after {after}")]
    FutureCursor {
        /// The cursor asked for.
        after: i64,
        /// The newest event.
        head: i64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a stream stands, to resume after: see [`JobsWatch::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// Every logged change up to this event has been delivered.
    After(i64),
    /// The stream is still sending its first snapshots (in job id order): every logged change
    /// up to `seq` has been delivered, and the snapshot of every job unfinished then with an
    /// id up to `through`; the rest are still to come. A resume sends the changes after `seq`
    /// of the jobs the client has, then the current snapshots of the rest.
    Snapshots {
        /// The newest event delivered.
        seq: i64,
        /// The last job whose first snapshot was delivered.
        through: JobId,
    },
}

/// One message of the stream.
#[derive(Debug, Clone)]
pub struct JobsEvent {
    /// The snapshot.
    pub job: Arc<Job>,
    /// The position to resume after, to see everything that follows this message.
    pub cursor: Cursor,
    /// When the message was queued: passed back with the cursor, it lets a resume on the
    /// same process send the progress published since (see [`JobsWatch::open`]).
    pub mark: LiveMark,
}

/// First snapshots not sent yet: of the jobs unfinished at event `at` with ids after the
/// client's last one. They go out once every change up to `at` of the jobs the client has
/// is out, so that a cursor never runs ahead of what the client was sent.
struct PendingSnapshots {
    at: i64,
    jobs: Vec<Arc<Job>>,
    /// The last job whose first snapshot the client has, when it resumed during them.
    through: Option<JobId>,
}

/// One open `WatchJobs` stream.
pub struct JobsWatch {
    store: Arc<dyn Store>,
    subscription: JobsSubscription,
    /// Only this tenant's jobs (every tenant's when `None`).
    tenant: Option<String>,
    labels: BTreeMap<String, String>,
    /// Only deliver snapshots in these states; `None` for all (and an empty list for none).
    /// Applied at delivery only: the stream still follows every matching job, so it knows
    /// when each one ends.
    states: Option<Vec<JobState>>,
    /// Every event up to here has been read from the log.
    scanned: i64,
    /// The log may hold events after `scanned` that have not been read yet.
    behind: bool,
    /// Reads that reached the end of the log so far.
    caught_up_reads: u64,
    /// The newest version delivered (or passed over as older) of each job still followed.
    sent: HashMap<JobId, i64>,
    /// Jobs the last read ended; forgotten once the inbox cannot hold older snapshots of them.
    finished: Vec<JobId>,
    /// Inbox snapshots carrying a logged change not read from the log yet, each with the
    /// count of caught-up reads when it was taken.
    waiting: HashMap<JobId, (Arc<Job>, u64)>,
    queue: VecDeque<JobsEvent>,
    pending: Option<PendingSnapshots>,
    /// The inbox overflowed (the client fell far behind): until the log is read to its end,
    /// every change comes from there.
    lost_live: bool,
    /// Once the log is read to its end, the newest progress the hub holds of each followed
    /// job is due: after an overflow (the inbox dropped it), and after a resume (it was
    /// reported while the client was away; see [`JobsWatch::open`]).
    newest_progress_due: bool,
    /// The client's mark, on a resume on the hub that made it: progress published after it
    /// is due too, of any matching job, once the log is read to its end.
    progress_since: Option<LiveMark>,
    /// See [`JobsWatch::pace_progress`].
    progress_interval: Duration,
    /// When each followed job's last message was delivered, while progress is paced.
    delivered_at: HashMap<JobId, Instant>,
    /// Progress held back by the pacing, the newest of each job; and the same entries by when
    /// each is due.
    paced: HashMap<JobId, Paced>,
    paced_due: BTreeSet<(Instant, JobId)>,
}

/// A job's progress held back by the pacing. A message's mark is not lowered for it: a
/// resume from a message sent meanwhile would then send every job's progress published since,
/// the progress the client was sent among it (see `WatchJobsResponse.cursor`: held progress
/// is not resent, the job's next change carries it).
struct Paced {
    job: Arc<Job>,
    due: Instant,
}

impl JobsWatch {
    /// Opens a watch of the jobs of `tenant` (of any tenant when `None`) carrying every one
    /// of `labels`. Without `after`, it first yields the current snapshot of each matching
    /// unfinished job, in id order; after a [`Cursor::After`], every logged change after it;
    /// after a [`Cursor::Snapshots`] (the connection dropped during the first snapshots), the
    /// changes after it of the jobs the client has, then the current snapshots of the rest.
    /// Then live changes, whichever way it started.
    ///
    /// Progress is not logged. Once the replay is done, a resume also sends the newest
    /// progress of each job it replayed a transition of (reported after the client's cursor),
    /// and, when `mark` (the [`JobsEvent::mark`] of the client's last message) is this hub's,
    /// of each matching job whose progress was published after it: neither can be a repeat.
    /// Progress of a job with neither may be what the client saw last (a resume on another
    /// process cannot tell), and waits for the job's next change.
    pub async fn open(
        store: Arc<dyn Store>,
        hub: &Arc<Hub>,
        tenant: Option<String>,
        labels: BTreeMap<String, String>,
        states: Option<Vec<JobState>>,
        after: Option<Cursor>,
        mark: Option<LiveMark>,
    ) -> Result<Self, WatchJobsError> {
        // Subscribe before reading, so a change in between is seen by one or the other.
        let subscription = hub.subscribe_jobs(tenant.clone(), labels.clone());
        let mut watch = Self {
            store,
            subscription,
            tenant,
            labels,
            states,
            scanned: 0,
            behind: false,
            caught_up_reads: 0,
            sent: HashMap::new(),
            finished: Vec::new(),
            waiting: HashMap::new(),
            queue: VecDeque::new(),
            pending: None,
            lost_live: false,
            // Each job the replay delivers a transition of is followed from then on; any
            // progress on top of that transition was reported after the client's cursor, so
            // the client has not seen it.
            newest_progress_due: after.is_some(),
            progress_since: mark.filter(|_| after.is_some()),
            progress_interval: Duration::ZERO,
            delivered_at: HashMap::new(),
            paced: HashMap::new(),
            paced_due: BTreeSet::new(),
        };
        let (after, through) = match after {
            None => (None, None),
            Some(Cursor::After(seq)) => (Some(seq), None),
            Some(Cursor::Snapshots { seq, through }) => (Some(seq), Some(through)),
        };
        if after.is_none() || through.is_some() {
            let (head, mut jobs) = watch
                .store
                .unfinished_at(watch.tenant.as_deref(), &watch.labels)
                .await?;
            jobs.retain(|job| through.is_none_or(|through| job.id > through));
            jobs.sort_by_key(|job| job.id);
            let jobs: Vec<Arc<Job>> = jobs
                .into_iter()
                // Progress is not logged: the newest is as true at `head` as the stored.
                .map(|job| hub.with_newest_progress(job))
                .collect();
            for job in &jobs {
                // Their changes up to `head` are in these snapshots: the replay passes them
                // over, and later ones follow the snapshot.
                watch.sent.insert(job.id, job.version);
            }
            watch.pending = Some(PendingSnapshots {
                at: head,
                jobs,
                through,
            });
            if after.is_none() {
                watch.scanned = head;
                watch.flush_snapshots();
            }
        }
        if let Some(after) = after {
            let page = watch
                .store
                .events_after(after, watch.tenant.as_deref(), &watch.labels, EVENT_PAGE)
                .await?;
            if page.removed_through > after {
                return Err(WatchJobsError::HistoryGone {
                    after,
                    removed_through: page.removed_through,
                });
            }
            if page.scanned_to < after {
                return Err(WatchJobsError::FutureCursor {
                    after,
                    head: page.scanned_to,
                });
            }
            watch.scanned = after;
            watch.accept(page);
        }
        Ok(watch)
    }

    /// Delivers a job's progress-only changes at most once per `interval` after its last
    /// message, coalesced to the newest (see [`crate::events::JobWatch::pace_progress`]);
    /// state changes are never held back.
    pub fn pace_progress(mut self, interval: Duration) -> Self {
        self.progress_interval = interval;
        self
    }

    /// The cursor of a message delivered at event `seq`.
    fn cursor_at(&self, seq: i64) -> Cursor {
        match self.pending.as_ref().and_then(|pending| pending.through) {
            Some(through) => Cursor::Snapshots { seq, through },
            None => Cursor::After(seq),
        }
    }

    /// Sends the first snapshots still to come, once the replay has reached the event they
    /// were read at. Each message's cursor names its job: a resume from it sends the rest.
    fn flush_snapshots(&mut self) {
        let Some(pending) = self.pending.take_if(|p| p.at <= self.scanned) else {
            return;
        };
        for job in pending.jobs {
            if self
                .sent
                .get(&job.id)
                .is_some_and(|sent| *sent > job.version)
            {
                // A newer snapshot (live progress) went out already.
                continue;
            }
            let cursor = Cursor::Snapshots {
                seq: pending.at,
                through: job.id,
            };
            self.queue_if_wanted(job, cursor);
        }
    }

    /// The next message; waits for one as long as it takes. Fails with
    /// [`WatchJobsError::HistoryGone`] when the client fell so far behind that its inbox
    /// overflowed and changes it was not sent have been removed from the log meanwhile.
    pub async fn next(&mut self) -> Result<JobsEvent, WatchJobsError> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Ok(event);
            }
            if self.behind {
                let page = self
                    .store
                    .events_after(
                        self.scanned,
                        self.tenant.as_deref(),
                        &self.labels,
                        EVENT_PAGE,
                    )
                    .await?;
                if self.lost_live && page.removed_through > self.scanned {
                    // The inbox no longer holds the snapshot of a job removed with its
                    // events (it would have been this stream's only copy).
                    return Err(WatchJobsError::HistoryGone {
                        after: self.scanned,
                        removed_through: page.removed_through,
                    });
                }
                self.accept(page);
                if !self.behind {
                    self.lost_live = false;
                }
            } else if self.newest_progress_due {
                self.newest_progress_due = false;
                self.take_newest_progress();
            } else if let Some(&(due, _)) = self.paced_due.first() {
                tokio::select! {
                    _ = self.subscription.changed() => {}
                    _ = tokio::time::sleep_until(due) => {}
                }
            } else {
                self.subscription.changed().await;
            }
            // The inbox first: what is released is the newest then.
            self.settle().await?;
            self.release_paced();
        }
    }

    /// After an overflow or a resume: the newest snapshot the hub holds of each followed job,
    /// taken as if from the inbox, for the progress the log does not carry.
    fn take_newest_progress(&mut self) {
        let mut newest: Vec<Arc<Job>> = self
            .sent
            .keys()
            .filter_map(|&id| self.subscription.latest(id))
            .collect();
        if let Some(mark) = self.progress_since.take() {
            // Jobs the stream does not follow yet: `settle` checks, as for any snapshot, that
            // the log holds no transition of theirs the client has not been sent.
            newest.extend(self.subscription.unfinished_published_after(mark));
        }
        for job in newest {
            self.hold(job);
        }
    }

    /// Holds a snapshot from the inbox (or the hub) for [`JobsWatch::settle`], unless a newer
    /// one of its job is held already. One already delivered is passed over there.
    fn hold(&mut self, job: Arc<Job>) {
        let newer = self
            .waiting
            .get(&job.id)
            .is_none_or(|(held, _)| held.version < job.version);
        if newer {
            self.waiting.insert(job.id, (job, self.caught_up_reads));
        }
    }

    /// Queues a page of the log's events, skipping versions already delivered.
    fn accept(&mut self, page: EventPage) {
        self.behind = page.events.len() >= EVENT_PAGE;
        if !self.behind {
            self.caught_up_reads += 1;
        }
        for (seq, job) in page.events {
            if self.pending.as_ref().is_some_and(|p| p.at < seq) {
                self.scanned = seq - 1;
                self.flush_snapshots();
            }
            if job.is_terminal() {
                self.finished.push(job.id);
            }
            self.deliver(Arc::new(job), seq);
        }
        self.scanned = self.scanned.max(page.scanned_to);
        self.flush_snapshots();
    }

    /// Takes the inbox and delivers what the log does not cover: progress, and the newest
    /// snapshot of a job removed before its transitions could be read. A logged change the
    /// log has not shown yet waits for the next read.
    async fn settle(&mut self) -> Result<(), StoreError> {
        let taken = self.subscription.take();
        if taken.overflowed {
            self.lost_live = true;
            self.behind = true;
            self.newest_progress_due = true;
        }
        for job in taken.jobs.into_values() {
            self.hold(job);
        }
        for (id, (job, taken_at)) in std::mem::take(&mut self.waiting) {
            let sent = self.sent.get(&id).copied().unwrap_or(0);
            if job.version <= sent {
                continue;
            }
            if job.logged_version <= sent {
                self.deliver_progress(job);
            } else if taken_at == self.caught_up_reads {
                // Committed before it was published, so the next read that reaches the end of
                // the log returns it.
                self.waiting.insert(id, (job, taken_at));
                self.behind = true;
            } else {
                // A read reached the end of the log after this was taken and did not return
                // it: its event lies at or before where this stream started (the client has
                // it), or its job has been removed since. Only an ended job can be removed,
                // and its end is published after its last unfinished snapshot, so the store
                // is asked about terminal snapshots only: a resume that picks up the progress
                // of thousands of running jobs costs no read for each.
                let removed = job.is_terminal() && self.store.get(id).await?.is_none();
                if removed {
                    self.deliver(Arc::clone(&job), self.scanned);
                    self.forget(id);
                } else {
                    self.sent.insert(id, job.logged_version);
                    if job.version > job.logged_version {
                        self.deliver(job, self.scanned);
                    }
                }
            }
        }
        // Any older snapshot of a job the last read ended was published before that read, so
        // it was in this take and has been passed over: the job can be forgotten.
        for id in std::mem::take(&mut self.finished) {
            if !self.waiting.contains_key(&id) {
                self.forget(id);
            }
        }
        Ok(())
    }

    /// Stops following a job that ended: what is held of it goes too.
    fn forget(&mut self, id: JobId) {
        self.sent.remove(&id);
        self.delivered_at.remove(&id);
        self.unpace(id);
    }

    /// Drops what is held of job `id`, if anything.
    fn unpace(&mut self, id: JobId) -> Option<Arc<Job>> {
        let paced = self.paced.remove(&id)?;
        self.paced_due.remove(&(paced.due, id));
        Some(paced.job)
    }

    /// Delivers a progress-only snapshot now, or holds it until its job's interval is over
    /// (replacing an older one held; due when the newer interval says).
    fn deliver_progress(&mut self, job: Arc<Job>) {
        let due = self
            .delivered_at
            .get(&job.id)
            .and_then(|at| at.checked_add(self.progress_interval))
            .filter(|due| *due > Instant::now());
        let Some(due) = due else {
            self.unpace(job.id);
            self.deliver(job, self.scanned);
            return;
        };
        self.unpace(job.id);
        self.paced_due.insert((due, job.id));
        self.paced.insert(job.id, Paced { job, due });
    }

    /// Delivers the held progress whose interval is over (unless its job has moved on).
    fn release_paced(&mut self) {
        let now = Instant::now();
        while let Some(&(due, id)) = self.paced_due.first()
            && due <= now
        {
            if let Some(job) = self.unpace(id)
                && self.sent.contains_key(&id)
            {
                self.deliver(job, self.scanned);
            }
        }
    }

    /// Records `job` as delivered at event `seq` and queues it if its state is wanted.
    fn deliver(&mut self, job: Arc<Job>, seq: i64) {
        let sent = self.sent.entry(job.id).or_insert(0);
        if job.version <= *sent {
            return;
        }
        *sent = job.version;
        if !self.progress_interval.is_zero() {
            self.delivered_at.insert(job.id, Instant::now());
        }
        let cursor = self.cursor_at(seq);
        self.queue_if_wanted(job, cursor);
    }

    /// Queues `job` with `cursor`, marked now, if its state is wanted.
    fn queue_if_wanted(&mut self, job: Arc<Job>, cursor: Cursor) {
        if self
            .states
            .as_ref()
            .is_none_or(|states| states.contains(&job.state))
        {
            let mark = self.subscription.mark();
            self.queue.push_back(JobsEvent { job, cursor, mark });
        }
    }

    /// Jobs the stream follows now (memory it holds beyond the inbox).
    pub fn followed_jobs(&self) -> usize {
        self.sent.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{
        events::INBOX_LIMIT,
        job::Progress,
        store::{MemoryStore, conformance::sample_job},
    };

    /// A memory store, its hub, and a watch of every job opened on them.
    async fn watching_everything() -> (Arc<dyn Store>, Arc<Hub>, JobsWatch) {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let hub = Hub::new();
        let watch = JobsWatch::open(
            Arc::clone(&store),
            &hub,
            None,
            BTreeMap::new(),
            None,
            None,
            None,
        )
        .await
        .unwrap();
        (store, hub, watch)
    }

    /// Asserts that the watch yields nothing for a while.
    async fn assert_quiet(watch: &mut JobsWatch, why: &str) {
        let next = tokio::time::timeout(Duration::from_millis(100), watch.next()).await;
        assert!(next.is_err(), "{why}");
    }

    /// The watch's next message, bounded.
    async fn next_within(watch: &mut JobsWatch) -> JobsEvent {
        tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("a message")
            .unwrap()
    }

    /// Creates and publishes a queued job, as a Submit does.
    async fn created(store: &Arc<dyn Store>, hub: &Arc<Hub>) -> Job {
        let job = sample_job(1, &[], None);
        store.create(&job).await.unwrap();
        hub.publish(Arc::new(job.clone()));
        job
    }

    /// Starts `job` and its first action, stores and publishes it, as the executor does.
    async fn started(store: &Arc<dyn Store>, hub: &Arc<Hub>, job: &mut Job) {
        let now = SystemTime::now();
        job.start(now).unwrap();
        job.start_action(0, now).unwrap();
        store.save(job).await.unwrap();
        hub.publish(Arc::new(job.clone()));
    }

    /// Creates and publishes `count` queued jobs, as a Submit does; returns their ids.
    async fn create_queued(store: &Arc<dyn Store>, hub: &Arc<Hub>, count: usize) -> Vec<JobId> {
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            ids.push(created(store, hub).await.id);
        }
        ids
    }

    /// A stalled reader's inbox overflows: the stream still delivers every job's transitions
    /// (from the log) and the newest progress of a running one (from the hub), once each.
    #[tokio::test]
    async fn a_reader_whose_inbox_overflowed_still_gets_every_change_once() {
        let (store, hub, mut watch) = watching_everything().await;

        let now = SystemTime::now();
        let mut running = created(&store, &hub).await;
        started(&store, &hub, &mut running).await;
        let queued = create_queued(&store, &hub, INBOX_LIMIT + 10).await;
        // Progress is published, not stored: only the hub has it.
        running.report_progress(0, Progress::of(1, 2, "half"), now);
        hub.publish(Arc::new(running.clone()));
        assert!(watch.subscription.overflowed(), "the inbox overflowed");

        let mut seen: HashMap<JobId, Vec<i64>> = HashMap::new();
        while seen.len() < queued.len() + 1 || seen[&running.id].last() != Some(&running.version) {
            let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
                .await
                .expect("every change arrives")
                .unwrap();
            seen.entry(event.job.id)
                .or_default()
                .push(event.job.version);
        }
        for id in &queued {
            assert_eq!(seen[id], [1], "each queued job once");
        }
        let versions = &seen[&running.id];
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        assert_eq!(
            versions.last(),
            Some(&running.version),
            "its newest progress"
        );
        assert_quiet(&mut watch, "nothing more").await;
    }

    /// After an overflow, a job removed before the reader got to its events would be missed
    /// silently: the stream ends with HistoryGone instead, and the client watches again.
    #[tokio::test]
    async fn a_reader_whose_inbox_overflowed_is_told_when_history_it_missed_is_gone() {
        let (store, hub, mut watch) = watching_everything().await;
        let now = SystemTime::now();
        let mut gone = sample_job(1, &[], None);
        store.create(&gone).await.unwrap();
        gone.start(now).unwrap();
        gone.start_action(0, now).unwrap();
        gone.succeed_action(0, serde_json::json!(1), now).unwrap();
        gone.succeed(now).unwrap();
        store.save(&gone).await.unwrap();
        hub.publish(Arc::new(gone.clone()));
        create_queued(&store, &hub, INBOX_LIMIT + 1).await;
        assert!(watch.subscription.overflowed());
        store.delete(gone.id).await.unwrap();

        let error = loop {
            match tokio::time::timeout(Duration::from_secs(5), watch.next())
                .await
                .expect("the stream moves on")
            {
                Ok(event) => assert_ne!(event.job.id, gone.id, "its events were removed"),
                Err(error) => break error,
            }
        };
        assert!(
            matches!(error, WatchJobsError::HistoryGone { .. }),
            "{error}"
        );
    }
    /// A resume replays the transitions the client missed, then the newest progress on top of
    /// them, which the log does not hold; a job the client is up to date with is not sent
    /// again, though its progress is as unlogged.
    #[tokio::test]
    async fn a_resume_sends_the_progress_made_after_a_replayed_transition_and_repeats_nothing() {
        let (store, hub, mut first) = watching_everything().await;
        let now = SystemTime::now();

        let mut seen_through = created(&store, &hub).await;
        started(&store, &hub, &mut seen_through).await;
        seen_through.report_progress(0, Progress::of(1, 4, ""), now);
        hub.publish(Arc::new(seen_through.clone()));
        let mut missed = created(&store, &hub).await;
        let mut last = None;
        while last
            .as_ref()
            .is_none_or(|event: &JobsEvent| event.job.id != missed.id)
        {
            last = Some(next_within(&mut first).await);
        }
        let cursor = last.map(|event| event.cursor).unwrap();
        drop(first);

        started(&store, &hub, &mut missed).await;
        let started_at = missed.version;
        for step in 1..=3 {
            missed.report_progress(0, Progress::of(step, 4, ""), now);
            hub.publish(Arc::new(missed.clone()));
        }

        let mut resumed = JobsWatch::open(
            Arc::clone(&store),
            &hub,
            None,
            BTreeMap::new(),
            None,
            Some(cursor),
            // Without the mark: only what the replay shows to be new.
            None,
        )
        .await
        .unwrap();
        let replayed = next_within(&mut resumed).await;
        assert_eq!(
            (replayed.job.id, replayed.job.version),
            (missed.id, started_at)
        );
        let progress = next_within(&mut resumed).await;
        assert_eq!(
            (progress.job.id, progress.job.version),
            (missed.id, missed.version),
            "the newest progress since"
        );
        assert_quiet(&mut resumed, "nothing the client had").await;
    }

    /// With the mark of the client's last message, a resume on the same hub also sends the
    /// progress published since of jobs that had no transition meanwhile; progress the client
    /// was sent is not sent again, and a mark from another hub (a restarted server) is no
    /// help, only no harm.
    #[tokio::test]
    async fn a_resume_with_the_mark_sends_progress_published_since_and_nothing_seen() {
        let (store, hub, mut first) = watching_everything().await;
        let now = SystemTime::now();
        let running = |progress: u64| {
            let mut job = sample_job(1, &[], None);
            job.start(now).unwrap();
            job.start_action(0, now).unwrap();
            if progress > 0 {
                job.report_progress(0, Progress::of(progress, 10, ""), now);
            }
            job
        };
        // `quiet` makes no change after the client's cursor.
        let quiet = running(1);
        let mut busy = running(1);
        for job in [&quiet, &busy] {
            store.create(job).await.unwrap();
            hub.publish(Arc::new(job.clone()));
        }
        // The client's last message: both jobs' first progress, seen.
        let mut last = None;
        for _ in 0..2 {
            last = Some(next_within(&mut first).await);
        }
        let last = last.unwrap();
        drop(first);
        busy.report_progress(0, Progress::of(5, 10, ""), now);
        hub.publish(Arc::new(busy.clone()));

        let resume = |mark| {
            JobsWatch::open(
                Arc::clone(&store),
                &hub,
                None,
                BTreeMap::new(),
                None,
                Some(last.cursor),
                mark,
            )
        };
        let mut resumed = resume(Some(last.mark)).await.unwrap();
        let progress = next_within(&mut resumed).await;
        assert_eq!(
            (progress.job.id, progress.job.version),
            (busy.id, busy.version),
            "the progress published since"
        );
        assert_quiet(&mut resumed, "nothing the client had").await;

        let elsewhere = LiveMark {
            epoch: last.mark.epoch.wrapping_add(1),
            ..last.mark
        };
        for mark in [None, Some(elsewhere)] {
            let mut resumed = resume(mark).await.unwrap();
            assert_quiet(
                &mut resumed,
                &format!("without this hub's mark, no way to tell what the client saw: {mark:?}"),
            )
            .await;
        }
    }

    /// Paced: a job's progress reports within the interval after its last message are held
    /// and the newest goes out once it is over; a state change goes out at once. A message
    /// sent while progress is held carries a mark from before that progress was published,
    /// so a resume from it sends the progress still held.
    #[tokio::test]
    async fn paced_progress_goes_out_newest_after_the_interval_and_state_changes_at_once() {
        let (store, hub, watch) = watching_everything().await;
        let mut watch = watch.pace_progress(Duration::from_millis(300));
        let now = SystemTime::now();
        let mut reporting = created(&store, &hub).await;
        let mut other = created(&store, &hub).await;
        for _ in 0..2 {
            next_within(&mut watch).await;
        }
        started(&store, &hub, &mut reporting).await;
        assert_eq!(next_within(&mut watch).await.job.state, JobState::Running);
        for step in 1..=3 {
            reporting.report_progress(0, Progress::of(step, 10, ""), now);
            hub.publish(Arc::new(reporting.clone()));
        }
        assert_quiet(&mut watch, "progress held within the interval").await;
        // Another job's state change goes out at once.
        started(&store, &hub, &mut other).await;
        let change = next_within(&mut watch).await;
        assert_eq!(
            (change.job.id, change.job.state),
            (other.id, JobState::Running)
        );
        let progress = next_within(&mut watch).await;
        assert_eq!(
            (progress.job.id, progress.job.version),
            (reporting.id, reporting.version),
            "the newest report, once"
        );
        // Within the interval again: a state change is not held back.
        reporting.report_progress(0, Progress::of(4, 10, ""), now);
        hub.publish(Arc::new(reporting.clone()));
        reporting
            .succeed_action(0, serde_json::Value::Null, now)
            .unwrap();
        store.save(&reporting).await.unwrap();
        hub.publish(Arc::new(reporting.clone()));
        let change = tokio::time::timeout(Duration::from_millis(200), watch.next())
            .await
            .expect("at once")
            .unwrap();
        assert_eq!(change.job.version, reporting.version);
        assert_quiet(&mut watch, "the older progress is never sent after it").await;
    }

    /// A message sent while another job's progress is held back: a resume from it sends
    /// nothing the client was sent (the held progress waits for its job's next change, as
    /// `WatchJobsResponse.cursor` says).
    #[tokio::test]
    async fn a_resume_from_a_message_sent_while_progress_was_held_repeats_nothing() {
        let (store, hub, watch) = watching_everything().await;
        let mut watch = watch.pace_progress(Duration::from_millis(300));
        let now = SystemTime::now();
        let mut held = created(&store, &hub).await;
        let mut sent = created(&store, &hub).await;
        for _ in 0..2 {
            next_within(&mut watch).await;
        }
        started(&store, &hub, &mut held).await;
        started(&store, &hub, &mut sent).await;
        for _ in 0..2 {
            next_within(&mut watch).await;
        }
        tokio::time::sleep(Duration::from_millis(350)).await;
        held.report_progress(0, Progress::of(1, 10, ""), now);
        hub.publish(Arc::new(held.clone()));
        assert_eq!(next_within(&mut watch).await.job.version, held.version);
        held.report_progress(0, Progress::of(2, 10, ""), now);
        hub.publish(Arc::new(held.clone()));
        assert_quiet(&mut watch, "the second report is held").await;
        sent.report_progress(0, Progress::of(1, 10, ""), now);
        hub.publish(Arc::new(sent.clone()));
        let last = next_within(&mut watch).await;
        assert_eq!(
            (last.job.id, last.job.version),
            (sent.id, sent.version),
            "sent at once while the other job's progress is held"
        );
        drop(watch);

        let mut resumed = JobsWatch::open(
            Arc::clone(&store),
            &hub,
            None,
            BTreeMap::new(),
            None,
            Some(last.cursor),
            Some(last.mark),
        )
        .await
        .unwrap();
        assert_quiet(&mut resumed, "the client has the last message's snapshot").await;
    }

    /// A transition can reach a stream from the log before its publish reaches the hub; then
    /// its publish is stamped after the client's mark. A resume with that mark must not send
    /// it again: the log shows it lies at or before the cursor.
    #[tokio::test]
    async fn a_transition_read_from_the_log_before_its_publish_is_not_sent_again() {
        let (store, hub, mut first) = watching_everything().await;
        let now = SystemTime::now();
        let mut early = created(&store, &hub).await;
        assert_eq!(next_within(&mut first).await.job.id, early.id);
        early.start(now).unwrap();
        early.start_action(0, now).unwrap();
        store.save(&early).await.unwrap(); // committed, not published yet
        created(&store, &hub).await; // wakes the stream to read the log
        let mut seen = Vec::new();
        for _ in 0..2 {
            seen.push(next_within(&mut first).await);
        }
        assert!(
            seen.iter()
                .any(|event| (event.job.id, event.job.version) == (early.id, early.version)),
            "read from the log"
        );
        let last = seen.pop().unwrap();
        drop(first);
        hub.publish(Arc::new(early.clone())); // stamped after the client's mark

        let mut resumed = JobsWatch::open(
            Arc::clone(&store),
            &hub,
            None,
            BTreeMap::new(),
            None,
            Some(last.cursor),
            Some(last.mark),
        )
        .await
        .unwrap();
        assert_quiet(&mut resumed, "the client had it, from the log").await;
    }
}
