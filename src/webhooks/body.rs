//! The body of a delivery: JSON with the delivery id, the event, and the job snapshot in its
//! proto3 JSON form (the one grpcurl and `buf curl` print), so a receiver parses the same
//! `longrun.v1.Job` it would get from GetStatus.

use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use serde_json::{Value, json};

use crate::{
    api::{FILE_DESCRIPTOR_SET, convert, json::integral_numbers_as_integers},
    job::{Delivery, Job},
};

/// The `event.type` of a delivery reporting a terminal state.
pub const FINISHED: &str = "job.finished";
/// The `event.type` of a delivery reporting any other state.
pub const STATE_CHANGED: &str = "job.state_changed";

/// Why a body could not be built (a build problem: the descriptors do not match the code).
#[derive(Debug, thiserror::Error)]
#[error("building a webhook body: {0}")]
pub struct BodyError(String);

/// Writes delivery bodies; holds the decoded descriptors, so build one and reuse it.
#[derive(Debug, Clone)]
pub struct BodyWriter {
    job: MessageDescriptor,
}

impl BodyWriter {
    /// Loads the descriptors embedded in the library.
    pub fn new() -> Result<Self, BodyError> {
        let pool = DescriptorPool::decode(FILE_DESCRIPTOR_SET)
            .map_err(|e| BodyError(format!("loading the proto descriptors: {e}")))?;
        let job = pool
            .get_message_by_name("longrun.v1.Job")
            .ok_or_else(|| BodyError("no descriptor for longrun.v1.Job".to_owned()))?;
        Ok(Self { job })
    }

    /// The body for `delivery`, reporting `job` (the snapshot at the delivery's version). The
    /// same bytes on every attempt: only the timestamp and signature headers change.
    pub fn body(&self, delivery: &Delivery, job: &Job) -> Result<Vec<u8>, BodyError> {
        let wire = convert::job(job);
        let dynamic = DynamicMessage::decode(self.job.clone(), wire.encode_to_vec().as_slice())
            .map_err(|e| BodyError(e.to_string()))?;
        let mut job_json = serde_json::to_value(&dynamic).map_err(|e| BodyError(e.to_string()))?;
        // As grpcurl, the CLI and the Connect protocol write them: `3`, not `3.0`.
        integral_numbers_as_integers(&mut job_json);
        let body = json!({
            "delivery_id": delivery.id.hyphenated().to_string(),
            "event": {
                "type": event_type(delivery),
                "state": convert::job_state(delivery.job_state).as_str_name(),
                "version": delivery.job_version,
            },
            "timestamp": Value::String(
                humantime::format_rfc3339_micros(delivery.created_at).to_string(),
            ),
            "job": job_json,
        });
        serde_json::to_vec(&body).map_err(|e| BodyError(e.to_string()))
    }
}

/// `job.finished` for a terminal state, `job.state_changed` for any other.
pub fn event_type(delivery: &Delivery) -> &'static str {
    if delivery.job_state.is_terminal() {
        FINISHED
    } else {
        STATE_CHANGED
    }
}
