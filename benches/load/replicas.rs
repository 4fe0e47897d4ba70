//! Several replicas on one PostgreSQL database: e2e no-op (`echo`) jobs submitted round-robin
//! across 1, 2 and 3 real `longrun serve --store postgres://…` processes, each set in a fresh
//! schema; jobs/s from Submit to a watcher (on the replica it was submitted to) seeing SUCCEEDED.

use std::{sync::Arc, time::Duration};

use longrun::api::pb::jobs_client::JobsClient;
use serde_json::json;

use crate::client::{Waiting, job, submit_and_see};
use crate::harness::{Process, channel, figure, free_addr, measure};

/// Where the database is: `--url`, else this variable (the tests' own).
pub const URL_VARIABLE: &str = "LONGRUN_TEST_DATABASE_URL";

pub async fn replicas(
    url: Option<String>,
    jobs: usize,
    in_flight: usize,
    max_replicas: usize,
) -> anyhow::Result<()> {
    let Some(base_url) = url.or_else(|| std::env::var(URL_VARIABLE).ok()) else {
        anyhow::bail!("give --url postgres://… or set {URL_VARIABLE}");
    };
    println!(
        "== replicas: {jobs} echo jobs, {in_flight} in flight, round-robin over N replicas on one \
         PostgreSQL, Submit then Watch until terminal"
    );
    for count in 1..=max_replicas {
        let schema = format!("lr_bench_{:016x}", rand::random::<u64>());
        sql(&base_url, &format!("CREATE SCHEMA {schema}")).await?;
        let result = run(&base_url, &schema, count, jobs, in_flight).await;
        // The processes are gone (killed on drop inside `run`); the schema goes too.
        sql(&base_url, &format!("DROP SCHEMA {schema} CASCADE")).await?;
        let rate = result?;
        figure(
            &format!("{count} replica(s): jobs/s, submit → seen SUCCEEDED"),
            rate.per_second,
            "/s",
            "-",
        );
        println!("{:<46} {rate}", "  latency");
    }
    Ok(())
}

async fn run(
    base_url: &str,
    schema: &str,
    count: usize,
    jobs: usize,
    in_flight: usize,
) -> anyhow::Result<crate::harness::Rate> {
    let separator = if base_url.contains('?') { '&' } else { '?' };
    let url = format!("{base_url}{separator}options=-csearch_path%3D{schema}");
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..count {
        let addr = free_addr();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_longrun"))
            .args(["serve", "--listen", &addr.to_string(), "--store", &url])
            .args(["--max-queue-length", "10000000"])
            .env("RUST_LOG", "warn")
            .env_remove("LONGRUN_DATABASE_URL")
            .stdout(std::process::Stdio::null())
            .spawn()?;
        servers.push(Process::from(child));
        clients.push(JobsClient::new(channel(addr).await?));
    }
    let clients = Arc::new(clients);
    let call = move |n: usize| {
        let clients = Arc::clone(&clients);
        async move {
            let mut client = clients[n % clients.len()].clone();
            submit_and_see(&mut client, job("echo", json!({})), &Waiting::Watch).await
        }
    };
    let call = Arc::new(call);
    let (warm, busy) = (Arc::clone(&call), call);
    measure(200.min(jobs), in_flight, move |n| warm(n)).await?;
    let rate = measure(jobs, in_flight, move |n| busy(n)).await?;
    drop(servers);
    // Let the killed processes' connections close before the schema is dropped.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(rate)
}

/// Runs `sql` on a connection of its own.
async fn sql(url: &str, sql: &str) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client.batch_execute(sql).await?;
    Ok(())
}
