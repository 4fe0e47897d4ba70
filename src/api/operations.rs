//! The `google.longrunning.Operations` facade: the same jobs as `longrun.v1.Jobs`, read and
//! managed through Google's standard long-running-operation API, so Google's client libraries
//! (Python `google-api-core`'s `OperationsClient`, Go, Java, Node) work against longrun
//! unchanged. How a job reads as an operation is in [`super::operations_convert`].
//!
//! Operations are not created here: jobs are submitted with `longrun.v1.Jobs/Submit`, and the
//! job `{id}` is the operation `operations/{id}`.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{
    Limits,
    auth::{check_owner, current_owned, tenant},
    convert,
    longrunning::{
        CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
        ListOperationsResponse, Operation, WaitOperationRequest, operations_server::Operations,
    },
    operations_convert::{
        check_collection, operation, operation_name, parse_filter, parse_operation_name,
    },
    paging::Page,
    status::{invalid, invalid_field, job_not_finished, job_not_found},
    wait,
};
use crate::{
    executor::Executor,
    job::JobId,
    store::{Deleted, ListQuery},
};

/// Serves `google.longrunning.Operations` over an [`Executor`]'s jobs.
#[derive(Clone)]
pub struct OperationsService {
    executor: Executor,
    limits: Arc<Limits>,
    stopping: CancellationToken,
}

impl OperationsService {
    /// A service over `executor`, paging with `limits`. When `stopping` fires, waits end at
    /// once: with the operation if it is done, otherwise with UNAVAILABLE (`SHUTTING_DOWN`).
    pub fn new(executor: Executor, limits: Limits, stopping: CancellationToken) -> Self {
        Self {
            executor,
            limits: Arc::new(limits),
            stopping,
        }
    }
}

/// The job of the operation named in the request's `name`.
fn job_id(name: &str) -> Result<JobId, Status> {
    parse_operation_name("name", name).map_err(invalid_field)
}

#[tonic::async_trait]
impl Operations for OperationsService {
    #[tracing::instrument(skip_all)]
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let tenant = tenant(&request);
        let request = request.into_inner();
        if request.return_partial_success {
            // As the field's documentation asks of services that do not read across
            // collections: there is only one collection, and nothing is ever unreachable.
            return Err(Status::unimplemented(
                "return_partial_success is not supported: longrun has one collection of operations",
            ));
        }
        let mut violations = Vec::new();
        if let Err(v) = check_collection("name", &request.name) {
            violations.push(v);
        }
        let states = parse_filter("filter", &request.filter).unwrap_or_else(|v| {
            violations.push(v);
            Vec::new()
        });
        let scope = super::paging::scope([
            "ListOperations",
            tenant.as_ref(),
            &request.name,
            &request.filter,
        ]);
        let page = Page::parse(
            request.page_size,
            &request.page_token,
            scope,
            &self.limits,
            "ListOperations",
            &mut violations,
        );
        if !violations.is_empty() {
            return Err(invalid(violations));
        }
        let query = ListQuery {
            states,
            tenant: Some(tenant.to_string()),
            ..ListQuery::default()
        };
        self.executor.until_recovered().await?;
        let (operations, next_page_token) = page
            .read_items(
                &self.executor,
                query,
                self.limits.max_message_bytes,
                |job| operation(convert::job(job)),
            )
            .await?;
        Ok(Response::new(ListOperationsResponse {
            operations,
            next_page_token,
            unreachable: Vec::new(),
        }))
    }

    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name))]
    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let id = job_id(&request.get_ref().name)?;
        let job = current_owned(&self.executor, &tenant(&request), id).await?;
        Ok(Response::new(operation(convert::job(&job))))
    }

    /// Removes a finished job; an unfinished one is refused with FAILED_PRECONDITION (the
    /// upstream contract says Delete does not cancel, and longrun keeps a job until it ends).
    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name))]
    async fn delete_operation(
        &self,
        request: Request<DeleteOperationRequest>,
    ) -> Result<Response<()>, Status> {
        let id = job_id(&request.get_ref().name)?;
        check_owner(&self.executor, &tenant(&request), id).await?;
        match self.executor.store().delete(id).await? {
            Deleted::Removed => {
                self.executor.hub().forget(id);
                Ok(Response::new(()))
            }
            Deleted::NotFound => Err(job_not_found(id)),
            Deleted::NotTerminal(job) => Err(job_not_finished(id, job.state)),
        }
    }

    /// Asks the job to stop, as `Jobs/Cancel`: the operation reads as done with error
    /// CANCELLED once it has stopped. A finished operation is left as it is.
    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name))]
    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<()>, Status> {
        let id = job_id(&request.get_ref().name)?;
        check_owner(&self.executor, &tenant(&request), id).await?;
        self.executor.cancel(id).await?;
        Ok(Response::new(()))
    }

    /// Returns when the operation is done, or when `timeout` or the call's deadline (whichever
    /// is sooner) runs out, with the operation as it is then. When the server shuts down
    /// before the operation is done it answers UNAVAILABLE (`SHUTTING_DOWN`), as `Jobs/WaitJob`.
    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name))]
    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let id = job_id(&request.get_ref().name)?;
        let until = wait::until_timeout(request.metadata(), request.get_ref().timeout)?;
        check_owner(&self.executor, &tenant(&request), id).await?;
        let name = operation_name(&id.to_string());
        let (job, _) = wait::wait_for_end(
            &self.executor,
            &self.stopping,
            id,
            until,
            format!("operation {name}"),
        )
        .await?;
        Ok(Response::new(operation(job)))
    }
}
