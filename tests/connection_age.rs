//! `max_connection_age`: a connection past its age is sent GOAWAY, so its client opens a new
//! one for its next calls (through a load balancer, to any replica), while the calls still open
//! on it run on; with `max_connection_age_grace`, those are cut once the grace is over, and a
//! watch resumes on a new connection with `after_version`.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::*;
use longrun::{
    actions::Registry,
    api::pb::{self, JobState, jobs_client::JobsClient},
};
use tonic::transport::{Channel, Endpoint, Uri};

const AGE: Duration = Duration::from_millis(300);

/// A client whose channel counts the TCP connections it opens.
async fn counting_client(server: &TestServer) -> (JobsClient<Channel>, Arc<AtomicUsize>) {
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&connections);
    let addr = server.addr;
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let stream = tokio::net::TcpStream::connect(addr).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connect");
    (JobsClient::new(channel), connections)
}

fn aged_config(grace: Option<Duration>) -> longrun::config::Config {
    let mut config = test_config();
    config.max_connection_age = Some(AGE);
    config.max_connection_age_grace = grace;
    config
}

/// A call on a channel whose connection was sent GOAWAY. tonic's channel (hyper's, as of
/// 0.14) sends the first call after a GOAWAY on the old connection while a stream is still open
/// on it, and that call fails with CANCELLED before reaching the server; the next call opens a
/// new connection. So one CANCELLED is taken, as such a client's retry would.
async fn list_on_aged_channel(client: &mut JobsClient<Channel>) {
    let request = || pb::ListJobsRequest::default();
    match client.list_jobs(request()).await {
        Ok(_) => {}
        Err(status) if status.code() == tonic::Code::Cancelled => {
            client
                .list_jobs(request())
                .await
                .expect("the retry goes over a new connection");
        }
        Err(status) => panic!("unexpected {status}"),
    }
}

#[tokio::test]
async fn past_its_age_a_connection_is_replaced_while_its_watch_runs_on() {
    let server = TestServer::start_with(aged_config(None), Registry::with_builtins()).await;
    let (mut client, connections) = counting_client(&server).await;
    let job = submit(&mut client, request(vec![sleep(60_000, 1)])).await;
    let mut watch = open_watch(&mut client, &job.id, 0).await;
    next_until(&mut watch, |_| true).await;
    assert_eq!(connections.load(Ordering::SeqCst), 1);

    tokio::time::sleep(AGE * 3).await;
    list_on_aged_channel(&mut client).await;
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "the GOAWAY made the channel open a new connection"
    );

    // Without a grace the watch on the old connection is never cut: it sees the job's end.
    cancel(&mut client, &job.id).await;
    let end = next_until(&mut watch, |job| job.state == JobState::Cancelled as i32).await;
    assert_eq!(state(&end), JobState::Cancelled);
}

#[tokio::test]
async fn past_its_age_and_grace_a_connection_is_cut_and_the_watch_resumes() {
    const GRACE: Duration = Duration::from_millis(400);
    let server = TestServer::start_with(aged_config(Some(GRACE)), Registry::with_builtins()).await;
    let (mut client, connections) = counting_client(&server).await;
    let job = submit(&mut client, request(vec![sleep(60_000, 1)])).await;
    let opened = std::time::Instant::now();
    let mut watch = open_watch(&mut client, &job.id, 0).await;
    let first = next_until(&mut watch, |_| true).await;

    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            match tokio_stream::StreamExt::next(&mut watch).await {
                Some(Ok(_)) => {}
                Some(Err(status)) => return Some(status),
                None => return None,
            }
        }
    })
    .await
    .expect("the watch is cut within the patience");
    let status = ended.expect("the watch ends with an error, not as if the job had ended");
    assert!(
        opened.elapsed() >= AGE,
        "not cut before its age: {:?}, {status}",
        opened.elapsed()
    );

    // The client resumes where it was, on a new connection.
    let mut resumed = open_watch(&mut client, &job.id, first.version).await;
    cancel(&mut client, &job.id).await;
    let end = next_until(&mut resumed, |job| job.state == JobState::Cancelled as i32).await;
    assert!(end.version > first.version);
    assert!(connections.load(Ordering::SeqCst) >= 2);
}
