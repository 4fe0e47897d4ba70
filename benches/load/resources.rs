//! What watches cost the server: memory of idle streams, and a stalled watcher under a flood
//! of progress updates.

use std::time::{Duration, Instant};

use longrun::api::pb::{self, jobs_client::JobsClient};
use serde_json::json;

use crate::{
    client::{Watchers, is_terminal, job, submit_all},
    echo,
    harness::{
        BENCH_STORE, PATIENCE, Process, channel, channels, echo_client, figure, line, ms,
        spawn_bench_server, spawn_echo,
    },
};

/// How long RSS is given to settle before it is read.
const SETTLE: Duration = Duration::from_millis(1500);

struct Footprint {
    per_connection: f64,
    per_stream: f64,
}

/// RSS before connections, after `connections` connections, after `streams` streams on them.
async fn footprint<F>(
    process: &Process,
    addr: std::net::SocketAddr,
    connections: usize,
    streams: usize,
    open: F,
) -> anyhow::Result<Footprint>
where
    F: AsyncFnOnce(&[tonic::transport::Channel]) -> anyhow::Result<Watchers>,
{
    tokio::time::sleep(SETTLE).await;
    let before = process.rss_kib();
    let conns = used_channels(addr, connections).await?;
    tokio::time::sleep(SETTLE).await;
    let connected = process.rss_kib();
    let mut watchers = open(&conns).await?;
    watchers.all_reach(0).await?;
    tokio::time::sleep(SETTLE).await;
    let watched = process.rss_kib();
    println!(
        "  RSS KiB: {before} before, {connected} with {connections} connections, {watched} with {streams} streams"
    );
    drop(watchers);
    Ok(Footprint {
        per_connection: connected.saturating_sub(before) as f64 / connections.max(1) as f64,
        per_stream: watched.saturating_sub(connected) as f64 / streams.max(1) as f64,
    })
}

/// `count` connections to `addr`, each used for one call so its buffers are really set up.
async fn used_channels(
    addr: std::net::SocketAddr,
    count: usize,
) -> anyhow::Result<Vec<tonic::transport::Channel>> {
    let conns = channels(addr, count).await?;
    for conn in &conns {
        // Either server answers one of these two; the other is UNIMPLEMENTED.
        let _ = echo_client(conn.clone())
            .echo(echo::EchoRequest::default())
            .await;
        let _ = JobsClient::new(conn.clone())
            .list_actions(pb::ListActionsRequest {})
            .await;
    }
    Ok(conns)
}

pub async fn idle_memory(streams: usize, connections: usize) -> anyhow::Result<()> {
    println!("== idle-memory: {streams} idle streams over {connections} connections");
    let bare = {
        let (echo, addr) = spawn_echo()?;
        footprint(&echo, addr, connections, streams, async |conns| {
            Ok(Watchers::subscribe(
                conns,
                (0..streams).map(|n| format!("i{n}")).collect(),
            ))
        })
        .await?
    };
    let server = spawn_bench_server()?;
    let ids = submit_all(&channel(server.addr).await?, streams, 64, |n| {
        job("signal", json!({ "topic": format!("i{n}"), "count": 1 }))
    })
    .await?;
    let longrun = footprint(
        &server.process,
        server.addr,
        connections,
        streams,
        async |conns| Ok(Watchers::watch(conns, ids)),
    )
    .await?;
    line(
        "KiB per idle stream, connection excluded",
        longrun.per_stream,
        bare.per_stream,
        "KiB",
        "<= 12 KiB",
    );
    line(
        "KiB per HTTP/2 connection",
        longrun.per_connection,
        bare.per_connection,
        "KiB",
        "-",
    );
    println!("  ({streams} running `signal` jobs, {BENCH_STORE} store; RSS from /proc/PID/status)");
    Ok(())
}

/// How the bench's watcher of the `burst` job behaves.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Watching {
    None,
    Stalled,
    Reading,
}

struct BurstRun {
    emit: Duration,
    rss: (u64, u64, u64),
    read: u64,
}

async fn burst_run(
    server: &crate::harness::BenchServer,
    updates: u64,
    watching: Watching,
) -> anyhow::Result<BurstRun> {
    let mut client = JobsClient::new(channel(server.addr).await?);
    // The watcher has its own connection, so its stalled flow-control window blocks no one.
    let mut watcher = JobsClient::new(channel(server.addr).await?);
    let (done, sampled) = tokio::sync::oneshot::channel();
    let sampler = server
        .process
        .sample_rss(Duration::from_millis(20), sampled);
    let run = async {
        let submitted = client
            .submit(job("burst", json!({ "count": updates })))
            .await?;
        let job_id = submitted.into_inner().job.map(|j| j.id).unwrap_or_default();
        let watch = pb::WatchJobRequest {
            job_id: job_id.clone(),
            after_version: 0,
        };
        let mut read = 0;
        let _stalled = match watching {
            Watching::None => None,
            Watching::Stalled => Some(watcher.watch_job(watch).await?.into_inner()),
            Watching::Reading => {
                let mut stream = watcher.watch_job(watch).await?.into_inner();
                let deadline = Instant::now() + PATIENCE * 5;
                while let Some(message) = stream.message().await? {
                    read += 1;
                    if message.job.as_ref().is_some_and(is_terminal) || Instant::now() > deadline {
                        break;
                    }
                }
                None
            }
        };
        let waited = client
            .wait_job(pb::WaitJobRequest {
                job_id,
                timeout: Some(prost_types::Duration {
                    seconds: (PATIENCE * 5).as_secs() as i64,
                    nanos: 0,
                }),
            })
            .await?
            .into_inner();
        let _ = done.send(());
        let elapsed_ms = waited
            .job
            .as_ref()
            .and_then(|j| j.actions.first())
            .and_then(|a| a.result.as_ref())
            .and_then(|r| match &r.kind {
                Some(prost_types::value::Kind::StructValue(s)) => s.fields.get("elapsed_ms"),
                _ => None,
            })
            .and_then(|v| match v.kind {
                Some(prost_types::value::Kind::NumberValue(n)) => Some(n),
                _ => None,
            })
            .ok_or_else(|| anyhow::anyhow!("burst job gave no elapsed_ms: {waited:?}"))?;
        anyhow::Ok((Duration::from_secs_f64(elapsed_ms / 1e3), read))
    };
    let (rss, outcome) = tokio::join!(sampler, run);
    let (emit, read) = outcome?;
    Ok(BurstRun { emit, rss, read })
}

pub async fn stalled(updates: u64) -> anyhow::Result<()> {
    println!("== stalled: a `burst` job emits {updates} progress updates");
    let server = spawn_bench_server()?;
    // Warm the server up (store, executor) with a small run first.
    burst_run(&server, 10_000, Watching::None).await?;
    let none = burst_run(&server, updates, Watching::None).await?;
    let stalled = burst_run(&server, updates, Watching::Stalled).await?;
    let reading = burst_run(&server, updates, Watching::Reading).await?;
    line(
        "time to emit, stalled watcher (vs no watcher)",
        ms(stalled.emit),
        ms(none.emit),
        "ms",
        "~1.0 (not slowed)",
    );
    line(
        "time to emit, reading watcher (vs no watcher)",
        ms(reading.emit),
        ms(none.emit),
        "ms",
        "-",
    );
    for (name, run) in [
        ("none", &none),
        ("stalled", &stalled),
        ("reading", &reading),
    ] {
        let (start, peak, end) = run.rss;
        figure(
            &format!("server RSS growth, {name} watcher: peak-start"),
            peak.saturating_sub(start) as f64,
            "KiB",
            "flat",
        );
        println!("  RSS KiB start {start} peak {peak} end {end}");
    }
    println!(
        "  the reading watcher received {} messages for {updates} updates (coalesced)",
        reading.read
    );
    Ok(())
}
