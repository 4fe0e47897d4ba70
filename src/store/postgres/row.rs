//! How a `Job` becomes a row and back. Encoding happens on the caller's task, not on the writer
//! task, so the one writer spends its time on SQL only.

use uuid::Uuid;

use crate::job::{Delivery, Job, JobState, delivery_for};
use crate::store::StoreError;

pub(super) use crate::store::snapshot::{decode, from_unix_micros, unix_micros};

/// A job ready to be written: the columns queries use, and the whole snapshot.
#[derive(Debug)]
pub(super) struct JobRow {
    pub id: Uuid,
    pub tenant: String,
    pub state: &'static str,
    pub version: i64,
    /// Whether this snapshot belongs in the transition log.
    pub logged: bool,
    pub priority: i64,
    pub idempotency_key: Option<String>,
    pub end_time: Option<i64>,
    /// When the job becomes due, in unix microseconds rounded up (so it is never claimed
    /// before its time); `None` for a job due at once. Written by a create (`schedule_time`)
    /// and by a save (a retry's `next_attempt_time`): replicas clear the column once the
    /// time has come (see `lease::claim`).
    pub waits_until: Option<i64>,
    /// When the job became ready to run ([`Job::ready_time`]), in unix microseconds: the
    /// claim's order among equal priorities.
    pub ready_at: i64,
    /// Sorted by key, as `BTreeMap` iterates.
    pub labels: Vec<(String, String)>,
    pub snapshot: String,
    /// The webhook delivery to write with this snapshot if the stored state differs (or the
    /// job is new): see [`delivery_for`].
    pub delivery: Option<Delivery>,
    /// Which lease the save must respect (only saves check it; creates ignore it).
    pub lease: LeaseCheck,
}

/// Which lease a save must respect: what keeps a replica that lost a job (its lease ran out
/// and another replica re-queued it) from overwriting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeaseCheck {
    /// None: the job is not held by this store (one replica, or a cancel of a QUEUED job,
    /// which the version check alone protects).
    Ignore,
    /// This replica must still hold the job's lease; the lease is released once the job ends.
    Held(Uuid),
    /// The job's lease must have run out (the reaper's save); the lease is cleared.
    Expired,
}

impl LeaseCheck {
    /// The mode as the save statement takes it.
    pub fn mode(self) -> i32 {
        match self {
            LeaseCheck::Ignore => 0,
            LeaseCheck::Held(_) => 1,
            LeaseCheck::Expired => 2,
        }
    }

    /// The replica that must hold the lease, for [`LeaseCheck::Held`].
    pub fn owner(self) -> Option<Uuid> {
        match self {
            LeaseCheck::Held(owner) => Some(owner),
            LeaseCheck::Ignore | LeaseCheck::Expired => None,
        }
    }
}

/// The database's clock in unix microseconds, as SQL: every replica's leases are measured by
/// this one clock, never by the replicas' own.
pub(super) const NOW_MICROS: &str = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint";

impl JobRow {
    /// The row for `job`; every column is taken from this one snapshot.
    pub fn encode(job: &Job) -> Result<Self, StoreError> {
        let snapshot = serde_json::to_string(job)
            .map_err(|e| StoreError::backend(format!("encoding job {}", job.id), e))?;
        Ok(Self {
            id: *job.id.as_uuid(),
            tenant: job.tenant.clone(),
            state: job.state.as_str(),
            version: job.version,
            logged: job.logged_version == job.version,
            priority: i64::from(job.priority),
            idempotency_key: job.idempotency_key.clone(),
            end_time: job.end_time.map(unix_micros),
            ready_at: unix_micros(job.ready_time()),
            // A time at or before the change is no reason to wait at all; only a QUEUED job
            // waits (scheduled, or for a retry's backoff to end).
            waits_until: (job.state == JobState::Queued)
                .then(|| job.due_after(job.update_time))
                .flatten()
                .map(|time| {
                    let up = time.checked_add(std::time::Duration::from_nanos(999));
                    unix_micros(up.unwrap_or(time))
                }),
            labels: job
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            snapshot,
            delivery: delivery_for(None, job).map(|new| Delivery::pending(new, job)),
            lease: LeaseCheck::Ignore,
        })
    }
}

/// A count or limit as SQL takes it, saturating.
pub(super) fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}
