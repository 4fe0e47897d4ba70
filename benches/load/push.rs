//! End to end: submit → SUCCEEDED → seen by a waiter, in a stream of jobs and in a burst.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use longrun::api::pb::jobs_client::JobsClient;
use serde_json::json;
use tokio::sync::watch;

use crate::{
    client::{Waiter, Waiting, job, submit_and_see},
    echo,
    harness::{
        PATIENCE, Percentiles, bare_echo, channel, channels, echo_client, line, measure, ms,
        spawn_bench_server, spawn_echo, spawn_longrun,
    },
};

/// Which longrun server `e2e` loads.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Server {
    /// The bench server (the library assembled as `longrun serve` does, concurrency 50,000).
    Bench,
    /// The real `longrun serve` binary with its defaults (concurrency 16), on a fresh data
    /// directory: what a user runs.
    Binary,
}

/// No-op jobs through the whole path, `in_flight` at a time, then one at a time.
pub async fn e2e(
    jobs: usize,
    in_flight: usize,
    serial: usize,
    waiter: Waiter,
    server: Server,
) -> anyhow::Result<()> {
    println!(
        "== e2e: {jobs} echo jobs, {in_flight} in flight, Submit then {waiter:?} until terminal; then {serial} one at a time; {server:?} server"
    );
    let baseline = bare_echo(jobs, in_flight).await?;
    let baseline_serial = bare_echo(serial, 1).await?;

    // Held until the end: dropping either stops its server (the binary's with its data).
    let (_bench, _binary, addr) = match server {
        Server::Bench => {
            let bench = spawn_bench_server()?;
            let addr = bench.addr;
            (Some(bench), None, addr)
        }
        Server::Binary => {
            let data_dir = tempfile::tempdir()?;
            let (process, addr) = spawn_longrun(data_dir.path(), &[])?;
            (None, Some((process, data_dir)), addr)
        }
    };
    let connection = channel(addr).await?;
    let waiting = Arc::new(Waiting::open(waiter, &connection).await?);
    let client = JobsClient::new(connection);
    let run = move |_| {
        let (mut client, waiting) = (client.clone(), Arc::clone(&waiting));
        async move { submit_and_see(&mut client, job("echo", json!({})), &waiting).await }
    };
    let run = Arc::new(run);
    let (warm, busy, one) = (Arc::clone(&run), Arc::clone(&run), run);
    measure(500.min(jobs), in_flight, move |n| warm(n)).await?;
    let rate = measure(jobs, in_flight, move |n| busy(n)).await?;
    let lone = measure(serial, 1, move |n| one(n)).await?;

    line(
        "jobs/s, submit → seen SUCCEEDED (vs echo calls/s)",
        rate.per_second,
        baseline.per_second,
        "/s",
        ">= 0.5",
    );
    line(
        "  latency p50 at that load (vs echo)",
        ms(rate.latency.p50),
        ms(baseline.latency.p50),
        "ms",
        "-",
    );
    line(
        "one at a time: p50 (vs one echo call)",
        ms(lone.latency.p50),
        ms(baseline_serial.latency.p50),
        "ms",
        "<= 1 ms",
    );
    line(
        "one at a time: p99 (vs one echo call)",
        ms(lone.latency.p99),
        ms(baseline_serial.latency.p99),
        "ms",
        "<= 5 ms",
    );
    Ok(())
}

/// Runs `count` copies of `flow` released at the same moment; returns the time until the last
/// one finished, and the p50 of their own finish times.
async fn at_once<F, Fut>(count: usize, flow: F) -> anyhow::Result<(Duration, Duration)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let (go, ready) = watch::channel(false);
    let mut tasks = Vec::with_capacity(count);
    for n in 0..count {
        let (mut ready, work) = (ready.clone(), flow(n));
        tasks.push(tokio::spawn(async move {
            ready.wait_for(|go| *go).await?;
            let started = Instant::now();
            tokio::time::timeout(PATIENCE, work).await??;
            anyhow::Ok(started.elapsed())
        }));
    }
    // Let every task reach the start line.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    go.send(true)?;
    let mut each = Vec::with_capacity(count);
    for task in tasks {
        each.push(task.await??);
    }
    Ok((started.elapsed(), Percentiles::of(each).p50))
}

/// `jobs` jobs submitted at once, each with its own waiter; vs as many bare
/// "call, then open a stream and read its first message" flows at once.
pub async fn burst(
    jobs: usize,
    connections: usize,
    rounds: usize,
    waiter: Waiter,
) -> anyhow::Result<()> {
    println!(
        "== burst: {jobs} echo jobs at once over {connections} connection(s), each Submit then {waiter:?}; median of {rounds} rounds"
    );
    let (_echo, addr) = spawn_echo()?;
    let bare = channels(addr, connections).await?;
    let server = spawn_bench_server()?;
    let conns = channels(server.addr, connections).await?;
    let waiting = Arc::new(Waiting::open(waiter, &conns[0]).await?);
    let (mut bare_total, mut bare_each, mut total, mut each) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds.max(1) {
        let (t, e) = at_once(jobs, |n| {
            let mut client = echo_client(bare[n % bare.len()].clone());
            async move {
                client.echo(echo::EchoRequest::default()).await?;
                let request = echo::SubscribeRequest {
                    topic: format!("b{n}"),
                };
                let mut stream = client.subscribe(request).await?.into_inner();
                stream.message().await?;
                Ok(())
            }
        })
        .await?;
        bare_total.push(t);
        bare_each.push(e);
        let (t, e) = at_once(jobs, |n| {
            let mut client = JobsClient::new(conns[n % conns.len()].clone());
            let waiting = Arc::clone(&waiting);
            async move { submit_and_see(&mut client, job("echo", json!({})), &waiting).await }
        })
        .await?;
        total.push(t);
        each.push(e);
    }
    let median = |v: Vec<Duration>| Percentiles::of(v).p50;
    line(
        "all told SUCCEEDED (vs all bare flows done)",
        ms(median(total)),
        ms(median(bare_total)),
        "ms",
        "<= 100 ms",
    );
    line(
        "  a job's own p50 (vs a bare flow's)",
        ms(median(each)),
        ms(median(bare_each)),
        "ms",
        "-",
    );
    Ok(())
}
