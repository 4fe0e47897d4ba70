//! An `exec` command does not outlive a server killed with SIGKILL, and what it started does not
//! outlive the next server's start: either would otherwise run on beside the attempt that
//! recovery starts again, doing its work twice.

mod common;

use std::{net::SocketAddr, path::Path, time::Duration};

use common::{PATIENCE, Spawned, action, connect, free_addr, process_gone, spawn_serve};
use longrun::api::pb;

fn spawn_server(dir: &Path, config: &Path, addr: SocketAddr) -> Spawned {
    spawn_serve(dir, addr, &["--config".as_ref(), config.as_os_str()])
}

/// Polls `done` every 20 ms until it holds or [`PATIENCE`] runs out.
async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn an_exec_command_dies_with_a_server_killed_by_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    // `exec`, so the pid written is the command's own process (the one the server started).
    let script = format!("echo $$ > '{}'; exec sleep 60", pid_file.display());
    let (mut server, pid) = run_script(dir.path(), &script, &pid_file).await;
    assert!(!process_gone(pid), "the command runs while the server does");

    server.kill().expect("SIGKILL the server");
    server.wait().expect("reap the server");
    let gone = eventually(|| process_gone(pid)).await;
    if !gone {
        reap(pid);
    }
    assert!(gone, "the command {pid} outlived the server");
}

/// Writes a config whose `long` command runs `script` with `/bin/sh -c`.
fn exec_config(dir: &Path, script: &str) -> std::path::PathBuf {
    let config = dir.join("longrun.toml");
    std::fs::write(
        &config,
        format!(
            "[exec.commands.long]\nprogram = \"/bin/sh\"\nargs = [\"-c\", {}]\n",
            toml_string(script)
        ),
    )
    .unwrap();
    config
}

/// Starts a server running `script` as a job; returns it and the pid the script wrote to
/// `pid_file`.
async fn run_script(dir: &Path, script: &str, pid_file: &Path) -> (Spawned, i32) {
    let config = exec_config(dir, script);
    let addr = free_addr();
    let server = spawn_server(&dir.join("data"), &config, addr);
    let mut client = connect(addr).await;
    client
        .submit(pb::SubmitRequest {
            actions: vec![action("exec", serde_json::json!({"command": "long"}))],
            ..pb::SubmitRequest::default()
        })
        .await
        .expect("submit");
    assert!(
        eventually(|| std::fs::read_to_string(pid_file).is_ok_and(|s| s.ends_with('\n'))).await,
        "the command started"
    );
    let pid = std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (server, pid)
}

/// SIGKILLs `pid` if it still runs, so that a failed test leaves nothing behind.
fn reap(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// What a command starts itself outlives a server killed with SIGKILL (the command's own
/// process does not); the next server started kills it before recovery runs the job again,
/// unless it moved to a group of its own, as a daemon does.
#[tokio::test]
async fn what_an_exec_command_started_is_killed_when_the_next_server_starts() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let daemon_file = dir.path().join("daemon");
    // The shell stays (it waits), so both `sleep`s are the server's grandchildren; the first
    // gets a session and group of its own.
    let script = format!(
        "setsid sleep 61 & echo $! > '{}'; sleep 60 & echo $! > '{}'; wait",
        daemon_file.display(),
        pid_file.display()
    );
    let (mut server, grandchild) = run_script(dir.path(), &script, &pid_file).await;
    let daemon: i32 = std::fs::read_to_string(&daemon_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    server.kill().expect("SIGKILL the server");
    server.wait().expect("reap the server");
    // Long enough for the shell to die with the server, which leaves both `sleep`s running.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if process_gone(grandchild) || process_gone(daemon) {
        reap(daemon);
        reap(grandchild);
        panic!("a grandchild died with the server: nothing left for the next one to do");
    }

    let config = exec_config(dir.path(), "exit 0");
    let addr = free_addr();
    let next = spawn_server(&dir.path().join("data"), &config, addr);
    let gone = eventually(|| process_gone(grandchild)).await;
    // Ready to answer means its start, and so its sweep, is over.
    connect(addr).await;
    let daemon_left = !process_gone(daemon);
    drop(next); // killed and reaped
    reap(daemon);
    if !gone {
        reap(grandchild);
    }
    assert!(
        gone,
        "{grandchild}, started by a dead server's command, still runs"
    );
    assert!(daemon_left, "a process in a session of its own was killed");
}

/// Starting a server never touches what a live server's commands run.
#[tokio::test]
async fn starting_a_server_leaves_a_live_servers_commands_alone() {
    let first_dir = tempfile::tempdir().unwrap();
    let pid_file = first_dir.path().join("pid");
    let script = format!("sleep 60 & echo $! > '{}'; wait", pid_file.display());
    let (first, grandchild) = run_script(first_dir.path(), &script, &pid_file).await;

    let second_dir = tempfile::tempdir().unwrap();
    let config = exec_config(second_dir.path(), "exit 0");
    let addr = free_addr();
    let second = spawn_server(&second_dir.path().join("data"), &config, addr);
    // Ready to answer means its start, and so its sweep, is over.
    connect(addr).await;
    let survived = !process_gone(grandchild);

    drop((first, second)); // killed and reaped
    reap(grandchild);
    assert!(survived, "a live server's command was killed");
}

/// `value` as a TOML basic string.
fn toml_string(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}
