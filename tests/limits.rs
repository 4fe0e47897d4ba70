//! The executor's limits seen through the API: the queue length, the concurrency limit and
//! priorities.

mod common;

use std::time::Duration;

use common::*;
use longrun::api::pb::JobState;
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
