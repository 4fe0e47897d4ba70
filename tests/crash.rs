//! Invariant 1: nothing acknowledged is lost. Runs the real `longrun` binary on the SQLite store,
//! submits jobs from several concurrent clients, kills the server with SIGKILL at random
//! moments, restarts it on the same data directory, and checks every acknowledged job: present
//! once, in a state it really passed through, with versions that never went backwards, and
//! finished in the end. `LONGRUN_CRASH_CYCLES` sets the number of kill cycles (default 3).

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{PATIENCE, Spawned, connect, free_addr, request, sleep, spawn_serve};
use longrun::{
    api::pb::{self, JobState},
    job,
};
use tokio_stream::StreamExt;

/// What the clients were told: per acknowledged job, its idempotency key and the highest
/// version any answer or watch showed.
static START: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

type Acked = Arc<Mutex<HashMap<String, (String, i64)>>>;

fn spawn_server(dir: &Path, addr: SocketAddr) -> Spawned {
    spawn_serve(dir, addr, &["--concurrency".as_ref(), "8".as_ref()])
}

fn record(acked: &Acked, job: &pb::Job, key: Option<&str>) {
    let mut acked = acked.lock().unwrap();
    let entry = acked
        .entry(job.id.clone())
        .or_insert_with(|| (key.unwrap_or_default().to_owned(), 0));
    entry.1 = entry.1.max(job.version);
}

/// Jobs each client submits per cycle at most, so the test's work is bounded.
const SUBMITS_PER_CLIENT: u64 = 60;

/// Submits jobs until the server goes away (or the bound); records each acknowledged one.
async fn submitter(addr: SocketAddr, acked: Acked, worker: usize, cycle: usize) {
    let mut client = connect(addr).await;
    for n in 0..SUBMITS_PER_CLIENT {
        let key = format!("c{cycle}-w{worker}-n{n}");
        let mut req = request(vec![sleep(10 + (n % 5) * 10, 4)]);
        req.idempotency_key = key.clone();
        // Every kill may interrupt it; after a crash a job runs again only with an attempt left.
        req.max_attempts = 100;
        // Some are scheduled a little ahead: kills and restarts must keep them waiting.
        if n % 4 == 3 {
            let ahead = Duration::from_millis(300 + (n % 3) * 400);
            req.schedule_time = Some((std::time::SystemTime::now() + ahead).into());
        }
        match client.submit(req).await {
            Ok(response) => record(&acked, &response.into_inner().job.unwrap(), Some(&key)),
            Err(_) => return,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Watches acknowledged jobs and records the versions pushed to it, until the server goes
/// away.
async fn watcher(addr: SocketAddr, acked: Acked) {
    let mut client = connect(addr).await;
    let give_up = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < give_up {
        let ids: Vec<String> = acked.lock().unwrap().keys().take(8).cloned().collect();
        if ids.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        for id in ids {
            let request = pb::WatchJobRequest {
                job_id: id,
                after_version: 0,
            };
            let Ok(response) = client.watch_job(request).await else {
                return;
            };
            let mut stream = response.into_inner();
            while let Some(Ok(message)) = stream.next().await {
                record(&acked, &message.job.unwrap(), None);
            }
        }
    }
}

fn domain_state(job: &pb::Job) -> job::JobState {
    match JobState::try_from(job.state).unwrap() {
        JobState::Queued => job::JobState::Queued,
        JobState::Running => job::JobState::Running,
        JobState::Succeeded => job::JobState::Succeeded,
        JobState::Failed => job::JobState::Failed,
        JobState::Cancelled => job::JobState::Cancelled,
        JobState::Unspecified => panic!("unspecified state in {}", job.id),
    }
}

async fn wait_until_serving(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "server never came up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_jobs_survive_kill_9_and_finish() {
    let cycles: usize = std::env::var("LONGRUN_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().expect("temp dir");
    eprintln!("{:?} start", START.elapsed());
    let acked: Acked = Arc::default();

    for cycle in 0..cycles {
        let addr = free_addr();
        let mut server = spawn_server(dir.path(), addr);
        wait_until_serving(addr).await;
        let mut tasks = Vec::new();
        for worker in 0..4 {
            tasks.push(tokio::spawn(submitter(
                addr,
                Arc::clone(&acked),
                worker,
                cycle,
            )));
        }
        tasks.push(tokio::spawn(watcher(addr, Arc::clone(&acked))));
        let run_for = Duration::from_millis(200 + rand::random::<u64>() % 600);
        tokio::time::sleep(run_for).await;
        eprintln!(
            "{:?} cycle {cycle}: killing after {run_for:?}, {} acked",
            START.elapsed(),
            acked.lock().unwrap().len()
        );
        server.kill().expect("SIGKILL the server");
        server.wait().expect("reap the server");
        for task in tasks {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("clients notice the crash")
                .expect("client task");
        }
    }

    eprintln!("{:?} cycles done", START.elapsed());
    let seen_before_restart = acked.lock().unwrap().clone();
    assert!(
        !seen_before_restart.is_empty(),
        "some submits were acknowledged"
    );

    let addr = free_addr();
    let mut server = spawn_server(dir.path(), addr);
    wait_until_serving(addr).await;
    let mut client = connect(addr).await;

    let mut listed = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_jobs(pb::ListJobsRequest {
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        listed.extend(page.jobs);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let mut keys: Vec<&str> = listed.iter().map(|j| j.idempotency_key.as_str()).collect();
    keys.sort_unstable();
    let before_dedup = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), before_dedup, "no job is stored twice");

    let mut scheduled_checked = 0;
    for (id, (key, seen_version)) in &seen_before_restart {
        let history = tokio::time::timeout(PATIENCE, async {
            let mut stream = client
                .watch_job(pb::WatchJobRequest {
                    job_id: id.clone(),
                    after_version: 0,
                })
                .await
                .unwrap_or_else(|status| panic!("acknowledged job {id} is missing: {status}"))
                .into_inner();
            let mut history = Vec::new();
            while let Some(message) = stream.next().await {
                history.push(message.expect("watch message").job.unwrap());
            }
            history
        })
        .await
        .expect("every recovered job finishes");
        let last = history.last().expect("at least the final snapshot");
        assert_eq!(&last.idempotency_key, key);
        assert_eq!(
            JobState::try_from(last.state).unwrap(),
            JobState::Succeeded,
            "job {id} finished after recovery"
        );
        assert!(
            last.version >= *seen_version,
            "job {id}: version went back from {seen_version} to {}",
            last.version
        );
        if last.schedule_time.is_some() {
            scheduled_checked += 1;
        }

        // The logged history must be a legal walk through the state machine.
        let replay = {
            let mut stream = client
                .watch_job(pb::WatchJobRequest {
                    job_id: id.clone(),
                    after_version: 1,
                })
                .await
                .expect("replay")
                .into_inner();
            let mut states = vec![job::JobState::Queued];
            let mut last_version = 1;
            while let Some(message) = stream.next().await {
                let job = message.expect("replay message").job.unwrap();
                assert!(job.version > last_version, "versions rise in the log");
                // Every run, also one a kill interrupted, started no earlier than its time.
                if let (Some(due), Some(started)) = (job.schedule_time, job.start_time) {
                    assert!(
                        std::time::SystemTime::try_from(started).unwrap()
                            >= std::time::SystemTime::try_from(due).unwrap(),
                        "job {id} started before its schedule: {job:?}"
                    );
                }
                last_version = job.version;
                states.push(domain_state(&job));
            }
            states
        };
        for pair in replay.windows(2) {
            if pair[0] != pair[1] {
                pair[0]
                    .transition(pair[1])
                    .unwrap_or_else(|e| panic!("job {id}: {e} in {replay:?}"));
            }
        }
    }

    assert!(
        scheduled_checked > 0,
        "some scheduled jobs were acknowledged"
    );
    eprintln!(
        "{:?} checked ({scheduled_checked} of them scheduled)",
        START.elapsed()
    );
    server.kill().expect("stop the server");
    server.wait().expect("reap");
}

/// `longrun submit --wait` whose server dies mid-wait (SIGKILL, so no answer at all) sends the
/// Submit again once the server is back, under the idempotency key it gave the request: it
/// ends with the one job it submitted, run to its end, not with an error that leaves a script
/// without the job's id, nor with a second job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_finds_its_job_again_after_the_server_is_killed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = free_addr();
    let mut server = spawn_server(dir.path(), addr);
    wait_until_serving(addr).await;
    let cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_longrun"))
        .args(["submit", "--addr", &format!("http://{addr}")])
        .args(["--action", r#"sleep:{"duration_ms":1500,"steps":3}"#])
        .args(["--max-attempts", "2", "--wait", "60s", "--output", "json"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start longrun submit");
    let mut client = connect(addr).await;
    tokio::time::timeout(PATIENCE, async {
        loop {
            let running = client
                .list_jobs(pb::ListJobsRequest {
                    states: vec![JobState::Running as i32],
                    ..Default::default()
                })
                .await
                .expect("list")
                .into_inner();
            if !running.jobs.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the job runs");
    server.kill().expect("SIGKILL the server");
    server.wait().expect("reap the server");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _server = spawn_server(dir.path(), addr);

    let output = tokio::time::timeout(PATIENCE, cli.wait_with_output())
        .await
        .expect("submit ends")
        .expect("submit output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("submitting again under the same idempotency key"),
        "{stderr}"
    );
    let response: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
    assert_eq!(response["job"]["state"], "JOB_STATE_SUCCEEDED", "{stdout}");
    assert_eq!(response["job"]["attempt"], 2, "the crash cost an attempt");
    let mut client = connect(addr).await;
    let jobs = client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 1, "one job: {jobs:?}");
    assert_eq!(jobs[0].id, response["job"]["id"].as_str().unwrap());
}
