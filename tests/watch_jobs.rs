//! `WatchJobs`: one stream for every job matching a label selector, resumable from a cursor,
//! with the same guarantees as `WatchJob` (nothing missed, versions only rise, progress
//! coalesced for a stalled reader).

mod common;

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use async_trait::async_trait;
use common::*;
use longrun::{
    actions::{ActionContext, ActionDescription, Handler, HandlerError, Registry},
    api::pb::{self, JobState, jobs_client::JobsClient},
    executor::Executor,
    job::JobId,
};
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tonic::{Code, Streaming, transport::Channel};

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

async fn watch_jobs(
    client: &mut JobsClient<Channel>,
    selector: &[(&str, &str)],
    states: &[JobState],
    after_cursor: &str,
) -> Result<Streaming<pb::WatchJobsResponse>, tonic::Status> {
    client
        .watch_jobs(pb::WatchJobsRequest {
            labels: labels(selector),
            states: states.iter().map(|s| *s as i32).collect(),
            after_cursor: after_cursor.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Reads messages until `done` says the collection is complete (bounded by [`PATIENCE`]).
async fn read_until(
    stream: &mut Streaming<pb::WatchJobsResponse>,
    mut done: impl FnMut(&[pb::WatchJobsResponse]) -> bool,
) -> Vec<pb::WatchJobsResponse> {
    let mut seen = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while !done(&seen) {
            let message = stream.next().await.expect("the stream stays open");
            seen.push(message.expect("stream message"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the stream delivered in time ({} messages)", seen.len()));
    seen
}

fn succeeded(seen: &[pb::WatchJobsResponse]) -> BTreeSet<String> {
    seen.iter()
        .filter_map(|m| m.job.as_ref())
        .filter(|j| state(j) == JobState::Succeeded)
        .map(|j| j.id.clone())
        .collect()
}

/// Every logged `(job id, version)` of these jobs, from the store.
async fn logged(executor: &Executor, ids: &[String]) -> BTreeSet<(String, i64)> {
    let mut all = BTreeSet::new();
    for id in ids {
        let parsed: JobId = id.parse().expect("job id");
        for job in executor.store().transitions(parsed, 0).await.expect("log") {
            all.insert((id.clone(), job.version));
        }
    }
    all
}

/// Asserts that each job's versions strictly rise along `seen` and that cursors never fall;
/// returns every `(job id, version)` seen.
fn check_order(seen: &[pb::WatchJobsResponse]) -> BTreeSet<(String, i64)> {
    let mut newest: HashMap<&str, i64> = HashMap::new();
    let mut cursor = -1;
    let mut keys = BTreeSet::new();
    for message in seen {
        let job = message.job.as_ref().expect("job");
        let before = newest.insert(&job.id, job.version).unwrap_or(0);
        assert!(
            job.version > before,
            "job {} went from v{before} to v{}",
            job.id,
            job.version
        );
        // `e<seq>`, or `s<seq>.<job id>` during the first snapshots, then `~` and the mark:
        // the event never falls.
        let at: i64 = message.cursor[1..]
            .split(['.', '~'])
            .next()
            .and_then(|seq| seq.parse().ok())
            .expect("cursor");
        assert!(at >= cursor, "cursor fell from {cursor} to {at}");
        cursor = at;
        keys.insert((job.id.clone(), job.version));
    }
    keys
}

#[tokio::test]
async fn a_label_selector_sees_every_transition_of_matching_jobs_and_nothing_else() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let mut stream = watch_jobs(&mut client, &[("batch", "a")], &[], "")
        .await
        .unwrap();
    let mut wanted = Vec::new();
    for i in 0..60 {
        let batch = if i % 6 == 5 { "b" } else { "a" };
        let mut req = request(vec![sleep(20, 2)]);
        req.labels = labels(&[("batch", batch), ("n", &i.to_string())]);
        let job = submit(&mut client, req).await;
        if batch == "a" {
            wanted.push(job.id);
        }
    }
    assert_eq!(wanted.len(), 50);
    let seen = read_until(&mut stream, |s| succeeded(s).len() == wanted.len()).await;
    let keys = check_order(&seen);
    let ids: BTreeSet<&String> = keys.iter().map(|(id, _)| id).collect();
    assert_eq!(ids, wanted.iter().collect(), "matching jobs only");
    let missing: Vec<_> = logged(&server.executor, &wanted)
        .await
        .difference(&keys)
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "every logged transition streamed; missing {missing:?}"
    );
}

#[tokio::test]
async fn a_states_filter_sends_only_those_states() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let mut stream = watch_jobs(&mut client, &[], &[JobState::Succeeded], "")
        .await
        .unwrap();
    for _ in 0..10 {
        submit(&mut client, request(vec![sleep(10, 2)])).await;
    }
    let seen = read_until(&mut stream, |s| s.len() == 10).await;
    assert!(
        seen.iter()
            .all(|m| state(m.job.as_ref().unwrap()) == JobState::Succeeded)
    );
    assert_eq!(succeeded(&seen).len(), 10, "one message per job");
}

/// JOB_STATE_UNSPECIFIED in the filter matches nothing, as documented and as in ListJobs:
/// alone it delivers nothing; beside a real state it adds nothing to it.
#[tokio::test]
async fn unspecified_in_a_states_filter_matches_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let mut nothing = watch_jobs(&mut client, &[], &[JobState::Unspecified], "")
        .await
        .expect("accepted, not refused");
    let mut succeeded_only = watch_jobs(
        &mut client,
        &[],
        &[JobState::Unspecified, JobState::Succeeded],
        "",
    )
    .await
    .unwrap();
    let job = submit(&mut client, request(vec![sleep(10, 2)])).await;
    let seen = read_until(&mut succeeded_only, |s| !s.is_empty()).await;
    assert_eq!(seen[0].job.as_ref().unwrap().id, job.id);
    assert_eq!(state(seen[0].job.as_ref().unwrap()), JobState::Succeeded);
    wait_done(&mut client, &job.id).await;
    let quiet = tokio::time::timeout(Duration::from_millis(200), nothing.next()).await;
    assert!(quiet.is_err(), "nothing delivered: {quiet:?}");
}

#[tokio::test]
async fn resuming_from_a_cursor_taken_mid_way_misses_nothing_and_repeats_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let selector = [("resume", "yes")];
    let mut full = watch_jobs(&mut client, &selector, &[], "").await.unwrap();
    let mut first = watch_jobs(&mut client, &selector, &[], "").await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..20 {
        let mut req = request(vec![sleep(40, 4)]);
        req.labels = labels(&selector);
        ids.push(submit(&mut client, req).await.id);
    }
    let mut seen = read_until(&mut first, |s| s.len() == 30).await;
    drop(first); // the disconnect
    let cursor = seen.last().unwrap().cursor.clone();
    let mut resumed = watch_jobs(&mut client, &selector, &[], &cursor)
        .await
        .unwrap();
    let already = succeeded(&seen).len();
    seen.extend(read_until(&mut resumed, |s| already + succeeded(s).len() == ids.len()).await);
    let all = read_until(&mut full, |s| succeeded(s).len() == ids.len()).await;

    let keys = check_order(&seen); // across the resume: versions still only rise
    let full_keys = check_order(&all);
    let logged = logged(&server.executor, &ids).await;
    assert!(
        logged.is_subset(&keys),
        "the resumed pair misses no transition"
    );
    assert!(
        logged.is_subset(&full_keys),
        "nor does the uninterrupted stream"
    );
}

/// Reports progress `updates` times as fast as it can, then succeeds.
struct Chatty {
    updates: u64,
}

#[async_trait]
impl Handler for Chatty {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Reports progress many times.".to_owned(),
            params: vec![],
            uses_input: false,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        for i in 1..=self.updates {
            ctx.progress.units(i, self.updates, "chatting");
            if i % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        Ok(json!({}))
    }
}

#[tokio::test]
async fn a_stalled_reader_gets_every_transition_with_progress_coalesced() {
    const JOBS: usize = 20;
    const UPDATES: u64 = 3000;
    let mut registry = Registry::with_builtins();
    registry.register("chatty", Chatty { updates: UPDATES });
    let server = TestServer::start_with(test_config(), registry).await;
    let mut client = server.client.clone();
    let selector = [("stall", "yes")];
    let mut stalled = watch_jobs(&mut client, &selector, &[], "").await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..JOBS {
        let mut req = request(vec![action("chatty", json!({}))]);
        req.labels = labels(&selector);
        ids.push(submit(&mut client, req).await.id);
    }
    for id in &ids {
        wait_done(&mut client, id).await; // the executor is not held up by the stalled reader
    }
    let seen = read_until(&mut stalled, |s| succeeded(s).len() == JOBS).await;
    let keys = check_order(&seen);
    let logged = logged(&server.executor, &ids).await;
    assert!(
        logged.is_subset(&keys),
        "every transition reaches the stalled reader"
    );
    let updates = JOBS as u64 * UPDATES;
    assert!(
        (seen.len() as u64) < updates / 10,
        "progress coalesced: {} messages for {updates} updates",
        seen.len()
    );
}

#[tokio::test]
async fn a_malformed_cursor_is_invalid_argument_naming_after_cursor() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    for bad in ["42", "e-1", "garbage"] {
        let status = watch_jobs(&mut client, &[], &[], bad).await.expect_err(bad);
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}");
        assert!(
            status.message().contains("after_cursor"),
            "{}",
            status.message()
        );
    }
    let status = watch_jobs(&mut client, &[], &[], "e999999")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "a cursor from the future");
}

#[tokio::test]
async fn a_cursor_from_before_a_removed_job_is_refused_not_silently_resumed() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let mut stream = watch_jobs(&mut client, &[], &[], "").await.unwrap();
    let first = submit(&mut client, request(vec![sleep(1, 1)])).await;
    let seen = read_until(&mut stream, |s| !s.is_empty()).await;
    let cursor = seen[0].cursor.clone();
    wait_done(&mut client, &first.id).await;
    client
        .delete_job(pb::DeleteJobRequest {
            job_id: first.id.clone(),
        })
        .await
        .unwrap();
    let status = watch_jobs(&mut client, &[], &[], &cursor)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(
        status.message().contains("after_cursor"),
        "{}",
        status.message()
    );
}

/// Deleting a job another stream could never have matched leaves that stream's cursor good:
/// only the history a resume would have replayed makes it expire.
#[tokio::test]
async fn deleting_a_job_outside_a_selector_leaves_its_cursors_good() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let labelled = |team: &str| {
        let mut req = request(vec![sleep(1, 1)]);
        req.labels = labels(&[("team", team)]);
        req
    };
    let mut stream = watch_jobs(&mut client, &[("team", "a")], &[], "")
        .await
        .unwrap();
    let mine = submit(&mut client, labelled("a")).await;
    let seen = read_until(&mut stream, |s| !s.is_empty()).await;
    let cursor = seen[0].cursor.clone();
    drop(stream);
    let deleter = client.clone();
    let delete = |id: String| {
        let mut client = deleter.clone();
        async move {
            client
                .delete_job(pb::DeleteJobRequest { job_id: id })
                .await
                .unwrap();
        }
    };
    let other = submit(&mut client, labelled("b")).await;
    wait_done(&mut client, &other.id).await;
    delete(other.id.clone()).await;
    let mut resumed = watch_jobs(&mut client, &[("team", "a")], &[], &cursor)
        .await
        .expect("another selector's deletion takes nothing from this stream");
    let rest = read_until(&mut resumed, |s| succeeded(s).contains(&mine.id)).await;
    assert!(rest.iter().all(|m| m.job.as_ref().unwrap().id == mine.id));
    drop(resumed);

    // This selector's own deletion does take history a resume would replay.
    wait_done(&mut client, &mine.id).await;
    delete(mine.id.clone()).await;
    let status = watch_jobs(&mut client, &[("team", "a")], &[], &cursor)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{}", status.message());
}

#[tokio::test]
async fn a_cursor_resumes_across_a_restart_with_the_sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let selector = [("restart", "yes")];
    let registry = Registry::with_builtins;
    let server =
        TestServer::start_on(open_sqlite(dir.path()).await, test_config(), registry()).await;
    let mut client = server.client.clone();
    let mut stream = watch_jobs(&mut client, &selector, &[], "").await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..5 {
        let mut req = request(vec![sleep(20, 2)]);
        req.labels = labels(&selector);
        ids.push(submit(&mut client, req).await.id);
    }
    let mut seen = read_until(&mut stream, |s| succeeded(s).len() == 1).await;
    let cursor = seen.last().unwrap().cursor.clone();
    for id in &ids {
        wait_done(&mut client, id).await;
    }
    drop(stream);
    server.stop().await;

    let server =
        TestServer::start_on(open_sqlite(dir.path()).await, test_config(), registry()).await;
    let mut client = server.client.clone();
    let mut resumed = watch_jobs(&mut client, &selector, &[], &cursor)
        .await
        .unwrap();
    seen.extend(read_until(&mut resumed, |s| succeeded(s).len() == ids.len() - 1).await);
    let keys = check_order(&seen); // nothing repeated: versions only rise across the restart
    let logged = logged(&server.executor, &ids).await;
    assert!(logged.is_subset(&keys), "nothing missed across the restart");
}

/// A stream dropped while it is still sending its first snapshots resumes from the last
/// cursor it got: the jobs the client has get their changes since, the rest their current
/// snapshots, each job once, versions only rising; then live changes as usual.
#[tokio::test]
async fn resuming_during_the_first_snapshots_sends_the_rest_of_them() {
    const JOBS: usize = 40;
    let gate = Gate::default();
    let mut config = test_config();
    config.executor.concurrency = 2;
    let server = TestServer::start_with(config, gate.registry()).await;
    let mut client = server.client.clone();
    let selector = [("burst", "yes")];
    let mut ids = Vec::new();
    for _ in 0..JOBS {
        let mut req = request(vec![gated()]);
        req.labels = labels(&selector);
        ids.push(submit(&mut client, req).await.id);
    }
    let mut first = watch_jobs(&mut client, &selector, &[], "").await.unwrap();
    let mut seen = read_until(&mut first, |s| s.len() == 10).await;
    drop(first); // the disconnect, 10 snapshots in
    let cursor = seen.last().unwrap().cursor.clone();
    assert!(
        cursor.starts_with('s'),
        "a first-snapshots cursor: {cursor}"
    );
    let known: BTreeSet<String> = seen
        .iter()
        .map(|m| m.job.as_ref().unwrap().id.clone())
        .collect();
    let unknown: Vec<&String> = ids.iter().filter(|id| !known.contains(*id)).collect();
    // Changes meanwhile: to a job the client has, and to one it has not seen yet.
    let cancelled_known = known.iter().next().unwrap().clone();
    cancel(&mut client, &cancelled_known).await;
    cancel(&mut client, unknown[0]).await;

    let mut resumed = watch_jobs(&mut client, &selector, &[], &cursor)
        .await
        .unwrap();
    let covered = |s: &[pb::WatchJobsResponse]| {
        let mut jobs: BTreeSet<&str> = known.iter().map(String::as_str).collect();
        let mut known_cancelled = false;
        for message in s {
            let job = message.job.as_ref().unwrap();
            jobs.insert(&job.id);
            known_cancelled |= job.id == cancelled_known && job.state() == JobState::Cancelled;
        }
        jobs.len() == JOBS && known_cancelled
    };
    seen.extend(read_until(&mut resumed, covered).await);
    check_order(&seen); // each job once per version, versions only rising
    let last_of = |id: &str| {
        seen.iter()
            .rev()
            .find_map(|m| m.job.as_ref().filter(|j| j.id == id))
            .unwrap()
            .clone()
    };
    assert_eq!(
        last_of(unknown[0]).state(),
        JobState::Cancelled,
        "the rest are current"
    );
    // Past the first snapshots, cursors are plain again and live changes follow.
    cancel(&mut client, unknown[1]).await;
    let live = read_until(&mut resumed, |s| {
        s.iter().any(|m| m.job.as_ref().unwrap().id == *unknown[1])
    })
    .await;
    assert!(
        live.last().unwrap().cursor.starts_with('e'),
        "{:?}",
        live.last()
    );
    gate.release(JOBS);
}

/// Reports each of `percents` in turn, waiting after each to be let go (one permit of `go`
/// per step), then succeeds.
struct Steps {
    percents: &'static [u8],
    go: std::sync::Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl Handler for Steps {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Reports progress in steps, each when let go.".to_owned(),
            params: vec![],
            uses_input: false,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        for &percent in self.percents {
            ctx.progress.percent(percent, format!("{percent} %"));
            if let Ok(permit) = self.go.acquire().await {
                permit.forget(); // one step per permit given
            }
        }
        Ok(json!({}))
    }
}

/// Progress is not logged: a resume replays the transitions the client missed, then sends the
/// progress made on top of them, at once rather than at the job's next change.
#[tokio::test]
async fn a_resume_sends_the_progress_made_since_a_missed_transition() {
    let go = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let mut registry = Registry::with_builtins();
    registry.register(
        "half",
        Steps {
            percents: &[50],
            go: go.clone(),
        },
    );
    let server = TestServer::start_with(test_config(), registry).await;
    let mut client = server.client.clone();
    let selector = [("resume", "progress")];
    let mut first = watch_jobs(&mut client, &selector, &[], "").await.unwrap();
    let mut before = request(vec![sleep(0, 1)]);
    before.labels = labels(&selector);
    submit(&mut client, before).await;
    let seen = read_until(&mut first, |s| succeeded(s).len() == 1).await;
    let cursor = seen.last().unwrap().cursor.clone();
    drop(first); // the disconnect

    let mut req = request(vec![action("half", json!({}))]);
    req.labels = labels(&selector);
    let job = submit(&mut client, req).await;
    let half = until(&mut client, &job.id, |job| {
        job.progress.as_ref().is_some_and(|p| p.percent == 50)
    })
    .await;

    let mut resumed = watch_jobs(&mut client, &selector, &[], &cursor)
        .await
        .unwrap();
    let seen = read_until(&mut resumed, |s| {
        s.last()
            .and_then(|m| m.job.as_ref())
            .is_some_and(|j| j.version == half.version)
    })
    .await;
    check_order(&seen);
    let running = seen
        .iter()
        .filter_map(|m| m.job.as_ref())
        .find(|j| state(j) == JobState::Running)
        .expect("the missed transition is replayed");
    assert!(running.version < half.version);
    go.add_permits(1);
    wait_done(&mut client, &job.id).await;
}

/// The common case of a dropped connection: a running job reports progress while the client
/// is away, with no transition. The resume sends it at once (the cursor says when the
/// client's last message was sent), and nothing the client had.
#[tokio::test]
async fn a_resume_sends_progress_reported_while_the_client_was_away() {
    let go = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let mut registry = Registry::with_builtins();
    registry.register(
        "steps",
        Steps {
            percents: &[25, 75],
            go: go.clone(),
        },
    );
    let server = TestServer::start_with(test_config(), registry).await;
    let mut client = server.client.clone();
    let selector = [("resume", "away")];
    let mut first = watch_jobs(&mut client, &selector, &[], "").await.unwrap();
    let mut req = request(vec![action("steps", json!({}))]);
    req.labels = labels(&selector);
    let job = submit(&mut client, req).await;
    let percent = |m: &pb::WatchJobsResponse| {
        m.job
            .as_ref()
            .and_then(|j| j.progress.as_ref())
            .map_or(0, |p| p.percent)
    };
    let seen = read_until(&mut first, |s| s.last().is_some_and(|m| percent(m) == 25)).await;
    let cursor = seen.last().unwrap().cursor.clone();
    drop(first); // the disconnect

    go.add_permits(1);
    let three_quarters = until(&mut client, &job.id, |job| {
        job.progress.as_ref().is_some_and(|p| p.percent == 75)
    })
    .await;
    let mut resumed = watch_jobs(&mut client, &selector, &[], &cursor)
        .await
        .unwrap();
    let resumed_with = read_until(&mut resumed, |s| !s.is_empty()).await;
    let first_after = resumed_with[0].job.as_ref().unwrap();
    assert_eq!(
        (
            first_after.version,
            first_after.progress.as_ref().map(|p| p.percent)
        ),
        (three_quarters.version, Some(75)),
        "the progress reported while away, first and at once"
    );
    go.add_permits(1);
    let rest = read_until(&mut resumed, |s| succeeded(s).len() == 1).await;
    let mut all = seen;
    all.extend(resumed_with);
    all.extend(rest);
    check_order(&all); // versions still only rise across the resume: nothing repeated
}
