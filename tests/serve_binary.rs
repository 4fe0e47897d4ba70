//! The `longrun serve` binary on its data directory: one server per directory, clear errors and
//! a non-zero exit for a directory it cannot use, and finished jobs removed after retention.

mod common;

use std::{
    process::{Command, Output, Stdio},
    sync::Arc,
    time::Duration,
};

use common::{PATIENCE, Spawned, TestServer, request, sleep, submit, test_config, wait_done};
use longrun::{
    actions::Registry,
    api::pb,
    store::{SqliteOptions, SqliteStore},
};

fn serve(dir: &std::path::Path, listen: &str) -> Spawned {
    Spawned::spawn(
        Command::new(env!("CARGO_BIN_EXE_longrun"))
            .args(["serve", "--listen", listen])
            .arg("--data-dir")
            .arg(dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
}

/// Runs `serve` expecting it to exit by itself, bounded.
fn serve_expecting_exit(dir: &std::path::Path) -> Output {
    serve(dir, "127.0.0.1:0").wait_bounded()
}

#[test]
fn a_port_in_use_is_refused_before_the_data_directory_is_created() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let output = serve(&dir, &addr).wait_bounded();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("listening on {addr}")), "{stderr}");
    assert!(
        !dir.exists(),
        "no data directory made for a server that cannot listen"
    );
}

#[test]
fn a_metrics_port_in_use_is_refused_before_the_data_directory_is_created() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let output = Spawned::spawn(
        Command::new(env!("CARGO_BIN_EXE_longrun"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                &addr,
            ])
            .arg("--data-dir")
            .arg(&dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .wait_bounded();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("serving metrics on {addr}")),
        "{stderr}"
    );
    assert!(
        !dir.exists(),
        "no data directory made for a server that cannot serve its metrics"
    );
}

#[test]
fn second_server_on_the_same_data_directory_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = serve(dir.path(), "127.0.0.1:0");
    // The first server holds the lock once its database exists.
    let deadline = std::time::Instant::now() + PATIENCE;
    while !dir.path().join("longrun.db").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "first server never opened its store"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let second = serve_expecting_exit(dir.path());
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("in use"), "says why: {stderr}");
    assert!(
        stderr.contains(&dir.path().display().to_string()),
        "names the directory: {stderr}"
    );
}

#[test]
fn unusable_data_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"x").unwrap();
    let output = serve_expecting_exit(&file.join("data"));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not-a-directory"),
        "names the path: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn database_from_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let db = rusqlite::Connection::open(dir.path().join("longrun.db")).unwrap();
    db.pragma_update(None, "user_version", 999).unwrap();
    drop(db);
    let output = serve_expecting_exit(dir.path());
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("999"),
        "says which schema it found: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn finished_jobs_are_removed_after_the_retention_period() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let mut config = test_config();
    config.retention = Duration::from_millis(200);
    let server = TestServer::start_on(store, config, Registry::with_builtins()).await;
    let mut client = server.client.clone();
    let finished = submit(&mut client, request(vec![sleep(1, 1)])).await;
    wait_done(&mut client, &finished.id).await;
    let running = submit(&mut client, request(vec![sleep(60_000, 1)])).await;

    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let status = client
            .get_status(pb::GetStatusRequest {
                job_id: finished.id.clone(),
            })
            .await;
        match status {
            Err(status) if status.code() == tonic::Code::NotFound => break,
            Ok(_) => {}
            Err(status) => panic!("unexpected {status}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "never removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let still_there = client
        .get_status(pb::GetStatusRequest {
            job_id: running.id.clone(),
        })
        .await;
    assert!(still_there.is_ok(), "unfinished jobs are never removed");
}

/// A second SIGTERM (or Ctrl-C) while the server drains stops it at once, as an operator
/// pressing Ctrl-C twice expects; it leaves what a kill -9 leaves, for the next start.
#[tokio::test]
async fn a_second_signal_stops_a_draining_server_at_once() {
    use nix::sys::signal::{Signal, kill};
    let addr = common::free_addr();
    let mut server = serve_with(&["--listen", &addr.to_string(), "--shutdown-grace", "60s"]);
    let mut client = common::connect(addr).await;
    let job = submit(&mut client, request(vec![sleep(60_000, 1)])).await;
    common::until_state(&mut client, &job.id, pb::JobState::Running).await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(server.id()).unwrap());

    kill(pid, Signal::SIGTERM).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        server.try_wait().unwrap().is_none(),
        "the first signal drains: the running job has 60 s"
    );
    kill(pid, Signal::SIGINT).unwrap();
    // Bounded by PATIENCE, well under the grace period.
    let output = server.wait_bounded();
    assert_eq!(output.status.code(), Some(130));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("second signal"), "{stderr}");
}

/// RUST_LOG set but empty logs as unset does (the drain's lines included), one that does not
/// parse says so and logs with the default.
#[tokio::test]
async fn an_empty_or_bad_rust_log_keeps_the_default_filter() {
    use nix::sys::signal::{Signal, kill};
    for (rust_log, expected) in [
        ("", "serving longrun.v1.Jobs"),
        ("longrun=verbose", "RUST_LOG \"longrun=verbose\""),
    ] {
        let addr = common::free_addr();
        let server = Spawned::spawn(
            Command::new(env!("CARGO_BIN_EXE_longrun"))
                .args(["serve", "--store", "memory", "--listen", &addr.to_string()])
                .env("RUST_LOG", rust_log)
                .env_remove("LONGRUN_AUTH")
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        let mut client = common::connect(addr).await;
        let job = submit(&mut client, request(vec![sleep(300, 1)])).await;
        common::until_state(&mut client, &job.id, pb::JobState::Running).await;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(server.id()).unwrap());
        kill(pid, Signal::SIGTERM).unwrap();
        let output = server.wait_bounded();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "drained: {stderr}");
        assert!(stderr.contains("jobs drained"), "{stderr}");
        assert!(stderr.contains(expected), "RUST_LOG={rust_log:?}: {stderr}");
    }
}

/// Starts `longrun serve` with `args` on a memory store, stderr piped.
fn serve_with(args: &[&str]) -> Spawned {
    Spawned::spawn(
        Command::new(env!("CARGO_BIN_EXE_longrun"))
            .args(["serve", "--store", "memory"])
            .args(args)
            .env("RUST_LOG", "warn")
            .env_remove("LONGRUN_AUTH")
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
}

#[test]
fn on_a_non_loopback_address_auth_is_on_by_default_and_needs_keys() {
    let output = serve_with(&["--listen", "0.0.0.0:0"]).wait_bounded();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no API keys are configured"), "{stderr}");
    assert!(stderr.contains("--auth off"), "says how to go on: {stderr}");
}

#[test]
fn without_auth_or_tls_on_a_non_loopback_address_serve_warns_loudly() {
    use std::io::BufRead as _;
    let mut child = serve_with(&["--listen", "0.0.0.0:0", "--auth", "off"]);
    let stderr = child.stderr.take().expect("stderr");
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + PATIENCE;
    let (mut auth_warned, mut tls_warned) = (false, false);
    while !(auth_warned && tls_warned) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = seen.recv_timeout(left).expect("both warnings in time");
        auth_warned |= line.contains("WARN") && line.contains("AUTHENTICATION IS OFF");
        tls_warned |= line.contains("WARN") && line.contains("SERVING PLAINTEXT");
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A refused configuration leaves the data directory as it was: opening it would create or
/// migrate it, and a dry run of a new binary with a typo must not upgrade a directory that an
/// older one still serves.
#[test]
fn a_refused_configuration_does_not_touch_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--concurrency", "0"][..],
        &["--auth", "on"][..],
        &["--tls-cert", "missing.pem", "--tls-key", "missing.pem"][..],
    ] {
        let output = Spawned::spawn(
            Command::new(env!("CARGO_BIN_EXE_longrun"))
                .args(["serve", "--listen", "127.0.0.1:0"])
                .args(args)
                .current_dir(dir.path())
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
        .wait_bounded();
        assert!(!output.status.success(), "{args:?}");
        assert!(
            !dir.path().join("longrun-data").exists(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// `serve` with `args` (and `config`, written to a file, when given) in a fresh directory,
/// waited for: it is expected to stop by itself.
fn serve_refusing(args: &[&str], config: Option<&str>) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_longrun"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--store", "memory"])
        .args(args)
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(text) = config {
        let path = dir.path().join("longrun.toml");
        std::fs::write(&path, text).unwrap();
        command.arg("--config").arg(&path);
    }
    Spawned::spawn(&mut command).wait_bounded()
}

/// Settings out of their range stop `serve` at once, naming the setting, instead of a server
/// that runs nothing (`concurrency 0`), refuses every Submit (`max_queue_length 0`), fires a
/// timer at once (`retention 0s`) or gives jobs more attempts than a Submit may ask for.
#[test]
fn settings_out_of_range_are_refused_naming_them() {
    for (flag, value, named) in [
        ("--concurrency", "0", "concurrency"),
        ("--max-queue-length", "0", "max_queue_length"),
        ("--default-max-attempts", "1000", "default_max_attempts"),
        ("--default-max-attempts", "0", "default_max_attempts"),
        ("--max-actions-per-job", "0", "max_actions_per_job"),
        ("--max-label-key-bytes", "0", "max_label_key_bytes"),
        ("--max-page-size", "0", "max_page_size"),
        ("--max-params-depth", "0", "max_params_depth"),
        ("--max-params-depth", "101", "max_params_depth"),
        (
            "--max-watches-per-connection",
            "0",
            "max_watches_per_connection",
        ),
        ("--max-watches-per-tenant", "0", "max_watches_per_tenant"),
        ("--max-message-bytes", "16383", "max_message_bytes"),
        ("--lease", "0s", "lease"),
        ("--retention", "0s", "retention"),
        ("--keepalive-interval", "0s", "keepalive_interval"),
        ("--keepalive-timeout", "0s", "keepalive_timeout"),
        ("--retry-backoff-max", "10ms", "retry_backoff_max"),
        ("--max-connection-age", "0s", "max_connection_age must"),
        ("--max-connection-age-grace", "5s", "_grace needs"),
        (
            "--cors-allow-origin",
            "https://app.example.com/",
            "\"https://app.example.com/\" has a path",
        ),
        // Past what a semaphore counts or a clock adds up, not a wish.
        (
            "--concurrency",
            "1000001",
            "concurrency must be at most 1000000",
        ),
        (
            "--retry-backoff-max",
            "101years",
            "retry_backoff_max must be at most 100years",
        ),
        ("--lease", "1000000years", "lease must be at most 100years"),
        (
            "--retention",
            "101years",
            "retention must be at most 100years",
        ),
    ] {
        let output = serve_refusing(&[flag, value], None);
        assert!(!output.status.success(), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(named), "{flag} {value}: {stderr}");
    }
    // The webhook settings and quotas live only in the file; and every problem is named, not
    // only the first.
    let output = serve_refusing(
        &[],
        Some(concat!(
            "[webhooks]\nmax_attempts = 0\nconcurrency = 0\ntimeout = \"0s\"\n",
            "backoff = \"1m\"\nbackoff_max = \"1s\"\n",
            "allow_hosts = [\"::1\", \"http://127.0.0.1\", \"hooks.internal:99999\", \"ok.internal:8080\"]\n",
            "[quotas]\nsubmits_per_second = nan\n",
            "[quotas.tenants.batch]\nsubmits_per_second = -1\nsubmit_burst = 0\n",
            "max_queued_jobs = 0\n",
        )),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for named in [
        "[webhooks] max_attempts",
        "[webhooks] concurrency",
        "[webhooks] timeout",
        "[webhooks] backoff_max",
        "[quotas] submits_per_second",
        "[quotas.tenants.batch] submits_per_second",
        "[quotas.tenants.batch] submit_burst",
        "[quotas.tenants.batch] max_queued_jobs",
        "[webhooks] allow_hosts: \"::1\" is not a host name or IP address",
        "(write an IPv6 address in brackets, as [::1])",
        "[webhooks] allow_hosts: \"http://127.0.0.1\" is not a host",
        "[webhooks] allow_hosts: \"hooks.internal:99999\" has no valid port",
    ] {
        assert!(stderr.contains(named), "{named}: {stderr}");
    }
    assert!(!stderr.contains("ok.internal"), "{stderr}");
    let output = serve_refusing(
        &[],
        Some(&format!(
            "[webhooks]\nsecret = \"{}\"\nconcurrency = 1000001\n",
            "s".repeat(1025)
        )),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    for named in [
        "[webhooks] secret must be at most 1024 bytes",
        "[webhooks] concurrency must be at most 1000000",
    ] {
        assert!(stderr.contains(named), "{named}: {stderr}");
    }
}

/// A mistyped store URL is refused naming what was given, but never its password: not from
/// the flag, the environment or the config file (whose parser quotes the line).
#[test]
fn a_mistyped_store_url_is_refused_without_printing_its_password() {
    let typo = "postgress://app:Hunter2Secret@db/jobs";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("longrun.toml");
    std::fs::write(&config, format!("[server]\nstore = \"{typo}\"\n")).unwrap();
    let run = |args: &[&std::ffi::OsStr], env: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_longrun"));
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .current_dir(dir.path())
            .env_remove("LONGRUN_STORE")
            .env_remove("LONGRUN_DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(store) = env {
            command.env("LONGRUN_STORE", store);
        }
        Spawned::spawn(&mut command).wait_bounded()
    };
    for (how, output) in [
        ("flag", run(&["--store".as_ref(), typo.as_ref()], None)),
        ("environment", run(&[], Some(typo))),
        (
            "file",
            run(&["--config".as_ref(), config.as_os_str()], None),
        ),
    ] {
        assert!(!output.status.success(), "{how}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("postgress://app:***@db/jobs") && !stderr.contains("Hunter2"),
            "{how}: {stderr}"
        );
    }
    assert!(
        !dir.path().join("longrun-data").exists(),
        "refused before any data directory"
    );
    // A webhook secret on the line the parser quotes is masked too.
    std::fs::write(
        &config,
        "[webhooks]\nsecret = \"whsec_first\"\nsecret = \"whsec_second\"\n",
    )
    .unwrap();
    let output = run(&["--config".as_ref(), config.as_os_str()], None);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("secret = \"***\"") && !stderr.contains("whsec_"),
        "{stderr}"
    );
}

/// The edges themselves are taken: the smallest message limit, a queue of one, a hundred
/// attempts, pages of one, retries at once; and that server runs a job.
#[tokio::test]
async fn settings_at_the_edge_of_their_range_are_taken() {
    let dir = tempfile::tempdir().unwrap();
    let addr = common::free_addr();
    let _server = common::spawn_serve(
        dir.path(),
        addr,
        &[
            "--max-message-bytes",
            "16384",
            "--max-queue-length",
            "1",
            "--default-max-attempts",
            "100",
            "--max-page-size",
            "1",
            "--retry-backoff",
            "0s",
            "--retry-backoff-max",
            "0s",
        ]
        .map(std::ffi::OsStr::new),
    );
    let mut client = common::connect(addr).await;
    let job = submit(&mut client, request(vec![sleep(1, 1)])).await;
    assert_eq!(job.max_attempts, 100);
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!(common::state(&done), pb::JobState::Succeeded);
}

/// A server dropped without serving (its listener could not be bound, say) stops what it
/// started: in-process calls fail as shutting down instead of waiting forever, and the data
/// directory is let go of, so that it can be opened again.
#[tokio::test]
async fn a_server_dropped_without_serving_stops_and_lets_go_of_its_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let server = longrun::server::Server::start(store, Registry::with_builtins(), test_config())
        .await
        .unwrap();
    let executor = server.executor().clone();
    drop(server);
    let submitted = tokio::time::timeout(
        PATIENCE,
        executor.submit(longrun::job::NewJob {
            actions: vec![longrun::job::NewAction {
                name: "echo".to_owned(),
                params: serde_json::Map::new(),
                input: Default::default(),
            }],
            ..Default::default()
        }),
    )
    .await
    .expect("answered, not left waiting for a recovery that never comes");
    assert!(
        matches!(
            submitted,
            Err(longrun::executor::ExecutorError::ShuttingDown)
        ),
        "{submitted:?}"
    );
    drop(executor);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match SqliteStore::open(dir.path(), SqliteOptions::default()) {
            Ok(store) => break store.close().await,
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still held: {error}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Runs a `longrun` upkeep command (`compact`, `backup`), bounded.
fn upkeep(args: &[&str], dir: &std::path::Path) -> Output {
    Spawned::spawn(
        Command::new(env!("CARGO_BIN_EXE_longrun"))
            .args(args)
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .wait_bounded()
}

/// `longrun backup` copies a running server's database, and the copy serves its jobs;
/// `longrun compact` waits for the server to stop (it refuses a directory in use), then
/// leaves the jobs as they were.
#[tokio::test]
async fn backup_while_serving_and_compact_once_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let addr = common::free_addr();
    let mut server = serve(dir.path(), &addr.to_string());
    let mut client = common::connect(addr).await;
    let job = submit(&mut client, request(vec![sleep(60_000, 1)])).await;

    let copies = tempfile::tempdir().unwrap();
    let restored = copies.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    let dest = restored.join("longrun.db");
    let backup = upkeep(&["backup", dest.to_str().unwrap()], dir.path());
    assert!(backup.status.success(), "{backup:?}");
    assert!(
        String::from_utf8_lossy(&backup.stdout).starts_with("backed up "),
        "{backup:?}"
    );

    let refused = upkeep(&["compact"], dir.path());
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.starts_with("error: compacting the data directory") && stderr.contains("in use"),
        "{stderr}"
    );

    server.kill().unwrap();
    server.wait().unwrap();
    let compacted = upkeep(&["compact"], dir.path());
    assert!(compacted.status.success(), "{compacted:?}");

    for data in [dir.path(), restored.as_path()] {
        let addr = common::free_addr();
        let mut server = serve(data, &addr.to_string());
        let mut client = common::connect(addr).await;
        let found = client
            .get_status(pb::GetStatusRequest {
                job_id: job.id.clone(),
            })
            .await
            .expect("the job is there")
            .into_inner()
            .job
            .unwrap();
        assert_eq!(found.id, job.id);
        server.kill().unwrap();
        server.wait().unwrap();
    }
}

/// At debug, every call logs one line when it is answered, with its method, and its status
/// when it failed: an access log for an operator (`RUST_LOG=longrun=debug`).
#[tokio::test]
async fn at_debug_every_call_logs_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let addr = common::free_addr();
    let server = common::Spawned::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_longrun"))
            .args(["serve", "--store", "memory", "--listen", &addr.to_string()])
            .env("RUST_LOG", "longrun=debug")
            .stdout(std::process::Stdio::null())
            .stderr(log),
    );
    let mut client = common::connect(addr).await;
    submit(
        &mut client,
        request(vec![common::action("echo", serde_json::json!({}))]),
    )
    .await;
    let unknown = client
        .get_status(pb::GetStatusRequest {
            job_id: longrun::job::JobId::generate().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    drop(server);
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        text.lines()
            .any(|line| line.contains("rpc answered")
                && line.contains("method=/longrun.v1.Jobs/Submit")),
        "{text}"
    );
    assert!(
        text.lines().any(|line| line.contains("rpc failed")
            && line.contains("method=/longrun.v1.Jobs/GetStatus")
            && line.contains("grpc_status=5")),
        "{text}"
    );
}

/// `serve` on the memory store logging JSON lines at `rust_log` into `log_path`, and a
/// client of it.
async fn serve_logging_json(
    log_path: &std::path::Path,
    rust_log: &str,
) -> (
    Spawned,
    longrun::api::pb::jobs_client::JobsClient<tonic::transport::Channel>,
) {
    let addr = common::free_addr();
    let server = common::Spawned::spawn(
        Command::new(env!("CARGO_BIN_EXE_longrun"))
            .args(["serve", "--store", "memory", "--listen", &addr.to_string()])
            .args(["--log-format", "json"])
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log_path).unwrap()),
    );
    (server, common::connect(addr).await)
}

/// A call that carries a W3C trace context is logged in a span naming its trace id, and so is
/// the run of a job it submitted, so that both are found from the caller's trace; a call with
/// a proxy's `x-request-id` is logged naming that.
#[tokio::test]
async fn a_traced_call_and_the_run_of_its_job_name_the_trace_in_the_log() {
    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("serve.log");
    let (server, mut client) = serve_logging_json(&log_path, "longrun=debug").await;
    let mut traced =
        tonic::Request::new(request(vec![common::action("echo", serde_json::json!({}))]));
    traced
        .metadata_mut()
        .insert("traceparent", PARENT.parse().unwrap());
    let traced_job = client
        .submit(traced)
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    wait_done(&mut client, &traced_job.id).await;
    // No trace context, but the id a proxy such as Envoy gives each request.
    let mut from_proxy =
        tonic::Request::new(request(vec![common::action("echo", serde_json::json!({}))]));
    from_proxy
        .metadata_mut()
        .insert("x-request-id", "req-42".parse().unwrap());
    let plain_job = client
        .submit(from_proxy)
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    wait_done(&mut client, &plain_job.id).await;
    // A job's end is logged just after watchers are told of it: read until both are there.
    let read_log = || -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&log_path).unwrap();
        let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        complete
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    };
    let ended = |lines: &[serde_json::Value]| {
        lines
            .iter()
            .filter(|line| line["fields"]["message"] == "job succeeded")
            .count()
    };
    let deadline = std::time::Instant::now() + common::PATIENCE;
    let mut lines = read_log();
    while ended(&lines) < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        lines = read_log();
    }
    drop(server);
    let in_trace = |line: &serde_json::Value| {
        line["spans"]
            .as_array()
            .is_some_and(|spans| spans.iter().any(|span| span["trace_id"] == TRACE_ID))
    };
    let submits: Vec<_> = lines
        .iter()
        .filter(|line| {
            line["fields"]["message"] == "rpc answered"
                && line["fields"]["method"] == "/longrun.v1.Jobs/Submit"
        })
        .collect();
    assert_eq!(submits.len(), 2, "{lines:#?}");
    assert_eq!(
        submits.iter().filter(|line| in_trace(line)).count(),
        1,
        "only the traced call is in the trace: {submits:#?}"
    );
    let with_request_id = |line: &&&serde_json::Value| {
        line["spans"]
            .as_array()
            .is_some_and(|spans| spans.iter().any(|span| span["request_id"] == "req-42"))
    };
    assert_eq!(
        submits.iter().filter(with_request_id).count(),
        1,
        "the proxy's request id names its call: {submits:#?}"
    );
    let succeeded = |id: &str| {
        lines
            .iter()
            .find(|line| {
                line["fields"]["message"] == "job succeeded" && line["span"]["job_id"] == id
            })
            .unwrap_or_else(|| panic!("the end of {id} is logged: {lines:#?}"))
    };
    assert_eq!(succeeded(&traced_job.id)["span"]["trace_id"], TRACE_ID);
    assert!(succeeded(&plain_job.id)["span"].get("trace_id").is_none());
}

/// `--log-format json`: every line of the log is one JSON object, a job's lines carry its id
/// in their span, and a refused start says why in JSON too, so a log collector parses all.
#[tokio::test]
async fn with_log_format_json_every_line_is_an_object() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("serve.log");
    let (server, mut client) = serve_logging_json(&log_path, "info").await;
    let job = submit(
        &mut client,
        request(vec![common::action("echo", serde_json::json!({}))]),
    )
    .await;
    wait_done(&mut client, &job.id).await;
    drop(server);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let succeeded = lines
        .iter()
        .find(|line| line["fields"]["message"] == "job succeeded")
        .unwrap_or_else(|| panic!("the job's end is logged: {lines:#?}"));
    assert_eq!(succeeded["level"], "INFO");
    assert_eq!(succeeded["span"]["job_id"], job.id.as_str(), "{succeeded}");

    let refused = serve_refusing(&["--log-format", "json", "--concurrency", "0"], None);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    let last: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(last["level"], "ERROR", "{last}");
    let message = last["fields"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("concurrency"), "{last}");
}
