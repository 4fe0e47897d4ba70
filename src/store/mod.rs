//! Where jobs live. The [`Store`] trait is what the executor and the API rely on; each backend
//! (memory for tests, SQLite embedded by default, PostgreSQL to share one database) implements it, and
//! nothing outside this module writes SQL.

mod batch;
mod memory;
mod postgres;
mod snapshot;
mod sqlite;

#[cfg(test)]
pub(crate) mod conformance;

pub use memory::MemoryStore;
pub(crate) use postgres::host_text;
pub use postgres::{PostgresOptions, PostgresStats, PostgresStore};
pub use sqlite::{Compacted, SqliteOptions, SqliteStats, SqliteStore, backup, compact};

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::job::{AttemptOutcome, Delivery, Job, JobId, JobState};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (I/O, disk full, lost connection…).
    #[error("storage backend failed: {context}")]
    Backend {
        /// What the store was doing.
        context: String,
        /// The backend's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Stored data could not be read back.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A save would move a job's version backwards or skip a missing job.
    #[error("job {id} is at version {stored}, cannot save version {attempted}")]
    StaleVersion {
        /// The job.
        id: JobId,
        /// The version the store holds.
        stored: i64,
        /// The version that was to be saved.
        attempted: i64,
    },
    /// This replica no longer holds the job's lease (it ran out, and another replica took the
    /// job over): the save was refused, and the job is no longer this replica's to run.
    #[error("job {0} was taken over by another replica: its lease ran out")]
    LeaseLost(JobId),
    /// The job to save is not stored.
    #[error("job {0} is not stored")]
    Missing(JobId),
    /// The store is closed or shutting down.
    #[error("the store is closed")]
    Closed,
    /// The disk (or the database's size limit) is full: nothing was stored.
    #[error("storage is full while {context}; free some disk space")]
    Full {
        /// What the store was doing.
        context: String,
        /// The backend's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Another store (in this process or another) holds the data directory.
    #[error("data directory {} is in use by another longrun store", path.display())]
    Locked {
        /// The data directory.
        path: PathBuf,
    },
    /// Another longrun store holds this PostgreSQL database (and schema) exclusively (see
    /// `PostgresOptions::exclusive`).
    #[error("another longrun process holds this database exclusively ({database})")]
    ReplicaRunning {
        /// The database (host, name and schema; never credentials).
        database: String,
    },
    /// The stored data was written by a newer longrun that this one cannot read.
    #[error("stored schema version {found} is newer than the {supported} this longrun supports")]
    IncompatibleSchema {
        /// The schema version found.
        found: i64,
        /// The newest schema version this binary knows.
        supported: i64,
    },
    /// A migration recorded as applied is not the one this longrun has under that number: the
    /// schema was made by a different build, and its tables may not be what this one expects.
    #[error(
        "stored schema migration {version} is {found:?}, but this longrun's is {expected:?}: \
         the database was migrated by a different build; use a database (or schema) this \
         version made, or an empty one"
    )]
    SchemaMismatch {
        /// The migration's number.
        version: i64,
        /// Its name as recorded in the database.
        found: String,
        /// Its name in this binary.
        expected: String,
    },
}

impl StoreError {
    /// Wraps a backend error with what the store was doing.
    pub fn backend(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError::Backend {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// What [`Store::create`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// The job was stored.
    New,
    /// Its idempotency key already belongs to this job; nothing was stored.
    Existing(Box<Job>),
}

/// What [`Store::delete`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Deleted {
    /// The job was removed.
    Removed,
    /// No such job.
    NotFound,
    /// The job has not ended; it was left alone.
    NotTerminal(Box<Job>),
}

/// A page query for [`Store::list`]: newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListQuery {
    /// Only jobs in one of these states; empty for all.
    pub states: Vec<JobState>,
    /// Only jobs carrying every one of these labels with the same value.
    pub labels: BTreeMap<String, String>,
    /// Only jobs older than (with an id below) this one: the previous page's last job.
    pub before: Option<JobId>,
    /// At most this many jobs.
    pub limit: usize,
    /// Only this tenant's jobs; `None` for every tenant's. Filtered in the store, so a page is
    /// never short because of other tenants' jobs.
    pub tenant: Option<String>,
}

/// Whether `job` carries every one of `labels` with the same value.
pub fn has_labels(job: &Job, labels: &BTreeMap<String, String>) -> bool {
    labels
        .iter()
        .all(|(key, value)| job.labels.get(key) == Some(value))
}

/// Whether `job` belongs to `tenant` (every job does when it is `None`).
pub fn in_tenant(job: &Job, tenant: Option<&str>) -> bool {
    tenant.is_none_or(|tenant| job.tenant == tenant)
}

impl ListQuery {
    /// Whether `job` passes the tenant, state and label filters.
    pub fn matches(&self, job: &Job) -> bool {
        in_tenant(job, self.tenant.as_deref())
            && (self.states.is_empty() || self.states.contains(&job.state))
            && has_labels(job, &self.labels)
    }
}

/// A page of the global event log: see [`Store::events_after`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventPage {
    /// The matching logged snapshots, each with its sequence number, in sequence order.
    pub events: Vec<(i64, Job)>,
    /// The highest sequence number this read covered: every event up to it that matched is in
    /// `events`. The last event's when the page is full, else the newest event's, so a reader
    /// whose filter matches rarely still moves forward.
    pub scanned_to: i64,
    /// The highest sequence number of any event removed with its job that this read's tenant
    /// and labels could have matched (retention's removals count whatever they matched; a
    /// DeleteJob only for streams its job matched): history at or below it is no longer
    /// complete for this reader.
    pub removed_through: i64,
}

/// A pending webhook delivery that is due, with the job snapshot it reports.
#[derive(Debug, Clone, PartialEq)]
pub struct DueDelivery {
    /// The delivery.
    pub delivery: Delivery,
    /// The job at the version the delivery reports.
    pub job: Job,
}

/// How many jobs removed by DeleteJob the store remembers one by one (by their newest event,
/// tenant and labels), so that a DeleteJob refuses only the WatchJobs cursors it could have
/// matched (see [`EventPage::removed_through`]). Past that the oldest are forgotten at the
/// next retention sweep and the removed-events mark rises past them, which refuses every
/// cursor from before them: without the bound a service that deletes every job once it has
/// its result would keep a record of each for good.
pub const REMEMBERED_DELETIONS: usize = if cfg!(test) { 3 } else { 10_000 };

/// Durable storage of jobs and of each job's log of state transitions.
///
/// Every logged snapshot (see [`Store::save`]) also gets a global sequence number, assigned in
/// commit order, so that a reader of [`Store::events_after`] that saw sequence `n` has seen
/// every logged change committed before it: the committed events always form a prefix.
///
/// Every method returns only once its effect is durable (for durable backends), so callers may
/// tell others of a change as soon as the call returns.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a new job (with its first log entry). When its idempotency key is already held
    /// by another job of the same tenant, stores nothing and returns that job. Keys are scoped
    /// by tenant: two tenants may use the same key and get different jobs.
    ///
    /// Like [`Store::save`], writes the webhook delivery that [`crate::job::delivery_for`]
    /// asks for in the same transaction.
    async fn create(&self, job: &Job) -> Result<Created, StoreError>;

    /// Stores a new job together with its next snapshot `started` (as [`Store::save`] would),
    /// so that a job started the moment it is submitted costs one commit, not two in turn.
    /// Only for jobs without an idempotency key. On error, neither is stored.
    ///
    /// The default creates, then saves (and removes nothing if the save fails, so it is for
    /// stores whose saves of a just-created job cannot fail); the SQLite store does both in
    /// one command of one transaction.
    async fn create_started(&self, job: &Job, started: &Job) -> Result<(), StoreError> {
        match self.create(job).await? {
            Created::New => self.save(started).await,
            Created::Existing(_) => Err(StoreError::backend(
                format!("creating job {}", job.id),
                "create_started is for jobs without an idempotency key",
            )),
        }
    }

    /// Saves a changed job. Its version must be above the stored one. When
    /// `job.logged_version == job.version`, the snapshot is also appended to the job's
    /// transition log; progress-only snapshots replace the current one and are not logged.
    ///
    /// When [`crate::job::delivery_for`] (given the stored state) asks for a webhook delivery,
    /// it is written in the same transaction as the snapshot: a save that fails writes none,
    /// and no committed state the webhook subscribes to is ever without its delivery.
    async fn save(&self, job: &Job) -> Result<(), StoreError>;

    /// The job's current snapshot.
    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError>;

    /// Whether job `id` exists and belongs to `tenant`. Stores answer it without reading the
    /// job's snapshot, so that the answer comes as fast for a large job as for a small one and
    /// its timing tells another tenant nothing about the job.
    async fn owned_by(&self, id: JobId, tenant: &str) -> Result<bool, StoreError> {
        Ok(self.get(id).await?.is_some_and(|job| job.tenant == tenant))
    }

    /// [`Store::get`] of a job of `tenant`: `None` for another tenant's job, found as
    /// [`Store::owned_by`] finds it, before the snapshot is read.
    async fn get_owned(&self, id: JobId, tenant: &str) -> Result<Option<Job>, StoreError> {
        Ok(self.get(id).await?.filter(|job| job.tenant == tenant))
    }

    /// The current snapshot of the job of `tenant` that holds idempotency key `key`.
    async fn by_idempotency_key(&self, tenant: &str, key: &str) -> Result<Option<Job>, StoreError>;

    /// The logged snapshots of the job with a version above `after_version`, oldest first.
    async fn transitions(&self, id: JobId, after_version: i64) -> Result<Vec<Job>, StoreError>;

    /// A page of jobs, newest first.
    async fn list(&self, query: &ListQuery) -> Result<Vec<Job>, StoreError>;

    /// Removes a terminal job with its log and idempotency key.
    async fn delete(&self, id: JobId) -> Result<Deleted, StoreError>;

    /// Every job that is QUEUED or RUNNING, oldest first: what a restarted server must pick up.
    async fn unfinished(&self) -> Result<Vec<Job>, StoreError>;

    /// Up to `limit` logged snapshots with a sequence number above `after_seq`, of jobs of
    /// `tenant` (any when `None`) that carry every one of `labels`, oldest first.
    async fn events_after(
        &self,
        after_seq: i64,
        tenant: Option<&str>,
        labels: &BTreeMap<String, String>,
        limit: usize,
    ) -> Result<EventPage, StoreError>;

    /// Every QUEUED or RUNNING job of `tenant` (any when `None`) that carries every one of
    /// `labels`, and the newest event's sequence number, read at one moment: the snapshots show
    /// every event up to that number and none after it.
    async fn unfinished_at(
        &self,
        tenant: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<(i64, Vec<Job>), StoreError>;

    /// Removes up to `limit` terminal jobs that ended before `ended_before`; returns how many.
    /// A removed job's webhook deliveries go with it. Also forgets all but the newest
    /// [`REMEMBERED_DELETIONS`] jobs removed by DeleteJob, raising the removed-events mark
    /// past the others.
    async fn purge_finished(
        &self,
        ended_before: SystemTime,
        limit: usize,
    ) -> Result<usize, StoreError>;

    /// The job's webhook deliveries, oldest first.
    async fn deliveries(&self, id: JobId) -> Result<Vec<Delivery>, StoreError>;

    /// Up to `limit` pending deliveries due at `now` (next attempt at or before it), the
    /// longest due first, each with the snapshot it reports. Only the oldest pending delivery
    /// of each job is ever due: a job's notifications are attempted in order, one at a time.
    async fn due_deliveries(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<DueDelivery>, StoreError>;

    /// Records one attempt of a pending delivery: counts it, and marks the delivery delivered,
    /// due again later, or dead. Returns the delivery as recorded; `None` when no pending
    /// delivery has this id (its job was removed, or it was already settled).
    async fn record_delivery_attempt(
        &self,
        id: Uuid,
        outcome: &AttemptOutcome,
    ) -> Result<Option<Delivery>, StoreError>;

    /// How many deliveries are pending.
    async fn pending_deliveries(&self) -> Result<usize, StoreError>;

    /// What the store offers to several replicas sharing it, when it can be shared (PostgreSQL);
    /// `None` (the default) for a store only one process uses, whose executor keeps its queue
    /// in memory.
    fn shared(&self) -> Option<&dyn SharedStore> {
        None
    }
}

/// A change the feed of a shared store tells of: see [`SharedStore::feed`].
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A snapshot committed by any replica: each logged one, in commit order, and the newest
    /// snapshot of a job whose progress was saved. Shared, as the hub takes it.
    Event(std::sync::Arc<Job>),
    /// Some replica was asked to cancel this job; whichever replica runs it stops it.
    Cancel(JobId),
}

/// What [`SharedStore::renew_leases`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Renewal {
    /// The jobs whose lease was renewed: every QUEUED or RUNNING job this replica holds.
    pub held: Vec<JobId>,
    /// Those of them some replica asked to cancel (see [`SharedStore::request_cancel`]).
    pub cancel_requested: Vec<JobId>,
}

/// A store several replicas (processes) share: they claim QUEUED jobs from it under leases
/// instead of each keeping its own queue, and learn of each other's changes from its feed.
///
/// The store knows which jobs this replica holds (claimed and not yet ended or released): its
/// [`Store::save`] of such a job is refused with [`StoreError::LeaseLost`] once the lease ran
/// out and another replica took the job, and releases the lease when the job ends.
#[async_trait]
pub trait SharedStore: Send + Sync {
    /// How long a lease lasts unless renewed.
    fn lease(&self) -> Duration;

    /// Claims up to `limit` QUEUED jobs nobody holds (or whose holder's lease ran out), by
    /// priority then readiness (see `Job::ready_time`), in one statement; returns them, in that order, held by this replica.
    /// Jobs in `running_here` are left alone: a run of them is still winding down in this
    /// process (its lease was lost and the job re-queued meanwhile), and claiming one again
    /// would start a second run beside it, and keep its lease from ever looking lost. A job a
    /// Cancel marked ([`SharedStore::request_cancel`]) comes with `cancel_requested` set: the
    /// cancel was never carried out, and the claimer ends it instead of starting it.
    async fn claim(&self, limit: usize, running_here: &[JobId]) -> Result<Vec<Job>, StoreError>;

    /// Extends the lease of every QUEUED or RUNNING job this replica holds; returns them. A job
    /// this replica runs that is not among them was taken over by another replica.
    async fn renew_leases(&self) -> Result<Renewal, StoreError>;

    /// Gives up this replica's lease on a QUEUED job (its retry committed), so any replica may
    /// claim it once due. Returns whether a Cancel asked for the job while it ran (the mark
    /// [`SharedStore::request_cancel`] leaves) and may not have reached this replica yet.
    async fn release(&self, id: JobId) -> Result<bool, StoreError>;

    /// How many jobs are QUEUED, per tenant (a tenant with none left out): what the queue
    /// limits count on a shared store, where the database, not a replica, holds the backlog.
    async fn queued_counts(&self) -> Result<Vec<(String, u64)>, StoreError>;

    /// Gives up every QUEUED job this replica holds (at shutdown); returns how many.
    async fn release_all(&self) -> Result<u64, StoreError>;

    /// Up to `limit` RUNNING jobs whose lease ran out: their replica died.
    async fn expired(&self, limit: usize) -> Result<Vec<Job>, StoreError>;

    /// Saves a change (the re-queue or failure) of a job [`SharedStore::expired`] returned,
    /// clearing its lease; refused with [`StoreError::LeaseLost`] if its lease was renewed in
    /// the meantime, or [`StoreError::StaleVersion`] if another replica saved it first.
    async fn save_expired(&self, job: &Job) -> Result<(), StoreError>;

    /// Takes a due webhook delivery for one attempt by this replica: moves its next attempt
    /// `hold` ahead (longer than the attempt may last), so no other replica finds it due
    /// meanwhile (and one does if this replica dies before recording the attempt). False when
    /// another replica took it first.
    async fn claim_delivery(
        &self,
        id: Uuid,
        now: SystemTime,
        hold: Duration,
    ) -> Result<bool, StoreError>;

    /// Asks whichever replica runs the RUNNING job to cancel it: marks the job, and notifies
    /// (at once, through the feed). A replica that missed the notification finds the mark at
    /// its next renewal ([`Renewal::cancel_requested`]). Returns false, changing nothing,
    /// when the job is no longer RUNNING (it ended, or went back to the queue, since read).
    async fn request_cancel(&self, id: JobId) -> Result<bool, StoreError>;

    /// The change feed: every event logged from now on, by any replica, in order and without
    /// gaps (a lost connection is reconnected and caught up from the log), and every cancel
    /// request. Ends when the receiver is dropped.
    async fn feed(&self) -> Result<mpsc::Receiver<Change>, StoreError>;
}

/// `delivery` after one attempt that ended with `outcome`.
pub(crate) fn apply_attempt(delivery: &mut Delivery, outcome: &AttemptOutcome) {
    use crate::job::DeliveryState;
    delivery.attempts = delivery.attempts.saturating_add(1);
    match outcome {
        AttemptOutcome::Delivered { at } => {
            delivery.state = DeliveryState::Delivered;
            delivery.delivered_at = Some(*at);
            delivery.next_attempt_at = None;
        }
        AttemptOutcome::Retry { retry_at, error } => {
            delivery.next_attempt_at = Some(*retry_at);
            delivery.last_error = Some(error.clone());
        }
        AttemptOutcome::Dead { error } => {
            delivery.state = DeliveryState::Dead;
            delivery.next_attempt_at = None;
            delivery.last_error = Some(error.clone());
        }
    }
}
