//! Reads: read-only connections on blocking threads, so a read never waits behind the writer
//! (WAL lets readers see the last commit while a batch is being written) and never blocks the
//! async runtime.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rusqlite::{Connection, OpenFlags, Rows, types::Value};

use super::{
    row::{CURRENT_SNAPSHOT, decode, id_text},
    sql_error,
};
use crate::job::{Job, JobId, JobState};
use crate::store::{ListQuery, StoreError};

/// A small pool of read-only connections, opened on demand. At most `max_idle` reads run at
/// once: more would each open (and parse the schema of) a fresh connection, which costs more
/// than the wait for a pooled one, and a 2-core machine gains nothing from them.
pub(super) struct Readers {
    path: PathBuf,
    busy_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<Connection>>,
    permits: tokio::sync::Semaphore,
    closed: AtomicBool,
}

impl Readers {
    pub fn new(path: PathBuf, busy_timeout: Duration, max_idle: usize) -> Self {
        Self {
            path,
            busy_timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(max_idle.max(1)),
            closed: AtomicBool::new(false),
        }
    }

    /// Opens one connection now, so that a database we cannot read fails at startup.
    pub fn warm_up(&self) -> Result<(), StoreError> {
        let conn = self.open()?;
        self.put(conn);
        Ok(())
    }

    /// Runs `read` on a pooled connection on a blocking thread.
    pub async fn run<T, F>(self: &Arc<Self>, read: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        let readers = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let conn = readers.take()?;
            let result = read(&conn);
            readers.put(conn);
            result
        })
        .await
        .map_err(|e| StoreError::backend("reading from the store", e))?
    }

    /// Closes the idle connections and refuses further reads.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.lock_idle().clear();
    }

    fn take(&self) -> Result<Connection, StoreError> {
        match self.lock_idle().pop() {
            Some(conn) => Ok(conn),
            None => self.open(),
        }
    }

    fn put(&self, conn: Connection) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut idle = self.lock_idle();
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        // Only pushes and pops happen under the lock; a panic cannot leave it half-changed.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open(&self) -> Result<Connection, StoreError> {
        open_reader(&self.path, self.busy_timeout)
    }
}

/// A read-only connection to the database at `path`, which never takes the write lock.
pub(super) fn open_reader(
    path: &std::path::Path,
    busy_timeout: std::time::Duration,
) -> Result<Connection, StoreError> {
    let fail = |e| sql_error(format!("opening {} for reading", path.display()), e);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fail)?;
    conn.busy_timeout(busy_timeout).map_err(fail)?;
    Ok(conn)
}

/// The job's current snapshot.
pub(super) fn get(conn: &Connection, id: JobId) -> Result<Option<Job>, StoreError> {
    let mut jobs = query_jobs(
        conn,
        "reading a job",
        &format!("SELECT {CURRENT_SNAPSHOT} FROM jobs j WHERE j.id = ?1"),
        &[Value::Text(id_text(id))],
    )?;
    Ok(jobs.pop())
}

/// The job's current snapshot if it belongs to `tenant`. The row is found through the
/// `(tenant, id)` index, as [`owned_by`] finds it: another tenant's job is never read.
pub(super) fn get_owned(
    conn: &Connection,
    id: JobId,
    tenant: String,
) -> Result<Option<Job>, StoreError> {
    let mut jobs = query_jobs(
        conn,
        "reading a job",
        &format!(
            "SELECT {CURRENT_SNAPSHOT} FROM jobs j INDEXED BY jobs_tenant_id \
             WHERE j.tenant = ?1 AND j.id = ?2"
        ),
        &[Value::Text(tenant), Value::Text(id_text(id))],
    )?;
    Ok(jobs.pop())
}

/// [`owned_by`]'s query: `?1` the tenant, `?2` the job id.
pub(super) const OWNED_BY: &str =
    "SELECT EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_tenant_id WHERE tenant = ?1 AND id = ?2)";

/// Whether job `id` exists and belongs to `tenant`. The `(tenant, id)` index answers it alone:
/// the row itself, whose tenant column sits behind the snapshot (and, for a large job, behind
/// its overflow pages), is never read.
pub(super) fn owned_by(conn: &Connection, id: JobId, tenant: String) -> Result<bool, StoreError> {
    let fail = |e| sql_error("checking a job's tenant", e);
    let mut statement = conn.prepare_cached(OWNED_BY).map_err(fail)?;
    statement
        .query_row([tenant, id_text(id)], |row| row.get(0))
        .map_err(fail)
}

/// The job holding idempotency key `scoped_key` (as stored: see `row::scoped_key`).
pub(super) fn by_idempotency_key(
    conn: &Connection,
    scoped_key: String,
) -> Result<Option<Job>, StoreError> {
    let mut jobs = query_jobs(
        conn,
        "reading a job by its idempotency key",
        &format!("SELECT {CURRENT_SNAPSHOT} FROM jobs j WHERE j.idempotency_key = ?1"),
        &[Value::Text(scoped_key)],
    )?;
    Ok(jobs.pop())
}

/// The job's logged snapshots after `after_version`, oldest first.
pub(super) fn transitions(
    conn: &Connection,
    id: JobId,
    after_version: i64,
) -> Result<Vec<Job>, StoreError> {
    query_jobs(
        conn,
        "reading a job's transitions",
        "SELECT snapshot FROM log WHERE job_id = ?1 AND version > ?2 ORDER BY version",
        &[Value::Text(id_text(id)), Value::Integer(after_version)],
    )
}

/// Every QUEUED or RUNNING job, oldest first.
pub(super) fn unfinished(conn: &Connection) -> Result<Vec<Job>, StoreError> {
    query_jobs(
        conn,
        "reading unfinished jobs",
        &format!(
            "SELECT {CURRENT_SNAPSHOT} FROM jobs j WHERE j.state IN ('QUEUED', 'RUNNING') \
             ORDER BY j.id"
        ),
        &[],
    )
}

/// A page of jobs, newest first, filtered and limited in SQL.
pub(super) fn list(conn: &Connection, query: &ListQuery) -> Result<Vec<Job>, StoreError> {
    let mut states = query.states.clone();
    states.sort_by_key(|state| state.as_str());
    states.dedup();
    if states.len() == JobState::ALL.len() {
        states.clear();
    }
    let mut sql = String::new();
    let mut args = Vec::new();
    if states.len() <= 1 {
        list_arm(query, states.first().copied(), &mut sql, &mut args);
    } else {
        // One arm per state, each read newest first from an index; SQLite merges the arms
        // and stops at the limit, where `state IN (...)` would sort every matching job.
        for (i, state) in states.into_iter().enumerate() {
            if i > 0 {
                sql.push_str(" UNION ALL ");
            }
            list_arm(query, Some(state), &mut sql, &mut args);
        }
    }
    sql.push_str(" ORDER BY 2 DESC LIMIT ?");
    args.push(Value::Integer(
        i64::try_from(query.limit).unwrap_or(i64::MAX),
    ));
    query_jobs(conn, "listing jobs", &sql, &args)
}

/// One `SELECT snapshot, id` of a list query: the jobs passing every filter, in one state or
/// in any.
fn list_arm(query: &ListQuery, state: Option<JobState>, sql: &mut String, args: &mut Vec<Value>) {
    let mut labels = query.labels.iter();
    // With a label filter, the first label drives the scan through job_labels_lookup, which
    // yields that label's jobs already in id order: no sort, and it stops at the limit.
    let id = match labels.next() {
        Some((key, value)) => {
            sql.push_str(&format!(
                "SELECT {CURRENT_SNAPSHOT}, lb.job_id FROM job_labels lb
                 JOIN jobs j ON j.id = lb.job_id
                 WHERE lb.key = ? AND lb.value = ?"
            ));
            args.extend([Value::Text(key.clone()), Value::Text(value.clone())]);
            "lb.job_id"
        }
        None => {
            sql.push_str(&format!(
                "SELECT {CURRENT_SNAPSHOT}, j.id FROM jobs j WHERE 1"
            ));
            "j.id"
        }
    };
    if let Some(before) = query.before {
        sql.push_str(&format!(" AND {id} < ?"));
        args.push(Value::Text(id_text(before)));
    }
    if let Some(tenant) = &query.tenant {
        sql.push_str(" AND j.tenant = ?");
        args.push(Value::Text(tenant.clone()));
    }
    if let Some(state) = state {
        sql.push_str(" AND j.state = ?");
        args.push(Value::Text(state.as_str().to_owned()));
    }
    for (key, value) in labels {
        sql.push_str(
            " AND EXISTS (SELECT 1 FROM job_labels x
                          WHERE x.job_id = j.id AND x.key = ? AND x.value = ?)",
        );
        args.extend([Value::Text(key.clone()), Value::Text(value.clone())]);
    }
}

/// Runs a query whose only column is a job snapshot, and decodes each.
fn query_jobs(
    conn: &Connection,
    context: &str,
    sql: &str,
    args: &[Value],
) -> Result<Vec<Job>, StoreError> {
    let fail = |e| sql_error(context, e);
    let mut statement = conn.prepare_cached(sql).map_err(fail)?;
    let rows = statement
        .query(rusqlite::params_from_iter(args))
        .map_err(fail)?;
    decode_rows(rows, context)
}

fn decode_rows(mut rows: Rows<'_>, context: &str) -> Result<Vec<Job>, StoreError> {
    let fail = |e| sql_error(context, e);
    let mut jobs = Vec::new();
    while let Some(row) = rows.next().map_err(fail)? {
        let snapshot =
            row.get_ref(0).map_err(fail)?.as_str().map_err(|e| {
                StoreError::Corrupt(format!("{context}: snapshot is not text: {e}"))
            })?;
        jobs.push(decode(snapshot)?);
    }
    Ok(jobs)
}
