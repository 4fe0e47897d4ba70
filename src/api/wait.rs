//! Waiting for a job to end within the caller's patience: shared by `Jobs/Submit` (sync mode),
//! `Jobs/WaitJob` and `Operations/WaitOperation`, so all three honour the call's deadline the
//! same way.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Status, metadata::MetadataMap};

use super::{
    convert, pb,
    status::{invalid_field, job_not_found, watch_status},
};
use crate::{executor::Executor, job::JobId};

/// How long before the caller's deadline a waiting call answers, so the answer arrives in time:
/// a tenth of the call's timeout, at least 20 ms and at most a second. A fixed 20 ms was too
/// little on a busy machine, where answering, sending and the client's own clock can take
/// longer; a tenth keeps short waits useful.
fn deadline_margin(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_millis(20), Duration::from_secs(1))
}

/// When a waiting call must answer: at `wait` from now, or just before the call's own deadline
/// (`grpc-timeout`), whichever comes first; `None` for no bound at all.
pub(super) fn wait_until(metadata: &MetadataMap, wait: Option<Duration>) -> Option<Instant> {
    let now = Instant::now();
    let by_deadline = grpc_timeout(metadata).map(|t| now + t.saturating_sub(deadline_margin(t)));
    let by_wait = wait.map(|w| now + w);
    match (by_deadline, by_wait) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The call's own deadline (`grpc-timeout`, which the Connect layer makes of
/// `connect-timeout-ms`), for a stream to end at.
pub(super) fn call_deadline(metadata: &MetadataMap) -> Option<Instant> {
    grpc_timeout(metadata).and_then(|timeout| Instant::now().checked_add(timeout))
}

/// [`wait_until`] for a request's `timeout` field, refusing a malformed one (naming `timeout`).
pub(super) fn until_timeout(
    metadata: &MetadataMap,
    timeout: Option<prost_types::Duration>,
) -> Result<Option<Instant>, Status> {
    let timeout = timeout
        .map(|d| convert::duration("timeout", d))
        .transpose()
        .map_err(invalid_field)?;
    Ok(wait_until(metadata, timeout))
}

/// Waits until the job is terminal or `until` passes, and returns it as it is then with
/// whether it is terminal. When the server starts shutting down it answers at once, so a
/// waiting call never holds up the drain.
pub(super) async fn wait_for(
    executor: &Executor,
    stopping: &CancellationToken,
    id: JobId,
    until: Option<Instant>,
) -> Result<(pb::Job, bool), Status> {
    let wait = executor.wait_for_end(id, until);
    let (job, done) = tokio::select! {
        waited = wait => waited.map_err(watch_status)?,
        _ = stopping.cancelled() => {
            let job = executor.store().get(id).await?.ok_or_else(|| job_not_found(id))?;
            let done = job.is_terminal();
            (Arc::new(job), done)
        }
    };
    Ok((convert::job(&job), done))
}

/// [`wait_for`] for a caller that asked to wait for the job's end (WaitJob, WaitOperation),
/// not for this server: when a shutdown ends the wait first, telling it "not done" would say
/// that its wait ran out, which would be false. It gets UNAVAILABLE (`SHUTTING_DOWN`) instead,
/// what clients already retry. `what` names the job as the caller knows it.
pub(super) async fn wait_for_end(
    executor: &Executor,
    stopping: &CancellationToken,
    id: JobId,
    until: Option<Instant>,
    what: String,
) -> Result<(pb::Job, bool), Status> {
    let (job, done) = wait_for(executor, stopping, id, until).await?;
    if !done && stopping.is_cancelled() {
        return Err(super::status::shutting_down(format!(
            "the server is shutting down before {what} ended; wait again"
        )));
    }
    Ok((job, done))
}

/// Parses the `grpc-timeout` header: digits followed by a unit (H, M, S, m, u, n).
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(timeout: &str) -> MetadataMap {
        let mut map = MetadataMap::new();
        map.insert("grpc-timeout", timeout.parse().unwrap());
        map
    }

    #[test]
    fn the_margin_before_a_deadline_grows_with_it_within_bounds() {
        let margin = |ms| deadline_margin(Duration::from_millis(ms)).as_millis();
        assert_eq!(
            margin(5),
            20,
            "at least 20 ms, even past the timeout itself"
        );
        assert_eq!(margin(100), 20);
        assert_eq!(margin(500), 50);
        assert_eq!(margin(5_000), 500);
        assert_eq!(margin(3_600_000), 1_000, "at most a second");
    }

    #[test]
    fn grpc_timeout_header_is_parsed() {
        assert_eq!(
            grpc_timeout(&metadata("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(grpc_timeout(&metadata("3S")), Some(Duration::from_secs(3)));
        assert_eq!(
            grpc_timeout(&metadata("2H")),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(grpc_timeout(&metadata("9x")), None);
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }
}
