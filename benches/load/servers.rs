//! The two server processes this harness re-executes itself as: the bare echo service (the
//! baseline), and the longrun library server with bench-only handlers whose jobs change when
//! the bench says so: a Broadcast to the control port (the same echo service) fires them.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use async_trait::async_trait;
use futures::Stream;
use longrun::{
    actions::{
        ActionContext, ActionDescription, Handler, HandlerError, ParamInfo, ParamType, u64_param,
    },
    config::{Config, FileConfig, Settings, StoreKind},
    server::Server,
};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::{echo, harness::unix_nanos};

/// Events a topic holds for a subscriber that has not read them yet.
const TOPIC_CAPACITY: usize = 16;

/// Named broadcast channels: the echo service's Subscribe streams and the bench handlers
/// listen on them; Broadcast sends to one.
#[derive(Default)]
pub struct Topics {
    channels: Mutex<HashMap<String, broadcast::Sender<u64>>>,
}

impl Topics {
    pub fn subscribe(&self, topic: &str) -> broadcast::Receiver<u64> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels
            .entry(topic.to_owned())
            .or_insert_with(|| broadcast::channel(TOPIC_CAPACITY).0)
            .subscribe()
    }

    /// Sends `seq` to the topic's subscribers; returns how many there were.
    pub fn send(&self, topic: &str, seq: u64) -> usize {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels
            .get(topic)
            .and_then(|sender| sender.send(seq).ok())
            .unwrap_or(0)
    }
}

struct Echo(Arc<Topics>);

type EventStream = Pin<Box<dyn Stream<Item = Result<echo::Event, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl echo::echo_service_server::EchoService for Echo {
    async fn echo(
        &self,
        request: tonic::Request<echo::EchoRequest>,
    ) -> Result<tonic::Response<echo::EchoResponse>, tonic::Status> {
        Ok(tonic::Response::new(echo::EchoResponse {
            payload: request.into_inner().payload,
        }))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: tonic::Request<echo::SubscribeRequest>,
    ) -> Result<tonic::Response<EventStream>, tonic::Status> {
        let receiver = self.0.subscribe(&request.into_inner().topic);
        let first = futures::stream::once(async { Ok(echo::Event { seq: 0 }) });
        let rest = futures::stream::unfold(receiver, |mut receiver| async move {
            loop {
                match receiver.recv().await {
                    Ok(seq) => return Some((Ok(echo::Event { seq }), receiver)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(futures::StreamExt::chain(
            first, rest,
        ))))
    }

    async fn broadcast(
        &self,
        request: tonic::Request<echo::BroadcastRequest>,
    ) -> Result<tonic::Response<echo::BroadcastResponse>, tonic::Status> {
        let request = request.into_inner();
        let receivers = self.0.send(&request.topic, request.seq) as u64;
        Ok(tonic::Response::new(echo::BroadcastResponse { receivers }))
    }
}

async fn serve_topics(listen: SocketAddr, topics: Arc<Topics>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(echo::echo_service_server::EchoServiceServer::new(Echo(
            topics,
        )))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// Serves the bare echo service.
pub async fn serve_echo(listen: SocketAddr) -> anyhow::Result<()> {
    serve_topics(listen, Arc::default()).await
}

/// How the bench runs the longrun library server.
#[derive(clap::Args)]
pub struct ServeLongrun {
    #[arg(long)]
    listen: SocketAddr,
    /// Where Broadcast fires the bench handlers' triggers.
    #[arg(long)]
    control: SocketAddr,
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long, value_enum, default_value = "sqlite")]
    store: StoreKind,
    /// Jobs run at once: the fan-out scenarios keep 10,000 running.
    #[arg(long, default_value_t = 50_000)]
    concurrency: usize,
}

/// Runs the longrun server as `src/main.rs` does, with the built-ins and the bench handlers.
pub async fn serve_longrun(args: ServeLongrun) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let settings = Settings {
        listen: Some(args.listen),
        data_dir: Some(args.data_dir.clone()),
        store: Some(args.store),
        concurrency: Some(args.concurrency),
        max_queue_length: Some(10_000_000),
        ..Settings::default()
    };
    let config = Config::resolve(settings, FileConfig::default());
    let store = config.open_store().await?;
    let topics = Arc::new(Topics::default());
    let mut registry = config.registry();
    registry.register("signal", Signal(Arc::clone(&topics)));
    registry.register("tick", Tick);
    registry.register("burst", Burst);
    tokio::spawn(serve_topics(args.control, topics));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let server = Server::start(store, registry, config)
        .await
        .context("starting")?;
    server.serve(listener, std::future::pending()).await?;
    Ok(())
}

/// Reports `current` of `total`, with the time of the report in the message. Every caller
/// waits for something next, and the executor publishes the report as soon as the handler
/// does: no yield needed, as a handler written for production would not yield either.
fn report(ctx: &ActionContext, current: u64, total: u64) {
    ctx.progress
        .units(current, total, format!("{}", unix_nanos()));
}

/// `signal`: reports progress 0 once it listens, then one step each time its topic fires with
/// a seq above 0; succeeds after `count` steps.
struct Signal(Arc<Topics>);

#[async_trait]
impl Handler for Signal {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Bench: one progress step per Broadcast to its topic.".to_owned(),
            params: vec![
                ParamInfo::optional("topic", ParamType::String, "The control topic."),
                ParamInfo::optional("count", ParamType::Integer, "Steps, default 1."),
            ],
            uses_input: false,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        let topic = ctx
            .params
            .get("topic")
            .and_then(Value::as_str)
            .unwrap_or("");
        let count = u64_param(&ctx.params, "count", 1);
        let mut fired = self.0.subscribe(topic);
        report(&ctx, 0, count);
        // Made once: each `cancelled()` future locks the token when first polled, and this
        // handler stands for a job's own work, which should cost next to nothing here.
        let cancelled = ctx.cancel.cancelled();
        tokio::pin!(cancelled);
        let mut step = 0;
        while step < count {
            tokio::select! {
                received = fired.recv() => match received {
                    // Seq 0 is the bench asking who listens (Broadcast returns the count).
                    Ok(0) => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => step += 1,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(HandlerError::permanent("INTERNAL", "CLOSED", "topic closed"));
                    }
                },
                _ = &mut cancelled => return Err(HandlerError::cancelled()),
            }
            report(&ctx, step, count);
        }
        Ok(json!({ "steps": count }))
    }
}

/// `tick`: one progress step every `interval_ms`, `count` times.
struct Tick;

#[async_trait]
impl Handler for Tick {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Bench: one progress step per interval.".to_owned(),
            params: vec![
                ParamInfo::optional("interval_ms", ParamType::Integer, "Default 1000."),
                ParamInfo::optional("count", ParamType::Integer, "Steps, default 60."),
            ],
            uses_input: false,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        let interval = Duration::from_millis(u64_param(&ctx.params, "interval_ms", 1000));
        let count = u64_param(&ctx.params, "count", 60);
        for step in 1..=count {
            ctx.sleep(interval).await?;
            report(&ctx, step, count);
        }
        Ok(json!({ "steps": count }))
    }
}

/// `burst`: `count` progress updates in a tight loop; returns how long they took.
struct Burst;

#[async_trait]
impl Handler for Burst {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Bench: progress updates in a tight loop.".to_owned(),
            params: vec![ParamInfo::optional(
                "count",
                ParamType::Integer,
                "Updates, default 1000000.",
            )],
            uses_input: false,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        let count = u64_param(&ctx.params, "count", 1_000_000);
        let started = Instant::now();
        for step in 1..=count {
            if ctx.cancel.is_cancelled() {
                return Err(HandlerError::cancelled());
            }
            ctx.progress.units(step, count, "burst");
            tokio::task::yield_now().await;
        }
        Ok(json!({ "elapsed_ms": started.elapsed().as_secs_f64() * 1e3 }))
    }
}
