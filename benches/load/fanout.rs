//! Fan-out: many open watches, then one job changes, or all of them at once; the bare
//! baseline is the same number of Subscribe streams on the echo service and a Broadcast.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::{
    client::{Watchers, job, submit_all},
    harness::{
        BENCH_STORE, Percentiles, Process, broadcast, channel, channels, line, listening, ms,
        own_cpu, spawn_bench_server, spawn_echo,
    },
};

/// Progress steps a `signal` job of fanout-one can take: more than any run triggers.
const ENDLESS: u64 = 1_000_000_000;
/// Submits in flight while setting up the watched jobs.
const SETUP_IN_FLIGHT: usize = 64;

/// Latency from triggering one stream's topic to that stream receiving it, `repeats` times.
async fn one_at_a_time(
    watchers: &mut Watchers,
    control: &tonic::transport::Channel,
    topic: impl Fn(usize) -> String,
    streams: usize,
    repeats: usize,
) -> anyhow::Result<Percentiles> {
    let mut latencies = Vec::with_capacity(repeats);
    for n in 0..repeats {
        // Spread over the streams, deterministic, never the same one twice in a row.
        let index = (n.wrapping_mul(7919) + 13) % streams;
        let above = watchers.step_of(index).unwrap_or(0);
        let started = Instant::now();
        broadcast(control, &topic(index), above + 1).await?;
        let at = watchers.next_step_of(index, above).await?;
        latencies.push(at.saturating_duration_since(started));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(Percentiles::of(latencies))
}

pub async fn fanout_one(streams: usize, connections: usize, repeats: usize) -> anyhow::Result<()> {
    println!(
        "== fanout-one: {streams} open streams over {connections} connections; one changes, {repeats} times"
    );
    let bare = {
        let (_echo, addr) = spawn_echo()?;
        let conns = channels(addr, connections).await?;
        let control = channel(addr).await?;
        let mut watchers = Watchers::subscribe(&conns, (0..streams).map(topic).collect());
        watchers.all_reach(0).await?;
        one_at_a_time(&mut watchers, &control, topic, streams, repeats).await?
    };

    let server = spawn_bench_server()?;
    let setup = Instant::now();
    let ids = submit_all(
        &channel(server.addr).await?,
        streams,
        SETUP_IN_FLIGHT,
        |n| job("signal", json!({ "topic": topic(n), "count": ENDLESS })),
    )
    .await?;
    let conns = channels(server.addr, connections).await?;
    let mut watchers = Watchers::watch(&conns, ids);
    watchers.all_reach(0).await?;
    let control = channel(server.control).await?;
    for n in 0..streams {
        listening(&control, &topic(n), 1).await?;
    }
    println!(
        "  set up {streams} running `signal` jobs and their watches in {:.1} s ({BENCH_STORE} store)",
        setup.elapsed().as_secs_f64()
    );
    let longrun = one_at_a_time(&mut watchers, &control, topic, streams, repeats).await?;
    let figures = [
        ("p50", longrun.p50, bare.p50, "-"),
        ("p99", longrun.p99, bare.p99, "<= 1 ms"),
        ("max", longrun.max, bare.max, "-"),
    ];
    for (name, value, baseline, target) in figures {
        line(
            &format!("change → its watcher told, {name} (vs bare)"),
            ms(value),
            ms(baseline),
            "ms",
            target,
        );
    }
    Ok(())
}

fn topic(n: usize) -> String {
    format!("t{n}")
}

pub async fn fanout_all(streams: usize, connections: usize, rounds: u64) -> anyhow::Result<()> {
    println!(
        "== fanout-all: {streams} open streams over {connections} connections; all change at once, {rounds} rounds (progress: median of all but the last)"
    );
    let mut bare = Vec::new();
    let mut bare_cpu = RoundsCpu::default();
    {
        let (echo, addr) = spawn_echo()?;
        let conns = channels(addr, connections).await?;
        let control = channel(addr).await?;
        let mut watchers = Watchers::subscribe(&conns, vec![String::new(); streams]);
        watchers.all_reach(0).await?;
        for round in 1..=rounds {
            let cpu = RoundsCpu::now(&echo);
            let started = Instant::now();
            broadcast(&control, "", round).await?;
            bare.push(watchers.all_reach(round).await? - started);
            bare_cpu.add(cpu, &echo);
        }
    }

    let server = spawn_bench_server()?;
    let ids = submit_all(
        &channel(server.addr).await?,
        streams,
        SETUP_IN_FLIGHT,
        move |_| job("signal", json!({ "topic": "", "count": rounds })),
    )
    .await?;
    let conns = channels(server.addr, connections).await?;
    let mut watchers = Watchers::watch(&conns, ids);
    watchers.all_reach(0).await?;
    let control = channel(server.control).await?;
    listening(&control, "", streams as u64).await?;
    let mut progress = Vec::new();
    let mut terminal = Duration::ZERO;
    let mut longrun_cpu = RoundsCpu::default();
    for round in 1..=rounds {
        let cpu = RoundsCpu::now(&server.process);
        let started = Instant::now();
        broadcast(&control, "", round).await?;
        progress.push(watchers.all_reach(round).await? - started);
        if round < rounds {
            longrun_cpu.add(cpu, &server.process);
        }
        if round == rounds {
            // The last step's handler returns: every job is then durably SUCCEEDED.
            terminal = watchers.all_terminal().await? - started;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let each_ms = |rounds: &[Duration]| -> Vec<String> {
        rounds.iter().map(|d| format!("{:.1}", ms(*d))).collect()
    };
    println!(
        "  progress rounds, ms: longrun {:?}, bare {:?}",
        each_ms(&progress),
        each_ms(&bare)
    );
    let bare = Percentiles::of(bare);
    // The last round's step ends every job, and its watchers learn of it from the SUCCEEDED
    // snapshot, durable first: that round is the terminal figure below, not a progress one.
    let progress_only = &progress[..progress.len().saturating_sub(1).max(1)];
    line(
        "all watchers told of the change (progress)",
        ms(Percentiles::of(progress_only.to_vec()).p50),
        ms(bare.p50),
        "ms",
        "<= 2x",
    );
    line(
        "all watchers told SUCCEEDED (last round)",
        ms(terminal),
        ms(bare.p50),
        "ms",
        "<= 2x",
    );
    // CPU time is steadier than wall time on a shared machine: it says where a change of the
    // server went even when the round times are lost in the noise.
    let (server, client) = longrun_cpu.per_watcher(streams);
    let (bare_server, bare_client) = bare_cpu.per_watcher(streams);
    line(
        "  server CPU per watcher told (progress)",
        server,
        bare_server,
        "us",
        "-",
    );
    line(
        "  client CPU per watcher told (progress)",
        client,
        bare_client,
        "us",
        "-",
    );
    Ok(())
}

/// Server and client CPU time summed over some rounds.
#[derive(Default)]
struct RoundsCpu {
    server: Duration,
    client: Duration,
    rounds: u32,
}

impl RoundsCpu {
    /// Both processes' CPU time so far, to subtract at the end of a round.
    fn now(server: &Process) -> (Duration, Duration) {
        (server.cpu(), own_cpu())
    }

    fn add(&mut self, (server_before, client_before): (Duration, Duration), server: &Process) {
        self.server += server.cpu().saturating_sub(server_before);
        self.client += own_cpu().saturating_sub(client_before);
        self.rounds += 1;
    }

    /// Microseconds per watcher told, per round: (server, client).
    fn per_watcher(&self, streams: usize) -> (f64, f64) {
        let per = |cpu: Duration| {
            cpu.as_secs_f64() * 1e6 / (f64::from(self.rounds.max(1)) * streams.max(1) as f64)
        };
        (per(self.server), per(self.client))
    }
}
