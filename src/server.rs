//! Assembles a server: store, executor, the `longrun.v1.Jobs` service and its
//! `google.longrunning.Operations` facade, health, reflection, gRPC-Web and the retention
//! sweep; recovers the previous run's jobs while reporting NOT_SERVING, serves until a shutdown
//! signal, then drains in order.

use std::{
    collections::BTreeSet,
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use tonic::server::NamedService;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    actions::Registry,
    api::{
        ApiKeys, Authenticator, FILE_DESCRIPTOR_SET, JobsService, OperationsService,
        longrunning::operations_server::OperationsServer, pb::jobs_server::JobsServer,
        quotas::SubmitRates,
    },
    config::{Config, TlsFiles},
    events::Hub,
    executor::{Executor, ExecutorConfig, ExecutorError},
    metrics::RpcTimingLayer,
    store::Store,
    webhooks::{WebhookPolicy, WebhookWorker, WorkerError},
};

mod connect;
mod cors;
mod health;
mod severable;

/// Finished jobs removed per retention batch: small, so the sweep never stalls writers.
const RETENTION_BATCH: usize = 500;

/// How long connections get to close by themselves once a shutdown has drained the jobs and
/// told open streams to end; those still open then are cut (see [`severable`]).
const CONNECTION_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not load the descriptors (a build problem).
    #[error("reflection descriptors: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The metrics endpoint could not listen.
    #[error("metrics endpoint: {0}")]
    Metrics(#[source] std::io::Error),
    /// Recovering unfinished jobs at start failed.
    #[error("recovering unfinished jobs: {0}")]
    Recovery(#[from] ExecutorError),
    /// The webhook delivery worker could not start.
    #[error("webhook worker: {0}")]
    Webhooks(#[from] WorkerError),
    /// The `[auth]` configuration cannot be used.
    #[error("auth configuration: {0}")]
    Auth(String),
    /// The TLS files cannot be read or used.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The Connect protocol could not load the descriptors (a build problem).
    #[error("Connect protocol descriptors: {0}")]
    Connect(#[from] prost_reflect::DescriptorError),
    /// A setting is out of its range.
    #[error("configuration: {0}")]
    Setting(String),
}

/// The smallest `max_message_bytes` taken: below it a job could carry next to nothing, once
/// its snapshot has been shared out (see [`crate::job::job_budget`]).
pub const MIN_MESSAGE_BYTES: usize = 16 * 1024;

/// The most of any concurrency setting: far past what one process can run, and well inside
/// what a semaphore can count.
pub const MAX_CONCURRENCY: usize = 1_000_000;

/// The longest duration any setting takes (100 years): a time this far ahead still fits every
/// clock and timestamp it is added to (a protobuf `Timestamp` ends at year 9999, a PostgreSQL
/// lease is counted in microseconds), where a longer one is a typo that would overflow them.
pub const MAX_SETTING_DURATION: Duration = Duration::from_secs(3_155_760_000);

/// Refuses settings no server could use as documented, naming each setting out of its range:
/// a value that would make every call of some kind fail, or a timer that would fire at once,
/// is a typo far more often than an intent, and serving with it would only hide the mistake.
fn check_settings(config: &Config) -> Result<(), ServeError> {
    let (executor, limits, webhooks) = (&config.executor, &config.limits, &config.webhooks);
    let mut problems = Vec::new();
    let mut at_least_one = |name: &str, value: usize| {
        if value == 0 {
            problems.push(format!("{name} must be at least 1"));
        }
    };
    at_least_one("concurrency", executor.concurrency);
    // A Submit holds a queue slot while it is stored, even one that starts at once.
    at_least_one("max_queue_length", executor.max_queue_length);
    at_least_one("max_actions_per_job", limits.max_actions_per_job);
    // A label key must have a byte (an empty key is refused), so 0 would refuse every label.
    at_least_one("max_label_key_bytes", limits.max_label_key_bytes);
    at_least_one("max_page_size", limits.max_page_size);
    // Depth 1 is a flat params object: 0 would refuse every action that takes a parameter.
    at_least_one("max_params_depth", limits.max_params_depth);
    at_least_one(
        "max_idempotency_key_bytes",
        limits.max_idempotency_key_bytes,
    );
    at_least_one("max_attempts_limit", executor.max_attempts_limit as usize);
    at_least_one(
        "max_watches_per_connection",
        limits.max_watches_per_connection,
    );
    at_least_one("max_watches_per_tenant", limits.max_watches_per_tenant);
    at_least_one("[webhooks] max_attempts", webhooks.max_attempts as usize);
    at_least_one("[webhooks] concurrency", webhooks.concurrency);
    for (name, value) in [
        ("concurrency", executor.concurrency),
        ("[webhooks] concurrency", webhooks.concurrency),
    ] {
        if value > MAX_CONCURRENCY {
            problems.push(format!("{name} must be at most {MAX_CONCURRENCY}"));
        }
    }
    let durations = [
        ("max_schedule_delay", Some(limits.max_schedule_delay)),
        ("retry_backoff", Some(executor.retry_backoff_initial)),
        ("retry_backoff_max", Some(executor.retry_backoff_max)),
        ("cancel_grace", Some(executor.cancel_grace)),
        (
            "progress_persist_interval",
            executor.progress_persist_interval,
        ),
        (
            "watch_progress_interval",
            Some(limits.watch_progress_interval),
        ),
        ("shutdown_grace", Some(config.shutdown_grace)),
        ("lease", Some(config.lease)),
        ("retention", Some(config.retention)),
        ("keepalive_interval", Some(config.keepalive_interval)),
        ("keepalive_timeout", Some(config.keepalive_timeout)),
        ("max_connection_age", config.max_connection_age),
        ("max_connection_age_grace", config.max_connection_age_grace),
        ("[webhooks] backoff", Some(webhooks.backoff)),
        ("[webhooks] backoff_max", Some(webhooks.backoff_max)),
        ("[webhooks] timeout", Some(webhooks.timeout)),
    ];
    for (name, value) in durations {
        if value.is_some_and(|value| value > MAX_SETTING_DURATION) {
            problems.push(format!(
                "{name} must be at most {}",
                humantime::format_duration(MAX_SETTING_DURATION)
            ));
        }
    }
    if limits.max_params_depth > crate::job::MAX_PARAMS_DEPTH_LIMIT {
        problems.push(format!(
            "max_params_depth must be at most {}: a stored job is read back by a JSON parser \
             that stops at 128 levels, the job's own included",
            crate::job::MAX_PARAMS_DEPTH_LIMIT
        ));
    }
    // With a limit of 0, named above, there is no range to name.
    if executor.max_attempts_limit > 0
        && !(1..=executor.max_attempts_limit).contains(&executor.default_max_attempts)
    {
        problems.push(format!(
            "default_max_attempts must be between 1 and {} (max_attempts_limit: what a Submit \
             may ask for)",
            executor.max_attempts_limit
        ));
    }
    let tenant_rates = config
        .tenant_submit_rates
        .iter()
        .map(|(tenant, rate)| (format!("[quotas.tenants.{tenant}]"), rate));
    for (table, rate) in config
        .submit_rate
        .iter()
        .map(|rate| ("[quotas]".to_owned(), rate))
        .chain(tenant_rates)
    {
        if !(rate.per_second.is_finite() && rate.per_second > 0.0) {
            problems.push(format!(
                "{table} submits_per_second must be a number above 0"
            ));
        }
        if rate.burst == 0 {
            problems.push(format!("{table} submit_burst must be at least 1"));
        }
    }
    // 0 would refuse every Submit of the tenant; a tenant to shut out is one without a key.
    if executor.max_queued_per_tenant == Some(0) {
        problems.push("[quotas] max_queued_jobs must be at least 1".to_owned());
    }
    // A tenant's table that only inherits the default's 0 was named above.
    let own_zero = |max: &usize| *max == 0 && executor.max_queued_per_tenant != Some(0);
    for (tenant, _) in executor
        .tenant_max_queued
        .iter()
        .filter(|(_, max)| own_zero(max))
    {
        problems.push(format!(
            "[quotas.tenants.{tenant}] max_queued_jobs must be at least 1"
        ));
    }
    if limits.max_message_bytes < MIN_MESSAGE_BYTES {
        problems.push(format!(
            "max_message_bytes must be at least {MIN_MESSAGE_BYTES}"
        ));
    }
    for (name, value) in [
        ("lease", config.lease),
        ("retention", config.retention),
        ("keepalive_interval", config.keepalive_interval),
        ("keepalive_timeout", config.keepalive_timeout),
        ("[webhooks] timeout", webhooks.timeout),
    ] {
        if value.is_zero() {
            problems.push(format!("{name} must be longer than 0s"));
        }
    }
    if config.max_connection_age.is_some_and(|age| age.is_zero()) {
        problems.push("max_connection_age must be longer than 0s".to_owned());
    }
    if config.max_connection_age_grace.is_some() && config.max_connection_age.is_none() {
        problems.push("max_connection_age_grace needs a max_connection_age".to_owned());
    }
    for entry in &webhooks.allow_hosts {
        if let Err(problem) = crate::webhooks::guard::allow_entry(entry) {
            problems.push(format!("[webhooks] allow_hosts: {problem}"));
        }
    }
    // Every Submit falling back to it would be refused, naming a secret it never sent.
    if webhooks
        .secret
        .as_ref()
        .is_some_and(|secret| secret.len() > crate::webhooks::MAX_SECRET_BYTES)
    {
        problems.push(format!(
            "[webhooks] secret must be at most {} bytes",
            crate::webhooks::MAX_SECRET_BYTES
        ));
    }
    if let Err(problem) = cors::layer(&config.cors_allow_origins) {
        problems.push(problem);
    }
    if executor.retry_backoff_max < executor.retry_backoff_initial {
        problems.push("retry_backoff_max must not be shorter than retry_backoff".to_owned());
    }
    if webhooks.backoff_max < webhooks.backoff {
        problems.push("[webhooks] backoff_max must not be shorter than backoff".to_owned());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ServeError::Setting(problems.join("; ")))
    }
}

/// A generated gRPC service that accepts gzip- and deflate-compressed requests (what clients in
/// other languages send once told to compress; without this they get UNIMPLEMENTED) and
/// compresses its responses with `send` (an `Option<CompressionEncoding>`) for clients that
/// accept it. A macro because each generated server has these methods of its own, under no
/// common trait.
macro_rules! compressed {
    ($service:expr, $send:expr) => {{
        let service = $service
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .accept_compressed(tonic::codec::CompressionEncoding::Deflate);
        match $send {
            Some(encoding) => service.send_compressed(encoding),
            None => service,
        }
    }};
}

/// Cuts a connection `after` it was opened (its `max_connection_age` and grace), unless it
/// closes first.
fn cut_when_old(after: Duration, cut: CancellationToken, closed: CancellationToken) {
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(after) => {
                tracing::debug!(?after, "cutting a connection past max_connection_age and its grace");
                cut.cancel();
            }
            () = closed.cancelled() => {}
        }
    });
}

/// A longrun server: its executor runs from [`Server::start`] on; [`Server::serve`] picks up
/// the jobs a previous run left unfinished and exposes everything over gRPC.
///
/// Dropping a server that was never served (its listener could not be bound, say) stops its
/// executor and background tasks: in-process calls then fail with
/// [`ExecutorError::ShuttingDown`], and the store is let go of once those tasks end (an
/// embedder that must reopen the same SQLite directory at once calls
/// [`crate::store::SqliteStore::close`] on its own handle, which waits for that).
pub struct Server {
    executor: Executor,
    config: Config,
    stopping: CancellationToken,
    authenticator: Authenticator,
    tls: Option<tonic::transport::ServerTlsConfig>,
    /// Where the metrics are served when the program bound it itself, see
    /// [`Server::with_metrics_listener`].
    metrics_listener: Option<TcpListener>,
    /// The webhook delivery worker, flushed and waited for on shutdown.
    webhooks: WebhookWorker,
    webhooks_task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Checks everything in `config` that needs no store: the settings' ranges, the API keys,
    /// the TLS files. [`Server::start`] checks them too; a program calls this first when a
    /// refusal must leave the store untouched (opening a data directory migrates it, for
    /// good).
    pub fn check_config(config: &Config) -> Result<(), ServeError> {
        check_settings(config)?;
        authenticator(config)?;
        if let Some(files) = &config.tls {
            tls_config(files)?;
        }
        Ok(())
    }

    /// Starts the executor over `store` with `registry`'s actions. The previous run's
    /// unfinished jobs are picked up by [`Server::serve`], once it listens, so that health
    /// probes see NOT_SERVING meanwhile; [`Executor::submit`] and [`Executor::cancel`] called
    /// in-process wait for that.
    pub async fn start(
        store: Arc<dyn Store>,
        registry: Registry,
        config: Config,
    ) -> Result<Self, ServeError> {
        // Checked first, so that a server that could never serve starts nothing.
        check_settings(&config)?;
        let authenticator = authenticator(&config)?;
        warn_of_unused_quotas(&config);
        let tls = match &config.tls {
            Some(files) => Some(tls_config(files)?),
            None => None,
        };
        let mut executor_config = config.executor.clone();
        // Whatever the executor was given, results must leave a job readable in one response.
        executor_config.max_results_bytes =
            executor_config
                .max_results_bytes
                .min(ExecutorConfig::results_budget(
                    config.limits.max_message_bytes,
                ));
        // Jobs submitted in-process are held to the limits the API serves with.
        executor_config.submit_limits = config.limits.submit_limits();
        let executor = Executor::start(store, Hub::new(), registry, executor_config);
        let stopping = CancellationToken::new();
        // Started before serving, so that what a previous run left in the outbox goes out at
        // once; it stops with the rest once the server has drained.
        let webhooks = WebhookWorker::new(
            Arc::clone(executor.store()),
            Arc::clone(executor.hub()),
            Arc::clone(executor.metrics()),
            config.webhooks.clone(),
            stopping.clone(),
        )?;
        let webhooks_task = webhooks.clone().spawn();
        tokio::spawn(sweep_retention(
            Arc::clone(executor.store()),
            Arc::clone(executor.hub()),
            config.retention,
            stopping.clone(),
        ));
        Ok(Self {
            executor,
            config,
            stopping,
            authenticator,
            tls,
            metrics_listener: None,
            webhooks,
            webhooks_task: Some(webhooks_task),
        })
    }

    /// Serves the metrics on `listener`, bound by the program, instead of binding
    /// `config.metrics_listen` in [`Server::serve`]: a program that binds both of its
    /// addresses before opening the store refuses an address in use without having created
    /// (or migrated) a data directory.
    pub fn with_metrics_listener(mut self, listener: TcpListener) -> Self {
        self.metrics_listener = Some(listener);
        self
    }

    /// The executor, for programs that embed longrun and submit jobs in-process.
    pub fn executor(&self) -> &Executor {
        &self.executor
    }

    /// Serves gRPC (HTTP/2, and gRPC-Web over HTTP/1.1) on `listener` until `shutdown`
    /// completes.
    ///
    /// Health (`grpc.health.v1`, for the server `""` and each service) reads NOT_SERVING while
    /// the previous run's unfinished jobs are recovered, SERVING once they are and the listener
    /// accepts, and NOT_SERVING again from the moment `shutdown` completes: then the server
    /// stops taking jobs, lets running ones finish within the shutdown grace period, ends open
    /// watches (clients resume with `after_version`), and returns.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let health = HealthReporter::new();
        let send_compressed = self.config.response_compression.encoding();
        let health_service = compressed!(
            tonic_health::pb::health_server::HealthServer::new(health::SpecHealth::new(
                health.clone()
            )),
            send_compressed
        );
        set_health(&health, ServingStatus::NotServing).await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = compressed!(reflection().build_v1()?, send_compressed);
        let reflection_v1alpha = compressed!(reflection().build_v1alpha()?, send_compressed);

        let authenticator = self.authenticator.clone();
        warn_if_exposed(&self.config, &listener);

        let limits = self.config.limits.clone();
        let max_message = limits.max_message_bytes;
        let service =
            JobsService::new(self.executor.clone(), limits.clone(), self.stopping.clone())
                .with_webhooks(WebhookPolicy::new(&self.config.webhooks))
                .with_submit_rates(SubmitRates::new(
                    self.config.submit_rate,
                    self.config.tenant_submit_rates.clone(),
                ));
        // Authentication wraps the two job services only: health and reflection stay open, so
        // probes and `grpcurl list` work without a key.
        // A compressed request is held to max_message once inflated, so a small compressed
        // message cannot expand into a large one.
        let jobs = compressed!(JobsServer::new(service), send_compressed)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        let jobs =
            tonic::service::interceptor::InterceptedService::new(jobs, authenticator.clone());
        let operations =
            OperationsService::new(self.executor.clone(), limits, self.stopping.clone());
        let operations = compressed!(OperationsServer::new(operations), send_compressed)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        let operations =
            tonic::service::interceptor::InterceptedService::new(operations, authenticator);

        let metrics = Arc::clone(self.executor.metrics());
        match (self.metrics_listener.take(), self.config.metrics_listen) {
            (Some(listener), _) => {
                metrics
                    .spawn_on(listener, self.stopping.clone())
                    .map_err(ServeError::Metrics)?;
            }
            (None, Some(addr)) => {
                metrics
                    .spawn_server(addr, self.stopping.clone())
                    .await
                    .map_err(ServeError::Metrics)?;
            }
            (None, None) => {}
        }

        // Ends the transport when recovery fails, as `shutdown` does.
        let abort = CancellationToken::new();
        // Fired when draining starts, so a recovery finishing late never reports SERVING.
        let draining = CancellationToken::new();
        let drain_started = draining.clone();
        let executor = self.executor.clone();
        let stopping = self.stopping.clone();
        let grace = self.config.shutdown_grace;
        let drain_health = health.clone();
        let drain_abort = abort.clone();
        let webhooks = self.webhooks.clone();
        let webhook_flush = self.config.webhooks.timeout.min(MAX_WEBHOOK_FLUSH);
        // Cuts the connections still open CONNECTION_CLOSE_GRACE after the drain.
        let sever = CancellationToken::new();
        let drain_sever = sever.clone();
        let drain = async move {
            tokio::select! {
                _ = shutdown => {}
                _ = drain_abort.cancelled() => {}
            }
            tracing::info!(?grace, "shutting down: draining running jobs");
            drain_started.cancel();
            set_health(&drain_health, ServingStatus::NotServing).await;
            executor.shutdown(grace).await;
            // The deliveries of jobs that ended while draining are due now.
            webhooks.flush(webhook_flush).await;
            stopping.cancel();
            tracing::info!("jobs drained; closing connections");
            tokio::spawn(async move {
                tokio::time::sleep(CONNECTION_CLOSE_GRACE).await;
                drain_sever.cancel();
            });
        };

        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "serving longrun.v1.Jobs and google.longrunning.Operations");
        }
        let unacknowledged_limit = self
            .config
            .keepalive_interval
            .saturating_add(self.config.keepalive_timeout);
        // tonic's own max_connection_age_grace is not used: with it set, tonic skips the GOAWAY
        // at the age and only cuts the connection once the grace is over.
        let cut_after = self
            .config
            .max_connection_age
            .zip(self.config.max_connection_age_grace)
            .map(|(age, grace)| age.saturating_add(grace));
        // Without TCP_NODELAY, small responses wait for delayed ACKs: ~40 ms a call.
        let incoming = futures::StreamExt::map(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            move |accepted| {
                accepted.map(|stream| {
                    abort_when_unacknowledged(&stream, unacknowledged_limit);
                    match cut_after {
                        None => severable::Severable::new(stream, sever.clone()),
                        Some(after) => {
                            let cut = sever.child_token();
                            let closed = CancellationToken::new();
                            cut_when_old(after, cut.clone(), closed.clone());
                            severable::Severable::with_closed(stream, cut, closed)
                        }
                    }
                })
            },
        );
        let mut builder = tonic::transport::Server::builder();
        if let Some(age) = self.config.max_connection_age {
            builder = builder.max_connection_age(age);
        }
        if let Some(tls) = self.tls.clone() {
            builder = builder.tls_config(tls).map_err(tls_error)?;
        }
        let cors = cors::layer(&self.config.cors_allow_origins).map_err(ServeError::Setting)?;
        let transport = builder
            // Outermost, so that a preflight is answered before anything else looks at it and
            // every response, errors included, carries the CORS headers.
            .layer(tower::util::option_layer(cors))
            .layer(RpcTimingLayer::new(metrics))
            // Outside gRPC-Web's layer, which answers 400 to HTTP/1.1 requests it does not
            // know, and Connect unary calls are mostly HTTP/1.1.
            .layer(connect::ConnectLayer::new(max_message)?)
            .http2_keepalive_interval(Some(self.config.keepalive_interval))
            .http2_keepalive_timeout(Some(self.config.keepalive_timeout))
            // gRPC-Web for browsers: HTTP/1.1 (and HTTP/2) requests with a grpc-web content
            // type are translated; plain gRPC passes through untouched.
            .accept_http1(true)
            .layer(tonic_web::GrpcWebLayer::new())
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(jobs)
            .add_service(operations)
            .serve_with_incoming_shutdown(incoming, drain);
        tokio::pin!(transport);

        let recovery = async {
            let recovered = self.executor.recover().await?;
            if !draining.is_cancelled() {
                set_health(&health, ServingStatus::Serving).await;
                // Draining may have begun while SERVING was being set: it must win.
                if draining.is_cancelled() {
                    set_health(&health, ServingStatus::NotServing).await;
                }
            }
            Ok::<_, ExecutorError>(recovered)
        };
        let served = async {
            tokio::select! {
                // The transport first, so the listener is accepting before SERVING is reported.
                biased;
                served = &mut transport => {
                    // Shut down before recovery finished.
                    return served.map_err(ServeError::from);
                }
                recovered = recovery => {
                    if let Err(error) = recovered {
                        tracing::error!(error = %crate::with_causes(&error), "recovery failed; stopping");
                        abort.cancel();
                        let _ = transport.await;
                        return Err(error.into());
                    }
                }
            }
            transport.await.map_err(ServeError::from)
        }
        .await;
        // The webhook worker stops with the rest once drained (at once, had serving failed)
        // and is waited for, whichever way serving ended: no delivery reads or writes the store
        // after `serve` returns and the program closes it.
        self.stopping.cancel();
        if let Some(task) = self.webhooks_task.take() {
            let _ = tokio::time::timeout(MAX_WEBHOOK_FLUSH, task).await;
        }
        served
    }
}

/// The longest a shutdown waits for due webhook deliveries, after the jobs drained.
const MAX_WEBHOOK_FLUSH: Duration = Duration::from_secs(5);

impl Drop for Server {
    fn drop(&mut self) {
        // After `serve` these have fired already; without it, nothing else would fire them.
        self.stopping.cancel();
        self.executor.abandon();
    }
}

/// Has the kernel abort `stream` once data sent on it stays unacknowledged, or the peer's
/// receive window stays shut, for `limit` (TCP_USER_TIMEOUT; the keepalive's interval plus
/// its timeout, the same verdict as a ping that goes unanswered).
///
/// The keepalive alone is not enough. When a ping goes unanswered, hyper ends the connection
/// by sending GOAWAY and flushing it; a peer that stopped reading while its kernel still
/// acknowledges (a stopped process, a paused VM) and whose window is full never lets that
/// flush finish, so the connection, with megabytes of buffers, would stay until the peer died.
/// gRPC's own servers set TCP_USER_TIMEOUT along with their keepalive for the same reason.
fn abort_when_unacknowledged(stream: &tokio::net::TcpStream, limit: Duration) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(limit)) {
        tracing::debug!(%error, "setting TCP_USER_TIMEOUT failed");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (stream, limit);
}

/// The interceptor for the configured authentication; auth on without keys is refused, since
/// such a server could never be used.
fn authenticator(config: &Config) -> Result<Authenticator, ServeError> {
    if !config.auth.enabled {
        return Ok(Authenticator::off());
    }
    let keys = ApiKeys::from_hashes(
        config
            .auth
            .keys
            .iter()
            .map(|k| (k.tenant.as_str(), k.key_sha256.as_str())),
    )
    .map_err(|e| ServeError::Auth(e.to_string()))?;
    if keys.is_empty() {
        return Err(ServeError::Auth(
            "authentication is on but no API keys are configured: add [[auth.keys]] entries \
             (tenant and key_sha256, from `longrun hash-key`) to the config file, or pass \
             --auth off to serve everyone as the tenant `default`"
                .to_owned(),
        ));
    }
    // A quota table whose name is misspelt would leave the tenant it meant without its quota,
    // and nothing would show it.
    let keyed: BTreeSet<&str> = config.auth.keys.iter().map(|k| k.tenant.as_str()).collect();
    let unknown: Vec<String> = quota_tenants(config)
        .filter(|tenant| !keyed.contains(tenant))
        .map(|tenant| format!("[quotas.tenants.{tenant}]"))
        .collect();
    if !unknown.is_empty() {
        return Err(ServeError::Setting(format!(
            "{} names a tenant that no API key authenticates as (tenants with keys: {})",
            unknown.join(", "),
            keyed.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    tracing::info!(
        keys = keys.len(),
        "API keys required on longrun.v1.Jobs and Operations"
    );
    Ok(Authenticator::with_keys(keys))
}

/// With auth off every call is the tenant `default`: quotas of other tenants apply to nothing.
/// Logged once, at start (the config check that runs before builds the authenticator too).
fn warn_of_unused_quotas(config: &Config) {
    if config.auth.enabled {
        return;
    }
    let unused: Vec<&str> = quota_tenants(config)
        .filter(|tenant| *tenant != crate::job::DEFAULT_TENANT)
        .collect();
    if !unused.is_empty() {
        tracing::warn!(
            tenants = ?unused,
            "authentication is off, so every call is the tenant `default`: the quota \
             overrides of these tenants apply to nothing"
        );
    }
}

/// The tenants that `[quotas.tenants.NAME]` tables give a quota of their own.
fn quota_tenants(config: &Config) -> impl Iterator<Item = &str> {
    config
        .tenant_submit_rates
        .keys()
        .chain(config.executor.tenant_max_queued.keys())
        .map(String::as_str)
        .collect::<BTreeSet<_>>()
        .into_iter()
}

/// A TLS error with its causes: tonic's own text is only "transport error".
fn tls_error(error: tonic::transport::Error) -> ServeError {
    ServeError::Tls(format!(
        "the certificate and key cannot be used (is tls_key the private key of tls_cert?): \
         {}",
        crate::with_causes(&error)
    ))
}

/// Reads the PEM files into tonic's TLS config: a server identity, and a client CA for mTLS;
/// a certificate and key that do not belong together are refused here.
fn tls_config(files: &TlsFiles) -> Result<tonic::transport::ServerTlsConfig, ServeError> {
    if files.cert.as_os_str().is_empty() || files.key.as_os_str().is_empty() {
        return Err(ServeError::Tls(
            "TLS needs both tls_cert and tls_key (tls_client_ca only adds client certificates)"
                .to_owned(),
        ));
    }
    use crate::config::{PEM_CERTIFICATE, PEM_PRIVATE_KEY, read_pem};
    // Each file is checked for what its setting takes first: TLS setup fails on the first
    // thing it cannot use, and names the certificate and key whichever file that was.
    let read = |setting: &str, path: &std::path::Path, holds: &[&str], what: &str| {
        read_pem(path, holds, what)
            .map_err(|problem| ServeError::Tls(format!("{setting}: {problem}")))
    };
    let identity = tonic::transport::Identity::from_pem(
        read("tls_cert", &files.cert, PEM_CERTIFICATE, "certificate")?,
        read("tls_key", &files.key, PEM_PRIVATE_KEY, "private key")?,
    );
    let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &files.client_ca {
        let ca = read("tls_client_ca", ca, PEM_CERTIFICATE, "certificate")?;
        tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
    }
    // The certificate and key are only checked against each other when a transport is built:
    // built here once, so that a mismatch stops the server before it starts.
    tonic::transport::Server::builder()
        .tls_config(tls.clone())
        .map_err(tls_error)?;
    Ok(tls)
}

/// Warns loudly when the server is reachable from other machines without authentication or
/// without TLS.
fn warn_if_exposed(config: &Config, listener: &TcpListener) {
    let addr = listener.local_addr().unwrap_or(config.listen);
    if addr.ip().is_loopback() {
        return;
    }
    if !config.auth.enabled {
        tracing::warn!(
            %addr,
            "AUTHENTICATION IS OFF on a non-loopback address: anyone who can reach it can \
             submit, read and cancel every job; configure [auth] keys"
        );
    }
    if config.tls.is_none() {
        tracing::warn!(
            %addr,
            "SERVING PLAINTEXT on a non-loopback address: API keys and job data cross the \
             network unencrypted unless a sidecar encrypts them; pass --tls-cert and --tls-key"
        );
    }
}

/// Sets the health of the server (`""`) and of every service it serves.
async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for service in [
        "",
        <JobsServer<JobsService> as NamedService>::NAME,
        <OperationsServer<OperationsService> as NamedService>::NAME,
    ] {
        health.set_service_status(service, status).await;
    }
}

/// Removes finished jobs older than `retention`, in small batches, every so often.
async fn sweep_retention(
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    retention: Duration,
    stopping: CancellationToken,
) {
    let period = (retention / 100).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut ticks = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = stopping.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Some(cutoff) = SystemTime::now().checked_sub(retention) else {
            continue;
        };
        // One line per sweep, with what all of its batches removed.
        let mut swept = 0;
        loop {
            let purged = store.purge_finished(cutoff, RETENTION_BATCH).await;
            if matches!(purged, Ok(removed) if removed > 0) {
                // Which jobs went is not told; the ones the hub remembers may be among them.
                hub.forget_ended();
            }
            match purged {
                Ok(removed) => {
                    swept += removed;
                    if removed < RETENTION_BATCH {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                Err(error) => {
                    tracing::warn!(error = %crate::with_causes(&error), removed = swept, "retention sweep failed; will retry");
                    swept = 0;
                    break;
                }
            }
        }
        if swept > 0 {
            tracing::info!(removed = swept, "retention: removed finished jobs");
        }
    }
}
