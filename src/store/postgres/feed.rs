//! The change feed of one replica: a task that LISTENs on a connection of its own (not a pooled
//! one: a listening session must stay open) for the notifications every write batch sends at
//! commit, and reads the log after the last event it passed on (`reads::events_after`). The log
//! is the truth, the notifications only say when to read it: a lost connection (a restart, a
//! `pg_terminate_backend`) is reconnected with backoff and caught up from the log, so no
//! transition is ever missed, only late.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls, Notification};
use uuid::Uuid;

use super::{CANCEL_CHANNEL, EVENTS_CHANNEL, PROGRESS_CHANNEL, pg_error, pool_error, reads};
use crate::job::{Job, JobId};
use crate::store::{Change, StoreError};

/// Changes waiting for the executor; past that, the feed waits (and reads the log later).
const FEED_CAPACITY: usize = 1024;
/// Events read from the log at once.
const PAGE: usize = 512;
/// Notifications taken in one round: progress ones are merged by job, and the log is read once.
const ROUND: usize = 4096;
/// After this long without a notification, the listening connection is asked whether it is
/// still there (a connection cut without a reset — a NAT's or a balancer's timeout, a failover
/// behind a virtual address — would otherwise wait for notifications for hours), and the log
/// is read, so that nothing waits longer than this for a notification that never came.
const QUIET_CHECK: Duration = Duration::from_secs(5);
/// How long that check waits for its answer before the connection is given up.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// The first wait before reconnecting, doubled after each failure up to [`RECONNECT_MAX`].
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Starts the feed from the log's current head: every event committed from now on follows.
pub(super) async fn start(
    mut config: tokio_postgres::Config,
    readers: Pool,
    replica: Uuid,
) -> Result<mpsc::Receiver<Change>, StoreError> {
    config.application_name(format!("longrun-feed-{replica}"));
    let head = {
        let fail = |e| pg_error("reading the event log's head", e);
        let client = readers.get().await.map_err(pool_error)?;
        client
            .query_one("SELECT head FROM event_log WHERE id = 1", &[])
            .await
            .map_err(fail)?
            .try_get::<_, i64>(0)
            .map_err(fail)?
    };
    let (changes, receiver) = mpsc::channel(FEED_CAPACITY);
    tokio::spawn(run(config, readers, changes, head));
    Ok(receiver)
}

/// Why the feed stopped passing changes on.
enum Stop {
    /// The receiver is gone: the feed ends.
    Closed,
    /// The database failed: reconnect, then catch up.
    Failed(StoreError),
}

async fn run(
    config: tokio_postgres::Config,
    readers: Pool,
    changes: mpsc::Sender<Change>,
    mut last_seq: i64,
) {
    let mut backoff = RECONNECT_MIN;
    loop {
        let stop = match listen(&config).await {
            Ok((client, mut notes)) => {
                // LISTEN is in effect: everything committed before it is in the log already.
                let mut result = catch_up(&readers, &changes, &mut last_seq).await.map(drop);
                if result.is_ok() {
                    backoff = RECONNECT_MIN;
                    result = follow(&client, &readers, &changes, &mut notes, &mut last_seq).await;
                }
                drop(client);
                result
            }
            Err(error) => Err(Stop::Failed(error)),
        };
        match stop {
            Ok(()) | Err(Stop::Closed) => return,
            Err(Stop::Failed(error)) => {
                tracing::warn!(error = %crate::with_causes(&error), ?backoff, last_seq, "change feed lost; reconnecting");
            }
        }
        tokio::select! {
            _ = changes.closed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

/// Passes on notifications until the connection is lost (an error) or the receiver is gone.
///
/// They are taken in rounds: everything that has arrived, up to [`ROUND`]. Progress
/// notifications of one job are merged (each replica hears every job's progress, and a
/// backlog must not grow with them), and the log is read once per round, before the progress
/// snapshots are passed on: a snapshot read for progress may already show a transition the
/// log holds and the feed has not passed on yet, and watchers must get that transition first.
async fn follow(
    listening: &tokio_postgres::Client,
    readers: &Pool,
    changes: &mpsc::Sender<Change>,
    notes: &mut mpsc::UnboundedReceiver<Notification>,
    last_seq: &mut i64,
) -> Result<(), Stop> {
    let mut round = Vec::with_capacity(ROUND);
    loop {
        let first = tokio::select! {
            _ = changes.closed() => return Err(Stop::Closed),
            note = notes.recv() => note,
            () = tokio::time::sleep(QUIET_CHECK) => {
                check_listening(listening).await?;
                catch_up(readers, changes, last_seq).await?;
                continue;
            }
        };
        let Some(first) = first else {
            return Err(Stop::Failed(StoreError::backend(
                "listening for changes",
                "the listening connection was lost",
            )));
        };
        round.push(first);
        while round.len() < ROUND {
            match notes.try_recv() {
                Ok(note) => round.push(note),
                Err(_) => break,
            }
        }
        let mut events = false;
        let mut progressed = Vec::new();
        let mut merged = HashSet::new();
        for note in round.drain(..) {
            if note.channel() == CANCEL_CHANNEL {
                match note.payload().parse::<JobId>() {
                    Ok(id) => changes
                        .send(Change::Cancel(id))
                        .await
                        .map_err(|_| Stop::Closed)?,
                    Err(error) => {
                        tracing::warn!(payload = note.payload(), %error, "bad cancel request")
                    }
                }
            } else if note.channel() == PROGRESS_CHANNEL {
                match note.payload().parse::<JobId>() {
                    Ok(id) => {
                        if merged.insert(id) {
                            progressed.push(id);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(payload = note.payload(), %error, "bad progress notification")
                    }
                }
            } else if note
                .payload()
                .parse::<i64>()
                .map_or(true, |seq| seq > *last_seq)
            {
                events = true;
            }
        }
        let snapshots = progress(readers, &progressed).await?;
        let mut passed = HashMap::new();
        if events || !snapshots.is_empty() {
            passed = catch_up(readers, changes, last_seq).await?;
        }
        // A snapshot read before the log may be older than a transition the log just gave
        // (the job's replica ended it meanwhile): passed on, it would take watchers back.
        for job in snapshots.into_iter().filter(|job| {
            passed
                .get(&job.id)
                .is_none_or(|newest| job.version > *newest)
        }) {
            changes
                .send(Change::Event(std::sync::Arc::new(job)))
                .await
                .map_err(|_| Stop::Closed)?;
        }
    }
}

/// Asks the listening connection for an answer, bounded by [`CHECK_TIMEOUT`].
async fn check_listening(listening: &tokio_postgres::Client) -> Result<(), Stop> {
    let lost = |error: StoreError| Stop::Failed(error);
    match tokio::time::timeout(CHECK_TIMEOUT, listening.simple_query("SELECT 1")).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(lost(pg_error("checking the listening connection", error))),
        Err(_) => Err(lost(StoreError::backend(
            "checking the listening connection",
            format!("no answer in {CHECK_TIMEOUT:?}"),
        ))),
    }
}

/// The current snapshots of jobs whose progress another replica saved (those still stored).
/// Progress is not logged, so one missed while the feed was away is simply superseded by the
/// next.
async fn progress(readers: &Pool, ids: &[JobId]) -> Result<Vec<Job>, Stop> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let client = readers
        .get()
        .await
        .map_err(|e| Stop::Failed(pool_error(e)))?;
    let mut jobs = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(job) = reads::get(&client, *id).await.map_err(Stop::Failed)? {
            jobs.push(job);
        }
    }
    Ok(jobs)
}

/// Passes on every event after `last_seq`, page by page, moving `last_seq` along; returns the
/// newest version it passed on of each job.
async fn catch_up(
    readers: &Pool,
    changes: &mpsc::Sender<Change>,
    last_seq: &mut i64,
) -> Result<HashMap<JobId, i64>, Stop> {
    let labels = BTreeMap::new();
    let mut passed = HashMap::new();
    loop {
        let page = {
            let client = readers
                .get()
                .await
                .map_err(|e| Stop::Failed(pool_error(e)))?;
            reads::events_after(&client, *last_seq, None, &labels, PAGE)
                .await
                .map_err(Stop::Failed)?
        };
        let full = page.events.len() >= PAGE;
        for (seq, job) in page.events {
            let newest = passed.entry(job.id).or_insert(job.version);
            *newest = (*newest).max(job.version);
            changes
                .send(Change::Event(std::sync::Arc::new(job)))
                .await
                .map_err(|_| Stop::Closed)?;
            *last_seq = (*last_seq).max(seq);
        }
        *last_seq = (*last_seq).max(page.scanned_to);
        if !full {
            return Ok(passed);
        }
    }
}

/// Opens the listening connection: its notifications arrive on the returned channel, which
/// ends when the connection does.
async fn listen(
    config: &tokio_postgres::Config,
) -> Result<
    (
        tokio_postgres::Client,
        mpsc::UnboundedReceiver<Notification>,
    ),
    StoreError,
> {
    let fail = |e| pg_error("listening for changes", e);
    let (client, mut connection) = config.connect(NoTls).await.map_err(fail)?;
    let (notes, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(note)) => {
                    if notes.send(note).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %crate::with_causes(&error), "the change feed's connection failed");
                    return;
                }
            }
        }
    });
    client
        .batch_execute(&format!(
            "LISTEN {EVENTS_CHANNEL}; LISTEN {CANCEL_CHANNEL}; LISTEN {PROGRESS_CHANNEL}"
        ))
        .await
        .map_err(fail)?;
    Ok((client, received))
}
