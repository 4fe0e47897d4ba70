//! The `google.longrunning.Operations` facade, end to end through its generated tonic client:
//! each job reads as `operations/{id}` with its snapshot as metadata, done when terminal, the
//! job as the response on success and a `google.rpc.Status` on failure or cancellation.

mod common;

use std::time::Duration;

use common::*;
use longrun::api::{
    longrunning::{
        CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
        Operation, WaitOperationRequest, operation::Result as Outcome,
        operations_client::OperationsClient,
    },
    pb::{self, JobState},
};
use prost::Message as _;
use serde_json::json;
use tonic::{Code, transport::Channel};
use tonic_types::{StatusExt as _, pb::ErrorInfo};

async fn operations(server: &TestServer) -> OperationsClient<Channel> {
    OperationsClient::connect(format!("http://{}", server.addr))
        .await
        .expect("connect")
}

fn name(job: &pb::Job) -> String {
    format!("operations/{}", job.id)
}

async fn get_op(client: &mut OperationsClient<Channel>, name: &str) -> Operation {
    client
        .get_operation(GetOperationRequest {
            name: name.to_owned(),
        })
        .await
        .expect("get operation")
        .into_inner()
}

/// The job packed in an `Any` (metadata or response).
fn unpack_job(any: &prost_types::Any) -> pb::Job {
    assert_eq!(any.type_url, "type.googleapis.com/longrun.v1.Job");
    pb::Job::decode(any.value.as_slice()).expect("a longrun.v1.Job")
}

fn metadata_job(op: &Operation) -> pb::Job {
    unpack_job(op.metadata.as_ref().expect("metadata"))
}

fn error_of(op: &Operation) -> &tonic_types::pb::Status {
    match &op.result {
        Some(Outcome::Error(status)) => status,
        other => panic!("an error result, not {other:?}"),
    }
}

fn error_info(status: &tonic_types::pb::Status) -> ErrorInfo {
    let any = status
        .details
        .iter()
        .find(|d| d.type_url == "type.googleapis.com/google.rpc.ErrorInfo")
        .expect("an ErrorInfo detail");
    ErrorInfo::decode(any.value.as_slice()).expect("decodes")
}

fn millis_proto(ms: i64) -> Option<prost_types::Duration> {
    Some(millis(ms))
}

#[tokio::test]
async fn get_shows_a_running_job_then_its_success() {
    let gate = Gate::default();
    let server = TestServer::start_with(test_config(), gate.registry()).await;
    let mut jobs = server.client.clone();
    let mut ops = operations(&server).await;
    let job = submit(&mut jobs, request(vec![gated()])).await;
    gate.next_started().await;

    let running = get_op(&mut ops, &name(&job)).await;
    assert_eq!(running.name, name(&job));
    assert!(!running.done);
    assert!(
        running.result.is_none(),
        "neither error nor response while running"
    );
    let snapshot = metadata_job(&running);
    assert_eq!(snapshot.id, job.id);
    assert_eq!(snapshot.state, JobState::Running as i32);
    assert_eq!(snapshot.version, get(&mut jobs, &job.id).await.version);

    gate.release(1);
    let finished = wait_done(&mut jobs, &job.id).await;
    let done = get_op(&mut ops, &name(&job)).await;
    assert!(done.done);
    let meta = metadata_job(&done);
    assert_eq!(
        (meta.id.as_str(), meta.version),
        (job.id.as_str(), finished.version)
    );
    let Some(Outcome::Response(response)) = &done.result else {
        panic!("a response: {:?}", done.result);
    };
    let response = unpack_job(response);
    assert_eq!(response.state, JobState::Succeeded as i32);
    assert_eq!(response.version, finished.version);
    assert!(
        response.actions[0].result.is_some(),
        "per-action results are in the response"
    );
}

#[tokio::test]
async fn a_failed_job_reads_as_its_canonical_code_with_error_info() {
    let server = TestServer::start().await;
    let mut jobs = server.client.clone();
    let mut ops = operations(&server).await;
    let fail = action(
        "fail",
        json!({"code": "DEADLINE_EXCEEDED", "reason": "TOO_SLOW", "message": "slow", "retryable": false}),
    );
    let job = submit(&mut jobs, request(vec![fail])).await;
    wait_done(&mut jobs, &job.id).await;

    let op = get_op(&mut ops, &name(&job)).await;
    assert!(op.done);
    let status = error_of(&op);
    assert_eq!(status.code, Code::DeadlineExceeded as i32);
    assert_eq!(status.message, "slow");
    let info = error_info(status);
    assert_eq!(info.reason, "TOO_SLOW");
    assert_eq!(info.domain, "longrun.dev");
    assert_eq!(info.metadata.get("job_id"), Some(&job.id));
    assert_eq!(info.metadata.get("attempt").map(String::as_str), Some("1"));
    assert_eq!(metadata_job(&op).state, JobState::Failed as i32);
}

#[tokio::test]
async fn cancel_stops_a_running_sleep_which_then_reads_as_cancelled() {
    let server = TestServer::start().await;
    let mut jobs = server.client.clone();
    let mut ops = operations(&server).await;
    let job = submit(&mut jobs, request(vec![sleep(60_000, 60)])).await;
    until_state(&mut jobs, &job.id, JobState::Running).await;

    ops.cancel_operation(CancelOperationRequest { name: name(&job) })
        .await
        .expect("cancel operation");
    let ended = wait_done(&mut jobs, &job.id).await;
    assert_eq!(ended.state, JobState::Cancelled as i32);

    let op = get_op(&mut ops, &name(&job)).await;
    assert!(op.done);
    let status = error_of(&op);
    assert_eq!(status.code, 1, "CANCELLED, as google.longrunning documents");
    assert_eq!(error_info(status).domain, "longrun.dev");
}

#[tokio::test]
async fn delete_removes_finished_operations_and_refuses_running_ones() {
    let gate = Gate::default();
    let server = TestServer::start_with(test_config(), gate.registry()).await;
    let mut jobs = server.client.clone();
    let mut ops = operations(&server).await;

    let running = submit(&mut jobs, request(vec![gated()])).await;
    gate.next_started().await;
    let refused = ops
        .delete_operation(DeleteOperationRequest {
            name: name(&running),
        })
        .await
        .expect_err("a running operation is not deleted");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    let finished = submit(&mut jobs, request(vec![action("echo", json!({}))])).await;
    wait_done(&mut jobs, &finished.id).await;
    ops.delete_operation(DeleteOperationRequest {
        name: name(&finished),
    })
    .await
    .expect("delete a finished operation");
    let gone = ops
        .get_operation(GetOperationRequest {
            name: name(&finished),
        })
        .await
        .expect_err("deleted");
    assert_eq!(gone.code(), Code::NotFound);
    gate.release(1);
}

#[tokio::test]
async fn list_pages_newest_first_and_filters_on_done() {
    let gate = Gate::default();
    let server = TestServer::start_with(test_config(), gate.registry()).await;
    let mut jobs = server.client.clone();
    let mut ops = operations(&server).await;
    let mut finished = Vec::new();
    for _ in 0..3 {
        let job = submit(&mut jobs, request(vec![action("echo", json!({}))])).await;
        wait_done(&mut jobs, &job.id).await;
        finished.push(name(&job));
    }
    let running = name(&submit(&mut jobs, request(vec![gated()])).await);
    gate.next_started().await;

    let mut pages = Vec::new();
    let mut token = String::new();
    for name in ["", "operations"] {
        assert!(
            ops.list_operations(ListOperationsRequest {
                name: name.to_owned(),
                ..Default::default()
            })
            .await
            .is_ok(),
            "{name:?} is the collection"
        );
    }
    loop {
        let page = ops
            .list_operations(ListOperationsRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.operations.len() <= 3);
        pages.push(page.operations);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages.len(), 2);
    let names: Vec<String> = pages.concat().into_iter().map(|o| o.name).collect();
    let mut expected = finished.clone();
    expected.push(running.clone());
    expected.reverse();
    assert_eq!(names, expected, "newest first, every operation once");

    let list = |filter: &str| ListOperationsRequest {
        filter: filter.to_owned(),
        ..Default::default()
    };
    let done = ops
        .list_operations(list("done=true"))
        .await
        .expect("done")
        .into_inner();
    assert!(done.operations.iter().all(|o| o.done));
    assert_eq!(done.operations.len(), 3);
    let not_done = ops
        .list_operations(list(" done = false "))
        .await
        .expect("not done")
        .into_inner();
    let not_done: Vec<String> = not_done.operations.into_iter().map(|o| o.name).collect();
    assert_eq!(not_done, vec![running]);

    for filter in ["state=RUNNING", "done=maybe", "done"] {
        let status = ops.list_operations(list(filter)).await.expect_err(filter);
        assert_eq!(status.code(), Code::InvalidArgument, "{filter}");
        assert_eq!(bad_request_fields(&status), vec!["filter"], "{filter}");
    }
    gate.release(1);
}

#[tokio::test]
async fn wait_returns_not_done_after_a_short_timeout_and_done_for_a_short_job() {
    let server = TestServer::start().await;
    let mut jobs = server.client.clone();
    let mut ops = operations(&server).await;
    let long = submit(&mut jobs, request(vec![sleep(60_000, 10)])).await;
    let started = std::time::Instant::now();
    let op = ops
        .wait_operation(WaitOperationRequest {
            name: name(&long),
            timeout: millis_proto(200),
        })
        .await
        .expect("wait")
        .into_inner();
    assert!(!op.done);
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert!(started.elapsed() < PATIENCE);

    // Bounded by the call's deadline too, when that is sooner than the timeout.
    let mut request = tonic::Request::new(WaitOperationRequest {
        name: name(&long),
        timeout: millis_proto(60_000),
    });
    request.set_timeout(Duration::from_millis(300));
    let op = ops
        .wait_operation(request)
        .await
        .expect("answered before the deadline");
    assert!(!op.into_inner().done);

    let short = submit(&mut jobs, request_of(sleep(50, 1))).await;
    let op = ops
        .wait_operation(WaitOperationRequest {
            name: name(&short),
            timeout: Some(millis(PATIENCE.as_millis() as i64)),
        })
        .await
        .expect("wait")
        .into_inner();
    assert!(op.done);
    assert!(matches!(op.result, Some(Outcome::Response(_))));
    cancel(&mut jobs, &long.id).await;
}

#[tokio::test]
async fn a_wait_for_an_operation_that_outlives_the_server_ends_with_unavailable() {
    // `done: false` tells an LRO client that its wait ran out, which would be false: neither
    // the timeout nor the deadline did. WaitJob answers the same way.
    let gate = Gate::default();
    let mut config = test_config();
    config.executor.concurrency = 1;
    config.shutdown_grace = Duration::from_millis(200);
    let mut server = TestServer::start_with(config, gate.registry()).await;
    let mut jobs = server.client.clone();
    let ops = operations(&server).await;
    let running = submit(&mut jobs, request(vec![gated()])).await;
    gate.next_started().await;
    let queued = submit(&mut jobs, request_of(sleep(10, 1))).await;
    let wait = |job: &pb::Job| {
        let mut ops = ops.clone();
        let name = name(job);
        tokio::spawn(async move {
            ops.wait_operation(WaitOperationRequest {
                name,
                timeout: millis_proto(30_000),
            })
            .await
        })
    };
    let waits = [wait(&running), wait(&queued)];
    // The queued job's wait is in once that job has a channel (the running one has one
    // already); the other wait was sent first, and has the shutdown grace to arrive anyway.
    let hub = std::sync::Arc::clone(server.executor.hub());
    tokio::time::timeout(PATIENCE, async {
        while hub.watched_jobs() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the waits reach the server");

    server.begin_stop();
    for (job, wait) in [&running, &queued].into_iter().zip(waits) {
        let answer = tokio::time::timeout(PATIENCE, wait)
            .await
            .expect("the wait ends long before its timeout")
            .expect("wait task");
        let status = answer.expect_err("not an answer that the wait ran out");
        assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "SHUTTING_DOWN", "job {}", job.id);
        assert_eq!(info.domain, "longrun.dev");
    }
    server.stop().await;
}

fn request_of(action: pb::ActionSpec) -> pb::SubmitRequest {
    request(vec![action])
}

#[tokio::test]
async fn bad_names_are_invalid_arguments_naming_name_and_unknown_ones_not_found() {
    let server = TestServer::start().await;
    let mut ops = operations(&server).await;
    for bad in [
        "",
        "0190b6c4-7d1e-7c3a-9f0e-1b2c3d4e5f60",
        "jobs/0190b6c4-7d1e-7c3a-9f0e-1b2c3d4e5f60",
        "operations/",
        "operations/nope",
    ] {
        let get = ops
            .get_operation(GetOperationRequest {
                name: bad.to_owned(),
            })
            .await
            .expect_err(bad);
        assert_eq!(get.code(), Code::InvalidArgument, "{bad:?}");
        assert_eq!(bad_request_fields(&get), vec!["name"], "{bad:?}");
        let wait = ops
            .wait_operation(WaitOperationRequest {
                name: bad.to_owned(),
                timeout: None,
            })
            .await
            .expect_err(bad);
        assert_eq!(wait.code(), Code::InvalidArgument, "{bad:?}");
        let cancel = ops
            .cancel_operation(CancelOperationRequest {
                name: bad.to_owned(),
            })
            .await
            .expect_err(bad);
        assert_eq!(bad_request_fields(&cancel), vec!["name"], "{bad:?}");
        let delete = ops
            .delete_operation(DeleteOperationRequest {
                name: bad.to_owned(),
            })
            .await
            .expect_err(bad);
        assert_eq!(bad_request_fields(&delete), vec!["name"], "{bad:?}");
    }
    let list = ops
        .list_operations(ListOperationsRequest {
            name: "projects/p/operations".to_owned(),
            ..Default::default()
        })
        .await
        .expect_err("another collection");
    assert_eq!(bad_request_fields(&list), vec!["name"]);
    let partial = ops
        .list_operations(ListOperationsRequest {
            return_partial_success: true,
            ..Default::default()
        })
        .await
        .expect_err("not supported");
    assert_eq!(partial.code(), Code::Unimplemented);

    let unknown = ops
        .get_operation(GetOperationRequest {
            name: "operations/0190b6c4-7d1e-7c3a-9f0e-1b2c3d4e5f60".to_owned(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);
}
