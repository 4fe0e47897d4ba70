//! The PostgreSQL store: the same [`Store`] over tokio-postgres and a deadpool connection
//! pool, so that the jobs live in a database shared by whatever uses it.
//!
//! Writes go to one writer task per store that commits them in groups (see [`writer`]) on its
//! own connection; reads run on pooled connections and never wait for it. The schema lives in
//! the first schema of the connection's `search_path` (`public` unless the URL says otherwise,
//! e.g. `?options=-csearch_path%3Dlongrun`), and is migrated at open (see [`schema`]).
//!
//! Several replicas may serve one database: each store is one replica, with a random replica id,
//! and implements [`SharedStore`]: QUEUED jobs are claimed under leases (see [`lease`]), every
//! write batch that logs events notifies the other replicas, and each replica's change feed
//! (see [`feed`]) follows the log. [`PostgresOptions::exclusive`] still lets a process insist on
//! being the only one.

mod feed;
mod lease;
mod ops;
mod reads;
mod row;
mod schema;
mod writer;

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, atomic::Ordering},
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::{NoTls, error::SqlState};

use self::{
    ops::{CreateOutcome, DeleteOutcome},
    row::{JobRow, LeaseCheck, decode, sql_limit, unix_micros},
    writer::{Command, Counters, Writer},
};
use super::{
    Created, Deleted, DueDelivery, EventPage, ListQuery, SharedStore, Store, StoreError,
    batch::Reply,
};
use crate::job::{AttemptOutcome, Delivery, Job, JobId};
use crate::log_throttle::LogThrottle;

/// Advisory lock keys: the first half of each two-key lock. The second half is
/// `hashtext(current_schema())`, so stores in different schemas of one database (the tests
/// run many at once) never wait for each other; a hash collision only costs some waiting.
///
/// Held by a transaction migrating the schema.
pub(super) const MIGRATION_LOCK: i32 = 0x6c72_0001;
/// Held by every write transaction, so that event numbers are committed in order (writer.rs).
pub(super) const WRITE_LOCK: i32 = 0x6c72_0002;
/// Held for an exclusive store's whole life (session level), so only one serves a database.
pub(super) const SERVE_LOCK: i32 = 0x6c72_0003;

/// The channel every write batch that logs events notifies, with the log's head as payload.
pub(super) const EVENTS_CHANNEL: &str = "longrun_events";
/// The channel cancel requests go to, with the job id as payload.
pub(super) const CANCEL_CHANNEL: &str = "longrun_cancel";
/// The channel a write batch that saves progress (not logged) notifies, once per job, with the
/// job id as payload: the other replicas' watchers then see progress too, as often as it is
/// written (at most about once a second per job).
pub(super) const PROGRESS_CHANNEL: &str = "longrun_progress";

/// Tuning for [`PostgresStore`]; the defaults suit a small server.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// The most write commands committed in one transaction. Default 512.
    pub max_batch: usize,
    /// Write commands that may wait for the writer; past that, writers wait to be queued.
    /// Default 4096.
    pub queue_capacity: usize,
    /// Pooled connections for reads (the writer has its own). Default 8.
    pub read_connections: usize,
    /// How long to wait for a new connection, when the URL does not say. Default 10 s.
    pub connect_timeout: Duration,
    /// Hold a session advisory lock for the store's whole life, and fail with
    /// [`StoreError::ReplicaRunning`] if another store holds it: for a process that must be
    /// the only one on its database. Default false: several replicas may share it.
    pub exclusive: bool,
    /// How long a replica's claim on a job lasts unless renewed (it renews every third of it):
    /// a replica that dies loses its jobs to the others after at most this long. Default 30 s.
    pub lease: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            max_batch: 512,
            queue_capacity: 4096,
            read_connections: 8,
            connect_timeout: Duration::from_secs(10),
            exclusive: false,
            lease: Duration::from_secs(30),
        }
    }
}

/// What the writer has committed since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostgresStats {
    /// Transactions committed.
    pub batches: u64,
    /// Write commands those transactions carried.
    pub commands: u64,
}

/// Jobs in a PostgreSQL database, durable once a call returns.
///
/// Dropping the store lets the writer commit what is queued in the background;
/// [`PostgresStore::close`] waits for it.
pub struct PostgresStore {
    commands: mpsc::Sender<Command>,
    stopped: watch::Receiver<bool>,
    counters: Arc<Counters>,
    readers: Pool,
    /// The connection holding the serve lock, when opened exclusive; closing it releases it.
    serve_lock: Mutex<Option<tokio_postgres::Client>>,
    /// Where the change feed connects (its own connection, outside the pools).
    config: tokio_postgres::Config,
    /// This replica's id: the owner of the leases it takes.
    replica: uuid::Uuid,
    lease: Duration,
    /// The jobs this replica holds a lease on (claimed, not yet ended or released), whose saves
    /// must still hold it.
    held: Mutex<HashSet<uuid::Uuid>>,
}

impl PostgresStore {
    /// Connects to the database at `url` (a `postgres://` URL or a libpq key=value string),
    /// migrating its schema to the newest.
    ///
    /// Fails with [`StoreError::IncompatibleSchema`] if a newer longrun wrote the schema, and,
    /// when [`PostgresOptions::exclusive`], with [`StoreError::ReplicaRunning`] at once if
    /// another exclusive store holds the database.
    pub async fn open(url: &str, options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        // The URL may hold a password: it never goes into an error or a log line.
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| pg_error("parsing the PostgreSQL URL", e))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        let readers = pool(
            &config,
            options.read_connections.max(1),
            options.connect_timeout,
        )?;
        let writer_pool = pool(&config, 1, options.connect_timeout)?;

        let mut client = writer_pool.get().await.map_err(pool_error)?;
        let database = describe(&config, &client).await?;
        let serve_lock = if options.exclusive {
            Some(lock_for_serving(&config, &database).await?)
        } else {
            None
        };
        schema::migrate(&mut client).await?;
        drop(client);
        // One read now, so that a database we cannot read fails at startup.
        drop(readers.get().await.map_err(pool_error)?);

        let (commands, queue) = mpsc::channel(options.queue_capacity.max(1));
        let (stopped_tx, stopped) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        tokio::spawn(
            Writer {
                pool: writer_pool,
                commands: queue,
                max_batch: options.max_batch.max(1),
                counters: Arc::clone(&counters),
                failures: LogThrottle::default(),
                stopped: stopped_tx,
            }
            .run(),
        );
        let replica = uuid::Uuid::now_v7();
        // At info: the id is what `jobs.lease_owner` holds, and an operator maps leases to
        // processes by it.
        tracing::info!(%database, replica_id = %replica, "PostgreSQL store open");
        Ok(PostgresStore {
            commands,
            stopped,
            counters,
            readers,
            serve_lock: Mutex::new(serve_lock),
            replica,
            lease: options.lease.max(Duration::from_millis(10)),
            config,
            held: Mutex::new(HashSet::new()),
        })
    }

    /// This replica's id: the lease owner of the jobs it claims, and (as
    /// `longrun-feed-<id>`) the `application_name` of its change feed's connection.
    pub fn replica_id(&self) -> uuid::Uuid {
        self.replica
    }

    /// The jobs this replica holds.
    fn held(&self) -> MutexGuard<'_, HashSet<uuid::Uuid>> {
        // Single set operations only: a poisoned lock still holds a consistent set.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Batches and commands committed so far.
    pub fn stats(&self) -> PostgresStats {
        PostgresStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            commands: self.counters.commands.load(Ordering::Relaxed),
        }
    }

    /// Commits every write already queued, then closes the connections (releasing the serve
    /// lock). Later calls fail with [`StoreError::Closed`].
    pub async fn close(&self) {
        self.readers.close();
        // An error means the writer is already stopping; waiting below covers both.
        let _ = self.commands.send(Command::Close).await;
        let mut stopped = self.stopped.clone();
        // An error means the writer task is gone (it dropped its side): stopped as well.
        let _ = stopped.wait_for(|stopped| *stopped).await;
        self.serve_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// Sends a write to the writer and waits until it is committed.
    async fn write<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// A pooled connection for a read.
    async fn reader(&self) -> Result<Object, StoreError> {
        self.readers.get().await.map_err(pool_error)
    }
}

/// A connection pool over `config`.
fn pool(
    config: &tokio_postgres::Config,
    size: usize,
    connect_timeout: Duration,
) -> Result<Pool, StoreError> {
    let manager = Manager::from_config(
        config.clone(),
        NoTls,
        ManagerConfig {
            // Checks only that the connection is open: every statement we run checks the rest.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(connect_timeout))
        .build()
        .map_err(|e| StoreError::backend("building the PostgreSQL connection pool", e))
}

/// Host, database and schema, for messages (never credentials). Fails if no schema of the
/// `search_path` exists, since the tables would have nowhere to go.
async fn describe(config: &tokio_postgres::Config, client: &Object) -> Result<String, StoreError> {
    let row = client
        .query_one("SELECT current_database(), current_schema()", &[])
        .await
        .map_err(|e| pg_error("reading the current schema", e))?;
    let database: String = row
        .try_get(0)
        .map_err(|e| pg_error("reading the current schema", e))?;
    let schema: Option<String> = row
        .try_get(1)
        .map_err(|e| pg_error("reading the current schema", e))?;
    let Some(schema) = schema else {
        return Err(StoreError::backend(
            "opening the PostgreSQL store",
            "no schema of the search_path exists: create it, or fix the `options` in the URL",
        ));
    };
    let host = config
        .get_hosts()
        .first()
        .map_or_else(|| "localhost".to_owned(), host_text);
    Ok(format!("{host}/{database}, schema {schema}"))
}

/// A host of a connection config, for messages: its name, address or socket directory.
pub(crate) fn host_text(host: &tokio_postgres::config::Host) -> String {
    match host {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
    }
}

/// Takes the serve lock on a connection of its own, outside any pool, kept for the store's
/// life: a session advisory lock lasts as long as its connection, and the database releases it
/// if the process dies.
async fn lock_for_serving(
    config: &tokio_postgres::Config,
    database: &str,
) -> Result<tokio_postgres::Client, StoreError> {
    let fail = |e| pg_error("taking the serve lock", e);
    let (client, connection) = config.connect(NoTls).await.map_err(fail)?;
    let database_name = database.to_owned();
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::error!(
                error = %crate::with_causes(&error),
                database = %database_name,
                "the connection holding the serve lock failed; another replica could now start"
            );
        }
    });
    let locked: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, hashtext(current_schema()))",
            &[&SERVE_LOCK],
        )
        .await
        .map_err(fail)?
        .try_get(0)
        .map_err(fail)?;
    if !locked {
        return Err(StoreError::ReplicaRunning {
            database: database.to_owned(),
        });
    }
    Ok(client)
}

/// Wraps a PostgreSQL error with what the store was doing; a full disk gets its own variant.
pub(super) fn pg_error(context: impl Into<String>, error: tokio_postgres::Error) -> StoreError {
    if error.code() == Some(&SqlState::DISK_FULL) {
        StoreError::Full {
            context: context.into(),
            source: Box::new(error),
        }
    } else {
        StoreError::backend(context, error)
    }
}

/// A pool that cannot hand out a connection: closed, or the database is unreachable.
fn pool_error(error: PoolError) -> StoreError {
    match error {
        PoolError::Closed => StoreError::Closed,
        PoolError::Backend(e) => pg_error("connecting to PostgreSQL", e),
        other => StoreError::backend("connecting to PostgreSQL", other),
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn create(&self, job: &Job) -> Result<Created, StoreError> {
        let row = JobRow::encode(job)?;
        match self.write(|reply| Command::Create { row, reply }).await? {
            CreateOutcome::New => Ok(Created::New),
            CreateOutcome::Existing(snapshot) => {
                Ok(Created::Existing(Box::new(decode(&snapshot)?)))
            }
        }
    }

    async fn save(&self, job: &Job) -> Result<(), StoreError> {
        let mut row = JobRow::encode(job)?;
        let id = row.id;
        let held = self.held().contains(&id);
        if held {
            row.lease = LeaseCheck::Held(self.replica);
        }
        let saved = self.write(|reply| Command::Save { row, reply }).await;
        let gone = match &saved {
            Ok(()) => job.state.is_terminal(),
            Err(error) => matches!(
                error,
                // Not StaleVersion: a late progress save gets that while the job is still ours.
                StoreError::LeaseLost(_) | StoreError::Missing(_)
            ),
        };
        if held && gone {
            self.held().remove(&id);
        }
        saved
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        reads::get(&*self.reader().await?, id).await
    }

    async fn owned_by(&self, id: JobId, tenant: &str) -> Result<bool, StoreError> {
        reads::owned_by(&*self.reader().await?, id, tenant).await
    }

    async fn get_owned(&self, id: JobId, tenant: &str) -> Result<Option<Job>, StoreError> {
        reads::get_owned(&*self.reader().await?, id, tenant).await
    }

    async fn by_idempotency_key(&self, tenant: &str, key: &str) -> Result<Option<Job>, StoreError> {
        reads::by_idempotency_key(&*self.reader().await?, tenant, key).await
    }

    async fn transitions(&self, id: JobId, after_version: i64) -> Result<Vec<Job>, StoreError> {
        reads::transitions(&*self.reader().await?, id, after_version).await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<Job>, StoreError> {
        reads::list(&*self.reader().await?, query).await
    }

    async fn delete(&self, id: JobId) -> Result<Deleted, StoreError> {
        let id = *id.as_uuid();
        match self.write(|reply| Command::Delete { id, reply }).await? {
            DeleteOutcome::Removed => Ok(Deleted::Removed),
            DeleteOutcome::NotFound => Ok(Deleted::NotFound),
            DeleteOutcome::NotTerminal(snapshot) => {
                Ok(Deleted::NotTerminal(Box::new(decode(&snapshot)?)))
            }
        }
    }

    async fn unfinished(&self) -> Result<Vec<Job>, StoreError> {
        reads::unfinished(&*self.reader().await?).await
    }

    async fn events_after(
        &self,
        after_seq: i64,
        tenant: Option<&str>,
        labels: &BTreeMap<String, String>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        reads::events_after(&*self.reader().await?, after_seq, tenant, labels, limit).await
    }

    async fn unfinished_at(
        &self,
        tenant: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<(i64, Vec<Job>), StoreError> {
        reads::unfinished_at(&*self.reader().await?, tenant, labels).await
    }

    async fn purge_finished(
        &self,
        ended_before: SystemTime,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let ended_before = unix_micros(ended_before);
        let limit = sql_limit(limit);
        self.write(|reply| Command::Purge {
            ended_before,
            limit,
            reply,
        })
        .await
    }

    async fn deliveries(&self, id: JobId) -> Result<Vec<Delivery>, StoreError> {
        reads::deliveries(&*self.reader().await?, id).await
    }

    async fn due_deliveries(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        reads::due(&*self.reader().await?, now, limit).await
    }

    async fn record_delivery_attempt(
        &self,
        id: uuid::Uuid,
        outcome: &AttemptOutcome,
    ) -> Result<Option<Delivery>, StoreError> {
        let outcome = outcome.clone();
        self.write(|reply| Command::RecordAttempt { id, outcome, reply })
            .await
    }

    async fn pending_deliveries(&self) -> Result<usize, StoreError> {
        reads::pending(&*self.reader().await?).await
    }

    fn shared(&self) -> Option<&dyn SharedStore> {
        Some(self)
    }
}

#[cfg(test)]
impl PostgresStore {
    /// Blocks the writer until the returned sender is used or dropped.
    async fn hold_writer(&self) -> oneshot::Sender<()> {
        let (release_tx, release) = oneshot::channel();
        let (entered, entered_rx) = oneshot::channel();
        assert!(
            self.commands
                .send(Command::Hold { entered, release })
                .await
                .is_ok(),
            "writer running"
        );
        entered_rx.await.expect("writer held");
        release_tx
    }

    /// Write commands waiting for the writer.
    fn queued(&self) -> usize {
        self.commands.max_capacity() - self.commands.capacity()
    }
}
