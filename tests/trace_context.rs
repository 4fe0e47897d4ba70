//! W3C trace context end to end: the `traceparent` (and `tracestate`) a Submit carries is kept
//! with its job (across a restart too) and passed on to its handlers and its webhook
//! deliveries; a missing, invalid or repeated one is ignored, never refused.

mod common;

use std::time::Duration;

use common::{webhook_receiver::Receiver, *};
use longrun::{
    actions::{ActionContext, ActionDescription, Handler, HandlerError, Registry},
    api::pb::{self, WebhookEvents},
    config::Config,
};
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const OTHER_PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";

/// Returns the trace context its job was submitted with (`traceparent`, and `tracestate` after
/// a space when there is one), or null.
struct TraceEcho;

#[async_trait::async_trait]
impl Handler for TraceEcho {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Test action: returns its job's trace context.".to_owned(),
            params: Vec::new(),
            uses_input: false,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        Ok(match ctx.trace {
            None => Value::Null,
            Some(trace) => match trace.state {
                None => json!(trace.parent.to_string()),
                Some(state) => json!(format!("{} {state}", trace.parent)),
            },
        })
    }
}

fn registry() -> Registry {
    let mut registry = Registry::with_builtins();
    registry.register("trace", TraceEcho);
    registry
}

fn config() -> Config {
    let mut config = test_config();
    config.webhooks.allow_hosts = vec!["127.0.0.1".to_owned()];
    config.webhooks.timeout = Duration::from_secs(5);
    config
}

/// A Submit carrying `traceparent` headers with these values.
fn traced(request: pb::SubmitRequest, parents: &[&str]) -> tonic::Request<pb::SubmitRequest> {
    with_state(request, parents, &[])
}

/// A Submit carrying `traceparent` and `tracestate` headers with these values.
fn with_state(
    request: pb::SubmitRequest,
    parents: &[&str],
    states: &[&str],
) -> tonic::Request<pb::SubmitRequest> {
    let mut request = tonic::Request::new(request);
    for (name, values) in [("traceparent", parents), ("tracestate", states)] {
        for value in values {
            let value: MetadataValue<_> = value.parse().unwrap();
            request.metadata_mut().append(name, value);
        }
    }
    request
}

fn trace_job() -> pb::SubmitRequest {
    request(vec![action("trace", json!({}))])
}

/// What the job's `trace` action returned: the trace context its handler was given.
async fn handler_saw(
    client: &mut pb::jobs_client::JobsClient<tonic::transport::Channel>,
    id: &str,
) -> Value {
    let job = wait_done(client, id).await;
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:?}");
    let result = job.actions[0].result.clone().expect("a result");
    match result.kind {
        Some(prost_types::value::Kind::StringValue(text)) => json!(text),
        Some(prost_types::value::Kind::NullValue(_)) => Value::Null,
        other => panic!("unexpected result {other:?}"),
    }
}

#[tokio::test]
async fn a_submit_s_trace_context_reaches_its_handler_and_its_webhook() {
    let receiver = Receiver::ok().await;
    let server = TestServer::start_with(config(), registry()).await;
    let mut client = server.client.clone();
    let request = pb::SubmitRequest {
        webhook: Some(pb::Webhook {
            url: receiver.url("/hook"),
            secret: "whsec_trace".to_owned(),
            events: WebhookEvents::Terminal as i32,
        }),
        idempotency_key: "traced-once".to_owned(),
        ..trace_job()
    };
    // Two tracestate headers: read as one list, in order.
    let job = client
        .submit(with_state(
            request.clone(),
            &[PARENT],
            &["rojo=1", "congo=2"],
        ))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let seen = json!(format!("{PARENT} rojo=1,congo=2"));
    assert_eq!(handler_saw(&mut client, &job.id).await, seen);
    let hit = receiver.next().await;
    assert_eq!(hit.header("traceparent"), PARENT);
    assert_eq!(hit.header("tracestate"), "rojo=1,congo=2");

    // A retry of the same Submit from another trace gets the same job, which keeps the trace
    // of the call that created it.
    let retried = client
        .submit(traced(request, &[OTHER_PARENT]))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(retried.id, job.id);
    assert_eq!(handler_saw(&mut client, &job.id).await, seen);
}

#[tokio::test]
async fn a_newer_version_of_the_header_is_passed_on_as_version_00() {
    let server = TestServer::start_with(config(), registry()).await;
    let mut client = server.client.clone();
    let newer = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
    let job = client
        .submit(traced(trace_job(), &[newer]))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(handler_saw(&mut client, &job.id).await, json!(PARENT));
}

#[tokio::test]
async fn a_missing_invalid_or_repeated_trace_context_is_ignored_not_refused() {
    let receiver = Receiver::ok().await;
    let server = TestServer::start_with(config(), registry()).await;
    let mut client = server.client.clone();
    let invalid = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
    for parents in [&[][..], &[invalid], &["garbage"], &[PARENT, OTHER_PARENT]] {
        let request = pb::SubmitRequest {
            webhook: Some(pb::Webhook {
                url: receiver.url("/hook"),
                secret: "whsec_trace".to_owned(),
                events: WebhookEvents::Terminal as i32,
            }),
            ..trace_job()
        };
        let job = client
            .submit(traced(request, parents))
            .await
            .unwrap_or_else(|status| panic!("{parents:?} refused: {status}"))
            .into_inner()
            .job
            .unwrap();
        assert_eq!(
            handler_saw(&mut client, &job.id).await,
            Value::Null,
            "{parents:?}"
        );
        let hit = receiver.next().await;
        assert!(hit.headers.get("traceparent").is_none(), "{parents:?}");
    }
}

#[tokio::test]
async fn a_trace_state_goes_only_with_a_valid_trace_context_and_only_when_valid() {
    let server = TestServer::start_with(config(), registry()).await;
    let mut client = server.client.clone();
    for (parents, states, expected) in [
        (&[PARENT][..], &["Not Valid"][..], json!(PARENT)),
        (&[], &["rojo=1"], Value::Null),
        (&["garbage"], &["rojo=1"], Value::Null),
    ] {
        let job = client
            .submit(with_state(trace_job(), parents, states))
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        assert_eq!(
            handler_saw(&mut client, &job.id).await,
            expected,
            "{parents:?} {states:?}"
        );
    }
}

#[tokio::test]
async fn a_queued_job_keeps_its_trace_context_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut one_slot = config();
    one_slot.executor.concurrency = 1;
    let gate = Gate::default();
    let mut gated = registry();
    gated.register("gate", gate.clone());
    let server = TestServer::start_on(open_sqlite(dir.path()).await, one_slot.clone(), gated).await;
    let mut client = server.client.clone();
    submit(&mut client, request(vec![action("gate", json!({}))])).await;
    gate.next_started().await;
    let queued = client
        .submit(with_state(trace_job(), &[PARENT], &["rojo=1"]))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(state(&queued), pb::JobState::Queued);
    server.stop().await;

    // The gate job runs again first (it was interrupted); here it ends at once.
    let mut restarted_registry = registry();
    restarted_registry.register("gate", TraceEcho);
    let server =
        TestServer::start_on(open_sqlite(dir.path()).await, one_slot, restarted_registry).await;
    let mut client = server.client.clone();
    assert_eq!(
        handler_saw(&mut client, &queued.id).await,
        json!(format!("{PARENT} rojo=1"))
    );
}
