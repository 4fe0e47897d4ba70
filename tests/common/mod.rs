//! The shared harness of the end-to-end tests: a real server on an ephemeral loopback port,
//! talked to through the generated tonic client.
#![allow(dead_code)]

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

/// Bounds every wait in the tests, so a broken server fails a test instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(20);

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

    /// A server over the given store.
    pub async fn start_on(store: Arc<dyn Store>, config: Config, registry: Registry) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port");
        let addr = listener.local_addr().expect("local addr");
        let server = Server::start(store, registry, config)
            .await
            .expect("start the server");
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
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
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
            if job.state == wanted as i32 {
                return job;
            }
        }
        panic!("the job ended without reaching {wanted:?}");
    })
    .await
    .expect("the job reaches the state in time")
}

/// The state of a job as the enum.
pub fn state(job: &pb::Job) -> pb::JobState {
    pb::JobState::try_from(job.state).expect("known state")
}

/// The state of an action as the enum.
pub fn action_state(status: &pb::ActionStatus) -> pb::ActionState {
    pb::ActionState::try_from(status.state).expect("known action state")
}
