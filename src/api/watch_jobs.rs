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
    events::{Cursor, JobsEvent, JobsWatch},
    executor::Executor,
    job::{FieldViolation, JobId},
};

/// What every cursor starts with: lets a later release change the format and still tell
/// its own cursors from these. `e` + an event number; `s` + an event number + `.` + a job id
/// while the first snapshots are being sent.
const CURSOR_PREFIX: &str = "e";
const SNAPSHOTS_PREFIX: &str = "s";

/// The stream of a `WatchJobs` call.
pub type WatchJobsStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchJobsResponse, Status>> + Send>>;

/// The wire form of a stream position.
pub fn encode_cursor(cursor: Cursor) -> String {
    match cursor {
        Cursor::After(seq) => format!("{CURSOR_PREFIX}{seq}"),
        Cursor::Snapshots { seq, through } => format!("{SNAPSHOTS_PREFIX}{seq}.{through}"),
    }
}

/// Reads a cursor back; `None` for an empty one.
pub fn parse_cursor(value: &str) -> Result<Option<Cursor>, FieldViolation> {
    if value.is_empty() {
        return Ok(None);
    }
    let seq = |digits: &str| {
        digits
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| digits.parse::<i64>().ok())
            .flatten()
    };
    let parsed = if let Some(rest) = value.strip_prefix(CURSOR_PREFIX) {
        seq(rest).map(Cursor::After)
    } else if let Some(rest) = value.strip_prefix(SNAPSHOTS_PREFIX) {
        rest.split_once('.').and_then(|(digits, id)| {
            Some(Cursor::Snapshots {
                seq: seq(digits)?,
                through: id.parse::<JobId>().ok()?,
            })
        })
    } else {
        None
    };
    parsed.map(Some).ok_or_else(|| {
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
    let stream =
        super::jobs::until_shutdown(watch, stopping, "after_cursor", |mut watch| async move {
            match watch.next().await {
                Ok(event) => Some((Ok(message(&event)), Some(watch))),
                Err(error) => Some((Err(error.into()), None)),
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
        for cursor in [
            Cursor::After(42),
            Cursor::Snapshots {
                seq: 7,
                through: JobId::generate(),
            },
        ] {
            assert_eq!(parse_cursor(&encode_cursor(cursor)).unwrap(), Some(cursor));
        }
        assert_eq!(parse_cursor("").unwrap(), None);
        for bad in [
            "42",
            "e",
            "e-1",
            "e+1",
            "x42",
            "e1.5",
            "e99999999999999999999",
            "s7",
            "s7.",
            "s.0190b6c4-7d1e-7c3a-9f0e-1b2c3d4e5f60",
            "s-1.0190b6c4-7d1e-7c3a-9f0e-1b2c3d4e5f60",
            "s7.nope",
        ] {
            let violation = parse_cursor(bad).expect_err(bad);
            assert_eq!(violation.field, "after_cursor");
        }
    }
}
