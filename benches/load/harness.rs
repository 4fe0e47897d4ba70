//! What every scenario shares: the server processes (and what /proc says about them),
//! connections, latency statistics and the report lines.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tonic::transport::{Channel, Endpoint};

use crate::echo;

/// How long a scenario waits for any one expected event before it gives up.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A server child process, killed when dropped.
pub struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl From<Child> for Process {
    fn from(child: Child) -> Self {
        Process(child)
    }
}

impl Process {
    /// Resident memory now, from /proc/PID/status.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// CPU time used so far (user + system), from /proc/PID/stat.
    pub fn cpu(&self) -> Duration {
        cpu_of(&self.0.id().to_string())
    }

    /// Samples RSS every `every` until `done` fires; returns (first, peak, last) in KiB.
    pub async fn sample_rss(
        &self,
        every: Duration,
        done: tokio::sync::oneshot::Receiver<()>,
    ) -> (u64, u64, u64) {
        let first = self.rss_kib();
        let mut peak = first;
        let mut ticks = tokio::time::interval(every);
        tokio::pin!(done);
        let bound = Instant::now() + PATIENCE * 10;
        while Instant::now() < bound {
            tokio::select! {
                _ = &mut done => break,
                _ = ticks.tick() => {
                    peak = peak.max(self.rss_kib());
                }
            }
        }
        let end = self.rss_kib();
        (first, peak.max(end), end)
    }
}

/// CPU time this process has used so far (user + system).
pub fn own_cpu() -> Duration {
    cpu_of("self")
}

/// CPU time (user + system) of process `pid` ("self" for this one), from /proc/PID/stat.
fn cpu_of(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses: utime and stime are the
    // 14th and 15th fields of the line, the 12th and 13th after ")".
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / clock_ticks() as f64)
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// Starts the bare echo service (this harness re-executed).
pub fn spawn_echo() -> anyhow::Result<(Process, SocketAddr)> {
    let addr = free_addr();
    let child = Command::new(std::env::current_exe()?)
        .args(["serve-echo", "--listen", &addr.to_string()])
        .stdout(Stdio::null())
        .spawn()?;
    Ok((Process(child), addr))
}

/// Starts the real `longrun` binary on `data_dir`.
pub fn spawn_longrun(data_dir: &Path, extra: &[&str]) -> anyhow::Result<(Process, SocketAddr)> {
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

/// The longrun library server with the bench handlers (this harness re-executed), and its
/// control port, where a Broadcast fires the handlers' triggers.
pub struct BenchServer {
    pub process: Process,
    pub addr: SocketAddr,
    pub control: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Which store the bench server keeps jobs in.
pub const BENCH_STORE: &str = "sqlite";

pub fn spawn_bench_server() -> anyhow::Result<BenchServer> {
    let dir = tempfile::tempdir()?;
    let (addr, control) = (free_addr(), free_addr());
    let child = Command::new(std::env::current_exe()?)
        .args(["serve-longrun", "--listen", &addr.to_string()])
        .args(["--control", &control.to_string(), "--store", BENCH_STORE])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    Ok(BenchServer {
        process: Process(child),
        addr,
        control,
        _dir: dir,
    })
}

/// One HTTP/2 connection to `addr`, retried while the server starts.
pub async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .buffer_size(16 * 1024);
    for _ in 0..500 {
        if let Ok(channel) = endpoint.connect().await {
            return Ok(channel);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("cannot connect to {addr}")
}

/// `count` separate HTTP/2 connections to `addr`.
pub async fn channels(addr: SocketAddr, count: usize) -> anyhow::Result<Vec<Channel>> {
    let mut all = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        all.push(channel(addr).await?);
    }
    Ok(all)
}

pub fn echo_client(channel: Channel) -> echo::echo_service_client::EchoServiceClient<Channel> {
    echo::echo_service_client::EchoServiceClient::new(channel)
}

/// Fires topic `topic` on an echo or control server.
pub async fn broadcast(channel: &Channel, topic: &str, seq: u64) -> anyhow::Result<u64> {
    let reply = echo_client(channel.clone())
        .broadcast(echo::BroadcastRequest {
            topic: topic.to_owned(),
            seq,
        })
        .await?;
    Ok(reply.into_inner().receivers)
}

pub fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// Latency percentiles of a set of samples.
#[derive(Clone, Copy)]
pub struct Percentiles {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Percentiles {
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let at = |q: f64| {
            samples
                .get(((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        Self {
            p50: at(0.50),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One report line: a figure, the baseline's, their ratio and the target.
pub fn line(name: &str, value: f64, baseline: f64, unit: &str, target: &str) {
    let ratio = if baseline > 0.0 {
        value / baseline
    } else {
        f64::NAN
    };
    println!(
        "{name:<46} {value:>11.3} {unit:<8} baseline {baseline:>11.3}  ratio {ratio:>6.2}  target {target}"
    );
}

/// A figure with no baseline of its own.
pub fn figure(name: &str, value: f64, unit: &str, target: &str) {
    println!(
        "{name:<46} {value:>11.3} {unit:<8} {:>32}target {target}",
        ""
    );
}

/// Calls per second and latency percentiles of one run.
pub struct Rate {
    pub per_second: f64,
    pub latency: Percentiles,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>9.0} calls/s  p50 {:>8.3} ms  p99 {:>8.3} ms",
            self.per_second,
            ms(self.latency.p50),
            ms(self.latency.p99)
        )
    }
}

/// Runs `requests` calls of `call`, `in_flight` at a time.
pub async fn measure<F, Fut>(requests: usize, in_flight: usize, call: F) -> anyhow::Result<Rate>
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
    Ok(Rate {
        per_second: requests as f64 / elapsed.as_secs_f64(),
        latency: Percentiles::of(latencies),
    })
}

/// Bare echo calls/s on a fresh echo server, after a warm-up.
pub async fn bare_echo(requests: usize, in_flight: usize) -> anyhow::Result<Rate> {
    let (_echo, addr) = spawn_echo()?;
    let client = echo_client(channel(addr).await?);
    let call = move |_| {
        let mut client = client.clone();
        async move {
            client.echo(echo::EchoRequest::default()).await?;
            Ok(())
        }
    };
    let call = Arc::new(call);
    let warm = Arc::clone(&call);
    measure(2_000.min(requests), in_flight, move |n| warm(n)).await?;
    measure(requests, in_flight, move |n| call(n)).await
}

/// Waits until `expected` handlers listen on `topic` of a bench server's control port (a
/// Broadcast of seq 0 is a no-op for them and returns how many listen).
pub async fn listening(control: &Channel, topic: &str, expected: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if broadcast(control, topic, 0).await? >= expected {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("fewer than {expected} handlers listen on {topic:?}")
}
