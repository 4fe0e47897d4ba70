//! The benchmark harness: runs a bare tonic echo service beside longrun in the same run and
//! reports every figure with its ratio to that baseline (absolute numbers on shared 2-core
//! machines drift; ratios within one run do not).
//!
//! ```text
//! cargo bench --bench load -- submit  [--requests 20000] [--in-flight 64]
//! cargo bench --bench load -- restart [--jobs 1000000]
//! cargo bench --bench load -- all
//! ```
//! Both servers run as separate processes (the real `longrun` binary, and this harness
//! re-executed as the echo server); the load comes from this process over loopback.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use clap::{Parser, Subcommand};
use longrun::{
    api::pb::{self, jobs_client::JobsClient},
    job::{Job, JobId, NewAction, NewJob},
    store::{SqliteOptions, SqliteStore, Store},
};
use tonic::transport::Channel;

mod echo {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("bench.v1");
}

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Durable Submit throughput, calls in flight on one connection, vs bare echo.
    Submit {
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
    },
    /// Restart time, memory and GetStatus latency with many finished jobs stored.
    Restart {
        #[arg(long, default_value_t = 1_000_000)]
        jobs: usize,
    },
    /// Every scenario with its defaults.
    All,
    /// Internal: serve the bare echo service.
    ServeEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench` to harness-less benchmarks.
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    match args.scenario {
        Scenario::Submit {
            requests,
            in_flight,
        } => submit(requests, in_flight).await,
        Scenario::Restart { jobs } => restart(jobs).await,
        Scenario::All => {
            submit(20_000, 64).await?;
            restart(1_000_000).await
        }
        Scenario::ServeEcho { listen } => serve_echo(listen).await,
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

fn spawn_echo() -> anyhow::Result<(Process, SocketAddr)> {
    let addr = free_addr();
    let child = Command::new(std::env::current_exe()?)
        .args(["serve-echo", "--listen", &addr.to_string()])
        .stdout(Stdio::null())
        .spawn()?;
    Ok((Process(child), addr))
}

fn spawn_longrun(data_dir: &Path, extra: &[&str]) -> anyhow::Result<(Process, SocketAddr)> {
    let addr = free_addr();
    let child = Command::new(env!("CARGO_BIN_EXE_longrun"))
        .args(["serve", "--listen", &addr.to_string()])
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    Ok((Process(child), addr))
}

async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
    for _ in 0..500 {
        if let Ok(channel) = endpoint.connect().await {
            return Ok(channel);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("cannot connect to {addr}")
}

async fn serve_echo(listen: SocketAddr) -> anyhow::Result<()> {
    struct Echo;
    #[tonic::async_trait]
    impl echo::echo_service_server::EchoService for Echo {
        async fn echo(
            &self,
            request: tonic::Request<echo::EchoRequest>,
        ) -> Result<tonic::Response<echo::EchoResponse>, tonic::Status> {
            Ok(tonic::Response::new(echo::EchoResponse {
                payload: request.into_inner().payload,
            }))
        }
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(echo::echo_service_server::EchoServiceServer::new(Echo))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Measurement

/// Calls per second and latency percentiles of one run.
struct Rate {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>9.0} calls/s  p50 {:>8.3} ms  p99 {:>8.3} ms",
            self.per_second,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3
        )
    }
}

/// Runs `requests` calls of `call`, `in_flight` at a time.
async fn measure<F, Fut>(requests: usize, in_flight: usize, call: F) -> anyhow::Result<Rate>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let call = Arc::new(call);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..in_flight {
        let call = Arc::clone(&call);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = worker;
            while n < requests {
                let t = Instant::now();
                call(n).await?;
                latencies.push(t.elapsed());
                n += in_flight;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(requests);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Ok(Rate {
        per_second: requests as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    })
}

async fn bare_echo(requests: usize, in_flight: usize) -> anyhow::Result<Rate> {
    let (_echo, addr) = spawn_echo()?;
    let client = echo::echo_service_client::EchoServiceClient::new(channel(addr).await?);
    // Warm up the connection and the server.
    measure(2_000.min(requests), in_flight, {
        let client = client.clone();
        move |_| {
            let mut client = client.clone();
            async move {
                client.echo(echo::EchoRequest::default()).await?;
                Ok(())
            }
        }
    })
    .await?;
    measure(requests, in_flight, move |_| {
        let mut client = client.clone();
        async move {
            client.echo(echo::EchoRequest::default()).await?;
            Ok(())
        }
    })
    .await
}

fn report(name: &str, rate: &Rate, baseline: &Rate) {
    println!(
        "{name:<44} {rate}  ratio {:.2}",
        rate.per_second / baseline.per_second
    );
}

// ---------------------------------------------------------------------------------------------
// Scenarios

async fn submit(requests: usize, in_flight: usize) -> anyhow::Result<()> {
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
    report(
        "longrun Submit (SQLite, synchronous=FULL)",
        &rate,
        &baseline,
    );
    Ok(())
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

/// Starts a server on `dir`, returns it, how long until it answered, and GetStatus latencies
/// for `ids`.
async fn start_and_probe(dir: &Path, ids: &[JobId]) -> anyhow::Result<(Process, Duration, Rate)> {
    let started = Instant::now();
    let (server, addr) = spawn_longrun(dir, &[])?;
    let client = JobsClient::new(channel(addr).await?);
    let probe = ids.first().map(ToString::to_string).unwrap_or_default();
    loop {
        let mut c = client.clone();
        let answered = c
            .get_status(pb::GetStatusRequest {
                job_id: probe.clone(),
            })
            .await;
        if answered.is_ok() || ids.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ready = started.elapsed();
    let ids: Arc<Vec<String>> = Arc::new(ids.iter().map(ToString::to_string).collect());
    let rate = measure(20_000, 64, move |n| {
        let mut client = client.clone();
        let id = ids
            .get((n.wrapping_mul(7919)) % ids.len().max(1))
            .cloned()
            .unwrap_or_else(|| JobId::generate().to_string());
        async move {
            // Unknown ids (NOT_FOUND) still measure the lookup on the empty store.
            let _ = client.get_status(pb::GetStatusRequest { job_id: id }).await;
            Ok(())
        }
    })
    .await?;
    Ok((server, ready, rate))
}

async fn restart(jobs: usize) -> anyhow::Result<()> {
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

    let empty = tempfile::tempdir()?;
    let (empty_server, empty_ready, empty_rate) = start_and_probe(empty.path(), &[]).await?;
    let empty_rss = empty_server.rss_kib();
    drop(empty_server);

    let (full_server, full_ready, full_rate) = start_and_probe(full.path(), &ids).await?;
    let full_rss = full_server.rss_kib();
    drop(full_server);

    println!(
        "{:<44} ready in {:>7.1} ms  RSS {:>7} KiB  GetStatus {}",
        "empty store",
        empty_ready.as_secs_f64() * 1e3,
        empty_rss,
        empty_rate
    );
    println!(
        "{:<44} ready in {:>7.1} ms  RSS {:>7} KiB  GetStatus {}",
        format!("{jobs} finished jobs"),
        full_ready.as_secs_f64() * 1e3,
        full_rss,
        full_rate
    );
    println!(
        "memory ratio {:.2}, GetStatus p99 ratio {:.2}",
        full_rss as f64 / empty_rss.max(1) as f64,
        full_rate.p99.as_secs_f64() / empty_rate.p99.as_secs_f64()
    );
    Ok(())
}
