//! The webhook outbox's SQL: rows written with the snapshot they report (by [`super::ops`]),
//! the delivery worker's reads, and the record of each attempt.

use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, Row, params};
use uuid::Uuid;

use super::{
    row::{decode, from_unix_micros, id_text, unix_micros},
    sql_error,
};
use crate::{
    job::{AttemptOutcome, Delivery, DeliveryState, JobId},
    store::{DueDelivery, StoreError, apply_attempt},
};

/// The columns [`from_row`] reads, in its order.
const COLUMNS: &str = "d.id, d.job_id, d.job_version, d.job_state, d.state, d.attempts, \
     d.last_error, d.next_attempt_at, d.delivered_at, d.created_at";

/// Writes a pending delivery; runs inside the savepoint of the snapshot it reports.
pub(super) fn insert(conn: &Connection, delivery: &Delivery) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO webhook_deliveries
             (id, job_id, job_version, job_state, state, attempts, next_attempt_at, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        delivery.id.hyphenated().to_string(),
        id_text(delivery.job_id),
        delivery.job_version,
        delivery.job_state.as_str(),
        delivery.state.as_str(),
        delivery.attempts,
        delivery.next_attempt_at.map(unix_micros),
        unix_micros(delivery.created_at),
    ])?;
    Ok(())
}

/// The job's deliveries, oldest first.
pub(super) fn for_job(conn: &Connection, id: JobId) -> Result<Vec<Delivery>, StoreError> {
    let fail = |e| sql_error(format!("reading the deliveries of job {id}"), e);
    let mut statement = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM webhook_deliveries d WHERE d.job_id = ?1 ORDER BY d.job_version"
        ))
        .map_err(fail)?;
    let rows = statement
        .query_map([id_text(id)], |row| Ok(from_row(row)))
        .map_err(fail)?;
    let mut deliveries = Vec::new();
    for row in rows {
        deliveries.push(row.map_err(fail)??);
    }
    Ok(deliveries)
}

/// Up to `limit` pending deliveries due at `now`, the longest due first, with their snapshots;
/// only the oldest pending delivery of each job, so a job's notifications go out in order.
pub(super) fn due(
    conn: &Connection,
    now: SystemTime,
    limit: usize,
) -> Result<Vec<DueDelivery>, StoreError> {
    let fail = |e| sql_error("reading due webhook deliveries", e);
    let mut statement = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS}, t.snapshot FROM webhook_deliveries d
             JOIN log t ON t.job_id = d.job_id AND t.version = d.job_version
             WHERE d.state = 'PENDING' AND d.next_attempt_at <= ?1
               AND NOT EXISTS (
                   SELECT 1 FROM webhook_deliveries e
                   WHERE e.job_id = d.job_id AND e.job_version < d.job_version
                     AND e.state = 'PENDING')
             ORDER BY d.next_attempt_at, d.id
             LIMIT ?2"
        ))
        .map_err(fail)?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = statement
        .query_map(params![unix_micros(now), limit], |row| {
            Ok(from_row(row).and_then(|delivery| {
                let snapshot: String = row
                    .get(10)
                    .map_err(|e| sql_error("reading a delivery's snapshot", e))?;
                Ok(DueDelivery {
                    delivery,
                    job: decode(&snapshot)?,
                })
            }))
        })
        .map_err(fail)?;
    let mut due = Vec::new();
    for row in rows {
        due.push(row.map_err(fail)??);
    }
    Ok(due)
}

/// How many deliveries are pending.
pub(super) fn pending(conn: &Connection) -> Result<usize, StoreError> {
    let count: i64 = conn
        .prepare_cached("SELECT count(*) FROM webhook_deliveries WHERE state = 'PENDING'")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(|e| sql_error("counting pending webhook deliveries", e))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// Records one attempt of a pending delivery; `None` if there is no such pending delivery.
pub(super) fn record_attempt(
    conn: &Connection,
    id: Uuid,
    outcome: &AttemptOutcome,
) -> Result<Option<Delivery>, StoreError> {
    let id_text = id.hyphenated().to_string();
    let fail = |e| sql_error(format!("recording an attempt of delivery {id_text}"), e);
    let found = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM webhook_deliveries d WHERE d.id = ?1 AND d.state = 'PENDING'"
        ))
        .and_then(|mut s| s.query_row([&id_text], |row| Ok(from_row(row))).optional())
        .map_err(fail)?;
    let Some(delivery) = found else {
        return Ok(None);
    };
    let mut delivery = delivery?;
    apply_attempt(&mut delivery, outcome);
    // Answer with the times as stored (microseconds), so the answer equals a later read.
    let stored = |t: SystemTime| from_unix_micros(unix_micros(t));
    delivery.next_attempt_at = delivery.next_attempt_at.map(stored);
    delivery.delivered_at = delivery.delivered_at.map(stored);
    conn.prepare_cached(
        "UPDATE webhook_deliveries
         SET state = ?2, attempts = ?3, last_error = ?4, next_attempt_at = ?5, delivered_at = ?6
         WHERE id = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![
            id_text,
            delivery.state.as_str(),
            delivery.attempts,
            delivery.last_error,
            delivery.next_attempt_at.map(unix_micros),
            delivery.delivered_at.map(unix_micros),
        ])
    })
    .map_err(fail)?;
    Ok(Some(delivery))
}

/// A delivery from a row of [`COLUMNS`]; a value that does not parse is corruption.
fn from_row(row: &Row<'_>) -> Result<Delivery, StoreError> {
    let read = |e| sql_error("reading a webhook delivery", e);
    let corrupt = |what: &str, value: &str| {
        StoreError::Corrupt(format!("webhook delivery: bad {what} {value:?}"))
    };
    let id: String = row.get(0).map_err(read)?;
    let job_id: String = row.get(1).map_err(read)?;
    let job_state: String = row.get(3).map_err(read)?;
    let state: String = row.get(4).map_err(read)?;
    let attempts: i64 = row.get(5).map_err(read)?;
    Ok(Delivery {
        id: Uuid::try_parse(&id).map_err(|_| corrupt("id", &id))?,
        job_id: job_id.parse().map_err(|_| corrupt("job id", &job_id))?,
        job_version: row.get(2).map_err(read)?,
        job_state: job_state
            .parse()
            .map_err(|_| corrupt("job state", &job_state))?,
        state: state
            .parse::<DeliveryState>()
            .map_err(|_| corrupt("state", &state))?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        last_error: row.get(6).map_err(read)?,
        next_attempt_at: row
            .get::<_, Option<i64>>(7)
            .map_err(read)?
            .map(from_unix_micros),
        delivered_at: row
            .get::<_, Option<i64>>(8)
            .map_err(read)?
            .map(from_unix_micros),
        created_at: from_unix_micros(row.get(9).map_err(read)?),
    })
}
