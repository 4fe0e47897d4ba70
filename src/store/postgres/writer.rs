//! The one writer of a store: a task that owns the write connection and commits in groups. It
//! takes the first queued command, drains whatever else is already queued, runs them all in
//! one transaction (each in its own savepoint, so one failing command fails only its own
//! caller), commits once, and only then answers every caller.
//!
//! # Why one writer and a write lock
//!
//! Every logged snapshot gets a global sequence number, and readers of the event log rely on
//! the committed numbers forming a prefix: a reader that saw number `n` has seen every event
//! committed before it. A PostgreSQL sequence does not give that: two transactions may take
//! numbers 5 and 6 and commit 6 first, and a reader in between sees 6 without 5, then skips 5
//! for ever. So numbers come from a counter row (`event_log.head`), and every write transaction
//! first takes `pg_advisory_xact_lock(WRITE_LOCK, <schema>)`: the transaction that takes a
//! number holds the lock until it has committed, so the next number is only taken (and
//! committed) after it. Within one store the single writer task serializes batches anyway; the
//! lock makes the same hold for two processes (replicas) on one database. The counter row's own
//! row lock would order the numbers too, but only from the first logged write on: taking the
//! advisory lock first makes the whole transaction one critical section, so two processes'
//! batches can never deadlock on jobs they both touch in different orders either. PostgreSQL
//! marks a transaction committed (visible to new snapshots) before it releases its locks, so the
//! next holder's numbers can never be seen without this one's.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use deadpool_postgres::{ClientWrapper, Object, Pool};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::{
    WRITE_LOCK,
    ops::{self, CreateOutcome, DeleteOutcome},
    pg_error,
    row::JobRow,
};
use crate::job::{AttemptOutcome, Delivery};
use crate::log_throttle::LogThrottle;
use crate::store::{
    StoreError,
    batch::{Answer, BatchFailure, Reply, respond},
};

/// A write, sent to the writer task.
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
        id: Uuid,
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
    /// Blocks the writer until `release` fires (or is dropped), so a test can queue up a batch
    /// of its own choosing.
    #[cfg(test)]
    Hold {
        entered: tokio::sync::oneshot::Sender<()>,
        release: tokio::sync::oneshot::Receiver<()>,
    },
}

/// Committed work, counted so that group commit can be observed.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub batches: AtomicU64,
    pub commands: AtomicU64,
}

/// The writer task's state.
pub(super) struct Writer {
    /// A pool of one connection: the writer's own, reopened by the pool if it breaks.
    pub pool: Pool,
    pub commands: mpsc::Receiver<Command>,
    pub max_batch: usize,
    pub counters: Arc<Counters>,
    /// Holds back repeats of the log line of a failed batch.
    pub failures: LogThrottle,
    /// Set once the writer has stopped.
    pub stopped: watch::Sender<bool>,
}

impl Writer {
    /// Runs until every command sender is gone or a [`Command::Close`] arrives, after
    /// committing everything queued before that.
    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(first) = self.commands.recv().await {
            batch.push(first);
            while batch.len() < self.max_batch {
                match self.commands.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.commit(&mut batch).await;
        }
        self.pool.close();
        self.stopped.send_replace(true);
    }

    /// Runs `batch` (emptying it) in one transaction and answers each caller after the commit.
    async fn commit(&mut self, batch: &mut Vec<Command>) {
        let client = match self.pool.get().await {
            Ok(client) => client,
            Err(e) => {
                let failure = BatchFailure::new("connecting the writer", false, &e);
                for command in batch.drain(..) {
                    fail(command, &failure, &mut self.commands);
                }
                return;
            }
        };
        if let Err(e) = begin(&client).await {
            let failure = BatchFailure::from_error(&e);
            discard(client);
            for command in batch.drain(..) {
                fail(command, &failure, &mut self.commands);
            }
            return;
        }

        let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
        let mut commands = batch.drain(..);
        let mut broken = None;
        let mut logged = false;
        let mut progressed: Vec<String> = Vec::new();
        for command in commands.by_ref() {
            logged |= matches!(command, Command::Create { .. } | Command::Save { .. });
            if let Command::Save { row, .. } = &command
                && !row.logged
            {
                progressed.push(row.id.to_string());
            }
            match apply(&client, command, &mut self.commands).await {
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
            // The connection may be broken or mid-transaction: never give it back.
            discard(client);
            failure.log("a batch of writes was rolled back", &self.failures);
            for answer in answers {
                answer.send(Some(&failure));
            }
            return;
        }
        drop(commands);
        if let Err(e) = notify(&client, logged, &progressed).await {
            let failure = BatchFailure::from_error(&e);
            discard(client);
            failure.log("a batch of writes was rolled back", &self.failures);
            for answer in answers {
                answer.send(Some(&failure));
            }
            return;
        }

        let committed = answers.len() as u64;
        match client.batch_execute("COMMIT").await {
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
                // The outcome of a failed COMMIT (a lost connection) is unknown; callers are
                // told it failed, so at worst a write they were told failed is stored.
                let failure = BatchFailure::new("committing a batch of writes", false, &e);
                discard(client);
                failure.log("a batch of writes failed to commit", &self.failures);
                for answer in answers {
                    answer.send(Some(&failure));
                }
            }
        }
    }
}

/// Opens the batch's transaction and takes the write lock (see the module's comment).
async fn begin(client: &ClientWrapper) -> Result<(), StoreError> {
    let fail = |e| pg_error("starting a write transaction", e);
    client.batch_execute("BEGIN").await.map_err(fail)?;
    let lock = client
        .prepare_cached("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))")
        .await
        .map_err(fail)?;
    client.execute(&lock, &[&WRITE_LOCK]).await.map_err(fail)?;
    Ok(())
}

/// Tells every replica's listener (see `feed.rs`) that events up to the log's head are
/// coming (when the batch logged any), and which jobs' progress it saved: PostgreSQL delivers
/// a notification at commit, in commit order, and only if the transaction commits.
async fn notify(
    client: &ClientWrapper,
    logged: bool,
    progressed: &[String],
) -> Result<(), StoreError> {
    let fail = |e| pg_error("notifying the other replicas", e);
    if logged {
        let statement = client
            .prepare_cached("SELECT pg_notify($1, head::text) FROM event_log WHERE id = 1")
            .await
            .map_err(fail)?;
        client
            .execute(&statement, &[&super::EVENTS_CHANNEL])
            .await
            .map_err(fail)?;
    }
    if !progressed.is_empty() {
        // Identical notifications in one transaction are sent once: one per job.
        let statement = client
            .prepare_cached("SELECT pg_notify($1, id) FROM unnest($2::text[]) AS id")
            .await
            .map_err(fail)?;
        client
            .execute(&statement, &[&super::PROGRESS_CHANNEL, &progressed])
            .await
            .map_err(fail)?;
    }
    Ok(())
}

/// Drops a connection whose state is unknown instead of returning it to the pool.
fn discard(client: Object) {
    drop(Object::take(client));
}

/// Runs one command in its own savepoint. `Ok(None)` for commands that answer no one;
/// `Err` when the whole transaction is lost and the batch must be abandoned.
async fn apply(
    client: &ClientWrapper,
    command: Command,
    queue: &mut mpsc::Receiver<Command>,
) -> Result<Option<Answer>, BatchFailure> {
    Ok(Some(match command {
        Command::Create { row, reply } => {
            respond(reply, isolated(client, ops::create(client, &row)).await)?
        }
        Command::Save { row, reply } => {
            respond(reply, isolated(client, ops::save(client, &row)).await)?
        }
        Command::Delete { id, reply } => {
            respond(reply, isolated(client, ops::delete(client, id)).await)?
        }
        Command::Purge {
            ended_before,
            limit,
            reply,
        } => respond(
            reply,
            isolated(client, ops::purge(client, ended_before, limit)).await,
        )?,
        Command::RecordAttempt { id, outcome, reply } => respond(
            reply,
            isolated(client, ops::record_attempt(client, id, &outcome)).await,
        )?,
        Command::Close => {
            // Commands already queued are still received; new ones are refused.
            queue.close();
            return Ok(None);
        }
        #[cfg(test)]
        Command::Hold { entered, release } => {
            let _ = entered.send(());
            let _ = release.await;
            return Ok(None);
        }
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
    };
    answer.send(None);
}

/// Runs `op` inside a savepoint, so that its failure undoes its own writes and nothing else
/// (in PostgreSQL a failed statement aborts the whole transaction unless rolled back to a
/// savepoint).
async fn isolated<T>(
    client: &ClientWrapper,
    op: impl Future<Output = Result<T, StoreError>>,
) -> Result<Result<T, StoreError>, BatchFailure> {
    let savepoint = |sql: &'static str| async move {
        client
            .batch_execute(sql)
            .await
            .map_err(|e| BatchFailure::new("isolating a write", false, &e))
    };
    savepoint("SAVEPOINT command").await?;
    match op.await {
        Ok(value) => {
            savepoint("RELEASE SAVEPOINT command").await?;
            Ok(Ok(value))
        }
        Err(error) => {
            // A lost connection fails this too, and with it the whole batch.
            savepoint("ROLLBACK TO SAVEPOINT command").await?;
            savepoint("RELEASE SAVEPOINT command").await?;
            Ok(Err(error))
        }
    }
}
