//! A job's life seen through the API: submit, the pushed stream of states and progress,
//! failures, retries, timeouts, and sync waits (idempotent resubmits: `idempotency.rs`).

mod common;

use std::time::Duration;

use common::*;
use longrun::api::pb::{self, ActionState, JobState};
use serde_json::json;

#[tokio::test]
async fn submitted_job_streams_queued_running_succeeded_with_rising_progress() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![sleep(300, 5)])).await;
    assert_eq!(state(&job), JobState::Queued);
    assert_eq!(job.version, 1);
    assert_eq!(job.attempt, 1);
    uuid::Uuid::parse_str(&job.id).expect("the id is a UUID");

    let seen = watch_to_end(&mut client, &job.id, 0).await;
    let versions: Vec<i64> = seen.iter().map(|j| j.version).collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions rise: {versions:?}"
    );
    let states: Vec<JobState> = seen.iter().map(state).collect();
    assert_eq!(states.last(), Some(&JobState::Succeeded));
    assert!(
        states.contains(&JobState::Running),
        "RUNNING was pushed: {states:?}"
    );
    let percents: Vec<i32> = seen
        .iter()
        .map(|j| j.progress.as_ref().unwrap().percent)
        .collect();
    assert!(
        percents.windows(2).all(|w| w[0] <= w[1]),
        "progress never falls: {percents:?}"
    );
    let distinct_progress = seen
        .iter()
        .filter(|j| state(j) == JobState::Running)
        .map(|j| j.progress.as_ref().unwrap().percent)
        .collect::<std::collections::BTreeSet<_>>();
    assert!(
        distinct_progress.len() >= 2,
        "progress updates were pushed: {percents:?}"
    );

    let last = seen.last().unwrap();
    assert_eq!(last.progress.as_ref().unwrap().percent, 100);
    assert_eq!(action_state(&last.actions[0]), ActionState::Succeeded);
    assert!(last.actions[0].result.is_some());
    assert!(last.start_time.is_some() && last.end_time.is_some());
}

#[tokio::test]
async fn failing_action_fails_the_job_and_skips_the_rest() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let failing = action(
        "fail",
        json!({"code": "UNAVAILABLE", "reason": "BACKEND_DOWN", "message": "no backend"}),
    );
    let job = submit(
        &mut client,
        request(vec![
            action("echo", json!({"message": "hi"})),
            failing,
            sleep(10, 1),
        ]),
    )
    .await;
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!(state(&done), JobState::Failed);
    let error = done.error.expect("the job's error is data");
    assert_eq!(
        (error.code.as_str(), error.reason.as_str()),
        ("UNAVAILABLE", "BACKEND_DOWN")
    );
    assert_eq!(error.message, "no backend");
    let states: Vec<ActionState> = done.actions.iter().map(action_state).collect();
    assert_eq!(
        states,
        [
            ActionState::Succeeded,
            ActionState::Failed,
            ActionState::Skipped
        ]
    );
    assert_eq!(done.actions[2].error.as_ref().unwrap().reason, "NOT_RUN");
}

#[tokio::test]
async fn retryable_failure_is_retried_until_it_succeeds() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let mut req = request(vec![action("fail", json!({"fail_attempts": 2}))]);
    req.max_attempts = 3;
    let job = submit(&mut client, req).await;
    // Resuming after version 1 replays every transition since submission, however far the
    // job has got by the time the watch opens.
    let seen = watch_to_end(&mut client, &job.id, 1).await;
    let done = seen.last().unwrap();
    assert_eq!(state(done), JobState::Succeeded);
    assert_eq!(done.attempt, 3);
    let requeued = seen
        .windows(2)
        .filter(|w| state(&w[0]) == JobState::Running && state(&w[1]) == JobState::Queued)
        .count();
    assert_eq!(requeued, 2, "each retry passed through QUEUED");
}

#[tokio::test]
async fn retries_stop_at_max_attempts_and_permanent_errors_are_not_retried() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let mut req = request(vec![action("fail", json!({}))]);
    req.max_attempts = 2;
    let job = submit(&mut client, req).await;
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!((state(&done), done.attempt), (JobState::Failed, 2));

    let mut req = request(vec![action("fail", json!({"retryable": false}))]);
    req.max_attempts = 5;
    let job = submit(&mut client, req).await;
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!((state(&done), done.attempt), (JobState::Failed, 1));
}

#[tokio::test]
async fn job_past_its_timeout_fails_with_deadline_exceeded() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let mut req = request(vec![sleep(60_000, 10)]);
    req.timeout = Some(prost_types::Duration {
        seconds: 0,
        nanos: 200_000_000,
    });
    let job = submit(&mut client, req).await;
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!(state(&done), JobState::Failed);
    let error = done.error.unwrap();
    assert_eq!(
        (error.code.as_str(), error.reason.as_str()),
        ("DEADLINE_EXCEEDED", "TIMEOUT")
    );
    assert_eq!(action_state(&done.actions[0]), ActionState::Failed);
}

#[tokio::test]
async fn sync_wait_returns_the_finished_job() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let mut req = request(vec![sleep(50, 2)]);
    req.wait = Some(prost_types::Duration {
        seconds: 10,
        nanos: 0,
    });
    let job = submit(&mut client, req).await;
    assert_eq!(state(&job), JobState::Succeeded);
}

#[tokio::test]
async fn sync_wait_that_runs_out_returns_the_job_not_an_error() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let mut req = request(vec![sleep(30_000, 3)]);
    req.wait = Some(prost_types::Duration {
        seconds: 0,
        nanos: 150_000_000,
    });
    let job = submit(&mut client, req).await;
    assert!(matches!(state(&job), JobState::Queued | JobState::Running));
    assert!(!job.id.is_empty());
}

#[tokio::test]
async fn sync_wait_is_bounded_by_the_call_deadline() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let mut req = request(vec![sleep(30_000, 3)]);
    req.wait = Some(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    });
    let mut call = tonic::Request::new(req);
    call.set_timeout(Duration::from_millis(500));
    let job = client
        .submit(call)
        .await
        .expect("answered before the deadline, not DEADLINE_EXCEEDED")
        .into_inner()
        .job
        .unwrap();
    assert_eq!(state(&job), JobState::Running);
}

#[tokio::test]
async fn wait_job_times_out_with_done_false() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![sleep(30_000, 2)])).await;
    let response = client
        .wait_job(pb::WaitJobRequest {
            job_id: job.id.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!response.done);
    assert_eq!(response.job.unwrap().id, job.id);
}

#[tokio::test]
async fn sha256_hashes_the_input_with_progress() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let input = vec![7u8; 1024 * 1024];
    let mut spec = action("sha256", json!({}));
    spec.input = input.clone().into();
    let job = submit(&mut client, request(vec![spec])).await;
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!(state(&done), JobState::Succeeded);
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&input))
    };
    let result = done.actions[0].result.clone().unwrap();
    let Some(prost_types::value::Kind::StructValue(s)) = result.kind else {
        panic!("result is an object");
    };
    let Some(prost_types::value::Kind::StringValue(hash)) = s.fields["sha256"].kind.clone() else {
        panic!("sha256 is a string");
    };
    assert_eq!(hash, expected);
}
