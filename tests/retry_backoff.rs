//! A retry's backoff is part of the job: `Job.next_attempt_time` tells when the next attempt may
//! start, nothing starts it earlier, the wait holds across a restart of the durable store, and
//! on PostgreSQL no replica holds the job through the wait nor claims it before its time.

mod common;

use std::time::{Duration, SystemTime};

use common::postgres::{TestSchema, database_url};
use common::{
    PATIENCE, TestServer, action, cancel, get, open_sqlite, request, state, submit, test_config,
    until, wait_done, watch_to_end,
};
use longrun::{
    actions::Registry,
    api::pb,
    config::Config,
    job::{Job, JobId, NewAction, NewJob},
    store::{PostgresOptions, PostgresStore, SharedStore, Store},
};
use prost_types::Timestamp;
use serde_json::json;
use tonic::Code;

/// A server config whose every retry waits `backoff`, less its jitter (up to a quarter).
fn backoff_config(backoff: Duration) -> Config {
    let mut config = test_config();
    config.executor.retry_backoff_initial = backoff;
    config.executor.retry_backoff_max = backoff;
    config
}

/// A job whose every attempt fails (retryably), with `max_attempts` attempts.
fn failing(max_attempts: i32) -> pb::SubmitRequest {
    pb::SubmitRequest {
        max_attempts,
        ..request(vec![action("fail", json!({}))])
    }
}

fn time(timestamp: Option<Timestamp>) -> SystemTime {
    SystemTime::try_from(timestamp.expect("a time")).expect("a valid time")
}

fn waiting_for_second_attempt(job: &pb::Job) -> bool {
    state(job) == pb::JobState::Queued && job.attempt == 2
}

/// Asserts that no snapshot shows attempt 2 started before `next`.
fn second_attempt_not_before(seen: &[pb::Job], next: SystemTime) {
    for job in seen.iter().filter(|job| job.attempt == 2) {
        if state(job) != pb::JobState::Queued {
            assert!(
                time(job.start_time) >= next,
                "attempt 2 started before its backoff ended: {job:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_retried_job_says_when_its_next_attempt_starts_and_none_starts_before() {
    let backoff = Duration::from_millis(800);
    let server = TestServer::start_with(backoff_config(backoff), Registry::with_builtins()).await;
    let mut client = server.client.clone();
    let job = submit(&mut client, failing(2)).await;
    let seen = tokio::time::timeout(PATIENCE, watch_to_end(&mut client, &job.id, 0))
        .await
        .expect("the job ends in time");

    let waiting = seen
        .iter()
        .find(|job| waiting_for_second_attempt(job))
        .expect("the retry is a transition every watcher sees");
    let retried_at = time(waiting.update_time);
    let next = time(waiting.next_attempt_time);
    let wait = next.duration_since(retried_at).expect("after the retry");
    assert!(
        wait >= backoff * 3 / 4 && wait <= backoff,
        "the backoff less at most a quarter of jitter: {wait:?}"
    );
    second_attempt_not_before(&seen, next);
    let last = seen.last().expect("snapshots");
    assert_eq!(state(last), pb::JobState::Failed, "{seen:?}");
    assert_eq!(last.attempt, 2);
    assert_eq!(last.next_attempt_time, None, "no attempt follows the last");
    let running: Vec<_> = seen
        .iter()
        .filter(|job| state(job) == pb::JobState::Running)
        .collect();
    assert!(
        running.iter().all(|job| job.next_attempt_time.is_none()),
        "cleared once the attempt starts: {running:?}"
    );
}

/// QUEUED between attempts, and counted so: a queue full of jobs waiting to be retried refuses
/// more work, as one full of scheduled jobs does, rather than overflowing when they come due.
#[tokio::test]
async fn jobs_waiting_to_be_retried_count_toward_the_queue_limit_and_are_cancelled_at_once() {
    let mut config = backoff_config(Duration::from_secs(3600));
    config.executor.max_queue_length = 1;
    let server = TestServer::start_with(config, Registry::with_builtins()).await;
    let mut client = server.client.clone();
    let job = submit(&mut client, failing(2)).await;
    let waiting = until(&mut client, &job.id, waiting_for_second_attempt).await;
    // Counted once its task has handed it to the queue, just after the retry is told.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.executor.queue_length() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let full = client
        .submit(request(vec![action("echo", json!({}))]))
        .await
        .expect_err("the queue is full");
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");

    let cancelled = cancel(&mut client, &job.id).await;
    assert_eq!(state(&cancelled), pb::JobState::Cancelled);
    assert!(cancelled.version > waiting.version);
    assert_eq!(cancelled.next_attempt_time, None);
    assert_eq!(server.executor.queue_length(), 0, "its place is free again");
}

#[tokio::test]
async fn a_retry_waits_out_its_backoff_across_a_restart_of_the_durable_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = || backoff_config(Duration::from_secs(2));
    let start = || async {
        TestServer::start_on(
            open_sqlite(dir.path()).await,
            config(),
            Registry::with_builtins(),
        )
        .await
    };
    let server = start().await;
    let mut client = server.client.clone();
    let job = submit(&mut client, failing(2)).await;
    let waiting = until(&mut client, &job.id, waiting_for_second_attempt).await;
    let next = time(waiting.next_attempt_time);
    server.stop().await;

    let server = start().await;
    let mut client = server.client.clone();
    let restarted = get(&mut client, &job.id).await;
    if SystemTime::now() < next {
        assert_eq!(state(&restarted), pb::JobState::Queued, "{restarted:?}");
        assert_eq!(restarted.next_attempt_time, waiting.next_attempt_time);
    }
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!((state(&done), done.attempt), (pb::JobState::Failed, 2));
    assert!(
        time(done.start_time) >= next,
        "the restart ran the retry before its backoff ended: {done:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn on_postgres_no_replica_holds_or_claims_a_retry_before_its_time() {
    let Some(base) = database_url() else {
        return;
    };
    let schema = TestSchema::create(&base);
    let replica = || async {
        let store = PostgresStore::open(&schema.url(), PostgresOptions::default())
            .await
            .expect("open store");
        let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(store);
        TestServer::start_on(
            store,
            backoff_config(Duration::from_secs(2)),
            Registry::with_builtins(),
        )
        .await
    };
    let first = replica().await;
    let mut client = first.client.clone();
    let job = submit(&mut client, failing(2)).await;
    let waiting = until(&mut client, &job.id, waiting_for_second_attempt).await;
    let next = time(waiting.next_attempt_time);
    // Its replica stops during the wait (giving up what it holds), and another starts: the
    // stored time, not a lease, keeps the second attempt waiting.
    first.stop().await;
    let second = replica().await;
    let mut client = second.client.clone();
    let seen = tokio::time::timeout(PATIENCE, watch_to_end(&mut client, &job.id, 0))
        .await
        .expect("the job ends in time");
    second_attempt_not_before(&seen, next);
    let last = seen.last().expect("snapshots");
    assert_eq!((state(last), last.attempt), (pb::JobState::Failed, 2));
    second.stop().await;
}

/// A Cancel that marked a job on PostgreSQL while its attempt ran, which the replica running it
/// never carried out (it retried and let the job go, and died before it could cancel), is
/// carried out by the replica that claims the job next: it ends CANCELLED, never started again.
#[tokio::test]
async fn on_postgres_a_cancel_mark_left_on_a_retried_job_ends_it_at_its_next_claim() {
    let Some(base) = database_url() else {
        return;
    };
    let schema = TestSchema::create(&base);
    let open = || async {
        PostgresStore::open(&schema.url(), PostgresOptions::default())
            .await
            .expect("open store")
    };
    // The lost replica's part, done by hand through the store: claim, start, the mark of
    // another replica's Cancel, the retry (due at once), the release without a cancel.
    let runner = open().await;
    let canceller = open().await;
    let spec = NewJob {
        actions: vec![NewAction {
            name: "echo".to_owned(),
            params: Default::default(),
            input: Default::default(),
        }],
        max_attempts: Some(2),
        ..NewJob::default()
    };
    let job = Job::new(JobId::generate(), spec, 1, SystemTime::now());
    runner.create(&job).await.expect("create");
    let mut job = SharedStore::claim(&runner, 1, &[])
        .await
        .expect("claim")
        .remove(0);
    job.start(SystemTime::now()).expect("start");
    runner.save(&job).await.expect("save the start");
    assert!(canceller.request_cancel(job.id).await.expect("mark"));
    job.retry(SystemTime::now(), Duration::ZERO).expect("retry");
    runner.save(&job).await.expect("save the retry");
    assert!(
        SharedStore::release(&runner, job.id)
            .await
            .expect("release")
    );

    let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(open().await);
    let replica = TestServer::start_on(store, test_config(), Registry::with_builtins()).await;
    let mut client = replica.client.clone();
    let id = job.id.to_string();
    let seen = tokio::time::timeout(PATIENCE, watch_to_end(&mut client, &id, 0))
        .await
        .expect("the job ends in time");
    let last = seen.last().expect("snapshots");
    assert_eq!(state(last), pb::JobState::Cancelled, "{seen:?}");
    assert!(
        seen.iter()
            .all(|job| !(job.attempt == 2 && state(job) == pb::JobState::Running)),
        "the second attempt never started: {seen:?}"
    );
    replica.stop().await;
}
