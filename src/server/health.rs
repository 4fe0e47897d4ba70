//! `grpc.health.v1.Health` as the health checking protocol has it: tonic-health's service,
//! except that `Watch` of a service the server does not know answers SERVICE_UNKNOWN and keeps
//! the stream open (tonic-health ends it with NOT_FOUND, which clients that use `Watch` for
//! client-side health checking take for a broken server rather than a status).

use std::pin::Pin;

use futures::Stream;
use tonic::{Code, Request, Response, Status};
use tonic_health::{
    pb::{
        HealthCheckRequest, HealthCheckResponse,
        health_check_response::ServingStatus as WireStatus, health_server::Health,
    },
    server::{HealthReporter, HealthService},
};

/// The health service the server registers; statuses come from its [`HealthReporter`].
pub(super) struct SpecHealth {
    inner: HealthService,
}

impl SpecHealth {
    pub(super) fn new(reporter: HealthReporter) -> Self {
        Self {
            inner: HealthService::from_health_reporter(reporter),
        }
    }
}

type Statuses = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for SpecHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        // NOT_FOUND for an unknown service is what the protocol asks of Check.
        self.inner.check(request).await
    }

    type WatchStream = Statuses;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Statuses>, Status> {
        match self.inner.watch(request).await {
            Ok(statuses) => Ok(Response::new(Box::pin(statuses.into_inner()) as Statuses)),
            Err(status) if status.code() == Code::NotFound => {
                // The services are fixed when the server starts: this one stays unknown. The
                // stream stays open until the client ends it, or the server's shutdown closes
                // its connection, as a known service's stream does.
                let unknown = HealthCheckResponse {
                    status: WireStatus::ServiceUnknown as i32,
                };
                let statuses = futures::StreamExt::chain(
                    futures::stream::iter([Ok(unknown)]),
                    futures::stream::pending(),
                );
                Ok(Response::new(Box::pin(statuses) as Statuses))
            }
            Err(status) => Err(status),
        }
    }
}
