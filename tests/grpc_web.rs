//! gRPC-Web on the gRPC port: a browser (here, a raw HTTP/1.1 client on a TCP socket) calls a
//! unary method and watches a job, reading data frames and the trailer frame.

mod common;

use common::*;
use longrun::api::pb::{self, JobState};
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The flag of a gRPC-Web trailer frame; data frames have 0.
const TRAILER_FLAG: u8 = 0x80;

/// One gRPC-Web call over HTTP/1.1 on a fresh connection: the HTTP head (lowercased) and the
/// body's frames as (flag, payload).
async fn call(
    server: &TestServer,
    method: &str,
    request: impl prost::Message,
) -> (String, Vec<(u8, Vec<u8>)>) {
    call_with(server, method, request, "").await
}

/// [`call`] with extra HTTP header lines (each ending in `\r\n`).
async fn call_with(
    server: &TestServer,
    method: &str,
    request: impl prost::Message,
    extra_headers: &str,
) -> (String, Vec<(u8, Vec<u8>)>) {
    let message = request.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let head = format!(
        "POST /{method} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/grpc-web+proto\r\n\
         x-grpc-web: 1\r\naccept: application/grpc-web+proto\r\ncontent-length: {}\r\n\
         {extra_headers}connection: close\r\n\r\n",
        server.addr,
        body.len()
    );
    let mut socket = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    socket.write_all(head.as_bytes()).await.expect("write head");
    socket.write_all(&body).await.expect("write body");
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, socket.read_to_end(&mut response))
        .await
        .expect("the response ends in time")
        .expect("read");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let headers = String::from_utf8_lossy(&response[..split]).to_lowercase();
    let mut body = response[split + 4..].to_vec();
    if headers.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    assert!(
        headers.contains("content-type: application/grpc-web+proto"),
        "{headers}"
    );
    (headers, frames(&body))
}

/// Undoes HTTP/1.1 chunked transfer encoding.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size");
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .expect("hex chunk size");
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Splits a gRPC-Web body into its frames.
fn frames(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while !body.is_empty() {
        let flag = body[0];
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        frames.push((flag, body[5..5 + len].to_vec()));
        body = &body[5 + len..];
    }
    frames
}

/// The trailer frame's `grpc-status`, checking that the trailer is the last frame.
fn grpc_status(frames: &[(u8, Vec<u8>)]) -> String {
    let (flag, trailer) = frames.last().expect("a trailer frame");
    assert_eq!(*flag, TRAILER_FLAG, "the last frame is the trailer");
    let text = String::from_utf8_lossy(trailer).to_lowercase();
    text.lines()
        .find_map(|line| line.strip_prefix("grpc-status:"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("grpc-status in {text:?}"))
}

#[tokio::test]
async fn unary_get_status_over_grpc_web() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![sleep(10, 1)])).await;

    let (head, frames) = call(
        &server,
        "longrun.v1.Jobs/GetStatus",
        pb::GetStatusRequest {
            job_id: job.id.clone(),
        },
    )
    .await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(frames.len(), 2, "one message and the trailer");
    assert_eq!(frames[0].0, 0, "a data frame");
    let response = pb::GetStatusResponse::decode(frames[0].1.as_slice()).expect("decodes");
    assert_eq!(response.job.expect("job").id, job.id);
    assert_eq!(grpc_status(&frames), "0");
}

#[tokio::test]
async fn watch_job_streams_data_frames_then_the_trailer_over_grpc_web() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![sleep(300, 3)])).await;

    let (_, frames) = call(
        &server,
        "longrun.v1.Jobs/WatchJob",
        pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_version: 0,
        },
    )
    .await;
    assert_eq!(grpc_status(&frames), "0");
    let jobs: Vec<pb::Job> = frames[..frames.len() - 1]
        .iter()
        .map(|(flag, data)| {
            assert_eq!(*flag, 0, "data frames before the trailer");
            pb::WatchJobResponse::decode(data.as_slice())
                .expect("decodes")
                .job
                .expect("job")
        })
        .collect();
    assert!(jobs.len() >= 2, "several snapshots: {}", jobs.len());
    assert!(jobs.windows(2).all(|w| w[0].version < w[1].version));
    assert_eq!(jobs.last().unwrap().state, JobState::Succeeded as i32);
}

#[tokio::test]
async fn errors_arrive_as_a_trailers_only_response() {
    let server = TestServer::start().await;
    let (head, frames) = call(
        &server,
        "longrun.v1.Jobs/GetStatus",
        pb::GetStatusRequest {
            job_id: "nope".to_owned(),
        },
    )
    .await;
    // gRPC-Web's trailers-only form: no frames, the status in the HTTP headers.
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(frames.is_empty(), "{frames:?}");
    let code = tonic::Code::InvalidArgument as i32;
    assert!(head.contains(&format!("grpc-status: {code}")), "{head}");
    assert!(head.contains("grpc-message: "), "{head}");
}

#[tokio::test]
async fn grpc_web_calls_need_an_api_key_when_the_server_requires_one() {
    let server = TestServer::start_with(
        auth_config(&[("acme", "web-key")]),
        longrun::actions::Registry::with_builtins(),
    )
    .await;
    let (head, frames) = call(
        &server,
        "longrun.v1.Jobs/ListJobs",
        pb::ListJobsRequest::default(),
    )
    .await;
    assert!(frames.is_empty(), "{frames:?}");
    let code = tonic::Code::Unauthenticated as i32;
    assert!(head.contains(&format!("grpc-status: {code}")), "{head}");

    let mut keyed = keyed_client(server.addr, ApiKey::bearer("web-key")).await;
    let job = keyed
        .submit(request(vec![action("echo", serde_json::json!({}))]))
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("job");
    let (_, frames) = call_with(
        &server,
        "longrun.v1.Jobs/ListJobs",
        pb::ListJobsRequest::default(),
        "authorization: Bearer web-key\r\n",
    )
    .await;
    assert_eq!(grpc_status(&frames), "0");
    let listed = pb::ListJobsResponse::decode(frames[0].1.as_slice()).expect("decodes");
    assert_eq!(listed.jobs.len(), 1);
    assert_eq!(listed.jobs[0].id, job.id);
    assert_eq!(listed.jobs[0].tenant, "acme");
}
