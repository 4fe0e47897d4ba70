//! The limits a submitted job must keep, checked on its domain form: the API checks the same
//! limits on the wire form at its edge; a program that submits in-process (`Executor::submit`)
//! gets them checked here, so that it cannot store a job the server could not run, send or read
//! back (too deep to decode, too large for one response, a timer past the clock's range).

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use serde_json::{Map, Value};

use super::{FieldViolation, NO_ACTIONS, NewJob, framed, submitted_budget, wire_size};

/// How deep params may nest by default (see [`SubmitLimits::max_params_depth`]).
pub const DEFAULT_MAX_PARAMS_DEPTH: usize = 32;

/// The deepest params nesting a server may be configured to accept: stored snapshots are read
/// back by a JSON parser that stops at 128 levels, the job's own structure included.
pub const MAX_PARAMS_DEPTH_LIMIT: usize = 100;

/// The longest duration a `google.protobuf.Duration` may hold (about 10,000 years): what a
/// job's `timeout` may be at most, so that it can be sent, and its deadline computed.
pub const MAX_DURATION: Duration = Duration::from_secs(315_576_000_000);

/// Room reserved in a job's snapshot, at Submit, for what running each action adds (its state,
/// times and progress figures) and the job itself (its times, attempt, error code).
pub(crate) const RUN_RESERVE_PER_ACTION: usize = 64;
pub(crate) const RUN_RESERVE_PER_JOB: usize = 256;

/// The size and count limits of a submitted job (the API's `Limits` hold the same, with the
/// same defaults, and the server gives the executor those it serves with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitLimits {
    /// The largest message the server sends, in bytes (default 16 MiB): a job's snapshot must
    /// fit in a quarter of it at submission (see [`submitted_budget`]).
    pub max_message_bytes: usize,
    /// Actions a job may have (default 100).
    pub max_actions_per_job: usize,
    /// An action's params as sent (a `google.protobuf.Struct`), in bytes (default 64 KiB).
    pub max_params_bytes: usize,
    /// An action's binary input, in bytes (default 8 MiB).
    pub max_input_bytes: usize,
    /// Labels a job may have (default 64).
    pub max_labels: usize,
    /// A label key, in bytes (default 256).
    pub max_label_key_bytes: usize,
    /// A label value, in bytes (default 256).
    pub max_label_value_bytes: usize,
    /// How deep an action's params may nest: objects and lists within the top-level object
    /// (default 32).
    pub max_params_depth: usize,
    /// An idempotency key, in bytes (default 256).
    pub max_idempotency_key_bytes: usize,
    /// How far ahead of the server's clock a job may be scheduled (default 30 days); 0 allows
    /// no scheduling ahead at all.
    pub max_schedule_delay: Duration,
}

/// The default [`SubmitLimits::max_schedule_delay`]: 30 days.
pub const DEFAULT_MAX_SCHEDULE_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

impl Default for SubmitLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 * 1024 * 1024,
            max_actions_per_job: 100,
            max_params_bytes: 64 * 1024,
            max_input_bytes: 8 * 1024 * 1024,
            max_labels: 64,
            max_label_key_bytes: 256,
            max_label_value_bytes: 256,
            max_params_depth: DEFAULT_MAX_PARAMS_DEPTH,
            max_idempotency_key_bytes: 256,
            max_schedule_delay: DEFAULT_MAX_SCHEDULE_DELAY,
        }
    }
}

/// An action's params as sent: the encoded size of the `google.protobuf.Struct` they make.
pub fn params_wire_size(params: &Map<String, Value>) -> usize {
    params
        .iter()
        .map(|(key, value)| framed(framed(key.len()) + framed(wire_size(value))))
        .sum()
}

/// A label map as sent, entries framed.
pub(crate) fn labels_wire_size<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> usize {
    labels
        .into_iter()
        .map(|(key, value)| framed(framed(key.len()) + framed(value.len())))
        .sum()
}

/// Checks a label map (of a job or of a filter) against the limits, naming `field`.
pub(crate) fn check_labels<'a>(
    field: &str,
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    limits: &SubmitLimits,
) -> Vec<FieldViolation> {
    let sorted: BTreeMap<&String, &String> = labels.into_iter().collect();
    let mut violations = Vec::new();
    if sorted.len() > limits.max_labels {
        violations.push(FieldViolation::new(
            field,
            format!(
                "{} labels given; at most {} are allowed",
                sorted.len(),
                limits.max_labels
            ),
        ));
    }
    for (key, value) in sorted {
        if key.is_empty() || key.len() > limits.max_label_key_bytes {
            violations.push(FieldViolation::new(
                format!("{field}[{key:?}]"),
                format!(
                    "label keys must be 1 to {} bytes (max_label_key_bytes); this one has {}",
                    limits.max_label_key_bytes,
                    key.len()
                ),
            ));
        }
        // A control character (a NUL, a newline) in a label breaks every line of text that
        // shows it (the CLI, logs) and is never meant.
        if key.chars().chain(value.chars()).any(char::is_control) {
            violations.push(FieldViolation::new(
                format!("{field}[{key:?}]"),
                "label keys and values must not hold control characters",
            ));
        }
        if value.len() > limits.max_label_value_bytes {
            violations.push(FieldViolation::new(
                format!("{field}[{key:?}]"),
                format!(
                    "label values must be at most {} bytes (max_label_value_bytes); this one \
                     has {}",
                    limits.max_label_value_bytes,
                    value.len()
                ),
            ));
        }
    }
    violations
}

/// The path (below `fields`) of the first value nested deeper than `max_depth`, the fields'
/// own values being at depth 1; `None` when none is. Stops at the first level past the
/// limit, so it never recurses deeper than `max_depth + 1`.
pub(crate) fn fields_too_deep(fields: &Map<String, Value>, max_depth: usize) -> Option<String> {
    fields.iter().find_map(|(key, value)| {
        walk_depth(value, 1, max_depth).map(|below| format!(".{key}{below}"))
    })
}

/// As [`fields_too_deep`] for any value: the items or fields of an array or object at the
/// top are at depth 1.
pub(crate) fn value_too_deep(value: &Value, max_depth: usize) -> Option<String> {
    walk_depth(value, 0, max_depth)
}

fn walk_depth(value: &Value, depth: usize, max_depth: usize) -> Option<String> {
    if depth > max_depth {
        return Some(String::new());
    }
    match value {
        Value::Object(fields) => fields.iter().find_map(|(key, v)| {
            walk_depth(v, depth + 1, max_depth).map(|below| format!(".{key}{below}"))
        }),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| {
            walk_depth(v, depth + 1, max_depth).map(|below| format!("[{i}]{below}"))
        }),
        _ => None,
    }
}

/// How deep an action's result and an error's details may nest: as deep as params may by
/// default. Past it, protobuf decoders (prost stops at 100 nested messages, three a level of
/// a `google.protobuf.Value`) could not read back the job that carries them.
pub const MAX_RESULT_DEPTH: usize = DEFAULT_MAX_PARAMS_DEPTH;

/// Checks a non-empty idempotency key: at most `max_idempotency_key_bytes`, and no control
/// characters (a NUL or a newline breaks the lines of text that show the key, as in a label).
/// Shared as [`check_action_count`] is.
pub(crate) fn check_idempotency_key(
    key: &str,
    limits: &SubmitLimits,
    violations: &mut Vec<FieldViolation>,
) {
    if key.len() > limits.max_idempotency_key_bytes {
        violations.push(FieldViolation::new(
            "idempotency_key",
            format!("must be at most {} bytes", limits.max_idempotency_key_bytes),
        ));
    }
    if key.chars().any(char::is_control) {
        violations.push(FieldViolation::new(
            "idempotency_key",
            "must not hold control characters",
        ));
    }
}

/// Checks a job's `schedule_time` against the clock at `now`: at most `max_schedule_delay`
/// ahead (a time already past is allowed: the job runs at once). Shared as
/// [`check_action_count`] is.
pub(crate) fn check_schedule_time(
    time: SystemTime,
    now: SystemTime,
    limits: &SubmitLimits,
    violations: &mut Vec<FieldViolation>,
) {
    if time < SystemTime::UNIX_EPOCH {
        // Stored snapshots could not be read back, and no one means it.
        violations.push(FieldViolation::new(
            "schedule_time",
            "must not be before 1970-01-01T00:00:00Z; leave it unset to run at once",
        ));
        return;
    }
    let ahead = time.duration_since(now).unwrap_or_default();
    if ahead > limits.max_schedule_delay {
        violations.push(FieldViolation::new(
            "schedule_time",
            format!(
                "is {} ahead of the server's clock; at most {} is allowed \
                 (max_schedule_delay)",
                // Rounded up, so that a time just past the limit never reads as at it.
                humantime::format_duration(Duration::from_millis(
                    ahead.as_nanos().div_ceil(1_000_000) as u64
                )),
                humantime::format_duration(limits.max_schedule_delay)
            ),
        ));
    }
}

/// Checks how many actions a job has: at least one, at most `max_actions_per_job`. The API's
/// edge (on the wire form) and [`check_submit`] (on the domain form) both call it.
pub(crate) fn check_action_count(
    count: usize,
    limits: &SubmitLimits,
    violations: &mut Vec<FieldViolation>,
) {
    if count == 0 {
        violations.push(FieldViolation::new("actions", NO_ACTIONS));
    }
    if count > limits.max_actions_per_job {
        violations.push(FieldViolation::new(
            "actions",
            format!(
                "{count} actions given; at most {} are allowed per job",
                limits.max_actions_per_job
            ),
        ));
    }
}

/// Checks one action's params (as sent: see [`params_wire_size`]) and input sizes, naming
/// `field` (`actions[1]`); shared as [`check_action_count`] is.
pub(crate) fn check_action_sizes(
    field: &str,
    params_size: usize,
    input_len: usize,
    limits: &SubmitLimits,
    violations: &mut Vec<FieldViolation>,
) {
    if params_size > limits.max_params_bytes {
        violations.push(FieldViolation::new(
            format!("{field}.params"),
            format!(
                "is {params_size} bytes encoded; at most {} are allowed",
                limits.max_params_bytes
            ),
        ));
    }
    if input_len > limits.max_input_bytes {
        violations.push(FieldViolation::new(
            format!("{field}.input"),
            format!(
                "is {input_len} bytes; at most {} are allowed",
                limits.max_input_bytes
            ),
        ));
    }
}

/// Every way `spec` breaks `limits`, each naming its field as a client would write it
/// (`actions[0].params.a.b`, `labels["k"]`, `timeout`). Whether its actions exist and take
/// these params is the registry's to check.
pub fn check_submit(spec: &NewJob, limits: &SubmitLimits) -> Vec<FieldViolation> {
    let mut violations = Vec::new();
    check_action_count(spec.actions.len(), limits, &mut violations);
    let mut submitted = 0;
    for (i, action) in spec.actions.iter().enumerate() {
        let field = format!("actions[{i}]");
        if action.name.is_empty() {
            violations.push(FieldViolation::new(format!("{field}.name"), "is required"));
        }
        if let Some(path) = fields_too_deep(&action.params, limits.max_params_depth) {
            violations.push(FieldViolation::new(
                format!("{field}.params{path}"),
                format!(
                    "nests deeper than {} levels (max_params_depth)",
                    limits.max_params_depth
                ),
            ));
            // Its size would take a walk through all of it.
            continue;
        }
        let params_size = params_wire_size(&action.params);
        check_action_sizes(
            &field,
            params_size,
            action.input.len(),
            limits,
            &mut violations,
        );
        submitted += framed(framed(action.name.len()) + framed(params_size));
    }
    violations.extend(check_labels("labels", &spec.labels, limits));
    if let Some(key) = &spec.idempotency_key {
        if key.is_empty() {
            violations.push(FieldViolation::new(
                "idempotency_key",
                "is empty; leave it unset (None) for a job without a key",
            ));
        } else {
            check_idempotency_key(key, limits, &mut violations);
        }
        submitted += framed(key.len());
    }
    match spec.timeout {
        Some(zero) if zero.is_zero() => violations.push(FieldViolation::new(
            "timeout",
            "must be longer than 0s; leave it unset (None) for no time limit",
        )),
        Some(long) if long > MAX_DURATION => violations.push(FieldViolation::new(
            "timeout",
            format!(
                "must be at most {}s, the longest google.protobuf.Duration; leave it unset \
                 (None) for no time limit",
                MAX_DURATION.as_secs()
            ),
        )),
        _ => {}
    }
    if let Some(time) = spec.schedule_time {
        check_schedule_time(time, SystemTime::now(), limits, &mut violations);
    }
    submitted += labels_wire_size(&spec.labels);
    let budget = submitted_budget(limits.max_message_bytes);
    let needed = submitted + RUN_RESERVE_PER_ACTION * spec.actions.len() + RUN_RESERVE_PER_JOB;
    if needed > budget {
        violations.push(FieldViolation::new(
            "actions",
            format!(
                "the job as submitted takes {needed} bytes as sent, with room for its run; a \
                 job may take at most {budget} (a quarter of max_message_bytes)"
            ),
        ));
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::NewAction;
    use serde_json::json;

    fn job(params: Value) -> NewJob {
        let Value::Object(params) = params else {
            unreachable!("test params are objects")
        };
        NewJob {
            actions: vec![NewAction {
                name: "a".to_owned(),
                params,
                input: bytes::Bytes::new(),
            }],
            ..NewJob::default()
        }
    }

    fn fields(spec: &NewJob, limits: &SubmitLimits) -> Vec<String> {
        check_submit(spec, limits)
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    #[test]
    fn params_nested_to_the_limit_pass_and_one_level_more_is_named() {
        let limits = SubmitLimits {
            max_params_depth: 3,
            ..SubmitLimits::default()
        };
        let at_limit = job(json!({"a": {"b": [1]}, "flat": 1}));
        assert!(fields(&at_limit, &limits).is_empty());
        let past = job(json!({"flat": 1, "a": {"b": [[1]]}}));
        assert_eq!(fields(&past, &limits), ["actions[0].params.a.b[0][0]"]);
    }

    #[test]
    fn a_nesting_far_past_the_limit_is_refused_without_walking_it() {
        // Built by hand: `json!` would serialize the value it is given, recursively.
        let mut deep = json!(1);
        for _ in 0..10_000 {
            deep = Value::Array(vec![deep]);
        }
        let spec = job(Value::Object(
            [("deep".to_owned(), deep)].into_iter().collect(),
        ));
        assert_eq!(
            fields(&spec, &SubmitLimits::default()),
            [format!("actions[0].params.deep{}", "[0]".repeat(32))]
        );
        // Dropping it takes a recursion per level: not this test's concern.
        std::mem::forget(spec);
    }

    #[test]
    fn each_limit_is_checked_at_its_edge() {
        let limits = SubmitLimits {
            max_actions_per_job: 2,
            max_params_bytes: 13,
            max_input_bytes: 3,
            max_labels: 1,
            max_label_key_bytes: 2,
            max_label_value_bytes: 2,
            max_idempotency_key_bytes: 2,
            ..SubmitLimits::default()
        };
        let mut spec = job(json!({"m": "1234"}));
        assert_eq!(params_wire_size(&spec.actions[0].params), 13);
        spec.actions[0].input = bytes::Bytes::from_static(b"123");
        spec.actions.push(spec.actions[0].clone());
        spec.labels.insert("ab".to_owned(), "cd".to_owned());
        spec.idempotency_key = Some("ab".to_owned());
        spec.timeout = Some(MAX_DURATION);
        assert!(fields(&spec, &limits).is_empty(), "at every edge");

        spec.actions[1]
            .params
            .insert("m".to_owned(), json!("12345"));
        spec.actions[1].input = bytes::Bytes::from_static(b"1234");
        spec.actions.push(spec.actions[0].clone());
        spec.labels.insert("abc".to_owned(), "cde".to_owned());
        spec.idempotency_key = Some("abc".to_owned());
        spec.timeout = Some(MAX_DURATION + Duration::from_secs(1));
        assert_eq!(
            fields(&spec, &limits),
            [
                "actions",
                "actions[1].params",
                "actions[1].input",
                "labels",
                "labels[\"abc\"]",
                "labels[\"abc\"]",
                "idempotency_key",
                "timeout",
            ]
        );
    }

    #[test]
    fn labels_with_control_characters_are_refused_naming_them() {
        let labels: BTreeMap<String, String> = [
            (
                "ok".to_owned(),
                "fine value, with spaces and ünïcode".to_owned(),
            ),
            ("k\u{0}".to_owned(), "v".to_owned()),
            ("line".to_owned(), "a\nb".to_owned()),
        ]
        .into_iter()
        .collect();
        let violations = check_labels("labels", &labels, &SubmitLimits::default());
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["labels[\"k\\0\"]", "labels[\"line\"]"]);
        assert!(violations[0].description.contains("control characters"));
    }

    #[test]
    fn idempotency_keys_with_control_characters_are_refused() {
        for (key, refused) in [
            ("order-42 ünïcode, spaces", false),
            ("a\nb", true),
            ("nul\u{0}", true),
            ("\u{85}next line", true),
        ] {
            let mut violations = Vec::new();
            check_idempotency_key(key, &SubmitLimits::default(), &mut violations);
            assert_eq!(!violations.is_empty(), refused, "{key:?}");
        }
    }

    #[test]
    fn empty_names_keys_and_zero_timeouts_are_refused() {
        let mut spec = job(json!({}));
        spec.actions[0].name.clear();
        spec.idempotency_key = Some(String::new());
        spec.timeout = Some(Duration::ZERO);
        spec.labels.insert(String::new(), "v".to_owned());
        assert_eq!(
            fields(&spec, &SubmitLimits::default()),
            [
                "actions[0].name",
                "labels[\"\"]",
                "idempotency_key",
                "timeout"
            ]
        );
        assert_eq!(
            fields(&NewJob::default(), &SubmitLimits::default()),
            ["actions"]
        );
    }

    #[test]
    fn a_job_too_large_for_one_response_is_refused() {
        let limits = SubmitLimits {
            max_message_bytes: 64 * 1024,
            ..SubmitLimits::default()
        };
        let mut spec = job(json!({"m": "x".repeat(6 * 1024)}));
        spec.actions.push(spec.actions[0].clone());
        assert!(fields(&spec, &limits).is_empty());
        spec.actions.push(spec.actions[0].clone());
        assert_eq!(fields(&spec, &limits), ["actions"]);
    }

    #[test]
    fn a_schedule_may_be_past_or_up_to_max_schedule_delay_ahead() {
        let limits = SubmitLimits {
            max_schedule_delay: Duration::from_secs(60),
            ..SubmitLimits::default()
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let check = |time: SystemTime| {
            let mut violations = Vec::new();
            check_schedule_time(time, now, &limits, &mut violations);
            violations
        };
        assert!(
            check(now + Duration::from_secs(60)).is_empty(),
            "at the limit"
        );
        assert!(
            check(now - Duration::from_secs(3600)).is_empty(),
            "past: at once"
        );
        let over = check(now + Duration::from_millis(60_400));
        assert_eq!(over.len(), 1);
        assert_eq!(over[0].field, "schedule_time");
        assert!(
            over[0].description.contains("1m 400ms") && over[0].description.contains("at most 1m"),
            "{over:?}"
        );
        let before_1970 = check(SystemTime::UNIX_EPOCH - Duration::from_secs(1));
        assert!(
            before_1970[0].description.contains("1970"),
            "{before_1970:?}"
        );

        let mut spec = job(json!({}));
        spec.schedule_time = Some(SystemTime::now() + Duration::from_secs(3600));
        assert_eq!(
            fields(&spec, &limits),
            ["schedule_time"],
            "checked at submit"
        );
    }
}
