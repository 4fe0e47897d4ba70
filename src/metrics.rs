//! Prometheus metrics, declared here and recorded next to the code they measure; served as
//! text on `--metrics-listen` (`GET /metrics`).

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::job::TraceParent;

/// Labels of a job transition counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// The state entered, e.g. `SUCCEEDED`.
    pub state: String,
}

/// Labels of an action run.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// The action's name.
    pub action: String,
    /// `succeeded`, `failed` or `stopped`.
    pub outcome: String,
}

/// Labels of a webhook delivery attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    /// `delivered`, `retry` (failed, another attempt is due) or `dead` (failed, no attempts
    /// left).
    pub outcome: String,
}

/// Labels of an RPC.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// The gRPC path, e.g. `/longrun.v1.Jobs/Submit`.
    pub method: String,
}

fn seconds_histogram() -> Histogram {
    // 100 µs to ~100 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

/// Every metric longrun exports.
pub struct Metrics {
    registry: Registry,
    /// Jobs entering each state, by state.
    pub transitions: Family<StateLabels, Counter>,
    /// Jobs waiting in the queue (those scheduled for later included).
    pub queue_depth: Gauge,
    /// Queued jobs scheduled to start later (`schedule_time`), not due yet.
    pub scheduled: Gauge,
    /// Jobs being run.
    pub running: Gauge,
    /// Run time of each action, by action and outcome.
    pub action_seconds: Family<ActionLabels, Histogram, fn() -> Histogram>,
    /// Open `WatchJob` and `WatchJobs` streams.
    pub open_watches: Gauge,
    /// Time to answer each RPC (to the response headers, for streams), by method.
    pub rpc_seconds: Family<MethodLabels, Histogram, fn() -> Histogram>,
    /// Webhook delivery attempts, by outcome.
    pub webhook_attempts: Family<WebhookLabels, Counter>,
    /// Webhook deliveries not yet delivered nor dead, as of the worker's last scan.
    pub webhook_pending: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("longrun");
        let transitions = Family::<StateLabels, Counter>::default();
        registry.register(
            "job_transitions",
            "Jobs entering each state",
            transitions.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Jobs waiting in the queue",
            queue_depth.clone(),
        );
        let scheduled = Gauge::default();
        registry.register(
            "jobs_scheduled",
            "Queued jobs scheduled to start later, not due yet (counted in queue_depth too)",
            scheduled.clone(),
        );
        let running = Gauge::default();
        registry.register(
            "jobs_running",
            "Jobs whose handlers run now (at most the concurrency)",
            running.clone(),
        );
        let action_seconds =
            Family::<ActionLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                seconds_histogram,
            );
        registry.register(
            "action_duration_seconds",
            "Run time of each action, by action and outcome",
            action_seconds.clone(),
        );
        let open_watches = Gauge::default();
        registry.register(
            "open_watch_streams",
            "Open WatchJob and WatchJobs streams",
            open_watches.clone(),
        );
        let rpc_seconds =
            Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                seconds_histogram,
            );
        registry.register(
            "rpc_duration_seconds",
            "Time to answer each RPC (to the response headers for streams), by method",
            rpc_seconds.clone(),
        );
        let webhook_attempts = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts, by outcome (delivered, retry, dead)",
            webhook_attempts.clone(),
        );
        let webhook_pending = Gauge::default();
        registry.register(
            "webhook_deliveries_pending",
            "Webhook deliveries not yet delivered nor dead",
            webhook_pending.clone(),
        );
        // Every series a label set is known for is there at 0 from the start, so that a
        // dashboard's rate() has something to start from before the first job or delivery.
        for state in crate::job::JobState::ALL {
            let _ = transitions.get_or_create(&StateLabels {
                state: state.as_str().to_owned(),
            });
        }
        for outcome in ["delivered", "retry", "dead"] {
            let _ = webhook_attempts.get_or_create(&WebhookLabels {
                outcome: outcome.to_owned(),
            });
        }
        Self {
            registry,
            transitions,
            webhook_attempts,
            webhook_pending,
            queue_depth,
            scheduled,
            running,
            action_seconds,
            open_watches,
            rpc_seconds,
        }
    }
}

impl Metrics {
    /// Counts a job entering `state`.
    pub fn transition(&self, state: &str) {
        self.transitions
            .get_or_create(&StateLabels {
                state: state.to_owned(),
            })
            .inc();
    }

    /// Counts one webhook delivery attempt ending with `outcome`.
    pub fn webhook_attempt(&self, outcome: &str) {
        self.webhook_attempts
            .get_or_create(&WebhookLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Records one action run.
    pub fn action_ran(&self, action: &str, outcome: &str, started: Instant) {
        self.action_seconds
            .get_or_create(&ActionLabels {
                action: action.to_owned(),
                outcome: outcome.to_owned(),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    /// Serves `GET /metrics` on `listener` until `stop` fires.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = Arc::clone(&self);
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    }

    /// Binds `addr` and serves the metrics there in the background.
    pub async fn spawn_server(
        self: &Arc<Self>,
        addr: SocketAddr,
        stop: CancellationToken,
    ) -> std::io::Result<SocketAddr> {
        self.spawn_on(tokio::net::TcpListener::bind(addr).await?, stop)
    }

    /// Serves the metrics on `listener` in the background; the address it is bound to.
    pub fn spawn_on(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        stop: CancellationToken,
    ) -> std::io::Result<SocketAddr> {
        let bound = listener.local_addr()?;
        let metrics = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(error) = metrics.serve(listener, stop).await {
                tracing::error!(%error, "metrics endpoint failed");
            }
        });
        tracing::info!(addr = %bound, "serving metrics on /metrics");
        Ok(bound)
    }
}

/// A tower layer timing every RPC by method; it also writes the debug access line, and runs
/// a call that carries a W3C trace context or a proxy's `x-request-id` in a span naming them.
#[derive(Clone)]
pub struct RpcTimingLayer {
    metrics: Arc<Metrics>,
    methods: Arc<HashSet<String>>,
}

/// The `method` label of a request for a path no service serves. Recorded before routing
/// (and before authentication), a label taken from the path as sent would let anyone add
/// series without end.
pub const UNKNOWN_METHOD: &str = "unknown";

impl RpcTimingLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            methods: Arc::new(served_methods()),
        }
    }
}

/// The path of every method the server serves: those of the services in the served
/// descriptors, plus health and reflection.
fn served_methods() -> HashSet<String> {
    let mut methods: HashSet<String> = [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    // The descriptors are compiled in by build.rs: they always decode.
    if let Ok(pool) = prost_reflect::DescriptorPool::decode(crate::api::FILE_DESCRIPTOR_SET) {
        for service in pool.services() {
            for method in service.methods() {
                methods.insert(format!("/{}/{}", service.full_name(), method.name()));
            }
        }
    }
    methods
}

impl<S> tower::Layer<S> for RpcTimingLayer {
    type Service = RpcTiming<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTiming {
            inner,
            metrics: Arc::clone(&self.metrics),
            methods: Arc::clone(&self.methods),
        }
    }
}

/// The service [`RpcTimingLayer`] wraps around each gRPC service.
#[derive(Clone)]
pub struct RpcTiming<S> {
    inner: S,
    metrics: Arc<Metrics>,
    methods: Arc<HashSet<String>>,
}

impl<S, B, RB> tower::Service<axum::http::Request<B>> for RpcTiming<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<RB>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let method = if self.methods.contains(path) {
            path.to_owned()
        } else {
            UNKNOWN_METHOD.to_owned()
        };
        let metrics = Arc::clone(&self.metrics);
        let started = Instant::now();
        // A call that carries a trace context, or the request id a proxy such as Envoy gives
        // every request, is logged inside a span naming them, so that its lines (the access
        // line too) can be found from the caller's trace or the proxy's log. Calls with
        // neither pay only the header lookups.
        let span = call_span(request.headers());
        let response = {
            let _entered = span.as_ref().map(tracing::Span::enter);
            self.inner.call(request)
        };
        let timed = async move {
            let response = response.await;
            let elapsed = started.elapsed();
            // One line per call at debug (`RUST_LOG=longrun=debug`), an access log. A call that
            // failed has its status in the headers (a trailers-only response); one that
            // succeeded, or a stream, has it in trailers, which come later.
            if tracing::enabled!(tracing::Level::DEBUG) {
                let status = response.as_ref().ok().and_then(|r| {
                    r.headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                });
                // A Connect unary call that failed says so in its HTTP status alone.
                let http_failure = response
                    .as_ref()
                    .ok()
                    .map(|r| r.status())
                    .filter(|http| !http.is_success());
                match (status, http_failure) {
                    (Some(status), _) => {
                        tracing::debug!(%method, ?elapsed, grpc_status = %status, "rpc failed");
                    }
                    (None, Some(http)) => {
                        let http_status = http.as_u16();
                        tracing::debug!(%method, ?elapsed, http_status, "rpc failed");
                    }
                    (None, None) => tracing::debug!(%method, ?elapsed, "rpc answered"),
                }
            }
            metrics
                .rpc_seconds
                .get_or_create(&MethodLabels { method })
                .observe(elapsed.as_secs_f64());
            response
        };
        match span {
            Some(span) => Box::pin(timed.instrument(span)),
            None => Box::pin(timed),
        }
    }
}

/// The longest `x-request-id` recorded; a longer one is not an id a proxy made.
const MAX_REQUEST_ID_BYTES: usize = 128;

/// The span a call runs in when it carries a trace context or a request id; `None` otherwise.
fn call_span(headers: &axum::http::HeaderMap) -> Option<tracing::Span> {
    let trace_id = TraceParent::from_headers(headers).map(|parent| parent.trace_id());
    let request_id = headers
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= MAX_REQUEST_ID_BYTES);
    if trace_id.is_none() && request_id.is_none() {
        return None;
    }
    Some(tracing::info_span!(
        "rpc",
        trace_id = trace_id.map(tracing::field::display),
        request_id
    ))
}

/// Counts an open watch stream for as long as it lives.
pub struct WatchGuard(Arc<Metrics>);

impl WatchGuard {
    /// Counts one more open stream.
    pub fn open(metrics: &Arc<Metrics>) -> Self {
        metrics.open_watches.inc();
        Self(Arc::clone(metrics))
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.open_watches.dec();
    }
}

/// Keeps a count in sync without the metrics type leaking into callers' signatures.
pub(crate) fn set(gauge: &Gauge, value: usize) {
    gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_the_prefix() {
        let metrics = Metrics::default();
        metrics.transition("SUCCEEDED");
        metrics.action_ran("sleep", "succeeded", Instant::now());
        let _watch = WatchGuard::open(&Arc::new(Metrics::default()));
        let text = metrics.render();
        assert!(
            text.contains("longrun_job_transitions_total{state=\"SUCCEEDED\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "longrun_action_duration_seconds_count{action=\"sleep\",outcome=\"succeeded\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("longrun_queue_depth"), "{text}");
        assert!(text.contains("longrun_jobs_scheduled 0"), "{text}");
        // The series nothing has counted yet are there, at 0.
        assert!(
            text.contains("longrun_job_transitions_total{state=\"CANCELLED\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("longrun_webhook_attempts_total{outcome=\"dead\"} 0"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn watch_guards_count_open_streams() {
        let metrics = Arc::new(Metrics::default());
        let a = WatchGuard::open(&metrics);
        let b = WatchGuard::open(&metrics);
        assert_eq!(metrics.open_watches.get(), 2);
        drop(a);
        drop(b);
        assert_eq!(metrics.open_watches.get(), 0);
    }
}
