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
    events::{Cursor, JobsEvent, JobsWatch, LiveMark},
    executor::Executor,
    job::{FieldViolation, JobId},
};

/// What every cursor starts with: lets a later release change the format and still tell
/// its own cursors from these. `e` + an event number; `s` + an event number + `.` + a job id
/// while the first snapshots are being sent. Then, from this release on, `~` + the message's
/// [`LiveMark`] (its hub's epoch in hex, `.`, the time); cursors without one still resume.
const CURSOR_PREFIX: &str = "e";
const SNAPSHOTS_PREFIX: &str = "s";
const MARK_SEPARATOR: char = '~';

/// The stream of a `WatchJobs` call.
pub type WatchJobsStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchJobsResponse, Status>> + Send>>;

/// The wire form of a stream position, with the mark of the message it came with if given.
pub fn encode_cursor(cursor: Cursor, mark: Option<LiveMark>) -> String {
    let mut encoded = match cursor {
        Cursor::After(seq) => format!("{CURSOR_PREFIX}{seq}"),
        Cursor::Snapshots { seq, through } => format!("{SNAPSHOTS_PREFIX}{seq}.{through}"),
    };
    if let Some(LiveMark { epoch, at }) = mark {
        encoded.push_str(&format!("{MARK_SEPARATOR}{epoch:x}.{at}"));
    }
    encoded
}

/// Reads a cursor back, with its mark if it has one; `None` for an empty one.
pub fn parse_cursor(value: &str) -> Result<Option<(Cursor, Option<LiveMark>)>, FieldViolation> {
    if value.is_empty() {
        return Ok(None);
    }
    let digits_only =
        |digits: &str, radix: u32| !digits.is_empty() && digits.chars().all(|c| c.is_digit(radix));
    let seq = |digits: &str| {
        digits_only(digits, 10)
            .then(|| digits.parse::<i64>().ok())
            .flatten()
    };
    let (position, mark) = match value.split_once(MARK_SEPARATOR) {
        Some((position, mark)) => (position, Some(mark)),
        None => (value, None),
    };
    let mark = mark.map(|mark| {
        let (epoch, at) = mark.split_once('.')?;
        Some(LiveMark {
            epoch: digits_only(epoch, 16)
                .then(|| u64::from_str_radix(epoch, 16).ok())
                .flatten()?,
            at: digits_only(at, 10).then(|| at.parse().ok()).flatten()?,
        })
    });
    let cursor = if let Some(rest) = position.strip_prefix(CURSOR_PREFIX) {
        seq(rest).map(Cursor::After)
    } else if let Some(rest) = position.strip_prefix(SNAPSHOTS_PREFIX) {
        rest.split_once('.').and_then(|(digits, id)| {
            Some(Cursor::Snapshots {
                seq: seq(digits)?,
                through: id.parse::<JobId>().ok()?,
            })
        })
    } else {
        None
    };
    let parsed = match (cursor, mark) {
        (Some(cursor), None) => Some((cursor, None)),
        (Some(cursor), Some(Some(mark))) => Some((cursor, Some(mark))),
        _ => None,
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
    deadline: Option<tokio::time::Instant>,
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
    // Marks only on a store this process alone writes: on a shared one, a snapshot read from
    // the store can reach this hub later, by the change feed, stamped after a mark taken when
    // it was sent, and a resume would send it again. (Nor would an older replica during a
    // rolling upgrade read a marked cursor.)
    let marked = executor.store().shared().is_none();
    let (after, mark) = after.unzip();
    let watch = JobsWatch::open(
        std::sync::Arc::clone(executor.store()),
        executor.hub(),
        Some(tenant.to_owned()),
        request.labels.into_iter().collect(),
        // A filter of only JOB_STATE_UNSPECIFIED delivers nothing, as documented.
        (!request.states.is_empty()).then_some(states),
        after,
        mark.flatten().filter(|_| marked),
    )
    .await?
    .pace_progress(limits.watch_progress_interval);
    let stream = super::jobs::until_shutdown(
        watch,
        stopping,
        deadline,
        "after_cursor",
        move |mut watch| async move {
            match watch.next().await {
                Ok(event) => Some((Ok(message(&event, marked)), Some(watch))),
                Err(error) => Some((Err(error.into()), None)),
            }
        },
    );
    Ok(Box::pin(stream))
}

fn message(event: &JobsEvent, marked: bool) -> pb::WatchJobsResponse {
    pb::WatchJobsResponse {
        job: Some(convert::job(&event.job)),
        cursor: encode_cursor(event.cursor, marked.then_some(event.mark)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let mark = LiveMark {
            epoch: u64::MAX - 5,
            at: 123_456_789,
        };
        for cursor in [
            Cursor::After(42),
            Cursor::Snapshots {
                seq: 7,
                through: JobId::generate(),
            },
        ] {
            let encoded = encode_cursor(cursor, Some(mark));
            assert_eq!(parse_cursor(&encoded).unwrap(), Some((cursor, Some(mark))));
            // As earlier releases wrote them, and a shared store's replicas do.
            let unmarked = encode_cursor(cursor, None);
            assert_eq!(encoded.split_once(MARK_SEPARATOR).unwrap().0, unmarked);
            assert_eq!(parse_cursor(&unmarked).unwrap(), Some((cursor, None)));
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
            "e42~",
            "e42~ff",
            "e42~ff.",
            "e42~.5",
            "e42~fg.5",
            "e42~ff.-5",
            "e42~ff.5.6",
            "e42~1ffffffffffffffff.5",
            "~ff.5",
        ] {
            let violation = parse_cursor(bad).expect_err(bad);
            assert_eq!(violation.field, "after_cursor");
        }
    }
}
