//! `WatchJobs`: the request's validation, the cursor's wire form, and the stream.

use std::pin::Pin;

use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::{
    Limits, convert,
    pb::{self},
    status::invalid,
};
use crate::{
    events::{JobsEvent, JobsWatch},
    executor::Executor,
    job::FieldViolation,
};

/// What every cursor starts with: lets a later release change the format and still tell
/// its own cursors from these.
const CURSOR_PREFIX: &str = "e";

/// The stream of a `WatchJobs` call.
pub type WatchJobsStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchJobsResponse, Status>> + Send>>;

/// The wire form of a position in the event log.
pub fn encode_cursor(seq: i64) -> String {
    format!("{CURSOR_PREFIX}{seq}")
}

/// Reads a cursor back; `None` for an empty one.
pub fn parse_cursor(value: &str) -> Result<Option<i64>, FieldViolation> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .strip_prefix(CURSOR_PREFIX)
        .filter(|digits| digits.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|digits| digits.parse::<i64>().ok())
        .map(Some)
        .ok_or_else(|| {
            FieldViolation::new(
                "after_cursor",
                format!("is not a cursor from a WatchJobs response: {value:?}"),
            )
        })
}

/// Validates the request and opens the stream of `tenant`'s jobs; it ends with UNAVAILABLE when `stopping` fires.
pub async fn open(
    executor: &Executor,
    limits: &Limits,
    stopping: CancellationToken,
    tenant: &str,
    request: pb::WatchJobsRequest,
) -> Result<WatchJobsStream, Status> {
    let mut violations = convert::check_labels("labels", &request.labels, limits);
    let mut states = Vec::new();
    for (i, value) in request.states.iter().enumerate() {
        match convert::domain_job_state(*value) {
            Some(state) => states.push(state),
            // Documented as matching nothing, as in ListJobs: no job is ever in that state.
            None if *value == pb::JobState::Unspecified as i32 => {}
            None => violations.push(FieldViolation::new(
                format!("states[{i}]"),
                format!("{value} is not a job state"),
            )),
        }
    }
    let after = parse_cursor(&request.after_cursor).unwrap_or_else(|violation| {
        violations.push(violation);
        None
    });
    if !violations.is_empty() {
        return Err(invalid(violations));
    }
    executor.until_recovered().await?;
    let watch = JobsWatch::open(
        std::sync::Arc::clone(executor.store()),
        executor.hub(),
        Some(tenant.to_owned()),
        request.labels.into_iter().collect(),
        // A filter of only JOB_STATE_UNSPECIFIED delivers nothing, as documented.
        (!request.states.is_empty()).then_some(states),
        after,
    )
    .await?;
    let stream = futures::stream::unfold(Some(watch), move |watch| {
        let stopping = stopping.clone();
        async move {
            let mut watch = watch?;
            tokio::select! {
                item = watch.next() => match item {
                    Ok(event) => Some((Ok(message(&event)), Some(watch))),
                    Err(error) => Some((Err(error.into()), None)),
                },
                _ = stopping.cancelled() => {
                    let status = Status::unavailable(
                        "the server is shutting down; resume the watch with after_cursor",
                    );
                    Some((Err(status), None))
                }
            }
        }
    });
    Ok(Box::pin(stream))
}

fn message(event: &JobsEvent) -> pb::WatchJobsResponse {
    pb::WatchJobsResponse {
        job: Some(convert::job(&event.job)),
        cursor: encode_cursor(event.cursor),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        assert_eq!(parse_cursor(&encode_cursor(42)).unwrap(), Some(42));
        assert_eq!(parse_cursor("").unwrap(), None);
        for bad in [
            "42",
            "e",
            "e-1",
            "e+1",
            "x42",
            "e1.5",
            "e99999999999999999999",
        ] {
            let violation = parse_cursor(bad).expect_err(bad);
            assert_eq!(violation.field, "after_cursor");
        }
    }
}
