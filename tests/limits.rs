//! The executor's limits seen through the API: the queue length, the concurrency limit and
//! priorities; and the open-watch limits per connection and per tenant.

mod common;

use std::time::Duration;

use common::*;
use longrun::api::pb::{self, JobState};
use tonic::Code;
use tonic_types::StatusExt as _;

fn config(concurrency: usize, max_queue_length: usize) -> longrun::config::Config {
    let mut config = test_config();
    config.executor.concurrency = concurrency;
    config.executor.max_queue_length = max_queue_length;
    config
}

#[tokio::test]
async fn full_queue_refuses_submit_with_queue_full_and_retry_info_and_stores_nothing() {
    let gate = Gate::default();
    let server = TestServer::start_with(config(1, 2), gate.registry()).await;
    let mut client = server.client.clone();
    let running = submit(&mut client, request(vec![gated()])).await;
    assert_eq!(gate.next_started().await, running.id);
    let first_queued = submit(&mut client, request(vec![gated()])).await;
    submit(&mut client, request(vec![gated()])).await;
    assert_eq!(
        list_all(&mut client).await.len(),
        3,
        "one running, two queued"
    );

    let status = client
        .submit(request(vec![gated()]))
        .await
        .expect_err("the queue is full");
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "QUEUE_FULL");
    assert_eq!(info.domain, "longrun.dev");
    assert_eq!(
        info.metadata.get("max_queue_length").map(String::as_str),
        Some("2")
    );
    let retry = status.get_details_retry_info().expect("RetryInfo");
    assert!(retry.retry_delay.is_some_and(|d| d > Duration::ZERO));
    // The same delay for clients that retry by a gRPC retry policy.
    assert_eq!(
        status
            .metadata()
            .get("grpc-retry-pushback-ms")
            .and_then(|v| v.to_str().ok()),
        Some("1000")
    );
    assert_eq!(list_all(&mut client).await.len(), 3, "nothing stored");

    // Cancelling a queued job frees its place in the queue.
    cancel(&mut client, &first_queued.id).await;
    let accepted = submit(&mut client, request(vec![gated()])).await;
    assert_eq!(state(&accepted), JobState::Queued);
    let status = client
        .submit(request(vec![gated()]))
        .await
        .expect_err("full again");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(list_all(&mut client).await.len(), 4);
    gate.release(3);
}

/// A Submit retried with its idempotency key (its first answer was lost) gets the job it
/// created back even when the queue has filled up since: the job was accepted, and a refusal
/// would invite a resubmission under a new key. A new key is still refused.
#[tokio::test]
async fn an_idempotent_retry_finds_its_job_when_the_queue_is_full() {
    let gate = Gate::default();
    let server = TestServer::start_with(config(1, 2), gate.registry()).await;
    let mut client = server.client.clone();
    let running = submit(&mut client, request(vec![gated()])).await;
    assert_eq!(gate.next_started().await, running.id);
    let keyed = |key: &str| pb::SubmitRequest {
        idempotency_key: key.to_owned(),
        ..request(vec![gated()])
    };
    let first = submit(&mut client, keyed("order-1")).await;
    submit(&mut client, request(vec![gated()])).await;

    let retried = submit(&mut client, keyed("order-1")).await;
    assert_eq!(retried.id, first.id);
    assert_eq!(retried.version, first.version, "unchanged");
    let status = client
        .submit(keyed("order-2"))
        .await
        .expect_err("a new key still finds the queue full");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(list_all(&mut client).await.len(), 3, "nothing more stored");
    gate.release(3);
}

#[tokio::test]
async fn running_jobs_never_exceed_the_concurrency_limit_and_all_finish() {
    let gate = Gate::default();
    let server = TestServer::start_with(config(2, 100), gate.registry()).await;
    let mut client = server.client.clone();
    let mut jobs = Vec::new();
    for _ in 0..4 {
        jobs.push(submit(&mut client, request(vec![gated()])).await.id);
    }
    gate.next_started().await;
    gate.next_started().await;
    assert_eq!(
        gate.started_within(Duration::from_millis(200)).await,
        None,
        "a third job waits for a free slot"
    );
    assert_eq!(gate.running(), 2);

    gate.release(1);
    gate.next_started().await;
    gate.release(1);
    gate.next_started().await;
    gate.release(2);
    for id in &jobs {
        assert_eq!(
            state(&wait_done(&mut client, id).await),
            JobState::Succeeded
        );
    }
    assert_eq!(gate.max_running(), 2, "never more than two at once");
}

#[tokio::test]
async fn higher_priority_jobs_start_first_and_equal_ones_in_submission_order() {
    let gate = Gate::default();
    let server = TestServer::start_with(config(1, 100), gate.registry()).await;
    let mut client = server.client.clone();
    let blocker = submit(&mut client, request(vec![gated()])).await;
    assert_eq!(gate.next_started().await, blocker.id);

    let mut by_name = std::collections::HashMap::new();
    for (name, priority) in [
        ("low-1", 0),
        ("low-2", 0),
        ("high", 10),
        ("mid", 5),
        ("neg", -3),
    ] {
        let mut req = request(vec![gated()]);
        req.priority = priority;
        let job = submit(&mut client, req).await;
        assert_eq!(job.priority, priority);
        by_name.insert(job.id, name);
    }
    let mut order = Vec::new();
    for _ in 0..5 {
        gate.release(1);
        order.push(by_name[&gate.next_started().await]);
    }
    assert_eq!(order, ["high", "mid", "low-1", "low-2", "neg"]);
    gate.release(1);
}

/// Tries to open a watch of `job_id`: the stream, or the refusal.
async fn try_watch(
    client: &mut longrun::api::pb::jobs_client::JobsClient<tonic::transport::Channel>,
    job_id: &str,
) -> Result<tonic::Streaming<pb::WatchJobResponse>, tonic::Status> {
    client
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.to_owned(),
            after_version: 0,
        })
        .await
        .map(|r| r.into_inner())
}

/// Retries opening a watch until it is accepted (bounded): the server learns of a closed
/// stream or connection shortly after the client drops it.
async fn watch_once_freed(
    client: &mut longrun::api::pb::jobs_client::JobsClient<tonic::transport::Channel>,
    job_id: &str,
) -> tonic::Streaming<pb::WatchJobResponse> {
    for _ in 0..500 {
        if let Ok(stream) = try_watch(client, job_id).await {
            return stream;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the freed watch slot never came back");
}

#[tokio::test]
async fn open_watches_are_limited_per_connection_and_per_tenant_and_freed_on_close() {
    let gate = Gate::new(false);
    let mut config = test_config();
    config.limits.max_watches_per_connection = 2;
    config.limits.max_watches_per_tenant = 3;
    let server = TestServer::start_with(config, gate.registry()).await;
    let mut first = server.client().await;
    let job = submit(&mut first, request(vec![gated()])).await;
    gate.next_started().await;

    // Exactly the per-connection limit, then one more on the same connection.
    let one = try_watch(&mut first, &job.id).await.expect("first watch");
    let _two = first
        .watch_jobs(pb::WatchJobsRequest::default())
        .await
        .expect("WatchJobs counts too");
    let refused = try_watch(&mut first, &job.id)
        .await
        .expect_err("over the connection limit");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("max_watches_per_connection"),
        "{}",
        refused.message()
    );
    assert_eq!(
        refused
            .get_details_error_info()
            .map(|i| i.metadata["limit"].clone()),
        Some("max_watches_per_connection".to_owned())
    );

    // Another connection of the same tenant: one more fits under the tenant's limit.
    let mut second = server.client().await;
    let three = try_watch(&mut second, &job.id).await.expect("third watch");
    let refused = try_watch(&mut second, &job.id)
        .await
        .expect_err("over the tenant limit");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("max_watches_per_tenant"),
        "{}",
        refused.message()
    );

    // A stream the client drops frees its slot.
    drop(one);
    let _four = watch_once_freed(&mut second, &job.id).await;

    // A client that goes away (its streams and connection dropped) frees every slot it held.
    drop(three);
    drop(_four);
    drop(second);
    let mut third = server.client().await;
    let _five = watch_once_freed(&mut third, &job.id).await;
    let _six = watch_once_freed(&mut first, &job.id).await;
    gate.release(1);
}

/// A server (a replica) on the test schema's database, running `gate`'s actions.
async fn on_postgres(
    schema: &common::postgres::TestSchema,
    config: longrun::config::Config,
    gate: &Gate,
) -> TestServer {
    let store = longrun::store::PostgresStore::open(&schema.url(), Default::default())
        .await
        .expect("open store");
    TestServer::start_on(std::sync::Arc::new(store), config, gate.registry()).await
}

/// On PostgreSQL the backlog is the database's, not a replica's queue (a replica claims only
/// what it can start): the limit counts every replica's QUEUED jobs. Read at most a second
/// old, and again before a refusal, so a freed place is taken at once.
#[tokio::test]
async fn on_postgres_the_queue_limit_counts_the_jobs_queued_on_every_replica() {
    let Some(base) = common::postgres::database_url() else {
        return;
    };
    let schema = common::postgres::TestSchema::create(&base);
    let gate = Gate::default();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas.push(on_postgres(&schema, config(1, 2), &gate).await);
    }
    let mut first = replicas[0].client.clone();
    let mut second = replicas[1].client.clone();
    // One job running on each replica, then two queued, one submitted to each.
    for client in [&mut first, &mut second] {
        submit(client, request(vec![gated()])).await;
        gate.next_started().await;
    }
    let queued = submit(&mut first, request(vec![gated()])).await;
    submit(&mut second, request(vec![gated()])).await;
    // Past the age at which a replica reads the count again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for client in [&mut first, &mut second] {
        let status = client
            .submit(request(vec![gated()]))
            .await
            .expect_err("the database's queue is full");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "QUEUE_FULL");
    }
    assert_eq!(list_all(&mut first).await.len(), 4, "nothing stored");

    cancel(&mut second, &queued.id).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let accepted = submit(&mut first, request(vec![gated()])).await;
    assert_eq!(state(&accepted), JobState::Queued);
    gate.release(5);
    for replica in replicas {
        replica.stop().await;
    }
}

/// On PostgreSQL, Submits that reach one replica together are each counted against the limit
/// while their jobs are being stored: a burst fills the queue to its limit, not past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_burst_of_submits_fills_the_queue_to_its_limit_and_no_further() {
    let Some(base) = common::postgres::database_url() else {
        return;
    };
    let schema = common::postgres::TestSchema::create(&base);
    let gate = Gate::default();
    let server = on_postgres(&schema, config(1, 5), &gate).await;
    let mut client = server.client.clone();
    submit(&mut client, request(vec![gated()])).await;
    gate.next_started().await;
    // Past the age at which the count is read again: the running job is no longer in it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Staggered, so that some arrive while others are being stored.
    let burst: Vec<_> = (0..24)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(500 * i)).await;
                client.submit(request(vec![gated()])).await
            })
        })
        .collect();
    let mut accepted = 0;
    for call in burst {
        match call.await.expect("submit task") {
            Ok(_) => accepted += 1,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
    }
    assert_eq!(accepted, 5, "the queue's limit");
    assert_eq!(
        list_all(&mut client).await.len(),
        6,
        "one running, five queued"
    );
    gate.release(6);
    server.stop().await;
}

/// On PostgreSQL, a job this replica queued and then claimed at once no longer counts as
/// waiting: Submits right after it (before the count is read again) fill the queue to its
/// limit, not one short of it.
#[tokio::test]
async fn on_postgres_a_job_claimed_at_once_frees_its_place_in_the_queue() {
    let Some(base) = common::postgres::database_url() else {
        return;
    };
    let schema = common::postgres::TestSchema::create(&base);
    let gate = Gate::default();
    let server = on_postgres(&schema, config(1, 2), &gate).await;
    let mut client = server.client.clone();
    // The count is read for this Submit; the job is claimed and started right after.
    submit(&mut client, request(vec![gated()])).await;
    gate.next_started().await;
    for _ in 0..2 {
        let queued = submit(&mut client, request(vec![gated()])).await;
        assert_eq!(state(&queued), JobState::Queued);
    }
    let status = client
        .submit(request(vec![gated()]))
        .await
        .expect_err("two are waiting: the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    gate.release(3);
    server.stop().await;
}
