//! The webhook outbox part of the conformance suite: deliveries are written with the state
//! they report, in the same transaction, and settle as attempts are recorded.

use std::time::{Duration, SystemTime};

use super::sample_job;
use crate::job::{
    AttemptOutcome, DeliveryState, Job, JobError, JobState, WebhookEvents, WebhookSpec,
};
use crate::store::{Deleted, Store, StoreError};

fn with_webhook(events: WebhookEvents) -> Job {
    let mut job = sample_job(1, &[], None);
    job.webhook = Some(WebhookSpec {
        url: "https://example.com/hook".to_owned(),
        secret: "s3cret".to_owned(),
        events,
    });
    job
}

/// Runs every outbox check, each against a fresh store from `make`.
pub async fn run_all<S, F, Fut>(make: &F)
where
    S: Store,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    terminal_webhooks_get_one_delivery_with_the_terminal_snapshot(&make().await).await;
    all_webhooks_get_one_delivery_per_job_state(&make().await).await;
    attempts_settle_deliveries(&make().await).await;
    a_failed_save_writes_no_delivery(&make().await).await;
    deliveries_go_with_their_job(&make().await).await;
}

async fn terminal_webhooks_get_one_delivery_with_the_terminal_snapshot(store: &impl Store) {
    let now = SystemTime::now();
    let mut job = with_webhook(WebhookEvents::Terminal);
    let plain = sample_job(1, &[], None);
    store.create(&job).await.unwrap();
    store.create(&plain).await.unwrap();
    job.start(now).unwrap();
    store.save(&job).await.unwrap();
    job.start_action(0, now).unwrap();
    store.save(&job).await.unwrap();
    assert!(store.deliveries(job.id).await.unwrap().is_empty());
    assert!(store.due_deliveries(now, 10).await.unwrap().is_empty());

    job.succeed_action(0, serde_json::json!("ok"), now).unwrap();
    job.succeed(now).unwrap();
    store.save(&job).await.unwrap();
    let deliveries = store.deliveries(job.id).await.unwrap();
    assert_eq!(deliveries.len(), 1, "one delivery for the terminal state");
    let delivery = &deliveries[0];
    assert_eq!(
        (delivery.job_state, delivery.job_version),
        (JobState::Succeeded, job.version)
    );
    assert_eq!(delivery.state, DeliveryState::Pending);
    assert_eq!(delivery.attempts, 0);
    assert_eq!(store.pending_deliveries().await.unwrap(), 1);

    let due = store.due_deliveries(SystemTime::now(), 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(&due[0].delivery, delivery);
    assert_eq!(due[0].job, job, "the snapshot of the reported version");
    assert_eq!(
        due[0].job.webhook.as_ref().map(|w| w.secret.as_str()),
        Some("s3cret"),
        "the secret survives storage, to sign after a restart"
    );
    assert!(store.deliveries(plain.id).await.unwrap().is_empty());
}

async fn all_webhooks_get_one_delivery_per_job_state(store: &impl Store) {
    let mut job = with_webhook(WebhookEvents::All);
    let now = SystemTime::now();
    store.create(&job).await.unwrap();
    job.start(now).unwrap();
    job.start_action(0, now).unwrap(); // saved together, as the executor does
    store.save(&job).await.unwrap();
    assert!(job.report_progress(0, crate::job::Progress::percent(10, ""), now));
    store.save(&job).await.unwrap();
    job.fail_action(0, JobError::new("INTERNAL", "X", "x"), now)
        .unwrap();
    store.save(&job).await.unwrap(); // the action's state only
    job.retry(now, std::time::Duration::from_secs(60)).unwrap();
    store.save(&job).await.unwrap();
    job.cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
        .unwrap();
    store.save(&job).await.unwrap();
    let states: Vec<JobState> = store
        .deliveries(job.id)
        .await
        .unwrap()
        .iter()
        .map(|d| d.job_state)
        .collect();
    assert_eq!(
        states,
        vec![
            JobState::Queued,
            JobState::Running,
            JobState::Queued,
            JobState::Cancelled
        ],
        "each change of the job's state, in order; progress and action states left out"
    );
    let due = store.due_deliveries(SystemTime::now(), 10).await.unwrap();
    assert_eq!(
        due.len(),
        1,
        "a job's deliveries go one at a time, in order"
    );
    assert_eq!(due[0].job.state, JobState::Queued);
    assert_eq!(due[0].job.version, 1);
    let delivered = AttemptOutcome::Delivered { at: now };
    store
        .record_delivery_attempt(due[0].delivery.id, &delivered)
        .await
        .unwrap();
    let due = store.due_deliveries(SystemTime::now(), 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].job.state, JobState::Running);

    // Several jobs: the limit holds, the longest due first.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let job = with_webhook(WebhookEvents::All);
        store.create(&job).await.unwrap();
        ids.push(job.id);
    }
    let due = store.due_deliveries(SystemTime::now(), 3).await.unwrap();
    assert_eq!(due.len(), 3, "the limit holds");
    assert_eq!(due[0].job.id, job.id, "the longest due first");
    assert_eq!(
        due[1..].iter().map(|d| d.job.id).collect::<Vec<_>>(),
        ids[..2]
    );
}

async fn attempts_settle_deliveries(store: &impl Store) {
    let now = SystemTime::now();
    let mut job = with_webhook(WebhookEvents::Terminal);
    store.create(&job).await.unwrap();
    job.cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
        .unwrap();
    store.save(&job).await.unwrap();
    let id = store.deliveries(job.id).await.unwrap()[0].id;

    let later = now + Duration::from_secs(60);
    let retry = AttemptOutcome::Retry {
        retry_at: later,
        error: "HTTP 503".to_owned(),
    };
    let recorded = store
        .record_delivery_attempt(id, &retry)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(recorded.attempts, 1);
    assert_eq!(recorded.last_error.as_deref(), Some("HTTP 503"));
    assert!(
        store.due_deliveries(now, 10).await.unwrap().is_empty(),
        "not due before its retry time"
    );
    let due = store
        .due_deliveries(later + Duration::from_millis(1), 10)
        .await
        .unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].delivery.attempts, 1);

    let delivered_at = now + Duration::from_secs(61);
    let done = store
        .record_delivery_attempt(id, &AttemptOutcome::Delivered { at: delivered_at })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, DeliveryState::Delivered);
    assert_eq!(done.attempts, 2);
    assert_eq!(done.next_attempt_at, None);
    let stored = &store.deliveries(job.id).await.unwrap()[0];
    assert_eq!(stored, &done, "read back as recorded");
    let delivered_after = stored.delivered_at.map(|t| t.duration_since(now).unwrap());
    assert!(
        delivered_after
            .is_some_and(|d| d.abs_diff(Duration::from_secs(61)) < Duration::from_millis(1)),
        "stored to the microsecond: {delivered_after:?}"
    );
    assert_eq!(store.pending_deliveries().await.unwrap(), 0);
    assert!(
        store
            .record_delivery_attempt(id, &retry)
            .await
            .unwrap()
            .is_none(),
        "a settled delivery is never reopened"
    );

    let mut other = with_webhook(WebhookEvents::Terminal);
    store.create(&other).await.unwrap();
    other
        .cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
        .unwrap();
    store.save(&other).await.unwrap();
    let id = store.deliveries(other.id).await.unwrap()[0].id;
    let dead = AttemptOutcome::Dead {
        error: "connection refused".to_owned(),
    };
    let dead = store
        .record_delivery_attempt(id, &dead)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.state, DeliveryState::Dead);
    assert_eq!(dead.last_error.as_deref(), Some("connection refused"));
    assert!(store.due_deliveries(later, 10).await.unwrap().is_empty());
}

async fn a_failed_save_writes_no_delivery(store: &impl Store) {
    let now = SystemTime::now();
    let mut job = with_webhook(WebhookEvents::Terminal);
    store.create(&job).await.unwrap();
    job.cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
        .unwrap();
    let mut stale = job.clone();
    stale.version = 1; // at the stored version: refused
    assert!(matches!(
        store.save(&stale).await,
        Err(StoreError::StaleVersion { .. })
    ));
    assert!(store.deliveries(job.id).await.unwrap().is_empty());
    let missing = with_webhook(WebhookEvents::All);
    assert!(matches!(
        store.save(&missing).await,
        Err(StoreError::Missing(_))
    ));
    assert!(store.deliveries(missing.id).await.unwrap().is_empty());
    assert_eq!(store.pending_deliveries().await.unwrap(), 0);

    // An idempotent retry of a create stores nothing, so no second QUEUED delivery either.
    let mut keyed = with_webhook(WebhookEvents::All);
    keyed.idempotency_key = Some("k".to_owned());
    store.create(&keyed).await.unwrap();
    let mut again = with_webhook(WebhookEvents::All);
    again.idempotency_key = Some("k".to_owned());
    store.create(&again).await.unwrap();
    assert_eq!(store.pending_deliveries().await.unwrap(), 1);
}

async fn deliveries_go_with_their_job(store: &impl Store) {
    let now = SystemTime::now();
    let mut job = with_webhook(WebhookEvents::All);
    store.create(&job).await.unwrap();
    job.cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
        .unwrap();
    store.save(&job).await.unwrap();
    assert_eq!(store.deliveries(job.id).await.unwrap().len(), 2);
    assert_eq!(store.delete(job.id).await.unwrap(), Deleted::Removed);
    assert!(store.deliveries(job.id).await.unwrap().is_empty());
    assert_eq!(store.pending_deliveries().await.unwrap(), 0);
    assert!(
        store
            .due_deliveries(SystemTime::now(), 10)
            .await
            .unwrap()
            .is_empty()
    );
}
