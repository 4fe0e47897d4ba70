//! How a job reads as a `google.longrunning.Operation`, and the parsing of operation names and
//! list filters. Works on the wire `longrun.v1.Job`, so an operation always shows exactly what
//! `Jobs/GetStatus` would.
//!
//! | Operation field | from the job |
//! |---|---|
//! | `name` | `operations/{job id}` |
//! | `metadata` | `Any` of the `longrun.v1.Job` snapshot, at any state |
//! | `done` | the job is SUCCEEDED, FAILED or CANCELLED |
//! | `response` | SUCCEEDED: `Any` of the same `longrun.v1.Job` (AIP-151: the response of a create is the resource; each action's result is in `actions[i].result`) |
//! | `error` | FAILED: `google.rpc.Status` with the code named by `JobError.code` (never OK; ABORTED for CANCELLED); CANCELLED: code CANCELLED (1); both with `ErrorInfo{reason, domain: "longrun.dev"}` |
//!
//! The same job always encodes to the same bytes: map entries (the job's `labels`, a
//! `BTreeMap` by `build.rs`, and the `ErrorInfo.metadata`) are written in key order, as clients
//! compare and cache operations by their encoding, and a `HashMap` iterates in a different
//! order from one map to the next.

use std::collections::BTreeMap;

use prost::Message as _;
use prost_types::Any;
use tonic_types::pb::Status;

use super::{
    convert::{DEFAULT_MAX_PARAMS_DEPTH, value_to_json},
    longrunning::Operation,
    pb,
    status::{ERROR_DOMAIN, ERROR_INFO_TYPE_URL, SortedErrorInfo},
};
use crate::job::{FieldViolation, JobId, JobState};

/// The collection every operation name is in.
pub const COLLECTION: &str = "operations";

/// The type URL of a packed `longrun.v1.Job`.
pub const JOB_TYPE_URL: &str = "type.googleapis.com/longrun.v1.Job";

/// The operation name of a job.
pub fn operation_name(id: &str) -> String {
    format!("{COLLECTION}/{id}")
}

/// Parses an operation name (`operations/{job id}`) in the field `field`.
pub fn parse_operation_name(field: &str, name: &str) -> Result<JobId, FieldViolation> {
    if name.is_empty() {
        return Err(FieldViolation::new(field, "is required"));
    }
    name.strip_prefix(COLLECTION)
        .and_then(|rest| rest.strip_prefix('/'))
        .and_then(super::convert::parse_hyphenated)
        .ok_or_else(|| {
            FieldViolation::new(
                field,
                format!(
                    "must be an operation name such as \
                     operations/0190b6c4-7d1e-7c3a-9f0e-1b2c3d4e5f60, not {name:?}"
                ),
            )
        })
}

/// Checks the `name` of ListOperations: the collection, or empty for the same.
pub fn check_collection(field: &str, name: &str) -> Result<(), FieldViolation> {
    if name.is_empty() || name == COLLECTION {
        Ok(())
    } else {
        Err(FieldViolation::new(
            field,
            format!("must be \"{COLLECTION}\" or empty, not {name:?}"),
        ))
    }
}

/// The states a ListOperations `filter` selects; empty for all.
///
/// Supported: empty, `done=true` and `done=false` (spaces around `=` allowed). Anything else is
/// refused rather than ignored, so a client never mistakes an unfiltered list for a filtered one.
pub fn parse_filter(field: &str, filter: &str) -> Result<Vec<JobState>, FieldViolation> {
    let filter = filter.trim();
    if filter.is_empty() {
        return Ok(Vec::new());
    }
    let done = filter
        .split_once('=')
        .filter(|(key, _)| key.trim() == "done")
        .and_then(|(_, value)| match value.trim() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        });
    match done {
        Some(done) => Ok(JobState::ALL
            .into_iter()
            .filter(|s| s.is_terminal() == done)
            .collect()),
        None => Err(FieldViolation::new(
            field,
            format!(
                "unsupported filter {filter:?}: only \"done=true\" and \"done=false\" are supported"
            ),
        )),
    }
}

/// The canonical code number for a code name such as `DEADLINE_EXCEEDED`; UNKNOWN (2) for a
/// name that is not one (the name is still in the job's own error, in `metadata`).
pub fn code_number(name: &str) -> i32 {
    crate::job::status_code(name).unwrap_or(tonic::Code::Unknown) as i32
}

/// A job as an operation.
pub fn operation(job: pb::Job) -> Operation {
    use super::longrunning::operation::Result as Outcome;
    let state = pb::JobState::try_from(job.state).unwrap_or_default();
    let packed = pack_job(&job);
    let outcome = match state {
        pb::JobState::Succeeded => Some(Outcome::Response(packed.clone())),
        pb::JobState::Failed | pb::JobState::Cancelled => {
            Some(Outcome::Error(error_status(&job, state)))
        }
        pb::JobState::Unspecified | pb::JobState::Queued | pb::JobState::Running => None,
    };
    Operation {
        name: operation_name(&job.id),
        metadata: Some(packed),
        done: outcome.is_some(),
        result: outcome,
    }
}

fn pack_job(job: &pb::Job) -> Any {
    Any {
        type_url: JOB_TYPE_URL.to_owned(),
        value: job.encode_to_vec(),
    }
}

/// The error of a finished, unsuccessful job. A cancelled job always reads as CANCELLED, as
/// Google's clients expect; a failed one never as OK, which would read as no error at all, nor
/// as CANCELLED, which those clients take for a cancelled operation (`cancelled()` true,
/// `result()` raising Cancelled): a handler that failed with that code reads as ABORTED.
fn error_status(job: &pb::Job, state: pb::JobState) -> Status {
    let error = job.error.clone().unwrap_or_default();
    const OK: i32 = tonic::Code::Ok as i32;
    const CANCELLED: i32 = tonic::Code::Cancelled as i32;
    let code = match (state, code_number(&error.code)) {
        (pb::JobState::Cancelled, _) => CANCELLED,
        (_, OK) => tonic::Code::Unknown as i32,
        (_, CANCELLED) => tonic::Code::Aborted as i32,
        (_, code) => code,
    };
    let reason = if error.reason.is_empty() {
        state
            .as_str_name()
            .trim_start_matches("JOB_STATE_")
            .to_owned()
    } else {
        error.reason.clone()
    };
    let message = if error.message.is_empty() {
        format!("job {} ended {}", job.id, reason.to_lowercase())
    } else {
        error.message.clone()
    };
    let mut metadata = BTreeMap::from([("job_id".to_owned(), job.id.clone())]);
    // ErrorInfo metadata is string to string: string details as they are, others as JSON text.
    for (key, value) in error.details.iter().flat_map(|d| d.fields.iter()) {
        metadata.insert(key.clone(), detail_text(value));
    }
    let info = SortedErrorInfo {
        reason,
        domain: ERROR_DOMAIN.to_owned(),
        metadata,
    };
    Status {
        code,
        message,
        details: vec![Any {
            type_url: ERROR_INFO_TYPE_URL.to_owned(),
            value: info.encode_to_vec(),
        }],
    }
}

fn detail_text(value: &prost_types::Value) -> String {
    /// Whole numbers up to this are exact in an f64, so they print as integers ("1", not "1.0").
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if let Some(prost_types::value::Kind::NumberValue(n)) = value.kind
        && n.fract() == 0.0
        && n.abs() <= EXACT
    {
        return format!("{}", n as i64);
    }
    match value_to_json(value.clone(), 0, DEFAULT_MAX_PARAMS_DEPTH) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_collection_and_a_job_id() {
        let id = JobId::generate();
        assert_eq!(
            parse_operation_name("name", &operation_name(&id.to_string())),
            Ok(id)
        );
        for bad in [
            "",
            "operations",
            "operations/",
            "operations/x",
            "jobs/x",
            "x/operations/1",
        ] {
            assert_eq!(parse_operation_name("name", bad).unwrap_err().field, "name");
        }
        assert!(check_collection("name", "").is_ok());
        assert!(check_collection("name", "operations").is_ok());
        assert!(check_collection("name", "operations/").is_err());
    }

    #[test]
    fn filters_select_done_or_not_and_refuse_the_rest() {
        let terminal = vec![JobState::Succeeded, JobState::Failed, JobState::Cancelled];
        assert_eq!(parse_filter("filter", "done=true"), Ok(terminal));
        assert_eq!(
            parse_filter("filter", " done = false "),
            Ok(vec![JobState::Queued, JobState::Running])
        );
        assert_eq!(parse_filter("filter", "  "), Ok(Vec::new()));
        for bad in [
            "done",
            "done=yes",
            "state=RUNNING",
            "done=true AND x=1",
            "done:true",
        ] {
            assert_eq!(
                parse_filter("filter", bad).unwrap_err().field,
                "filter",
                "{bad}"
            );
        }
    }

    #[test]
    fn code_names_map_to_their_numbers() {
        assert_eq!(code_number("CANCELLED"), 1);
        assert_eq!(code_number("DEADLINE_EXCEEDED"), 4);
        assert_eq!(code_number("UNAUTHENTICATED"), 16);
        assert_eq!(code_number("nonsense"), 2);
    }

    #[test]
    fn only_finished_jobs_are_done_and_a_failure_is_never_ok() {
        let mut job = pb::Job {
            id: JobId::generate().to_string(),
            state: pb::JobState::Running as i32,
            ..pb::Job::default()
        };
        let running = operation(job.clone());
        assert!(!running.done && running.result.is_none());
        job.state = pb::JobState::Failed as i32;
        job.error = Some(pb::JobError {
            code: "OK".to_owned(),
            ..pb::JobError::default()
        });
        let Some(super::super::longrunning::operation::Result::Error(status)) =
            operation(job).result
        else {
            panic!("an error");
        };
        assert_eq!(status.code, tonic::Code::Unknown as i32);
        assert!(!status.message.is_empty());
    }

    #[test]
    fn only_a_cancelled_job_reads_as_cancelled() {
        let job = |state: pb::JobState| pb::Job {
            id: JobId::generate().to_string(),
            state: state as i32,
            error: Some(pb::JobError {
                code: "CANCELLED".to_owned(),
                ..pb::JobError::default()
            }),
            ..pb::Job::default()
        };
        let code = |job| match operation(job).result {
            Some(super::super::longrunning::operation::Result::Error(status)) => status.code,
            other => panic!("an error, not {other:?}"),
        };
        assert_eq!(
            code(job(pb::JobState::Cancelled)),
            tonic::Code::Cancelled as i32
        );
        assert_eq!(
            code(job(pb::JobState::Failed)),
            tonic::Code::Aborted as i32,
            "a handler's CANCELLED failure"
        );
    }

    /// A failed job with many labels and many error details, its labels inserted in `order`.
    fn failed_job(id: &str, order: impl Iterator<Item = usize>) -> pb::Job {
        let fields = (0..16)
            .map(|i| {
                let value = prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(format!("v{i}"))),
                };
                (format!("detail_{i:02}"), value)
            })
            .collect();
        pb::Job {
            id: id.to_owned(),
            state: pb::JobState::Failed as i32,
            labels: order
                .map(|i| (format!("label_{i:02}"), i.to_string()))
                .collect(),
            error: Some(pb::JobError {
                code: "DEADLINE_EXCEEDED".to_owned(),
                reason: "TOO_SLOW".to_owned(),
                message: "took too long".to_owned(),
                details: Some(prost_types::Struct { fields }),
            }),
            ..pb::Job::default()
        }
    }

    #[test]
    fn the_same_job_always_encodes_to_the_same_bytes() {
        // Each HashMap iterates in its own order, so a difference shows within a few maps.
        let id = JobId::generate().to_string();
        let encodings: Vec<Vec<u8>> = (0..8)
            .flat_map(|_| [failed_job(&id, 0..16), failed_job(&id, (0..16).rev())])
            .map(|job| operation(job).encode_to_vec())
            .collect();
        assert!(encodings.iter().all(|e| *e == encodings[0]));

        // Still what the generated types decode, with nothing lost.
        let op = Operation::decode(encodings[0].as_slice()).expect("an operation");
        let job = pb::Job::decode(op.metadata.expect("metadata").value.as_slice()).expect("a job");
        assert_eq!(job, failed_job(&id, 0..16));
        let Some(super::super::longrunning::operation::Result::Error(status)) = op.result else {
            panic!("an error");
        };
        assert_eq!(status.code, tonic::Code::DeadlineExceeded as i32);
        let [detail] = status.details.as_slice() else {
            panic!("one detail, not {:?}", status.details);
        };
        assert_eq!(detail.type_url, ERROR_INFO_TYPE_URL);
        let info = tonic_types::pb::ErrorInfo::decode(detail.value.as_slice()).expect("ErrorInfo");
        assert_eq!(info.reason, "TOO_SLOW");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata.len(), 17);
        assert_eq!(info.metadata["job_id"], id);
        assert_eq!(info.metadata["detail_07"], "v7");
    }
}
