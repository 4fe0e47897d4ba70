//! Selector subscriptions: the live side of `WatchJobs`. A subscriber names labels a job must
//! carry; each publish offers the snapshot to the subscribers it matches, and to no one else.
//!
//! Each subscriber has an inbox that holds at most one snapshot per job (the newest; progress
//! is coalesced there) plus a wakeup, so a stalled reader costs one entry per job that changed
//! and the publisher never waits for it. Logged transitions an inbox overwrites are not lost:
//! the reader takes them from the store's event log (see [`super::JobsWatch`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use tokio::sync::Notify;

use super::Hub;
use crate::{
    job::{Job, JobId},
    store::has_labels,
};

/// The newest snapshot of each job that changed since the reader last looked.
pub type Pending = HashMap<JobId, Arc<Job>>;

/// The most jobs an inbox holds snapshots of. A reader that falls further behind (a stalled
/// client whose connection stays open) loses them all at once and replays the store's event
/// log instead: its memory stays bounded however many jobs change meanwhile.
pub const INBOX_LIMIT: usize = 4096;

/// What an inbox holds between two takes, and what the reader takes.
#[derive(Default)]
pub struct Taken {
    /// The newest snapshot of each job that changed.
    pub jobs: Pending,
    /// More than [`INBOX_LIMIT`] jobs changed, so their snapshots were dropped, and the inbox
    /// keeps none until the reader has taken this: the reader must take logged changes from
    /// the store's event log and progress from the hub.
    pub overflowed: bool,
}

/// One subscriber's mailbox.
pub(super) struct Inbox {
    id: u64,
    /// Only this tenant's jobs (every tenant's when `None`).
    tenant: Option<String>,
    labels: BTreeMap<String, String>,
    mailbox: Mutex<Taken>,
    wakeup: Notify,
}

impl Inbox {
    fn mailbox(&self) -> std::sync::MutexGuard<'_, Taken> {
        // Every critical section is one map operation: a poisoned lock is still consistent.
        self.mailbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this subscriber is offered `job`'s snapshots: its tenant's, with its labels.
    fn matches(&self, job: &Job) -> bool {
        self.tenant
            .as_ref()
            .is_none_or(|tenant| *tenant == job.tenant)
            && has_labels(job, &self.labels)
    }

    /// Keeps `job` unless the inbox already holds a newer version of it, and wakes the reader.
    fn offer(&self, job: &Arc<Job>) {
        let mut mailbox = self.mailbox();
        if mailbox.overflowed {
            // The reader was woken when it overflowed, and will read the log.
            return;
        }
        let dropped = match mailbox.jobs.get(&job.id) {
            Some(held) if held.version >= job.version => return,
            None if mailbox.jobs.len() >= INBOX_LIMIT => {
                mailbox.overflowed = true;
                Some(std::mem::take(&mut mailbox.jobs))
            }
            _ => {
                mailbox.jobs.insert(job.id, Arc::clone(job));
                None
            }
        };
        drop(mailbox);
        // Freed outside the lock, which other publishers and the reader wait on.
        drop(dropped);
        // Stores a permit when the reader is busy, so a wakeup is never lost.
        self.wakeup.notify_one();
    }
}

/// Every selector subscriber, indexed by its tenant and one of its labels.
///
/// A subscriber is filed under its tenant (or with those of every tenant), then under its
/// first label (key, then value): a job can only match it if the job is that tenant's and
/// carries that label, so a publish looks up the job's own tenant and few labels and never
/// walks subscribers of other tenants or whose first label it lacks. Subscribers without
/// labels match every job of their tenant and are kept apart within it.
#[derive(Default)]
pub(super) struct Selectors {
    /// How many subscribers exist: a publish skips the lock entirely when there are none.
    count: AtomicUsize,
    next_id: AtomicU64,
    registry: RwLock<Registry>,
}

#[derive(Default)]
struct Registry {
    /// Subscribers to one tenant's jobs, by tenant.
    by_tenant: HashMap<String, Filed>,
    /// Subscribers to every tenant's jobs.
    any_tenant: Filed,
}

#[derive(Default)]
struct Filed {
    /// First label key, then its value, to the subscribers filed there. Nested rather than
    /// keyed by `(key, value)` so a lookup borrows the job's strings instead of allocating.
    by_label: HashMap<String, HashMap<String, Vec<Arc<Inbox>>>>,
    everything: Vec<Arc<Inbox>>,
}

impl Filed {
    fn offer(&self, job: &Arc<Job>) {
        for inbox in &self.everything {
            inbox.offer(job);
        }
        for (key, value) in &job.labels {
            let Some(filed) = self.by_label.get(key).and_then(|v| v.get(value)) else {
                continue;
            };
            for inbox in filed {
                if has_labels(job, &inbox.labels) {
                    inbox.offer(job);
                }
            }
        }
    }

    fn add(&mut self, inbox: &Arc<Inbox>) {
        match inbox.labels.first_key_value() {
            Some((key, value)) => self
                .by_label
                .entry(key.clone())
                .or_default()
                .entry(value.clone())
                .or_default()
                .push(Arc::clone(inbox)),
            None => self.everything.push(Arc::clone(inbox)),
        }
    }

    fn remove(&mut self, inbox: &Inbox) {
        let id = inbox.id;
        match inbox.labels.first_key_value() {
            Some((key, value)) => {
                if let Some(values) = self.by_label.get_mut(key) {
                    if let Some(filed) = values.get_mut(value) {
                        filed.retain(|other| other.id != id);
                        if filed.is_empty() {
                            values.remove(value);
                        }
                    }
                    if values.is_empty() {
                        self.by_label.remove(key);
                    }
                }
            }
            None => self.everything.retain(|other| other.id != id),
        }
    }

    fn is_empty(&self) -> bool {
        self.by_label.is_empty() && self.everything.is_empty()
    }
}

impl Selectors {
    fn registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        // Writers only push to or remove from a vector: a poisoned lock is still consistent.
        self.registry.read().unwrap_or_else(|e| e.into_inner())
    }

    fn registry_mut(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers `job` to every subscriber of its tenant (or of every tenant) whose labels it
    /// carries.
    pub(super) fn publish(&self, job: &Arc<Job>) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let registry = self.registry();
        if let Some(filed) = registry.by_tenant.get(&job.tenant) {
            filed.offer(job);
        }
        registry.any_tenant.offer(job);
    }

    fn add(&self, tenant: Option<String>, labels: BTreeMap<String, String>) -> Arc<Inbox> {
        let inbox = Arc::new(Inbox {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            tenant,
            labels,
            mailbox: Mutex::default(),
            wakeup: Notify::new(),
        });
        let mut registry = self.registry_mut();
        match &inbox.tenant {
            Some(tenant) => registry
                .by_tenant
                .entry(tenant.clone())
                .or_default()
                .add(&inbox),
            None => registry.any_tenant.add(&inbox),
        }
        self.count.fetch_add(1, Ordering::AcqRel);
        inbox
    }

    fn remove(&self, inbox: &Inbox) {
        let mut registry = self.registry_mut();
        match &inbox.tenant {
            Some(tenant) => {
                if let Some(filed) = registry.by_tenant.get_mut(tenant) {
                    filed.remove(inbox);
                    if filed.is_empty() {
                        registry.by_tenant.remove(tenant);
                    }
                }
            }
            None => registry.any_tenant.remove(inbox),
        }
        self.count.fetch_sub(1, Ordering::AcqRel);
    }

    /// How many selector subscribers are open.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

/// A subscription to every job carrying some labels; dropping it unsubscribes.
pub struct JobsSubscription {
    hub: Arc<Hub>,
    inbox: Arc<Inbox>,
}

impl JobsSubscription {
    pub(super) fn open(
        hub: &Arc<Hub>,
        tenant: Option<String>,
        labels: BTreeMap<String, String>,
    ) -> Self {
        Self {
            inbox: hub.selectors.add(tenant, labels),
            hub: Arc::clone(hub),
        }
    }

    /// Waits until a snapshot arrives (returns at once if one arrived since the last take).
    pub async fn changed(&self) {
        self.inbox.wakeup.notified().await;
    }

    /// Takes the newest snapshot of each job that changed since the last take, and whether
    /// some were dropped meanwhile.
    pub fn take(&self) -> Taken {
        std::mem::take(&mut *self.inbox.mailbox())
    }

    /// Whether the inbox has overflowed since the last take, leaving it as it is.
    #[cfg(test)]
    pub(super) fn overflowed(&self) -> bool {
        self.inbox.mailbox().overflowed
    }

    /// The newest published snapshot of a job (see [`Hub::latest`]).
    pub fn latest(&self, id: JobId) -> super::Snapshot {
        self.hub.latest(id)
    }

    /// Now, on the hub's clock.
    pub fn mark(&self) -> super::LiveMark {
        self.hub.mark()
    }

    /// [`Hub::unfinished_published_after`], of the jobs this subscriber matches.
    pub fn unfinished_published_after(&self, mark: super::LiveMark) -> Vec<Arc<Job>> {
        let mut jobs = self.hub.unfinished_published_after(mark);
        jobs.retain(|job| self.inbox.matches(job));
        jobs
    }
}

impl Drop for JobsSubscription {
    fn drop(&mut self) {
        self.hub.selectors.remove(&self.inbox);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::store::conformance::sample_job;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[tokio::test]
    async fn a_subscriber_gets_only_jobs_carrying_all_its_labels() {
        let hub = Hub::new();
        let sub = hub.subscribe_jobs(None, labels(&[("env", "prod"), ("team", "a")]));
        let both = sample_job(1, &[("team", "a"), ("env", "prod"), ("x", "y")], None);
        let one = sample_job(1, &[("team", "a")], None);
        let other = sample_job(1, &[("team", "b"), ("env", "prod")], None);
        for job in [&both, &one, &other] {
            hub.publish(Arc::new(job.clone()));
        }
        tokio::time::timeout(Duration::from_secs(1), sub.changed())
            .await
            .expect("woken");
        let taken = sub.take().jobs;
        assert_eq!(taken.keys().collect::<Vec<_>>(), vec![&both.id]);
        assert!(sub.take().jobs.is_empty(), "a take empties the inbox");
    }

    #[tokio::test]
    async fn a_tenant_subscriber_gets_only_its_tenants_jobs_and_leaves_no_trace() {
        use crate::store::conformance::tenant_job;
        let hub = Hub::new();
        let a_all = hub.subscribe_jobs(Some("a".to_owned()), BTreeMap::new());
        let a_team = hub.subscribe_jobs(Some("a".to_owned()), labels(&[("team", "x")]));
        let everyone = hub.subscribe_jobs(None, labels(&[("team", "x")]));
        let a_job = tenant_job("a", &[("team", "x")], None);
        let b_job = tenant_job("b", &[("team", "x")], None);
        hub.publish(Arc::new(a_job.clone()));
        hub.publish(Arc::new(b_job.clone()));
        assert_eq!(
            a_all.take().jobs.keys().collect::<Vec<_>>(),
            vec![&a_job.id]
        );
        assert_eq!(
            a_team.take().jobs.keys().collect::<Vec<_>>(),
            vec![&a_job.id]
        );
        let mut both: Vec<_> = everyone.take().jobs.into_keys().collect();
        both.sort();
        let mut expected = vec![a_job.id, b_job.id];
        expected.sort();
        assert_eq!(both, expected);
        drop((a_all, a_team, everyone));
        let registry = hub.selectors.registry();
        assert!(registry.by_tenant.is_empty() && registry.any_tenant.is_empty());
    }

    #[tokio::test]
    async fn the_inbox_keeps_one_newest_snapshot_per_job() {
        let hub = Hub::new();
        let sub = hub.subscribe_jobs(None, BTreeMap::new());
        let mut job = sample_job(1, &[], None);
        job.start(SystemTime::now()).unwrap();
        job.start_action(0, SystemTime::now()).unwrap();
        let running = job.clone();
        for percent in 1..=100u8 {
            let progress = crate::job::Progress::percent(percent, "step");
            job.report_progress(0, progress, SystemTime::now());
            hub.publish(Arc::new(job.clone()));
        }
        hub.publish(Arc::new(running)); // an older version never replaces a newer one
        let taken = sub.take().jobs;
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[&job.id].version, job.version);
    }

    #[tokio::test]
    async fn an_inbox_past_its_limit_drops_its_snapshots_once_and_tells_the_reader() {
        let hub = Hub::new();
        let sub = hub.subscribe_jobs(None, BTreeMap::new());
        let jobs: Vec<Arc<Job>> = (0..=INBOX_LIMIT)
            .map(|_| Arc::new(sample_job(1, &[], None)))
            .collect();
        for job in &jobs[..INBOX_LIMIT] {
            hub.publish(Arc::clone(job));
        }
        // A job already held does not count twice.
        hub.publish(Arc::clone(&jobs[0]));
        assert_eq!(sub.inbox.mailbox().jobs.len(), INBOX_LIMIT);
        hub.publish(Arc::clone(&jobs[INBOX_LIMIT]));
        assert!(sub.inbox.mailbox().jobs.is_empty(), "the backlog is freed");
        hub.publish(Arc::clone(&jobs[1]));
        assert!(
            sub.inbox.mailbox().jobs.is_empty(),
            "nothing kept until the reader takes"
        );
        tokio::time::timeout(Duration::from_secs(1), sub.changed())
            .await
            .expect("woken");
        let taken = sub.take();
        assert!(taken.overflowed && taken.jobs.is_empty());
        hub.publish(Arc::clone(&jobs[2]));
        let taken = sub.take();
        assert!(!taken.overflowed);
        assert_eq!(taken.jobs.len(), 1, "kept again once taken");
    }

    #[tokio::test]
    async fn dropping_unsubscribes_and_unwatched_publishes_keep_nothing() {
        let hub = Hub::new();
        let job = sample_job(1, &[("team", "a")], None);
        hub.publish(Arc::new(job.clone()));
        let a = hub.subscribe_jobs(None, labels(&[("team", "a")]));
        let b = hub.subscribe_jobs(None, labels(&[("team", "a")]));
        let all = hub.subscribe_jobs(None, BTreeMap::new());
        assert_eq!(hub.selectors.len(), 3);
        drop(a);
        hub.publish(Arc::new(job.clone()));
        assert_eq!(b.take().jobs.len(), 1, "the other subscriber still gets it");
        assert_eq!(all.take().jobs.len(), 1);
        drop(b);
        drop(all);
        assert_eq!(hub.selectors.len(), 0);
        assert!(
            hub.selectors.registry().any_tenant.is_empty(),
            "index entries freed"
        );
    }

    #[tokio::test]
    async fn a_wakeup_sent_while_busy_is_kept() {
        let hub = Hub::new();
        let sub = hub.subscribe_jobs(None, BTreeMap::new());
        hub.publish(Arc::new(sample_job(1, &[], None)));
        // Nobody was waiting when it was published; the wait must still return.
        tokio::time::timeout(Duration::from_secs(1), sub.changed())
            .await
            .expect("the stored wakeup is seen");
    }
}
