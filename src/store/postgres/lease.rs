//! Leases: how several replicas share the jobs of one database (see [`SharedStore`]).
//!
//! A replica claims QUEUED jobs in one statement that also writes its lease (`lease_owner`,
//! `lease_until` by the database's clock); `FOR UPDATE SKIP LOCKED` lets replicas claim at the
//! same time without waiting for each other or taking the same job. These statements run on
//! pooled connections, outside the writer: they log nothing, so they need neither its order nor
//! its lock. The changes of state that follow (RUNNING, the end, the reaper's re-queue) go
//! through the writer like every other save, checked against the lease (see `ops::save`).

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::writer::Command;
use super::{
    CANCEL_CHANNEL, PostgresStore, WRITE_LOCK, feed, pg_error, reads,
    row::{JobRow, LeaseCheck, NOW_MICROS, sql_limit, unix_micros},
};
use crate::job::{Job, JobId};
use crate::store::{Change, Renewal, SharedStore, StoreError};

/// How many jobs scheduled for later one claim makes ready at most (see `claim`).
const PROMOTE_BATCH: usize = 1000;

/// Runs `sql` in a transaction that takes the write lock first, as every write batch does. For
/// a statement outside the writer that locks many job rows at once (and waits for them): it
/// locks them in its own order, and a batch (of any replica) locking some of the same in
/// another would deadlock with it, PostgreSQL then aborting one of the two, maybe the batch.
async fn query_under_write_lock(
    client: &mut deadpool_postgres::Object,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let lock = client
        .prepare_cached("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))")
        .await?;
    let statement = client.prepare_cached(sql).await?;
    let tx = client.transaction().await?;
    tx.execute(&lock, &[&WRITE_LOCK]).await?;
    let rows = tx.query(&statement, params).await?;
    tx.commit().await?;
    Ok(rows)
}

/// A duration in microseconds, as the lease columns count.
fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

#[async_trait]
impl SharedStore for PostgresStore {
    fn lease(&self) -> Duration {
        self.lease
    }

    async fn claim(&self, limit: usize, running_here: &[JobId]) -> Result<Vec<Job>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let fail = |e| pg_error("claiming queued jobs", e);
        let client = self.reader().await?;
        // Jobs scheduled for later that are due by now become ready: found through their own
        // index, so the claim below reads ready jobs only however many wait for later. The
        // clock is read once (a subquery), which lets that index find them; a bounded batch,
        // earliest first, so that a mass of jobs due at one moment is not one long lock; and
        // `= ANY(ARRAY(…))` so that the rows are then updated through the primary key (an
        // `IN` may be planned as a join over the whole table).
        let promote = format!(
            "UPDATE jobs SET waits_until = NULL
             WHERE id = ANY(ARRAY(
                 SELECT id FROM jobs
                 WHERE state = 'QUEUED' AND waits_until IS NOT NULL
                     AND waits_until <= (SELECT {NOW_MICROS})
                 ORDER BY waits_until
                 LIMIT {PROMOTE_BATCH}
                 FOR NO KEY UPDATE SKIP LOCKED))"
        );
        // The lock is the one the UPDATE takes anyway: FOR UPDATE would also wait for (and
        // hold up) the writer's inserts that reference these rows. A promote that fails leaves
        // jobs waiting a little longer; the ready ones are claimed regardless.
        let promoted = match client.prepare_cached(&promote).await {
            Ok(statement) => client.execute(&statement, &[]).await,
            Err(error) => Err(error),
        };
        if let Err(error) = promoted {
            tracing::warn!(error = %pg_error("making due jobs ready", error), "claiming anyway");
        }
        // `= ANY(ARRAY(…))`, not `IN (…)`: the planner may run an `IN` subquery again for each
        // row of the outer scan, and with SKIP LOCKED each run picks other rows, so a claim
        // of one job could take all of them.
        let sql = format!(
            "UPDATE jobs SET lease_owner = $1, lease_until = {NOW_MICROS} + $3
             WHERE id = ANY(ARRAY(
                 SELECT id FROM jobs
                 WHERE state = 'QUEUED'
                     AND (lease_owner IS NULL OR lease_until IS NULL
                          OR lease_until < {NOW_MICROS})
                     AND waits_until IS NULL
                     AND NOT (id = ANY($4))
                 ORDER BY priority DESC, ready_at NULLS FIRST, id
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED))
             RETURNING snapshot, cancel_requested"
        );
        let statement = client.prepare_cached(&sql).await.map_err(fail)?;
        let rows = client
            .query(
                &statement,
                &[
                    &self.replica,
                    &sql_limit(limit),
                    &micros(self.lease),
                    &running_here
                        .iter()
                        .map(|id| *id.as_uuid())
                        .collect::<Vec<_>>(),
                ],
            )
            .await
            .map_err(fail)?;
        // A job marked by a Cancel while its last attempt ran, and never carried out (the
        // replica that ran it failed to, or stopped first), comes marked: the claimer cancels
        // it instead of starting it.
        let mut jobs = rows
            .iter()
            .map(|row| reads::snapshot_with_cancel_request(row, "claiming queued jobs"))
            .collect::<Result<Vec<_>, _>>()?;
        {
            let mut held = self.held();
            held.extend(jobs.iter().map(|job| *job.id.as_uuid()));
        }
        // RETURNING keeps no order: the claim's own.
        jobs.sort_by_key(|job| (std::cmp::Reverse(job.priority), job.ready_time(), job.id));
        Ok(jobs)
    }

    async fn renew_leases(&self) -> Result<Renewal, StoreError> {
        let fail = |e| pg_error("renewing leases", e);
        let mut client = self.reader().await?;
        let sql = format!(
            "UPDATE jobs SET lease_until = {NOW_MICROS} + $2
             WHERE lease_owner = $1 AND state IN ('QUEUED', 'RUNNING')
             RETURNING id, cancel_requested"
        );
        let rows = query_under_write_lock(&mut client, &sql, &[&self.replica, &micros(self.lease)])
            .await
            .map_err(fail)?;
        let mut renewal = Renewal::default();
        for row in rows {
            let id = JobId::from(row.try_get::<_, uuid::Uuid>(0).map_err(fail)?);
            if row.try_get::<_, bool>(1).map_err(fail)? {
                renewal.cancel_requested.push(id);
            }
            renewal.held.push(id);
        }
        Ok(renewal)
    }

    async fn release(&self, id: JobId) -> Result<bool, StoreError> {
        let fail = |e| pg_error(format!("releasing job {id}"), e);
        let client = self.reader().await?;
        // The mark is read in the same statement: a Cancel that marked the job before this
        // is seen here, and one after finds it QUEUED (see `request_cancel`).
        let statement = client
            .prepare_cached(
                "UPDATE jobs SET lease_owner = NULL, lease_until = NULL
                 WHERE id = $1 AND lease_owner = $2 AND state = 'QUEUED'
                 RETURNING cancel_requested",
            )
            .await
            .map_err(fail)?;
        let row = client
            .query_opt(&statement, &[id.as_uuid(), &self.replica])
            .await
            .map_err(fail)?;
        self.held().remove(id.as_uuid());
        match row {
            Some(row) => row.try_get(0).map_err(fail),
            None => Ok(false),
        }
    }

    async fn queued_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let fail = |e| pg_error("counting queued jobs", e);
        let client = self.reader().await?;
        let statement = client
            .prepare_cached(
                "SELECT tenant, count(*) FROM jobs WHERE state = 'QUEUED' GROUP BY tenant",
            )
            .await
            .map_err(fail)?;
        let rows = client.query(&statement, &[]).await.map_err(fail)?;
        let mut counts = Vec::with_capacity(rows.len());
        for row in rows {
            let count: i64 = row.try_get(1).map_err(fail)?;
            counts.push((
                row.try_get(0).map_err(fail)?,
                u64::try_from(count).unwrap_or(0),
            ));
        }
        Ok(counts)
    }

    async fn release_all(&self) -> Result<u64, StoreError> {
        let fail = |e| pg_error("releasing queued jobs", e);
        let mut client = self.reader().await?;
        let rows = query_under_write_lock(
            &mut client,
            "UPDATE jobs SET lease_owner = NULL, lease_until = NULL
             WHERE lease_owner = $1 AND state = 'QUEUED'
             RETURNING id",
            &[&self.replica],
        )
        .await
        .map_err(fail)?;
        let mut held = self.held();
        for row in &rows {
            let id: uuid::Uuid = row.try_get(0).map_err(fail)?;
            held.remove(&id);
        }
        Ok(rows.len() as u64)
    }

    async fn expired(&self, limit: usize) -> Result<Vec<Job>, StoreError> {
        let fail = |e| pg_error("reading jobs whose lease ran out", e);
        let client = self.reader().await?;
        let sql = format!(
            "SELECT snapshot, cancel_requested FROM jobs
             WHERE state = 'RUNNING' AND (lease_until IS NULL OR lease_until < {NOW_MICROS})
             ORDER BY id
             LIMIT $1"
        );
        let statement = client.prepare_cached(&sql).await.map_err(fail)?;
        let rows = client
            .query(&statement, &[&sql_limit(limit)])
            .await
            .map_err(fail)?;
        // A Cancel made on another replica that the dead one never stored in the snapshot
        // still stands.
        rows.iter()
            .map(|row| reads::snapshot_with_cancel_request(row, "reading jobs whose lease ran out"))
            .collect()
    }

    async fn save_expired(&self, job: &Job) -> Result<(), StoreError> {
        let mut row = JobRow::encode(job)?;
        row.lease = LeaseCheck::Expired;
        self.write(|reply| Command::Save { row, reply }).await
    }

    async fn claim_delivery(
        &self,
        id: uuid::Uuid,
        now: SystemTime,
        hold: Duration,
    ) -> Result<bool, StoreError> {
        let fail = |e| pg_error(format!("claiming webhook delivery {id}"), e);
        let client = self.reader().await?;
        let statement = client
            .prepare_cached(
                "UPDATE webhook_deliveries SET next_attempt_at = $2 + $3
                 WHERE id = $1 AND state = 'PENDING' AND next_attempt_at <= $2",
            )
            .await
            .map_err(fail)?;
        let claimed = client
            .execute(&statement, &[&id, &unix_micros(now), &micros(hold)])
            .await
            .map_err(fail)?;
        Ok(claimed == 1)
    }

    async fn request_cancel(&self, id: JobId) -> Result<bool, StoreError> {
        let fail = |e| pg_error(format!("requesting the cancel of job {id}"), e);
        let client = self.reader().await?;
        // One statement: the mark and the notification commit together.
        let statement = client
            .prepare_cached(
                "WITH marked AS (
                     UPDATE jobs SET cancel_requested = true
                     WHERE id = $1 AND state = 'RUNNING'
                     RETURNING id)
                 SELECT pg_notify($2, id::text) FROM marked",
            )
            .await
            .map_err(fail)?;
        let marked = client
            .execute(&statement, &[id.as_uuid(), &CANCEL_CHANNEL])
            .await
            .map_err(fail)?;
        Ok(marked == 1)
    }

    async fn feed(&self) -> Result<mpsc::Receiver<Change>, StoreError> {
        feed::start(self.config.clone(), self.readers.clone(), self.replica).await
    }
}
