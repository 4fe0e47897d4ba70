//! Every domain error becomes a `tonic::Status` here, in one exhaustive place, so a new error
//! variant cannot silently turn into INTERNAL. Details follow the rich error model
//! (`google.rpc.BadRequest`, `ErrorInfo`).

use std::collections::{BTreeMap, HashMap};

use prost::Message as _;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    events::{WatchError, WatchJobsError},
    executor::ExecutorError,
    job::{FieldViolation, JobId, JobState},
    store::StoreError,
};

/// The `ErrorInfo.domain` of every error longrun returns (and of jobs' own errors as
/// `google.longrunning` operations report them).
pub const ERROR_DOMAIN: &str = "longrun.dev";

/// The type URL of `google.rpc.ErrorInfo` in a status's details.
pub(super) const ERROR_INFO_TYPE_URL: &str = "type.googleapis.com/google.rpc.ErrorInfo";

/// `google.rpc.ErrorInfo` with its metadata in key order: the generated type's `HashMap`
/// would encode the same metadata differently from one map to the next. Same fields and tags,
/// so it decodes as the generated type.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct SortedErrorInfo {
    #[prost(string, tag = "1")]
    pub reason: String,
    #[prost(string, tag = "2")]
    pub domain: String,
    #[prost(btree_map = "string, string", tag = "3")]
    pub metadata: BTreeMap<String, String>,
}

/// The trailer with which gRPC's own retry support (a client's service-config retry policy)
/// delays its next attempt, as `RetryInfo` tells applications.
const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// [`with_details`] for a refusal that may be retried after `delay`: the delay goes in a
/// `RetryInfo` detail, for applications, and in `grpc-retry-pushback-ms`, so that clients
/// retrying by a gRPC retry policy wait that long rather than their own backoff.
pub(super) fn retry_after(
    code: Code,
    message: impl Into<String>,
    mut details: ErrorDetails,
    delay: std::time::Duration,
) -> Status {
    details.set_retry_info(Some(delay));
    let mut status = with_details(code, message, details);
    let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    status
        .metadata_mut()
        .insert(RETRY_PUSHBACK, tonic::metadata::MetadataValue::from(millis));
    status
}

/// `Status::with_error_details`, with the `ErrorInfo` metadata in key order: tonic-types keeps
/// it in a `HashMap`, so the same error encoded its entries in a different order from one call
/// to the next.
pub(super) fn with_details(
    code: Code,
    message: impl Into<String>,
    details: ErrorDetails,
) -> Status {
    let status = Status::with_error_details(code, message, details);
    let Ok(mut encoded) = tonic_types::pb::Status::decode(status.details()) else {
        return status;
    };
    for detail in &mut encoded.details {
        if detail.type_url == ERROR_INFO_TYPE_URL
            && let Ok(info) = SortedErrorInfo::decode(detail.value.as_slice())
        {
            detail.value = info.encode_to_vec();
        }
    }
    Status::with_details(
        status.code(),
        status.message(),
        encoded.encode_to_vec().into(),
    )
}

/// How much of one violation an error repeats, and how much of them all: errors travel in
/// HTTP/2 headers, and grpc-core clients drop a response whose headers pass 8 KiB (reporting
/// RESOURCE_EXHAUSTED instead of the error); the message goes there twice (as `grpc-message`,
/// and inside `grpc-status-details-bin`, base64). A field path or description can hold
/// whatever the client sent (an id, a label key, a params key), so each is cut, and past a
/// kilobyte the rest are counted rather than listed.
const MAX_FIELD_BYTES: usize = 128;
const MAX_DESCRIPTION_BYTES: usize = 256;
const MAX_LISTED_BYTES: usize = 1024;

/// `text` cut to at most `max` bytes (on a character boundary), saying how long it was.
fn clip(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    format!(
        "{} ({} bytes)",
        crate::job::truncate(&text, max),
        text.len()
    )
}

/// INVALID_ARGUMENT with one `BadRequest` field violation per problem (as many as fit; the
/// message says how many more there are).
pub fn invalid(violations: Vec<FieldViolation>) -> Status {
    let total = violations.len();
    let mut listed = Vec::new();
    let mut bytes = 0;
    for v in violations {
        let field = clip(v.field, MAX_FIELD_BYTES);
        let description = clip(v.description, MAX_DESCRIPTION_BYTES);
        bytes += field.len() + description.len();
        if bytes > MAX_LISTED_BYTES && !listed.is_empty() {
            break;
        }
        listed.push(FieldViolation { field, description });
    }
    let mut message = listed
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if listed.len() < total {
        message.push_str(&format!("; and {} more", total - listed.len()));
    }
    let mut details = ErrorDetails::new();
    for v in listed {
        details.add_bad_request_violation(v.field, v.description);
    }
    with_details(
        Code::InvalidArgument,
        format!("invalid request: {message}"),
        details,
    )
}

/// INVALID_ARGUMENT for one field.
pub fn invalid_field(violation: FieldViolation) -> Status {
    invalid(vec![violation])
}

fn with_reason(
    code: Code,
    reason: &str,
    message: String,
    metadata: HashMap<String, String>,
) -> Status {
    with_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
    )
}

/// UNAVAILABLE with reason `SHUTTING_DOWN`: what a call the server stops serving gets, so a
/// client can tell a restart (call again, elsewhere or later) from a storage failure.
pub fn shutting_down(message: impl Into<String>) -> Status {
    with_reason(
        Code::Unavailable,
        "SHUTTING_DOWN",
        message.into(),
        HashMap::new(),
    )
}

/// NOT_FOUND for a job id.
pub fn job_not_found(id: impl ToString) -> Status {
    let id = id.to_string();
    with_reason(
        Code::NotFound,
        "JOB_NOT_FOUND",
        format!("job {id} not found"),
        HashMap::from([("job_id".to_owned(), id)]),
    )
}

/// FAILED_PRECONDITION for deleting a job that has not ended yet.
pub fn job_not_finished(id: JobId, state: JobState) -> Status {
    with_reason(
        Code::FailedPrecondition,
        "JOB_NOT_FINISHED",
        format!("job {id} is {state}; only a job that has ended can be deleted (cancel it first)"),
        HashMap::from([("job_id".to_owned(), id.to_string())]),
    )
}

/// The status for a failed watch or wait of one job.
pub fn watch_status(error: WatchError) -> Status {
    match error {
        WatchError::NotFound(id) => job_not_found(id),
        WatchError::FutureVersion { .. } => {
            invalid_field(FieldViolation::new("after_version", error.to_string()))
        }
        WatchError::Store(error) => error.into(),
    }
}

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        match &error {
            StoreError::Closed => Status::unavailable(error.to_string()),
            StoreError::Backend { .. } => {
                // With its causes: "creating job …" alone does not say why (a read-only file,
                // an I/O error).
                tracing::error!(error = %crate::with_causes(&error), "store failure");
                Status::unavailable(format!("storage is unavailable: {error}"))
            }
            StoreError::Corrupt(_) => {
                tracing::error!(error = %crate::with_causes(&error), "corrupt data");
                Status::data_loss(error.to_string())
            }
            StoreError::Full { .. } => {
                tracing::error!(error = %crate::with_causes(&error), "storage full");
                Status::resource_exhausted(error.to_string())
            }
            // These only happen while opening a store, before anything is served.
            StoreError::Locked { .. }
            | StoreError::IncompatibleSchema { .. }
            | StoreError::SchemaMismatch { .. }
            | StoreError::ReplicaRunning { .. } => Status::failed_precondition(error.to_string()),
            StoreError::StaleVersion { .. } | StoreError::Missing(_) | StoreError::LeaseLost(_) => {
                Status::aborted(format!("concurrent change, try again: {error}"))
            }
        }
    }
}

impl From<WatchJobsError> for Status {
    fn from(error: WatchJobsError) -> Self {
        let message = format!("after_cursor: {error}");
        let reason = match error {
            WatchJobsError::Store(error) => return error.into(),
            WatchJobsError::HistoryGone { .. } => "CURSOR_EXPIRED",
            WatchJobsError::FutureCursor { .. } => "CURSOR_AHEAD",
        };
        with_reason(
            Code::OutOfRange,
            reason,
            message,
            HashMap::from([("field".to_owned(), "after_cursor".to_owned())]),
        )
    }
}

impl From<ExecutorError> for Status {
    fn from(error: ExecutorError) -> Self {
        match error {
            ExecutorError::Invalid(violations) => invalid(violations),
            ExecutorError::NotFound(id) => job_not_found(id),
            ExecutorError::QueueFull { limit } => {
                let details = ErrorDetails::with_error_info(
                    "QUEUE_FULL",
                    ERROR_DOMAIN,
                    HashMap::from([("max_queue_length".to_owned(), limit.to_string())]),
                );
                retry_after(
                    Code::ResourceExhausted,
                    format!("the queue is full ({limit} jobs waiting); retry later"),
                    details,
                    std::time::Duration::from_secs(1),
                )
            }
            ExecutorError::TenantQueueFull { tenant, limit } => {
                let details = ErrorDetails::with_error_info(
                    "TENANT_QUEUE_FULL",
                    ERROR_DOMAIN,
                    HashMap::from([
                        ("tenant".to_owned(), tenant.clone()),
                        ("max_queued_jobs".to_owned(), limit.to_string()),
                    ]),
                );
                retry_after(
                    Code::ResourceExhausted,
                    format!(
                        "tenant {tenant} has {limit} jobs waiting, its quota (max_queued_jobs); \
                         retry when some have started"
                    ),
                    details,
                    std::time::Duration::from_secs(1),
                )
            }
            ExecutorError::ShuttingDown => {
                shutting_down("the server is shutting down and takes no new jobs")
            }
            ExecutorError::IdempotencyKeyReused { key, job_id, field } => {
                let description = format!(
                    "already used for job {job_id}, which was submitted with another request \
                     (the first field that differs: {field}); send the same request again to \
                     get that job, or use a new key"
                );
                let mut details = ErrorDetails::with_error_info(
                    "IDEMPOTENCY_KEY_REUSED",
                    ERROR_DOMAIN,
                    HashMap::from([
                        ("job_id".to_owned(), job_id.to_string()),
                        ("field".to_owned(), field.clone()),
                    ]),
                );
                details.add_bad_request_violation("idempotency_key", description.clone());
                with_details(
                    Code::AlreadyExists,
                    format!(
                        "idempotency_key {:?}: {description}",
                        clip(key, MAX_FIELD_BYTES)
                    ),
                    details,
                )
            }
            ExecutorError::Illegal { id, source } => with_reason(
                Code::FailedPrecondition,
                "ILLEGAL_TRANSITION",
                format!("job {id}: {source}"),
                HashMap::from([("job_id".to_owned(), id.to_string())]),
            ),
            ExecutorError::ValidatePanicked(panicked) => with_reason(
                Code::Internal,
                "VALIDATE_PANICKED",
                panicked.to_string(),
                HashMap::from([("action".to_owned(), panicked.action)]),
            ),
            ExecutorError::Store(error) => error.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of the `ErrorInfo` detail of `status`.
    fn error_info_bytes(status: &Status) -> Vec<u8> {
        let encoded = tonic_types::pb::Status::decode(status.details()).expect("details");
        encoded
            .details
            .into_iter()
            .find(|detail| detail.type_url == ERROR_INFO_TYPE_URL)
            .expect("an ErrorInfo")
            .value
    }

    #[test]
    fn error_info_metadata_is_encoded_in_key_order() {
        let job_id = JobId::generate();
        let expected = SortedErrorInfo {
            reason: "IDEMPOTENCY_KEY_REUSED".to_owned(),
            domain: ERROR_DOMAIN.to_owned(),
            metadata: BTreeMap::from([
                ("field".to_owned(), "actions[0].params".to_owned()),
                ("job_id".to_owned(), job_id.to_string()),
            ]),
        }
        .encode_to_vec();
        // Each HashMap tonic-types builds has its own random order; enough of them show one
        // that is not key order, were it kept.
        for _ in 0..32 {
            let status = Status::from(ExecutorError::IdempotencyKeyReused {
                key: "k".to_owned(),
                job_id,
                field: "actions[0].params".to_owned(),
            });
            assert_eq!(error_info_bytes(&status), expected);
            assert_eq!(status.code(), Code::AlreadyExists);
            let details = status.get_error_details();
            assert_eq!(
                details.error_info().expect("ErrorInfo").metadata["job_id"],
                job_id.to_string()
            );
            assert_eq!(
                details.bad_request().expect("BadRequest").field_violations[0].field,
                "idempotency_key"
            );
        }
    }
}
