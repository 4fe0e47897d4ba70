//! How an attempt ends when its handler does not simply return (a panic) or returns too late
//! (past the job's timeout), and what a shutdown does to a job between attempts.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use serde_json::{Value, json};
use tempfile::TempDir;

use super::{
    Executor, ExecutorConfig,
    run::{backoff, handler_panicked},
    tests::spec,
};
use crate::{
    actions::{
        ActionContext, ActionDescription, Handler, HandlerError, MAX_PANIC_MESSAGE_BYTES, Registry,
    },
    events::{Hub, JobWatch},
    job::{ActionState, Job, JobId, JobState, NewAction, NewJob},
    store::{MemoryStore, SqliteOptions, SqliteStore, Store},
};

/// How long a test waits for a job to end before it calls the job stuck.
const PATIENCE: Duration = Duration::from_secs(10);

/// An action that panics on the attempts up to `panic_attempts`, then returns its attempt.
/// With `in_task`, the panic happens in a task it spawns and awaits, and reaches the handler
/// through the task's join handle.
struct Panicky {
    panic_attempts: u32,
    in_task: bool,
}

#[async_trait]
impl Handler for Panicky {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Panics, as a handler with a bug does.".to_owned(),
            params: vec![],
            uses_input: false,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        if ctx.attempt > self.panic_attempts {
            return Ok(json!({ "attempt": ctx.attempt }));
        }
        if self.in_task {
            let task = tokio::spawn(async { a_bug() });
            return match task.await {
                Ok(_) => Ok(Value::Null),
                Err(error) => std::panic::resume_unwind(error.into_panic()),
            };
        }
        panic!("handler bug on attempt {}", ctx.attempt);
    }
}

/// An action that goes on past its cancellation (the job's timeout, here) and then completes
/// its work.
struct Overrun;

#[async_trait]
impl Handler for Overrun {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Returns once told to stop, with its work done.".to_owned(),
            params: vec![],
            uses_input: false,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        ctx.cancel.cancelled().await;
        Ok(json!("done anyway"))
    }
}

/// An action that counts its starts.
#[derive(Clone, Default)]
struct Counted {
    starts: Arc<AtomicUsize>,
}

#[async_trait]
impl Handler for Counted {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Counts its starts.".to_owned(),
            params: vec![],
            uses_input: false,
        }
    }

    async fn run(&self, _ctx: ActionContext) -> Result<Value, HandlerError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        Ok(Value::Null)
    }
}

fn a_bug() -> u32 {
    panic!("handler bug in a task")
}

/// One worker, and retries without a noticeable wait.
fn one_worker_quick_retries() -> ExecutorConfig {
    ExecutorConfig {
        concurrency: 1,
        retry_backoff_initial: Duration::from_millis(1),
        retry_backoff_max: Duration::from_millis(1),
        ..ExecutorConfig::default()
    }
}

/// An executor on a fresh memory store, recovered and ready for Submits.
async fn start(registry: Registry, config: ExecutorConfig) -> Executor {
    let executor = Executor::start(Arc::new(MemoryStore::new()), Hub::new(), registry, config);
    executor.recover().await.unwrap();
    executor
}

/// A job of the actions `names`, in order, without params, limited to `timeout` an attempt.
fn timed_job(names: &[&str], timeout: Duration) -> NewJob {
    NewJob {
        actions: names
            .iter()
            .map(|name| spec(name).actions.remove(0))
            .collect(),
        timeout: Some(timeout),
        ..NewJob::default()
    }
}

fn with_attempts(mut spec: NewJob, max_attempts: u32) -> NewJob {
    spec.max_attempts = Some(max_attempts);
    spec
}

/// Watches job `id` from its submission as a client would, until a snapshot satisfies `until`
/// (at the latest the terminal one, which ends the watch), and returns that snapshot; panics
/// if none has after [`PATIENCE`].
async fn watch_until(executor: &Executor, id: JobId, until: impl Fn(&Job) -> bool) -> Arc<Job> {
    let store: Arc<dyn Store> = Arc::clone(executor.store());
    let mut watch = JobWatch::open(store, executor.hub(), id, 0, || None)
        .await
        .unwrap();
    let mut last: Option<Arc<Job>> = None;
    let seen = tokio::time::timeout(PATIENCE, async {
        while let Some(job) = watch.next().await {
            let job = job.unwrap();
            let done = until(&job);
            last = Some(job);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    let last = last.expect("the watch shows the job");
    assert!(
        seen == Ok(true),
        "job still {} at attempt {}/{} after {PATIENCE:?}",
        last.state,
        last.attempt,
        last.max_attempts
    );
    last
}

/// [`watch_until`] the job ends.
async fn watch_to_end(executor: &Executor, id: JobId) -> Arc<Job> {
    watch_until(executor, id, Job::is_terminal).await
}

/// Runs a two-attempt `panicky` job (added to `registry`) on one worker to its end.
async fn run_panicky(
    mut registry: Registry,
    panic_attempts: u32,
    in_task: bool,
) -> (Executor, Arc<Job>) {
    registry.register(
        "panicky",
        Panicky {
            panic_attempts,
            in_task,
        },
    );
    let executor = start(registry, one_worker_quick_retries()).await;
    let job = executor
        .submit(with_attempts(spec("panicky"), 2))
        .await
        .unwrap();
    let ended = watch_to_end(&executor, job.id).await;
    (executor, ended)
}

#[tokio::test]
async fn a_handler_that_panics_fails_its_attempt_and_the_job_is_retried() {
    let (executor, ended) = run_panicky(Registry::empty(), 1, false).await;
    assert_eq!((ended.state, ended.attempt), (JobState::Succeeded, 2));
    assert_eq!(ended.actions[0].result, Some(json!({ "attempt": 2 })));
    executor.shutdown(Duration::from_secs(1)).await;
}

/// The job ends FAILED with the panic's text once no attempt is left; its worker slot is free
/// for the next job, and a Cancel answers with the ended job at once.
#[tokio::test]
async fn a_handler_that_panics_every_attempt_fails_the_job_and_frees_its_worker() {
    let (executor, ended) = run_panicky(Registry::with_builtins(), u32::MAX, true).await;
    assert_eq!((ended.state, ended.attempt), (JobState::Failed, 2));
    let error = ended.error.as_ref().expect("the job says why it failed");
    assert_eq!(
        (error.code.as_str(), error.reason.as_str()),
        ("INTERNAL", "HANDLER_PANICKED")
    );
    assert!(
        error.message.contains("handler bug in a task"),
        "{}",
        error.message
    );
    assert_eq!(ended.actions[0].state, ActionState::Failed);
    assert_eq!(ended.actions[0].error.as_ref(), Some(error));

    let cancelled = executor.cancel(ended.id).await.unwrap();
    assert_eq!(
        cancelled.state,
        JobState::Failed,
        "unchanged, and not stuck"
    );
    assert!(!cancelled.cancel_requested);

    let next = executor.submit(spec("echo")).await.unwrap();
    assert_eq!(
        watch_to_end(&executor, next.id).await.state,
        JobState::Succeeded,
        "the only worker is free again"
    );
    executor.shutdown(Duration::from_secs(1)).await;
}

#[test]
fn a_panic_message_is_kept_whole_up_to_a_bound_and_cut_on_a_char_boundary() {
    let short = handler_panicked(&"index out of bounds");
    assert_eq!(
        short.error.message,
        "the action's handler panicked: index out of bounds"
    );
    assert!(short.retryable);

    let long = "é".repeat(MAX_PANIC_MESSAGE_BYTES);
    let cut = handler_panicked(&long).error.message;
    assert!(
        cut.len() < MAX_PANIC_MESSAGE_BYTES + 100,
        "{} bytes",
        cut.len()
    );
    assert!(cut.ends_with("é…"), "{cut}");

    let opaque = handler_panicked(&42_u8);
    assert!(opaque.error.message.contains("without a message"));
}

/// A shutdown does not wait for a job that is only waiting out its backoff before a retry: no
/// handler runs, so there is nothing for the grace period to let finish. The job stays QUEUED
/// in the store with its `next_attempt_time`, and the next start keeps it waiting for that
/// (the rest of an hour here) rather than running it at once; Cancel still ends it.
#[tokio::test]
async fn a_job_waiting_to_be_retried_does_not_hold_the_shutdown_and_waits_on_after_a_restart() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let long_backoff = ExecutorConfig {
        retry_backoff_initial: Duration::from_secs(3600),
        retry_backoff_max: Duration::from_secs(3600),
        ..ExecutorConfig::default()
    };
    let start = || async {
        let executor = Executor::start(
            Arc::clone(&store) as Arc<dyn Store>,
            Hub::new(),
            Registry::with_builtins(),
            long_backoff.clone(),
        );
        executor.recover().await.unwrap();
        executor
    };
    let executor = start().await;
    let fails_once = NewJob {
        actions: vec![NewAction {
            name: "fail".to_owned(),
            params: [("fail_attempts".to_owned(), json!(1))]
                .into_iter()
                .collect(),
            input: Default::default(),
        }],
        ..with_attempts(NewJob::default(), 2)
    };
    let job = executor.submit(fails_once).await.unwrap();
    watch_until(&executor, job.id, |job| {
        job.state == JobState::Queued && job.attempt == 2
    })
    .await;

    let shutdown = executor.shutdown(Duration::from_secs(3600));
    assert!(
        tokio::time::timeout(PATIENCE, shutdown).await.is_ok(),
        "the shutdown waited for the job's backoff"
    );
    let stored = store.get(job.id).await.unwrap().unwrap();
    assert_eq!((stored.state, stored.attempt), (JobState::Queued, 2));
    let next = stored
        .next_attempt_time
        .expect("the end of the backoff is stored");
    assert!(
        // An hour less up to a quarter of jitter.
        next > SystemTime::now() + Duration::from_secs(2600),
        "{next:?}"
    );

    let restarted = start().await;
    assert_eq!(restarted.queue_length(), 1, "queued again by recovery");
    assert_eq!(restarted.metrics().scheduled.get(), 1, "not due yet");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiting = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(waiting, stored, "nothing ran it early");
    let cancelled = restarted.cancel(job.id).await.unwrap();
    assert_eq!(
        (cancelled.state, cancelled.attempt),
        (JobState::Cancelled, 2)
    );
    assert_eq!(cancelled.next_attempt_time, None);
    restarted.shutdown(Duration::from_secs(1)).await;
}

/// Once an attempt is out of time no further action starts, even when the one before returned
/// success after the deadline: that success is kept, the attempt fails right there with
/// TIMEOUT, and the action not started ends SKIPPED, as every action a failed job did not run.
#[tokio::test]
async fn no_action_starts_once_the_attempt_is_out_of_time() {
    let counted = Counted::default();
    let mut registry = Registry::empty();
    registry.register("overrun", Overrun);
    registry.register("counted", counted.clone());
    let executor = start(registry, ExecutorConfig::default()).await;
    let job = executor
        .submit(timed_job(
            &["overrun", "counted"],
            Duration::from_millis(50),
        ))
        .await
        .unwrap();

    let ended = watch_to_end(&executor, job.id).await;
    assert_eq!(counted.starts.load(Ordering::SeqCst), 0, "never started");
    assert_eq!(ended.state, JobState::Failed);
    let error = ended.error.as_ref().expect("the job says why it failed");
    assert_eq!(
        (error.code.as_str(), error.reason.as_str()),
        ("DEADLINE_EXCEEDED", "TIMEOUT")
    );
    assert_eq!(ended.actions[0].state, ActionState::Succeeded);
    assert_eq!(ended.actions[0].result, Some(json!("done anyway")));
    assert_eq!(ended.actions[1].state, ActionState::Skipped);
    let note = ended.actions[1]
        .error
        .as_ref()
        .expect("a skipped action says why");
    assert_eq!(note.reason, "NOT_RUN");
    assert!(note.message.contains("timeout"), "{}", note.message);
    executor.shutdown(Duration::from_secs(1)).await;
}

/// A handler that completes its work after the timeout has fired, within the grace period,
/// keeps its result: the job's last action succeeded, so the job does.
#[tokio::test]
async fn a_result_that_arrives_after_the_timeout_is_kept() {
    let mut registry = Registry::empty();
    registry.register("overrun", Overrun);
    let executor = start(registry, ExecutorConfig::default()).await;
    let job = executor
        .submit(timed_job(&["overrun"], Duration::from_millis(50)))
        .await
        .unwrap();

    let ended = watch_to_end(&executor, job.id).await;
    assert_eq!(ended.state, JobState::Succeeded);
    assert_eq!(ended.actions[0].result, Some(json!("done anyway")));
    executor.shutdown(Duration::from_secs(1)).await;
}

#[test]
fn backoff_doubles_with_jitter_and_never_passes_its_cap() {
    let (initial, max) = (Duration::from_secs(1), Duration::from_secs(8));
    assert_eq!(backoff(initial, max, 2, 0.0), Duration::from_secs(1));
    assert_eq!(backoff(initial, max, 3, 0.0), Duration::from_secs(2));
    assert_eq!(backoff(initial, max, 3, 0.5), Duration::from_millis(2250));
    // At the cap the jitter goes below it, so capped retries still spread out.
    assert_eq!(backoff(initial, max, 5, 0.0), max);
    assert_eq!(backoff(initial, max, 5, 0.5), Duration::from_secs(7));
    assert_eq!(
        backoff(initial, max, 40, 0.99),
        max - max.mul_f64(0.99 * 0.25)
    );
    // Just under the cap, a jitter that would pass it goes below the cap instead.
    let near = backoff(Duration::from_millis(7900), max, 2, 0.5);
    assert!(near <= max && near >= max.mul_f64(0.75), "{near:?}");
    for attempt in 2..64 {
        for random in [0.0, 0.3, 0.999] {
            assert!(backoff(initial, max, attempt, random) <= max);
        }
    }
}
