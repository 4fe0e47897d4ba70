//! The executor against the real SQLite store: what a Submit costs the store.

use std::{sync::Arc, time::Duration};

use tempfile::TempDir;

use super::{Executor, ExecutorConfig};
use crate::{
    actions::Registry,
    events::Hub,
    job::{JobState, NewAction, NewJob},
    store::{SqliteOptions, SqliteStore, Store},
};

fn sleep_spec(duration_ms: u64) -> NewJob {
    NewJob {
        actions: vec![NewAction {
            name: "sleep".to_owned(),
            params: [("duration_ms".to_owned(), serde_json::json!(duration_ms))]
                .into_iter()
                .collect(),
            input: Default::default(),
        }],
        ..NewJob::default()
    }
}

/// A job submitted while a worker is free and nothing is queued is created and started in
/// one write (one commit), and its log still holds QUEUED before RUNNING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_started_at_submission_shares_one_commit_with_its_creation() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let config = ExecutorConfig {
        concurrency: 4,
        ..ExecutorConfig::default()
    };
    let executor = Executor::start(
        Arc::clone(&store) as Arc<dyn Store>,
        Hub::new(),
        Registry::with_builtins(),
        config,
    );
    executor.recover().await.unwrap();

    let before = store.stats();
    let job = executor.submit(sleep_spec(600_000)).await.unwrap();
    let after = store.stats();
    assert_eq!((job.state, job.version), (JobState::Queued, 1));
    assert_eq!(after.commands - before.commands, 1, "one write");
    assert_eq!(after.batches - before.batches, 1, "one commit");
    let log: Vec<(JobState, i64)> = store
        .transitions(job.id, 0)
        .await
        .unwrap()
        .iter()
        .map(|j| (j.state, j.version))
        .collect();
    assert_eq!(log, [(JobState::Queued, 1), (JobState::Running, 3)]);
    assert_eq!(
        executor.in_memory(job.id).map(|j| j.state),
        Some(JobState::Running),
        "published once durable"
    );

    executor.cancel(job.id).await.unwrap();
    let mut ended = None;
    for _ in 0..500 {
        match store.get(job.id).await.unwrap() {
            Some(stored) if stored.is_terminal() => {
                ended = Some(stored.state);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert_eq!(ended, Some(JobState::Cancelled));
    executor.shutdown(Duration::from_secs(1)).await;
}
