//! Several replicas on one PostgreSQL database (issue #8): three servers in this process, each
//! over its own `PostgresStore` on one schema, talked to through real clients on loopback ports.
//! Every job runs exactly once, watchers on any replica see every job's states, a cancel on one
//! replica stops the job on another, the jobs of a replica that stops abruptly finish elsewhere,
//! and a lost LISTEN connection costs a watcher nothing.
//!
//! Runs only when `LONGRUN_TEST_DATABASE_URL` is set (`.ci/run` sets it); each test works in a
//! schema of its own, dropped when it ends.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::postgres::{TestSchema, database_url, run_sql};
use common::{
    Gate, PATIENCE, TestServer, cancel, gated, next_until, open_watch, request, sleep, submit,
    test_config,
};
use longrun::{
    actions::{ActionContext, ActionDescription, Handler, HandlerError, Registry},
    api::pb,
    store::{PostgresOptions, PostgresStore, Store},
};
use tokio_stream::StreamExt;

/// Short, so that a stopped replica's jobs move on quickly.
const LEASE: Duration = Duration::from_secs(1);

/// A replica's store on the test schema, with the short lease.
async fn open_store(url: &str) -> Arc<PostgresStore> {
    let options = PostgresOptions {
        lease: LEASE,
        read_connections: 4,
        ..PostgresOptions::default()
    };
    Arc::new(PostgresStore::open(url, options).await.expect("open store"))
}

/// A replica: a server over its own store.
async fn replica(url: &str, registry: Registry) -> (TestServer, Arc<PostgresStore>) {
    replica_with(url, registry, test_config()).await
}

/// A replica with `config`, its lease and concurrency set as [`replica`]'s.
async fn replica_with(
    url: &str,
    registry: Registry,
    mut config: longrun::config::Config,
) -> (TestServer, Arc<PostgresStore>) {
    let store = open_store(url).await;
    config.lease = LEASE;
    config.executor.concurrency = 4;
    let server = TestServer::start_on(Arc::clone(&store) as Arc<dyn Store>, config, registry).await;
    (server, store)
}

/// `request` with `attempts` attempts.
fn with_attempts(mut request: pb::SubmitRequest, attempts: i32) -> pb::SubmitRequest {
    request.max_attempts = attempts;
    request
}

/// A test action (`count`) that records which replica ran which job, then succeeds.
#[derive(Clone)]
struct Count {
    replica: usize,
    runs: Arc<Mutex<HashMap<String, Vec<usize>>>>,
}

#[async_trait::async_trait]
impl Handler for Count {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Test action: counts its runs.".to_owned(),
            params: Vec::new(),
            uses_input: false,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<serde_json::Value, HandlerError> {
        self.runs
            .lock()
            .expect("runs")
            .entry(ctx.job_id.to_string())
            .or_default()
            .push(self.replica);
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(serde_json::json!({}))
    }
}

/// Reads a watch to the job's end; returns the states seen, checking that versions rise.
async fn states_to_end(stream: &mut tonic::Streaming<pb::WatchJobResponse>) -> Vec<pb::JobState> {
    let mut states: Vec<pb::JobState> = Vec::new();
    let mut version = 0;
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = stream.next().await {
            let job = message.expect("stream message").job.expect("job");
            assert!(
                job.version > version,
                "versions rise: {} after {version}",
                job.version
            );
            version = job.version;
            if states.last() != Some(&job.state()) {
                states.push(job.state());
            }
            if matches!(
                job.state(),
                pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled
            ) {
                return;
            }
        }
        panic!("the watch ended before the job did");
    })
    .await
    .expect("the job ends in time");
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_job_runs_exactly_once_and_any_replica_watches_every_job() {
    // WatchJob on another replica than the submitter, and WatchJobs on the first replica, see
    // every transition of every job, wherever it ran, in order.
    let Some(base_url) = database_url() else {
        return;
    };
    let schema = TestSchema::create(&base_url);
    let url = schema.url();
    let runs = Arc::new(Mutex::new(HashMap::new()));
    let mut replicas = Vec::new();
    for index in 0..3 {
        let mut registry = Registry::with_builtins();
        registry.register(
            "count",
            Count {
                replica: index,
                runs: Arc::clone(&runs),
            },
        );
        replicas.push(replica(&url, registry).await);
    }

    const JOBS: usize = 60;
    let mut clients = Vec::new();
    for (server, _) in &replicas {
        clients.push(server.client().await);
    }
    // A WatchJobs stream on the first replica, opened before any job exists: it must see every
    // job, wherever it runs.
    let mut all_jobs = clients[0]
        .watch_jobs(pb::WatchJobsRequest::default())
        .await
        .expect("watch jobs")
        .into_inner();
    let mut watches = Vec::new();
    for n in 0..JOBS {
        let job = submit(
            &mut clients[n % 3],
            request(vec![common::action("count", serde_json::json!({}))]),
        )
        .await;
        // Watched on another replica than the one it was submitted to, resuming after the
        // submitted version: every later transition must come, from the log or the feed.
        let stream = open_watch(&mut clients[(n + 1) % 3], &job.id, job.version).await;
        watches.push((job.id, stream));
    }
    for (id, stream) in &mut watches {
        let states = states_to_end(stream).await;
        assert_eq!(
            states,
            [pb::JobState::Running, pb::JobState::Succeeded],
            "job {id}"
        );
    }
    let mut seen: HashMap<String, (i64, Vec<pb::JobState>)> = HashMap::new();
    tokio::time::timeout(PATIENCE, async {
        while seen
            .values()
            .filter(|(_, states)| states.last() == Some(&pb::JobState::Succeeded))
            .count()
            < JOBS
        {
            let message = all_jobs
                .next()
                .await
                .expect("stream open")
                .expect("message");
            // No mark of this replica's clock: other replicas' snapshots reach its hub late,
            // so a mark could not tell what the client was sent.
            assert!(!message.cursor.contains('~'), "{}", message.cursor);
            let job = message.job.expect("job");
            let (version, states) = seen.entry(job.id.clone()).or_default();
            assert!(job.version > *version, "versions rise for {}", job.id);
            *version = job.version;
            if states.last() != Some(&job.state()) {
                states.push(job.state());
            }
        }
    })
    .await
    .expect("WatchJobs sees every job end in time");
    for (id, (_, states)) in &seen {
        assert_eq!(
            states,
            &[
                pb::JobState::Queued,
                pb::JobState::Running,
                pb::JobState::Succeeded
            ],
            "WatchJobs on the first replica, job {id}"
        );
    }
    let runs = runs.lock().expect("runs").clone();
    assert_eq!(runs.len(), JOBS, "every job ran");
    for (id, ran_on) in &runs {
        assert_eq!(ran_on.len(), 1, "job {id} ran once, not on {ran_on:?}");
    }
    for (server, store) in replicas {
        server.stop().await;
        store.close().await;
    }
}

/// The index of the gate (replica) on which the next gated run starts, with the job's id.
async fn next_start(gates: &[Gate]) -> (usize, String) {
    let starts = gates
        .iter()
        .enumerate()
        .map(|(index, gate)| Box::pin(async move { (index, gate.next_started().await) }));
    futures::future::select_all(starts).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_on_one_replica_stops_the_job_on_another() {
    let Some(base_url) = database_url() else {
        return;
    };
    let schema = TestSchema::create(&base_url);
    let url = schema.url();
    let gates: Vec<Gate> = (0..3).map(|_| Gate::default()).collect();
    let mut replicas = Vec::new();
    for gate in &gates {
        replicas.push(replica(&url, gate.registry()).await);
    }
    let mut client = replicas[0].0.client().await;
    let job = submit(&mut client, request(vec![gated()])).await;
    let (runner, started) = next_start(&gates).await;
    assert_eq!(started, job.id);

    let other = (runner + 1) % 3;
    let mut canceller = replicas[other].0.client().await;
    let mut watch = open_watch(&mut canceller, &job.id, 0).await;
    let answer = cancel(&mut canceller, &job.id).await;
    assert!(
        answer.state() == pb::JobState::Cancelled || answer.cancel_requested,
        "the answer shows the stored request: {answer:?}"
    );
    let ended = next_until(&mut watch, |job| job.state() == pb::JobState::Cancelled).await;
    assert_eq!(ended.state(), pb::JobState::Cancelled);
    // The runner's handler saw its token and returned (it is not merely abandoned).
    gates[runner].until_idle().await;
    for (server, store) in replicas {
        server.stop().await;
        store.close().await;
    }
}

/// A replica on a runtime of its own, so that it can be stopped abruptly: dropping the runtime
/// ends all its tasks where they stand, without any shutdown, like `kill -9`.
struct Doomed {
    addr: std::net::SocketAddr,
    kill: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Doomed {
    fn start(url: &str, registry: Registry) -> Doomed {
        let url = url.to_owned();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (kill, killed) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let server = runtime.block_on(async { replica(&url, registry).await });
            addr_tx.send(server.0.addr).expect("send addr");
            let _ = killed.recv();
            // Nothing of the server may run its shutdown: forget it, then drop every task.
            std::mem::forget(server);
            runtime.shutdown_background();
        });
        let addr = addr_rx.recv_timeout(PATIENCE).expect("the replica starts");
        Doomed { addr, kill, thread }
    }

    fn kill(self) {
        let _ = self.kill.send(());
        self.thread.join().expect("the replica's thread");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_jobs_of_a_replica_stopped_abruptly_finish_on_another() {
    let Some(base_url) = database_url() else {
        return;
    };
    let schema = TestSchema::create(&base_url);
    let url = schema.url();
    let doomed_gate = Gate::default();
    let doomed = Doomed::start(&url, doomed_gate.registry());
    let mut client = common::connect(doomed.addr).await;
    // An attempt to spare: the replica that takes it over runs it again.
    let job = submit(&mut client, with_attempts(request(vec![gated()]), 2)).await;
    assert_eq!(doomed_gate.next_started().await, job.id);
    drop(client);

    // The survivor starts only now, so the job surely ran on the doomed replica first.
    let gate = Gate::default();
    let (survivor, store) = replica(&url, gate.registry()).await;
    doomed.kill();
    let mut client = survivor.client().await;
    let mut watch = open_watch(&mut client, &job.id, 0).await;
    // After the lease runs out, the survivor re-queues the job and runs it (attempt 2).
    assert_eq!(gate.next_started().await, job.id);
    gate.release(1);
    let done = next_until(&mut watch, |job| job.state() == pb::JobState::Succeeded).await;
    assert_eq!(done.attempt, 2);
    survivor.stop().await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_sees_every_state_when_its_replica_loses_the_listen_connection() {
    let Some(base_url) = database_url() else {
        return;
    };
    let schema = TestSchema::create(&base_url);
    let url = schema.url();
    let gates: Vec<Gate> = (0..2).map(|_| Gate::default()).collect();
    let mut replicas = Vec::new();
    for gate in &gates {
        replicas.push(replica(&url, gate.registry()).await);
    }
    let mut client = replicas[0].0.client().await;
    let job = submit(&mut client, request(vec![gated()])).await;
    let (running_on, started) = next_start(&gates).await;
    assert_eq!(started, job.id);
    // The other replica watches: it learns of every state from its feed.
    let (watcher, watcher_store) = &replicas[1 - running_on];
    let mut client = watcher.client().await;
    let mut watch = open_watch(&mut client, &job.id, 0).await;
    next_until(&mut watch, |job| job.state() == pb::JobState::Running).await;
    let application = format!("longrun-feed-{}", watcher_store.replica_id());
    run_sql(
        &base_url,
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = '{application}'"
        ),
    )
    .expect("terminate the feed's connection");
    // Finishes while the watcher's feed is (probably) still reconnecting.
    gates[running_on].release(1);
    let done = next_until(&mut watch, |job| job.state() == pb::JobState::Succeeded).await;
    assert_eq!(done.state(), pb::JobState::Succeeded);
    for (server, store) in replicas {
        server.stop().await;
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_lost_a_job_stops_its_handler_while_another_runs_it() {
    let Some(base_url) = database_url() else {
        return;
    };
    let schema = TestSchema::create(&base_url);
    let url = schema.url();
    let gates: Vec<Gate> = (0..2).map(|_| Gate::default()).collect();
    let mut replicas = Vec::new();
    for gate in &gates {
        replicas.push(replica(&url, gate.registry()).await);
    }
    let mut client = replicas[0].0.client().await;
    // An attempt to spare: the replica that takes it over runs it again.
    let job = submit(&mut client, with_attempts(request(vec![gated()]), 2)).await;
    let (runner, started) = next_start(&gates).await;
    assert_eq!(started, job.id);

    // As if the runner had been cut off for longer than its lease: its lease is gone (owned by
    // nobody alive, run out), so a reaper re-queues the job while the runner still runs it.
    run_sql(
        &base_url,
        &format!(
            "UPDATE {}.jobs SET lease_owner = '{}', lease_until = 0 WHERE id = '{}'",
            schema.name,
            uuid::Uuid::now_v7(),
            job.id
        ),
    )
    .expect("take the lease away");
    // The runner notices at its next renewal and stops its handler.
    gates[runner].until_idle().await;
    // The job runs again (attempt 2), here or there, and ends once.
    let (_, again) = next_start(&gates).await;
    assert_eq!(again, job.id);
    gates[0].release(1);
    gates[1].release(1);
    let mut watch = open_watch(&mut client, &job.id, 0).await;
    let done = next_until(&mut watch, |job| job.state() == pb::JobState::Succeeded).await;
    assert_eq!(done.attempt, 2);
    for (server, store) in replicas {
        server.stop().await;
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_whose_notification_was_missed_still_stops_the_job() {
    let Some(base_url) = database_url() else {
        return;
    };
    let schema = TestSchema::create(&base_url);
    let url = schema.url();
    let gate = Gate::default();
    let (server, store) = replica(&url, gate.registry()).await;
    let mut client = server.client().await;
    let job = submit(&mut client, request(vec![gated()])).await;
    assert_eq!(gate.next_started().await, job.id);
    let mut watch = open_watch(&mut client, &job.id, 0).await;
    // The mark a Cancel on another replica leaves, without its notification (as if the
    // runner's LISTEN connection was down then): the runner finds it at its next renewal.
    run_sql(
        &base_url,
        &format!(
            "UPDATE {}.jobs SET cancel_requested = true WHERE id = '{}'",
            schema.name, job.id
        ),
    )
    .expect("mark the job");
    let ended = next_until(&mut watch, |job| job.state() == pb::JobState::Cancelled).await;
    assert_eq!(ended.state(), pb::JobState::Cancelled);
    gate.until_idle().await;
    server.stop().await;
    store.close().await;
}

/// Reads a watch to the job's end; returns the progress percents of its RUNNING messages.
async fn running_percents(stream: &mut tonic::Streaming<pb::WatchJobResponse>) -> Vec<i32> {
    let mut percents = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = stream.next().await {
            let job = message.expect("stream message").job.expect("job");
            if job.state() == pb::JobState::Running {
                percents.push(job.progress.map_or(0, |p| p.percent));
            }
        }
    })
    .await
    .expect("the job ends in time");
    percents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn progress_of_a_job_reaches_watchers_on_every_replica() {
    let Some(base_url) = database_url() else {
        return;
    };
    let schema = TestSchema::create(&base_url);
    let url = schema.url();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas.push(replica(&url, Registry::with_builtins()).await);
    }
    let mut first = replicas[0].0.client().await;
    let mut second = replicas[1].0.client().await;
    // Progress is written at most about once a second per job: a 2.5 s job is written
    // mid-run at least once, wherever it runs.
    let job = submit(&mut first, request(vec![sleep(2_500, 10)])).await;
    let mut watches = [
        open_watch(&mut first, &job.id, 0).await,
        open_watch(&mut second, &job.id, 0).await,
    ];
    for (index, watch) in watches.iter_mut().enumerate() {
        let percents = running_percents(watch).await;
        assert!(
            percents.iter().any(|p| *p > 0 && *p < 100),
            "the watcher on replica {index} saw no progress mid-run: {percents:?}"
        );
    }
    for (server, store) in replicas {
        server.stop().await;
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_resumes_on_a_replica_that_has_not_read_the_progress_it_saw() {
    // A watcher on the replica running a job sees progress versions long before they are
    // stored; when its connection moves to another replica (a load balancer), it resumes from
    // a version that replica does not know yet. The resume goes on from there, on either one.
    let Some(base_url) = database_url() else {
        return;
    };
    let schema = TestSchema::create(&base_url);
    let url = schema.url();
    let mut config = test_config();
    config.executor.progress_persist_interval = Some(Duration::from_secs(3600));
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas.push(replica_with(&url, Registry::with_builtins(), config.clone()).await);
    }
    let mut clients = [replicas[0].0.client().await, replicas[1].0.client().await];
    let job = submit(&mut clients[0], request(vec![sleep(3_000, 100)])).await;
    let [first, second] = &mut clients;
    let mut watches = [
        open_watch(first, &job.id, 0).await,
        open_watch(second, &job.id, 0).await,
    ];
    // Only the replica running the job pushes progress before it is stored.
    let seen = tokio::time::timeout(PATIENCE, async {
        let [one, other] = &mut watches;
        loop {
            let message = tokio::select! {
                message = one.next() => message,
                message = other.next() => message,
            };
            let job = message.expect("open").expect("message").job.expect("job");
            if job.progress.is_some_and(|p| p.percent >= 10) {
                return job.version;
            }
        }
    })
    .await
    .expect("progress is pushed");

    let mut resumed = Vec::new();
    for client in &mut clients {
        resumed.push(open_watch(client, &job.id, seen).await);
    }
    for (index, stream) in resumed.iter_mut().enumerate() {
        let first = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("a message in time")
            .expect("open")
            .unwrap_or_else(|status| panic!("replica {index} refused the resume: {status:?}"))
            .job
            .expect("job");
        assert!(
            first.version > seen,
            "replica {index}: {} after {seen}",
            first.version
        );
        let states = if first.state() == pb::JobState::Succeeded {
            vec![first.state()]
        } else {
            states_to_end(stream).await
        };
        assert_eq!(
            states.last(),
            Some(&pb::JobState::Succeeded),
            "replica {index}: {states:?}"
        );
    }
    for (server, store) in replicas {
        server.stop().await;
        store.close().await;
    }
}
