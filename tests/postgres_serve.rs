//! `longrun serve --store postgres://…`, the real binary: a job submitted over gRPC succeeds,
//! survives a restart, and a second server on the same database (and schema) serves the same
//! jobs as a replica (tests/replicas.rs tests replicas in depth); a replica killed with SIGKILL
//! mid-job loses its lease and another replica runs the job to the end.
//!
//! Runs only when `LONGRUN_TEST_DATABASE_URL` is set (`.ci/run` sets it). The server's tables go
//! in a fresh schema, chosen through the URL (`options=-csearch_path%3D<schema>`), which is
//! dropped when the test ends.

mod common;

use std::{
    net::SocketAddr,
    process::{Command, Output, Stdio},
    time::Duration,
};

use common::postgres::{TestSchema, database_url};
use common::{
    PATIENCE, Spawned, connect, free_addr, request, sleep, submit, until_state, wait_done,
};
use longrun::api::pb;

/// `longrun serve` on the database at `url`, given with `--store`.
fn serve(url: &str, addr: SocketAddr) -> Spawned {
    Spawned::spawn(serve_command(addr).args(["--store", url]))
}

/// `longrun serve` on the database at `url`, given as `LONGRUN_DATABASE_URL`.
fn serve_from_env(url: &str, addr: SocketAddr) -> Spawned {
    Spawned::spawn(serve_command(addr).env("LONGRUN_DATABASE_URL", url))
}

fn serve_command(addr: SocketAddr) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_longrun"));
    command
        .args(["serve", "--listen", &addr.to_string()])
        .env("RUST_LOG", "warn")
        .env_remove("LONGRUN_AUTH")
        .env_remove("LONGRUN_STORE")
        .env_remove("LONGRUN_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// Waits, bounded, until the server accepts connections.
async fn wait_until_serving(addr: SocketAddr, server: &mut Spawned) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Some(status) = server.try_wait().unwrap() {
            panic!("the server exited with {status}");
        }
        assert!(tokio::time::Instant::now() < deadline, "never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GetStatus on a server that was just started: the port accepts before the server is ready
/// to answer, so UNAVAILABLE is retried (bounded); any other error fails with its status.
async fn get_when_ready(
    client: &mut longrun::api::pb::jobs_client::JobsClient<tonic::transport::Channel>,
    job_id: &str,
) -> pb::Job {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let request = pb::GetStatusRequest {
            job_id: job_id.to_owned(),
        };
        match client.get_status(request).await {
            Ok(response) => return response.into_inner().job.expect("job in response"),
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("GetStatus of {job_id}: {status:?}"),
        }
    }
}

/// Stops a server the way an operator does (SIGTERM) and waits for it, bounded.
fn stop(server: Spawned) -> Output {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(server.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    server.wait_bounded()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_postgres_keeps_jobs_across_restarts_and_serves_them_from_a_second_replica() {
    let Some(base_url) = database_url() else {
        return;
    };
    let schema = TestSchema::create(&base_url);
    let url = schema.url();

    let addr = free_addr();
    let mut server = serve(&url, addr);
    wait_until_serving(addr, &mut server).await;
    let mut client = connect(addr).await;
    let job = submit(&mut client, request(vec![sleep(1, 1)])).await;
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!(done.state(), pb::JobState::Succeeded);

    // A second server on the same database and schema (here named by LONGRUN_DATABASE_URL) is
    // a replica: it serves the same jobs.
    let second_addr = free_addr();
    let mut second = serve_from_env(&url, second_addr);
    wait_until_serving(second_addr, &mut second).await;
    let mut second_client = connect(second_addr).await;
    let seen = get_when_ready(&mut second_client, &job.id).await;
    assert_eq!(seen.state(), pb::JobState::Succeeded);
    let second = stop(second);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );

    let stopped = stop(server);
    assert!(
        stopped.status.success(),
        "{}",
        String::from_utf8_lossy(&stopped.stderr)
    );

    // After a restart (from LONGRUN_DATABASE_URL this time) the job is there, as it ended.
    let addr = free_addr();
    let mut server = serve_from_env(&url, addr);
    wait_until_serving(addr, &mut server).await;
    let mut client = connect(addr).await;
    let found = get_when_ready(&mut client, &job.id).await;
    assert_eq!(found.state(), pb::JobState::Succeeded);
    assert_eq!(found.version, done.version);
    stop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_a_replica_killed_mid_run_finishes_on_another_replica() {
    let Some(base_url) = database_url() else {
        return;
    };
    let schema = TestSchema::create(&base_url);
    let url = schema.url();
    let lease = ["--lease", "1s"];

    // Only the first replica runs at first, so it is the one that claims the job.
    let first_addr = free_addr();
    let mut first = Spawned::spawn(
        serve_command(first_addr)
            .args(["--store", &url])
            .args(lease),
    );
    wait_until_serving(first_addr, &mut first).await;
    let mut first_client = connect(first_addr).await;
    let mut spec = request(vec![sleep(3_000, 3)]);
    spec.max_attempts = 3;
    let job = submit(&mut first_client, spec).await;
    until_state(&mut first_client, &job.id, pb::JobState::Running).await;

    let second_addr = free_addr();
    let mut second = Spawned::spawn(
        serve_command(second_addr)
            .args(["--store", &url])
            .args(lease),
    );
    wait_until_serving(second_addr, &mut second).await;
    first.kill().expect("SIGKILL the first replica");
    let _ = first.wait_bounded();

    // The survivor's reaper re-queues the job once the dead replica's lease runs out, then
    // runs it again from the start: attempt 2.
    let mut second_client = connect(second_addr).await;
    let done = wait_done(&mut second_client, &job.id).await;
    assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    assert_eq!(done.attempt, 2, "the interrupted attempt counts");
    let stopped = stop(second);
    assert!(
        stopped.status.success(),
        "{}",
        String::from_utf8_lossy(&stopped.stderr)
    );
}
