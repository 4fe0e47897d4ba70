//! The one writer: a thread that owns the write connection and commits in groups. It takes the
//! first queued command, drains whatever else is already queued, runs them all in one
//! transaction, commits once — one fsync for the whole group — and only then answers every
//! caller.
//!
//! One failing command must fail only its own caller. A savepoint around every command would
//! do that, but it makes SQLite copy each page a command touches into a statement journal
//! first: about a fifth of the writer's time under load, spent on commands that almost never
//! fail. So a batch first runs plainly; only if one of its commands fails is the transaction
//! rolled back and the batch run again with a savepoint per command (see [`Writer::commit`]).

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
    ops::{self, CreateOutcome, DeleteOutcome, LogHead},
    outbox,
    row::JobRow,
};
use crate::job::{AttemptOutcome, Delivery};
use crate::log_throttle::LogThrottle;
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
    /// A create and the save of the job's next snapshot, as one command: both or neither.
    CreateStarted {
        row: JobRow,
        started: Box<JobRow>,
        reply: Reply<()>,
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
    /// batch of its own choosing. `entered` is taken when the writer reaches it: a batch that
    /// runs again does not hold again.
    #[cfg(test)]
    Hold {
        entered: Option<tokio::sync::oneshot::Sender<()>>,
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
    /// Batches run a second time, command by command, because one of their commands failed.
    pub reruns: AtomicU64,
}

/// The writer thread's state.
pub(super) struct Writer {
    pub conn: Connection,
    pub commands: mpsc::Receiver<Command>,
    pub max_batch: usize,
    pub counters: Arc<Counters>,
    /// Holds back repeats of the log line of a failed batch.
    pub failures: LogThrottle,
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
        let Some((tx, mut head)) = begin(&mut self.conn, batch, &mut self.commands) else {
            return;
        };
        let outcomes = run_plainly(&tx, &mut head, batch, &mut self.commands);
        let Some(outcomes) = outcomes else {
            // A command failed, perhaps halfway through its writes: undo the whole batch and
            // run it again with each command in its own savepoint.
            drop(tx);
            self.counters.reruns.fetch_add(1, Ordering::Relaxed);
            self.commit_isolated(batch);
            return;
        };
        let answers: Vec<Answer> = batch
            .drain(..)
            .zip(outcomes)
            .filter_map(|(command, outcome)| outcome.answer(command))
            .collect();
        let result = tx.commit();
        self.finish(answers, result);
    }

    /// Runs `batch` (emptying it) with a savepoint around each command, so that a command that
    /// fails undoes only its own writes, and commits the rest.
    fn commit_isolated(&mut self, batch: &mut Vec<Command>) {
        let Some((tx, mut head)) = begin(&mut self.conn, batch, &mut self.commands) else {
            return;
        };
        let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
        let mut commands = batch.drain(..);
        let mut broken = None;
        for command in commands.by_ref() {
            match apply(&tx, &mut head, command, &mut self.commands) {
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
            failure.log("a batch of writes was rolled back", &self.failures);
            for answer in answers {
                answer.send(Some(&failure));
            }
            return;
        }
        drop(commands);
        let result = tx.commit();
        self.finish(answers, result);
    }

    /// Answers every caller of a batch once its commit is known to have succeeded or failed.
    fn finish(&self, answers: Vec<Answer>, committed: rusqlite::Result<()>) {
        match committed {
            Ok(()) => {
                if !answers.is_empty() {
                    self.counters.batches.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .commands
                        .fetch_add(answers.len() as u64, Ordering::Relaxed);
                }
                for answer in answers {
                    answer.send(None);
                }
            }
            Err(e) => {
                let failure = sql_failure("committing a batch of writes", &e);
                failure.log("a batch of writes failed to commit", &self.failures);
                for answer in answers {
                    answer.send(Some(&failure));
                }
            }
        }
    }
}

/// Starts a batch's write transaction and reads the log's next number; on failure every
/// command of `batch` is told.
fn begin<'c>(
    conn: &'c mut Connection,
    batch: &mut Vec<Command>,
    queue: &mut mpsc::Receiver<Command>,
) -> Option<(rusqlite::Transaction<'c>, LogHead)> {
    if !conn.is_autocommit() {
        // A failed commit can leave a transaction open; it holds nothing we want.
        let _ = conn.execute_batch("ROLLBACK");
    }
    let started = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .and_then(|tx| {
            let head = LogHead::read(&tx)?;
            Ok((tx, head))
        });
    match started {
        Ok(started) => Some(started),
        Err(e) => {
            let failure = sql_failure("starting a write transaction", &e);
            for command in batch.drain(..) {
                fail(command, &failure, queue);
            }
            None
        }
    }
}

/// What a command did when its batch ran plainly, kept until the batch commits.
enum Outcome {
    Created(CreateOutcome),
    Saved,
    Deleted(DeleteOutcome),
    Purged(usize),
    Recorded(Option<Delivery>),
    /// A command that answers no one.
    Silent,
}

impl Outcome {
    /// The answer to hold for `command`, which produced this outcome.
    fn answer(self, command: Command) -> Option<Answer> {
        Some(match (command, self) {
            (Command::Create { reply, .. }, Outcome::Created(created)) => {
                Answer::new(reply, Ok(created))
            }
            (
                Command::Save { reply, .. } | Command::CreateStarted { reply, .. },
                Outcome::Saved,
            ) => Answer::new(reply, Ok(())),
            (Command::Delete { reply, .. }, Outcome::Deleted(deleted)) => {
                Answer::new(reply, Ok(deleted))
            }
            (Command::Purge { reply, .. }, Outcome::Purged(count)) => Answer::new(reply, Ok(count)),
            (Command::RecordAttempt { reply, .. }, Outcome::Recorded(delivery)) => {
                Answer::new(reply, Ok(delivery))
            }
            #[cfg(test)]
            (Command::Execute { reply, .. }, Outcome::Saved) => Answer::new(reply, Ok(())),
            _ => return None,
        })
    }
}

/// Runs every command of `batch` straight into the open transaction. `None` as soon as one
/// fails: the transaction then holds partial writes and must be rolled back.
fn run_plainly(
    conn: &Connection,
    head: &mut LogHead,
    batch: &mut [Command],
    queue: &mut mpsc::Receiver<Command>,
) -> Option<Vec<Outcome>> {
    let mut outcomes = Vec::with_capacity(batch.len());
    for command in batch.iter_mut() {
        let outcome = match command {
            Command::Create { row, .. } => ops::create(conn, row, head).map(Outcome::Created),
            Command::CreateStarted { row, started, .. } => {
                ops::create_started(conn, row, started, head).map(|()| Outcome::Saved)
            }
            Command::Save { row, .. } => ops::save(conn, row, head).map(|()| Outcome::Saved),
            Command::Delete { id, .. } => ops::delete(conn, id).map(Outcome::Deleted),
            Command::Purge {
                ended_before,
                limit,
                ..
            } => ops::purge(conn, *ended_before, *limit).map(Outcome::Purged),
            Command::RecordAttempt { id, outcome, .. } => {
                outbox::record_attempt(conn, *id, outcome).map(Outcome::Recorded)
            }
            Command::Close => {
                // Commands already queued are still received; new ones are refused.
                queue.close();
                Ok(Outcome::Silent)
            }
            #[cfg(test)]
            Command::Hold { entered, release } => {
                hold(entered, release);
                Ok(Outcome::Silent)
            }
            #[cfg(test)]
            Command::Execute { sql, .. } => conn
                .execute_batch(sql)
                .map(|()| Outcome::Saved)
                .map_err(|e| super::sql_error("executing test SQL", e)),
        };
        outcomes.push(outcome.ok()?);
    }
    Some(outcomes)
}

/// Tells the test the writer is held, then waits for its release (once per command).
#[cfg(test)]
fn hold(
    entered: &mut Option<tokio::sync::oneshot::Sender<()>>,
    release: &std::sync::mpsc::Receiver<()>,
) {
    if let Some(entered) = entered.take() {
        let _ = entered.send(());
        let _ = release.recv();
    }
}

/// Runs one command in its own savepoint. `Ok(None)` for commands that answer no one;
/// `Err` when the whole transaction is lost and the batch must be abandoned.
fn apply(
    conn: &Connection,
    head: &mut LogHead,
    command: Command,
    queue: &mut mpsc::Receiver<Command>,
) -> Result<Option<Answer>, BatchFailure> {
    Ok(Some(match command {
        Command::Create { row, reply } => respond(
            reply,
            isolated(conn, head, |c, head| ops::create(c, &row, head)),
        )?,
        Command::CreateStarted {
            row,
            started,
            reply,
        } => respond(
            reply,
            isolated(conn, head, |c, head| {
                ops::create_started(c, &row, &started, head)
            }),
        )?,
        Command::Save { row, reply } => respond(
            reply,
            isolated(conn, head, |c, head| ops::save(c, &row, head)),
        )?,
        Command::Delete { id, reply } => {
            respond(reply, isolated(conn, head, |c, _| ops::delete(c, &id)))?
        }
        Command::Purge {
            ended_before,
            limit,
            reply,
        } => respond(
            reply,
            isolated(conn, head, |c, _| ops::purge(c, ended_before, limit)),
        )?,
        Command::RecordAttempt { id, outcome, reply } => respond(
            reply,
            isolated(conn, head, |c, _| outbox::record_attempt(c, id, &outcome)),
        )?,
        Command::Close => {
            // Commands already queued are still received; new ones are refused.
            queue.close();
            return Ok(None);
        }
        #[cfg(test)]
        Command::Hold {
            mut entered,
            release,
        } => {
            hold(&mut entered, &release);
            return Ok(None);
        }
        #[cfg(test)]
        Command::Execute { sql, reply } => respond(
            reply,
            isolated(conn, head, |c, _| {
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
        Command::Save { reply, .. } | Command::CreateStarted { reply, .. } => {
            Answer::new(reply, Err(failure.error()))
        }
        Command::Delete { reply, .. } => Answer::new(reply, Err(failure.error())),
        Command::Purge { reply, .. } => Answer::new(reply, Err(failure.error())),
        Command::RecordAttempt { reply, .. } => Answer::new(reply, Err(failure.error())),
        Command::Close => {
            queue.close();
            return;
        }
        #[cfg(test)]
        Command::Hold { entered, .. } => {
            if let Some(entered) = entered {
                let _ = entered.send(());
            }
            return;
        }
        #[cfg(test)]
        Command::Execute { reply, .. } => Answer::new(reply, Err(failure.error())),
    };
    answer.send(None);
}

/// Runs `op` inside a savepoint, so that its failure undoes its own writes and nothing else
/// (the log numbers it took included: they are handed out again, so the log has no gaps).
fn isolated<T>(
    conn: &Connection,
    head: &mut LogHead,
    op: impl FnOnce(&Connection, &mut LogHead) -> Result<T, StoreError>,
) -> Result<Result<T, StoreError>, BatchFailure> {
    let savepoint = |sql: &str| {
        conn.prepare_cached(sql)
            .and_then(|mut statement| statement.execute([]))
            .map_err(|e| sql_failure("isolating a write", &e))
    };
    savepoint("SAVEPOINT command")?;
    let head_before = *head;
    match op(conn, head) {
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
            *head = head_before;
            Ok(Err(error))
        }
    }
}

/// A batch failure from SQLite's error; a full disk is told as such.
fn sql_failure(context: &str, error: &rusqlite::Error) -> BatchFailure {
    let full = error.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull);
    BatchFailure::new(context, full, error)
}
