//! Bad input gets a clear INVALID_ARGUMENT naming the field, and changes nothing (invariant 5):
//! malformed params, unknown actions, oversized payloads, too many actions, invalid ids.

mod common;

use std::collections::BTreeMap;

use common::*;
use longrun::{
    actions::{
        ActionContext, ActionDescription, Handler, HandlerError, ParamInfo, ParamType, Registry,
    },
    api::pb::{self, JobState, jobs_client::JobsClient},
    config::Config,
};
use prost::Message as _;
use prost_types::{Struct, Value, value::Kind};
use serde_json::json;
use tonic::{Code, transport::Channel};

const MAX_ACTIONS: usize = 3;
const MAX_PARAMS_BYTES: usize = 1024;
const MAX_INPUT_BYTES: usize = 1024;
const MAX_LABELS: usize = 2;
const MAX_LABEL_KEY_BYTES: usize = 16;
const MAX_LABEL_VALUE_BYTES: usize = 24;
const MAX_PAGE_SIZE: i32 = 5;
const MAX_KEY_BYTES: usize = 16;
const MAX_ATTEMPTS_LIMIT: i32 = 7;
/// Params may nest this deep (configured: the default is 32); one level more is refused.
const MAX_PARAMS_DEPTH: usize = 8;

fn small_limits() -> Config {
    let mut config = test_config();
    config.limits.max_actions_per_job = MAX_ACTIONS;
    config.limits.max_params_bytes = MAX_PARAMS_BYTES;
    config.limits.max_input_bytes = MAX_INPUT_BYTES;
    config.limits.max_labels = MAX_LABELS;
    config.limits.max_label_key_bytes = MAX_LABEL_KEY_BYTES;
    config.limits.max_label_value_bytes = MAX_LABEL_VALUE_BYTES;
    config.limits.max_params_depth = MAX_PARAMS_DEPTH;
    config.limits.max_idempotency_key_bytes = MAX_KEY_BYTES;
    config.executor.max_attempts_limit = MAX_ATTEMPTS_LIMIT as u32;
    config
}

fn echo() -> pb::ActionSpec {
    action("echo", json!({}))
}

fn with(
    actions: Vec<pb::ActionSpec>,
    edit: impl FnOnce(&mut pb::SubmitRequest),
) -> pb::SubmitRequest {
    let mut req = request(actions);
    edit(&mut req);
    req
}

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

/// A test action taking one object param `x`, to carry deeply nested params.
struct Nest;

#[longrun::actions::async_trait] // the re-export embedders use
impl Handler for Nest {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Test action taking any object as `x`.".to_owned(),
            params: vec![ParamInfo::optional("x", ParamType::Object, "anything")],
            uses_input: false,
        }
    }

    async fn run(&self, _ctx: ActionContext) -> Result<serde_json::Value, HandlerError> {
        Ok(json!({}))
    }
}

/// A test action whose own params check panics when `x` is given: a bug in an embedder's
/// handler.
struct Touchy;

#[longrun::actions::async_trait]
impl Handler for Touchy {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Test action whose params check panics on `x`.".to_owned(),
            params: vec![ParamInfo::optional("x", ParamType::Number, "a number")],
            uses_input: false,
        }
    }

    fn validate(
        &self,
        params: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), Vec<longrun::job::FieldViolation>> {
        assert!(!params.contains_key("x"), "touchy cannot bear x");
        Ok(())
    }

    async fn run(&self, _ctx: ActionContext) -> Result<serde_json::Value, HandlerError> {
        Ok(json!({}))
    }
}

fn registry() -> Registry {
    let mut registry = Registry::with_builtins();
    registry.register("nest", Nest);
    registry.register("touchy", Touchy);
    registry
}

/// A `nest` action whose params are `{"x": {"x": ... 1 ...}}`, `levels` objects deep.
fn nested(levels: usize) -> pb::ActionSpec {
    let mut value = number(1.0);
    for _ in 0..levels {
        value = Value {
            kind: Some(Kind::StructValue(Struct {
                fields: BTreeMap::from([("x".to_owned(), value)]),
            })),
        };
    }
    let Some(Kind::StructValue(params)) = value.kind else {
        unreachable!("at least one level")
    };
    pb::ActionSpec {
        name: "nest".to_owned(),
        params: Some(params),
        input: Default::default(),
    }
}

/// An `echo` action whose params encode to exactly `bytes` bytes.
fn echo_with_params_of(bytes: usize) -> pb::ActionSpec {
    (0..bytes)
        .map(|n| action("echo", json!({"message": "m".repeat(n)})))
        .find(|spec| spec.params.as_ref().unwrap().encoded_len() == bytes)
        .expect("some message length encodes to exactly that size")
}

fn labels(entries: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    entries
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Submits, expects INVALID_ARGUMENT naming exactly `field`, and that nothing was stored.
async fn assert_refused(
    client: &mut JobsClient<Channel>,
    case: &str,
    req: pb::SubmitRequest,
    field: &str,
) {
    let before = list_all(client).await.len();
    let status = client
        .submit(req)
        .await
        .expect_err(&format!("{case}: refused"));
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "{case}: {}",
        status.message()
    );
    assert_eq!(
        bad_request_fields(&status),
        [field],
        "{case}: the violation names the field ({})",
        status.message()
    );
    assert_eq!(
        list_all(client).await.len(),
        before,
        "{case}: nothing stored"
    );
}

#[tokio::test]
async fn bad_submit_requests_are_refused_naming_the_field_and_store_nothing() {
    let server = TestServer::start_with(small_limits(), registry()).await;
    let mut client = server.client.clone();
    let mut nan_params = action("echo", json!({})).params.unwrap();
    nan_params.fields.insert("x".to_owned(), number(f64::NAN));
    let nan = pb::ActionSpec {
        name: "echo".to_owned(),
        params: Some(nan_params),
        input: Default::default(),
    };
    let too_deep_field = format!(
        "actions[0].params.{}",
        ["x"; MAX_PARAMS_DEPTH + 1].join(".")
    );

    let cases: Vec<(&str, pb::SubmitRequest, String)> = vec![
        ("no actions", request(vec![]), "actions".into()),
        (
            "empty action name",
            request(vec![action("", json!({}))]),
            "actions[0].name".into(),
        ),
        (
            "unknown action",
            request(vec![echo(), action("nope", json!({}))]),
            "actions[1].name".into(),
        ),
        (
            "wrong param type",
            request(vec![action("sleep", json!({"duration_ms": "long"}))]),
            "actions[0].params.duration_ms".into(),
        ),
        (
            "unknown param",
            request(vec![action("sleep", json!({"bogus": 1}))]),
            "actions[0].params.bogus".into(),
        ),
        (
            "zero steps",
            request(vec![action("sleep", json!({"steps": 0}))]),
            "actions[0].params.steps".into(),
        ),
        (
            "NaN number",
            request(vec![nan]),
            "actions[0].params.x".into(),
        ),
        (
            "params nested too deep",
            request(vec![nested(MAX_PARAMS_DEPTH + 1)]),
            too_deep_field,
        ),
        (
            // Past protobuf's own recursion limit: refused while decoding, before the
            // configured depth is checked, and still as bad input.
            "params nested too deep to decode",
            request(vec![nested(40)]),
            "actions.params".into(),
        ),
        (
            "negative max_attempts",
            with(vec![echo()], |r| r.max_attempts = -1),
            "max_attempts".into(),
        ),
        (
            "max_attempts above the limit",
            with(vec![echo()], |r| r.max_attempts = MAX_ATTEMPTS_LIMIT + 1),
            "max_attempts".into(),
        ),
        (
            "negative wait",
            with(vec![echo()], |r| r.wait = Some(millis(-1))),
            "wait".into(),
        ),
        (
            "negative timeout",
            with(vec![echo()], |r| {
                r.timeout = Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                })
            }),
            "timeout".into(),
        ),
        (
            "malformed timeout nanos",
            with(vec![echo()], |r| {
                r.timeout = Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 1_000_000_000,
                })
            }),
            "timeout".into(),
        ),
        (
            // Stored, it would break every JSON client reading the job back.
            "timeout past google.protobuf.Duration's range",
            with(vec![echo()], |r| {
                r.timeout = Some(prost_types::Duration {
                    seconds: 1_000_000_000_000,
                    nanos: 0,
                })
            }),
            "timeout".into(),
        ),
        (
            "zero timeout (unset means none)",
            with(vec![echo()], |r| r.timeout = Some(millis(0))),
            "timeout".into(),
        ),
        (
            "too many actions",
            request(vec![echo(); MAX_ACTIONS + 1]),
            "actions".into(),
        ),
        (
            "params over the size limit",
            request(vec![echo_with_params_of(MAX_PARAMS_BYTES + 1)]),
            "actions[0].params".into(),
        ),
        (
            "input over the size limit",
            request(vec![echo_with_input(MAX_INPUT_BYTES + 1)]),
            "actions[0].input".into(),
        ),
        (
            "an input for an action that reads none",
            request(vec![echo(), {
                let mut sleep = sleep(1, 1);
                sleep.input = b"x".to_vec().into();
                sleep
            }]),
            "actions[1].input".into(),
        ),
        (
            "too many labels",
            with(vec![echo()], |r| {
                r.labels = labels(&[("a", "1"), ("b", "2"), ("c", "3")])
            }),
            "labels".into(),
        ),
        (
            "label value too long",
            with(vec![echo()], |r| {
                r.labels = labels(&[("k", &"v".repeat(MAX_LABEL_VALUE_BYTES + 1))])
            }),
            "labels[\"k\"]".into(),
        ),
        (
            "empty label key",
            with(vec![echo()], |r| r.labels = labels(&[("", "v")])),
            "labels[\"\"]".into(),
        ),
        (
            "idempotency key too long",
            with(vec![echo()], |r| {
                r.idempotency_key = "k".repeat(MAX_KEY_BYTES + 1)
            }),
            "idempotency_key".into(),
        ),
        (
            "idempotency key with a newline",
            with(vec![echo()], |r| r.idempotency_key = "order\n42".to_owned()),
            "idempotency_key".into(),
        ),
        (
            "fail with an invalid code",
            request(vec![action("fail", json!({"code": "OOPS"}))]),
            "actions[0].params.code".into(),
        ),
    ];
    for (case, req, field) in cases {
        assert_refused(&mut client, case, req, &field).await;
    }
    assert!(
        list_all(&mut client).await.is_empty(),
        "nothing stored at all"
    );
}

#[tokio::test]
async fn limits_are_inclusive_exactly_the_limit_is_accepted_and_one_more_refused() {
    let server = TestServer::start_with(small_limits(), registry()).await;
    let mut client = server.client.clone();
    let long_key = "k".repeat(MAX_LABEL_KEY_BYTES);
    let too_long_key = "k".repeat(MAX_LABEL_KEY_BYTES + 1);
    let long_value = "v".repeat(MAX_LABEL_VALUE_BYTES);
    let too_deep_field = format!(
        "actions[0].params.{}",
        ["x"; MAX_PARAMS_DEPTH + 1].join(".")
    );
    let too_long_key_field = format!("labels[{too_long_key:?}]");
    let edges: Vec<(&str, pb::SubmitRequest, pb::SubmitRequest, &str)> = vec![
        (
            "actions",
            request(vec![echo(); MAX_ACTIONS]),
            request(vec![echo(); MAX_ACTIONS + 1]),
            "actions",
        ),
        (
            "params bytes",
            request(vec![echo_with_params_of(MAX_PARAMS_BYTES)]),
            request(vec![echo_with_params_of(MAX_PARAMS_BYTES + 1)]),
            "actions[0].params",
        ),
        (
            "input bytes",
            request(vec![echo_with_input(MAX_INPUT_BYTES)]),
            request(vec![echo_with_input(MAX_INPUT_BYTES + 1)]),
            "actions[0].input",
        ),
        (
            "label count",
            with(vec![echo()], |r| {
                r.labels = labels(&[("a", "1"), ("b", "2")])
            }),
            with(vec![echo()], |r| {
                r.labels = labels(&[("a", "1"), ("b", "2"), ("c", "3")])
            }),
            "labels",
        ),
        (
            "label key bytes",
            with(vec![echo()], |r| r.labels = labels(&[(&long_key, "v")])),
            with(vec![echo()], |r| r.labels = labels(&[(&too_long_key, "v")])),
            &too_long_key_field,
        ),
        (
            "label value bytes",
            with(vec![echo()], |r| r.labels = labels(&[("k", &long_value)])),
            with(vec![echo()], |r| {
                r.labels = labels(&[("k", &"v".repeat(MAX_LABEL_VALUE_BYTES + 1))])
            }),
            "labels[\"k\"]",
        ),
        (
            "idempotency key bytes",
            with(vec![echo()], |r| {
                r.idempotency_key = "k".repeat(MAX_KEY_BYTES)
            }),
            with(vec![echo()], |r| {
                r.idempotency_key = "k".repeat(MAX_KEY_BYTES + 1)
            }),
            "idempotency_key",
        ),
        (
            "max_attempts",
            with(vec![echo()], |r| r.max_attempts = MAX_ATTEMPTS_LIMIT),
            with(vec![echo()], |r| r.max_attempts = MAX_ATTEMPTS_LIMIT + 1),
            "max_attempts",
        ),
        (
            "params depth",
            request(vec![nested(MAX_PARAMS_DEPTH)]),
            request(vec![nested(MAX_PARAMS_DEPTH + 1)]),
            &too_deep_field,
        ),
    ];
    let mut stored = 0;
    for (case, at_limit, over_limit, field) in edges {
        submit(&mut client, at_limit).await;
        stored += 1;
        assert_eq!(
            list_all(&mut client).await.len(),
            stored,
            "{case}: accepted"
        );
        assert_refused(&mut client, case, over_limit, field).await;
    }
}

#[tokio::test]
async fn malformed_job_ids_are_invalid_argument_and_unknown_ones_not_found() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let unknown = uuid::Uuid::now_v7().to_string();
    for id in ["", "nope", "01a2-not-a-uuid", &unknown] {
        let results: Vec<(&str, Result<(), tonic::Status>)> = vec![
            (
                "GetStatus",
                client
                    .get_status(pb::GetStatusRequest { job_id: id.into() })
                    .await
                    .map(drop),
            ),
            (
                "WatchJob",
                client
                    .watch_job(pb::WatchJobRequest {
                        job_id: id.into(),
                        after_version: 0,
                    })
                    .await
                    .map(drop),
            ),
            (
                "WaitJob",
                client
                    .wait_job(pb::WaitJobRequest {
                        job_id: id.into(),
                        timeout: Some(millis(10)),
                    })
                    .await
                    .map(drop),
            ),
            (
                "Cancel",
                client
                    .cancel(pb::CancelRequest { job_id: id.into() })
                    .await
                    .map(drop),
            ),
            (
                "DeleteJob",
                client
                    .delete_job(pb::DeleteJobRequest { job_id: id.into() })
                    .await
                    .map(drop),
            ),
        ];
        for (rpc, result) in results {
            let status = result.expect_err(&format!("{rpc}({id:?}) is refused"));
            if id == unknown {
                assert_eq!(status.code(), Code::NotFound, "{rpc}: {}", status.message());
            } else {
                assert_eq!(
                    status.code(),
                    Code::InvalidArgument,
                    "{rpc}({id:?}): {}",
                    status.message()
                );
                assert_eq!(bad_request_fields(&status), ["job_id"], "{rpc}({id:?})");
            }
        }
    }
    assert!(list_all(&mut client).await.is_empty());
}

#[tokio::test]
async fn watch_after_a_negative_or_future_version_is_invalid_argument() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![echo()])).await;
    let done = wait_done(&mut client, &job.id).await;
    for after_version in [-1, done.version + 1, i64::MAX] {
        let status = client
            .watch_job(pb::WatchJobRequest {
                job_id: job.id.clone(),
                after_version,
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{after_version}");
        assert_eq!(
            bad_request_fields(&status),
            ["after_version"],
            "{after_version}"
        );
    }
    assert_eq!(
        get(&mut client, &job.id).await,
        done,
        "the job is untouched"
    );
}

/// A job running on this server: its newest version is known here, so one ahead of it
/// (that nobody was shown) is refused at once, rather than taken on trust and waited past.
#[tokio::test]
async fn watch_of_a_running_job_after_a_version_it_has_not_reached_is_invalid_argument() {
    let gate = Gate::default();
    let server = TestServer::start_with(test_config(), gate.registry()).await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![gated()])).await;
    assert_eq!(gate.next_started().await, job.id);
    let running = get(&mut client, &job.id).await;
    assert_eq!(state(&running), JobState::Running);
    for ahead in [1, 10, 500] {
        let status = client
            .watch_job(pb::WatchJobRequest {
                job_id: job.id.clone(),
                after_version: running.version + ahead,
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "+{ahead}");
        assert_eq!(bad_request_fields(&status), ["after_version"], "+{ahead}");
    }
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_version: running.version,
        })
        .await
        .expect("its own version resumes")
        .into_inner();
    gate.release(1);
    let mut last = None;
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = stream.message().await.expect("a message") {
            last = message.job;
        }
    })
    .await
    .expect("the stream ends with the job");
    assert_eq!(last.map(|job| state(&job)), Some(JobState::Succeeded));
}

#[tokio::test]
async fn bad_list_requests_are_refused_naming_the_field() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let cases = [
        (
            pb::ListJobsRequest {
                page_size: -1,
                ..Default::default()
            },
            "page_size",
        ),
        (
            pb::ListJobsRequest {
                page_size: 1001,
                ..Default::default()
            },
            "page_size",
        ),
        (
            pb::ListJobsRequest {
                page_token: "not a token".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            pb::ListJobsRequest {
                states: vec![JobState::Queued as i32, 99],
                ..Default::default()
            },
            "states[1]",
        ),
    ];
    for (req, field) in cases {
        let status = client.list_jobs(req.clone()).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{req:?}");
        assert_eq!(bad_request_fields(&status), [field], "{req:?}");
    }
}

#[tokio::test]
async fn message_over_the_size_limit_is_refused_by_the_transport_and_stores_nothing() {
    let mut config = test_config();
    config.limits.max_message_bytes = 16 * 1024;
    let server = TestServer::start_with(config, Registry::with_builtins()).await;
    let mut client = server.client.clone();
    let status = client
        .submit(request(vec![echo_with_input(32 * 1024)]))
        .await
        .expect_err("refused");
    // tonic refuses a message over `max_decoding_message_size` before the service sees it.
    assert_eq!(status.code(), Code::OutOfRange, "{}", status.message());
    assert!(list_all(&mut client).await.is_empty(), "nothing stored");
    // The connection is still usable, and a message within the limit is accepted.
    submit(&mut client, request(vec![echo_with_input(4096)])).await;
    assert_eq!(list_all(&mut client).await.len(), 1);
}

#[tokio::test]
async fn page_size_is_refused_one_over_the_configured_maximum() {
    let mut config = small_limits();
    config.limits.max_page_size = MAX_PAGE_SIZE as usize;
    let server = TestServer::start_with(config, registry()).await;
    let mut client = server.client.clone();
    for _ in 0..(MAX_PAGE_SIZE + 1) {
        submit(&mut client, request(vec![echo()])).await;
    }
    let at_limit = client
        .list_jobs(pb::ListJobsRequest {
            page_size: MAX_PAGE_SIZE,
            ..Default::default()
        })
        .await
        .expect("exactly the maximum page size is accepted")
        .into_inner();
    assert_eq!(at_limit.jobs.len(), MAX_PAGE_SIZE as usize);
    let over = client
        .list_jobs(pb::ListJobsRequest {
            page_size: MAX_PAGE_SIZE + 1,
            ..Default::default()
        })
        .await
        .expect_err("one over is refused, not clamped");
    assert_eq!(over.code(), tonic::Code::InvalidArgument);
    assert_eq!(bad_request_fields(&over), vec!["page_size"]);
    assert!(
        over.message().contains(&MAX_PAGE_SIZE.to_string()),
        "{}",
        over.message()
    );
}

/// What a Submit puts in its job (params, labels, names, as sent, plus 64 bytes per action and
/// 256 for what the run adds) may take a quarter of `max_message_bytes` less 512 bytes: a
/// finished operation carries the job twice, with its results. Exactly that is accepted (and
/// the job, once run, reads back through every view); one byte more is refused naming the
/// larger part, before anything is stored or run.
#[tokio::test]
async fn a_job_that_could_not_be_read_back_in_one_response_is_refused() {
    const MAX_MESSAGE_BYTES: usize = 16 * 1024;
    const SUBMITTED_BUDGET: usize = (MAX_MESSAGE_BYTES / 2 - 1024) / 2;
    let mut config = test_config();
    config.limits.max_message_bytes = MAX_MESSAGE_BYTES;
    config.limits.max_params_bytes = MAX_MESSAGE_BYTES;
    let server = TestServer::start_with(config, registry()).await;
    let mut client = server.client.clone();
    let submitted = |req: &pb::SubmitRequest| req.encoded_len() + 64 * req.actions.len() + 256;
    let with_pad = |n: usize, label_count: usize| {
        let mut req = request(vec![
            action("nest", json!({"x": {"pad": "m".repeat(n)}})),
            action("nest", json!({})),
        ]);
        req.labels = (0..label_count)
            .map(|i| (format!("k{i}"), "v".repeat(200)))
            .collect();
        req
    };
    let pad = (0..SUBMITTED_BUDGET)
        .find(|n| submitted(&with_pad(*n, 0)) == SUBMITTED_BUDGET)
        .expect("some pad reaches the budget exactly");
    let job = submit(&mut client, with_pad(pad, 0)).await;
    assert_eq!(
        state(&wait_done(&mut client, &job.id).await),
        pb::JobState::Succeeded
    );
    let mut operations = longrun::api::longrunning::operations_client::OperationsClient::new(
        common::channel(server.addr).await,
    );
    let operation = operations
        .get_operation(longrun::api::longrunning::GetOperationRequest {
            name: format!("operations/{}", job.id),
        })
        .await
        .expect("the finished job reads back as an operation, carrying it twice")
        .into_inner();
    assert!(operation.done);

    let over = with_pad(pad + 1, 0);
    assert_eq!(submitted(&over), SUBMITTED_BUDGET + 1);
    assert_refused(&mut client, "one byte over", over, "actions").await;
    // Labels count too, and are named when they are the larger part.
    let labelled = with_pad(0, 20);
    assert!(submitted(&labelled) > SUBMITTED_BUDGET);
    assert_refused(&mut client, "labels over", labelled, "labels").await;
}

/// A result that would make its job too large to send back fails its action with
/// `RESULT_TOO_LARGE` (not retried): the job stays readable. A result within the budget
/// (7/16 of the job's share of a message, see `longrun::job::job_budget`) is kept.
#[tokio::test]
async fn a_result_that_would_make_its_job_unreadable_fails_its_action() {
    let mut config = test_config();
    config.limits.max_message_bytes = 16 * 1024;
    let server = TestServer::start_with(config, registry()).await;
    let mut client = server.client.clone();
    let echo_of = |len: usize| action("echo", json!({"message": "m".repeat(len)}));

    let fits = submit(&mut client, request(vec![echo_of(1000)])).await;
    let fits = wait_done(&mut client, &fits.id).await;
    assert_eq!(state(&fits), pb::JobState::Succeeded);

    let mut req = request(vec![echo_of(3200)]);
    req.max_attempts = 3;
    let too_large = submit(&mut client, req).await;
    let ended = wait_done(&mut client, &too_large.id).await;
    assert_eq!(state(&ended), pb::JobState::Failed);
    assert_eq!(ended.attempt, 1, "not retried");
    let error = ended.actions[0].error.as_ref().expect("the action's error");
    assert_eq!(error.reason, "RESULT_TOO_LARGE");
    assert!(ended.actions[0].result.is_none());
    // Still readable, alone and in a listing (whose pages fit a message: one job each here).
    get(&mut client, &too_large.id).await;
    assert_eq!(list_all(&mut client).await[0].id, too_large.id);
}

/// An error repeats at most a little of what the client sent, and lists at most a few kilobytes
/// of violations: errors travel in HTTP/2 headers, and grpc-core clients drop a response whose
/// headers pass 8 KiB, reporting RESOURCE_EXHAUSTED instead of the error. Each case still
/// names its field.
#[tokio::test]
async fn errors_stay_small_whatever_the_client_sent() {
    use tonic_types::StatusExt;
    let mut config = test_config();
    config.limits.max_params_bytes = 64 * 1024;
    let server = TestServer::start_with(config, registry()).await;
    let mut client = server.client.clone();
    let huge = "x".repeat(20_000);
    let assert_small = |status: &tonic::Status, field: &str| {
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        let details = status.details().len();
        assert!(
            status.message().len() <= 1536 && details <= 2560,
            "{field}: message {} bytes, details {details} bytes",
            status.message().len()
        );
        let fields = bad_request_fields(status);
        assert!(
            fields.first().is_some_and(|f| f.starts_with(field)),
            "{field}: {fields:?}"
        );
    };
    let status = client
        .get_status(pb::GetStatusRequest {
            job_id: huge.clone(),
        })
        .await
        .expect_err("a 20,000-byte job id");
    assert_small(&status, "job_id");

    let label_key = with(vec![echo()], |r| r.labels = labels(&[(&huge, "v")]));
    let status = client
        .submit(label_key)
        .await
        .expect_err("a huge label key");
    assert_small(&status, "labels");

    let params_key = request(vec![action("echo", json!({ huge.clone(): 1 }))]);
    let status = client
        .submit(params_key)
        .await
        .expect_err("a huge params key");
    assert_small(&status, "actions[0].params");

    // A hundred bad actions: a few are listed, the rest counted.
    const MANY: usize = 100; // the default max_actions_per_job
    let many = request(vec![action("echo", json!({"message": 5})); MANY]);
    let status = client.submit(many).await.expect_err("many bad actions");
    assert_small(&status, "actions[0].params");
    let listed = status
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .len();
    assert!(listed < MANY, "{listed}");
    assert!(
        status
            .message()
            .ends_with(&format!("and {} more", MANY - listed)),
        "{}",
        status.message()
    );
    assert!(list_all(&mut client).await.is_empty(), "nothing stored");
}

/// A Submit with several problems names them all at once, those only the actions' handlers
/// can judge (an unknown action, a param of the wrong type) with the rest.
#[tokio::test]
async fn every_bad_field_of_a_submit_is_named_at_once() {
    let server = TestServer::start_with(test_config(), registry()).await;
    let mut client = server.client.clone();
    let mut req = request(vec![
        action("no-such-action", json!({})),
        action("echo", json!({"message": 5})),
    ]);
    req.max_attempts = -1;
    req.labels = labels(&[("", "x")]);
    let status = client.submit(req).await.expect_err("refused");
    let mut fields = bad_request_fields(&status);
    fields.sort();
    assert_eq!(
        fields,
        [
            "actions[0].name",
            "actions[1].params.message",
            "labels[\"\"]",
            "max_attempts"
        ],
        "{}",
        status.message()
    );
    assert!(list_all(&mut client).await.is_empty(), "nothing stored");
}

/// `max_attempts` above the server's limit (a check of the executor's, after the edge's) is
/// named with the edge's violations, and with a bad webhook's.
#[tokio::test]
async fn max_attempts_above_the_limit_is_named_with_the_other_bad_fields() {
    let server = TestServer::start_with(small_limits(), registry()).await;
    let mut client = server.client.clone();
    let too_many = MAX_ATTEMPTS_LIMIT + 1;
    let mut req = request(vec![echo()]);
    req.max_attempts = too_many;
    req.timeout = Some(millis(0));
    let status = client.submit(req).await.expect_err("refused");
    let mut fields = bad_request_fields(&status);
    fields.sort();
    assert_eq!(fields, ["max_attempts", "timeout"], "{}", status.message());

    let mut req = request(vec![echo()]);
    req.max_attempts = too_many;
    req.webhook = Some(pb::Webhook {
        url: "not a url".to_owned(),
        secret: "s3cret".to_owned(),
        ..Default::default()
    });
    let status = client.submit(req).await.expect_err("refused");
    let mut fields = bad_request_fields(&status);
    fields.sort();
    assert_eq!(
        fields,
        ["max_attempts", "webhook.url"],
        "{}",
        status.message()
    );
    assert!(list_all(&mut client).await.is_empty(), "nothing stored");
}

#[tokio::test]
async fn a_params_check_that_panics_is_an_internal_error_and_stores_nothing() {
    let server = TestServer::start_with(small_limits(), registry()).await;
    let mut client = server.client.clone();

    let status = client
        .submit(request(vec![action("touchy", json!({"x": 1}))]))
        .await
        .expect_err("a panicking check refuses the job");
    assert_eq!(status.code(), Code::Internal, "{}", status.message());
    assert!(
        status.message().contains("touchy cannot bear x"),
        "the panic is told: {}",
        status.message()
    );
    let info = {
        use tonic_types::StatusExt;
        status.get_details_error_info().expect("ErrorInfo")
    };
    assert_eq!(info.reason, "VALIDATE_PANICKED");
    assert_eq!(info.metadata["action"], "touchy");
    assert!(list_all(&mut client).await.is_empty(), "nothing stored");

    // The same connection and server go on serving.
    let job = client
        .submit(request(vec![action("touchy", json!({}))]))
        .await
        .expect("the same action without x is taken")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(list_all(&mut client).await.len(), 1);
    assert!(!job.id.is_empty());
}
