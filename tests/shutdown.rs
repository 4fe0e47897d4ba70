//! Graceful shutdown: no new jobs, running ones get the shutdown grace to finish, open watches
//! end with UNAVAILABLE (clients resume with `after_version`), and the server stops in time.

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::*;
use futures::StreamExt as _;
use longrun::{
    actions::Registry,
    api::pb::{self, JobState},
    config::Config,
    job::{self, JobId},
    store::Store,
};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt as _;

async fn stored(store: &Arc<dyn Store>, id: &str) -> job::Job {
    let id: JobId = id.parse().expect("a job id");
    store.get(id).await.expect("store").expect("job stored")
}

/// Starts stopping the server and returns once it reports NOT_SERVING, which it does just
/// before it stops taking jobs; the returned task ends when the server has stopped.
async fn begin_stop(server: TestServer) -> tokio::task::JoinHandle<Duration> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    let mut statuses = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let first = statuses.next().await.expect("a status").expect("status");
    assert_eq!(first.status(), ServingStatus::Serving);
    let stopping = tokio::spawn(async move {
        let started = Instant::now();
        server.stop().await;
        started.elapsed()
    });
    tokio::time::timeout(PATIENCE, async {
        while let Some(status) = statuses.next().await {
            if status.map_or(true, |s| s.status() != ServingStatus::Serving) {
                return;
            }
        }
    })
    .await
    .expect("the server reports it is stopping");
    stopping
}

#[tokio::test]
async fn submit_during_and_after_shutdown_is_refused_with_unavailable() {
    let gate = Gate::default();
    let server = TestServer::start_with(test_config(), gate.registry()).await;
    let mut client = server.client.clone();
    let store = Arc::clone(server.executor.store());
    let running = submit(&mut client, request(vec![gated()])).await;
    gate.next_started().await;

    // The running job holds the drain open, so the server is still reachable.
    let stopping = begin_stop(server).await;
    let status = client
        .submit(request(vec![sleep(10, 1)]))
        .await
        .expect_err("no new jobs while stopping");
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "SHUTTING_DOWN");
    gate.release(1);
    let took = tokio::time::timeout(PATIENCE, stopping)
        .await
        .expect("stops in time")
        .expect("stop task");
    assert!(took < Duration::from_secs(5), "stopped in {took:?}");

    let status = client
        .submit(request(vec![sleep(10, 1)]))
        .await
        .expect_err("the server is gone");
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    let jobs = store
        .list(&longrun::store::ListQuery {
            states: vec![],
            labels: Default::default(),
            before: None,
            limit: 100,
            tenant: None,
        })
        .await
        .expect("list");
    assert_eq!(jobs.len(), 1, "only the job submitted before the shutdown");
    assert_eq!(
        stored(&store, &running.id).await.state,
        job::JobState::Succeeded
    );
}

#[tokio::test]
async fn running_short_job_finishes_within_the_shutdown_grace() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let store = Arc::clone(server.executor.store());
    let job = submit(&mut client, request(vec![sleep(400, 4)])).await;
    let mut watch = open_watch(&mut client, &job.id, 0).await;
    next_until(&mut watch, |j| state(j) == JobState::Running).await;

    let stopping = begin_stop(server).await;
    let last = next_until(&mut watch, |j| state(j) != JobState::Running).await;
    assert_eq!(
        state(&last),
        JobState::Succeeded,
        "the watcher sees it finish"
    );
    let took = tokio::time::timeout(PATIENCE, stopping)
        .await
        .expect("stops in time")
        .expect("stop task");
    assert!(
        took < Duration::from_secs(2),
        "stopped once the job was done: {took:?}"
    );
    assert_eq!(
        stored(&store, &job.id).await.state,
        job::JobState::Succeeded
    );
}

#[tokio::test]
async fn a_wait_for_a_job_that_outlives_the_server_ends_with_unavailable() {
    // "The wait ran out" would be false: the caller asked to wait until the job ends.
    let gate = Gate::default();
    let server = TestServer::start_with(quick_shutdown(), gate.registry()).await;
    let mut client = server.client.clone();
    submit(&mut client, request(vec![gated()])).await;
    gate.next_started().await;
    let queued = submit(&mut client, request(vec![sleep(10, 1)])).await;
    let wait = {
        let mut client = client.clone();
        let job_id = queued.id.clone();
        tokio::spawn(async move {
            client
                .wait_job(pb::WaitJobRequest {
                    job_id,
                    timeout: None,
                })
                .await
        })
    };
    // The wait is in once it follows the queued job (the running one has a channel already).
    let hub = Arc::clone(server.executor.hub());
    tokio::time::timeout(PATIENCE, async {
        while hub.watched_jobs() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the wait reaches the server");

    let stopping = begin_stop(server).await;
    let answer = tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("the wait ends instead of hanging")
        .expect("wait task");
    let status = answer.expect_err("not an answer that the wait ran out");
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "SHUTTING_DOWN");
    tokio::time::timeout(PATIENCE, stopping)
        .await
        .expect("stops in time")
        .expect("stop task");
}

#[tokio::test]
async fn a_stream_that_never_ends_does_not_hold_the_shutdown() {
    // gRPC client-side health checking keeps a Health/Watch open on every channel, and it
    // never ends by itself: once the jobs are drained and the connections had their second to
    // close, those still open are cut, and the server stops.
    let server = TestServer::start_with(quick_shutdown(), Registry::with_builtins()).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut held = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let first = held.next().await.expect("a status").expect("status");
    assert_eq!(first.status(), ServingStatus::Serving);

    // `stop` fails the test unless the server stops within PATIENCE.
    server.stop().await;
    drop(held);
}

fn quick_shutdown() -> Config {
    let mut config = test_config();
    config.executor.concurrency = 1;
    config.shutdown_grace = Duration::from_millis(200);
    config
}

#[tokio::test]
async fn open_watch_of_a_queued_job_ends_with_unavailable_on_shutdown() {
    let gate = Gate::default();
    let server = TestServer::start_with(quick_shutdown(), gate.registry()).await;
    let mut client = server.client.clone();
    let store = Arc::clone(server.executor.store());
    let running = submit(&mut client, request(vec![gated()])).await;
    gate.next_started().await;
    let queued = submit(&mut client, request(vec![sleep(10, 1)])).await;
    let mut watch = open_watch(&mut client, &queued.id, 0).await;
    let first = next_until(&mut watch, |_| true).await;
    assert_eq!(state(&first), JobState::Queued);

    let stopping = begin_stop(server).await;
    let end = tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("the watch ends instead of hanging");
    match end {
        Some(Err(status)) => {
            assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
            assert!(
                status.message().contains("after_version"),
                "{}",
                status.message()
            );
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, "SHUTTING_DOWN");
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    tokio::time::timeout(PATIENCE, stopping)
        .await
        .expect("stops in time")
        .expect("stop task");

    // The job that outlived the grace was stopped and left queued for the next start.
    let interrupted = stored(&store, &running.id).await;
    assert_eq!(interrupted.state, job::JobState::Queued);
    assert_eq!(
        (interrupted.attempt, interrupted.max_attempts),
        (1, 1),
        "a graceful stop does not use up the attempt"
    );
    assert_eq!(
        stored(&store, &queued.id).await.state,
        job::JobState::Queued
    );
}

#[tokio::test]
async fn open_watch_of_many_jobs_ends_with_unavailable_on_shutdown() {
    let gate = Gate::default();
    let server = TestServer::start_with(quick_shutdown(), gate.registry()).await;
    let mut client = server.client.clone();
    let mut stream = client
        .watch_jobs(pb::WatchJobsRequest::default())
        .await
        .expect("watch_jobs")
        .into_inner();
    let running = submit(&mut client, request(vec![gated()])).await;
    gate.next_started().await;
    // Read up to the job's start, so the stream is then waiting, as most are at a shutdown.
    let started = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = stream.next().await {
            let job = event.expect("an event").job.expect("a job");
            if job.id == running.id && state(&job) == JobState::Running {
                return;
            }
        }
        panic!("the stream ended before the job ran");
    });
    started.await.expect("the job's start is sent");

    let stopping = begin_stop(server).await;
    let end = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.next().await {
                // The interrupted job's requeue may come first.
                Some(Ok(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends instead of hanging");
    match end {
        Some(Err(status)) => {
            assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
            assert!(
                status.message().contains("after_cursor"),
                "{}",
                status.message()
            );
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, "SHUTTING_DOWN");
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    tokio::time::timeout(PATIENCE, stopping)
        .await
        .expect("stops in time")
        .expect("stop task");
}

#[tokio::test]
async fn stop_returns_in_bounded_time_even_when_a_handler_ignores_it() {
    let gate = Gate::new(true);
    let config = quick_shutdown();
    let bound = config.shutdown_grace + config.executor.cancel_grace + Duration::from_secs(2);
    let server = TestServer::start_with(config, gate.registry()).await;
    let mut client = server.client.clone();
    let store = Arc::clone(server.executor.store());
    let job = submit(&mut client, request(vec![gated()])).await;
    gate.next_started().await;

    let stopping = begin_stop(server).await;
    let took = tokio::time::timeout(PATIENCE, stopping)
        .await
        .expect("stops in time")
        .expect("stop task");
    assert!(took < bound, "stopped in {took:?}, bound {bound:?}");
    assert_eq!(gate.running(), 0, "the stubborn handler was dropped");
    let interrupted = stored(&store, &job.id).await;
    assert_eq!(interrupted.state, job::JobState::Queued);
    assert_eq!(
        (interrupted.attempt, interrupted.max_attempts),
        (1, 1),
        "a graceful stop does not use up the attempt"
    );
}

#[tokio::test]
async fn stopped_server_takes_no_connections() {
    let server = TestServer::start_with(test_config(), Registry::with_builtins()).await;
    let addr = server.addr;
    server.stop().await;
    let connected = pb::jobs_client::JobsClient::connect(format!("http://{addr}")).await;
    assert!(connected.is_err(), "nothing listens any more");
}
