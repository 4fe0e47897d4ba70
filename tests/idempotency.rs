//! Idempotency keys: a retried Submit gets the job it created, across restarts; the same key
//! with a different request is refused with ALREADY_EXISTS naming the field that differs, and
//! creates nothing.

mod common;

use async_trait::async_trait;
use common::*;
use longrun::{
    actions::{
        ActionContext, ActionDescription, Handler, HandlerError, ParamInfo, ParamType, Registry,
    },
    api::pb,
};
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;

/// An action that takes params of every JSON type and returns them: what the store keeps of
/// them must compare equal to what a retry sends.
struct Keep;

#[async_trait]
impl Handler for Keep {
    fn describe(&self) -> ActionDescription {
        let number = |name| ParamInfo::optional(name, ParamType::Number, "a number");
        ActionDescription {
            description: "returns its params".to_owned(),
            params: vec![
                number("n"),
                number("x"),
                number("big"),
                ParamInfo::optional("message", ParamType::String, "text"),
                ParamInfo::optional("nested", ParamType::Object, "anything"),
            ],
            uses_input: true,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        Ok(Value::Object(ctx.params))
    }
}

fn registry() -> Registry {
    let mut registry = Registry::with_builtins();
    registry.register("keep", Keep);
    registry
}

/// A request with something in every field a job keeps: params with integers, fractions,
/// nesting and text that is not ASCII, binary input, labels, priority, timeout, attempts.
fn full_request(key: &str) -> pb::SubmitRequest {
    let mut keep = action(
        "keep",
        json!({"message": "héllo ✓", "n": 3, "x": 0.25, "big": 1e20, "nested": {"a": [1, -2, true, null]}}),
    );
    keep.input = vec![0, 255, 7].into();
    pb::SubmitRequest {
        actions: vec![sleep(20, 2), keep],
        idempotency_key: key.to_owned(),
        labels: [("team".to_owned(), "a".to_owned())].into(),
        priority: 3,
        timeout: Some(millis(60_000)),
        max_attempts: 2,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_retried_submit_gets_its_job_even_after_a_restart_on_the_sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        TestServer::start_on(open_sqlite(dir.path()).await, test_config(), registry()).await;
    let mut client = server.client.clone();
    let first = submit(&mut client, full_request("order-1")).await;
    let again = submit(&mut client, full_request("order-1")).await;
    assert_eq!(again.id, first.id);
    wait_done(&mut client, &first.id).await;
    server.stop().await;

    // Read back from the database now: params, input and labels as stored must still match.
    let server =
        TestServer::start_on(open_sqlite(dir.path()).await, test_config(), registry()).await;
    let mut client = server.client.clone();
    let mut retry = full_request("order-1");
    // Not part of the job: a retry may wait where the first call did not.
    retry.wait = Some(millis(1_000));
    let after_restart = submit(&mut client, retry).await;
    assert_eq!(after_restart.id, first.id);
    assert_eq!(state(&after_restart), pb::JobState::Succeeded);
    assert_eq!(list_all(&mut client).await.len(), 1);
}

#[tokio::test]
async fn the_same_key_with_a_different_request_is_refused_naming_the_field() {
    let server = TestServer::start_with(test_config(), registry()).await;
    let mut client = server.client.clone();
    let first = submit(&mut client, full_request("order-2")).await;

    type Change = fn(&mut pb::SubmitRequest);
    let changes: [(&str, Change); 8] = [
        ("actions", |r| r.actions.truncate(1)),
        ("actions[0].name", |r| {
            r.actions[0] = action("keep", json!({}))
        }),
        ("actions[1].params", |r| {
            r.actions[1] = action("keep", json!({"message": "other"}))
        }),
        ("actions[1].input", |r| {
            r.actions[1].input = vec![0, 255, 8].into()
        }),
        ("priority", |r| r.priority = 4),
        ("labels", |r| r.labels.clear()),
        ("timeout", |r| r.timeout = None),
        ("max_attempts", |r| r.max_attempts = 3),
    ];
    for (field, change) in changes {
        let mut req = full_request("order-2");
        change(&mut req);
        let status = client.submit(req).await.unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{field}: {status:?}");
        assert!(
            status.message().contains(&first.id) && status.message().contains(field),
            "{field}: {}",
            status.message()
        );
        assert_eq!(bad_request_fields(&status), ["idempotency_key"]);
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "IDEMPOTENCY_KEY_REUSED");
        assert_eq!(info.metadata["job_id"], first.id);
        assert_eq!(info.metadata["field"], field);
    }
    assert_eq!(list_all(&mut client).await.len(), 1, "nothing created");

    // Attempts left unset take the server's default: a retry that leaves them unset matches.
    let unset = submit(&mut client, request(vec![sleep(1, 1)])).await;
    let mut keyed = request(vec![sleep(1, 1)]);
    keyed.idempotency_key = "order-3".to_owned();
    let created = submit(&mut client, keyed.clone()).await;
    assert_ne!(created.id, unset.id);
    assert_eq!(submit(&mut client, keyed.clone()).await.id, created.id);
    keyed.max_attempts = created.max_attempts;
    assert_eq!(
        submit(&mut client, keyed).await.id,
        created.id,
        "the default, given explicitly, is the same request"
    );
}

/// The queue being full does not stop a retry from finding its job, nor a different request
/// from being told why it cannot have that key.
#[tokio::test]
async fn a_full_queue_still_tells_a_different_request_from_a_retry() {
    let gate = Gate::default();
    let mut config = test_config();
    config.executor.concurrency = 1;
    config.executor.max_queue_length = 1;
    let server = TestServer::start_with(config, gate.registry()).await;
    let mut client = server.client.clone();
    let running = submit(&mut client, request(vec![gated()])).await;
    assert_eq!(gate.next_started().await, running.id);
    let mut keyed = request(vec![gated()]);
    keyed.idempotency_key = "order-4".to_owned();
    let first = submit(&mut client, keyed.clone()).await;

    assert_eq!(submit(&mut client, keyed.clone()).await.id, first.id);
    keyed.priority = 9;
    let status = client.submit(keyed).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(
        status.get_details_error_info().unwrap().metadata["field"],
        "priority"
    );
    gate.release(2);
}
