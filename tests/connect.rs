//! The Connect protocol on the gRPC port, through plain HTTP/1.1 requests (reqwest), as `curl`
//! and the Connect clients make them: unary calls in JSON and in protobuf, errors as Connect's
//! JSON with the matching HTTP status, server streams with their end-stream message, and the
//! same authentication and limits as gRPC. `buf curl` itself is run by the Node client tests.

mod common;

use std::time::Duration;

use common::*;
use longrun::{
    actions::Registry,
    api::pb::{self, JobState},
};
use prost::Message as _;
use serde_json::{Value, json};

const KEY: &str = "connect-test-key";

fn url(server: &TestServer, method: &str) -> String {
    format!("http://{}/longrun.v1.Jobs/{method}", server.addr)
}

/// A unary Connect call with a JSON body: the HTTP status and the parsed response body.
async fn call_json(server: &TestServer, method: &str, body: &str) -> (u16, Value) {
    call_json_with(server, method, body, &[]).await
}

async fn call_json_with(
    server: &TestServer,
    method: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(url(server, method))
        .header("content-type", "application/json")
        .header("connect-protocol-version", "1")
        .body(body.to_owned())
        .timeout(PATIENCE);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("HTTP call");
    let status = response.status().as_u16();
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(content_type, "application/json", "{method}");
    let text = response.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, value)
}

fn envelope(flags: u8, message: &[u8]) -> Vec<u8> {
    let mut framed = vec![flags];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(message);
    framed
}

/// A server-streaming Connect call in JSON: every message, then the end-stream message.
async fn stream_json(server: &TestServer, method: &str, request: &Value) -> (Vec<Value>, Value) {
    let body = envelope(0, request.to_string().as_bytes());
    let response = reqwest::Client::new()
        .post(url(server, method))
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        .body(body)
        .timeout(PATIENCE)
        .send()
        .await
        .expect("HTTP call");
    assert_eq!(response.status().as_u16(), 200, "a stream's errors end it");
    assert_eq!(
        response.headers()["content-type"],
        "application/connect+json"
    );
    let mut bytes = response.bytes().await.expect("body").to_vec();
    let mut messages = Vec::new();
    loop {
        assert!(
            bytes.len() >= 5,
            "the stream ends with an end-stream message"
        );
        let flags = bytes[0];
        let length = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        let message: Value = serde_json::from_slice(&bytes[5..5 + length]).unwrap();
        bytes.drain(..5 + length);
        if flags == 0b10 {
            assert!(bytes.is_empty(), "nothing after the end-stream message");
            return (messages, message);
        }
        assert_eq!(flags, 0, "uncompressed messages");
        messages.push(message);
    }
}

#[tokio::test]
async fn unary_calls_in_json_submit_and_read_back_a_job() {
    let server = TestServer::start().await;
    let (status, submitted) = call_json(
        &server,
        "Submit",
        r#"{"actions":[{"name":"echo","params":{"message":"hi"}}],"labels":{"via":"connect"},"wait":"10s"}"#,
    )
    .await;
    assert_eq!(status, 200, "{submitted}");
    let job = &submitted["job"];
    assert_eq!(job["state"], "JOB_STATE_SUCCEEDED", "{job}");
    assert_eq!(job["labels"]["via"], "connect");
    // protobuf's JSON mapping: int64 as a string, whole doubles as integers.
    assert!(job["version"].is_string(), "{job}");
    assert_eq!(job["actions"][0]["result"]["params"]["message"], "hi");

    let id = job["id"].as_str().unwrap();
    let (status, read) =
        call_json(&server, "GetStatus", &json!({ "job_id": id }).to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(read["job"]["id"], id);
    // The gRPC client sees the same job.
    let mut client = server.client().await;
    assert_eq!(state(&get(&mut client, id).await), JobState::Succeeded);

    // No body at all is the empty request.
    let (status, actions) = call_json(&server, "ListActions", "").await;
    assert_eq!(status, 200);
    assert!(
        actions["actions"].as_array().unwrap().len() >= 4,
        "{actions}"
    );
}

#[tokio::test]
async fn unary_calls_in_protobuf_pass_the_messages_through() {
    let server = TestServer::start().await;
    let request = pb::SubmitRequest {
        actions: vec![action("echo", json!({ "message": "proto" }))],
        ..Default::default()
    };
    let response = reqwest::Client::new()
        .post(url(&server, "Submit"))
        .header("content-type", "application/proto")
        .body(request.encode_to_vec())
        .timeout(PATIENCE)
        .send()
        .await
        .expect("HTTP call");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["content-type"], "application/proto");
    let submitted = pb::SubmitResponse::decode(response.bytes().await.unwrap()).unwrap();
    let job = submitted.job.expect("job");
    assert_eq!(state(&job), JobState::Queued);
    let mut client = server.client().await;
    assert_eq!(
        state(&wait_done(&mut client, &job.id).await),
        JobState::Succeeded
    );
}

#[tokio::test]
async fn errors_are_connect_json_with_the_matching_http_status() {
    let server = TestServer::start().await;
    let (status, error) = call_json(&server, "GetStatus", r#"{"job_id":"nope"}"#).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["code"], "invalid_argument");
    assert!(
        error["message"].as_str().unwrap().contains("job_id"),
        "{error}"
    );
    let detail = &error["details"][0];
    assert_eq!(detail["type"], "google.rpc.BadRequest", "{error}");
    assert!(!detail["value"].as_str().unwrap().is_empty());
    assert_eq!(detail["debug"]["fieldViolations"][0]["field"], "job_id");

    let missing = longrun::job::JobId::generate().to_string();
    let (status, error) = call_json(
        &server,
        "GetStatus",
        &json!({ "job_id": missing }).to_string(),
    )
    .await;
    assert_eq!(status, 404, "{error}");
    assert_eq!(error["code"], "not_found");

    let (status, error) = call_json(&server, "GetStatus", r#"{"jobId":1,"#).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["code"], "invalid_argument");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("longrun.v1.GetStatusRequest"),
        "names the type it expected: {error}"
    );

    let (status, error) = call_json(
        &server,
        "WatchJob",
        &json!({ "job_id": missing }).to_string(),
    )
    .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (501, Some("unimplemented")),
        "{error}"
    );
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("application/connect+json"),
        "a stream called as a unary call says how to call it: {error}"
    );

    let (status, error) = call_json(&server, "NoSuchMethod", "{}").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (501, Some("unimplemented")),
        "{error}"
    );

    let (status, error) = call_json_with(
        &server,
        "ListActions",
        "{}",
        &[("connect-timeout-ms", "soon")],
    )
    .await;
    assert_eq!(status, 400, "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("connect-timeout-ms")
    );

    let (status, error) =
        call_json_with(&server, "ListActions", "{}", &[("content-encoding", "br")]).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (501, Some("unimplemented")),
        "{error}"
    );
}

/// Connect-Timeout-Ms is the call's deadline, as grpc-timeout is for gRPC: a WaitJob longer than
/// it ends at the deadline.
#[tokio::test]
async fn the_connect_timeout_is_the_calls_deadline() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let job = submit(&mut client, request(vec![sleep(60_000, 1)])).await;
    let started = std::time::Instant::now();
    let (status, error) = call_json_with(
        &server,
        "WaitJob",
        &json!({ "job_id": job.id, "timeout": "30s" }).to_string(),
        &[("connect-timeout-ms", "300")],
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "ended by the deadline"
    );
    // Either the server's wait ends at the deadline (done: false) or the deadline ends the call.
    match status {
        200 => assert_eq!(error.get("done"), None, "not done: {error}"),
        _ => assert_eq!(error["code"], "deadline_exceeded", "{error}"),
    }
}

#[tokio::test]
async fn a_request_over_the_message_limit_is_refused_and_creates_nothing() {
    const MAX_MESSAGE_BYTES: usize = 16 * 1024;
    let mut config = test_config();
    config.limits.max_message_bytes = MAX_MESSAGE_BYTES;
    let server = TestServer::start_with(config, Registry::with_builtins()).await;
    let big = json!({ "actions": [{ "name": "echo", "params": { "message": "x".repeat(MAX_MESSAGE_BYTES) } }] });
    let (status, error) = call_json(&server, "Submit", &big.to_string()).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (429, Some("resource_exhausted")),
        "{error}"
    );
    assert!(
        error["message"].as_str().unwrap().contains("16384"),
        "{error}"
    );
    let mut client = server.client().await;
    assert!(list_all(&mut client).await.is_empty());
}

#[tokio::test]
async fn connect_calls_need_the_same_api_key_as_grpc() {
    let server =
        TestServer::start_with(auth_config(&[("acme", KEY)]), Registry::with_builtins()).await;
    let (status, error) = call_json(&server, "ListJobs", "{}").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (401, Some("unauthenticated")),
        "{error}"
    );
    let bearer = format!("Bearer {KEY}");
    let (status, listed) =
        call_json_with(&server, "ListJobs", "{}", &[("authorization", &bearer)]).await;
    assert_eq!(status, 200, "{listed}");
}

#[tokio::test]
async fn a_server_stream_in_json_sends_every_change_then_ends_cleanly() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let job = submit(&mut client, request(vec![sleep(300, 3)])).await;
    let (messages, end) = stream_json(&server, "WatchJob", &json!({ "job_id": job.id })).await;
    assert_eq!(end, json!({}), "no error");
    let states: Vec<&str> = messages
        .iter()
        .map(|m| m["job"]["state"].as_str().unwrap())
        .collect();
    assert!(
        states.len() >= 2,
        "the snapshot, then each change: {states:?}"
    );
    assert_eq!(states.last(), Some(&"JOB_STATE_SUCCEEDED"), "{states:?}");
    let versions: Vec<i64> = messages
        .iter()
        .map(|m| m["job"]["version"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");

    // An error ends the stream in its end-stream message, with the HTTP status still 200.
    let missing = longrun::job::JobId::generate().to_string();
    let (messages, end) = stream_json(&server, "WatchJob", &json!({ "job_id": missing })).await;
    assert!(messages.is_empty());
    assert_eq!(end["error"]["code"], "not_found", "{end}");

    let (messages, end) = stream_json(&server, "WatchJob", &json!({ "job_idd": "x" })).await;
    assert!(messages.is_empty());
    assert_eq!(end["error"]["code"], "invalid_argument", "{end}");
}

/// A POST of a method in a content type no protocol here takes is refused with 415, as
/// Connect asks, and Connect's GET form with `unimplemented`; both in Connect's JSON, saying
/// what is served (before, the gRPC service answered an empty 400). Other paths and a CORS
/// preflight are left to the layers below.
#[tokio::test]
async fn unserved_content_types_and_the_get_form_are_told_in_connect_json() {
    let server = TestServer::start().await;
    let client = reqwest::Client::new();
    let read = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        (status, value)
    };
    let response = client
        .post(url(&server, "ListActions"))
        .header("content-type", "text/plain")
        .body("{}")
        .timeout(PATIENCE)
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_eq!(status, 415, "{body}");
    assert_eq!(body["code"], "unimplemented", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("\"text/plain\"") && message.contains("application/json"),
        "{message}"
    );

    let get = format!(
        "{}?encoding=json&message=%7B%7D&connect=v1",
        url(&server, "ListActions")
    );
    let response = client.get(get).timeout(PATIENCE).send().await.unwrap();
    let (status, body) = read(response).await;
    assert_eq!(body["code"], "unimplemented", "{body}");
    assert_eq!(status, 501, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("GET form"),
        "{body}"
    );

    // Not a method here: the layers below answer, as before.
    let response = client
        .post(format!("http://{}/nothing/Here", server.addr))
        .header("content-type", "text/plain")
        .timeout(PATIENCE)
        .send()
        .await
        .unwrap();
    assert_ne!(response.status().as_u16(), 415);
}
