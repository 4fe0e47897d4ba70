//! What probes and tools see without the .proto at hand: gRPC health checking and server
//! reflection (v1 and v1alpha).

mod common;

use common::*;
use prost::Message as _;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};

async fn channel(server: &TestServer) -> Channel {
    Channel::from_shared(format!("http://{}", server.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

/// Sends one v1 reflection request and returns its one response.
async fn reflect_v1(
    channel: Channel,
    request: v1::server_reflection_request::MessageRequest,
) -> v1::server_reflection_response::MessageResponse {
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection call")
        .into_inner();
    tokio::time::timeout(PATIENCE, responses.message())
        .await
        .expect("reflection answers in time")
        .expect("reflection response")
        .expect("one response")
        .message_response
        .expect("a message response")
}

#[tokio::test]
async fn health_check_reports_serving_for_the_server_and_each_service() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(channel(&server).await);
    for service in ["", "longrun.v1.Jobs", "google.longrunning.Operations"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|status| panic!("health of {service:?}: {status}"))
            .into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "{service:?}");
    }
    let status = health
        .check(HealthCheckRequest {
            service: "no.such.Service".to_owned(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(status.code(), tonic::Code::NotFound);
}

/// Watch of a service the server does not know answers SERVICE_UNKNOWN and keeps the stream
/// open, as the health checking protocol says (Check answers NOT_FOUND); a known one streams
/// its status.
#[tokio::test]
async fn health_watch_of_an_unknown_service_says_so_and_stays_open() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(channel(&server).await);
    let mut unknown = health
        .watch(HealthCheckRequest {
            service: "no.such.Service".to_owned(),
        })
        .await
        .expect("a stream, not an error")
        .into_inner();
    let first = tokio::time::timeout(PATIENCE, unknown.message())
        .await
        .expect("told at once")
        .expect("no error")
        .expect("a status");
    assert_eq!(first.status(), ServingStatus::ServiceUnknown);
    let next = tokio::time::timeout(std::time::Duration::from_millis(300), unknown.message()).await;
    assert!(next.is_err(), "the stream stays open: {next:?}");

    let mut known = health
        .watch(HealthCheckRequest {
            service: "longrun.v1.Jobs".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(PATIENCE, known.message())
        .await
        .expect("told at once")
        .unwrap()
        .unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
}

#[tokio::test]
async fn reflection_v1_lists_the_jobs_service_and_returns_its_file() {
    let server = TestServer::start().await;
    use v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let listed = reflect_v1(
        channel(&server).await,
        MessageRequest::ListServices(String::new()),
    )
    .await;
    let MessageResponse::ListServicesResponse(listed) = listed else {
        panic!("a list of services: {listed:?}");
    };
    let names: Vec<&str> = listed.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"longrun.v1.Jobs"), "{names:?}");

    let file = reflect_v1(
        channel(&server).await,
        MessageRequest::FileContainingSymbol("longrun.v1.Jobs".to_owned()),
    )
    .await;
    let MessageResponse::FileDescriptorResponse(file) = file else {
        panic!("a file descriptor: {file:?}");
    };
    let files: Vec<prost_types::FileDescriptorProto> = file
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).expect("decodes"))
        .collect();
    let jobs_file = files
        .iter()
        .find(|f| f.service.iter().any(|s| s.name() == "Jobs"))
        .expect("the file that defines Jobs");
    assert_eq!(jobs_file.package(), "longrun.v1");
    let methods: Vec<&str> = jobs_file.service[0]
        .method
        .iter()
        .map(|m| m.name())
        .collect();
    for method in [
        "Submit",
        "GetStatus",
        "WatchJob",
        "WaitJob",
        "Cancel",
        "ListJobs",
        "DeleteJob",
        "ListActions",
    ] {
        assert!(methods.contains(&method), "{method} in {methods:?}");
    }
}

#[tokio::test]
async fn reflection_v1alpha_lists_the_jobs_service() {
    let server = TestServer::start().await;
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel(&server).await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection call")
        .into_inner();
    let response = tokio::time::timeout(PATIENCE, responses.message())
        .await
        .expect("reflection answers in time")
        .expect("reflection response")
        .expect("one response");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(listed)) =
        response.message_response
    else {
        panic!("a list of services: {response:?}");
    };
    let names: Vec<&str> = listed.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"longrun.v1.Jobs"), "{names:?}");
}

#[tokio::test]
async fn reflection_lists_the_operations_service_and_returns_its_upstream_file() {
    let server = TestServer::start().await;
    use v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let listed = reflect_v1(
        channel(&server).await,
        MessageRequest::ListServices(String::new()),
    )
    .await;
    let MessageResponse::ListServicesResponse(listed) = listed else {
        panic!("a list of services: {listed:?}");
    };
    let names: Vec<&str> = listed.service.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"google.longrunning.Operations"),
        "{names:?}"
    );

    let file = reflect_v1(
        channel(&server).await,
        MessageRequest::FileContainingSymbol("google.longrunning.Operations".to_owned()),
    )
    .await;
    let MessageResponse::FileDescriptorResponse(file) = file else {
        panic!("a file descriptor: {file:?}");
    };
    let files: Vec<String> = file
        .file_descriptor_proto
        .iter()
        .map(|bytes| {
            prost_types::FileDescriptorProto::decode(bytes.as_slice())
                .expect("decodes")
                .name()
                .to_owned()
        })
        .collect();
    // Upstream's own file name, so clients generated from googleapis match.
    assert!(
        files.contains(&"google/longrunning/operations.proto".to_owned()),
        "{files:?}"
    );
}
