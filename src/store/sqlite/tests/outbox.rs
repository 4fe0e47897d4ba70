//! The webhook outbox in the durable store: deliveries survive a reopen, the database checks
//! their rows, and a command that fails inside a batch leaves no delivery behind.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tempfile::TempDir;

use super::{open, raw};
use crate::job::{AttemptOutcome, DeliveryState, Job, JobError, WebhookEvents, WebhookSpec};
use crate::store::conformance::sample_job;
use crate::store::{Store, StoreError};

fn cancelled_with_webhook() -> (Job, Job) {
    let mut job = sample_job(1, &[], None);
    job.webhook = Some(WebhookSpec {
        url: "https://example.com/hook".to_owned(),
        secret: "kept".to_owned(),
        events: WebhookEvents::Terminal,
    });
    let created = job.clone();
    job.cancel(
        JobError::new("CANCELLED", "CANCELLED", "x"),
        SystemTime::now(),
    )
    .unwrap();
    (created, job)
}

#[tokio::test]
async fn pending_deliveries_survive_a_reopen() {
    let dir = TempDir::new().unwrap();
    let (created, cancelled) = cancelled_with_webhook();
    {
        let store = open(dir.path());
        store.create(&created).await.unwrap();
        store.save(&cancelled).await.unwrap();
        let id = store.deliveries(cancelled.id).await.unwrap()[0].id;
        let retry = AttemptOutcome::Retry {
            retry_at: SystemTime::now(),
            error: "HTTP 502 Bad Gateway".to_owned(),
        };
        store.record_delivery_attempt(id, &retry).await.unwrap();
    }
    let store = open(dir.path());
    let due = store
        .due_deliveries(SystemTime::now() + Duration::from_millis(1), 10)
        .await
        .unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].delivery.state, DeliveryState::Pending);
    assert_eq!(due[0].delivery.attempts, 1);
    assert_eq!(
        due[0].delivery.last_error.as_deref(),
        Some("HTTP 502 Bad Gateway")
    );
    assert_eq!(
        due[0].job, cancelled,
        "the reported snapshot, secret included"
    );
    assert_eq!(store.pending_deliveries().await.unwrap(), 1);
}

#[tokio::test]
async fn the_database_checks_delivery_rows() {
    let dir = TempDir::new().unwrap();
    let store = open(dir.path());
    let (created, _) = cancelled_with_webhook();
    store.create(&created).await.unwrap();
    let insert = |state: &str, next: &str| {
        format!(
            "INSERT INTO webhook_deliveries
                 (id, job_id, job_version, job_state, state, next_attempt_at, created_at)
             VALUES ('d-{state}-{next}', '{}', 1, 'QUEUED', '{state}', {next}, 0)",
            created.id
        )
    };
    let conn = raw(dir.path());
    assert!(conn.execute_batch(&insert("BOGUS", "0")).is_err());
    assert!(
        conn.execute_batch(&insert("PENDING", "NULL")).is_err(),
        "a pending delivery has a due time"
    );
    assert!(
        conn.execute_batch(&insert("DEAD", "5")).is_err(),
        "a settled one has none"
    );
    assert!(conn.execute_batch(&insert("PENDING", "0")).is_ok());
}

#[tokio::test]
async fn a_save_failing_inside_a_batch_writes_no_delivery() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(open(dir.path()));
    let (created_a, cancelled_a) = cancelled_with_webhook();
    let (created_b, cancelled_b) = cancelled_with_webhook();
    store.create(&created_a).await.unwrap();
    store.create(&created_b).await.unwrap();
    let mut stale = cancelled_a.clone();
    stale.version = 1;

    // Both saves go into one batch: the stale one fails alone, the other commits.
    let release = store.hold_writer().await;
    let failing = tokio::spawn({
        let store = Arc::clone(&store);
        async move { store.save(&stale).await }
    });
    let passing = tokio::spawn({
        let store = Arc::clone(&store);
        let job = cancelled_b.clone();
        async move { store.save(&job).await }
    });
    while store.queued() < 2 {
        tokio::task::yield_now().await;
    }
    drop(release);
    assert!(matches!(
        failing.await.unwrap(),
        Err(StoreError::StaleVersion { .. })
    ));
    passing.await.unwrap().unwrap();
    assert!(store.deliveries(cancelled_a.id).await.unwrap().is_empty());
    assert_eq!(store.deliveries(cancelled_b.id).await.unwrap().len(), 1);
}
