//! The write commands' SQL. Each runs on the writer's connection inside its own savepoint of
//! the batch's transaction, which holds the store's write lock: it may read then write without
//! any other writer (of this process or another) slipping in between.

pub(super) use crate::store::batch::{CreateOutcome, DeleteOutcome, TERMINAL_STATES};
use deadpool_postgres::ClientWrapper;
use tokio_postgres::Error;
use uuid::Uuid;

use super::{
    pg_error,
    reads::{self, DELIVERY_COLUMNS},
    row::{JobRow, NOW_MICROS, from_unix_micros, unix_micros},
};
use crate::job::{AttemptOutcome, Delivery, JobId};
use crate::store::{StoreError, apply_attempt};

/// Stores a new job and its first log entry, unless its tenant already used its idempotency
/// key. The key is looked up first (not left to the UNIQUE constraint to refuse) so that the
/// answer can carry the first job, and so that no error aborts the batch's transaction.
pub(super) async fn create(
    client: &ClientWrapper,
    row: &JobRow,
) -> Result<CreateOutcome, StoreError> {
    let fail = |e| pg_error(format!("creating job {}", row.id), e);
    if let Some(key) = &row.idempotency_key {
        let statement = client
            .prepare_cached("SELECT snapshot FROM jobs WHERE tenant = $1 AND idempotency_key = $2")
            .await
            .map_err(fail)?;
        if let Some(found) = client
            .query_opt(&statement, &[&row.tenant, key])
            .await
            .map_err(fail)?
        {
            return Ok(CreateOutcome::Existing(found.try_get(0).map_err(fail)?));
        }
    }
    let statement = client
        .prepare_cached(
            "INSERT INTO jobs
                 (id, tenant, state, version, priority, idempotency_key, end_time, snapshot,
                  waits_until, ready_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .await
        .map_err(fail)?;
    client
        .execute(
            &statement,
            &[
                &row.id,
                &row.tenant,
                &row.state,
                &row.version,
                &row.priority,
                &row.idempotency_key,
                &row.end_time,
                &row.snapshot,
                &row.waits_until,
                &row.ready_at,
            ],
        )
        .await
        .map_err(fail)?;
    insert_labels(client, row).await.map_err(fail)?;
    log_transition(client, row).await.map_err(fail)?;
    if let Some(delivery) = &row.delivery {
        insert_delivery(client, delivery).await.map_err(fail)?;
    }
    Ok(CreateOutcome::New)
}

/// Replaces a job's snapshot with a newer version, logging it when it is a transition.
pub(super) async fn save(client: &ClientWrapper, row: &JobRow) -> Result<(), StoreError> {
    let fail = |e| pg_error(format!("saving job {}", row.id), e);
    // The stored state decides whether the webhook is told: the UPDATE returns it (from a
    // sub-select, which sees the row as it was before this statement).
    // The lease: a replica's own save must still hold it; the reaper's must find it run out
    // (and clears it). See `LeaseCheck`. Any save that ends the job clears it too, whoever
    // makes it: a QUEUED job another replica claimed and a Cancel here ended must fail that
    // replica's start, whose version is higher (start and first action in one write).
    // Nothing changes a terminal job's state again.
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let release = format!("$7 = 2 OR $2 IN {TERMINAL_STATES}");
        format!(
            "UPDATE jobs j SET state = $2, version = $3, priority = $4, end_time = $5,
             snapshot = $6, waits_until = $9,
             lease_owner = CASE WHEN {release} THEN NULL ELSE j.lease_owner END,
             lease_until = CASE WHEN {release} THEN NULL ELSE j.lease_until END
         FROM (SELECT id, state FROM jobs WHERE id = $1) previous
         WHERE j.id = previous.id AND j.version < $3
             AND (previous.state NOT IN {TERMINAL_STATES} OR previous.state = $2)
             AND ($7 = 0
                  OR ($7 = 1 AND j.lease_owner IS NOT DISTINCT FROM $8)
                  OR ($7 = 2 AND (j.lease_until IS NULL OR j.lease_until < {NOW_MICROS})))
         RETURNING previous.state"
        )
    });
    let statement = client.prepare_cached(&SQL).await.map_err(fail)?;
    let mode = row.lease.mode();
    let owner = row.lease.owner();
    let previous = client
        .query_opt(
            &statement,
            &[
                &row.id,
                &row.state,
                &row.version,
                &row.priority,
                &row.end_time,
                &row.snapshot,
                &mode,
                &owner,
                &row.waits_until,
            ],
        )
        .await
        .map_err(fail)?;
    let Some(previous) = previous else {
        let statement = client
            .prepare_cached("SELECT version FROM jobs WHERE id = $1")
            .await
            .map_err(fail)?;
        let stored = client
            .query_opt(&statement, &[&row.id])
            .await
            .map_err(fail)?;
        let Some(stored) = stored else {
            return Err(StoreError::Missing(JobId::from(row.id)));
        };
        let stored: i64 = stored.try_get(0).map_err(fail)?;
        return Err(if stored >= row.version {
            StoreError::StaleVersion {
                id: JobId::from(row.id),
                stored,
                attempted: row.version,
            }
        } else {
            StoreError::LeaseLost(JobId::from(row.id))
        });
    };
    let previous: String = previous.try_get(0).map_err(fail)?;
    sync_labels(client, row).await.map_err(fail)?;
    if row.logged {
        log_transition(client, row).await.map_err(fail)?;
    }
    if let Some(delivery) = &row.delivery
        && previous != row.state
    {
        insert_delivery(client, delivery).await.map_err(fail)?;
    }
    Ok(())
}

/// Removes a terminal job; its labels, log and deliveries go with it (ON DELETE CASCADE), and
/// the log's trigger raises `removed_through`.
pub(super) async fn delete(client: &ClientWrapper, id: Uuid) -> Result<DeleteOutcome, StoreError> {
    let fail = |e| pg_error(format!("deleting job {id}"), e);
    // First what its events matched (migration 4): the log's trigger then leaves the one mark
    // alone for them, and only the streams the job could have matched are refused a resume.
    let statement = client
        .prepare_cached(&format!(
            "INSERT INTO removed_jobs (seq, job_id, tenant, labels)
             SELECT (SELECT max(seq) FROM log WHERE job_id = j.id), j.id, j.tenant,
                    (SELECT coalesce(jsonb_object_agg(key, value), '{{}}'::jsonb)
                     FROM job_labels WHERE job_id = j.id)
             FROM jobs j
             WHERE j.id = $1 AND j.state IN {TERMINAL_STATES}
                 AND EXISTS (SELECT 1 FROM log WHERE job_id = j.id)"
        ))
        .await
        .map_err(fail)?;
    client.execute(&statement, &[&id]).await.map_err(fail)?;
    let statement = client
        .prepare_cached(&format!(
            "DELETE FROM jobs WHERE id = $1 AND state IN {TERMINAL_STATES}"
        ))
        .await
        .map_err(fail)?;
    if client.execute(&statement, &[&id]).await.map_err(fail)? > 0 {
        return Ok(DeleteOutcome::Removed);
    }
    let statement = client
        .prepare_cached("SELECT snapshot FROM jobs WHERE id = $1")
        .await
        .map_err(fail)?;
    match client.query_opt(&statement, &[&id]).await.map_err(fail)? {
        None => Ok(DeleteOutcome::NotFound),
        Some(row) => Ok(DeleteOutcome::NotTerminal(row.try_get(0).map_err(fail)?)),
    }
}

/// Removes up to `limit` terminal jobs that ended before `ended_before` (unix micros). The
/// limit keeps each purge a short part of one batch, so retention never stalls submissions.
pub(super) async fn purge(
    client: &ClientWrapper,
    ended_before: i64,
    limit: i64,
) -> Result<usize, StoreError> {
    let fail = |e| pg_error("purging finished jobs", e);
    let statement = client
        .prepare_cached(&format!(
            "DELETE FROM jobs WHERE id IN (
                 SELECT id FROM jobs
                 WHERE state IN {TERMINAL_STATES} AND end_time < $1
                 LIMIT $2)"
        ))
        .await
        .map_err(fail)?;
    let removed = client
        .execute(&statement, &[&ended_before, &limit])
        .await
        .map_err(fail)?;
    // Past the newest `REMEMBERED_DELETIONS`, deleted jobs are folded into the mark.
    let statement = client
        .prepare_cached(
            "WITH fold AS (SELECT coalesce(
                 (SELECT seq FROM removed_jobs ORDER BY seq DESC OFFSET $1 LIMIT 1), 0) AS seq)
             UPDATE event_log SET removed_through = (SELECT seq FROM fold)
             WHERE id = 1 AND removed_through < (SELECT seq FROM fold)",
        )
        .await
        .map_err(fail)?;
    let remembered = crate::store::REMEMBERED_DELETIONS as i64;
    client
        .execute(&statement, &[&remembered])
        .await
        .map_err(fail)?;
    // Deleted jobs at or below the mark say nothing the mark does not.
    let statement = client
        .prepare_cached(
            "DELETE FROM removed_jobs
             WHERE seq <= (SELECT removed_through FROM event_log WHERE id = 1)",
        )
        .await
        .map_err(fail)?;
    client.execute(&statement, &[]).await.map_err(fail)?;
    Ok(usize::try_from(removed).unwrap_or(usize::MAX))
}

/// Records one attempt of a pending delivery; `None` if there is no such pending delivery.
pub(super) async fn record_attempt(
    client: &ClientWrapper,
    id: Uuid,
    outcome: &AttemptOutcome,
) -> Result<Option<Delivery>, StoreError> {
    let fail = |e| pg_error(format!("recording an attempt of delivery {id}"), e);
    let statement = client
        .prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d
             WHERE d.id = $1 AND d.state = 'PENDING'"
        ))
        .await
        .map_err(fail)?;
    let Some(found) = client.query_opt(&statement, &[&id]).await.map_err(fail)? else {
        return Ok(None);
    };
    let mut delivery = reads::delivery_from_row(&found)?;
    apply_attempt(&mut delivery, outcome);
    // Answer with the times as stored (microseconds), so the answer equals a later read.
    let stored = |t| from_unix_micros(unix_micros(t));
    delivery.next_attempt_at = delivery.next_attempt_at.map(stored);
    delivery.delivered_at = delivery.delivered_at.map(stored);
    let statement = client
        .prepare_cached(
            "UPDATE webhook_deliveries
             SET state = $2, attempts = $3, last_error = $4, next_attempt_at = $5,
                 delivered_at = $6
             WHERE id = $1",
        )
        .await
        .map_err(fail)?;
    client
        .execute(
            &statement,
            &[
                &id,
                &delivery.state.as_str(),
                &i64::from(delivery.attempts),
                &delivery.last_error,
                &delivery.next_attempt_at.map(unix_micros),
                &delivery.delivered_at.map(unix_micros),
            ],
        )
        .await
        .map_err(fail)?;
    Ok(Some(delivery))
}

/// Writes a pending delivery; runs inside the savepoint of the snapshot it reports.
async fn insert_delivery(client: &ClientWrapper, delivery: &Delivery) -> Result<(), Error> {
    let statement = client
        .prepare_cached(
            "INSERT INTO webhook_deliveries
                 (id, job_id, job_version, job_state, state, attempts, next_attempt_at,
                  created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .await?;
    client
        .execute(
            &statement,
            &[
                &delivery.id,
                delivery.job_id.as_uuid(),
                &delivery.job_version,
                &delivery.job_state.as_str(),
                &delivery.state.as_str(),
                &i64::from(delivery.attempts),
                &delivery.next_attempt_at.map(unix_micros),
                &unix_micros(delivery.created_at),
            ],
        )
        .await?;
    Ok(())
}

/// Inserts every label in one statement.
async fn insert_labels(client: &ClientWrapper, row: &JobRow) -> Result<(), Error> {
    if row.labels.is_empty() {
        return Ok(());
    }
    let (keys, values): (Vec<&str>, Vec<&str>) = row
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .unzip();
    let statement = client
        .prepare_cached(
            "INSERT INTO job_labels (job_id, key, value)
             SELECT $1, k, v FROM unnest($2::text[], $3::text[]) AS l(k, v)",
        )
        .await?;
    client
        .execute(&statement, &[&row.id, &keys, &values])
        .await?;
    Ok(())
}

/// Rewrites the job's labels only if they changed: the domain sets them at submission, so a
/// save almost always just reads the few stored ones and moves on.
async fn sync_labels(client: &ClientWrapper, row: &JobRow) -> Result<(), Error> {
    let statement = client
        .prepare_cached("SELECT key, value FROM job_labels WHERE job_id = $1")
        .await?;
    let mut stored = client
        .query(&statement, &[&row.id])
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<(String, String)>, Error>>()?;
    // Sorted here, not by the database, whose collation may order text differently.
    stored.sort();
    if stored == row.labels {
        return Ok(());
    }
    let statement = client
        .prepare_cached("DELETE FROM job_labels WHERE job_id = $1")
        .await?;
    client.execute(&statement, &[&row.id]).await?;
    insert_labels(client, row).await
}

/// Appends the snapshot to the job's log under the next global sequence number, taken from
/// `event_log.head` (never from the rows, so a number is never handed out twice). The batch
/// holds the store's write lock, so numbers are handed out, and committed, in order.
async fn log_transition(client: &ClientWrapper, row: &JobRow) -> Result<(), Error> {
    let statement = client
        .prepare_cached(
            "WITH next AS (UPDATE event_log SET head = head + 1 WHERE id = 1 RETURNING head)
             INSERT INTO log (seq, job_id, version, snapshot)
             SELECT next.head, $1, $2, $3 FROM next",
        )
        .await?;
    client
        .execute(&statement, &[&row.id, &row.version, &row.snapshot])
        .await?;
    Ok(())
}
