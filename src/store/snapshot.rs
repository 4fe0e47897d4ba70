//! How a job snapshot and a time are kept in a durable store's columns, the same in every
//! backend: the snapshot as the serde_json of the whole `Job` (compact: see `job/encoding.rs`),
//! times as unix microseconds.

use std::time::{SystemTime, UNIX_EPOCH};

use super::StoreError;
use crate::job::{ActionState, Job};

/// The job stored as `snapshot`.
pub(crate) fn decode(snapshot: &str) -> Result<Job, StoreError> {
    let mut job: Job = serde_json::from_str(snapshot)
        .map_err(|e| StoreError::Corrupt(format!("job snapshot: {e}")))?;
    // serde reads a `null` result as no result at all. A succeeded action always has one, so
    // a succeeded action without one returned JSON null (snapshots of every encoding wrote
    // `"result":null` for it; older ones wrote it for actions without a result too).
    for action in &mut job.actions {
        if action.state == ActionState::Succeeded && action.result.is_none() {
            action.result = Some(serde_json::Value::Null);
        }
    }
    Ok(job)
}

/// The time `micros` microseconds from the Unix epoch (the inverse of [`unix_micros`]).
pub(crate) fn from_unix_micros(micros: i64) -> SystemTime {
    let offset = std::time::Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        UNIX_EPOCH.checked_sub(offset)
    }
    .unwrap_or(UNIX_EPOCH)
}

/// Microseconds since the Unix epoch, negative before it, saturating far from it.
pub(crate) fn unix_micros(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros())
            .map(|m| -m)
            .unwrap_or(i64::MIN),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn micros_keep_order_around_the_epoch() {
        let second = Duration::from_secs(1);
        assert_eq!(unix_micros(UNIX_EPOCH + second), 1_000_000);
        assert_eq!(unix_micros(UNIX_EPOCH - second), -1_000_000);
        assert_eq!(unix_micros(UNIX_EPOCH), 0);
    }
}
