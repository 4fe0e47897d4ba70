//! Push vs polling: the same clients learn of jobs that change once a second, by GetStatus
//! every second or by one WatchJob each; server CPU and notification latency of each.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use longrun::api::pb::{self, jobs_client::JobsClient};
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{
    client::{job, step, submit_all},
    harness::{BENCH_STORE, Percentiles, channel, channels, figure, line, ms, unix_nanos},
};

/// How long after its report a client saw a step, from the report's time in the message.
fn latency(job: &pb::Job, last: &mut u64) -> Option<Duration> {
    let (current, message) = step(job)?;
    if current <= *last {
        return None;
    }
    *last = current;
    let reported: u128 = message.parse().ok()?;
    Some(Duration::from_nanos(
        unix_nanos().saturating_sub(reported) as u64
    ))
}

/// Collects every client's latencies once they stop.
async fn gather(mut clients: JoinSet<Vec<Duration>>) -> Percentiles {
    let mut all = Vec::new();
    while let Some(samples) = clients.join_next().await {
        all.extend(samples.unwrap_or_default());
    }
    println!("    {} notifications measured", all.len());
    Percentiles::of(all)
}

async fn poll(
    conns: &[Channel],
    ids: &[String],
    interval: Duration,
    stop: &CancellationToken,
) -> JoinSet<Vec<Duration>> {
    let mut clients = JoinSet::new();
    let count = ids.len();
    for (n, id) in ids.iter().enumerate() {
        let mut client = JobsClient::new(conns[n % conns.len()].clone());
        let (id, stop) = (id.clone(), stop.clone());
        // Spread the clients over the interval, as independent clients would be.
        let offset = interval.mul_f64(n as f64 / count as f64);
        clients.spawn(async move {
            let mut samples = Vec::new();
            let mut last = 0;
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return samples,
                    _ = ticks.tick() => {}
                }
                let request = pb::GetStatusRequest { job_id: id.clone() };
                if let Ok(reply) = client.get_status(request).await
                    && let Some(job) = reply.into_inner().job
                    && let Some(l) = latency(&job, &mut last)
                {
                    samples.push(l);
                }
            }
        });
    }
    clients
}

async fn push(
    conns: &[Channel],
    ids: &[String],
    opened: &Arc<AtomicUsize>,
    stop: &CancellationToken,
) -> JoinSet<Vec<Duration>> {
    let mut clients = JoinSet::new();
    for (n, id) in ids.iter().enumerate() {
        let mut client = JobsClient::new(conns[n % conns.len()].clone());
        let (id, stop, opened) = (id.clone(), stop.clone(), Arc::clone(opened));
        clients.spawn(async move {
            let mut samples = Vec::new();
            let request = pb::WatchJobRequest {
                job_id: id,
                after_version: 0,
            };
            let Ok(mut stream) = client.watch_job(request).await.map(|r| r.into_inner()) else {
                return samples;
            };
            let mut last = 0;
            let mut first = true;
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => return samples,
                    message = stream.message() => message,
                };
                let Ok(Some(pb::WatchJobResponse { job: Some(job) })) = message else {
                    return samples;
                };
                let l = latency(&job, &mut last);
                if first {
                    // The first message is the current snapshot, not a notification.
                    first = false;
                    opened.fetch_add(1, Ordering::Relaxed);
                } else if let Some(l) = l {
                    samples.push(l);
                }
            }
        });
    }
    clients
}

pub async fn poll_vs_push(
    clients: usize,
    connections: usize,
    period: Duration,
) -> anyhow::Result<()> {
    let interval = Duration::from_secs(1);
    println!(
        "== poll-vs-push: {clients} clients over {connections} connections, jobs change every {interval:?}; {period:?} each"
    );
    let server = spawn_and_fill(clients, interval, period).await?;
    let (process, ids) = (&server.0.process, &server.1);
    let conns = channels(server.0.addr, connections).await?;
    let cpu_over = async |period: Duration| {
        let before = process.cpu();
        tokio::time::sleep(period).await;
        process.cpu() - before
    };

    let base = cpu_over(period).await;
    println!(
        "  jobs ticking, no clients: {:.2} s server CPU",
        base.as_secs_f64()
    );

    let stop = CancellationToken::new();
    let polling = poll(&conns, ids, interval, &stop).await;
    let poll_cpu = cpu_over(period).await;
    stop.cancel();
    let poll_latency = gather(polling).await;

    let stop = CancellationToken::new();
    let opened = Arc::new(AtomicUsize::new(0));
    let pushing = push(&conns, ids, &opened, &stop).await;
    let deadline = Instant::now() + crate::harness::PATIENCE;
    while opened.load(Ordering::Relaxed) < clients && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let push_cpu = cpu_over(period).await;
    stop.cancel();
    let push_latency = gather(pushing).await;

    line(
        "server CPU s, push (vs poll)",
        push_cpu.as_secs_f64(),
        poll_cpu.as_secs_f64(),
        "s",
        "<= 0.5",
    );
    line(
        "  same, minus the jobs' own CPU (no clients)",
        (push_cpu.saturating_sub(base)).as_secs_f64(),
        (poll_cpu.saturating_sub(base)).as_secs_f64(),
        "s",
        "<= 0.5",
    );
    line(
        "notification latency p50, push (vs poll)",
        ms(push_latency.p50),
        ms(poll_latency.p50),
        "ms",
        "ms, not interval",
    );
    line(
        "notification latency p99, push (vs poll)",
        ms(push_latency.p99),
        ms(poll_latency.p99),
        "ms",
        "ms, not interval",
    );
    figure("jobs' own CPU, no clients", base.as_secs_f64(), "s", "-");
    Ok(())
}

/// A bench server with `count` `tick` jobs running, long enough to outlast the three periods.
async fn spawn_and_fill(
    count: usize,
    interval: Duration,
    period: Duration,
) -> anyhow::Result<(crate::harness::BenchServer, Vec<String>)> {
    let server = crate::harness::spawn_bench_server()?;
    let ticks = (period * 4 + crate::harness::PATIENCE).as_millis() / interval.as_millis().max(1);
    let interval_ms = interval.as_millis() as u64;
    let ids = submit_all(&channel(server.addr).await?, count, 64, move |_| {
        job(
            "tick",
            json!({ "interval_ms": interval_ms, "count": ticks as u64 }),
        )
    })
    .await?;
    println!("  {count} `tick` jobs running ({BENCH_STORE} store)");
    // Let the submissions' own work finish before measuring.
    tokio::time::sleep(interval * 3).await;
    Ok((server, ids))
}
