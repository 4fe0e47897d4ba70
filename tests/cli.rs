//! End to end: the real `longrun` binary against a real server on loopback.

#[path = "cli/harness.rs"]
mod harness;

use harness::{TestServer, longrun};

const SHORT_SLEEP: &str = r#"sleep:{"duration_ms":100,"steps":2}"#;
const LONG_SLEEP: &str = r#"sleep:{"duration_ms":60000,"steps":60}"#;

#[tokio::test]
async fn submit_with_wait_prints_the_finished_job_as_proto3_json() {
    let server = TestServer::start().await;
    let run = longrun(
        &server.url(),
        &[
            "submit",
            "--action",
            SHORT_SLEEP,
            "--action",
            r#"echo:{"message":"hi"}"#,
            "--label",
            "team=cli",
            "--wait",
            "10s",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let lines = run.json_lines();
    assert_eq!(lines.len(), 1, "{run:?}");
    let job = &lines[0]["job"];
    assert_eq!(job["state"], "JOB_STATE_SUCCEEDED");
    assert_eq!(job["labels"]["team"], "cli");
    assert_eq!(job["maxAttempts"], 1, "proto3 JSON names: {job}");
    assert_eq!(job["actions"][0]["result"]["slept_ms"], 100, "{job}");
    assert_eq!(
        job["actions"][1]["result"]["params"]["message"], "hi",
        "{job}"
    );
}

#[tokio::test]
async fn submit_watch_of_a_short_sleep_exits_zero_with_the_summary() {
    let server = TestServer::start().await;
    let run = longrun(
        &server.url(),
        &["submit", "--action", SHORT_SLEEP, "--watch"],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let id = run.first_line();
    assert_eq!(id.len(), 36, "the id comes first: {run:?}");
    assert!(run.stdout.contains(&format!("job {id} RUNNING")), "{run:?}");
    assert!(run.stdout.contains("step 2 of 2"), "{run:?}");
    assert!(run.stdout.contains("state:    SUCCEEDED"), "{run:?}");
}

#[tokio::test]
async fn submit_watch_of_a_failing_job_exits_one_and_says_why() {
    let server = TestServer::start().await;
    let run = longrun(
        &server.url(),
        &[
            "submit",
            "--action",
            r#"fail:{"message":"boom"}"#,
            "--action",
            "echo",
            "--watch",
        ],
    )
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("state:    FAILED"), "{run:?}");
    assert!(
        run.stdout.contains("INTERNAL FAILED_AS_ASKED: boom"),
        "{run:?}"
    );
    assert!(run.stdout.contains("[1] echo  SKIPPED"), "{run:?}");
}

#[tokio::test]
async fn status_cancel_wait_and_list_follow_one_job() {
    let server = TestServer::start().await;
    let url = server.url();
    let submitted = longrun(
        &url,
        &["submit", "--action", LONG_SLEEP, "--label", "suite=cancel"],
    )
    .await;
    assert_eq!(submitted.code, 0, "{submitted:?}");
    let id = submitted.first_line();

    let status = longrun(&url, &["status", &id, "--output", "json"]).await;
    assert_eq!(status.code, 0, "{status:?}");
    assert_eq!(status.json_lines()[0]["job"]["id"], id.as_str());

    let not_yet = longrun(&url, &["wait", &id, "--timeout", "100ms"]).await;
    assert_eq!(not_yet.code, 4, "the wait ran out first: {not_yet:?}");
    assert!(
        not_yet
            .stdout
            .ends_with("done:     no, the wait ran out first\n"),
        "{not_yet:?}"
    );

    let cancel = longrun(&url, &["cancel", &id]).await;
    assert_eq!(cancel.code, 0, "{cancel:?}");
    assert!(cancel.stdout.starts_with(&id), "{cancel:?}");

    let waited = longrun(&url, &["wait", &id, "--timeout", "10s"]).await;
    assert_eq!(waited.code, 3, "CANCELLED: {waited:?}");
    assert!(waited.stdout.contains("state:    CANCELLED"), "{waited:?}");
    assert!(
        waited.stdout.ends_with("done:     yes, the job ended\n"),
        "{waited:?}"
    );

    let listed = longrun(
        &url,
        // Either case: the text output prints states in capitals.
        &["list", "--state", "CANCELLED", "--label", "suite=cancel"],
    )
    .await;
    assert_eq!(listed.code, 0, "{listed:?}");
    assert!(
        listed.stdout.starts_with(&format!("{id}  CANCELLED")),
        "{listed:?}"
    );
    let none = longrun(
        &url,
        &[
            "list",
            "--state",
            "running,queued",
            "--label",
            "suite=cancel",
        ],
    )
    .await;
    assert!(!none.stdout.contains(&id), "{none:?}");

    let deleted = longrun(&url, &["delete", &id]).await;
    assert_eq!(deleted.code, 0, "{deleted:?}");
    assert_eq!(deleted.stdout, format!("{id} deleted\n"));
    let gone = longrun(&url, &["status", &id]).await;
    assert_eq!(gone.code, 5, "{gone:?}");
    assert!(gone.stderr.contains("NOT_FOUND"), "{gone:?}");
    let again = longrun(&url, &["delete", &id, "--output", "json"]).await;
    assert_eq!(again.code, 5, "{again:?}");
}

#[tokio::test]
async fn delete_refuses_an_unfinished_job_and_says_so() {
    let server = TestServer::start().await;
    let url = server.url();
    let id = longrun(&url, &["submit", "--action", LONG_SLEEP])
        .await
        .first_line();
    let refused = longrun(&url, &["delete", &id]).await;
    assert_eq!(refused.code, 5, "{refused:?}");
    assert!(
        refused.stderr.contains("FAILED_PRECONDITION"),
        "{refused:?}"
    );
    let cancelled = longrun(&url, &["cancel", &id]).await;
    assert_eq!(cancelled.code, 0, "{cancelled:?}");
    longrun(&url, &["wait", &id, "--timeout", "10s"]).await;
    let deleted = longrun(&url, &["delete", &id, "--output", "json"]).await;
    assert_eq!(deleted.code, 0, "{deleted:?}");
    assert_eq!(deleted.stdout, "{}\n", "the empty DeleteJobResponse");
}

#[tokio::test]
async fn list_all_follows_page_tokens() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let run = longrun(
            &url,
            &["submit", "--action", "echo", "--label", "suite=pages"],
        )
        .await;
        ids.push(run.first_line());
    }
    let run = longrun(
        &url,
        &[
            "list",
            "--label",
            "suite=pages",
            "--page-size",
            "1",
            "--all",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let pages = run.json_lines();
    assert_eq!(pages.len(), 3, "one page per line: {run:?}");
    let listed: Vec<&str> = pages
        .iter()
        .map(|p| p["jobs"][0]["id"].as_str().unwrap())
        .collect();
    ids.reverse(); // newest first
    assert_eq!(listed, ids);
}

#[tokio::test]
async fn actions_lists_names_descriptions_and_params() {
    let server = TestServer::start().await;
    let run = longrun(&server.url(), &["actions"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    for expected in ["sleep", "echo", "sha256", "fail", "duration_ms (integer)"] {
        assert!(run.stdout.contains(expected), "{expected}: {run:?}");
    }
    let json = longrun(&server.url(), &["actions", "--output", "json"]).await;
    assert!(
        json.json_lines()[0]["actions"]
            .as_array()
            .is_some_and(|a| a.len() >= 4)
    );
}

#[tokio::test]
async fn a_bad_request_names_the_field_and_exits_five() {
    let server = TestServer::start().await;
    let run = longrun(
        &server.url(),
        &["submit", "--action", r#"sleep:{"steps":0}"#],
    )
    .await;
    assert_eq!(run.code, 5, "{run:?}");
    assert!(run.stderr.contains("INVALID_ARGUMENT"), "{run:?}");
    assert!(
        run.stderr.contains("\n  actions[0].params.steps: "),
        "{run:?}"
    );
}

#[tokio::test]
async fn input_files_and_job_files_are_sent() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.bin");
    std::fs::write(&input, b"abc").unwrap();
    let input = input.to_str().unwrap();
    let run = longrun(
        &server.url(),
        &[
            "submit",
            "--action",
            "sha256",
            "--input-file",
            input,
            "--wait",
            "10s",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let result = &run.json_lines()[0]["job"]["actions"][0]["result"];
    assert_eq!(
        result["sha256"],
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );

    let job_file = dir.path().join("job.json");
    std::fs::write(
        &job_file,
        r#"{"actions": [{"name": "echo", "params": {"message": "from file"}, "input": "aGk="}],
            "labels": {"from": "file"}, "max_attempts": 2}"#,
    )
    .unwrap();
    let run = longrun(
        &server.url(),
        &[
            "submit",
            "--file",
            job_file.to_str().unwrap(),
            "--priority",
            "7",
            "--wait",
            "10s",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let job = &run.json_lines()[0]["job"];
    assert_eq!(job["actions"][0]["result"]["input"], "hi", "{job}");
    assert_eq!(
        (job["priority"].clone(), job["maxAttempts"].clone()),
        (7.into(), 2.into())
    );
}

#[tokio::test]
async fn mistakes_on_the_command_line_exit_two() {
    let server = TestServer::start().await;
    let run = longrun(&server.url(), &["submit", "--action", r#"sleep:{"steps":"#]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("not valid JSON"), "{run:?}");
    let run = longrun(
        &server.url(),
        &["submit", "--file", "/nonexistent/job.json"],
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    let run = longrun(&server.url(), &["list", "--state", "sleeping"]).await;
    assert_eq!(run.code, 2, "clap's own usage error: {run:?}");
}

#[tokio::test]
async fn an_unreachable_server_is_explained() {
    // A port that was free a moment ago, so nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = longrun(&format!("127.0.0.1:{port}"), &["status", "x"]).await;
    assert_eq!(run.code, 5, "{run:?}");
    assert!(
        run.stderr.contains("cannot reach longrun at 127.0.0.1:"),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("is `longrun serve` running?"),
        "{run:?}"
    );
}

#[tokio::test]
async fn watch_json_prints_each_snapshot_with_rising_versions() {
    let server = TestServer::start().await;
    let submitted = longrun(&server.url(), &["submit", "--action", SHORT_SLEEP]).await;
    let id = submitted.first_line();
    let run = longrun(&server.url(), &["watch", &id, "--output", "json"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let versions: Vec<i64> = run
        .json_lines()
        .iter()
        .map(|line| line["job"]["version"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    let last = run.json_lines().pop().unwrap();
    assert_eq!(last["job"]["state"], "JOB_STATE_SUCCEEDED");
}

/// `hash-key` without a key on stdin is a usage mistake: exit code 2 and `error:`, as for
/// every other command (1 means "the job ended FAILED").
#[tokio::test]
async fn hash_key_without_a_key_is_a_usage_error() {
    let run = longrun("http://127.0.0.1:9", &["hash-key"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.starts_with("error: no key on stdin"), "{run:?}");
}

/// A key no client could send in its `authorization` header would match nothing: refused.
#[tokio::test]
async fn hash_key_refuses_a_key_that_is_not_printable_ascii() {
    use tokio::io::AsyncWriteExt as _;
    let mut child = harness::command("http://127.0.0.1:9", &["hash-key"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all("äöü\n".as_bytes()).await.unwrap();
    drop(stdin);
    let output = tokio::time::timeout(harness::COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("printable ASCII"), "{stderr}");
    assert!(output.stdout.is_empty());
}

/// TLS files that do not hold what their flag takes are mistakes on the command line (exit 2,
/// naming the flag and the file), not a server whose certificate is not trusted (exit 5).
#[tokio::test]
async fn tls_files_without_a_pem_certificate_or_key_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("random.bin");
    std::fs::write(&garbage, [0x8b_u8, 0x00, 0xff, 0x17]).unwrap();
    let key = dir.path().join("key.pem");
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let garbage = garbage.to_str().unwrap();
    let key = key.to_str().unwrap();
    for (args, why) in [
        (vec!["--ca-cert", garbage], "--ca-cert"),
        (vec!["--ca-cert", key], "--ca-cert"),
        (
            vec!["--client-cert", key, "--client-key", key],
            "--client-cert",
        ),
    ] {
        let mut all = vec!["list"];
        all.extend(args);
        let run = longrun("https://127.0.0.1:9", &all).await;
        assert_eq!(run.code, 2, "{all:?}: {run:?}");
        assert!(
            run.stderr.contains(why) && run.stderr.contains("holds no PEM"),
            "{all:?}: {run:?}"
        );
    }
}

/// An https:// address for a server without TLS says so, instead of asking whether the
/// server is running.
#[tokio::test]
async fn an_https_address_for_a_plaintext_server_says_it_does_not_answer_tls() {
    let server = TestServer::start().await;
    let url = server.url().replacen("http://", "https://", 1);
    let run = longrun(&url, &["list"]).await;
    assert_eq!(run.code, 5, "{run:?}");
    assert!(run.stderr.contains("does not answer TLS"), "{run:?}");
}

/// Priority is an int32: `--priority -5` is a number, not an unknown flag.
#[tokio::test]
async fn a_negative_priority_is_accepted() {
    let server = TestServer::start().await;
    let run = longrun(
        &server.url(),
        &[
            "submit",
            "--action",
            "echo",
            "--priority",
            "-5",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json_lines()[0]["job"]["priority"], -5, "{run:?}");
}

#[tokio::test]
async fn submit_at_a_time_shows_it_as_due_and_the_job_waits_for_it() {
    let server = TestServer::start().await;
    let at = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() + std::time::Duration::from_secs(2 * 86400),
    )
    .to_string();
    let run = longrun(&server.url(), &["submit", "--action", "echo", "--at", &at]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("state:    QUEUED"), "{run:?}");
    assert!(run.stdout.contains(&format!("due:      {at}")), "{run:?}");
    let id = run.first_line();

    let status = longrun(&server.url(), &["status", &id, "--output", "json"]).await;
    assert_eq!(status.code, 0, "{status:?}");
    let job = &status.json_lines()[0]["job"];
    assert_eq!(job["state"], "JOB_STATE_QUEUED", "{status:?}");
    assert_eq!(job["scheduleTime"], at.as_str(), "{status:?}");

    let soon = longrun(
        &server.url(),
        &[
            "submit", "--action", "echo", "--delay", "300ms", "--wait", "20s",
        ],
    )
    .await;
    assert_eq!(soon.code, 0, "ran once due: {soon:?}");
    assert!(soon.stdout.contains("SUCCEEDED"), "{soon:?}");
}

/// Only plaintext (`host:port`, `http://`) and TLS (`https://`) addresses exist; any other
/// scheme is a mistake on the command line, not something to send as plaintext anyway.
#[tokio::test]
async fn an_address_with_another_scheme_is_a_usage_error() {
    let server = TestServer::start().await;
    let url = server.url().replacen("http://", "ftp://", 1);
    let run = longrun(&url, &["list"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--addr \"ftp://"), "{run:?}");
}

/// An address without a usable port is a mistake on the command line (exit 2), not a server
/// that is not running: without the check it reached port 80, or a port parsed out of junk.
#[tokio::test]
async fn an_address_without_a_usable_port_is_a_usage_error() {
    for (addr, why) in [
        ("127.0.0.1", "has no port"),
        ("127.0.0.1:http", "not a port number"),
        ("127.0.0.1:70000", "not a port number"),
    ] {
        let run = longrun(addr, &["list"]).await;
        assert_eq!(run.code, 2, "{addr}: {run:?}");
        assert!(
            run.stderr
                .starts_with(&format!("error: --addr \"{addr}\" "))
                && run.stderr.contains(why),
            "{addr}: {run:?}"
        );
    }
}

/// A reader that closes stdout early (`ID=$(longrun submit ... | head -1)`) ends the output,
/// not the command: no error, and the exit code is the command's outcome, never 5.
#[tokio::test]
async fn a_closed_stdout_ends_the_output_not_the_command() {
    let server = TestServer::start().await;
    let url = server.url();
    let watched = longrun(&url, &["submit", "--action", SHORT_SLEEP]).await;
    let id = watched.first_line();
    let runs: [(&[&str], i32); 6] = [
        (&["submit", "--action", "echo"], 0),
        (&["submit", "--action", "echo", "--wait", "10s"], 0),
        (&["submit", "--action", "fail", "--wait", "10s"], 1),
        (&["submit", "--action", "echo", "--watch"], 0),
        (&["watch", &id], 0),
        (&["list", "--all", "--page-size", "1"], 0),
    ];
    for (args, expected) in runs {
        // The read end is gone before the child starts, so its first write meets EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let child = harness::command(&url, args).stdout(writer).spawn().unwrap();
        let output = tokio::time::timeout(harness::COMMAND_TIMEOUT, child.wait_with_output())
            .await
            .expect("ends")
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("error"), "{args:?}: {stderr}");
    }
    // hash-key too, which talks to no server: its one line goes nowhere, without a panic.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = harness::command(&url, &["hash-key"])
        .stdin(std::process::Stdio::piped())
        .stdout(writer)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"a-key\n")
        .await
        .unwrap();
    drop(stdin);
    let output = tokio::time::timeout(harness::COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .expect("ends")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "hash-key: {stderr}");
    assert!(stderr.is_empty(), "hash-key: {stderr}");
}

/// `submit --watch` of a job that has already ended (an idempotent resubmission, a `--file`
/// that waits) shows it and exits with its outcome at once: there is nothing left to follow,
/// and an empty stream after the terminal version is not a lost connection.
#[tokio::test]
async fn submit_watch_of_a_job_that_already_ended_exits_with_its_outcome() {
    let server = TestServer::start().await;
    let url = server.url();
    let key = ["--idempotency-key", "ended-already"];
    let first = longrun(
        &url,
        &[&["submit", "--action", "echo", "--wait", "10s"], &key[..]].concat(),
    )
    .await;
    assert_eq!(first.code, 0, "{first:?}");
    // Without the fix this resumes after the terminal version until --reconnect-for, exit 5.
    let again = longrun(
        &url,
        &[
            &[
                "submit",
                "--action",
                "echo",
                "--watch",
                "--reconnect-for",
                "2s",
            ],
            &key[..],
        ]
        .concat(),
    )
    .await;
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(again.first_line(), first.first_line(), "the same job");
    assert!(again.stdout.contains("state:    SUCCEEDED"), "{again:?}");
    assert!(!again.stderr.contains("connection lost"), "{again:?}");

    let dir = tempfile::tempdir().unwrap();
    let job_file = dir.path().join("job.json");
    std::fs::write(
        &job_file,
        r#"{"actions": [{"name": "fail", "params": {"message": "boom"}}], "wait": "10s"}"#,
    )
    .unwrap();
    let run = longrun(
        &url,
        &[
            "submit",
            "--file",
            job_file.to_str().unwrap(),
            "--watch",
            "--reconnect-for",
            "2s",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(run.code, 1, "FAILED: {run:?}");
    let lines = run.json_lines();
    assert_eq!(
        lines.len(),
        2,
        "the SubmitResponse, then one WatchJobResponse: {run:?}"
    );
    assert_eq!(lines[1]["job"]["state"], "JOB_STATE_FAILED", "{run:?}");
}

/// An empty page of `list` prints nothing (not a blank line), and a certificate file that
/// cannot be read is a mistake on the command line, as an unreadable --file is.
#[tokio::test]
async fn an_empty_list_prints_nothing_and_an_unreadable_certificate_is_a_usage_error() {
    let server = TestServer::start().await;
    let run = longrun(&server.url(), &["list"]).await;
    assert_eq!((run.code, run.stdout.as_str()), (0, ""), "{run:?}");

    let url = server.url().replacen("http://", "https://", 1);
    let run = longrun(&url, &["list", "--ca-cert", "/nonexistent/ca.pem"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .starts_with("error: --ca-cert: reading /nonexistent/ca.pem"),
        "{run:?}"
    );
}

/// A CLI started inside a trace (`TRACEPARENT`, as OpenTelemetry passes a trace context to a
/// process) sends it with its calls, so the job it submits joins that trace; an invalid one
/// is not sent.
#[tokio::test]
async fn submit_passes_on_the_trace_context_it_was_started_in() {
    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let server = TestServer::start().await;
    let mut ids = Vec::new();
    for traceparent in [PARENT, "not-a-trace-context"] {
        let mut command = harness::command(&server.url(), &["submit", "--action", "echo"]);
        command
            .env("TRACEPARENT", traceparent)
            .env("TRACESTATE", "rojo=00f067aa0ba902b7");
        let output = tokio::time::timeout(std::time::Duration::from_secs(30), command.output())
            .await
            .expect("submit ends in time")
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let id = String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        ids.push(id.parse::<longrun::job::JobId>().unwrap());
    }
    let stored = |id| {
        let store = std::sync::Arc::clone(&server.store);
        async move { store.get(id).await.unwrap().expect("the job is stored") }
    };
    let traced = stored(ids[0]).await.trace.expect("a trace context");
    assert_eq!(traced.parent.to_string(), PARENT);
    assert_eq!(
        traced.state.map(|s| s.to_string()),
        Some("rojo=00f067aa0ba902b7".to_owned())
    );
    assert_eq!(
        stored(ids[1]).await.trace,
        None,
        "a state goes only with a trace context"
    );
}

/// A running `longrun` whose stdout lines are read as they come, and which is interrupted as
/// Ctrl-C would.
struct Following {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Following {
    fn start(url: &str, args: &[&str]) -> Self {
        let mut child = harness::command(url, args).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        Self {
            child,
            lines: tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout)),
        }
    }

    /// The next `n` stdout lines (bounded).
    async fn next_lines(&mut self, n: usize) -> Vec<String> {
        let mut lines = Vec::new();
        while lines.len() < n {
            let line =
                tokio::time::timeout(std::time::Duration::from_secs(20), self.lines.next_line())
                    .await
                    .expect("a line in time")
                    .unwrap()
                    .expect("still running");
            lines.push(line);
        }
        lines
    }

    /// Sends SIGINT; the exit code, stderr, and the lines printed since the last read.
    async fn interrupt(mut self) -> (i32, String, Vec<String>) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id().unwrap()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let mut rest = Vec::new();
        while let Some(line) =
            tokio::time::timeout(std::time::Duration::from_secs(20), self.lines.next_line())
                .await
                .expect("stdout closes in time")
                .unwrap()
        {
            rest.push(line);
        }
        let output = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            self.child.wait_with_output(),
        )
        .await
        .expect("ends in time")
        .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stderr).into_owned(),
            rest,
        )
    }
}

/// Submits a job of `actions` with the label `batch=NAME`; its id.
async fn submit_labelled(url: &str, batch: &str, actions: &[&str]) -> String {
    let label = format!("batch={batch}");
    let mut args = vec!["submit", "--label", &label];
    for action in actions {
        args.extend(["--action", action]);
    }
    let run = longrun(url, &args).await;
    assert_eq!(run.code, 0, "{run:?}");
    run.first_line()
}

#[tokio::test]
async fn watch_jobs_until_done_follows_a_batch_to_its_end_and_exits_with_its_outcome() {
    let server = TestServer::start().await;
    let url = server.url();
    // Long enough that both are still running when the watch has started, on a slow machine
    // too.
    let slow = r#"sleep:{"duration_ms":1500,"steps":3}"#;
    let succeeding = submit_labelled(&url, "nightly", &[slow]).await;
    let failing =
        submit_labelled(&url, "nightly", &[slow, r#"fail:{"message":"disk full"}"#]).await;
    let other = submit_labelled(&url, "other", &[slow]).await;
    let run = longrun(
        &url,
        &["watch-jobs", "--label", "batch=nightly", "--until-done"],
    )
    .await;
    assert_eq!(run.code, 1, "a job of the batch failed: {run:?}");
    assert!(
        run.stderr
            .contains("every job followed has ended: 1 FAILED, 1 SUCCEEDED"),
        "{run:?}"
    );
    let lines: Vec<&str> = run.stdout.lines().collect();
    let ended = |id: &str, state: &str| {
        lines
            .iter()
            .any(|line| line.contains(id) && line.contains(&format!("  {state}")))
    };
    assert!(ended(&succeeding, "SUCCEEDED"), "{run:?}");
    assert!(ended(&failing, "FAILED"), "{run:?}");
    assert!(
        lines
            .iter()
            .any(|line| line.contains(&failing) && line.contains("FAILED_AS_ASKED: disk full")),
        "a failure says why: {run:?}"
    );
    assert!(
        lines.iter().any(|line| line.contains("step 2 of 3")),
        "progress is shown as it comes: {run:?}"
    );
    assert!(
        !run.stdout.contains(&other),
        "other labels are not shown: {run:?}"
    );

    // Nothing unfinished: done at once.
    let run = longrun(
        &url,
        &["watch-jobs", "--label", "batch=nightly", "--until-done"],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stderr.contains("no matching job is unfinished"),
        "{run:?}"
    );
}

#[tokio::test]
async fn watch_jobs_interrupted_names_its_cursor_and_resumes_from_it_missing_nothing() {
    let server = TestServer::start().await;
    let url = server.url();
    let step = r#"sleep:{"duration_ms":900,"steps":3}"#;
    let mut watch = Following::start(
        &url,
        &["watch-jobs", "--label", "batch=resume", "--output", "json"],
    );
    let first = submit_labelled(&url, "resume", &[step]).await;
    // QUEUED or RUNNING first, then a few changes.
    let mut seen = watch.next_lines(2).await;
    let (code, stderr, printed_since) = watch.interrupt().await;
    // Lines printed before the signal was handled count too.
    seen.extend(printed_since);
    assert_eq!(code, 130, "{stderr}");
    let cursor = stderr
        .split("resume with --after-cursor ")
        .nth(1)
        .map(str::trim)
        .unwrap_or_else(|| panic!("the cursor is named: {stderr}"))
        .to_owned();
    let last: serde_json::Value = serde_json::from_str(seen.last().unwrap()).unwrap();
    assert_eq!(
        last["cursor"],
        cursor.as_str(),
        "the cursor of the last line"
    );

    // Changes made while nobody watched come first after resuming, then the rest.
    let second = submit_labelled(&url, "resume", &[step]).await;
    let mut resumed = Following::start(
        &url,
        &[
            "watch-jobs",
            "--label",
            "batch=resume",
            "--output",
            "json",
            "--after-cursor",
            &cursor,
        ],
    );
    let mut versions: std::collections::HashMap<String, Vec<i64>> = Default::default();
    for line in seen {
        let message: serde_json::Value = serde_json::from_str(&line).unwrap();
        let job = &message["job"];
        versions
            .entry(job["id"].as_str().unwrap().to_owned())
            .or_default()
            .push(job["version"].as_str().unwrap().parse().unwrap());
    }
    let mut ended = std::collections::HashSet::new();
    while ended.len() < 2 {
        let line = resumed.next_lines(1).await.remove(0);
        let message: serde_json::Value = serde_json::from_str(&line).unwrap();
        let job = &message["job"];
        let id = job["id"].as_str().unwrap().to_owned();
        versions
            .entry(id.clone())
            .or_default()
            .push(job["version"].as_str().unwrap().parse().unwrap());
        if job["state"] == "JOB_STATE_SUCCEEDED" {
            ended.insert(id);
        }
    }
    resumed.interrupt().await;
    assert_eq!(ended, [first.clone(), second.clone()].into_iter().collect());
    for (id, seen) in &versions {
        assert!(
            seen.windows(2).all(|pair| pair[0] < pair[1]),
            "{id}: versions rise, none repeated: {seen:?}"
        );
    }
}

/// An address that answers, but not with gRPC over plaintext HTTP/2 (here an HTTP/1.1 server;
/// a TLS server addressed with http:// breaks the same way) is told at once by the commands
/// that reconnect, rather than retried for --reconnect-for as a lost connection would be.
#[tokio::test]
async fn commands_that_reconnect_tell_an_address_that_speaks_no_grpc_at_once() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let http1 = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = [0; 1024];
            let _ = socket.read(&mut request).await;
            let _ = socket
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
        }
    });
    let id = "0190b6c4-7d1e-7c3a-9f0e-1b2c3d4e5f60";
    for args in [
        &["wait", id][..],
        &["watch", id],
        &["watch-jobs", "--label", "a=b"],
        &["submit", "--action", "echo"],
    ] {
        let args = [args, &["--reconnect-for", "25s"]].concat();
        let run = longrun(&url, &args).await;
        assert_eq!(run.code, 5, "{args:?}: {run:?}");
        assert!(
            run.stderr
                .contains("does not answer gRPC over plaintext HTTP/2"),
            "{args:?}: {run:?}"
        );
        assert!(!run.stderr.contains("gave up reconnecting"), "{run:?}");
    }
    http1.abort();

    // A peer that accepts and closes (a TCP proxy whose backend restarts) is not told apart
    // from a server that went away: retried as a lost connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let closing = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    let run = longrun(&url, &["wait", id, "--reconnect-for", "1s"]).await;
    assert_eq!(run.code, 5, "{run:?}");
    assert!(run.stderr.contains("gave up reconnecting"), "{run:?}");
    assert!(!run.stderr.contains("does not answer gRPC"), "{run:?}");
    closing.abort();
}

/// The webhook secret comes from `--webhook-secret` or LONGRUN_WEBHOOK_SECRET; the flag
/// without a webhook is a mistake, the variable without one is left unused.
#[tokio::test]
async fn a_webhook_secret_comes_from_the_flag_or_the_environment() {
    let server = TestServer::start().await;
    let url = server.url();
    // No default secret on this server, and loopback is not an allowed webhook host: a
    // request carrying a secret is refused for its URL alone, one without for its secret too.
    let hook = [
        "submit",
        "--action",
        "echo",
        "--webhook-url",
        "http://127.0.0.1:9/x",
    ];
    let run = |env: Option<&'static str>, args: Vec<&'static str>| {
        let mut command = harness::command(&url, &args);
        command.env_remove("LONGRUN_WEBHOOK_SECRET");
        if let Some(secret) = env {
            command.env("LONGRUN_WEBHOOK_SECRET", secret);
        }
        async move {
            let output = command.output().await.expect("run longrun");
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        }
    };
    let (code, stderr) = run(None, hook.to_vec()).await;
    assert_eq!(code, Some(5), "{stderr}");
    assert!(stderr.contains("webhook.secret"), "{stderr}");
    let (code, stderr) = run(Some("from-env"), hook.to_vec()).await;
    assert_eq!(code, Some(5), "{stderr}");
    assert!(
        stderr.contains("webhook.url") && !stderr.contains("webhook.secret"),
        "{stderr}"
    );
    let (code, stderr) = run(
        None,
        vec!["submit", "--action", "echo", "--webhook-secret", "s"],
    )
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--webhook-secret needs --webhook-url"),
        "{stderr}"
    );
    let (code, stderr) = run(Some("unused"), vec!["submit", "--action", "echo"]).await;
    assert_eq!(code, Some(0), "{stderr}");
}
