//! Property: whatever the interleaving of a job's changes with a watcher's disconnects and
//! resumes (`after_version` = the last version seen), the watcher sees every logged state
//! transition exactly once, versions only go up, and the last snapshot it sees is the final one.

use std::{sync::Arc, time::SystemTime};

use bytes::Bytes;
use longrun::{
    events::{Hub, JobWatch},
    job::{Job, JobError, JobId, NewAction, NewJob, Progress},
    store::{MemoryStore, Store},
};
use proptest::prelude::*;

/// One change the writer makes, in an order the state machine allows.
#[derive(Debug, Clone)]
enum Change {
    Start,
    StartAction(usize),
    Progress(usize, u8),
    SucceedAction(usize),
    FailAction(usize),
    Retry,
    Succeed,
}

/// A legal history: per attempt, each action starts, reports progress, and succeeds; the first
/// attempt may fail at its last action and be retried.
fn history() -> impl Strategy<Value = (usize, Vec<Change>)> {
    (
        1usize..4,
        prop::collection::vec(0usize..12, 3),
        any::<bool>(),
    )
        .prop_map(|(actions, progress_counts, fail_first)| {
            let mut changes = vec![Change::Start];
            let run_actions = |changes: &mut Vec<Change>, fail_last: bool, from: usize| {
                for index in from..actions {
                    changes.push(Change::StartAction(index));
                    for step in 0..progress_counts[index % progress_counts.len()] {
                        changes.push(Change::Progress(index, (step * 8).min(100) as u8));
                    }
                    if fail_last && index == actions - 1 {
                        changes.push(Change::FailAction(index));
                        return;
                    }
                    changes.push(Change::SucceedAction(index));
                }
            };
            run_actions(&mut changes, fail_first, 0);
            if fail_first {
                changes.push(Change::Retry);
                changes.push(Change::Start);
                run_actions(&mut changes, false, actions - 1);
            }
            changes.push(Change::Succeed);
            (actions, changes)
        })
}

fn apply(job: &mut Job, change: &Change) {
    let now = SystemTime::now();
    let outcome = match change {
        Change::Start => job.start(now),
        Change::StartAction(i) => job.start_action(*i, now),
        Change::Progress(i, percent) => {
            job.report_progress(*i, Progress::percent(*percent, "p"), now);
            Ok(())
        }
        Change::SucceedAction(i) => job.succeed_action(*i, serde_json::json!(i), now),
        Change::FailAction(i) => job.fail_action(*i, JobError::new("INTERNAL", "X", "x"), now),
        Change::Retry => job.retry(now, std::time::Duration::ZERO),
        Change::Succeed => job.succeed(now),
    };
    outcome.expect("the generated history is legal");
}

async fn run_case(
    actions: usize,
    changes: Vec<Change>,
    writer_yields: Vec<bool>,
    reads: Vec<usize>,
) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let hub = Hub::new();
    let spec = NewJob {
        actions: (0..actions)
            .map(|_| NewAction {
                name: "x".to_owned(),
                params: serde_json::Map::new(),
                input: Bytes::new(),
            })
            .collect(),
        max_attempts: Some(2),
        ..NewJob::default()
    };
    let mut job = Job::new(JobId::generate(), spec, 1, SystemTime::now());
    store.create(&job).await.unwrap();
    let id = job.id;

    let writer = {
        let store = Arc::clone(&store);
        let hub = Arc::clone(&hub);
        tokio::spawn(async move {
            for (n, change) in changes.iter().enumerate() {
                let before = job.version;
                apply(&mut job, change);
                if job.version == before {
                    continue;
                }
                store.save(&job).await.unwrap();
                // Readers may run between the commit and its publish, as in the server.
                if writer_yields[(n + 1) % writer_yields.len()] {
                    tokio::task::yield_now().await;
                }
                hub.publish(Arc::new(job.clone()));
                if writer_yields[n % writer_yields.len()] {
                    tokio::task::yield_now().await;
                }
            }
            job
        })
    };

    let mut seen: Vec<Arc<Job>> = Vec::new();
    // The client saw version 1 in Submit's response.
    let mut last_version = 1;
    let mut session = 0;
    'watching: loop {
        // Every other session starts from the hub's snapshot instead of a store read, as a
        // server not sharing its store does (Executor::newest_in_memory).
        let from_memory = session % 2 == 1;
        let in_memory = || from_memory.then(|| hub.latest(id)).flatten();
        let mut watch = JobWatch::open(Arc::clone(&store), &hub, id, last_version, in_memory)
            .await
            .expect("resume is always possible while the job exists");
        let budget = reads[session % reads.len()].max(1);
        session += 1;
        for _ in 0..budget {
            match watch.next().await {
                Some(snapshot) => {
                    let snapshot = snapshot.unwrap();
                    assert!(snapshot.version > last_version, "versions only go up");
                    last_version = snapshot.version;
                    seen.push(snapshot);
                }
                None => break 'watching,
            }
        }
        // Disconnect: the watch is dropped here and reopened after the last version seen.
        assert!(session < 10_000, "the watch makes progress");
    }

    let final_job = writer.await.unwrap();
    assert_eq!(
        seen.last().map(|j| j.as_ref()),
        Some(&final_job),
        "ends on the final snapshot"
    );
    let logged: Vec<i64> = store
        .transitions(id, 0)
        .await
        .unwrap()
        .iter()
        .map(|j| j.version)
        .filter(|v| *v > 1)
        .collect();
    let seen_versions: Vec<i64> = seen.iter().map(|j| j.version).collect();
    for version in logged {
        assert!(
            seen_versions.contains(&version),
            "logged version {version} was seen; saw {seen_versions:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn disconnects_never_lose_a_transition(
        (actions, changes) in history(),
        writer_yields in prop::collection::vec(any::<bool>(), 1..16),
        reads in prop::collection::vec(1usize..6, 1..16),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run_case(actions, changes, writer_yields, reads));
    }
}
