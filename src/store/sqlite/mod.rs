//! The embedded durable store: SQLite in WAL mode with `synchronous=FULL`, in one data
//! directory that a single store holds locked.
//!
//! Writes go to one writer thread that commits them in groups (see [`writer`]); reads run on
//! their own read-only connections and never wait for it. Nothing is cached in memory: every
//! job lives in the database only.

mod events;
mod maintenance;
mod ops;
mod outbox;
mod readers;
mod row;
mod schema;
mod writer;

#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions, TryLockError},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    thread,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot, watch};

pub use self::maintenance::{Compacted, backup, compact};

use self::{
    ops::{CreateOutcome, DeleteOutcome},
    readers::Readers,
    row::{JobRow, decode, id_text, unix_micros},
    writer::{Command, Counters, Writer},
};
use super::{Created, Deleted, DueDelivery, EventPage, ListQuery, Store, StoreError, batch::Reply};
use crate::job::{AttemptOutcome, Delivery, Job, JobId};
use crate::log_throttle::LogThrottle;

/// The database file inside the data directory.
const DATABASE_FILE: &str = "longrun.db";
/// The file whose lock says a store owns the data directory.
const LOCK_FILE: &str = "longrun.lock";

/// Tuning for [`SqliteStore`]; the defaults suit a small server.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// The most write commands committed in one transaction (one fsync). Default 512.
    pub max_batch: usize,
    /// Write commands that may wait for the writer; past that, writers wait to be queued.
    /// Default 4096.
    pub queue_capacity: usize,
    /// How long a connection retries a database locked by another connection. Default 5 s.
    pub busy_timeout: Duration,
    /// Read connections kept open between reads (more are opened while reads pile up).
    /// Default 4.
    pub idle_readers: usize,
    /// The size, in bytes, the write-ahead log is cut back to once a checkpoint has copied it
    /// all into the database (SQLite's `journal_size_limit`). Default 64 MiB.
    ///
    /// The log grows past its usual few MiB only while long reads keep checkpoints from
    /// catching up, as under a burst of writes; without a limit SQLite keeps the file at that
    /// high-water size for good, since reusing a file is cheaper than growing one.
    pub wal_size_limit: u64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            max_batch: 512,
            queue_capacity: 4096,
            busy_timeout: Duration::from_secs(5),
            idle_readers: 4,
            wal_size_limit: 64 << 20,
        }
    }
}

/// What the writer has committed since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SqliteStats {
    /// Transactions committed (one fsync each).
    pub batches: u64,
    /// Write commands those transactions carried.
    pub commands: u64,
    /// Batches run a second time, each command in its own savepoint, because one of their
    /// commands failed.
    pub reruns: u64,
}

/// Jobs in a SQLite database in a data directory, durable once a call returns.
///
/// Dropping the store commits every write already queued, closes the database and releases
/// the directory; it blocks for as long as that takes (one batch). [`SqliteStore::close`] does
/// the same without blocking.
pub struct SqliteStore {
    dir: PathBuf,
    /// `None` only while dropping, so the writer sees its queue end.
    commands: Option<mpsc::Sender<Command>>,
    writer: Option<thread::JoinHandle<()>>,
    stopped: watch::Receiver<bool>,
    counters: Arc<Counters>,
    readers: Arc<Readers>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `dir`, migrating its schema to the newest.
    ///
    /// Fails with [`StoreError::Locked`] at once if another store holds `dir`, and with
    /// [`StoreError::IncompatibleSchema`] if a newer longrun wrote it. Blocks while it opens
    /// and migrates the database: call it at startup, not on a busy runtime.
    pub fn open(dir: impl AsRef<Path>, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let dir = dir.as_ref();
        private_dir_builder().create(dir).map_err(|e| {
            StoreError::backend(format!("creating data directory {}", dir.display()), e)
        })?;
        let lock = lock_dir(dir)?;
        let path = dir.join(DATABASE_FILE);
        create_private_file(&path)
            .map_err(|e| StoreError::backend(format!("creating database {}", path.display()), e))?;
        let mut conn = open_writer(&path, &options)?;
        schema::migrate(&mut conn)?;

        let readers = Arc::new(Readers::new(
            path,
            options.busy_timeout,
            options.idle_readers,
        ));
        readers.warm_up()?;

        let (commands, queue) = mpsc::channel(options.queue_capacity.max(1));
        let (stopped_tx, stopped) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        let writer = Writer {
            conn,
            commands: queue,
            max_batch: options.max_batch.max(1),
            counters: Arc::clone(&counters),
            failures: LogThrottle::default(),
            lock,
            stopped: stopped_tx,
        }
        .spawn()?;
        Ok(SqliteStore {
            dir: dir.to_owned(),
            commands: Some(commands),
            writer: Some(writer),
            stopped,
            counters,
            readers,
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Batches and commands committed so far.
    pub fn stats(&self) -> SqliteStats {
        SqliteStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            commands: self.counters.commands.load(Ordering::Relaxed),
            reruns: self.counters.reruns.load(Ordering::Relaxed),
        }
    }

    /// Commits every write already queued, then closes the database and releases the data
    /// directory. Later calls fail with [`StoreError::Closed`].
    pub async fn close(&self) {
        self.readers.close();
        if let Some(commands) = &self.commands {
            // An error means the writer is already stopping; waiting below covers both.
            let _ = commands.send(Command::Close).await;
        }
        let mut stopped = self.stopped.clone();
        // An error means the writer thread is gone (it dropped its side): stopped as well.
        let _ = stopped.wait_for(|stopped| *stopped).await;
    }

    /// Sends a write to the writer and waits until it is committed.
    async fn write<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let commands = self.commands.as_ref().ok_or(StoreError::Closed)?;
        let (reply, answer) = oneshot::channel();
        commands
            .send(command(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.readers.close();
        // The writer drains what is queued, then sees the queue end.
        self.commands = None;
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(dir = %self.dir.display(), "the SQLite writer thread panicked");
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create(&self, job: &Job) -> Result<Created, StoreError> {
        let row = JobRow::encode(job)?;
        match self.write(|reply| Command::Create { row, reply }).await? {
            CreateOutcome::New => Ok(Created::New),
            CreateOutcome::Existing(snapshot) => {
                Ok(Created::Existing(Box::new(decode(&snapshot)?)))
            }
        }
    }

    async fn create_started(&self, job: &Job, started: &Job) -> Result<(), StoreError> {
        let row = JobRow::encode(job)?;
        let started = Box::new(JobRow::encode(started)?);
        self.write(|reply| Command::CreateStarted {
            row,
            started,
            reply,
        })
        .await
    }

    async fn save(&self, job: &Job) -> Result<(), StoreError> {
        let row = JobRow::encode(job)?;
        self.write(|reply| Command::Save { row, reply }).await
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        self.readers.run(move |conn| readers::get(conn, id)).await
    }

    async fn owned_by(&self, id: JobId, tenant: &str) -> Result<bool, StoreError> {
        let tenant = tenant.to_owned();
        self.readers
            .run(move |conn| readers::owned_by(conn, id, tenant))
            .await
    }

    async fn get_owned(&self, id: JobId, tenant: &str) -> Result<Option<Job>, StoreError> {
        let tenant = tenant.to_owned();
        self.readers
            .run(move |conn| readers::get_owned(conn, id, tenant))
            .await
    }

    async fn by_idempotency_key(&self, tenant: &str, key: &str) -> Result<Option<Job>, StoreError> {
        let scoped = row::scoped_key(tenant, key);
        self.readers
            .run(move |conn| readers::by_idempotency_key(conn, scoped))
            .await
    }

    async fn transitions(&self, id: JobId, after_version: i64) -> Result<Vec<Job>, StoreError> {
        self.readers
            .run(move |conn| readers::transitions(conn, id, after_version))
            .await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<Job>, StoreError> {
        let query = query.clone();
        self.readers
            .run(move |conn| readers::list(conn, &query))
            .await
    }

    async fn events_after(
        &self,
        after_seq: i64,
        tenant: Option<&str>,
        labels: &BTreeMap<String, String>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        let labels = labels.clone();
        let tenant = tenant.map(str::to_owned);
        self.readers
            .run(move |conn| {
                events::events_after(conn, after_seq, tenant.as_deref(), &labels, limit)
            })
            .await
    }

    async fn unfinished_at(
        &self,
        tenant: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<(i64, Vec<Job>), StoreError> {
        let labels = labels.clone();
        let tenant = tenant.map(str::to_owned);
        self.readers
            .run(move |conn| events::unfinished_at(conn, tenant.as_deref(), &labels))
            .await
    }

    async fn delete(&self, id: JobId) -> Result<Deleted, StoreError> {
        let id = id_text(id);
        match self.write(|reply| Command::Delete { id, reply }).await? {
            DeleteOutcome::Removed => Ok(Deleted::Removed),
            DeleteOutcome::NotFound => Ok(Deleted::NotFound),
            DeleteOutcome::NotTerminal(snapshot) => {
                Ok(Deleted::NotTerminal(Box::new(decode(&snapshot)?)))
            }
        }
    }

    async fn unfinished(&self) -> Result<Vec<Job>, StoreError> {
        self.readers.run(readers::unfinished).await
    }

    async fn purge_finished(
        &self,
        ended_before: SystemTime,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let ended_before = unix_micros(ended_before);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.write(|reply| Command::Purge {
            ended_before,
            limit,
            reply,
        })
        .await
    }

    async fn deliveries(&self, id: JobId) -> Result<Vec<Delivery>, StoreError> {
        self.readers
            .run(move |conn| outbox::for_job(conn, id))
            .await
    }

    async fn due_deliveries(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        self.readers
            .run(move |conn| outbox::due(conn, now, limit))
            .await
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
        self.readers.run(outbox::pending).await
    }
}

/// Wraps a SQLite error with what the store was doing; a full disk gets its own variant.
fn sql_error(context: impl Into<String>, error: rusqlite::Error) -> StoreError {
    if error.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
        StoreError::Full {
            context: context.into(),
            source: Box::new(error),
        }
    } else {
        StoreError::backend(context, error)
    }
}

/// Takes the data directory's lock, which the OS releases when the file is closed (or the
/// process dies), so a crash never leaves a stale lock behind.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StoreError::backend(format!("opening lock file {}", path.display()), e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: dir.to_owned(),
        }),
        Err(TryLockError::Error(e)) => Err(StoreError::backend(
            format!("locking data directory {}", dir.display()),
            e,
        )),
    }
}

/// Creates directories readable by their owner only (0700): the database holds every job's
/// params, results and webhook secrets. A directory that exists is left as it is.
fn private_dir_builder() -> fs::DirBuilder {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
}

/// Creates `path` empty and readable by its owner only (0600); fails if it exists. For the
/// database and its backups, which hold every job's params, results and webhook secrets.
fn create_new_private_file(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Creates `path` as [`create_new_private_file`] does unless it exists. SQLite takes an empty
/// file as a new database, and gives its `-wal` and `-shm` files the database file's
/// permissions.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    match create_new_private_file(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn open_writer(path: &Path, options: &SqliteOptions) -> Result<Connection, StoreError> {
    let fail = |e| sql_error(format!("opening database {}", path.display()), e);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fail)?;
    // SQLite opens a file it may not write read-only without a word; every write would then
    // fail, while a server that needs none at start would report itself healthy.
    if conn.is_readonly(rusqlite::MAIN_DB).map_err(fail)? {
        return Err(StoreError::backend(
            format!("opening database {}", path.display()),
            "the file cannot be written (check its owner and permissions, and those of the \
             data directory)",
        ));
    }
    conn.busy_timeout(options.busy_timeout).map_err(fail)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(fail)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::backend(
            format!("opening database {}", path.display()),
            format!("the file system does not support WAL mode (journal_mode is {mode})"),
        ));
    }
    // FULL: in WAL mode, NORMAL may lose the last commits on power loss; we promise durability.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(fail)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(fail)?;
    let wal_size_limit = i64::try_from(options.wal_size_limit).unwrap_or(i64::MAX);
    conn.pragma_update(None, "journal_size_limit", wal_size_limit)
        .map_err(fail)?;
    Ok(conn)
}

#[cfg(test)]
impl SqliteStore {
    /// Blocks the writer until the returned sender is used or dropped.
    pub(crate) async fn hold_writer(&self) -> std::sync::mpsc::Sender<()> {
        let (release_tx, release) = std::sync::mpsc::channel();
        let (entered, entered_rx) = oneshot::channel();
        let commands = self.commands.as_ref().expect("open store");
        assert!(
            commands
                .send(Command::Hold {
                    entered: Some(entered),
                    release
                })
                .await
                .is_ok(),
            "writer running"
        );
        entered_rx.await.expect("writer held");
        release_tx
    }

    /// Write commands waiting for the writer.
    pub(crate) fn queued(&self) -> usize {
        self.commands
            .as_ref()
            .map_or(0, |c| c.max_capacity() - c.capacity())
    }

    /// Runs raw SQL on the write connection, as a write command.
    async fn execute(&self, sql: &str) -> Result<(), StoreError> {
        let sql = sql.to_owned();
        self.write(|reply| Command::Execute { sql, reply }).await
    }
}
