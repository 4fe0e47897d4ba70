//! Reads of the global event log (the `log` table, numbered by `seq`). Each read runs in one read transaction, so the
//! numbers it reports (the newest event, the removal mark) agree with the rows it returns.

use std::collections::BTreeMap;

use rusqlite::{Connection, Transaction, types::Value};

use super::{
    row::{CURRENT_SNAPSHOT, decode},
    sql_error,
};
use crate::job::Job;
use crate::store::{EventPage, StoreError};

/// Up to `limit` logged snapshots after `after_seq` of jobs of `tenant` (any when `None`)
/// carrying every one of `labels`.
pub(super) fn events_after(
    conn: &Connection,
    after_seq: i64,
    tenant: Option<&str>,
    labels: &BTreeMap<String, String>,
    limit: usize,
) -> Result<EventPage, StoreError> {
    let context = "reading the event log";
    let fail = |e| sql_error(context, e);
    let tx = conn.unchecked_transaction().map_err(fail)?;
    let (head, mark) = marks(&tx).map_err(fail)?;
    let removed_through = mark.max(deleted_through(&tx, after_seq, tenant, labels)?);
    let mut sql = "SELECT seq, snapshot FROM log WHERE seq > ?".to_owned();
    let mut args = vec![Value::Integer(after_seq)];
    if let Some(tenant) = tenant {
        sql.push_str(" AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = log.job_id AND j.tenant = ?)");
        args.push(Value::Text(tenant.to_owned()));
    }
    label_filter("log.job_id", labels, &mut sql, &mut args);
    sql.push_str(" ORDER BY seq LIMIT ?");
    args.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));

    let mut statement = tx.prepare_cached(&sql).map_err(fail)?;
    let mut rows = statement
        .query(rusqlite::params_from_iter(args))
        .map_err(fail)?;
    let mut events = Vec::new();
    while let Some(row) = rows.next().map_err(fail)? {
        let seq: i64 = row.get(0).map_err(fail)?;
        let snapshot: String = row.get(1).map_err(fail)?;
        events.push((seq, decode(&snapshot)?));
    }
    let scanned_to = match events.last() {
        Some((seq, _)) if events.len() >= limit => *seq,
        _ => head,
    };
    Ok(EventPage {
        events,
        scanned_to,
        removed_through,
    })
}

/// Every QUEUED or RUNNING job of `tenant` (any when `None`) carrying every one of `labels`,
/// oldest first, and the newest event's number, as of one moment.
pub(super) fn unfinished_at(
    conn: &Connection,
    tenant: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> Result<(i64, Vec<Job>), StoreError> {
    let context = "reading unfinished jobs";
    let fail = |e| sql_error(context, e);
    let tx = conn.unchecked_transaction().map_err(fail)?;
    let (head, _) = marks(&tx).map_err(fail)?;
    let mut sql =
        format!("SELECT {CURRENT_SNAPSHOT} FROM jobs j WHERE j.state IN ('QUEUED', 'RUNNING')");
    let mut args = Vec::new();
    if let Some(tenant) = tenant {
        sql.push_str(" AND j.tenant = ?");
        args.push(Value::Text(tenant.to_owned()));
    }
    label_filter("j.id", labels, &mut sql, &mut args);
    sql.push_str(" ORDER BY j.id");
    let mut statement = tx.prepare_cached(&sql).map_err(fail)?;
    let mut rows = statement
        .query(rusqlite::params_from_iter(args))
        .map_err(fail)?;
    let mut jobs = Vec::new();
    while let Some(row) = rows.next().map_err(fail)? {
        let snapshot: String = row.get(0).map_err(fail)?;
        jobs.push(decode(&snapshot)?);
    }
    Ok((head, jobs))
}

/// The last number handed out (the newest logged one, or a removed one above it) and the
/// highest number retention removed.
fn marks(tx: &Transaction<'_>) -> rusqlite::Result<(i64, i64)> {
    tx.prepare_cached(
        "SELECT max(coalesce((SELECT max(seq) FROM log), 0), removed_through,
                    coalesce((SELECT max(seq) FROM removed_jobs), 0)),
                removed_through
         FROM event_log WHERE id = 1",
    )?
    .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
}

/// The newest event after `after_seq` of a job removed by DeleteJob that a reader of `tenant`
/// and `labels` could have matched; 0 for none. Deletions are few, and the labels are
/// compared here rather than in SQL.
fn deleted_through(
    tx: &Transaction<'_>,
    after_seq: i64,
    tenant: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> Result<i64, StoreError> {
    let fail = |e| sql_error("reading removed jobs", e);
    let mut statement = tx
        .prepare_cached(
            "SELECT seq, labels FROM removed_jobs
             WHERE seq > ?1 AND (?2 IS NULL OR tenant = ?2)
             ORDER BY seq DESC",
        )
        .map_err(fail)?;
    let mut rows = statement
        .query(rusqlite::params![after_seq, tenant])
        .map_err(fail)?;
    while let Some(row) = rows.next().map_err(fail)? {
        let job_labels: String = row.get(1).map_err(fail)?;
        let job_labels: BTreeMap<String, String> = serde_json::from_str(&job_labels)
            .map_err(|e| StoreError::Corrupt(format!("removed job labels: {e}")))?;
        if labels.iter().all(|(k, v)| job_labels.get(k) == Some(v)) {
            return row.get(0).map_err(fail);
        }
    }
    Ok(0)
}

/// Appends one `EXISTS` per label: each is a primary-key lookup in `job_labels`.
fn label_filter(
    job_id: &str,
    labels: &BTreeMap<String, String>,
    sql: &mut String,
    args: &mut Vec<Value>,
) {
    for (key, value) in labels {
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM job_labels x
                          WHERE x.job_id = {job_id} AND x.key = ? AND x.value = ?)"
        ));
        args.extend([Value::Text(key.clone()), Value::Text(value.clone())]);
    }
}
