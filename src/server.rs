//! Assembles a server: store, executor, the `longrun.v1.Jobs` service, health, reflection and
//! the retention sweep; serves until a shutdown signal, then drains in order.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    actions::Registry,
    api::{FILE_DESCRIPTOR_SET, JobsService, pb::jobs_server::JobsServer},
    config::Config,
    events::Hub,
    executor::{Executor, ExecutorError},
    metrics::RpcTimingLayer,
    store::Store,
};

/// Finished jobs removed per retention batch: small, so the sweep never stalls writers.
const RETENTION_BATCH: usize = 500;

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
}

/// A running longrun server: jobs are executed from the moment it is started; [`Server::serve`]
/// exposes them over gRPC.
pub struct Server {
    executor: Executor,
    config: Config,
    stopping: CancellationToken,
}

impl Server {
    /// Starts the executor over `store` with `registry`'s actions, and picks up the jobs a
    /// previous run left unfinished.
    pub async fn start(
        store: Arc<dyn Store>,
        registry: Registry,
        config: Config,
    ) -> Result<Self, ServeError> {
        let executor = Executor::start(store, Hub::new(), registry, config.executor.clone());
        executor.recover().await?;
        let stopping = CancellationToken::new();
        tokio::spawn(sweep_retention(
            Arc::clone(executor.store()),
            config.retention,
            stopping.clone(),
        ));
        Ok(Self {
            executor,
            config,
            stopping,
        })
    }

    /// The executor, for programs that embed longrun and submit jobs in-process.
    pub fn executor(&self) -> &Executor {
        &self.executor
    }

    /// Serves gRPC on `listener` until `shutdown` completes; then reports NOT_SERVING, stops
    /// taking jobs, lets running ones finish within the shutdown grace period, ends open
    /// watches (clients resume with `after_version`), and returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<JobsServer<JobsService>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let limits = self.config.limits.clone();
        let max_message = limits.max_message_bytes;
        let service = JobsService::new(self.executor.clone(), limits, self.stopping.clone());
        let jobs = JobsServer::new(service)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);

        let metrics = Arc::clone(self.executor.metrics());
        if let Some(addr) = self.config.metrics_listen {
            metrics
                .spawn_server(addr, self.stopping.clone())
                .await
                .map_err(ServeError::Metrics)?;
        }

        let executor = self.executor.clone();
        let stopping = self.stopping.clone();
        let grace = self.config.shutdown_grace;
        let drain = async move {
            shutdown.await;
            tracing::info!(?grace, "shutting down: draining running jobs");
            health.set_not_serving::<JobsServer<JobsService>>().await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            executor.shutdown(grace).await;
            stopping.cancel();
            tracing::info!("jobs drained; closing connections");
        };

        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "serving longrun.v1.Jobs");
        }
        // Without TCP_NODELAY, small responses wait for delayed ACKs: ~40 ms a call.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .layer(RpcTimingLayer::new(metrics))
            .http2_keepalive_interval(Some(self.config.keepalive_interval))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(jobs)
            .serve_with_incoming_shutdown(incoming, drain)
            .await?;
        Ok(())
    }
}

/// Removes finished jobs older than `retention`, in small batches, every so often.
async fn sweep_retention(store: Arc<dyn Store>, retention: Duration, stopping: CancellationToken) {
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
        loop {
            match store.purge_finished(cutoff, RETENTION_BATCH).await {
                Ok(removed) if removed == RETENTION_BATCH => tokio::task::yield_now().await,
                Ok(removed) => {
                    if removed > 0 {
                        tracing::info!(removed, "retention: removed finished jobs");
                    }
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "retention sweep failed; will retry");
                    break;
                }
            }
        }
    }
}
