//! The harness of the CLI tests: a real server on loopback in this process, and the real
//! `longrun` binary run against it as a child process, every wait bounded.

// Each test file includes this module and uses a different part of it.
#![allow(dead_code)]

use std::{net::SocketAddr, process::Stdio, sync::Arc, time::Duration};

use longrun::{
    actions::Registry,
    config::{Config, StoreKind},
    executor::ExecutorConfig,
    server::Server,
    store::{MemoryStore, Store},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// Longest any one CLI run may take before the test fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A server serving on loopback until stopped (or dropped).
pub struct TestServer {
    pub addr: SocketAddr,
    pub store: Arc<dyn Store>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

fn config() -> Config {
    let defaults = Config::default();
    Config {
        store: StoreKind::Memory,
        // Small graces, so a stopping server interrupts running jobs at once.
        shutdown_grace: Duration::from_millis(100),
        executor: ExecutorConfig {
            cancel_grace: Duration::from_millis(200),
            ..defaults.executor.clone()
        },
        ..defaults
    }
}

impl TestServer {
    /// A server with an empty memory store on a free port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        Self::start_on(listener, Arc::new(MemoryStore::new())).await
    }

    /// A server over `store` (kept across restarts) serving on `listener`.
    pub async fn start_on(listener: TcpListener, store: Arc<dyn Store>) -> Self {
        let addr = listener.local_addr().expect("local addr");
        let server = Server::start(Arc::clone(&store), Registry::with_builtins(), config())
            .await
            .expect("start server");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            server.serve(listener, shutdown).await.expect("serve");
        });
        Self {
            addr,
            store,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `--addr` for this server.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts the server down as SIGTERM would, and waits until it has.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server stops within 10s")
                .expect("server task");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// What a finished CLI run left.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The JSON object on each stdout line.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }

    /// The first stdout line: the job id, in text mode.
    pub fn first_line(&self) -> String {
        self.stdout.lines().next().unwrap_or_default().to_owned()
    }
}

/// A `longrun` command aimed at `addr`, its output piped.
pub fn command(addr: &str, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_longrun"));
    command
        .args(args)
        .env("LONGRUN_ADDR", addr)
        .env_remove("RUST_LOG")
        .env_remove("TRACEPARENT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs `longrun ARGS` against `addr` and waits (bounded) for it to end.
pub async fn longrun(addr: &str, args: &[&str]) -> Run {
    let child = command(addr, args).spawn().expect("spawn longrun");
    let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("longrun {args:?} did not end within {COMMAND_TIMEOUT:?}"))
        .expect("wait for longrun");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
