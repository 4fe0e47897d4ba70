//! The shared harness of the end-to-end tests: a real server on an ephemeral loopback port,
//! talked to through the generated tonic client.
#![allow(dead_code)]

pub mod hooked_store;
pub mod postgres;
pub mod webhook_receiver;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use longrun::{
    actions::Registry,
    api::pb::{self, jobs_client::JobsClient},
    config::{Config, StoreKind},
    executor::Executor,
    server::Server,
    store::{MemoryStore, Store},
};
use prost_types::{Struct, Value, value::Kind};
use tokio::{sync::oneshot, task::JoinHandle};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
pub use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Bounds every wait in the tests, so a broken server fails a test instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The SQLite store in `dir`, opened again as soon as a stopped server has let go of it.
pub async fn open_sqlite(dir: &std::path::Path) -> Arc<dyn Store> {
    // The previous server releases the directory as it finishes stopping.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match longrun::store::SqliteStore::open(dir, longrun::store::SqliteOptions::default()) {
            Ok(store) => return Arc::new(store),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reopen the store: {e}"),
        }
    }
}

/// A server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub client: JobsClient<Channel>,
    pub executor: Executor,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A config for fast tests: memory store, short graces and backoffs.
pub fn test_config() -> Config {
    let mut config = Config {
        store: StoreKind::Memory,
        ..Config::default()
    };
    config.executor.cancel_grace = Duration::from_millis(300);
    config.executor.retry_backoff_initial = Duration::from_millis(20);
    config.executor.retry_backoff_max = Duration::from_millis(100);
    config.shutdown_grace = Duration::from_secs(2);
    config
}

impl TestServer {
    /// A server with the built-in actions and the test config.
    pub async fn start() -> Self {
        Self::start_with(test_config(), Registry::with_builtins()).await
    }

    /// A server with the given config and actions, on a memory store.
    pub async fn start_with(config: Config, registry: Registry) -> Self {
        Self::start_on(Arc::new(MemoryStore::new()), config, registry).await
    }

    /// A server over the given store, once its health reads SERVING (unfinished jobs
    /// recovered).
    pub async fn start_on(store: Arc<dyn Store>, config: Config, registry: Registry) -> Self {
        let server = Self::start_unready(store, config, registry).await;
        server.until_health(ServingStatus::Serving).await;
        server
    }

    /// Waits (bounded) until the server's own health (`""`) reads `wanted`.
    pub async fn until_health(&self, wanted: ServingStatus) {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect for health");
        let mut health = HealthClient::new(channel);
        let mut updates = health
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health watch")
            .into_inner();
        tokio::time::timeout(PATIENCE, async {
            while let Some(update) = updates.next().await {
                if update.expect("health update").status() == wanted {
                    return;
                }
            }
            panic!("health watch ended before {wanted:?}");
        })
        .await
        .expect("health reaches the wanted status in time");
    }

    /// Tells the server to shut down without waiting for it: it drains from now on.
    pub fn begin_stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// A server over the given store, returned as soon as it listens: health may still read
    /// NOT_SERVING while unfinished jobs are recovered.
    pub async fn start_unready(store: Arc<dyn Store>, config: Config, registry: Registry) -> Self {
        Self::start_serving(store, config, registry, None).await
    }

    /// A server on a memory store with its metrics served on an ephemeral loopback port, bound
    /// here (a port picked free and bound later may be taken meanwhile by another test), once
    /// its health reads SERVING; and the metrics address.
    #[allow(dead_code)] // not every test binary serves metrics
    pub async fn start_with_metrics(config: Config, registry: Registry) -> (Self, SocketAddr) {
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port for metrics");
        let metrics_addr = metrics.local_addr().expect("metrics addr");
        let server = Self::start_serving(
            Arc::new(MemoryStore::new()),
            config,
            registry,
            Some(metrics),
        )
        .await;
        server.until_health(ServingStatus::Serving).await;
        (server, metrics_addr)
    }

    async fn start_serving(
        store: Arc<dyn Store>,
        config: Config,
        registry: Registry,
        metrics: Option<tokio::net::TcpListener>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port");
        let addr = listener.local_addr().expect("local addr");
        let mut server = Server::start(store, registry, config)
            .await
            .expect("start the server");
        if let Some(metrics) = metrics {
            server = server.with_metrics_listener(metrics);
        }
        let executor = server.executor().clone();
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(listener, async {
                    let _ = stop.await;
                })
                .await
                .expect("serve");
        });
        let client = connect(addr).await;
        Self {
            addr,
            client,
            executor,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// A fresh client of this server.
    pub async fn client(&self) -> JobsClient<Channel> {
        connect(self.addr).await
    }

    /// Shuts the server down gracefully and waits for it to stop.
    pub async fn stop(mut self) {
        self.begin_stop();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("server stops in time")
                .expect("server task");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// Connects a client, retrying briefly while the server starts.
pub async fn connect(addr: SocketAddr) -> JobsClient<Channel> {
    let endpoint = format!("http://{addr}");
    for _ in 0..100 {
        if let Ok(client) = JobsClient::connect(endpoint.clone()).await {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("cannot connect to {endpoint}");
}

/// A JSON object as params.
pub fn params(value: serde_json::Value) -> Struct {
    fn convert(value: &serde_json::Value) -> Value {
        let kind = match value {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(*b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
            serde_json::Value::String(s) => Kind::StringValue(s.clone()),
            serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
                values: a.iter().map(convert).collect(),
            }),
            serde_json::Value::Object(o) => Kind::StructValue(Struct {
                fields: o.iter().map(|(k, v)| (k.clone(), convert(v))).collect(),
            }),
        };
        Value { kind: Some(kind) }
    }
    match convert(&value).kind {
        Some(Kind::StructValue(s)) => s,
        _ => panic!("params must be a JSON object"),
    }
}

/// One action.
pub fn action(name: &str, p: serde_json::Value) -> pb::ActionSpec {
    pb::ActionSpec {
        name: name.to_owned(),
        params: Some(params(p)),
        input: Default::default(),
    }
}

/// A `sleep` action.
pub fn sleep(duration_ms: u64, steps: u64) -> pb::ActionSpec {
    action(
        "sleep",
        serde_json::json!({"duration_ms": duration_ms, "steps": steps}),
    )
}

/// An `echo` action with `bytes` bytes of input, all the same byte (so a compressed message
/// carrying it is almost nothing on the wire).
pub fn echo_with_input(bytes: usize) -> pb::ActionSpec {
    let mut spec = action("echo", serde_json::json!({}));
    spec.input = vec![b'i'; bytes].into();
    spec
}

/// A Submit request for these actions.
pub fn request(actions: Vec<pb::ActionSpec>) -> pb::SubmitRequest {
    pb::SubmitRequest {
        actions,
        ..Default::default()
    }
}

/// Submits and returns the job.
pub async fn submit(client: &mut JobsClient<Channel>, request: pb::SubmitRequest) -> pb::Job {
    client
        .submit(request)
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("job in response")
}

/// Watches a job to its end (bounded by [`PATIENCE`]) and returns every message.
pub async fn watch_to_end(
    client: &mut JobsClient<Channel>,
    job_id: &str,
    after_version: i64,
) -> Vec<pb::Job> {
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.to_owned(),
            after_version,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut seen = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = stream.next().await {
            seen.push(message.expect("stream message").job.expect("job"));
        }
    })
    .await
    .expect("the watch ends in time");
    seen
}

/// Waits (bounded) for the job to reach a terminal state.
pub async fn wait_done(client: &mut JobsClient<Channel>, job_id: &str) -> pb::Job {
    let response = client
        .wait_job(pb::WaitJobRequest {
            job_id: job_id.to_owned(),
            timeout: Some(prost_types::Duration {
                seconds: PATIENCE.as_secs() as i64,
                nanos: 0,
            }),
        })
        .await
        .expect("wait")
        .into_inner();
    assert!(response.done, "job finished within the wait");
    response.job.expect("job")
}

/// Watches the job until it is in `state` (bounded by [`PATIENCE`]) and returns that snapshot.
pub async fn until_state(
    client: &mut JobsClient<Channel>,
    job_id: &str,
    wanted: pb::JobState,
) -> pb::Job {
    until(client, job_id, |job| job.state == wanted as i32).await
}

/// The state of a job as the enum.
pub fn state(job: &pb::Job) -> pb::JobState {
    pb::JobState::try_from(job.state).expect("known state")
}

/// The state of an action as the enum.
pub fn action_state(status: &pb::ActionStatus) -> pb::ActionState {
    pb::ActionState::try_from(status.state).expect("known action state")
}

/// A wire duration of `ms` milliseconds.
pub fn millis(ms: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Every job the server lists (first page of the largest size).
pub async fn list_all(client: &mut JobsClient<Channel>) -> Vec<pb::Job> {
    client
        .list_jobs(pb::ListJobsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list jobs")
        .into_inner()
        .jobs
}

/// The field paths named by a status's `google.rpc.BadRequest` details.
pub fn bad_request_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|br| br.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// A test action (`gate`) that tells the test when it starts and runs until the test releases
/// it, so tests know what is running without sleeping. It counts handlers running at once.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<GateInner>,
}

struct GateInner {
    started_tx: tokio::sync::mpsc::UnboundedSender<String>,
    started_rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<String>>,
    release: tokio::sync::Semaphore,
    ignore_cancel: bool,
    running: std::sync::atomic::AtomicUsize,
    max_running: std::sync::atomic::AtomicUsize,
    dropped: tokio::sync::Notify,
}

/// Decrements the running count when a run ends, returned or dropped.
struct Running(Arc<GateInner>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.dropped.notify_waiters();
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::new(false)
    }
}

impl Gate {
    /// A gate whose runs stop when cancelled (`ignore_cancel` false) or only when released.
    pub fn new(ignore_cancel: bool) -> Self {
        let (started_tx, started_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            inner: Arc::new(GateInner {
                started_tx,
                started_rx: tokio::sync::Mutex::new(started_rx),
                release: tokio::sync::Semaphore::new(0),
                ignore_cancel,
                running: Default::default(),
                max_running: Default::default(),
                dropped: Default::default(),
            }),
        }
    }

    /// The built-in actions plus this gate as `gate`.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::with_builtins();
        registry.register("gate", self.clone());
        registry
    }

    /// The id of the job whose gate action started next (bounded by [`PATIENCE`]).
    pub async fn next_started(&self) -> String {
        let mut rx = self.inner.started_rx.lock().await;
        tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .expect("a gate action starts in time")
            .expect("gate channel open")
    }

    /// The id of the job whose gate action starts within `wait`, if one does.
    pub async fn started_within(&self, wait: Duration) -> Option<String> {
        let mut rx = self.inner.started_rx.lock().await;
        tokio::time::timeout(wait, rx.recv()).await.ok().flatten()
    }

    /// Lets `n` waiting (or future) gate runs finish successfully.
    pub fn release(&self, n: usize) {
        self.inner.release.add_permits(n);
    }

    /// Gate runs in progress now (a dropped run counts as ended).
    pub fn running(&self) -> usize {
        self.inner.running.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most gate runs that were in progress at once.
    pub fn max_running(&self) -> usize {
        self.inner
            .max_running
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits (bounded) until no gate run is in progress.
    pub async fn until_idle(&self) {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let dropped = self.inner.dropped.notified();
                if self.running() == 0 {
                    return;
                }
                dropped.await;
            }
        })
        .await
        .expect("gate runs end in time");
    }
}

#[async_trait::async_trait]
impl longrun::actions::Handler for Gate {
    fn describe(&self) -> longrun::actions::ActionDescription {
        longrun::actions::ActionDescription {
            description: "Test action: runs until the test releases it.".to_owned(),
            params: Vec::new(),
            uses_input: false,
        }
    }

    async fn run(
        &self,
        ctx: longrun::actions::ActionContext,
    ) -> Result<serde_json::Value, longrun::actions::HandlerError> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.inner.running.fetch_add(1, SeqCst) + 1;
        self.inner.max_running.fetch_max(now, SeqCst);
        let _running = Running(Arc::clone(&self.inner));
        let _ = self.inner.started_tx.send(ctx.job_id.to_string());
        let cancelled = async {
            if self.inner.ignore_cancel {
                std::future::pending::<()>().await;
            }
            ctx.cancel.cancelled().await;
        };
        tokio::select! {
            permit = self.inner.release.acquire() => {
                permit.expect("gate semaphore open").forget();
                Ok(serde_json::json!({"released": true}))
            }
            _ = cancelled => Err(longrun::actions::HandlerError::cancelled()),
        }
    }
}

/// A `gate` action.
pub fn gated() -> pb::ActionSpec {
    action("gate", serde_json::json!({}))
}

/// Watches the job until `wanted` holds for a snapshot (bounded by [`PATIENCE`]) and returns
/// that snapshot.
pub async fn until(
    client: &mut JobsClient<Channel>,
    job_id: &str,
    wanted: impl Fn(&pb::Job) -> bool,
) -> pb::Job {
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.to_owned(),
            after_version: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = stream.next().await {
            let job = message.expect("stream message").job.expect("job");
            if wanted(&job) {
                return job;
            }
        }
        panic!("the job ended without reaching the wanted snapshot");
    })
    .await
    .expect("the job reaches the wanted snapshot in time")
}

/// Cancels a job and returns the job the response holds.
pub async fn cancel(client: &mut JobsClient<Channel>, job_id: &str) -> pb::Job {
    client
        .cancel(pb::CancelRequest {
            job_id: job_id.to_owned(),
        })
        .await
        .expect("cancel")
        .into_inner()
        .job
        .expect("job in response")
}

/// The job as GetStatus returns it.
pub async fn get(client: &mut JobsClient<Channel>, job_id: &str) -> pb::Job {
    client
        .get_status(pb::GetStatusRequest {
            job_id: job_id.to_owned(),
        })
        .await
        .expect("get status")
        .into_inner()
        .job
        .expect("job in response")
}

/// Opens a watch of the job and returns its stream once the server has answered.
pub async fn open_watch(
    client: &mut JobsClient<Channel>,
    job_id: &str,
    after_version: i64,
) -> tonic::Streaming<pb::WatchJobResponse> {
    client
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.to_owned(),
            after_version,
        })
        .await
        .expect("watch")
        .into_inner()
}

/// Reads the stream until a snapshot for which `wanted` holds (bounded by [`PATIENCE`]).
pub async fn next_until(
    stream: &mut tonic::Streaming<pb::WatchJobResponse>,
    wanted: impl Fn(&pb::Job) -> bool,
) -> pb::Job {
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = stream.next().await {
            let job = message.expect("stream message").job.expect("job");
            if wanted(&job) {
                return job;
            }
        }
        panic!("the stream ended without the wanted snapshot");
    })
    .await
    .expect("the wanted snapshot comes in time")
}

/// Sends `authorization: Bearer <key>` on every call (or the raw `authorization` value given
/// with [`ApiKey::raw`]; nothing with [`ApiKey::none`]).
#[derive(Clone)]
pub struct ApiKey(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl ApiKey {
    /// `authorization: Bearer <key>`.
    pub fn bearer(key: &str) -> Self {
        Self::raw(&format!("Bearer {key}"))
    }

    /// `authorization: <value>`, as given.
    pub fn raw(value: &str) -> Self {
        Self(Some(value.parse().expect("ASCII metadata")))
    }

    /// No `authorization` metadata at all.
    pub fn none() -> Self {
        Self(None)
    }
}

impl tonic::service::Interceptor for ApiKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A `longrun.v1.Jobs` client that sends an API key.
pub type KeyedClient = JobsClient<tonic::service::interceptor::InterceptedService<Channel, ApiKey>>;

/// A `google.longrunning.Operations` client that sends an API key.
pub type KeyedOperations = longrun::api::longrunning::operations_client::OperationsClient<
    tonic::service::interceptor::InterceptedService<Channel, ApiKey>,
>;

/// A plaintext channel to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

/// A Jobs client of the server at `addr` that sends `key`.
pub async fn keyed_client(addr: SocketAddr, key: ApiKey) -> KeyedClient {
    JobsClient::with_interceptor(channel(addr).await, key)
}

/// An Operations client of the server at `addr` that sends `key`.
pub async fn keyed_operations(addr: SocketAddr, key: ApiKey) -> KeyedOperations {
    longrun::api::longrunning::operations_client::OperationsClient::with_interceptor(
        channel(addr).await,
        key,
    )
}

/// [`test_config`] with authentication on and one API key per `(tenant, key)`.
pub fn auth_config(keys: &[(&str, &str)]) -> Config {
    let mut config = test_config();
    config.auth = longrun::config::AuthConfig {
        enabled: true,
        keys: keys
            .iter()
            .map(|(tenant, key)| longrun::config::KeyEntry {
                tenant: (*tenant).to_owned(),
                key_sha256: hex::encode(longrun::api::auth::hash_key(key)),
            })
            .collect(),
    };
    config
}

/// Whether the process is gone: no such pid, or only a zombie left to reap.
pub fn process_gone(pid: i32) -> bool {
    use nix::{errno::Errno, sys::signal::kill, unistd::Pid};
    match kill(Pid::from_raw(pid), None) {
        Err(Errno::ESRCH) => true,
        _ => std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // The state follows the parenthesised command name.
                let rest = &stat[stat.rfind(')')? + 1..];
                rest.split_whitespace().next().map(|s| s == "Z")
            })
            .unwrap_or(true),
    }
}

/// A free loopback address (bound, then released) for a `longrun serve` process to listen on.
///
/// Never the same one twice in a test binary: a port just released is often the next one the
/// kernel hands out, so two tests starting servers at once could otherwise both get it, and
/// one test's client would talk to the other test's server.
pub fn free_addr() -> SocketAddr {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    // Bounded: the ephemeral range holds thousands of ports, a test binary asks for dozens.
    for _ in 0..1000 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        if !handed_out.contains(&addr.port()) {
            handed_out.push(addr.port());
            return addr;
        }
    }
    panic!("no loopback port not handed out before");
}

/// The real binary serving `data_dir` on `addr`, with `extra` arguments; its warnings go to
/// the test's stderr.
pub fn spawn_serve(
    data_dir: &std::path::Path,
    addr: SocketAddr,
    extra: &[&std::ffi::OsStr],
) -> Spawned {
    Spawned::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_longrun"))
            .args(["serve", "--listen", &addr.to_string()])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit()),
    )
}

/// A spawned `longrun` process, killed and reaped when dropped: a test that fails halfway
/// leaves no server running behind it. Derefs to the [`std::process::Child`].
pub struct Spawned(Option<std::process::Child>);

impl Spawned {
    /// Spawns `command`.
    pub fn spawn(command: &mut std::process::Command) -> Self {
        Self(Some(command.spawn().expect("start longrun")))
    }

    /// Waits for the process to exit by itself and returns its output; kills it and fails the
    /// test if that takes longer than [`PATIENCE`].
    pub fn wait_bounded(mut self) -> std::process::Output {
        let child = self.0.take().expect("a spawned process");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(child.wait_with_output());
        });
        match result.recv_timeout(PATIENCE) {
            Ok(output) => output.expect("output"),
            Err(_) => {
                // The waiting thread owns the child and reaps it once it is killed.
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                panic!("the process did not exit within {PATIENCE:?}");
            }
        }
    }
}

impl std::ops::Deref for Spawned {
    type Target = std::process::Child;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("a spawned process")
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().expect("a spawned process")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
