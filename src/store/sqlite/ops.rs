//! The write commands' SQL. Each runs on the writer thread inside its own savepoint, so it may
//! read then write without any other writer slipping in between.

pub(super) use crate::store::batch::{CreateOutcome, DeleteOutcome, TERMINAL_STATES};
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    outbox,
    row::{CURRENT_SNAPSHOT, IN_LOG, JobRow},
    sql_error,
};
use crate::store::StoreError;

/// The number the next logged snapshot takes. Read once per batch rather than per row: the
/// writer is the only writer, so no one else takes a number meanwhile, and asking for it in
/// each INSERT made SQLite copy every new log row through a temporary table (an INSERT that
/// reads its own table).
#[derive(Debug, Clone, Copy)]
pub(super) struct LogHead {
    next: i64,
}

impl LogHead {
    /// One above both the newest logged number and every removed one, so a number is never
    /// handed out twice, even after the newest rows were deleted. Both are index seeks.
    pub(super) fn read(conn: &Connection) -> rusqlite::Result<Self> {
        let next = conn
            .prepare_cached(
                "SELECT max(coalesce((SELECT max(seq) FROM log), 0), removed_through,
                            coalesce((SELECT max(seq) FROM removed_jobs), 0)) + 1
                 FROM event_log WHERE id = 1",
            )?
            .query_row([], |r| r.get(0))?;
        Ok(Self { next })
    }

    fn take(&mut self) -> i64 {
        let seq = self.next;
        self.next += 1;
        seq
    }
}

/// Stores a new job and its first log entry, unless its idempotency key is taken.
pub(super) fn create(
    conn: &Connection,
    row: &JobRow,
    head: &mut LogHead,
) -> Result<CreateOutcome, StoreError> {
    let fail = |e| sql_error(format!("creating job {}", row.id_text), e);
    if let Some(key) = &row.idempotency_key {
        let existing: Option<String> = conn
            .prepare_cached(&format!(
                "SELECT {CURRENT_SNAPSHOT} FROM jobs j WHERE j.idempotency_key = ?1"
            ))
            .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
            .map_err(fail)?;
        if let Some(snapshot) = existing {
            return Ok(CreateOutcome::Existing(snapshot));
        }
    }
    let seq = row.logged.then(|| head.take());
    insert_job(conn, row, seq).map_err(fail)?;
    insert_labels(conn, row).map_err(fail)?;
    if let Some(seq) = seq {
        log_transition(conn, row, seq).map_err(fail)?;
    }
    if let Some(delivery) = &row.delivery {
        outbox::insert(conn, delivery).map_err(fail)?;
    }
    Ok(CreateOutcome::New)
}

/// Stores a new job (which has no idempotency key) already at its next snapshot `started`:
/// both snapshots are logged, in order, but the `jobs` row is written once, as `started`,
/// rather than inserted as `row` and then updated, which moved its entries in both state
/// indexes within the same transaction (the store bench's `create started` phase runs about a
/// fifth faster without that).
/// An error leaves the transaction with partial writes: the caller's savepoint or rollback
/// undoes them.
pub(super) fn create_started(
    conn: &Connection,
    row: &JobRow,
    started: &JobRow,
    head: &mut LogHead,
) -> Result<(), StoreError> {
    let fail = |e| sql_error(format!("creating job {}", row.id_text), e);
    if row.idempotency_key.is_some() || row.id != started.id {
        return Err(StoreError::backend(
            format!("creating job {}", row.id_text),
            "create_started is for a job without an idempotency key and its own next snapshot",
        ));
    }
    let created_seq = row.logged.then(|| head.take());
    let started_seq = started.logged.then(|| head.take());
    insert_job(conn, started, started_seq).map_err(fail)?;
    insert_labels(conn, started).map_err(fail)?;
    for (logged, seq) in [(row, created_seq), (started, started_seq)] {
        if let Some(seq) = seq {
            log_transition(conn, logged, seq).map_err(fail)?;
        }
    }
    // As `create` then `save` would: the new job's delivery, then the started one's if its
    // state differs from the one just stored.
    if let Some(delivery) = &row.delivery {
        outbox::insert(conn, delivery).map_err(fail)?;
    }
    if let Some(delivery) = &started.delivery
        && started.state != row.state
    {
        outbox::insert(conn, delivery).map_err(fail)?;
    }
    Ok(())
}

/// Replaces a job's snapshot with a newer version, logging it when it is a transition.
pub(super) fn save(conn: &Connection, row: &JobRow, head: &mut LogHead) -> Result<(), StoreError> {
    let fail = |e| sql_error(format!("saving job {}", row.id_text), e);
    if !row.logged && save_progress(conn, row).map_err(fail)? {
        return Ok(());
    }
    // The stored state decides whether the webhook is told: read only for jobs that may need
    // a delivery, so saves of other jobs cost nothing more.
    let previous: Option<String> = match row.delivery {
        Some(_) => conn
            .prepare_cached("SELECT state FROM jobs WHERE id = ?1")
            .and_then(|mut s| s.query_row([&row.id_text], |r| r.get(0)).optional())
            .map_err(fail)?,
        None => None,
    };
    let seq = row.logged.then(|| head.take());
    // Nothing changes a terminal job's state again (as on PostgreSQL): a writer that holds an
    // older snapshot of a job that was ended meanwhile is refused, whatever its version.
    static UPDATE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "UPDATE jobs SET state = ?2, version = ?3, priority = ?4, end_time = ?5,
                             snapshot = ?6, snapshot_seq = ?7
             WHERE id = ?1 AND version < ?3 AND (state NOT IN {TERMINAL_STATES} OR state = ?2)"
        )
    });
    let updated = conn
        .prepare_cached(&UPDATE)
        .and_then(|mut s| {
            s.execute(params![
                row.id_text,
                row.state,
                row.version,
                row.priority,
                row.end_time,
                row.row_snapshot(),
                seq,
            ])
        })
        .map_err(fail)?;
    if updated == 0 {
        let stored: Option<i64> = conn
            .prepare_cached("SELECT version FROM jobs WHERE id = ?1")
            .and_then(|mut s| s.query_row([&row.id_text], |r| r.get(0)).optional())
            .map_err(fail)?;
        return Err(match stored {
            None => StoreError::Missing(row.id),
            Some(stored) => StoreError::StaleVersion {
                id: row.id,
                stored,
                attempted: row.version,
            },
        });
    }
    sync_labels(conn, row).map_err(fail)?;
    if let Some(seq) = seq {
        log_transition(conn, row, seq).map_err(fail)?;
    }
    if let Some(delivery) = &row.delivery
        && previous.as_deref() != Some(row.state)
    {
        outbox::insert(conn, delivery).map_err(fail)?;
    }
    Ok(())
}

/// Saves a snapshot that only reports progress, if the stored row is an older version in the
/// same state; `false` (nothing written) otherwise, for [`save`]'s general path to sort out.
///
/// A progress report changes nothing but the running action's progress, the version and the
/// update time (`Job::report_progress`): no state, end time, priority or label. Setting only
/// `version` and `snapshot` keeps SQLite away from both state indexes (it maintains only the
/// indexes on columns an UPDATE sets; the general path sets `state` and `end_time`, so it deletes
/// and re-inserts their entries even when the values stay) and skips the label read. Progress is
/// the write a long job makes most often: one per `progress_persist_interval` while it reports.
fn save_progress(conn: &Connection, row: &JobRow) -> rusqlite::Result<bool> {
    let updated = conn
        .prepare_cached(
            "UPDATE jobs SET version = ?2, snapshot = ?3, snapshot_seq = NULL
             WHERE id = ?1 AND version < ?2 AND state = ?4",
        )?
        .execute(params![row.id_text, row.version, row.snapshot, row.state])?;
    Ok(updated > 0)
}

/// Removes a terminal job; its labels and log go with it (ON DELETE CASCADE).
pub(super) fn delete(conn: &Connection, id: &str) -> Result<DeleteOutcome, StoreError> {
    let fail = |e| sql_error(format!("deleting job {id}"), e);
    // What its events matched, to be remembered in `removed_jobs` instead of raising the one
    // mark (which the log's trigger does, and is set back below: one writer, one transaction).
    let removed: Option<(Option<i64>, String, String, i64)> = conn
        .prepare_cached(&format!(
            "SELECT (SELECT max(seq) FROM log WHERE job_id = ?1), j.tenant,
                    (SELECT json_group_object(key, value) FROM job_labels WHERE job_id = ?1),
                    (SELECT removed_through FROM event_log WHERE id = 1)
             FROM jobs j WHERE j.id = ?1 AND j.state IN {TERMINAL_STATES}"
        ))
        .and_then(|mut s| {
            s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .optional()
        })
        .map_err(fail)?;
    if let Some((newest, tenant, labels, mark)) = removed {
        conn.prepare_cached("DELETE FROM jobs WHERE id = ?1")
            .and_then(|mut s| s.execute([id]))
            .map_err(fail)?;
        conn.prepare_cached("UPDATE event_log SET removed_through = ?1 WHERE id = 1")
            .and_then(|mut s| s.execute([mark]))
            .map_err(fail)?;
        if let Some(newest) = newest {
            conn.prepare_cached(
                "INSERT INTO removed_jobs (seq, tenant, labels) VALUES (?1, ?2, ?3)",
            )
            .and_then(|mut s| s.execute(params![newest, tenant, labels]))
            .map_err(fail)?;
        }
        return Ok(DeleteOutcome::Removed);
    }
    let found: Option<String> = conn
        .prepare_cached(&format!(
            "SELECT {CURRENT_SNAPSHOT} FROM jobs j WHERE j.id = ?1"
        ))
        .and_then(|mut s| s.query_row([id], |r| r.get(0)).optional())
        .map_err(fail)?;
    Ok(found.map_or(DeleteOutcome::NotFound, DeleteOutcome::NotTerminal))
}

/// Removes up to `limit` terminal jobs that ended before `ended_before` (unix micros). The
/// limit keeps each purge a short part of one batch, so retention never stalls submissions.
pub(super) fn purge(conn: &Connection, ended_before: i64, limit: i64) -> Result<usize, StoreError> {
    let fail = |e| sql_error("purging finished jobs", e);
    let purged = conn
        .prepare_cached(&format!(
            "DELETE FROM jobs WHERE id IN (
                 SELECT id FROM jobs
                 WHERE state IN {TERMINAL_STATES} AND end_time < ?1
                 LIMIT ?2)"
        ))
        .and_then(|mut s| s.execute(params![ended_before, limit]))
        .map_err(fail)?;
    // Past the newest `REMEMBERED_DELETIONS`, deleted jobs are folded into the mark.
    conn.prepare_cached(
        "WITH fold AS (SELECT coalesce(
             (SELECT seq FROM removed_jobs ORDER BY seq DESC LIMIT 1 OFFSET ?1), 0) AS seq)
         UPDATE event_log SET removed_through = (SELECT seq FROM fold)
         WHERE id = 1 AND removed_through < (SELECT seq FROM fold)",
    )
    .and_then(|mut s| s.execute([crate::store::REMEMBERED_DELETIONS as i64]))
    .map_err(fail)?;
    // Deleted jobs at or below the mark say nothing the mark does not.
    conn.prepare_cached(
        "DELETE FROM removed_jobs
         WHERE seq <= (SELECT removed_through FROM event_log WHERE id = 1)",
    )
    .and_then(|mut s| s.execute([]))
    .map_err(fail)?;
    Ok(purged)
}

/// Inserts the `jobs` row for `row`; `seq` names its log row when its snapshot is logged.
fn insert_job(conn: &Connection, row: &JobRow, seq: Option<i64>) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO jobs (id, state, version, priority, idempotency_key, end_time, snapshot,
                           tenant, snapshot_seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        row.id_text,
        row.state,
        row.version,
        row.priority,
        row.idempotency_key,
        row.end_time,
        row.row_snapshot(),
        row.tenant,
        seq,
    ])?;
    Ok(())
}

fn insert_labels(conn: &Connection, row: &JobRow) -> rusqlite::Result<()> {
    if row.labels.is_empty() {
        return Ok(());
    }
    let mut insert =
        conn.prepare_cached("INSERT INTO job_labels (job_id, key, value) VALUES (?1, ?2, ?3)")?;
    for (key, value) in &row.labels {
        insert.execute(params![row.id_text, key, value])?;
    }
    Ok(())
}

/// Rewrites the job's labels only if they changed: the domain sets them at submission, so a
/// save almost always just reads the few stored ones and moves on.
fn sync_labels(conn: &Connection, row: &JobRow) -> rusqlite::Result<()> {
    let stored = conn
        .prepare_cached("SELECT key, value FROM job_labels WHERE job_id = ?1 ORDER BY key")?
        .query_map([&row.id_text], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<Vec<(String, String)>>>()?;
    if stored == row.labels {
        return Ok(());
    }
    conn.prepare_cached("DELETE FROM job_labels WHERE job_id = ?1")?
        .execute([&row.id_text])?;
    insert_labels(conn, row)
}

impl JobRow {
    /// What `jobs.snapshot` holds for this row: nothing when the snapshot goes to the log.
    fn row_snapshot(&self) -> &str {
        if self.logged { IN_LOG } else { &self.snapshot }
    }
}

/// Appends the snapshot to the job's log under `seq`, a number from the batch's [`LogHead`].
fn log_transition(conn: &Connection, row: &JobRow, seq: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO log (seq, job_id, version, snapshot) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![seq, row.id_text, row.version, row.snapshot])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobState;

    #[test]
    fn terminal_states_match_the_domain() {
        let terminal: Vec<String> = JobState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .map(|s| format!("'{s}'"))
            .collect();
        assert_eq!(TERMINAL_STATES, format!("({})", terminal.join(", ")));
    }
}
