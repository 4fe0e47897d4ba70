//! Prometheus metrics on `--metrics-listen`: scraped over plain HTTP while jobs run and
//! streams are open.

mod common;

use std::time::Duration;

use common::*;
use longrun::{actions::Registry, api::pb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn scrape(addr: std::net::SocketAddr) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut stream = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => break stream,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("metrics endpoint unreachable: {error}"),
        }
    };
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response))
        .await
        .expect("scrape answers in time")
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// A server with its metrics endpoint on a free loopback port.
async fn server_with_metrics() -> (TestServer, std::net::SocketAddr) {
    TestServer::start_with_metrics(test_config(), Registry::with_builtins()).await
}

#[tokio::test]
async fn metrics_count_jobs_actions_rpcs_and_open_watches() {
    let (server, metrics_addr) = server_with_metrics().await;
    let mut client = server.client.clone();

    for _ in 0..3 {
        let job = submit(&mut client, request(vec![sleep(5, 1)])).await;
        wait_done(&mut client, &job.id).await;
    }
    let long = submit(&mut client, request(vec![sleep(30_000, 1)])).await;
    let _stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: long.id.clone(),
            after_version: 0,
        })
        .await
        .unwrap()
        .into_inner();

    let text = scrape(metrics_addr).await;
    assert_eq!(
        value(&text, "longrun_job_transitions_total{state=\"SUCCEEDED\"}"),
        3.0
    );
    assert!(value(&text, "longrun_job_transitions_total{state=\"QUEUED\"}") >= 4.0);
    assert_eq!(
        value(
            &text,
            "longrun_action_duration_seconds_count{action=\"sleep\",outcome=\"succeeded\"}"
        ),
        3.0
    );
    assert_eq!(
        value(
            &text,
            "longrun_rpc_duration_seconds_count{method=\"/longrun.v1.Jobs/Submit\"}"
        ),
        4.0
    );
    assert_eq!(value(&text, "longrun_open_watch_streams"), 1.0);
    assert_eq!(value(&text, "longrun_jobs_running"), 1.0);
    assert_eq!(value(&text, "longrun_queue_depth"), 0.0);
}

/// A job waiting out its retry backoff runs nothing: the running gauge does not count it, so it
/// never reads above the concurrency; it waits in the queue, not due yet, as a scheduled job.
#[tokio::test]
async fn a_job_waiting_to_be_retried_is_counted_as_queued_for_later_not_running() {
    let mut config = test_config();
    config.executor.retry_backoff_initial = Duration::from_secs(3600);
    config.executor.retry_backoff_max = Duration::from_secs(3600);
    let (server, metrics_addr) =
        TestServer::start_with_metrics(config, Registry::with_builtins()).await;
    let mut client = server.client.clone();
    let mut req = request(vec![action("fail", serde_json::json!({}))]);
    req.max_attempts = 2;
    let job = submit(&mut client, req).await;
    until(&mut client, &job.id, |j| {
        state(j) == pb::JobState::Queued && j.attempt == 2
    })
    .await;
    // The gauge follows the owner task's last step: poll briefly for it to settle.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = scrape(metrics_addr).await;
        if value(&text, "longrun_jobs_scheduled") == 1.0 {
            assert_eq!(value(&text, "longrun_jobs_running"), 0.0, "{text}");
            assert_eq!(value(&text, "longrun_queue_depth"), 1.0, "{text}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job waiting to be retried is never counted as scheduled: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `method` label only ever names a served method: a call to any other path (nothing
/// checks a caller's key before this is recorded) counts as `unknown`, so nobody can make the
/// metrics grow by inventing paths.
#[tokio::test]
async fn calls_to_unknown_paths_share_one_method_label() {
    let (server, metrics_addr) = server_with_metrics().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    for n in 0..5 {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path = format!("/invented.Service{n}/Method{n}").parse().unwrap();
        let status = grpc
            .unary(
                tonic::Request::new(pb::GetStatusRequest::default()),
                path,
                tonic_prost::ProstCodec::<pb::GetStatusRequest, pb::GetStatusResponse>::default(),
            )
            .await
            .expect_err("nothing serves that path");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }
    let mut client = server.client.clone();
    client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap();

    let text = scrape(metrics_addr).await;
    assert!(!text.contains("invented"), "{text}");
    assert_eq!(
        value(
            &text,
            "longrun_rpc_duration_seconds_count{method=\"unknown\"}"
        ),
        5.0
    );
    assert_eq!(
        value(
            &text,
            "longrun_rpc_duration_seconds_count{method=\"/longrun.v1.Jobs/ListJobs\"}"
        ),
        1.0
    );
}
