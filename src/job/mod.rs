//! The domain: jobs, their actions, states and legal transitions, versions and errors.
//! Nothing here knows about gRPC or SQL.

mod encoding;
mod limits;
mod model;
mod state;
mod trace;
mod webhook;
mod wire;

pub use limits::{
    DEFAULT_MAX_PARAMS_DEPTH, DEFAULT_MAX_SCHEDULE_DELAY, MAX_DURATION, MAX_PARAMS_DEPTH_LIMIT,
    MAX_RESULT_DEPTH, SubmitLimits, check_submit, params_wire_size,
};
pub(crate) use limits::{
    RUN_RESERVE_PER_ACTION, RUN_RESERVE_PER_JOB, check_action_count, check_action_sizes,
    check_idempotency_key, check_labels, check_schedule_time, fields_too_deep, labels_wire_size,
    value_too_deep,
};
pub use model::{
    Action, DEFAULT_TENANT, Job, JobError, JobId, MAX_ERROR_DETAILS_BYTES,
    MAX_UNPERSISTED_VERSIONS, NewAction, NewJob, Progress, is_error_code_name, status_code,
};
pub use state::{ActionState, IllegalTransition, JobState, UnknownState};
pub use trace::{
    InvalidTraceParent, TRACEPARENT_ENV, TRACEPARENT_HEADER, TRACESTATE_ENV, TRACESTATE_HEADER,
    TraceContext, TraceId, TraceParent, TraceState,
};
pub use webhook::{
    AttemptOutcome, Delivery, DeliveryState, NewDelivery, WebhookEvents, WebhookSpec, delivery_for,
};
pub use wire::{framed, job_budget, results_budget, submitted_budget, wire_size};

use std::fmt;

/// `text` cut to at most `max` bytes at a character boundary, ending with `…` when cut (the
/// mark counts towards `max`): for text from handlers or clients that is repeated in snapshots
/// or errors.
pub fn truncate(text: &str, max: usize) -> String {
    const MARK: char = '…';
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(MARK.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end])
}

/// What a job without actions is refused with, wherever it is submitted (the API's edge and
/// the executor, for programs that submit in-process).
pub(crate) const NO_ACTIONS: &str = "at least one action is required";

/// One thing wrong with a request, naming the field as a client would write its path
/// (`actions[1].params.duration_ms`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The path of the offending field.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }

    /// The same violation, with its field placed under `prefix` (`params` → `actions[0].params`).
    pub fn under(self, prefix: &str) -> Self {
        let field = if self.field.is_empty() {
            prefix.to_owned()
        } else if self.field.starts_with('[') {
            format!("{prefix}{}", self.field)
        } else {
            format!("{prefix}.{}", self.field)
        };
        Self { field, ..self }
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_text_with_its_mark_stays_within_the_limit() {
        assert_eq!(truncate("short", 5), "short");
        assert_eq!(truncate("abcdef", 5), "ab…");
        // Never in the middle of a character: "é" is two bytes.
        assert_eq!(truncate("éééé", 6), "é…");
        for max in 0..12 {
            let cut = truncate("éàü€ and more", max);
            assert!(cut.len() <= max.max(3), "{max}: {cut:?}");
        }
    }

    #[test]
    fn violations_nest_under_their_parent() {
        let v = FieldViolation::new("duration_ms", "must be a number");
        assert_eq!(
            v.under("actions[2].params").field,
            "actions[2].params.duration_ms"
        );
        let v = FieldViolation::new("", "must be an object");
        assert_eq!(v.under("actions[0].params").field, "actions[0].params");
        let v = FieldViolation::new("[3]", "bad");
        assert_eq!(v.under("args").field, "args[3]");
    }
}
