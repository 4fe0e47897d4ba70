//! End to end: `longrun watch`, `wait` and `submit --wait` keep following a job across a
//! server restart.

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
    let url = server.url();
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

    let (child, mut stdout, mut lines) =
        spawn_until(&url, &["watch", &id, "--output", "json"], "step 2 of 15").await;
    let _server = restart(server).await;
    let (status, stderr) = rest_of(child, &mut stdout, &mut lines).await;
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
    // Rerun after the interruption: a graceful stop does not use up the attempt (a crash does).
    assert_eq!(
        jobs.last().unwrap()["attempt"],
        1,
        "the same attempt, run again"
    );
}

type StdoutLines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// Starts `longrun ARGS` and reads its stdout (bounded) up to the first line containing
/// `marker`: the command, the rest of its stdout, and the lines read.
async fn spawn_until(
    url: &str,
    args: &[&str],
    marker: &str,
) -> (tokio::process::Child, StdoutLines, Vec<String>) {
    let mut child = command(url, args).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut lines = Vec::new();
    tokio::time::timeout(COMMAND_TIMEOUT, async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            let found = line.contains(marker);
            lines.push(line);
            if found {
                return;
            }
        }
        panic!("the command ended before printing {marker:?}: {lines:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("{marker:?} is printed in time"));
    (child, stdout, lines)
}

/// Reads the rest of a command's stdout into `lines` and waits (bounded) for it to end: its
/// exit status and stderr.
async fn rest_of(
    mut child: tokio::process::Child,
    stdout: &mut StdoutLines,
    lines: &mut Vec<String>,
) -> (std::process::ExitStatus, String) {
    tokio::time::timeout(COMMAND_TIMEOUT, async {
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
    .expect("the command ends after the restart")
}

/// Polls (bounded) until some job runs on the server at `url`.
async fn until_a_job_runs(url: &str) {
    tokio::time::timeout(COMMAND_TIMEOUT, async {
        loop {
            let running = longrun(url, &["list", "--state", "running"]).await;
            if !running.stdout.trim().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the job starts running");
}

/// Stops the server as SIGTERM would, mid-job, and starts another on the same port and store.
async fn restart(server: TestServer) -> TestServer {
    let (addr, store) = (server.addr, server.store.clone());
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the client finds nobody there
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("rebind the same port");
    TestServer::start_on(listener, store).await
}

/// Waits (bounded) for a spawned command and returns its exit code, stdout and stderr.
async fn finish(child: tokio::process::Child) -> (Option<i32>, String, String) {
    let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .expect("the command ends after the restart")
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `wait` (no --timeout) waits for the job's end, not for the server's: a drain in the middle
/// is a lost connection to get back, as for `watch`, not "the wait ran out" (exit 4).
#[tokio::test]
async fn wait_goes_on_across_a_server_restart() {
    let server = TestServer::start().await;
    let url = server.url();
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
    let child = command(&url, &["wait", &id]).spawn().unwrap();
    until_a_job_runs(&url).await;
    let _server = restart(server).await;

    let (code, stdout, stderr) = finish(child).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("state:    SUCCEEDED"), "{stdout}");
    assert!(
        stdout.ends_with("done:     yes, the job ended\n"),
        "{stdout}"
    );
    assert!(stderr.contains("connection lost"), "{stderr}");
    assert!(stderr.contains("waiting again in"), "{stderr}");
}

/// `submit --wait` that the server answers early because it shuts down goes on waiting, with
/// WaitJob, for what is left of its time, and ends with the job's outcome.
#[tokio::test]
async fn submit_wait_goes_on_across_a_server_restart() {
    let server = TestServer::start().await;
    let url = server.url();
    let child = command(
        &url,
        &[
            "submit",
            "--action",
            r#"sleep:{"duration_ms":1500,"steps":15}"#,
            "--wait",
            "25s",
            "--output",
            "json",
        ],
    )
    .spawn()
    .unwrap();
    until_a_job_runs(&url).await;
    let _server = restart(server).await;

    let (code, stdout, stderr) = finish(child).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let response: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(response["job"]["state"], "JOB_STATE_SUCCEEDED", "{stdout}");
}

/// `wait --timeout` keeps its own time across reconnects: with the server gone for good it
/// ends when the timeout runs out (an error, the job's state unknown), not after
/// --reconnect-for.
#[tokio::test]
async fn wait_keeps_its_timeout_while_reconnecting() {
    let server = TestServer::start().await;
    let url = server.url();
    let submitted = longrun(&url, &["submit", "--action", LONG_SLEEP_ACTION]).await;
    let id = submitted.first_line();
    let started = std::time::Instant::now();
    let child = command(
        &url,
        &["wait", &id, "--timeout", "2s", "--reconnect-for", "1m"],
    )
    .spawn()
    .unwrap();
    until_a_job_runs(&url).await;
    server.stop().await;

    let (code, stdout, stderr) = finish(child).await;
    assert_eq!(code, Some(5), "{stdout}\n{stderr}");
    assert!(stderr.contains("waiting again in"), "{stderr}");
    assert!(
        stderr.contains("ran out while the server could not be reached"),
        "{stderr}"
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
}

const LONG_SLEEP_ACTION: &str = r#"sleep:{"duration_ms":60000,"steps":60}"#;

/// `submit --wait` whose server does not come back in time still says which job it submitted:
/// the job as last seen on stdout (its id on the first line), then the error and exit 5, so a
/// script does not submit it again.
#[tokio::test]
async fn submit_wait_that_loses_the_server_still_prints_the_job() {
    let server = TestServer::start().await;
    let url = server.url();
    let child = command(
        &url,
        &["submit", "--action", LONG_SLEEP_ACTION, "--wait", "2s"],
    )
    .spawn()
    .unwrap();
    until_a_job_runs(&url).await;
    server.stop().await;

    let (code, stdout, stderr) = finish(child).await;
    assert_eq!(code, Some(5), "{stdout}\n{stderr}");
    let id = stdout.lines().next().unwrap_or_default().to_owned();
    assert_eq!(id.len(), 36, "the job id first: {stdout}");
    assert!(stdout.contains("done:     unknown"), "{stdout}");
    assert!(
        stderr.contains(&format!(
            "job {id} was submitted, and how it stands is unknown"
        )),
        "{stderr}"
    );
}

/// `watch-jobs --until-done` survives a server restart too: it resumes from its last cursor,
/// prints nothing twice, and ends with the batch once the interrupted job has run again.
#[tokio::test]
async fn watch_jobs_until_done_resumes_across_a_server_restart() {
    let server = TestServer::start().await;
    let url = server.url();
    let submitted = longrun(
        &url,
        &[
            "submit",
            "--label",
            "batch=restart",
            "--action",
            r#"sleep:{"duration_ms":1500,"steps":15}"#,
        ],
    )
    .await;
    let id = submitted.first_line();

    let args = [
        "watch-jobs",
        "--label",
        "batch=restart",
        "--until-done",
        "--output",
        "json",
    ];
    let (child, mut stdout, mut lines) = spawn_until(&url, &args, "step 2 of 15").await;
    let _server = restart(server).await;
    let (status, stderr) = rest_of(child, &mut stdout, &mut lines).await;
    assert_eq!(status.code(), Some(0), "{stderr}\n{lines:#?}");
    assert!(stderr.contains("resuming from the last cursor"), "{stderr}");
    assert!(stderr.contains("1 SUCCEEDED"), "{stderr}");
    let versions: Vec<i64> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["job"].clone())
        .inspect(|job| assert_eq!(job["id"], id.as_str()))
        .map(|job| job["version"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(
        versions.windows(2).all(|pair| pair[0] < pair[1]),
        "versions rise, none repeated: {versions:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("JOB_STATE_QUEUED")),
        "the interruption (back to QUEUED) is seen: {lines:#?}"
    );
}
