//! Group commit: batching, isolation of a failing command inside a batch, flush on close.

use std::{sync::Arc, time::SystemTime};

use serde_json::json;
use tempfile::TempDir;

use super::open;
use crate::job::Job;
use crate::store::conformance::sample_job;
use crate::store::sqlite::SqliteStore;
use crate::store::{Created, Store, StoreError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_share_commits() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(open(dir.path()));
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.create(&sample_job(1, &[], None)).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), Created::New);
    }
    let stats = store.stats();
    assert_eq!(stats.commands, 500);
    assert_eq!(stats.reruns, 0, "no command failed, so no batch ran twice");
    assert!(
        stats.batches < stats.commands / 4,
        "500 concurrent creates took {} commits",
        stats.batches
    );
}

/// Holds the writer, runs `spawn` (whose tasks queue `count` writes), waits until all are
/// queued and lets the writer go, so that the writes share one batch. Returns their results
/// and how many batches committed meanwhile and how many of them ran twice.
async fn queued_together<T>(
    store: &SqliteStore,
    count: usize,
    spawn: impl FnOnce() -> Vec<tokio::task::JoinHandle<T>>,
) -> (Vec<T>, u64, u64) {
    let release = store.hold_writer().await;
    let tasks = spawn();
    while store.queued() < count {
        tokio::task::yield_now().await;
    }
    let before = store.stats();
    drop(release);
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    let after = store.stats();
    (
        results,
        after.batches - before.batches,
        after.reruns - before.reruns,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_save_fails_alone_in_its_batch() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(open(dir.path()));
    let now = SystemTime::now();
    let mut jobs = Vec::new();
    for _ in 0..4 {
        let job = sample_job(1, &[], None);
        store.create(&job).await.unwrap();
        jobs.push(job);
    }
    let mut stale = jobs[1].clone();
    for job in &mut jobs {
        job.start(now).unwrap();
    }
    stale.version = 1; // the stored version, so this save cannot win
    let saves = vec![
        jobs[0].clone(),
        jobs[1].clone(),
        stale.clone(),
        jobs[2].clone(),
        jobs[3].clone(),
    ];
    let (results, commits, reruns) = queued_together(&store, saves.len(), || {
        saves
            .into_iter()
            .map(|job| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.save(&job).await })
            })
            .collect()
    })
    .await;
    assert_eq!(commits, 1);
    assert_eq!(
        reruns, 1,
        "the stale save made its batch run again, command by command"
    );
    assert!(matches!(
        results[2],
        // `stored` is 1 or 2, as the stale save queued before or after the good one.
        Err(StoreError::StaleVersion { attempted: 1, .. })
    ));
    for (i, result) in results.iter().enumerate().filter(|(i, _)| *i != 2) {
        assert!(result.is_ok(), "save {i} failed: {result:?}");
    }
    for job in &jobs {
        assert_eq!(store.get(job.id).await.unwrap().as_ref(), Some(job));
        assert_eq!(
            store.transitions(job.id, 1).await.unwrap(),
            vec![job.clone()]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_twice_in_one_batch_stores_one_job() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(open(dir.path()));
    let jobs = [sample_job(1, &[], Some("k")), sample_job(1, &[], Some("k"))];
    let creates = jobs.clone();
    let (results, commits, reruns) = queued_together(&store, 2, || {
        creates
            .into_iter()
            .map(|job| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.create(&job).await.unwrap() })
            })
            .collect()
    })
    .await;
    assert_eq!(commits, 1);
    assert_eq!(reruns, 0, "a taken key is an answer, not a failure");
    // The tasks may queue in either order; whichever came first wins.
    let winner = if results[0] == Created::New { 0 } else { 1 };
    let loser = 1 - winner;
    assert_eq!(results[winner], Created::New);
    assert_eq!(
        results[loser],
        Created::Existing(Box::new(jobs[winner].clone()))
    );
    assert_eq!(store.get(jobs[loser].id).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_commits_what_is_queued() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(open(dir.path()));
    let jobs: Vec<Job> = (0..20).map(|_| sample_job(1, &[], None)).collect();
    let release = store.hold_writer().await;
    let creates: Vec<_> = jobs
        .iter()
        .map(|job| {
            let (store, job) = (Arc::clone(&store), job.clone());
            tokio::spawn(async move { store.create(&job).await })
        })
        .collect();
    while store.queued() < jobs.len() {
        tokio::task::yield_now().await;
    }
    let closing = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.close().await })
    };
    while store.queued() < jobs.len() + 1 {
        tokio::task::yield_now().await;
    }
    drop(release);
    closing.await.unwrap();
    for create in creates {
        assert_eq!(create.await.unwrap().unwrap(), Created::New);
    }
    let reopened = open(dir.path());
    for job in &jobs {
        assert!(reopened.get(job.id).await.unwrap().is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_in_a_batch_never_acknowledges_a_lost_write() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(open(dir.path()));
    store.execute("PRAGMA max_page_count = 1").await.unwrap();
    let mut jobs: Vec<Job> = (0..4).map(|_| sample_job(1, &[], None)).collect();
    jobs[2].actions[0]
        .params
        .insert("blob".to_owned(), json!("x".repeat(64 * 1024)));
    let creates = jobs.clone();
    let (results, _, _) = queued_together(&store, creates.len(), || {
        creates
            .into_iter()
            .map(|job| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.create(&job).await })
            })
            .collect()
    })
    .await;
    assert!(
        matches!(results[2], Err(StoreError::Full { .. })),
        "{:?}",
        results[2]
    );
    // SQLite may roll back the whole batch or only the failing command; either way a caller
    // told Ok finds its job, and one told an error does not.
    for (job, result) in jobs.iter().zip(&results) {
        let stored = store.get(job.id).await.unwrap().is_some();
        assert_eq!(stored, result.is_ok(), "{result:?}");
    }
}
