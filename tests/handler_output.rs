//! What an embedder's handler hands back is kept so that every client can read the job:
//! a result nested as deep as a result may be reads back through every RPC (protobuf decoders
//! stop at 100 nested messages), one nested deeper fails its action with `RESULT_TOO_DEEP`
//! instead of making the job unreadable, and an error's details and code are kept within
//! what clients can decode and map.

mod common;

use common::*;
use longrun::{
    actions::{ActionContext, ActionDescription, Handler, HandlerError, ParamInfo, ParamType},
    api::{
        longrunning::{
            GetOperationRequest, operation::Result as Outcome, operations_client::OperationsClient,
        },
        pb::{self, JobState, jobs_client::JobsClient},
    },
    job::MAX_RESULT_DEPTH,
};
use prost::Message as _;
use serde_json::{Value, json};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

/// `levels` objects nested in each other, the innermost holding a number: as deep as
/// `levels` + 1 below the value that holds it.
fn nested(levels: u64) -> Value {
    let mut value = json!(1);
    for _ in 0..levels {
        value = json!({ "x": value });
    }
    value
}

/// Returns `{"x": … 1 …}` nested `levels` objects deep, or with `fail`, fails with that
/// nesting in its error's details and `code` as its code.
struct Deep;

#[longrun::actions::async_trait]
impl Handler for Deep {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Test action returning a deeply nested result.".to_owned(),
            params: vec![
                ParamInfo::required("levels", ParamType::Integer, "how deep"),
                ParamInfo::optional("fail", ParamType::Boolean, "fail instead"),
                ParamInfo::optional("code", ParamType::String, "the failure's code"),
            ],
            uses_input: false,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        let levels = ctx.params["levels"].as_f64().unwrap_or(0.0) as u64;
        if ctx.params.get("fail") == Some(&json!(true)) {
            let code = ctx.params.get("code").and_then(Value::as_str).unwrap_or("");
            let mut error = HandlerError::permanent(code, "DEEP", "details nest");
            error
                .error
                .details
                .insert("nest".to_owned(), nested(levels));
            return Err(error);
        }
        Ok(nested(levels))
    }
}

/// Returns what its context says of the job: attempts, labels, tenant.
struct Context;

#[longrun::actions::async_trait]
impl Handler for Context {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Test action returning its context.".to_owned(),
            params: vec![],
            uses_input: false,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        Ok(json!({
            "attempt": ctx.attempt,
            "max_attempts": ctx.max_attempts,
            "labels": ctx.labels,
            "tenant": ctx.tenant,
        }))
    }
}

async fn server() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut registry = longrun::actions::Registry::with_builtins();
    registry.register("deep", Deep);
    registry.register("context", Context);
    // SQLite: the snapshot goes through the store's JSON and back, as it does after a restart.
    let server = TestServer::start_on(open_sqlite(dir.path()).await, test_config(), registry).await;
    (dir, server)
}

/// Reads every message of a WatchJobs stream opened before `job` was submitted, until the one
/// that shows it ended: each decoded by prost as a generated client's is.
async fn read_watch_jobs_to_end(
    watch: &mut tonic::Streaming<pb::WatchJobsResponse>,
    job: &pb::Job,
) {
    let ended = async {
        while let Some(message) = watch.next().await {
            let message = message.expect("WatchJobs reads every message");
            let shown = message.job.expect("a job");
            if shown.id == job.id
                && state(&shown) != JobState::Queued
                && state(&shown) != JobState::Running
            {
                return;
            }
        }
        panic!("WatchJobs ended before the job did");
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), ended)
        .await
        .expect("WatchJobs tells of the job's end");
}

async fn watch_all(client: &mut JobsClient<Channel>) -> tonic::Streaming<pb::WatchJobsResponse> {
    client
        .watch_jobs(pb::WatchJobsRequest::default())
        .await
        .expect("WatchJobs")
        .into_inner()
}

/// Reads `job` through GetStatus, ListJobs, WatchJob and GetOperation, each decoded by prost
/// as any generated client does, and returns the GetStatus snapshot.
async fn read_everywhere(server: &TestServer, job: &pb::Job) -> pb::Job {
    let mut client = server.client().await;
    let got = client
        .get_status(pb::GetStatusRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect("GetStatus reads the job")
        .into_inner()
        .job
        .expect("a job");
    let listed = client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("ListJobs reads the page holding the job")
        .into_inner();
    assert!(listed.jobs.iter().any(|j| j.id == job.id));
    let mut watch = client
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_version: 0,
        })
        .await
        .expect("WatchJob")
        .into_inner();
    while let Some(message) = watch.next().await {
        message.expect("WatchJob reads every message");
    }
    let mut operations = OperationsClient::connect(format!("http://{}", server.addr))
        .await
        .expect("connect");
    let operation = operations
        .get_operation(GetOperationRequest {
            name: format!("operations/{}", job.id),
        })
        .await
        .expect("GetOperation reads the job")
        .into_inner();
    if let Some(Outcome::Response(response)) = operation.result {
        pb::Job::decode(response.value.as_slice()).expect("the response decodes");
    }
    got
}

#[tokio::test]
async fn a_result_as_deep_as_allowed_reads_back_everywhere_and_a_deeper_one_fails_its_action() {
    let (_dir, server) = server().await;
    let mut client = server.client().await;
    let mut watch = watch_all(&mut client).await;
    // The number innermost is MAX_RESULT_DEPTH levels down.
    let levels = MAX_RESULT_DEPTH as u64;
    let fits = submit(
        &mut client,
        request(vec![action("deep", json!({ "levels": levels }))]),
    )
    .await;
    let done = wait_done(&mut client, &fits.id).await;
    assert_eq!(state(&done), JobState::Succeeded, "{done:?}");
    let read = read_everywhere(&server, &fits).await;
    read_watch_jobs_to_end(&mut watch, &fits).await;
    let result = read.actions[0].result.as_ref().expect("the result is kept");
    let mut depth = 0;
    let mut value = result;
    while let Some(prost_types::value::Kind::StructValue(object)) = &value.kind {
        depth += 1;
        value = &object.fields["x"];
    }
    assert_eq!(depth, levels, "the whole result is kept: {result:?}");

    let deeper = submit(
        &mut client,
        request(vec![action("deep", json!({ "levels": levels + 1 }))]),
    )
    .await;
    let done = wait_done(&mut client, &deeper.id).await;
    assert_eq!(state(&done), JobState::Failed, "{done:?}");
    let error = done.actions[0].error.as_ref().expect("the action's error");
    assert_eq!(
        (error.code.as_str(), error.reason.as_str()),
        ("RESOURCE_EXHAUSTED", "RESULT_TOO_DEEP"),
        "{error:?}"
    );
    assert!(error.message.contains("result.x.x"), "{}", error.message);
    assert!(done.actions[0].result.is_none());
    read_everywhere(&server, &deeper).await;
    read_watch_jobs_to_end(&mut watch, &deeper).await;
    server.stop().await;
}

#[tokio::test]
async fn an_error_keeps_readable_details_and_a_status_code_name() {
    let (_dir, server) = server().await;
    let mut client = server.client().await;
    let mut watch = watch_all(&mut client).await;
    let fail = |levels: u64, code: &str| {
        request(vec![action(
            "deep",
            json!({ "levels": levels, "fail": true, "code": code }),
        )])
    };
    let kept = submit(&mut client, fail(MAX_RESULT_DEPTH as u64 - 1, "not_found")).await;
    let done = wait_done(&mut client, &kept.id).await;
    let error = done.error.as_ref().expect("the job's error");
    assert_eq!(
        error.code, "NOT_FOUND",
        "a code in another case is the name"
    );
    let details = error.details.as_ref().expect("details");
    assert!(details.fields.contains_key("nest"), "{details:?}");
    read_everywhere(&server, &kept).await;
    read_watch_jobs_to_end(&mut watch, &kept).await;

    let dropped = submit(&mut client, fail(200, "NOT_A_CODE")).await;
    let done = wait_done(&mut client, &dropped.id).await;
    let error = done.error.as_ref().expect("the job's error");
    assert_eq!(error.code, "UNKNOWN", "no status code's name");
    let details = error.details.as_ref().expect("details");
    let note = match &details
        .fields
        .get("details_dropped")
        .unwrap_or_else(|| panic!("{error:?}"))
        .kind
    {
        Some(prost_types::value::Kind::StringValue(note)) => note.clone(),
        other => panic!("a note, not {other:?}"),
    };
    assert!(note.starts_with("details.nest.x.x"), "{note}");
    assert!(!details.fields.contains_key("nest"));
    read_everywhere(&server, &dropped).await;
    read_watch_jobs_to_end(&mut watch, &dropped).await;
    server.stop().await;
}

#[tokio::test]
async fn a_handler_is_told_its_job_s_attempts_labels_and_tenant() {
    let (_dir, server) = server().await;
    let mut client = server.client().await;
    let mut req = request(vec![action("context", json!({}))]);
    req.max_attempts = 3;
    req.labels = [("team".to_owned(), "a".to_owned())].into();
    let job = submit(&mut client, req).await;
    let done = wait_done(&mut client, &job.id).await;
    let result = done.actions[0].result.clone().expect("a result");
    let expected = json!({
        "attempt": 1,
        "max_attempts": 3,
        "labels": { "team": "a" },
        "tenant": "default",
    });
    assert_eq!(result, longrun::api::convert::json_to_value(&expected));
    server.stop().await;
}
