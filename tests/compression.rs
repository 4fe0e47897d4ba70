//! Message compression, end to end through tonic clients: every service accepts gzip- and
//! deflate-compressed requests (what clients in other languages send once told to compress), a
//! compressed request is held to `max_message_bytes` once inflated, and responses are
//! compressed only when the server is told to and the client accepts it.

mod common;

use common::*;
use longrun::{
    actions::Registry,
    api::{
        longrunning::{GetOperationRequest, operations_client::OperationsClient},
        pb::{self, JobState, jobs_client::JobsClient},
    },
    config::ResponseCompression,
};
use tonic::{
    Code,
    codec::CompressionEncoding::{self, Deflate, Gzip},
    metadata::MetadataMap,
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// How many bytes of input the job's echo action returned.
fn echoed_bytes(job: &pb::Job) -> usize {
    use prost_types::value::Kind;
    let result = job.actions[0].result.as_ref().and_then(|v| v.kind.as_ref());
    let Some(Kind::StructValue(result)) = result else {
        panic!("echo returns an object: {job:?}");
    };
    match result.fields.get("input").and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(input)) => input.len(),
        other => panic!("echo returns its input as text: {other:?}"),
    }
}

/// The encoding the server says its response messages are compressed with, if any.
fn response_encoding(metadata: &MetadataMap) -> Option<String> {
    metadata
        .get("grpc-encoding")
        .map(|value| value.to_str().expect("ascii").to_owned())
        .filter(|encoding| encoding != "identity")
}

#[tokio::test]
async fn every_service_accepts_gzip_and_deflate_requests() {
    let server = TestServer::start().await;
    for encoding in [Gzip, Deflate] {
        let mut jobs = JobsClient::new(channel(server.addr).await).send_compressed(encoding);
        let job = submit(&mut jobs, request(vec![echo_with_input(4096)])).await;
        let streamed = watch_to_end(&mut jobs, &job.id, 0).await;
        let last = streamed.last().expect("the watch sends the job");
        assert_eq!(state(last), JobState::Succeeded, "{encoding:?}");
        assert_eq!(echoed_bytes(last), 4096, "{encoding:?}");

        let mut operations =
            OperationsClient::new(channel(server.addr).await).send_compressed(encoding);
        let operation = operations
            .get_operation(GetOperationRequest {
                name: format!("operations/{}", job.id),
            })
            .await
            .unwrap_or_else(|status| panic!("GetOperation with {encoding:?}: {status}"))
            .into_inner();
        assert!(operation.done, "{encoding:?}");

        let mut health = HealthClient::new(channel(server.addr).await).send_compressed(encoding);
        health
            .check(HealthCheckRequest::default())
            .await
            .unwrap_or_else(|status| panic!("Health/Check with {encoding:?}: {status}"));
    }
}

/// gzip turns 1 MiB of zeros into ~1 KiB: the limit must apply to what it inflates to, or a
/// small request could make the server hold any amount of memory.
#[tokio::test]
async fn a_compressed_request_is_held_to_the_message_limit_once_inflated() {
    const MAX_MESSAGE_BYTES: usize = 16 * 1024;
    let mut config = test_config();
    config.limits.max_message_bytes = MAX_MESSAGE_BYTES;
    let server = TestServer::start_with(config, Registry::with_builtins()).await;
    let mut jobs = JobsClient::new(channel(server.addr).await).send_compressed(Gzip);
    let status = jobs
        .submit(request(vec![echo_with_input(1024 * 1024)]))
        .await
        .expect_err("inflates past the limit");
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains(&MAX_MESSAGE_BYTES.to_string()),
        "names the limit: {}",
        status.message()
    );
    let mut plain = server.client().await;
    assert!(list_all(&mut plain).await.is_empty(), "nothing stored");
    // The same connection goes on, and a compressed message within the limit is taken.
    submit(&mut jobs, request(vec![echo_with_input(4096)])).await;
    assert_eq!(list_all(&mut plain).await.len(), 1);
}

#[tokio::test]
async fn responses_are_compressed_only_when_configured_and_accepted() {
    let plain_server = TestServer::start().await;
    let mut config = test_config();
    config.response_compression = ResponseCompression::Gzip;
    let gzip_server = TestServer::start_with(config, Registry::with_builtins()).await;

    let get = async |server: &TestServer, accept: Option<CompressionEncoding>| {
        let mut jobs = JobsClient::new(channel(server.addr).await);
        if let Some(encoding) = accept {
            jobs = jobs.accept_compressed(encoding);
        }
        let job = submit(&mut jobs, request(vec![echo_with_input(4096)])).await;
        let unary = jobs
            .get_status(pb::GetStatusRequest {
                job_id: job.id.clone(),
            })
            .await
            .expect("get status");
        let unary_encoding = response_encoding(unary.metadata());
        let mut stream = jobs
            .watch_job(pb::WatchJobRequest {
                job_id: job.id.clone(),
                after_version: 0,
            })
            .await
            .expect("watch");
        let stream_encoding = response_encoding(stream.metadata());
        // The messages read back whole, compressed or not.
        let done = next_until(stream.get_mut(), |job| {
            job.state == JobState::Succeeded as i32
        })
        .await;
        assert_eq!(echoed_bytes(&done), 4096);
        (unary_encoding, stream_encoding)
    };

    let gzip = Some("gzip".to_owned());
    assert_eq!(get(&gzip_server, Some(Gzip)).await, (gzip.clone(), gzip));
    assert_eq!(
        get(&gzip_server, None).await,
        (None, None),
        "a client that does not accept gzip gets plain messages"
    );
    assert_eq!(
        get(&gzip_server, Some(Deflate)).await,
        (None, None),
        "nor does one that accepts only another encoding"
    );
    assert_eq!(
        get(&plain_server, Some(Gzip)).await,
        (None, None),
        "by default nothing is compressed"
    );
}
