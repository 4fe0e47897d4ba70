//! Scheduled jobs (`SubmitRequest.schedule_time`): a job waits QUEUED until its time and never
//! starts before it, jobs due now run ahead of it, it is cancelled, counted and refused like any
//! queued job, its schedule survives a restart, and on PostgreSQL no replica claims it early.

mod common;

use std::time::{Duration, SystemTime};

use common::postgres::{TestSchema, database_url};
use common::{
    Gate, PATIENCE, TestServer, action, bad_request_fields, cancel, gated, get, list_all,
    open_sqlite, request, state, submit, test_config, wait_done, watch_to_end,
};
use longrun::{
    actions::Registry,
    api::pb,
    store::{PostgresOptions, PostgresStore, Store},
};
use prost_types::Timestamp;
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

fn echo() -> pb::ActionSpec {
    action("echo", json!({}))
}

/// An echo job to run no earlier than `due`.
fn scheduled(due: SystemTime) -> pb::SubmitRequest {
    pb::SubmitRequest {
        schedule_time: Some(due.into()),
        ..request(vec![echo()])
    }
}

fn time(timestamp: Option<Timestamp>) -> SystemTime {
    SystemTime::try_from(timestamp.expect("a time")).expect("a valid time")
}

fn from_now(duration: Duration) -> SystemTime {
    SystemTime::now() + duration
}

/// A server on the memory store whose test config `configure` changes.
async fn server_with(configure: impl FnOnce(&mut longrun::config::Config)) -> TestServer {
    let mut config = test_config();
    configure(&mut config);
    TestServer::start_with(config, Registry::with_builtins()).await
}

/// A server on the SQLite store in `dir`.
async fn durable_server(dir: &std::path::Path) -> TestServer {
    TestServer::start_on(
        open_sqlite(dir).await,
        test_config(),
        Registry::with_builtins(),
    )
    .await
}

/// Asserts that no snapshot shows the job started before `due`.
fn never_started_before(seen: &[pb::Job], due: SystemTime) {
    for job in seen {
        if let Some(start) = job.start_time {
            assert!(time(Some(start)) >= due, "started before its time: {job:?}");
        }
    }
}

#[tokio::test]
async fn a_scheduled_job_waits_queued_until_due_then_runs_and_says_when() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    // Margin enough for the watch below to open before the job is due, even on a slow machine.
    let due = from_now(Duration::from_secs(2));
    let job = submit(&mut client, scheduled(due)).await;
    assert_eq!(state(&job), pb::JobState::Queued);
    assert_eq!(
        job.schedule_time,
        Some(due.into()),
        "kept to the nanosecond"
    );
    assert_eq!(
        get(&mut client, &job.id).await.schedule_time,
        job.schedule_time
    );

    let seen = watch_to_end(&mut client, &job.id, 0).await;
    let states: Vec<_> = seen.iter().map(state).collect();
    assert_eq!(
        states,
        [
            pb::JobState::Queued,
            pb::JobState::Running,
            pb::JobState::Succeeded
        ],
        "a scheduled job goes the usual way once due"
    );
    never_started_before(&seen, due);
    let done = seen.last().expect("the end");
    assert_eq!(done.schedule_time, Some(due.into()));
    assert_eq!(done.attempt, 1);
}

#[tokio::test]
async fn jobs_due_now_run_ahead_of_one_scheduled_earlier_for_later() {
    let server = server_with(|config| config.executor.concurrency = 1).await;
    let mut client = server.client.clone();
    let due = from_now(Duration::from_secs(2));
    let later = submit(&mut client, scheduled(due)).await;
    let now = submit(&mut client, request(vec![echo()])).await;
    // A time already past is no reason to wait.
    let past = submit(
        &mut client,
        scheduled(from_now(Duration::ZERO) - Duration::from_secs(3600)),
    )
    .await;

    let now = wait_done(&mut client, &now.id).await;
    let past = wait_done(&mut client, &past.id).await;
    let later = wait_done(&mut client, &later.id).await;
    for job in [&now, &past, &later] {
        assert_eq!(state(job), pb::JobState::Succeeded, "{job:?}");
    }
    let later_start = time(later.start_time);
    assert!(later_start >= due);
    assert!(time(now.end_time) <= later_start, "the due job ran first");
    assert!(
        time(past.end_time) <= later_start,
        "the past-due job ran first"
    );
    assert!(time(past.schedule_time) < time(past.create_time));
}

/// With the only worker busy, a job scheduled for later that becomes due gets in line at its
/// time: behind a job submitted after it but ready (and waiting) before that time.
async fn a_job_due_later_gets_in_line_at_its_time(store: std::sync::Arc<dyn Store>) {
    let gate = Gate::new(false);
    let mut config = test_config();
    config.executor.concurrency = 1;
    let server = TestServer::start_on(store, config, gate.registry()).await;
    let mut client = server.client.clone();
    let busy = submit(&mut client, request(vec![gated()])).await;
    assert_eq!(gate.next_started().await, busy.id);
    let due = from_now(Duration::from_secs(2));
    let scheduled_first = submit(&mut client, scheduled(due)).await;
    let ready_first = submit(&mut client, request(vec![echo()])).await;
    assert!(
        time(ready_first.create_time) < due,
        "a machine too slow for this test: submitted after the other was due"
    );
    // Both wait for the worker until the scheduled one is due too.
    tokio::time::sleep(due.duration_since(SystemTime::now()).unwrap_or_default()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.release(1);
    let scheduled_first = wait_done(&mut client, &scheduled_first.id).await;
    let ready_first = wait_done(&mut client, &ready_first.id).await;
    assert!(
        time(ready_first.end_time) <= time(scheduled_first.start_time),
        "the job ready since its submission ran first: {ready_first:?} {scheduled_first:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_job_due_later_gets_in_line_at_its_time_in_memory() {
    a_job_due_later_gets_in_line_at_its_time(std::sync::Arc::new(
        longrun::store::MemoryStore::new(),
    ))
    .await;
}

#[tokio::test]
async fn a_job_due_later_gets_in_line_at_its_time_on_postgres() {
    let Some(base) = database_url() else {
        return;
    };
    let schema = TestSchema::create(&base);
    let store = PostgresStore::open(&schema.url(), PostgresOptions::default())
        .await
        .expect("open store");
    a_job_due_later_gets_in_line_at_its_time(std::sync::Arc::new(store)).await;
}

#[tokio::test]
async fn a_scheduled_job_is_cancelled_at_once_and_counts_toward_the_queue_limit() {
    let server = server_with(|config| config.executor.max_queue_length = 2).await;
    let mut client = server.client.clone();
    let hour = from_now(Duration::from_secs(3600));
    let first = submit(&mut client, scheduled(hour)).await;
    let _second = submit(&mut client, scheduled(hour)).await;
    assert_eq!(server.executor.queue_length(), 2);
    let full = client
        .submit(request(vec![echo()]))
        .await
        .expect_err("the queue is full of scheduled jobs");
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");

    let cancelled = cancel(&mut client, &first.id).await;
    assert_eq!(state(&cancelled), pb::JobState::Cancelled);
    assert!(cancelled.start_time.is_none(), "it never ran");
    assert_eq!(server.executor.queue_length(), 1);
    // Its slot is free again.
    let job = submit(&mut client, request(vec![echo()])).await;
    assert_eq!(
        state(&wait_done(&mut client, &job.id).await),
        pb::JobState::Succeeded
    );
}

#[tokio::test]
async fn a_schedule_out_of_range_is_refused_naming_it_and_stores_nothing() {
    let server =
        server_with(|config| config.limits.max_schedule_delay = Duration::from_secs(60)).await;
    let mut client = server.client.clone();
    let refused = |schedule_time: Timestamp| {
        let mut client = client.clone();
        async move {
            let mut request = scheduled(SystemTime::UNIX_EPOCH);
            request.schedule_time = Some(schedule_time);
            let status = client.submit(request).await.expect_err("refused");
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert_eq!(bad_request_fields(&status), ["schedule_time"]);
            status.message().to_owned()
        }
    };
    let too_far: Timestamp = from_now(Duration::from_secs(62)).into();
    assert!(refused(too_far).await.contains("max_schedule_delay"));
    let mut bad_nanos: Timestamp = from_now(Duration::from_secs(10)).into();
    bad_nanos.nanos = 1_000_000_000;
    refused(bad_nanos).await;
    refused(Timestamp {
        seconds: -1,
        nanos: 0,
    })
    .await;
    assert!(list_all(&mut client).await.is_empty(), "nothing stored");

    // At the limit (measured from a moment before the server's): accepted.
    let edge = submit(&mut client, scheduled(from_now(Duration::from_secs(60)))).await;
    assert_eq!(state(&edge), pb::JobState::Queued);
}

#[tokio::test]
async fn an_idempotent_retry_must_ask_for_the_same_time() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let keyed = |due: SystemTime| pb::SubmitRequest {
        idempotency_key: "nightly-report".to_owned(),
        ..scheduled(due)
    };
    let due = from_now(Duration::from_secs(3600));
    let first = submit(&mut client, keyed(due)).await;
    let retry = submit(&mut client, keyed(due)).await;
    assert_eq!(retry.id, first.id);
    let status = client
        .submit(keyed(due + Duration::from_secs(1)))
        .await
        .expect_err("a different time is a different request");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(
        info.metadata.get("field").map(String::as_str),
        Some("schedule_time")
    );
    assert_eq!(list_all(&mut client).await.len(), 1);
}

#[tokio::test]
async fn a_schedule_survives_a_restart_of_the_durable_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = durable_server(dir.path()).await;
    let mut client = server.client.clone();
    let hour = from_now(Duration::from_secs(3600));
    let far = submit(&mut client, scheduled(hour)).await;
    let soon_due = from_now(Duration::from_millis(1500));
    let soon = submit(&mut client, scheduled(soon_due)).await;
    server.stop().await;

    let server = durable_server(dir.path()).await;
    let mut client = server.client.clone();
    let soon = wait_done(&mut client, &soon.id).await;
    assert_eq!(state(&soon), pb::JobState::Succeeded);
    assert!(time(soon.start_time) >= soon_due, "not before its time");
    let far = get(&mut client, &far.id).await;
    assert_eq!(
        state(&far),
        pb::JobState::Queued,
        "still waiting for its time"
    );
    assert_eq!(far.schedule_time, Some(hour.into()));
    assert_eq!(server.executor.queue_length(), 1);
    server.stop().await;

    // Only the job an hour ahead is left: nothing runs, and the gauges still count it.
    let server = durable_server(dir.path()).await;
    let metrics = server.executor.metrics();
    assert_eq!(
        (metrics.queue_depth.get(), metrics.scheduled.get()),
        (1, 1),
        "the gauges count what recovery queued"
    );
    server.stop().await;
}

#[tokio::test]
async fn replicas_on_postgres_claim_a_scheduled_job_only_once_due() {
    let Some(base) = database_url() else {
        return;
    };
    let schema = TestSchema::create(&base);
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let store = PostgresStore::open(&schema.url(), PostgresOptions::default())
            .await
            .expect("open store");
        let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(store);
        replicas.push(TestServer::start_on(store, test_config(), Registry::with_builtins()).await);
    }
    let mut first = replicas[0].client.clone();
    let mut second = replicas[1].client.clone();
    let hour = from_now(Duration::from_secs(3600));
    let far = submit(&mut first, scheduled(hour)).await;
    let due = from_now(Duration::from_millis(1500));
    let soon = submit(&mut first, scheduled(due)).await;

    let seen = tokio::time::timeout(PATIENCE, watch_to_end(&mut second, &soon.id, 0))
        .await
        .expect("the job ends in time");
    never_started_before(&seen, due);
    assert_eq!(
        seen.last().map(state),
        Some(pb::JobState::Succeeded),
        "{seen:?}"
    );
    // Both replicas have looked for work since (they do every second while idle).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let far = get(&mut second, &far.id).await;
    assert_eq!(
        state(&far),
        pb::JobState::Queued,
        "not claimed before its time"
    );
    assert_eq!(far.schedule_time, Some(hour.into()));
    for replica in replicas {
        replica.stop().await;
    }
}
