//! The one writer: a thread that owns the write connection and commits in groups. It takes the
//! first queued command, drains whatever else is already queued, runs them all in one
//! transaction (each in its own savepoint, so one failing command fails only its own caller),
//! commits once — one fsync for the whole group — and only then answers every caller.

use std::{
    fs::File,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, watch};

use uuid::Uuid;

use super::{
    ops::{self, CreateOutcome, DeleteOutcome},
    outbox,
    row::JobRow,
};
use crate::job::{AttemptOutcome, Delivery};
use crate::store::{
    StoreError,
    batch::{Answer, BatchFailure, Reply, respond},
};

/// A write, sent to the writer thread.
pub(super) enum Command {
    Create {
        row: JobRow,
        reply: Reply<CreateOutcome>,
    },
    Save {
        row: JobRow,
        reply: Reply<()>,
    },
    Delete {
        id: String,
        reply: Reply<DeleteOutcome>,
    },
    Purge {
        ended_before: i64,
        limit: i64,
        reply: Reply<usize>,
    },
    RecordAttempt {
        id: Uuid,
        outcome: AttemptOutcome,
        reply: Reply<Option<Delivery>>,
    },
    /// Stop taking commands; stop once everything queued before this one is committed.
    Close,
    /// Blocks the writer until `release` is signalled (or dropped), so a test can queue up a
    /// batch of its own choosing.
    #[cfg(test)]
    Hold {
        entered: tokio::sync::oneshot::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
    },
    /// Runs raw SQL on the write connection, as one command of a batch.
    #[cfg(test)]
    Execute {
        sql: String,
        reply: Reply<()>,
    },
}

/// Committed work, counted so that group commit can be observed.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub batches: AtomicU64,
    pub commands: AtomicU64,
}

/// The writer thread's state.
pub(super) struct Writer {
    pub conn: Connection,
    pub commands: mpsc::Receiver<Command>,
    pub max_batch: usize,
    pub counters: Arc<Counters>,
    /// The data directory's lock: held exactly as long as the write connection is open.
    pub lock: File,
    /// Set once the connection is closed and the lock released.
    pub stopped: watch::Sender<bool>,
}

impl Writer {
    /// Starts the writer thread; it runs until every command sender is gone or a
    /// [`Command::Close`] arrives, after committing everything queued before that.
    pub fn spawn(self) -> Result<thread::JoinHandle<()>, StoreError> {
        thread::Builder::new()
            .name("longrun-sqlite-writer".to_owned())
            .spawn(move || self.run())
            .map_err(|e| StoreError::backend("starting the SQLite writer thread", e))
    }

    fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(first) = self.commands.blocking_recv() {
            batch.push(first);
            while batch.len() < self.max_batch {
                match self.commands.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.commit(&mut batch);
        }
        let Writer {
            conn,
            lock,
            stopped,
            ..
        } = self;
        // Close the database before releasing the lock, so that the next owner finds the
        // write-ahead log checkpointed and at rest.
        if let Err((_, e)) = conn.close() {
            tracing::warn!(error = %e, "closing the SQLite write connection failed");
        }
        drop(lock);
        stopped.send_replace(true);
    }

    /// Runs `batch` (emptying it) in one transaction and answers each caller after the commit.
    fn commit(&mut self, batch: &mut Vec<Command>) {
        if !self.conn.is_autocommit() {
            // A failed commit can leave a transaction open; it holds nothing we want.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        let tx = match self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(e) => {
                let failure = sql_failure("starting a write transaction", &e);
                for command in batch.drain(..) {
                    fail(command, &failure, &mut self.commands);
                }
                return;
            }
        };

        let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
        let mut commands = batch.drain(..);
        let mut broken = None;
        for command in commands.by_ref() {
            match apply(&tx, command, &mut self.commands) {
                Ok(Some(answer)) => answers.push(answer),
                Ok(None) => {}
                Err(failure) => {
                    broken = Some(failure);
                    break;
                }
            }
        }
        if let Some(failure) = broken {
            for command in commands {
                fail(command, &failure, &mut self.commands);
            }
            drop(tx); // rolls back whatever SQLite left of the transaction
            tracing::error!(error = %failure.message, "a batch of writes was rolled back");
            for answer in answers {
                answer.send(Some(&failure));
            }
            return;
        }
        drop(commands);

        let committed = answers.len() as u64;
        match tx.commit() {
            Ok(()) => {
                if committed > 0 {
                    self.counters.batches.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .commands
                        .fetch_add(committed, Ordering::Relaxed);
                }
                for answer in answers {
                    answer.send(None);
                }
            }
            Err(e) => {
                let failure = sql_failure("committing a batch of writes", &e);
                tracing::error!(error = %failure.message, "a batch of writes failed to commit");
                for answer in answers {
                    answer.send(Some(&failure));
                }
            }
        }
    }
}

/// Runs one command in its own savepoint. `Ok(None)` for commands that answer no one;
/// `Err` when the whole transaction is lost and the batch must be abandoned.
fn apply(
    conn: &Connection,
    command: Command,
    queue: &mut mpsc::Receiver<Command>,
) -> Result<Option<Answer>, BatchFailure> {
    Ok(Some(match command {
        Command::Create { row, reply } => respond(reply, isolated(conn, |c| ops::create(c, &row)))?,
        Command::Save { row, reply } => respond(reply, isolated(conn, |c| ops::save(c, &row)))?,
        Command::Delete { id, reply } => respond(reply, isolated(conn, |c| ops::delete(c, &id)))?,
        Command::Purge {
            ended_before,
            limit,
            reply,
        } => respond(
            reply,
            isolated(conn, |c| ops::purge(c, ended_before, limit)),
        )?,
        Command::RecordAttempt { id, outcome, reply } => respond(
            reply,
            isolated(conn, |c| outbox::record_attempt(c, id, &outcome)),
        )?,
        Command::Close => {
            // Commands already queued are still received; new ones are refused.
            queue.close();
            return Ok(None);
        }
        #[cfg(test)]
        Command::Hold { entered, release } => {
            let _ = entered.send(());
            let _ = release.recv();
            return Ok(None);
        }
        #[cfg(test)]
        Command::Execute { sql, reply } => respond(
            reply,
            isolated(conn, |c| {
                c.execute_batch(&sql)
                    .map_err(|e| super::sql_error("executing test SQL", e))
            }),
        )?,
    }))
}

/// Answers a command of a batch that could not run.
fn fail(command: Command, failure: &BatchFailure, queue: &mut mpsc::Receiver<Command>) {
    let answer = match command {
        Command::Create { reply, .. } => Answer::new(reply, Err(failure.error())),
        Command::Save { reply, .. } => Answer::new(reply, Err(failure.error())),
        Command::Delete { reply, .. } => Answer::new(reply, Err(failure.error())),
        Command::Purge { reply, .. } => Answer::new(reply, Err(failure.error())),
        Command::RecordAttempt { reply, .. } => Answer::new(reply, Err(failure.error())),
        Command::Close => {
            queue.close();
            return;
        }
        #[cfg(test)]
        Command::Hold { entered, .. } => {
            let _ = entered.send(());
            return;
        }
        #[cfg(test)]
        Command::Execute { reply, .. } => Answer::new(reply, Err(failure.error())),
    };
    answer.send(None);
}

/// Runs `op` inside a savepoint, so that its failure undoes its own writes and nothing else.
fn isolated<T>(
    conn: &Connection,
    op: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<Result<T, StoreError>, BatchFailure> {
    let savepoint = |sql: &str| {
        conn.prepare_cached(sql)
            .and_then(|mut statement| statement.execute([]))
            .map_err(|e| sql_failure("isolating a write", &e))
    };
    savepoint("SAVEPOINT command")?;
    match op(conn) {
        Ok(value) => {
            savepoint("RELEASE command")?;
            Ok(Ok(value))
        }
        Err(error) => {
            if conn.is_autocommit() {
                // Some errors (a full disk, an I/O error) make SQLite roll back the whole
                // transaction: the earlier commands of the batch are lost too.
                return Err(BatchFailure::from_error(&error));
            }
            savepoint("ROLLBACK TO command")?;
            savepoint("RELEASE command")?;
            Ok(Err(error))
        }
    }
}

/// A batch failure from SQLite's error; a full disk is told as such.
fn sql_failure(context: &str, error: &rusqlite::Error) -> BatchFailure {
    let full = error.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull);
    BatchFailure::new(context, full, error)
}
