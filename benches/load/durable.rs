//! The durable-store scenarios: Submit throughput, and restart with many finished jobs.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use longrun::{
    api::pb::{self, jobs_client::JobsClient},
    job::{Job, JobId, NewAction, NewJob, Progress},
    store::{SqliteOptions, SqliteStore, Store},
};

use crate::harness::{Process, Rate, bare_echo, channel, line, measure, spawn_longrun};
use tonic::transport::Channel;

pub async fn submit(requests: usize, in_flight: usize) -> anyhow::Result<()> {
    println!("== durable Submit, {requests} calls, {in_flight} in flight on one connection");
    let baseline = bare_echo(requests, in_flight).await?;
    println!("{:<44} {baseline}  ratio 1.00", "bare tonic echo");

    let dir = tempfile::tempdir()?;
    // Long sleeps keep the submitted jobs queued, so this measures Submit itself: validation,
    // the durable insert (group commit), and queueing.
    let (_server, addr) = spawn_longrun(dir.path(), &["--max-queue-length", "10000000"])?;
    let client = JobsClient::new(channel(addr).await?);
    let rate = measure(requests, in_flight, move |_| {
        let mut client = client.clone();
        async move {
            client.submit(sleep_request(3_600_000)).await?;
            Ok(())
        }
    })
    .await?;
    line(
        "longrun Submit (SQLite, synchronous=FULL) calls/s",
        rate.per_second,
        baseline.per_second,
        "calls/s",
        ">= 0.7",
    );
    println!("{:<46} {rate}", "  longrun Submit latency");
    Ok(())
}

/// The store alone, in this process: `jobs` creates with `concurrency` writers, then for each
/// job the two saves a no-op run makes (RUNNING, SUCCEEDED), then `jobs` more created already
/// started (`create_started`), then two progress saves for each of those. Reports writes/s and this process's CPU per job, so a change to
/// the SQLite schema or writer can be compared without gRPC in the way
/// (`cargo bench --bench load -- store --jobs 40000`).
pub async fn store(jobs: usize, concurrency: usize) -> anyhow::Result<()> {
    println!(
        "== SQLite store alone: {jobs} creates, then 2 saves each, then {jobs} created started, then 2 progress saves each; {concurrency} writers"
    );
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default())?);
    let made: Vec<Job> = (0..jobs).map(|_| queued_job()).collect();
    let shares = split(made, concurrency);

    phase(
        "create",
        &store,
        shares.clone(),
        |store, share| async move {
            for job in &share {
                store.create(job).await?;
            }
            Ok(())
        },
    )
    .await?;

    let before = store.stats();
    phase("run (2 saves)", &store, shares, |store, share| async move {
        let now = SystemTime::now();
        for mut job in share {
            job.start(now)?;
            store.save(&job).await?;
            job.start_action(0, now)?;
            job.succeed_action(0, serde_json::json!({"ok": true}), now)?;
            job.succeed(now)?;
            store.save(&job).await?;
        }
        Ok(())
    })
    .await?;
    let after = store.stats();
    println!(
        "  commits for the saves: {} ({:.1} saves each)",
        after.batches - before.batches,
        (after.commands - before.commands) as f64 / (after.batches - before.batches).max(1) as f64
    );

    // As many jobs again, each created already started: the one write of a Submit that finds
    // a worker free (the path every job of `e2e` and `burst` takes).
    let made: Vec<Job> = (0..jobs).map(|_| queued_job()).collect();
    let now = SystemTime::now();
    let mut running = Vec::with_capacity(made.len());
    for job in &made {
        let mut started = job.clone();
        started.start(now)?;
        started.start_action(0, now)?;
        running.push(started);
    }
    let pairs: Vec<(Job, Job)> = made.into_iter().zip(running.iter().cloned()).collect();
    phase(
        "create started",
        &store,
        split(pairs, concurrency),
        |store, share| async move {
            for (job, started) in share {
                store.create_started(&job, &started).await?;
            }
            Ok(())
        },
    )
    .await?;

    // Then two progress reports saved for each of those running jobs: the write a handler's
    // progress costs once per `progress_persist_interval`.
    phase(
        "progress (2)",
        &store,
        split(running, concurrency),
        |store, share| async move {
            let now = SystemTime::now();
            for mut job in share {
                for step in 1..=2 {
                    job.report_progress(0, Progress::of(step, 2, "bench"), now);
                    store.save(&job).await?;
                }
            }
            Ok(())
        },
    )
    .await?;
    store.close().await;
    Ok(())
}

/// Runs `work` on each share of jobs in its own task, all at once, and reports the phase's
/// jobs/s and CPU per job under `what`.
async fn phase<T, F, Fut>(
    what: &str,
    store: &Arc<SqliteStore>,
    shares: Vec<Vec<T>>,
    work: F,
) -> anyhow::Result<()>
where
    F: Fn(Arc<SqliteStore>, Vec<T>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let jobs = shares.iter().map(Vec::len).sum();
    let (cpu, started) = (crate::harness::own_cpu(), Instant::now());
    let tasks: Vec<_> = shares
        .into_iter()
        .map(|share| tokio::spawn(work(Arc::clone(store), share)))
        .collect();
    for task in tasks {
        task.await??;
    }
    report(
        what,
        jobs,
        started.elapsed(),
        crate::harness::own_cpu() - cpu,
        store,
    );
    Ok(())
}

fn report(what: &str, jobs: usize, took: Duration, cpu: Duration, store: &SqliteStore) {
    let stats = store.stats();
    println!(
        "{what:<16} {:>9.0} jobs/s  cpu {:>6.1} us/job  ({} commits so far, {} commands)",
        jobs as f64 / took.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / jobs as f64,
        stats.batches,
        stats.commands,
    );
}

fn split<T: Clone>(items: Vec<T>, parts: usize) -> Vec<Vec<T>> {
    let mut shares = vec![Vec::new(); parts.max(1)];
    for (i, item) in items.into_iter().enumerate() {
        shares[i % parts.max(1)].push(item);
    }
    shares
}

/// A queued one-action job like the benchmark's Submit makes.
fn queued_job() -> Job {
    let spec = NewJob {
        actions: vec![NewAction {
            name: "sleep".to_owned(),
            params: [("duration_ms".to_owned(), serde_json::json!(3_600_000.0))]
                .into_iter()
                .collect(),
            input: Default::default(),
        }],
        ..NewJob::default()
    };
    Job::new(JobId::generate(), spec, 1, SystemTime::now())
}

fn sleep_request(duration_ms: u64) -> pb::SubmitRequest {
    let params = prost_types::Struct {
        fields: [(
            "duration_ms".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(duration_ms as f64)),
            },
        )]
        .into_iter()
        .collect(),
    };
    pb::SubmitRequest {
        actions: vec![pb::ActionSpec {
            name: "sleep".to_owned(),
            params: Some(params),
            input: Default::default(),
        }],
        ..Default::default()
    }
}

/// Writes `count` finished jobs straight into a SQLite store, many at a time so group commit
/// batches them.
async fn seed_finished_jobs(dir: &Path, count: usize) -> anyhow::Result<Vec<JobId>> {
    let store = Arc::new(SqliteStore::open(dir, SqliteOptions::default())?);
    let writers = 256;
    let mut tasks = Vec::new();
    for worker in 0..writers {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut n = worker;
            while n < count {
                let job = finished_job();
                store.create(&job).await?;
                ids.push(job.id);
                n += writers;
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = Vec::with_capacity(count);
    for task in tasks {
        ids.extend(task.await??);
    }
    store.close().await;
    Ok(ids)
}

fn finished_job() -> Job {
    let now = SystemTime::now();
    let spec = NewJob {
        actions: vec![NewAction {
            name: "echo".to_owned(),
            params: serde_json::Map::new(),
            input: Default::default(),
        }],
        ..NewJob::default()
    };
    let mut job = Job::new(JobId::generate(), spec, 1, now);
    let steps = [
        job.start(now),
        job.start_action(0, now),
        job.succeed_action(0, serde_json::json!({"ok": true}), now),
        job.succeed(now),
    ];
    for step in steps {
        step.expect("a fresh job runs through its states");
    }
    job
}

/// Starts a server on `dir`; returns it, a client, and how long until it answered a GetStatus
/// (for `ready_job`, when given: until it finds that job).
async fn start(
    dir: &Path,
    ready_job: Option<JobId>,
) -> anyhow::Result<(Process, JobsClient<Channel>, Duration)> {
    let started = Instant::now();
    let (server, addr) = spawn_longrun(dir, &[])?;
    let mut client = JobsClient::new(channel(addr).await?);
    let job_id = ready_job.map(|id| id.to_string()).unwrap_or_default();
    loop {
        let answered = client
            .get_status(pb::GetStatusRequest {
                job_id: job_id.clone(),
            })
            .await;
        if answered.is_ok() || ready_job.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((server, client, started.elapsed()))
}

/// GetStatus latencies for `ids`, 64 in flight.
async fn probe(client: JobsClient<Channel>, ids: &[JobId]) -> anyhow::Result<Rate> {
    let ids: Arc<Vec<String>> = Arc::new(ids.iter().map(ToString::to_string).collect());
    measure(20_000, 64, move |n| {
        let mut client = client.clone();
        let id = ids[n.wrapping_mul(7919) % ids.len()].clone();
        async move {
            client
                .get_status(pb::GetStatusRequest { job_id: id })
                .await?;
            Ok(())
        }
    })
    .await
}

pub async fn restart(jobs: usize) -> anyhow::Result<()> {
    println!("== restart with {jobs} finished jobs stored");
    let seeded = Instant::now();
    let full = tempfile::tempdir()?;
    let ids = seed_finished_jobs(full.path(), jobs).await?;
    let db_size = std::fs::metadata(full.path().join("longrun.db"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "seeded {jobs} jobs in {:.1} s ({:.0} jobs/s), database {} MiB",
        seeded.elapsed().as_secs_f64(),
        jobs as f64 / seeded.elapsed().as_secs_f64(),
        db_size / (1024 * 1024)
    );

    // The baseline holds a few finished jobs and is probed for them, so both sides answer
    // the same call (a found job, decoded and converted); an empty store would answer
    // NOT_FOUND, which is cheaper work and flatters the baseline.
    let few = SMALL_STORE.min(jobs);
    let small = tempfile::tempdir()?;
    let small_ids = seed_finished_jobs(small.path(), few).await?;
    let (small_server, client, small_ready) =
        start(small.path(), small_ids.first().copied()).await?;
    let small_rate = probe(client, &small_ids).await?;
    let small_rss = small_server.rss_kib();
    drop(small_server);

    let empty = tempfile::tempdir()?;
    let (empty_server, _, empty_ready) = start(empty.path(), None).await?;
    let empty_rss = empty_server.rss_kib();
    drop(empty_server);

    let (full_server, client, full_ready) = start(full.path(), ids.first().copied()).await?;
    let full_rate = probe(client, &ids).await?;
    let full_rss = full_server.rss_kib();
    drop(full_server);

    let report = |label: String, ready: Duration, rss: u64, rate: Option<&Rate>| {
        let rate = rate.map_or_else(|| "-".to_owned(), |r| r.to_string());
        println!(
            "{label:<44} ready in {:>7.1} ms  RSS {rss:>7} KiB  GetStatus {rate}",
            ready.as_secs_f64() * 1e3,
        );
    };
    report("empty store".to_owned(), empty_ready, empty_rss, None);
    report(
        format!("{few} finished jobs"),
        small_ready,
        small_rss,
        Some(&small_rate),
    );
    report(
        format!("{jobs} finished jobs"),
        full_ready,
        full_rss,
        Some(&full_rate),
    );
    println!(
        "vs {few} finished jobs: memory ratio {:.2}, GetStatus p99 ratio {:.2} (each probed for its own jobs)",
        full_rss as f64 / small_rss.max(1) as f64,
        full_rate.latency.p99.as_secs_f64() / small_rate.latency.p99.as_secs_f64()
    );
    Ok(())
}

/// Finished jobs in the store `restart` compares the large one with.
const SMALL_STORE: usize = 1_000;
