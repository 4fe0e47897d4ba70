//! The benchmark harness: runs a bare tonic echo service beside longrun in the same run and
//! reports every figure with its ratio to that baseline (absolute numbers on shared 2-core
//! machines drift; ratios within one run do not).
//!
//! ```text
//! cargo bench --bench load -- submit      [--requests 20000] [--in-flight 64]
//! cargo bench --bench load -- restart     [--jobs 1000000]
//! cargo bench --bench load -- store       [--jobs 40000] [--concurrency 64]   (SQLite store alone, in process)
//! cargo bench --bench load -- e2e         [--jobs 20000] [--in-flight 64] [--serial 2000] [--waiter watch|wait|stream] [--server bench|binary]
//! cargo bench --bench load -- burst       [--jobs 1000] [--connections 1] [--rounds 3] [--waiter watch|wait|stream]
//! cargo bench --bench load -- fanout-one  [--streams 10000] [--connections 10] [--repeats 1000]
//! cargo bench --bench load -- fanout-all  [--streams 10000] [--connections 10] [--rounds 6]
//! cargo bench --bench load -- idle-memory [--streams 10000] [--connections 10]
//! cargo bench --bench load -- stalled     [--updates 1000000]
//! cargo bench --bench load -- poll-vs-push [--clients 10000] [--connections 10] [--period-s 20]
//! cargo bench --bench load -- replicas    [--jobs 5000] [--in-flight 64] [--max-replicas 3] [--url postgres://…]
//! cargo bench --bench load -- all
//! ```
//! Servers run as separate processes: the real `longrun` binary (`submit`, `restart`), this
//! harness re-executed as the bare echo service (`serve-echo`), and this harness re-executed as
//! the longrun library server with bench-only handlers (`serve-longrun`). The load comes from
//! this process over loopback.

mod client;
mod durable;
mod fanout;
mod harness;
mod poll;
mod push;
mod replicas;
mod resources;
mod servers;

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand};
use client::Waiter;

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
    /// The SQLite store alone, in process: creates, then the saves of a run; CPU per job.
    Store {
        #[arg(long, default_value_t = 40_000)]
        jobs: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Restart time, memory and GetStatus latency with many finished jobs stored.
    Restart {
        #[arg(long, default_value_t = 1_000_000)]
        jobs: usize,
    },
    /// Submit → SUCCEEDED → seen by a waiter, no-op jobs; throughput and one-at-a-time latency.
    E2e {
        #[arg(long, default_value_t = 20_000)]
        jobs: usize,
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        #[arg(long, default_value_t = 2_000)]
        serial: usize,
        #[arg(long, value_enum, default_value = "watch")]
        waiter: Waiter,
        #[arg(long, value_enum, default_value = "bench")]
        server: push::Server,
    },
    /// Jobs submitted at once, each with its own waiter: time until all are told.
    Burst {
        #[arg(long, default_value_t = 1_000)]
        jobs: usize,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, value_enum, default_value = "watch")]
        waiter: Waiter,
    },
    /// Many open watches; one job changes: latency to its watcher.
    FanoutOne {
        #[arg(long, default_value_t = 10_000)]
        streams: usize,
        #[arg(long, default_value_t = 10)]
        connections: usize,
        #[arg(long, default_value_t = 1_000)]
        repeats: usize,
    },
    /// Many watched jobs all change at once: time until every watcher is told.
    FanoutAll {
        #[arg(long, default_value_t = 10_000)]
        streams: usize,
        #[arg(long, default_value_t = 10)]
        connections: usize,
        #[arg(long, default_value_t = 6)]
        rounds: u64,
    },
    /// Server memory per idle watch stream (and per connection).
    IdleMemory {
        #[arg(long, default_value_t = 10_000)]
        streams: usize,
        #[arg(long, default_value_t = 10)]
        connections: usize,
    },
    /// A stalled watcher while its job emits many progress updates: memory and executor speed.
    Stalled {
        #[arg(long, default_value_t = 1_000_000)]
        updates: u64,
    },
    /// Clients polling GetStatus every second vs watching: server CPU and latency.
    PollVsPush {
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        connections: usize,
        #[arg(long, default_value_t = 20)]
        period_s: u64,
    },
    /// e2e no-op jobs across 1, 2, 3 replicas (real processes) on one PostgreSQL database
    /// (`--url`, else LONGRUN_TEST_DATABASE_URL); each run in a fresh schema, dropped after.
    Replicas {
        #[arg(long, default_value_t = 5_000)]
        jobs: usize,
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        #[arg(long, default_value_t = 3)]
        max_replicas: usize,
        #[arg(long)]
        url: Option<String>,
    },
    /// Every scenario with its defaults (not `replicas`, which needs a database).
    All,
    /// Internal: serve the bare echo service.
    ServeEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Internal: serve longrun with the bench handlers.
    ServeLongrun(servers::ServeLongrun),
}

/// The `longrun` binary's allocator (see `src/main.rs`), for every server the bench runs —
/// longrun and the bare baselines alike — so that each ratio compares like with like.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench` to harness-less benchmarks.
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    match args.scenario {
        Scenario::Submit {
            requests,
            in_flight,
        } => durable::submit(requests, in_flight).await,
        Scenario::Store { jobs, concurrency } => durable::store(jobs, concurrency).await,
        Scenario::Restart { jobs } => durable::restart(jobs).await,
        Scenario::E2e {
            jobs,
            in_flight,
            serial,
            waiter,
            server,
        } => push::e2e(jobs, in_flight, serial, waiter, server).await,
        Scenario::Burst {
            jobs,
            connections,
            rounds,
            waiter,
        } => push::burst(jobs, connections, rounds, waiter).await,
        Scenario::FanoutOne {
            streams,
            connections,
            repeats,
        } => fanout::fanout_one(streams, connections, repeats).await,
        Scenario::FanoutAll {
            streams,
            connections,
            rounds,
        } => fanout::fanout_all(streams, connections, rounds).await,
        Scenario::IdleMemory {
            streams,
            connections,
        } => resources::idle_memory(streams, connections).await,
        Scenario::Stalled { updates } => resources::stalled(updates).await,
        Scenario::PollVsPush {
            clients,
            connections,
            period_s,
        } => poll::poll_vs_push(clients, connections, Duration::from_secs(period_s)).await,
        Scenario::Replicas {
            jobs,
            in_flight,
            max_replicas,
            url,
        } => replicas::replicas(url, jobs, in_flight, max_replicas).await,
        Scenario::All => {
            durable::submit(20_000, 64).await?;
            push::e2e(20_000, 64, 2_000, Waiter::Watch, push::Server::Bench).await?;
            push::e2e(20_000, 64, 2_000, Waiter::Stream, push::Server::Bench).await?;
            push::burst(1_000, 1, 3, Waiter::Watch).await?;
            fanout::fanout_one(10_000, 10, 1_000).await?;
            fanout::fanout_all(10_000, 10, 6).await?;
            resources::idle_memory(10_000, 10).await?;
            resources::stalled(1_000_000).await?;
            poll::poll_vs_push(10_000, 10, Duration::from_secs(20)).await?;
            durable::restart(1_000_000).await
        }
        Scenario::ServeEcho { listen } => servers::serve_echo(listen).await,
        Scenario::ServeLongrun(args) => servers::serve_longrun(args).await,
    }
}
