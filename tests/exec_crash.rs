//! An `exec` command does not outlive a server killed with SIGKILL: it would otherwise run on
//! beside the attempt that recovery starts again, doing its work twice.

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
    let config = dir.path().join("longrun.toml");
    std::fs::write(
        &config,
        format!(
            "[exec.commands.long]\nprogram = \"/bin/sh\"\nargs = [\"-c\", {}]\n",
            toml_string(&script)
        ),
    )
    .unwrap();

    let addr = free_addr();
    let mut server = spawn_server(&dir.path().join("data"), &config, addr);
    let mut client = connect(addr).await;
    client
        .submit(pb::SubmitRequest {
            actions: vec![action("exec", serde_json::json!({"command": "long"}))],
            ..pb::SubmitRequest::default()
        })
        .await
        .expect("submit");
    assert!(
        eventually(|| std::fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n'))).await,
        "the command started"
    );
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!process_gone(pid), "the command runs while the server does");

    server.kill().expect("SIGKILL the server");
    server.wait().expect("reap the server");
    let gone = eventually(|| process_gone(pid)).await;
    if !gone {
        // Leave nothing behind on a failure.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(gone, "the command {pid} outlived the server");
}

/// `value` as a TOML basic string.
fn toml_string(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}
