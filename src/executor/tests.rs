//! The executor against the real SQLite store: what a Submit costs the store, and how a run's
//! writes share commits.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::Notify;

use super::{Executor, ExecutorConfig, ExecutorError, InterruptedPolicy};
use crate::{
    actions::{ActionContext, ActionDescription, Handler, HandlerError, Registry},
    events::{Hub, JobWatch},
    job::{
        FieldViolation, Job, JobId, JobState, MAX_UNPERSISTED_VERSIONS, NewAction, NewJob, Progress,
    },
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

pub(super) fn spec(action: &str) -> NewJob {
    NewJob {
        actions: vec![NewAction {
            name: action.to_owned(),
            params: Default::default(),
            input: Default::default(),
        }],
        ..NewJob::default()
    }
}

/// An action that returns once its gate is opened, counting its starts.
#[derive(Clone, Default)]
struct Gated {
    gate: Arc<Notify>,
    started: Arc<AtomicUsize>,
}

#[async_trait]
impl Handler for Gated {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Waits for the test's gate.".to_owned(),
            params: vec![],
            uses_input: false,
        }
    }

    async fn run(&self, _ctx: ActionContext) -> Result<Value, HandlerError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.gate.notified().await;
        Ok(Value::Null)
    }
}

/// Polls `done` every 10 ms for up to 5 s.
pub(super) async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// An executor with `registry` and `concurrency` workers on a fresh SQLite store in `dir`,
/// recovered and ready for Submits.
async fn start_on_sqlite(
    dir: &TempDir,
    registry: Registry,
    concurrency: usize,
) -> (Arc<SqliteStore>, Executor) {
    let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let config = ExecutorConfig {
        concurrency,
        ..ExecutorConfig::default()
    };
    let executor = Executor::start(
        Arc::clone(&store) as Arc<dyn Store>,
        Hub::new(),
        registry,
        config,
    );
    executor.recover().await.unwrap();
    (store, executor)
}

/// The state job `id` ends in as stored, waiting up to 5 s for it to end.
async fn stored_end(store: &SqliteStore, id: JobId) -> Option<JobState> {
    for _ in 0..500 {
        match store.get(id).await.unwrap() {
            Some(stored) if stored.is_terminal() => return Some(stored.state),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    None
}

/// The worker slot bounds running handlers: once a job's handler returns, the next job starts
/// without waiting for the first one's end to be committed, so the two writes can share one
/// commit instead of leaving the slot idle for a whole fsync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_frees_its_slot_when_its_handlers_return_before_its_end_is_committed() {
    let dir = TempDir::new().unwrap();
    let gated = Gated::default();
    let mut registry = Registry::with_builtins();
    registry.register("gated", gated.clone());
    let (store, executor) = start_on_sqlite(&dir, registry, 1).await;

    let first = executor.submit(spec("gated")).await.unwrap();
    assert!(eventually(|| gated.started.load(Ordering::SeqCst) == 1).await);
    let second = executor.submit(spec("echo")).await.unwrap();
    assert_eq!(second.state, JobState::Queued, "the only slot is taken");

    let release = store.hold_writer().await;
    gated.gate.notify_one();
    // The first job's SUCCEEDED and the second's RUNNING both wait for the held writer.
    assert!(
        eventually(|| store.queued() == 2).await,
        "the second job's start was not written while the first job's end waited: {} queued",
        store.queued()
    );
    drop(release);
    for id in [first.id, second.id] {
        assert_eq!(stored_end(&store, id).await, Some(JobState::Succeeded));
    }
    executor.shutdown(Duration::from_secs(1)).await;
}

/// A job submitted while a worker is free and nothing is queued is created and started in
/// one write (one commit), and its log still holds QUEUED before RUNNING; with one worker as
/// with several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_started_at_submission_shares_one_commit_with_its_creation() {
    for concurrency in [1, 4] {
        started_at_submission_with(concurrency).await;
    }
}

async fn started_at_submission_with(concurrency: usize) {
    let dir = TempDir::new().unwrap();
    let (store, executor) = start_on_sqlite(&dir, Registry::with_builtins(), concurrency).await;

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
    assert_eq!(stored_end(&store, job.id).await, Some(JobState::Cancelled));
    executor.shutdown(Duration::from_secs(1)).await;
}

/// A one-action `sleep` job that has started its action, not yet stored.
fn running_job(now: std::time::SystemTime) -> Job {
    running_job_of(sleep_spec(60_000), now)
}

/// `spec` as a crashed server leaves it: started, its first action running.
fn running_job_of(spec: NewJob, now: std::time::SystemTime) -> Job {
    let mut job = Job::new(JobId::generate(), spec, 1, now);
    job.start(now).unwrap();
    job.start_action(0, now).unwrap();
    job
}

/// With the default `interrupted = requeue`, a job found RUNNING at start runs again if it has
/// an attempt left, and ends FAILED with reason INTERRUPTED if not: a job that keeps taking
/// its server down cannot run forever.
#[tokio::test]
async fn after_a_crash_a_running_job_runs_again_only_with_an_attempt_left() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let now = std::time::SystemTime::now();
    let last_attempt = running_job(now);
    let spare = running_job_of(
        NewJob {
            max_attempts: Some(2),
            ..sleep_spec(60_000)
        },
        now,
    );
    for job in [&last_attempt, &spare] {
        store.create(job).await.unwrap();
    }
    let executor = Executor::start(
        Arc::clone(&store) as Arc<dyn Store>,
        Hub::new(),
        Registry::with_builtins(),
        ExecutorConfig::default(),
    );
    assert_eq!(executor.recover().await.unwrap(), 2);

    let failed = store.get(last_attempt.id).await.unwrap().unwrap();
    assert_eq!((failed.state, failed.attempt), (JobState::Failed, 1));
    let error = failed.error.as_ref().unwrap();
    assert_eq!(
        (error.code.as_str(), error.reason.as_str()),
        ("ABORTED", "INTERRUPTED")
    );
    let requeued = store.get(spare.id).await.unwrap().unwrap();
    assert_eq!(requeued.attempt, 2);
    assert!(!requeued.is_terminal(), "{:?}", requeued.state);
    executor.shutdown(Duration::from_millis(100)).await;
}

/// With `interrupted = fail`, a job found RUNNING at start ends FAILED at a version past any
/// progress a watcher may have been shown before the crash (progress is persisted only now
/// and then), so a watcher resuming after such a version is told how the job ended.
#[tokio::test]
async fn a_job_failed_for_its_interruption_can_be_resumed_after_unpersisted_versions() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let now = std::time::SystemTime::now();
    // As a crashed server leaves it: started, progress persisted once.
    let mut job = running_job(now);
    assert!(job.report_progress(0, Progress::percent(10, "persisted"), now));
    store.create(&job).await.unwrap();
    let stored_version = job.version;
    // Versions a watcher saw published but the crash kept from the disk.
    let seen_before_the_crash = stored_version + 50;

    let config = ExecutorConfig {
        interrupted_policy: InterruptedPolicy::Fail,
        ..ExecutorConfig::default()
    };
    let hub = Hub::new();
    let executor = Executor::start(
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::clone(&hub),
        Registry::with_builtins(),
        config,
    );
    assert_eq!(executor.recover().await.unwrap(), 1);

    let ended = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(ended.state, JobState::Failed);
    assert_eq!(ended.error.as_ref().unwrap().reason, "INTERRUPTED");
    assert!(ended.version > stored_version + MAX_UNPERSISTED_VERSIONS);

    let mut watch = JobWatch::open(
        Arc::clone(&store) as Arc<dyn Store>,
        &hub,
        job.id,
        seen_before_the_crash,
        || None,
    )
    .await
    .expect("resuming after a version shown before the crash");
    let told = watch.next().await.unwrap().unwrap();
    assert_eq!(told.state, JobState::Failed);
    assert!(watch.next().await.is_none(), "the stream ends after it");
}

/// A Cancel of a running job is answered once the request is stored: the job is still
/// RUNNING (its handler has the grace period to stop) but marked, so a crash meanwhile cannot
/// undo the cancel (see the next test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_of_a_running_job_is_stored_before_it_is_answered() {
    let dir = TempDir::new().unwrap();
    let gated = Gated::default();
    let mut registry = Registry::with_builtins();
    registry.register("gated", gated.clone());
    let (store, executor) = start_on_sqlite(&dir, registry, 1).await;
    let job = executor.submit(spec("gated")).await.unwrap();
    assert!(eventually(|| gated.started.load(Ordering::SeqCst) == 1).await);

    // The handler ignores the cancel: the job stays RUNNING for the whole grace period.
    let answer = executor.cancel(job.id).await.unwrap();
    assert_eq!(answer.state, JobState::Running);
    assert!(answer.cancel_requested);
    let stored = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(stored.state, JobState::Running);
    assert!(stored.cancel_requested, "durable when answered");
    // A handler that completes its work in spite of the cancel: the work is done.
    gated.gate.notify_one();
    assert_eq!(stored_end(&store, job.id).await, Some(JobState::Succeeded));
    executor.shutdown(Duration::from_secs(1)).await;
}

/// A job found RUNNING at start with a stored cancel request ends CANCELLED (whatever the
/// interrupted policy) at a version past those shown before the crash; it is not run again.
#[tokio::test]
async fn a_job_whose_cancel_was_stored_before_a_crash_ends_cancelled_at_restart() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let now = std::time::SystemTime::now();
    let mut job = running_job(now);
    job.request_cancel(now).unwrap();
    store.create(&job).await.unwrap();

    let executor = Executor::start(
        Arc::clone(&store) as Arc<dyn Store>,
        Hub::new(),
        Registry::with_builtins(),
        ExecutorConfig::default(),
    );
    assert_eq!(executor.recover().await.unwrap(), 1);
    let ended = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(ended.state, JobState::Cancelled);
    assert_eq!(ended.attempt, 1, "not run again");
    assert!(ended.version > job.version + MAX_UNPERSISTED_VERSIONS);
    assert_eq!(executor.queue_length(), 0);
}

/// A program submitting in-process is held to the limits the API enforces at its edge: a job
/// it could not run (a timeout past the clock), send (too large for one response) or read back
/// (params too deep to decode) is refused naming every field, with the registry's findings
/// too, and nothing is written.
#[tokio::test]
async fn in_process_jobs_are_held_to_the_api_limits() {
    let dir = TempDir::new().unwrap();
    let (store, executor) = start_on_sqlite(&dir, Registry::with_builtins(), 1).await;
    let before = store.stats();

    let mut deep = serde_json::json!(1);
    for _ in 0..200 {
        deep = Value::Object([("d".to_owned(), deep)].into_iter().collect());
    }
    let mut job = spec("echo");
    job.actions[0].params.insert("message".to_owned(), deep);
    job.actions.push(spec("nope").actions.remove(0));
    job.timeout = Some(Duration::MAX);
    job.idempotency_key = Some(String::new());
    job.labels.insert("k".to_owned(), "v".repeat(257));
    job.actions[1].input = vec![0; 8 * 1024 * 1024 + 1].into();
    let refused = executor.submit(job).await;
    let Err(ExecutorError::Invalid(violations)) = refused else {
        panic!("accepted: {refused:?}");
    };
    let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            format!("actions[0].params.message{}", ".d".repeat(32)).as_str(),
            "actions[1].input",
            "labels[\"k\"]",
            "idempotency_key",
            "timeout",
            "actions[0].params.message",
            "actions[1].name",
        ]
    );
    let too_many = NewJob {
        actions: std::iter::repeat_n(spec("echo").actions.remove(0), 101).collect(),
        ..NewJob::default()
    };
    assert!(matches!(
        executor.submit(too_many).await,
        Err(ExecutorError::Invalid(v)) if v[0].field == "actions"
    ));
    assert_eq!(store.stats().commands, before.commands, "nothing written");
    assert_eq!(executor.queue_length(), 0);
    executor.shutdown(Duration::from_secs(1)).await;
}

/// A job without actions is refused in-process as at the API's edge, with the same words, and
/// nothing is written: it would otherwise succeed having run nothing.
#[tokio::test]
async fn a_job_without_actions_is_refused_and_not_stored() {
    let dir = TempDir::new().unwrap();
    let (store, executor) = start_on_sqlite(&dir, Registry::with_builtins(), 1).await;

    let before = store.stats();
    let refused = executor.submit(NewJob::default()).await;
    let Err(ExecutorError::Invalid(violations)) = refused else {
        panic!("accepted: {refused:?}");
    };
    assert_eq!(
        violations,
        [FieldViolation::new(
            "actions",
            "at least one action is required"
        )]
    );
    assert_eq!(store.stats().commands, before.commands, "nothing written");
    assert_eq!(executor.queue_length(), 0);
    executor.shutdown(Duration::from_secs(1)).await;
}

/// A program that embeds the executor reads a job and waits for its end in-process, as
/// GetStatus and WaitJob do over the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_wait_follow_a_job_in_process() {
    let dir = TempDir::new().unwrap();
    let gated = Gated::default();
    let mut registry = Registry::with_builtins();
    registry.register("gated", gated.clone());
    let (_store, executor) = start_on_sqlite(&dir, registry, 1).await;

    let job = executor.submit(spec("gated")).await.unwrap();
    assert!(eventually(|| gated.started.load(Ordering::SeqCst) == 1).await);
    assert_eq!(executor.get(job.id).await.unwrap().state, JobState::Running);
    let waited = executor
        .wait(job.id, Some(Duration::from_millis(50)))
        .await
        .unwrap();
    assert_eq!(waited.state, JobState::Running, "the timeout ends the wait");
    assert!(!waited.is_terminal());

    let waiting = executor.wait(job.id, None);
    gated.gate.notify_one();
    let ended = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("told of the end")
        .unwrap();
    assert_eq!(ended.state, JobState::Succeeded);
    assert_eq!(executor.get(job.id).await.unwrap(), ended);

    let unknown = JobId::generate();
    assert!(matches!(
        executor.get(unknown).await,
        Err(ExecutorError::NotFound(id)) if id == unknown
    ));
    assert!(matches!(
        executor.wait(unknown, None).await,
        Err(ExecutorError::NotFound(id)) if id == unknown
    ));
    executor.shutdown(Duration::from_secs(1)).await;
}
