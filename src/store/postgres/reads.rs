//! Reads: each runs on a pooled connection, never on the writer's, so a read never waits
//! behind a batch being written. Every read is one statement, so it sees one snapshot of the
//! database: the marks a read of the event log reports agree with the rows it returns.

use std::{collections::BTreeMap, time::SystemTime};

use deadpool_postgres::ClientWrapper;
use tokio_postgres::{Row, types::ToSql};
use uuid::Uuid;

use super::{
    pg_error,
    row::{decode, from_unix_micros, sql_limit, unix_micros},
};
use crate::job::{Delivery, DeliveryState, Job, JobId, JobState};
use crate::store::{DueDelivery, EventPage, ListQuery, StoreError};

/// The columns [`delivery_from_row`] reads, in its order.
pub(super) const DELIVERY_COLUMNS: &str = "d.id, d.job_id, d.job_version, d.job_state, d.state, \
     d.attempts, d.last_error, d.next_attempt_at, d.delivered_at, d.created_at";

/// A query's parameters, built alongside its text.
type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// Runs a statement (prepared once per connection) with dynamically built parameters.
async fn query(
    client: &ClientWrapper,
    context: &str,
    sql: &str,
    params: &Params,
) -> Result<Vec<Row>, StoreError> {
    let fail = |e| pg_error(context, e);
    let statement = client.prepare_cached(sql).await.map_err(fail)?;
    let params: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    client.query(&statement, &params).await.map_err(fail)
}

/// Decodes the snapshot in column `column` of each row.
fn snapshots(rows: &[Row], column: usize, context: &str) -> Result<Vec<Job>, StoreError> {
    rows.iter()
        .map(|row| {
            let snapshot: &str = row.try_get(column).map_err(|e| pg_error(context, e))?;
            decode(snapshot)
        })
        .collect()
}

/// A row of `snapshot, cancel_requested`: the snapshot, marked `cancel_requested` when the
/// column says a Cancel made on any replica (`request_cancel`) is stored for the running job,
/// which its replica writes into the snapshot only once it has been told (or never, if it
/// died first). A QUEUED job keeps the mark its last attempt got as it ended (a retry, an
/// interruption): whoever takes it from the queue, a claim or a read, cancels it instead of
/// starting it.
pub(super) fn snapshot_with_cancel_request(row: &Row, context: &str) -> Result<Job, StoreError> {
    let snapshot: &str = row.try_get(0).map_err(|e| pg_error(context, e))?;
    let requested: bool = row.try_get(1).map_err(|e| pg_error(context, e))?;
    let mut job = decode(snapshot)?;
    job.cancel_requested |= requested && !job.is_terminal();
    Ok(job)
}

/// The job's current snapshot, marked `cancel_requested` as soon as the request is stored.
pub(super) async fn get(client: &ClientWrapper, id: JobId) -> Result<Option<Job>, StoreError> {
    one_job(
        client,
        "SELECT snapshot, cancel_requested FROM jobs WHERE id = $1",
        &vec![Box::new(*id.as_uuid())],
    )
    .await
}

/// The job a `SELECT snapshot, cancel_requested` of at most one row finds.
async fn one_job(
    client: &ClientWrapper,
    sql: &str,
    params: &Params,
) -> Result<Option<Job>, StoreError> {
    let context = "reading a job";
    let rows = query(client, context, sql, params).await?;
    rows.first()
        .map(|row| snapshot_with_cancel_request(row, context))
        .transpose()
}

/// The job's current snapshot, as [`get`] reads it, if it belongs to `tenant`. Another
/// tenant's row is matched on its tenant column and its snapshot (stored out of line when
/// large) is never fetched.
pub(super) async fn get_owned(
    client: &ClientWrapper,
    id: JobId,
    tenant: &str,
) -> Result<Option<Job>, StoreError> {
    one_job(
        client,
        "SELECT snapshot, cancel_requested FROM jobs WHERE id = $1 AND tenant = $2",
        &vec![Box::new(*id.as_uuid()), Box::new(tenant.to_owned())],
    )
    .await
}

/// Whether job `id` exists and belongs to `tenant`, from the row alone: a large snapshot is
/// stored out of line (TOAST) and never fetched.
pub(super) async fn owned_by(
    client: &ClientWrapper,
    id: JobId,
    tenant: &str,
) -> Result<bool, StoreError> {
    let context = "checking a job's tenant";
    let rows = query(
        client,
        context,
        "SELECT EXISTS (SELECT 1 FROM jobs WHERE id = $1 AND tenant = $2)",
        &vec![Box::new(*id.as_uuid()), Box::new(tenant.to_owned())],
    )
    .await?;
    match rows.first() {
        Some(row) => row.try_get(0).map_err(|e| pg_error(context, e)),
        None => Ok(false),
    }
}

/// The job of `tenant` holding idempotency key `key`.
pub(super) async fn by_idempotency_key(
    client: &ClientWrapper,
    tenant: &str,
    key: &str,
) -> Result<Option<Job>, StoreError> {
    let context = "reading a job by its idempotency key";
    let rows = query(
        client,
        context,
        "SELECT snapshot FROM jobs WHERE tenant = $1 AND idempotency_key = $2",
        &vec![Box::new(tenant.to_owned()), Box::new(key.to_owned())],
    )
    .await?;
    Ok(snapshots(&rows, 0, context)?.pop())
}

/// The job's logged snapshots after `after_version`, oldest first.
pub(super) async fn transitions(
    client: &ClientWrapper,
    id: JobId,
    after_version: i64,
) -> Result<Vec<Job>, StoreError> {
    let context = "reading a job's transitions";
    let rows = query(
        client,
        context,
        "SELECT snapshot FROM log WHERE job_id = $1 AND version > $2 ORDER BY version",
        &vec![Box::new(*id.as_uuid()), Box::new(after_version)],
    )
    .await?;
    snapshots(&rows, 0, context)
}

/// Every QUEUED or RUNNING job, oldest first.
pub(super) async fn unfinished(client: &ClientWrapper) -> Result<Vec<Job>, StoreError> {
    let context = "reading unfinished jobs";
    let rows = query(
        client,
        context,
        "SELECT snapshot FROM jobs WHERE state IN ('QUEUED', 'RUNNING') ORDER BY id",
        &Vec::new(),
    )
    .await?;
    snapshots(&rows, 0, context)
}

/// A page of jobs, newest first, filtered and limited in SQL.
pub(super) async fn list(client: &ClientWrapper, q: &ListQuery) -> Result<Vec<Job>, StoreError> {
    let context = "listing jobs";
    let mut states: Vec<String> = q.states.iter().map(|s| s.as_str().to_owned()).collect();
    states.sort();
    states.dedup();
    if states.len() == JobState::ALL.len() {
        states.clear();
    }
    let mut sql = "SELECT j.snapshot FROM jobs j WHERE true".to_owned();
    let mut params: Params = Vec::new();
    if let Some(before) = q.before {
        params.push(Box::new(*before.as_uuid()));
        sql.push_str(&format!(" AND j.id < ${}", params.len()));
    }
    if let Some(tenant) = &q.tenant {
        params.push(Box::new(tenant.clone()));
        sql.push_str(&format!(" AND j.tenant = ${}", params.len()));
    }
    if !states.is_empty() {
        params.push(Box::new(states));
        sql.push_str(&format!(" AND j.state = ANY(${})", params.len()));
    }
    label_filter("j.id", &q.labels, &mut sql, &mut params);
    params.push(Box::new(sql_limit(q.limit)));
    sql.push_str(&format!(" ORDER BY j.id DESC LIMIT ${}", params.len()));
    let rows = query(client, context, &sql, &params).await?;
    snapshots(&rows, 0, context)
}

/// Up to `limit` logged snapshots after `after_seq` of jobs of `tenant` (any when `None`)
/// carrying every one of `labels`, with the log's marks read in the same statement.
pub(super) async fn events_after(
    client: &ClientWrapper,
    after_seq: i64,
    tenant: Option<&str>,
    labels: &BTreeMap<String, String>,
    limit: usize,
) -> Result<EventPage, StoreError> {
    let context = "reading the event log";
    let mut params: Params = vec![Box::new(after_seq)];
    let mut filter = String::new();
    if let Some(tenant) = tenant {
        params.push(Box::new(tenant.to_owned()));
        filter.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = l.job_id AND j.tenant = ${})",
            params.len()
        ));
    }
    label_filter("l.job_id", labels, &mut filter, &mut params);
    params.push(Box::new(sql_limit(limit)));
    let limit_param = params.len();
    // Jobs removed by DeleteJob count only where they could have matched (migration 4).
    let mut deleted = String::new();
    if let Some(tenant) = tenant {
        params.push(Box::new(tenant.to_owned()));
        deleted.push_str(&format!(" AND r.tenant = ${}", params.len()));
    }
    if !labels.is_empty() {
        let selector = serde_json::to_string(labels)
            .map_err(|e| StoreError::Corrupt(format!("label selector: {e}")))?;
        params.push(Box::new(selector));
        deleted.push_str(&format!(" AND r.labels @> ${}::text::jsonb", params.len()));
    }
    // The LEFT JOIN keeps the marks' row when no event matches.
    let sql = format!(
        "SELECT m.head,
                greatest(m.removed_through, (SELECT coalesce(max(r.seq), 0) FROM removed_jobs r
                                             WHERE r.seq > $1{deleted})),
                e.seq, e.snapshot
         FROM event_log m LEFT JOIN LATERAL (
             SELECT l.seq, l.snapshot FROM log l
             WHERE l.seq > $1{filter}
             ORDER BY l.seq LIMIT ${limit_param}
         ) e ON true
         WHERE m.id = 1
         ORDER BY e.seq"
    );
    let rows = query(client, context, &sql, &params).await?;
    let fail = |e| pg_error(context, e);
    let mut page = EventPage::default();
    let mut head = 0;
    for row in &rows {
        head = row.try_get(0).map_err(fail)?;
        page.removed_through = row.try_get(1).map_err(fail)?;
        if let Some(seq) = row.try_get::<_, Option<i64>>(2).map_err(fail)? {
            let snapshot: &str = row.try_get(3).map_err(fail)?;
            page.events.push((seq, decode(snapshot)?));
        }
    }
    page.scanned_to = match page.events.last() {
        Some((seq, _)) if page.events.len() >= limit => *seq,
        _ => head,
    };
    Ok(page)
}

/// Every QUEUED or RUNNING job of `tenant` (any when `None`) carrying every one of `labels`,
/// oldest first, and the newest event's number, in one statement (one snapshot).
pub(super) async fn unfinished_at(
    client: &ClientWrapper,
    tenant: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> Result<(i64, Vec<Job>), StoreError> {
    let context = "reading unfinished jobs";
    let mut params: Params = Vec::new();
    let mut filter = String::new();
    if let Some(tenant) = tenant {
        params.push(Box::new(tenant.to_owned()));
        filter.push_str(&format!(" AND j.tenant = ${}", params.len()));
    }
    label_filter("j.id", labels, &mut filter, &mut params);
    let sql = format!(
        "SELECT m.head, u.snapshot
         FROM event_log m LEFT JOIN LATERAL (
             SELECT j.id, j.snapshot FROM jobs j
             WHERE j.state IN ('QUEUED', 'RUNNING'){filter}
         ) u ON true
         WHERE m.id = 1
         ORDER BY u.id"
    );
    let rows = query(client, context, &sql, &params).await?;
    let fail = |e| pg_error(context, e);
    let mut head = 0;
    let mut jobs = Vec::new();
    for row in &rows {
        head = row.try_get(0).map_err(fail)?;
        if let Some(snapshot) = row.try_get::<_, Option<&str>>(1).map_err(fail)? {
            jobs.push(decode(snapshot)?);
        }
    }
    Ok((head, jobs))
}

/// Appends one `EXISTS` per label: each is a primary-key lookup in `job_labels`.
fn label_filter(
    job_id: &str,
    labels: &BTreeMap<String, String>,
    sql: &mut String,
    params: &mut Params,
) {
    for (key, value) in labels {
        params.push(Box::new(key.clone()));
        params.push(Box::new(value.clone()));
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM job_labels x
                          WHERE x.job_id = {job_id} AND x.key = ${} AND x.value = ${})",
            params.len() - 1,
            params.len()
        ));
    }
}

/// The job's deliveries, oldest first.
pub(super) async fn deliveries(
    client: &ClientWrapper,
    id: JobId,
) -> Result<Vec<Delivery>, StoreError> {
    let rows = query(
        client,
        &format!("reading the deliveries of job {id}"),
        &format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d
             WHERE d.job_id = $1 ORDER BY d.job_version"
        ),
        &vec![Box::new(*id.as_uuid())],
    )
    .await?;
    rows.iter().map(delivery_from_row).collect()
}

/// Up to `limit` pending deliveries due at `now`, the longest due first, with their snapshots;
/// only the oldest pending delivery of each job, so a job's notifications go out in order.
pub(super) async fn due(
    client: &ClientWrapper,
    now: SystemTime,
    limit: usize,
) -> Result<Vec<DueDelivery>, StoreError> {
    let context = "reading due webhook deliveries";
    let rows = query(
        client,
        context,
        &format!(
            "SELECT {DELIVERY_COLUMNS}, t.snapshot FROM webhook_deliveries d
             JOIN log t ON t.job_id = d.job_id AND t.version = d.job_version
             WHERE d.state = 'PENDING' AND d.next_attempt_at <= $1
               AND NOT EXISTS (
                   SELECT 1 FROM webhook_deliveries e
                   WHERE e.job_id = d.job_id AND e.job_version < d.job_version
                     AND e.state = 'PENDING')
             ORDER BY d.next_attempt_at, d.id
             LIMIT $2"
        ),
        &vec![Box::new(unix_micros(now)), Box::new(sql_limit(limit))],
    )
    .await?;
    rows.iter()
        .map(|row| {
            let snapshot: &str = row.try_get(10).map_err(|e| pg_error(context, e))?;
            Ok(DueDelivery {
                delivery: delivery_from_row(row)?,
                job: decode(snapshot)?,
            })
        })
        .collect()
}

/// How many deliveries are pending.
pub(super) async fn pending(client: &ClientWrapper) -> Result<usize, StoreError> {
    let context = "counting pending webhook deliveries";
    let rows = query(
        client,
        context,
        "SELECT count(*) FROM webhook_deliveries WHERE state = 'PENDING'",
        &Vec::new(),
    )
    .await?;
    let count: i64 = match rows.first() {
        Some(row) => row.try_get(0).map_err(|e| pg_error(context, e))?,
        None => 0,
    };
    Ok(usize::try_from(count).unwrap_or(0))
}

/// A delivery from a row of [`DELIVERY_COLUMNS`]; a value that does not parse is corruption.
pub(super) fn delivery_from_row(row: &Row) -> Result<Delivery, StoreError> {
    let read = |e| pg_error("reading a webhook delivery", e);
    let corrupt = |what: &str, value: &str| {
        StoreError::Corrupt(format!("webhook delivery: bad {what} {value:?}"))
    };
    let id: Uuid = row.try_get(0).map_err(read)?;
    let job_id: Uuid = row.try_get(1).map_err(read)?;
    let job_state: &str = row.try_get(3).map_err(read)?;
    let state: &str = row.try_get(4).map_err(read)?;
    let attempts: i64 = row.try_get(5).map_err(read)?;
    Ok(Delivery {
        id,
        job_id: JobId::from(job_id),
        job_version: row.try_get(2).map_err(read)?,
        job_state: job_state
            .parse()
            .map_err(|_| corrupt("job state", job_state))?,
        state: state
            .parse::<DeliveryState>()
            .map_err(|_| corrupt("state", state))?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        last_error: row.try_get(6).map_err(read)?,
        next_attempt_at: row
            .try_get::<_, Option<i64>>(7)
            .map_err(read)?
            .map(from_unix_micros),
        delivered_at: row
            .try_get::<_, Option<i64>>(8)
            .map_err(read)?
            .map(from_unix_micros),
        created_at: from_unix_micros(row.try_get(9).map_err(read)?),
    })
}
