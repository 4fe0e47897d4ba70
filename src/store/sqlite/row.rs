//! How a `Job` becomes a row and back. Encoding happens on the caller's task, not on the writer
//! thread, so the one writer spends its time on SQL only.

use crate::job::{Delivery, Job, JobId, delivery_for};
use crate::store::StoreError;

pub(super) use crate::store::snapshot::{decode, from_unix_micros, unix_micros};

/// What `jobs.snapshot` holds when the job's current version is logged: its snapshot is then
/// only in its `log` row, whose `seq` is in `jobs.snapshot_seq` (see [`CURRENT_SNAPSHOT`]).
/// Every logged version would otherwise be written twice, and a Submit's bytes were most of
/// what each commit wrote.
pub(super) const IN_LOG: &str = "";

/// The current snapshot of the `jobs` row aliased `j`, as a SQL expression: the row's own
/// snapshot, or (a rowid lookup) the log row `snapshot_seq` names.
pub(super) const CURRENT_SNAPSHOT: &str = "CASE WHEN j.snapshot_seq IS NULL THEN j.snapshot \
     ELSE (SELECT l.snapshot FROM log l WHERE l.seq = j.snapshot_seq) END";

/// A job ready to be written: the columns queries use, and the whole snapshot.
#[derive(Debug)]
pub(super) struct JobRow {
    pub id: JobId,
    /// `id` as stored.
    pub id_text: String,
    pub state: &'static str,
    pub version: i64,
    /// Whether this snapshot belongs in the transition log.
    pub logged: bool,
    pub priority: i64,
    /// The idempotency key scoped by tenant (see [`scoped_key`]).
    pub idempotency_key: Option<String>,
    pub tenant: String,
    pub end_time: Option<i64>,
    /// Sorted by key, as `BTreeMap` iterates and as SQLite's binary collation orders text.
    pub labels: Vec<(String, String)>,
    pub snapshot: String,
    /// The webhook delivery to write with this snapshot if the stored state differs (or the
    /// job is new): see [`delivery_for`].
    pub delivery: Option<Delivery>,
}

impl JobRow {
    /// The row for `job`; every column is taken from this one snapshot.
    pub fn encode(job: &Job) -> Result<Self, StoreError> {
        let snapshot = serde_json::to_string(job)
            .map_err(|e| StoreError::backend(format!("encoding job {}", job.id), e))?;
        Ok(Self {
            id: job.id,
            id_text: id_text(job.id),
            state: job.state.as_str(),
            version: job.version,
            logged: job.logged_version == job.version,
            priority: i64::from(job.priority),
            idempotency_key: job
                .idempotency_key
                .as_deref()
                .map(|key| scoped_key(&job.tenant, key)),
            tenant: job.tenant.clone(),
            end_time: job.end_time.map(unix_micros),
            labels: job
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            snapshot,
            delivery: delivery_for(None, job).map(|new| Delivery::pending(new, job)),
        })
    }
}

/// An idempotency key as stored: prefixed with its tenant's length and name, so the column's
/// UNIQUE constraint holds per tenant and no two (tenant, key) pairs can spell the same text
/// (migration 3 rewrites the keys stored before it with the tenant `default`).
pub(super) fn scoped_key(tenant: &str, key: &str) -> String {
    format!("{}:{tenant}:{key}", tenant.len())
}

/// The text form of an id, as stored in the `id` columns.
pub(super) fn id_text(id: JobId) -> String {
    id.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_keys_never_collide_across_tenants() {
        assert_eq!(scoped_key("default", "k"), "7:default:k");
        assert_ne!(scoped_key("a:b", "c"), scoped_key("a", "b:c"));
        assert_ne!(scoped_key("a", "1:b"), scoped_key("a:1", "b"));
    }
}
