//! Cancel reaches running code, and a handler (or a child process) that ignores it is stopped
//! anyway (invariant 4): queued, running, stubborn, retrying and finished jobs.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::*;
use longrun::{
    actions::{ActionContext, ActionDescription, ExecCommand, Handler, HandlerError, Registry},
    api::pb::{ActionState, JobState},
};
use serde_json::json;

fn one_at_a_time() -> longrun::config::Config {
    let mut config = test_config();
    config.executor.concurrency = 1;
    config
}

fn time(ts: &Option<prost_types::Timestamp>) -> SystemTime {
    SystemTime::try_from(ts.expect("timestamp set")).expect("valid timestamp")
}

#[tokio::test]
async fn cancelling_a_queued_job_cancels_it_at_once_skips_its_actions_and_it_never_runs() {
    let gate = Gate::default();
    let server = TestServer::start_with(one_at_a_time(), gate.registry()).await;
    let mut client = server.client.clone();

    let running = submit(&mut client, request(vec![gated()])).await;
    assert_eq!(gate.next_started().await, running.id);
    let queued = submit(
        &mut client,
        request(vec![gated(), action("echo", json!({}))]),
    )
    .await;
    assert_eq!(state(&queued), JobState::Queued);

    let cancelled = cancel(&mut client, &queued.id).await;
    assert_eq!(state(&cancelled), JobState::Cancelled, "cancelled at once");
    let actions: Vec<ActionState> = cancelled.actions.iter().map(action_state).collect();
    assert_eq!(actions, [ActionState::Skipped, ActionState::Skipped]);
    assert_eq!(cancelled.error.as_ref().unwrap().code, "CANCELLED");
    assert!(cancelled.start_time.is_none());

    // A job submitted after the cancelled one runs next: the cancelled one was skipped.
    let later = submit(&mut client, request(vec![gated()])).await;
    gate.release(1);
    assert_eq!(
        state(&wait_done(&mut client, &running.id).await),
        JobState::Succeeded
    );
    assert_eq!(
        gate.next_started().await,
        later.id,
        "the cancelled job never ran"
    );
    gate.release(1);
    wait_done(&mut client, &later.id).await;

    let after = get(&mut client, &queued.id).await;
    assert_eq!(after, cancelled, "the cancelled job never changed again");
}

#[tokio::test]
async fn cancelling_a_running_sleep_job_cancels_it_promptly_and_the_action_is_cancelled() {
    // A grace far longer than the wait below proves the handler stopped by itself.
    let mut config = test_config();
    config.executor.cancel_grace = Duration::from_secs(30);
    let server = TestServer::start_with(config, Registry::with_builtins()).await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![sleep(60_000, 600)])).await;
    // A few steps in: progress is published at once but stored only now and then.
    let seen = until(&mut client, &job.id, |j| {
        j.actions[0]
            .progress
            .as_ref()
            .is_some_and(|p| p.current >= 3)
    })
    .await;

    let asked = Instant::now();
    let answer = cancel(&mut client, &job.id).await;
    assert!(matches!(
        state(&answer),
        JobState::Running | JobState::Cancelled
    ));
    assert!(
        answer.version >= seen.version,
        "the answer is the newest snapshot, not the stored one: {} < {}",
        answer.version,
        seen.version
    );
    let done = wait_done(&mut client, &job.id).await;
    let took = asked.elapsed();
    assert_eq!(state(&done), JobState::Cancelled);
    assert!(
        done.cancel_requested,
        "a Cancel reached the job while it ran, also when its handler stopped at once"
    );
    assert!(
        took < Duration::from_secs(5),
        "cancelled promptly: {took:?}"
    );
    assert_eq!(action_state(&done.actions[0]), ActionState::Cancelled);
    assert_eq!(done.error.as_ref().unwrap().code, "CANCELLED");
    assert!(done.end_time.is_some());
}

#[tokio::test]
async fn handler_ignoring_its_cancellation_is_stopped_after_the_grace_period() {
    let gate = Gate::new(true);
    let config = test_config();
    let grace = config.executor.cancel_grace;
    let server = TestServer::start_with(config, gate.registry()).await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![gated()])).await;
    assert_eq!(gate.next_started().await, job.id);

    let asked = Instant::now();
    let answer = cancel(&mut client, &job.id).await;
    assert_eq!(
        state(&answer),
        JobState::Running,
        "still running while the handler ignores the cancel"
    );
    assert!(answer.cancel_requested);
    assert!(get(&mut client, &job.id).await.cancel_requested);
    let done = wait_done(&mut client, &job.id).await;
    let took = asked.elapsed();
    assert_eq!(state(&done), JobState::Cancelled);
    assert!(took >= grace, "the handler got its grace period: {took:?}");
    assert_eq!(action_state(&done.actions[0]), ActionState::Cancelled);
    gate.until_idle().await;
    assert_eq!(gate.running(), 0, "the stubborn handler was dropped");
}

/// Reports progress at every poll and never looks at its cancellation (for a bounded while,
/// so that a failing test ends).
struct Chatty;

#[longrun::actions::async_trait]
impl Handler for Chatty {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Reports progress at every poll, ignoring its cancellation.".to_owned(),
            params: vec![],
            uses_input: false,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<serde_json::Value, HandlerError> {
        let until = tokio::time::Instant::now() + PATIENCE;
        let mut step = 0;
        while tokio::time::Instant::now() < until {
            step += 1;
            ctx.progress.units(step, u64::MAX, "chatting");
            tokio::task::yield_now().await;
        }
        Ok(json!({ "steps": step }))
    }
}

#[tokio::test]
async fn a_handler_that_reports_at_every_poll_and_ignores_its_cancellation_is_stopped_too() {
    let mut registry = Registry::with_builtins();
    registry.register("chatty", Chatty);
    let config = test_config();
    let grace = config.executor.cancel_grace;
    let server = TestServer::start_with(config, registry).await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![action("chatty", json!({}))])).await;
    until_state(&mut client, &job.id, JobState::Running).await;

    let asked = Instant::now();
    cancel(&mut client, &job.id).await;
    let done = wait_done(&mut client, &job.id).await;
    let took = asked.elapsed();
    assert_eq!(state(&done), JobState::Cancelled);
    assert_eq!(action_state(&done.actions[0]), ActionState::Cancelled);
    assert!(done.cancel_requested, "the request was stored");
    assert!(
        took < grace + Duration::from_secs(5),
        "stopped after its grace period, not when it chose to return: {took:?}"
    );
}

#[tokio::test]
async fn a_cancel_while_the_handler_stops_for_its_timeout_ends_the_job_cancelled_not_retried() {
    let gate = Gate::new(true);
    let mut config = test_config();
    // The handler ignores being stopped: the job stays in its timeout's grace period until
    // the handler is dropped, well after the Cancel below.
    config.executor.cancel_grace = Duration::from_secs(2);
    let server = TestServer::start_with(config, gate.registry()).await;
    let mut client = server.client.clone();
    let mut req = request(vec![gated()]);
    req.timeout = Some(millis(50));
    req.max_attempts = 3;
    let job = submit(&mut client, req).await;
    assert_eq!(gate.next_started().await, job.id);
    // Past the timeout: the handler has been told to stop, and ignores it.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let answer = cancel(&mut client, &job.id).await;
    assert!(
        answer.cancel_requested,
        "the request is stored and answered, not lost behind the timeout: {answer:?}"
    );
    assert_eq!(state(&answer), JobState::Running);
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!(state(&done), JobState::Cancelled);
    assert_eq!(done.attempt, 1, "not retried");
    assert_eq!(done.error.as_ref().unwrap().code, "CANCELLED");
    assert_eq!(action_state(&done.actions[0]), ActionState::Cancelled);
}

#[tokio::test]
async fn concurrent_cancels_of_a_queued_job_all_answer_with_its_one_cancellation() {
    let gate = Gate::default();
    // On the durable store, whose group commit leaves the others time to read the job still
    // QUEUED while the first cancellation is being written.
    let dir = tempfile::tempdir().unwrap();
    let store = longrun::store::SqliteStore::open(dir.path(), Default::default()).unwrap();
    let server =
        TestServer::start_on(std::sync::Arc::new(store), one_at_a_time(), gate.registry()).await;
    let mut client = server.client.clone();
    let blocker = submit(&mut client, request(vec![gated()])).await;
    assert_eq!(gate.next_started().await, blocker.id);
    for _ in 0..5 {
        let queued = submit(&mut client, request(vec![sleep(10, 1)])).await;
        let cancels = (0..10).map(|_| {
            let mut client = server.client.clone();
            let id = queued.id.clone();
            tokio::spawn(async move {
                client
                    .cancel(longrun::api::pb::CancelRequest { job_id: id })
                    .await
            })
        });
        let mut answers = Vec::new();
        for cancel in cancels.collect::<Vec<_>>() {
            let answer = cancel
                .await
                .expect("task")
                .expect("every concurrent Cancel succeeds")
                .into_inner()
                .job
                .expect("job");
            answers.push(answer);
        }
        let done = get(&mut client, &queued.id).await;
        assert_eq!(state(&done), JobState::Cancelled);
        assert!(
            answers.iter().all(|answer| *answer == done),
            "one cancellation, the same version in every answer"
        );
    }
    gate.release(1);
}

#[tokio::test]
async fn cancelling_a_job_waiting_for_its_retry_backoff_cancels_it() {
    let mut config = test_config();
    config.executor.retry_backoff_initial = Duration::from_secs(3600);
    config.executor.retry_backoff_max = Duration::from_secs(3600);
    let server = TestServer::start_with(config, Registry::with_builtins()).await;
    let mut client = server.client.clone();
    let mut req = request(vec![action("fail", json!({}))]);
    req.max_attempts = 3;
    let job = submit(&mut client, req).await;
    let waiting = until(&mut client, &job.id, |j| {
        state(j) == JobState::Queued && j.attempt == 2
    })
    .await;
    assert_eq!(waiting.attempt, 2);

    let answer = cancel(&mut client, &job.id).await;
    assert_eq!(
        state(&answer),
        JobState::Cancelled,
        "a job waiting between attempts is queued: Cancel answers with its cancellation"
    );
    assert!(answer.version > waiting.version);
    // Bounded far below the hour of backoff.
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!(done, answer, "nothing changed after the answer");
    assert_eq!(done.attempt, 2, "the retry never started");
    assert_eq!(done.error.as_ref().unwrap().code, "CANCELLED");
}

#[tokio::test]
async fn cancel_is_idempotent_and_returns_a_finished_job_unchanged() {
    let gate = Gate::default();
    let server = TestServer::start_with(one_at_a_time(), gate.registry()).await;
    let mut client = server.client.clone();

    // Queued, cancelled twice: the second cancel changes nothing.
    let blocker = submit(&mut client, request(vec![gated()])).await;
    gate.next_started().await;
    let queued = submit(&mut client, request(vec![sleep(10, 1)])).await;
    let first = cancel(&mut client, &queued.id).await;
    let second = cancel(&mut client, &queued.id).await;
    assert_eq!(state(&first), JobState::Cancelled);
    assert_eq!(second, first, "same job, same version");

    // Running, cancelled twice: both accepted, one CANCELLED outcome.
    cancel(&mut client, &blocker.id).await;
    cancel(&mut client, &blocker.id).await;
    let stopped = wait_done(&mut client, &blocker.id).await;
    assert_eq!(state(&stopped), JobState::Cancelled);
    assert_eq!(cancel(&mut client, &blocker.id).await, stopped);

    // Succeeded: cancel returns it as it is.
    let finished = submit(&mut client, request(vec![action("echo", json!({}))])).await;
    let finished = wait_done(&mut client, &finished.id).await;
    assert_eq!(state(&finished), JobState::Succeeded);
    let answer = cancel(&mut client, &finished.id).await;
    assert_eq!(answer, finished, "a finished job is returned unchanged");
    assert_eq!(
        get(&mut client, &finished.id).await.version,
        finished.version
    );
}

#[tokio::test]
async fn cancelled_exec_command_that_ignores_sigterm_is_killed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pid_file = dir.path().join("pid");
    let script = format!(
        "trap '' TERM; echo $$ > '{}'; echo '@progress 1 started'; while true; do sleep 0.05; done",
        pid_file.display()
    );
    let mut config = one_at_a_time();
    config.exec_commands.insert(
        "stubborn".to_owned(),
        ExecCommand {
            program: "/bin/sh".into(),
            args: vec!["-c".to_owned(), script],
            description: "ignores SIGTERM".to_owned(),
            allow_extra_args: false,
            env: Default::default(),
            working_dir: None,
        },
    );
    let gate = Gate::default();
    let mut registry = config.registry();
    registry.register("gate", gate.clone());
    let server = TestServer::start_with(config, registry).await;
    let mut client = server.client.clone();
    // Hold the only slot so the watch is open before the command starts and reports.
    submit(&mut client, request(vec![gated()])).await;
    gate.next_started().await;
    let job = submit(
        &mut client,
        request(vec![action("exec", json!({"command": "stubborn"}))]),
    )
    .await;
    let mut watch = open_watch(&mut client, &job.id, 0).await;
    next_until(&mut watch, |j| state(j) == JobState::Queued).await;
    gate.release(1);
    // The command reports progress only after it wrote its pid.
    next_until(&mut watch, |j| {
        j.actions[0]
            .progress
            .as_ref()
            .is_some_and(|p| p.percent >= 1)
    })
    .await;
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    assert!(!process_gone(pid), "the command runs before the cancel");

    cancel(&mut client, &job.id).await;
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!(state(&done), JobState::Cancelled);
    assert_eq!(action_state(&done.actions[0]), ActionState::Cancelled);
    tokio::time::timeout(Duration::from_secs(5), async {
        while !process_gone(pid) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("process {pid} still runs after its job was cancelled"));
}

#[tokio::test]
async fn cancelled_running_job_frees_its_worker_slot_for_the_next_queued_job() {
    // The handler ignores the cancel, so the slot is freed only by the grace-period stop.
    let gate = Gate::new(true);
    let server = TestServer::start_with(one_at_a_time(), gate.registry()).await;
    let mut client = server.client.clone();
    let stuck = submit(&mut client, request(vec![gated()])).await;
    assert_eq!(gate.next_started().await, stuck.id);
    let next = submit(&mut client, request(vec![action("echo", json!({}))])).await;
    assert_eq!(state(&get(&mut client, &next.id).await), JobState::Queued);

    cancel(&mut client, &stuck.id).await;
    let stuck = wait_done(&mut client, &stuck.id).await;
    let next = wait_done(&mut client, &next.id).await;
    assert_eq!(state(&stuck), JobState::Cancelled);
    assert_eq!(
        state(&next),
        JobState::Succeeded,
        "the next job got the slot"
    );
    assert!(
        time(&next.start_time) >= time(&stuck.end_time),
        "the next job started only once the cancelled one had stopped"
    );
}
