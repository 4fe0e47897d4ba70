//! Watching jobs: a watcher never misses a state transition and never sees versions go
//! backwards, resumes exactly with `after_version` (invariant 2), and a stalled watcher costs
//! bounded memory because progress is coalesced (invariant 3).

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt as _;
use longrun::{
    actions::{ActionContext, ActionDescription, Handler, HandlerError, Registry},
    api::pb::{self, ActionState, JobState},
};
use serde_json::json;
use tonic::transport::Endpoint;

/// What a snapshot says about states: the job's and each action's. Progress-only changes
/// leave it as it was.
fn states_of(job: &pb::Job) -> (JobState, Vec<ActionState>) {
    (state(job), job.actions.iter().map(action_state).collect())
}

/// The distinct state steps a sequence of snapshots went through, in order.
fn state_steps(seen: &[pb::Job]) -> Vec<(JobState, Vec<ActionState>)> {
    let mut steps: Vec<(JobState, Vec<ActionState>)> = seen.iter().map(states_of).collect();
    steps.dedup();
    steps
}

fn versions(seen: &[pb::Job]) -> Vec<i64> {
    seen.iter().map(|j| j.version).collect()
}

fn assert_rising(seen: &[pb::Job]) {
    let versions = versions(seen);
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions strictly rise: {versions:?}"
    );
}

fn echo() -> pb::ActionSpec {
    action("echo", json!({}))
}

#[tokio::test]
async fn watching_a_finished_job_returns_its_final_snapshot_only_and_closes() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![echo(), echo()])).await;
    let done = wait_done(&mut client, &job.id).await;
    let seen = watch_to_end(&mut client, &job.id, 0).await;
    assert_eq!(seen, [done]);
}

#[tokio::test]
async fn stream_versions_strictly_rise_and_the_last_message_is_the_only_terminal_one() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![sleep(200, 10), echo()])).await;
    let seen = watch_to_end(&mut client, &job.id, 1).await;
    assert_rising(&seen);
    assert!(seen[0].version > 1);
    let terminal: Vec<bool> = seen
        .iter()
        .map(|j| {
            matches!(
                state(j),
                JobState::Succeeded | JobState::Failed | JobState::Cancelled
            )
        })
        .collect();
    assert_eq!(
        terminal.iter().filter(|t| **t).count(),
        1,
        "one terminal message"
    );
    assert!(terminal.last().unwrap(), "and it is the last");
    assert_eq!(state(seen.last().unwrap()), JobState::Succeeded);
}

#[tokio::test]
async fn resume_from_the_middle_of_a_finished_history_replays_exactly_what_came_after() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    // Only state changes, no progress: every message is a logged transition (versions may
    // skip the in-memory steps that were saved together with the next one).
    let job = submit(&mut client, request(vec![echo(), echo(), echo()])).await;
    let done = wait_done(&mut client, &job.id).await;
    let full = watch_to_end(&mut client, &job.id, 1).await;
    assert_rising(&full);
    assert!(
        full.len() >= 4,
        "start, each action's start, and the end are all in the history: {:?}",
        versions(&full)
    );
    assert_eq!(full.last(), Some(&done));

    for after in [2, done.version / 2, done.version - 1] {
        let resumed = watch_to_end(&mut client, &job.id, after).await;
        let expected: Vec<pb::Job> = full.iter().filter(|j| j.version > after).cloned().collect();
        assert_eq!(resumed, expected, "resumed after version {after}");
    }
    assert!(
        watch_to_end(&mut client, &job.id, done.version)
            .await
            .is_empty(),
        "nothing after the final version: the stream just closes"
    );
}

#[tokio::test]
async fn dropped_watch_resumed_after_its_last_version_misses_no_state_transition() {
    let gate = Gate::default();
    let server = TestServer::start_with(test_config(), gate.registry()).await;
    let mut client = server.client.clone();
    let job = submit(
        &mut client,
        request(vec![gated(), sleep(60, 3), gated(), echo()]),
    )
    .await;

    // First connection: from submission until the first gate runs, then it drops.
    let mut first = open_watch(&mut client, &job.id, 1).await;
    let mut seen = vec![
        next_until(&mut first, |j| {
            action_state(&j.actions[0]) == ActionState::Running
        })
        .await,
    ];
    drop(first);
    let last_seen = seen[0].version;

    // While disconnected: the first gate, the sleep (with progress) and the second gate start.
    gate.release(1);
    gate.next_started().await;
    gate.next_started().await;

    // Reconnect mid-job, then let it finish.
    let mut second = open_watch(&mut client, &job.id, last_seen).await;
    let resumed_first = next_until(&mut second, |_| true).await;
    gate.release(1);
    let mut resumed = vec![resumed_first];
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = second.next().await {
            resumed.push(message.expect("message").job.expect("job"));
        }
    })
    .await
    .expect("the resumed watch ends");
    assert!(
        resumed.iter().all(|j| j.version > last_seen),
        "nothing repeated"
    );
    seen.extend(resumed);
    assert_rising(&seen);

    let full = watch_to_end(&mut client, &job.id, 1).await;
    // The first connection was read only to its last message; compare from there on.
    let full_from = full
        .iter()
        .position(|j| j.version == last_seen)
        .expect("the last seen version is in the history");
    assert_eq!(
        state_steps(&seen),
        state_steps(&full[full_from..]),
        "every state transition seen across the two connections"
    );
    assert_eq!(state(seen.last().unwrap()), JobState::Succeeded);
}

#[tokio::test]
async fn watch_after_the_current_version_of_a_running_job_yields_only_later_changes() {
    let gate = Gate::default();
    let server = TestServer::start_with(test_config(), gate.registry()).await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![gated(), echo()])).await;
    gate.next_started().await;
    let current = get(&mut client, &job.id).await;
    assert_eq!(state(&current), JobState::Running);

    let mut stream = open_watch(&mut client, &job.id, current.version).await;
    let nothing = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(nothing.is_err(), "nothing new yet: {nothing:?}");
    gate.release(1);
    let mut seen = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = stream.next().await {
            seen.push(message.expect("message").job.expect("job"));
        }
    })
    .await
    .expect("the watch ends");
    assert!(seen[0].version > current.version, "{:?}", versions(&seen));
    assert_rising(&seen);
    assert_eq!(state(seen.last().unwrap()), JobState::Succeeded);
}

#[tokio::test]
async fn fifty_concurrent_watchers_of_one_job_all_see_its_end() {
    let gate = Gate::default();
    let server = TestServer::start_with(test_config(), gate.registry()).await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![gated()])).await;
    gate.next_started().await;

    // Five connections, ten streams each.
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(server.client().await);
    }
    let mut watchers = Vec::new();
    for i in 0..50 {
        let mut watcher = clients[i % clients.len()].clone();
        let mut stream = open_watch(&mut watcher, &job.id, 0).await;
        watchers.push(tokio::spawn(async move {
            let mut last = None;
            while let Some(message) = stream.next().await {
                last = Some(message.expect("message").job.expect("job"));
            }
            last.expect("at least one message")
        }));
    }
    gate.release(1);
    let ends = tokio::time::timeout(PATIENCE, futures::future::join_all(watchers))
        .await
        .expect("every watcher ends in time");
    assert_eq!(ends.len(), 50);
    for end in ends {
        assert_eq!(state(&end.expect("watcher task")), JobState::Succeeded);
    }
}

#[tokio::test]
async fn watcher_of_one_job_receives_nothing_when_another_job_changes() {
    let gate = Gate::default();
    let server = TestServer::start_with(test_config(), gate.registry()).await;
    let mut client = server.client.clone();
    let watched = submit(&mut client, request(vec![gated()])).await;
    gate.next_started().await;
    let mut stream = open_watch(&mut client, &watched.id, 0).await;
    let first = next_until(&mut stream, |_| true).await;
    assert_eq!(first.id, watched.id);

    let other = submit(&mut client, request(vec![sleep(50, 5), echo()])).await;
    wait_done(&mut client, &other.id).await;
    let nothing = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(
        nothing.is_err(),
        "no message for another job's changes: {nothing:?}"
    );

    gate.release(1);
    let end = next_until(&mut stream, |j| state(j) == JobState::Succeeded).await;
    assert_eq!(end.id, watched.id);
}

/// Reports `UPDATES` progress updates as fast as the executor takes them, then succeeds.
struct Spam;

const UPDATES: u64 = 100_000;

#[async_trait::async_trait]
impl Handler for Spam {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Test action: a flood of progress updates.".to_owned(),
            params: Vec::new(),
            uses_input: false,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<serde_json::Value, HandlerError> {
        for done in 1..=UPDATES {
            ctx.progress.units(done, UPDATES, "spamming");
            // Let the executor take each update, so each one is really published.
            tokio::task::yield_now().await;
        }
        Ok(json!({"updates": UPDATES}))
    }
}

#[tokio::test]
async fn stalled_watcher_gets_every_transition_and_coalesced_progress() {
    let mut registry = Registry::with_builtins();
    registry.register("spam", Spam);
    let server = TestServer::start_with(test_config(), registry).await;
    let mut client = server.client.clone();
    // Its own connection, with a small stream window: the server can push only a little
    // ahead of a reader that does not read, then has to hold (and coalesce) the rest.
    let channel = Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("endpoint")
        .initial_stream_window_size(Some(64 * 1024))
        .initial_connection_window_size(Some(1024 * 1024))
        .connect()
        .await
        .expect("connect");
    let mut stalled_client = pb::jobs_client::JobsClient::new(channel);

    let job = submit(&mut client, request(vec![action("spam", json!({}))])).await;
    let mut stalled = open_watch(&mut stalled_client, &job.id, 1).await;
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!(state(&done), JobState::Succeeded);
    assert!(
        done.version > UPDATES as i64,
        "every update was published: version {}",
        done.version
    );

    let mut seen = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = stalled.next().await {
            seen.push(message.expect("message").job.expect("job"));
        }
    })
    .await
    .expect("the stalled watch drains in time");
    assert_rising(&seen);
    assert!(
        seen.len() < 2_000,
        "progress was coalesced: {} messages for {UPDATES} updates",
        seen.len()
    );
    assert_eq!(
        state_steps(&seen),
        [
            (JobState::Running, vec![ActionState::Running]),
            (JobState::Succeeded, vec![ActionState::Succeeded]),
        ],
        "every state transition after submission"
    );
    let last = seen.last().unwrap();
    assert_eq!(last, &done);
    assert_eq!(last.progress.as_ref().unwrap().percent, 100);
}

/// Reports 50% once, then waits until cancelled.
struct HalfThenWait(tokio::sync::mpsc::UnboundedSender<()>);

#[async_trait::async_trait]
impl Handler for HalfThenWait {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Test action: reports 50% and waits.".to_owned(),
            params: Vec::new(),
            uses_input: false,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<serde_json::Value, HandlerError> {
        ctx.progress.percent(50, "half");
        let _ = self.0.send(());
        ctx.cancel.cancelled().await;
        Err(HandlerError::cancelled())
    }
}

#[tokio::test]
async fn watch_opened_after_a_progress_update_sees_that_progress() {
    let (reported_tx, mut reported) = tokio::sync::mpsc::unbounded_channel();
    let mut registry = Registry::with_builtins();
    registry.register("half", HalfThenWait(reported_tx));
    let config = test_config();
    let bound = config.executor.progress_write_interval(false) + Duration::from_secs(1);
    let server = TestServer::start_with(config, registry).await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![action("half", json!({}))])).await;
    tokio::time::timeout(PATIENCE, reported.recv())
        .await
        .expect("the handler reports in time");

    // Resuming (or first watching) after the update must show it, at once or at the latest
    // once the progress persist interval has passed; never only at the next change.
    let mut stream = open_watch(&mut client, &job.id, 0).await;
    let half = tokio::time::timeout(bound, async {
        while let Some(message) = stream.next().await {
            let job = message.expect("message").job.expect("job");
            if job.progress.as_ref().unwrap().percent == 50 {
                return job;
            }
        }
        panic!("the stream ended");
    })
    .await
    .expect("the watcher sees the newest progress");
    assert_eq!(state(&half), JobState::Running);
    assert_eq!(
        get(&mut client, &job.id).await.progress.unwrap().percent,
        50,
        "GetStatus shows it too"
    );
    cancel(&mut client, &job.id).await;
}

/// Reads a stream (bounded) until it ends, which must be with an error: that status.
async fn ending_status<T>(stream: &mut tonic::Streaming<T>) -> tonic::Status {
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends");
    ended.map(|_| ()).expect_err("ended by an error")
}

/// The server ends a watch at the call's deadline (`grpc-timeout`), with DEADLINE_EXCEEDED
/// naming the field to resume with: a client that does not enforce its deadline itself (plain
/// HTTP/2, some Connect clients) is not left with a stream, and a watch slot, open for ever.
/// Both watch RPCs; the tonic client here only sends the header.
#[tokio::test]
async fn watches_end_at_the_call_s_deadline() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![sleep(60_000, 2)])).await;
    let mut watch = tonic::Request::new(pb::WatchJobRequest {
        job_id: job.id.clone(),
        after_version: 0,
    });
    watch.set_timeout(Duration::from_millis(300));
    let mut stream = client.watch_job(watch).await.unwrap().into_inner();
    let status = ending_status(&mut stream).await;
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("after_version"), "{status:?}");

    let mut watch = tonic::Request::new(pb::WatchJobsRequest::default());
    watch.set_timeout(Duration::from_millis(300));
    let mut stream = client.watch_jobs(watch).await.unwrap().into_inner();
    let status = ending_status(&mut stream).await;
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("after_cursor"), "{status:?}");
}

/// Counts the messages of a `WatchJob` stream to its end, and checks that they carried every
/// state the job passed through.
async fn watch_messages(
    client: &mut pb::jobs_client::JobsClient<tonic::transport::Channel>,
    id: &str,
) -> usize {
    let seen = watch_to_end(client, id, 0).await;
    let states: Vec<JobState> = seen.iter().map(state).collect();
    assert!(states.contains(&JobState::Running), "{states:?}");
    assert_eq!(states.last(), Some(&JobState::Succeeded), "{states:?}");
    seen.len()
}

/// A job that reports progress a thousand times a second: by default a watch stream carries
/// its progress at most every 100 ms (coalesced to the newest), so a reader slower than the
/// reports does not fall a window's worth of old progress behind the job's end; every state
/// change still goes out. `watch_progress_interval` 0 sends every report the reader keeps up
/// with. Both watch RPCs.
#[tokio::test]
async fn progress_on_a_watch_stream_is_paced_and_state_changes_are_not() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![sleep(1000, 1000)])).await;
    let paced = watch_messages(&mut client, &job.id).await;
    // About 10 a second, plus the state changes; far fewer than the 1,000 reports.
    assert!(paced <= 40, "{paced} messages");

    let labelled = pb::SubmitRequest {
        labels: [("pace".to_owned(), "yes".to_owned())].into(),
        ..request(vec![sleep(1000, 1000)])
    };
    let mut stream = client
        .watch_jobs(pb::WatchJobsRequest {
            labels: labelled.labels.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let job = submit(&mut client, labelled).await;
    let mut messages = 0;
    let mut states = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = stream.message().await.unwrap() {
            messages += 1;
            let seen = message.job.unwrap();
            assert_eq!(seen.id, job.id);
            states.push(state(&seen));
            if state(&seen) == JobState::Succeeded {
                return;
            }
        }
    })
    .await
    .expect("the job ends");
    assert!(states.contains(&JobState::Running), "{states:?}");
    assert!(messages <= 40, "{messages} messages");

    let mut config = test_config();
    config.limits.watch_progress_interval = Duration::ZERO;
    let unpaced = TestServer::start_with(config, Registry::with_builtins()).await;
    let mut client = unpaced.client.clone();
    let job = submit(&mut client, request(vec![sleep(1000, 1000)])).await;
    let every = watch_messages(&mut client, &job.id).await;
    assert!(every >= 100, "{every} messages");
}
