//! End to end: `longrun watch` keeps following a job across a server restart.

#[path = "cli/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{COMMAND_TIMEOUT, TestServer, command, longrun};
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// The watch survives a server restart: it says so on stderr, resumes after the last version
/// it saw, shows nothing twice, sees the interruption (back to QUEUED) and the rerun, and
/// exits 0 when the job succeeds on the new server.
#[tokio::test]
async fn watch_resumes_across_a_server_restart() {
    let server = TestServer::start().await;
    let (addr, store, url) = (server.addr, server.store.clone(), server.url());
    let submitted = longrun(
        &url,
        &[
            "submit",
            "--action",
            r#"sleep:{"duration_ms":1500,"steps":15}"#,
        ],
    )
    .await;
    let id = submitted.first_line();

    let mut child = command(&url, &["watch", &id, "--output", "json"])
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut lines = Vec::new();
    // Restart once the job is visibly running.
    tokio::time::timeout(COMMAND_TIMEOUT, async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            let running = line.contains("step 2 of 15");
            lines.push(line);
            if running {
                return;
            }
        }
        panic!("the watch ended early: {lines:?}");
    })
    .await
    .expect("the job starts running");

    server.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the watcher finds nobody there
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("rebind the same port");
    let _server = TestServer::start_on(listener, store).await;

    let rest = tokio::time::timeout(COMMAND_TIMEOUT, async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            lines.push(line);
        }
        let mut stderr = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr)
            .await
            .unwrap();
        (child.wait().await.unwrap(), stderr)
    })
    .await
    .expect("the watch ends after the restart");
    let (status, stderr) = rest;
    assert_eq!(status.code(), Some(0), "{stderr}\n{lines:#?}");
    assert!(stderr.contains("connection lost"), "{stderr}");
    assert!(stderr.contains("resuming after version"), "{stderr}");

    let jobs: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["job"].clone())
        .collect();
    let versions: Vec<i64> = jobs
        .iter()
        .map(|j| j["version"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "nothing twice, never backwards: {versions:?}"
    );
    let states: Vec<&str> = jobs.iter().map(|j| j["state"].as_str().unwrap()).collect();
    let requeued = states
        .iter()
        .position(|s| *s == "JOB_STATE_QUEUED")
        .expect("saw the interruption");
    assert!(
        states[..requeued].contains(&"JOB_STATE_RUNNING"),
        "{states:?}"
    );
    assert_eq!(states.last(), Some(&"JOB_STATE_SUCCEEDED"), "{states:?}");
    assert_eq!(
        jobs.last().unwrap()["attempt"],
        2,
        "rerun after the interruption"
    );
}
