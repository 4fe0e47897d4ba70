//! CORS on the gRPC port, as a browser meets it: with `cors_allow_origins` set, a preflight
//! from an allowed origin is answered and every gRPC-Web and Connect response (errors too)
//! names the origin; other origins, and every origin when nothing is configured, get no CORS
//! headers, so the browser keeps the page from reading the response.

mod common;

use common::*;
use longrun::{actions::Registry, config::Config};
use reqwest::{Method, Response};

const APP: &str = "http://app.example.test:5173";

async fn server(origins: &[&str]) -> TestServer {
    let mut config: Config = test_config();
    config.cors_allow_origins = origins.iter().map(|o| (*o).to_owned()).collect();
    TestServer::start_with(config, Registry::with_builtins()).await
}

fn url(server: &TestServer, method: &str) -> String {
    format!("http://{}/longrun.v1.Jobs/{method}", server.addr)
}

/// The preflight a browser sends before a Connect or gRPC-Web call from `origin`.
async fn preflight(server: &TestServer, origin: &str, headers: &str) -> Response {
    reqwest::Client::new()
        .request(Method::OPTIONS, url(server, "Submit"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", headers)
        .timeout(PATIENCE)
        .send()
        .await
        .expect("preflight")
}

/// A Connect unary call in JSON from a page on `origin`.
async fn connect_call(server: &TestServer, origin: &str, method: &str, body: &str) -> Response {
    reqwest::Client::new()
        .post(url(server, method))
        .header("origin", origin)
        .header("content-type", "application/json")
        .header("connect-protocol-version", "1")
        .body(body.to_owned())
        .timeout(PATIENCE)
        .send()
        .await
        .expect("Connect call")
}

/// A gRPC-Web call (ListActions, an empty message) from a page on `origin`.
async fn grpc_web_call(server: &TestServer, origin: &str) -> Response {
    reqwest::Client::new()
        .post(format!(
            "http://{}/longrun.v1.Jobs/ListActions",
            server.addr
        ))
        .header("origin", origin)
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(vec![0u8, 0, 0, 0, 0])
        .timeout(PATIENCE)
        .send()
        .await
        .expect("gRPC-Web call")
}

fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII").to_owned())
}

#[tokio::test]
async fn a_preflight_from_an_allowed_origin_is_answered_with_what_it_asked_for() {
    let server = server(&[APP, "https://other.example.test"]).await;
    let asked = "content-type,connect-protocol-version,authorization,traceparent";
    let answer = preflight(&server, APP, asked).await;
    assert!(answer.status().is_success(), "{answer:?}");
    assert_eq!(
        header(&answer, "access-control-allow-origin").as_deref(),
        Some(APP)
    );
    assert_eq!(
        header(&answer, "access-control-allow-methods").as_deref(),
        Some("POST")
    );
    assert_eq!(
        header(&answer, "access-control-allow-headers").as_deref(),
        Some(asked)
    );
    assert!(header(&answer, "access-control-max-age").is_some());
    assert!(
        header(&answer, "vary").is_some_and(|vary| vary.contains("origin")),
        "caches keep answers per origin: {answer:?}"
    );

    let stranger = preflight(&server, "https://evil.example.test", asked).await;
    assert_eq!(header(&stranger, "access-control-allow-origin"), None);
}

#[tokio::test]
async fn responses_to_an_allowed_origin_name_it_errors_included() {
    let server = server(&[APP]).await;
    let answered = connect_call(&server, APP, "ListActions", "{}").await;
    assert_eq!(answered.status().as_u16(), 200);
    assert_eq!(
        header(&answered, "access-control-allow-origin").as_deref(),
        Some(APP)
    );
    // A refused call too: the page must be able to read why.
    let refused = connect_call(&server, APP, "GetStatus", r#"{"job_id":"nope"}"#).await;
    assert_eq!(refused.status().as_u16(), 400);
    assert_eq!(
        header(&refused, "access-control-allow-origin").as_deref(),
        Some(APP)
    );
    let body: serde_json::Value = serde_json::from_str(&refused.text().await.unwrap()).unwrap();
    assert_eq!(body["code"], "invalid_argument");

    let web = grpc_web_call(&server, APP).await;
    assert_eq!(web.status().as_u16(), 200);
    assert_eq!(
        header(&web, "access-control-allow-origin").as_deref(),
        Some(APP)
    );
    // Every header, grpc-status and Connect's trailer- headers among them.
    assert_eq!(
        header(&web, "access-control-expose-headers").as_deref(),
        Some("*")
    );

    let stranger = connect_call(&server, "https://evil.example.test", "ListActions", "{}").await;
    assert_eq!(header(&stranger, "access-control-allow-origin"), None);
}

#[tokio::test]
async fn the_wildcard_allows_every_origin() {
    let server = server(&["*"]).await;
    let answer = preflight(&server, "https://anywhere.example.test", "content-type").await;
    assert_eq!(
        header(&answer, "access-control-allow-origin").as_deref(),
        Some("*")
    );
    let call = connect_call(
        &server,
        "https://anywhere.example.test",
        "ListActions",
        "{}",
    )
    .await;
    assert_eq!(
        header(&call, "access-control-allow-origin").as_deref(),
        Some("*")
    );
}

#[tokio::test]
async fn without_configured_origins_no_cors_header_is_sent() {
    let server = server(&[]).await;
    let answer = preflight(&server, APP, "content-type").await;
    assert_eq!(header(&answer, "access-control-allow-origin"), None);
    let call = connect_call(&server, APP, "ListActions", "{}").await;
    assert_eq!(
        call.status().as_u16(),
        200,
        "same-origin callers are served"
    );
    assert_eq!(header(&call, "access-control-allow-origin"), None);
    // gRPC clients, which send no Origin, are untouched either way.
    let mut client = server.client.clone();
    client
        .list_actions(longrun::api::pb::ListActionsRequest::default())
        .await
        .unwrap();
}
