//! Conversion between the wire types and the domain. Requests are validated here, once, and
//! every violation names its field the way a client writes it.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use prost::Message;
use prost_types::{Struct, Timestamp, value::Kind};
use serde_json::{Map, Number, Value};

use super::{Limits, pb};
use crate::job::{
    self, ActionState, Delivery, DeliveryState, FieldViolation, Job, JobError, JobId, JobState,
    NewAction, NewJob, WebhookEvents,
};

/// How deep params may nest by default; deeper input is refused before it can cost stack or
/// time. Protobuf decoding itself stops at 100 levels of messages (a level of objects is
/// three: Struct, map entry, Value), so objects nested past ~32 are refused while decoding
/// (`api::codec`), whatever the configured depth.
pub use crate::job::DEFAULT_MAX_PARAMS_DEPTH;

/// Parses a job id, naming `field` when it is not a UUID.
pub fn parse_job_id(field: &str, value: &str) -> Result<JobId, FieldViolation> {
    if value.is_empty() {
        return Err(FieldViolation::new(field, "is required"));
    }
    parse_hyphenated(value).ok_or_else(|| {
        FieldViolation::new(
            field,
            format!("must be a job id (a UUID such as 0190b6c4-7d1e-7c3a-9f0e-1b2c3d4e5f60), not {value:?}"),
        )
    })
}

/// A job id in the one form ids are shown in: 36 characters, hyphenated (hex digits in either
/// case, as RFC 9562 reads them). The other forms a UUID parser takes (braced, `urn:uuid:`,
/// without hyphens) are refused, so that one job is not named by several strings.
pub fn parse_hyphenated(value: &str) -> Option<JobId> {
    (value.len() == 36).then(|| value.parse().ok()).flatten()
}

/// Converts and validates a Submit request against the server's limits. A request refused
/// here also has its actions checked against `registry` (the executor checks them for a
/// request that passes), so that every bad field is named at once.
pub fn new_job(
    request: pb::SubmitRequest,
    limits: &Limits,
    registry: &crate::actions::Registry,
) -> Result<NewJob, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let job_limits = limits.submit_limits();
    job::check_action_count(request.actions.len(), &job_limits, &mut violations);
    // What the request carries that no snapshot repeats: inputs, and the webhook (kept apart).
    let unrepeated: usize = request
        .actions
        .iter()
        .filter(|spec| !spec.input.is_empty())
        .map(|spec| job::framed(spec.input.len()))
        .sum::<usize>()
        + request
            .webhook
            .as_ref()
            .map_or(0, |w| job::framed(w.encoded_len()));
    let submitted_size = request.encoded_len().saturating_sub(unrepeated);
    let action_count = request.actions.len();
    let mut actions = Vec::with_capacity(request.actions.len());
    // Actions whose name and params converted, so that the registry can judge them.
    let mut checkable = Vec::with_capacity(request.actions.len());
    let mut all_params_size = 0;
    for (i, spec) in request.actions.into_iter().enumerate() {
        let field = format!("actions[{i}]");
        if spec.name.is_empty() {
            violations.push(FieldViolation::new(format!("{field}.name"), "is required"));
        }
        let params_size = spec.params.as_ref().map_or(0, prost::Message::encoded_len);
        all_params_size += params_size;
        job::check_action_sizes(
            &field,
            params_size,
            spec.input.len(),
            &job_limits,
            &mut violations,
        );
        let params = match spec
            .params
            .map(|p| struct_to_json(p, 0, limits.max_params_depth))
            .transpose()
        {
            Ok(params) => {
                checkable.push(!spec.name.is_empty());
                params.unwrap_or_default()
            }
            Err(v) => {
                checkable.push(false);
                violations.push(v.under(&format!("{field}.params")));
                Map::new()
            }
        };
        actions.push(NewAction {
            name: spec.name,
            params,
            input: spec.input,
        });
    }
    // Every snapshot of the job repeats what the Submit gave, and must fit in one response with
    // the results to come: a job that could not be read back is refused now, not after it ran.
    let budget = job::submitted_budget(limits.max_message_bytes);
    let submitted =
        submitted_size + job::RUN_RESERVE_PER_ACTION * action_count + job::RUN_RESERVE_PER_JOB;
    if submitted > budget {
        // Only a refused job is told which part is the larger.
        let labels_size = job::labels_wire_size(&request.labels);
        violations.push(FieldViolation::new(
            if labels_size > all_params_size {
                "labels"
            } else {
                "actions"
            },
            format!(
                "the job as submitted takes {submitted} bytes as sent (params {all_params_size}, \
                 labels {labels_size}, the rest names and what its run adds); a job may take \
                 at most {budget} (a quarter of max_message_bytes: an operation carries the job \
                 twice, with its results)"
            ),
        ));
    }
    let idempotency_key = non_empty(request.idempotency_key);
    if let Some(key) = &idempotency_key {
        job::check_idempotency_key(key, &job_limits, &mut violations);
    }
    let timeout = match request.timeout.map(|d| duration("timeout", d)).transpose() {
        // Zero is more likely a unit mistake than a wish for no limit, which is "unset".
        Ok(Some(zero)) if zero.is_zero() => {
            violations.push(FieldViolation::new(
                "timeout",
                "must be longer than 0s; leave it unset for no time limit",
            ));
            None
        }
        Ok(timeout) => timeout,
        Err(v) => {
            violations.push(v);
            None
        }
    };
    if let Some(Err(v)) = request.wait.map(|d| duration("wait", d)) {
        violations.push(v);
    }
    if request.max_attempts < 0 {
        violations.push(FieldViolation::new("max_attempts", "must not be negative"));
    }
    let schedule_time = match request.schedule_time.map(|t| time("schedule_time", t)) {
        Some(Ok(time)) => {
            job::check_schedule_time(time, SystemTime::now(), &job_limits, &mut violations);
            Some(time)
        }
        Some(Err(v)) => {
            violations.push(v);
            None
        }
        None => None,
    };
    violations.extend(job::check_labels("labels", &request.labels, &job_limits));
    if !violations.is_empty() {
        for (i, action) in actions.iter().enumerate() {
            if checkable[i] {
                // A panicking check was logged; the request is refused for its other
                // fields anyway.
                if let Ok(found) = registry.validate_action(i, action) {
                    violations.extend(found);
                }
            }
        }
    }
    if violations.is_empty() {
        Ok(NewJob {
            actions,
            idempotency_key,
            timeout,
            max_attempts: u32::try_from(request.max_attempts).ok().filter(|n| *n > 0),
            priority: request.priority,
            labels: request.labels.into_iter().collect(),
            schedule_time,
            // Checked apart, by the webhook policy (it resolves the host: async).
            webhook: None,
            // The service sets the caller's tenant: it is not part of the request.
            ..NewJob::default()
        })
    } else {
        Err(violations)
    }
}

/// Checks a label map (of a job or of a filter) against the limits.
pub fn check_labels(
    field: &str,
    labels: &std::collections::HashMap<String, String>,
    limits: &Limits,
) -> Vec<FieldViolation> {
    job::check_labels(field, labels, &limits.submit_limits())
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// The longest duration a `google.protobuf.Duration` may hold (about 10,000 years): a longer
/// one would be stored, and then break every JSON client that reads it back.
const MAX_DURATION_SECONDS: i64 = job::MAX_DURATION.as_secs() as i64;

/// Converts a wire duration, refusing negative, malformed and out-of-range ones.
pub fn duration(field: &str, d: prost_types::Duration) -> Result<Duration, FieldViolation> {
    let signs_differ = (d.seconds < 0 && d.nanos > 0) || (d.seconds > 0 && d.nanos < 0);
    if signs_differ || d.nanos.unsigned_abs() >= 1_000_000_000 {
        return Err(FieldViolation::new(
            field,
            "is not a valid duration: nanos must be -999999999 to 999999999, with the sign of \
             seconds",
        ));
    }
    if d.seconds < 0 || d.nanos < 0 {
        return Err(FieldViolation::new(field, "must not be negative"));
    }
    if d.seconds > MAX_DURATION_SECONDS {
        return Err(FieldViolation::new(
            field,
            format!(
                "must be at most {MAX_DURATION_SECONDS}s, the longest google.protobuf.Duration"
            ),
        ));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

fn struct_to_json(
    s: Struct,
    depth: usize,
    max_depth: usize,
) -> Result<Map<String, Value>, FieldViolation> {
    let mut map = Map::new();
    for (key, value) in s.fields {
        let value = value_to_json(value, depth + 1, max_depth).map_err(|v| v.under(&key))?;
        map.insert(key, value);
    }
    Ok(map)
}

/// A wire `Value` as JSON, refusing non-finite numbers and nesting past `max_depth`.
pub(super) fn value_to_json(
    value: prost_types::Value,
    depth: usize,
    max_depth: usize,
) -> Result<Value, FieldViolation> {
    if depth > max_depth {
        return Err(FieldViolation::new(
            "",
            format!("nests deeper than {max_depth} levels (max_params_depth)"),
        ));
    }
    Ok(match value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::NumberValue(n)) => Number::from_f64(n)
            .map(Value::Number)
            .ok_or_else(|| FieldViolation::new("", "must be a finite number"))?,
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s, depth, max_depth)?),
        Some(Kind::ListValue(list)) => Value::Array(
            list.values
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    value_to_json(v, depth + 1, max_depth).map_err(|e| e.under(&format!("[{i}]")))
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// A JSON value as a wire `Value`.
pub fn json_to_value(value: &Value) -> prost_types::Value {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(json_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A JSON object as a wire `Struct`.
pub fn json_to_struct(map: &Map<String, Value>) -> Struct {
    Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// Converts a wire timestamp, refusing malformed ones and those before the Unix epoch (which
/// no client means, and stored snapshots could not hold).
pub fn time(field: &str, t: Timestamp) -> Result<SystemTime, FieldViolation> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(FieldViolation::new(
            field,
            "is not a valid timestamp: nanos must be 0 to 999999999",
        ));
    }
    if t.seconds < 0 {
        return Err(FieldViolation::new(
            field,
            "must not be before 1970-01-01T00:00:00Z",
        ));
    }
    // google.protobuf.Timestamp's own range ends with year 9999.
    const MAX_SECONDS: i64 = 253_402_300_799;
    if t.seconds > MAX_SECONDS {
        return Err(FieldViolation::new(
            field,
            "must not be after 9999-12-31T23:59:59Z",
        ));
    }
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::new(t.seconds as u64, t.nanos as u32))
        .ok_or_else(|| FieldViolation::new(field, "is past what this server's clock can hold"))
}

/// A time as a wire timestamp.
pub fn timestamp(time: SystemTime) -> Timestamp {
    Timestamp::from(time)
}

fn wire_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The wire enum for a job state.
pub fn job_state(state: JobState) -> pb::JobState {
    match state {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

/// The domain state for a wire enum value; `None` for UNSPECIFIED or unknown values.
pub fn domain_job_state(value: i32) -> Option<JobState> {
    match pb::JobState::try_from(value).ok()? {
        pb::JobState::Unspecified => None,
        pb::JobState::Queued => Some(JobState::Queued),
        pb::JobState::Running => Some(JobState::Running),
        pb::JobState::Succeeded => Some(JobState::Succeeded),
        pb::JobState::Failed => Some(JobState::Failed),
        pb::JobState::Cancelled => Some(JobState::Cancelled),
    }
}

fn action_state(state: ActionState) -> pb::ActionState {
    match state {
        ActionState::Pending => pb::ActionState::Pending,
        ActionState::Running => pb::ActionState::Running,
        ActionState::Succeeded => pb::ActionState::Succeeded,
        ActionState::Failed => pb::ActionState::Failed,
        ActionState::Cancelled => pb::ActionState::Cancelled,
        ActionState::Skipped => pb::ActionState::Skipped,
    }
}

fn progress(p: &job::Progress) -> pb::Progress {
    // The clone copies the message, which the wire type has to own anyway.
    owned_progress(p.clone())
}

/// [`progress`] of a value made for the occasion, whose message need not be copied again.
fn owned_progress(p: job::Progress) -> pb::Progress {
    pb::Progress {
        percent: i32::from(p.percent),
        message: p.message,
        current: p.current as i64,
        total: p.total as i64,
    }
}

fn job_error(e: &JobError) -> pb::JobError {
    pb::JobError {
        code: e.code.clone(),
        reason: e.reason.clone(),
        message: e.message.clone(),
        details: (!e.details.is_empty()).then(|| json_to_struct(&e.details)),
    }
}

/// A job snapshot on the wire. Inputs are left out: they can be large, and the client sent them.
pub fn job(job: &Job) -> pb::Job {
    pb::Job {
        id: job.id.to_wire(),
        state: job_state(job.state) as i32,
        version: job.version,
        progress: Some(owned_progress(job.progress())),
        actions: job
            .actions
            .iter()
            .map(|a| pb::ActionStatus {
                name: a.name.clone(),
                state: action_state(a.state) as i32,
                progress: Some(progress(&a.progress)),
                result: a.result.as_ref().map(json_to_value),
                error: a.error.as_ref().map(job_error),
                params: Some(json_to_struct(&a.params)),
                start_time: a.start_time.map(timestamp),
                end_time: a.end_time.map(timestamp),
            })
            .collect(),
        error: job.error.as_ref().map(job_error),
        attempt: job.attempt as i32,
        max_attempts: job.max_attempts as i32,
        labels: job
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        create_time: Some(timestamp(job.create_time)),
        start_time: job.start_time.map(timestamp),
        end_time: job.end_time.map(timestamp),
        update_time: Some(timestamp(job.update_time)),
        priority: job.priority,
        timeout: job.timeout.map(wire_duration),
        idempotency_key: job.idempotency_key.clone().unwrap_or_default(),
        tenant: job.tenant.clone(),
        cancel_requested: job.cancel_requested,
        schedule_time: job.schedule_time.map(timestamp),
        next_attempt_time: job.next_attempt_time.map(timestamp),
        // Never the secret: it is write-only.
        webhook: job.webhook.as_ref().map(|w| pb::Webhook {
            url: w.url.clone(),
            secret: String::new(),
            events: webhook_events(w.events) as i32,
        }),
        // Filled by the RPCs that read the outbox (GetStatus, WaitJob).
        webhook_deliveries: Vec::new(),
    }
}

/// The wire enum for which events a webhook reports.
pub fn webhook_events(events: WebhookEvents) -> pb::WebhookEvents {
    match events {
        WebhookEvents::Terminal => pb::WebhookEvents::Terminal,
        WebhookEvents::All => pb::WebhookEvents::All,
    }
}

/// A webhook delivery on the wire.
pub fn webhook_delivery(delivery: &Delivery) -> pb::WebhookDelivery {
    pb::WebhookDelivery {
        delivery_id: delivery.id.hyphenated().to_string(),
        job_state: job_state(delivery.job_state) as i32,
        job_version: delivery.job_version,
        state: match delivery.state {
            DeliveryState::Pending => pb::WebhookDeliveryState::Pending,
            DeliveryState::Delivered => pb::WebhookDeliveryState::Delivered,
            DeliveryState::Dead => pb::WebhookDeliveryState::Dead,
        } as i32,
        attempts: i32::try_from(delivery.attempts).unwrap_or(i32::MAX),
        last_error: delivery.last_error.clone().unwrap_or_default(),
        next_attempt_time: delivery.next_attempt_at.map(timestamp),
        delivered_time: delivery.delivered_at.map(timestamp),
        create_time: Some(timestamp(delivery.created_at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn to_struct(value: Value) -> Struct {
        json_to_struct(value.as_object().unwrap())
    }

    /// In-process Submits are measured without encoding: the count must be what is sent.
    #[test]
    fn params_wire_size_is_the_encoded_struct_size() {
        for params in [
            json!({}),
            json!({"a": 1, "b": "text ✓", "c": null, "d": false}),
            json!({"n": {"list": [1, [2, {"x": "y".repeat(300)}], {}], "e": {}}}),
        ] {
            let map = params.as_object().unwrap();
            assert_eq!(
                job::params_wire_size(map),
                json_to_struct(map).encoded_len()
            );
        }
    }

    #[test]
    fn params_round_trip_through_struct() {
        let params = json!({"a": 1.5, "b": [true, null, "x"], "c": {"d": 2.0}});
        let back = struct_to_json(to_struct(params.clone()), 0, DEFAULT_MAX_PARAMS_DEPTH).unwrap();
        assert_eq!(Value::Object(back), params);
    }

    #[test]
    fn non_finite_numbers_are_named() {
        let mut s = to_struct(json!({"a": {"b": [1]}}));
        let list = prost_types::ListValue {
            values: vec![prost_types::Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            }],
        };
        s.fields.insert(
            "n".into(),
            prost_types::Value {
                kind: Some(Kind::ListValue(list)),
            },
        );
        assert_eq!(
            struct_to_json(s, 0, DEFAULT_MAX_PARAMS_DEPTH)
                .unwrap_err()
                .field,
            "n[0]"
        );
    }

    #[test]
    fn deep_params_are_refused() {
        let mut value = json!(1);
        for _ in 0..40 {
            value = json!({ "x": value });
        }
        let err = struct_to_json(to_struct(value), 0, DEFAULT_MAX_PARAMS_DEPTH).unwrap_err();
        assert!(err.field.starts_with("x.x."));
    }

    #[test]
    fn ids_are_checked() {
        assert_eq!(
            parse_job_id("job_id", "").unwrap_err().description,
            "is required"
        );
        assert!(
            parse_job_id("job_id", "nope")
                .unwrap_err()
                .description
                .contains("UUID")
        );
        let id = JobId::generate();
        let text = id.to_string();
        assert_eq!(parse_job_id("job_id", &text).unwrap(), id);
        assert_eq!(parse_job_id("job_id", &text.to_uppercase()).unwrap(), id);
        // The one job is named by one string (up to case): the parser's other forms are refused.
        let uuid = id.as_uuid();
        for other in [
            uuid.simple().to_string(),
            uuid.braced().to_string(),
            uuid.urn().to_string(),
            format!(" {text}"),
        ] {
            assert!(parse_job_id("job_id", &other).is_err(), "{other}");
            assert!(
                super::super::operations_convert::parse_operation_name(
                    "name",
                    &format!("operations/{other}")
                )
                .is_err(),
                "{other}"
            );
        }
    }

    #[test]
    fn durations_out_of_range_are_refused_with_what_is_wrong() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        let refused = |seconds, nanos| duration("wait", d(seconds, nanos)).unwrap_err();
        assert_eq!(refused(-1, 0).field, "wait");
        assert!(refused(-1, 0).description.contains("negative"));
        assert!(refused(0, -1).description.contains("negative"));
        assert!(refused(-1, -5).description.contains("negative"));
        assert!(refused(1, -1).description.contains("nanos"));
        assert!(refused(-1, 5).description.contains("nanos"));
        assert!(refused(0, 1_000_000_000).description.contains("nanos"));
        assert!(
            refused(MAX_DURATION_SECONDS + 1, 0)
                .description
                .contains("at most")
        );
        assert_eq!(
            duration("wait", d(MAX_DURATION_SECONDS, 999_999_999)).unwrap(),
            Duration::new(MAX_DURATION_SECONDS as u64, 999_999_999)
        );
        assert_eq!(duration("wait", d(0, 0)).unwrap(), Duration::ZERO);
    }

    #[test]
    fn timestamps_out_of_range_are_refused_naming_the_field() {
        let t = |seconds, nanos| Timestamp { seconds, nanos };
        let refused = |seconds, nanos| time("schedule_time", t(seconds, nanos)).unwrap_err();
        for (seconds, nanos, says) in [
            (0, -1, "nanos"),
            (0, 1_000_000_000, "nanos"),
            (-1, 0, "1970"),
            (253_402_300_800, 0, "9999"),
            (i64::MAX, 0, "9999"),
        ] {
            let violation = refused(seconds, nanos);
            assert_eq!(violation.field, "schedule_time");
            assert!(violation.description.contains(says), "{violation:?}");
        }
        assert_eq!(
            time("schedule_time", t(1, 5)).unwrap(),
            SystemTime::UNIX_EPOCH + Duration::new(1, 5)
        );
        assert!(time("schedule_time", t(253_402_300_799, 999_999_999)).is_ok());
    }
}
