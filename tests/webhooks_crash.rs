//! The outbox survives kill -9: the real `longrun` binary on the SQLite store is killed after
//! a job's terminal state (and so its delivery) is committed but before the delivery
//! succeeded; restarted on the same data directory, it delivers, with the same delivery id.

mod common;

use std::{net::SocketAddr, path::Path, time::Duration};

use common::{
    PATIENCE, Spawned, action, connect, free_addr, get, spawn_serve,
    webhook_receiver::{Receiver, Reply},
};
use longrun::api::pb::{self, WebhookDeliveryState, WebhookEvents};

fn spawn_server(dir: &Path, config: &Path, addr: SocketAddr) -> Spawned {
    spawn_serve(dir, addr, &["--config".as_ref(), config.as_os_str()])
}

/// Kills the server with SIGKILL and reaps it.
fn kill_9(mut server: Spawned) {
    server.kill().expect("SIGKILL the server");
    server.wait().expect("reap the server");
}

#[tokio::test]
async fn a_delivery_committed_before_a_kill_9_is_made_after_the_restart() {
    // The first attempt hangs (the server is killed while it waits); later ones succeed.
    let receiver = Receiver::start(|n| {
        if n == 1 {
            Reply::Hang
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("longrun.toml");
    std::fs::write(
        &config,
        "[webhooks]\nallow_hosts = [\"127.0.0.1\"]\nsecret = \"crash-secret\"\ntimeout = \"60s\"\n",
    )
    .unwrap();
    let data = dir.path().join("data");

    let addr = free_addr();
    let server = spawn_server(&data, &config, addr);
    let mut client = connect(addr).await;
    let submitted = client
        .submit(pb::SubmitRequest {
            actions: vec![action("echo", serde_json::json!({"message": "crash"}))],
            webhook: Some(pb::Webhook {
                url: receiver.url("/crash"),
                secret: String::new(),
                events: WebhookEvents::Terminal as i32,
            }),
            ..pb::SubmitRequest::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .job
        .unwrap();

    // The attempt in flight proves the delivery was committed; nothing has been recorded yet.
    let first = receiver.next().await;
    let delivery_id = first.header("longrun-delivery-id");
    let before = get(&mut client, &submitted.id).await;
    assert_eq!(before.state(), pb::JobState::Succeeded);
    assert_eq!(before.webhook_deliveries.len(), 1);
    assert_eq!(
        before.webhook_deliveries[0].state(),
        WebhookDeliveryState::Pending
    );
    kill_9(server);

    let addr = free_addr();
    let server = spawn_server(&data, &config, addr);
    let second = receiver.next().await;
    assert_eq!(
        second.header("longrun-delivery-id"),
        delivery_id,
        "the same delivery, so the receiver can deduplicate"
    );
    assert_eq!(second.body, first.body, "the same body");
    assert!(longrun::webhooks::sign::verify(
        "crash-secret",
        second.header("longrun-timestamp").parse().unwrap(),
        &second.body,
        &second.header("longrun-signature"),
    ));

    let mut client = connect(addr).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let delivery = loop {
        let job = get(&mut client, &submitted.id).await;
        let delivery = job.webhook_deliveries[0].clone();
        if delivery.state() == WebhookDeliveryState::Delivered {
            break delivery;
        }
        assert!(tokio::time::Instant::now() < deadline, "{delivery:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(delivery.delivery_id, delivery_id);
    assert_eq!(
        delivery.attempts, 1,
        "the killed attempt was never recorded: at least once, not exactly once"
    );
    assert_eq!(receiver.count(), 2);
    kill_9(server);
}
