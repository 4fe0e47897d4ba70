//! The readable text forms of jobs, job lists and actions.

use std::{fmt::Write as _, time::SystemTime};

use longrun::api::pb;

use super::json::Json;

/// A job state without its enum prefix: `RUNNING`.
pub fn job_state(state: pb::JobState) -> &'static str {
    strip(state.as_str_name(), "JOB_STATE_")
}

/// An action state without its enum prefix: `SUCCEEDED`.
pub fn action_state(state: pb::ActionState) -> &'static str {
    strip(state.as_str_name(), "ACTION_STATE_")
}

fn strip(name: &'static str, prefix: &str) -> &'static str {
    name.strip_prefix(prefix).unwrap_or(name)
}

/// A progress as `40% step 4 of 10`.
pub fn progress(progress: Option<&pb::Progress>) -> String {
    match progress {
        Some(p) if p.message.is_empty() => format!("{}%", p.percent),
        Some(p) => format!("{}% {}", p.percent, p.message),
        None => "0%".to_owned(),
    }
}

/// An error as `INTERNAL FAILED_AS_ASKED: the message`.
pub fn job_error(error: &pb::JobError) -> String {
    let mut text = error.code.clone();
    if !error.reason.is_empty() {
        let _ = write!(text, " {}", error.reason);
    }
    if !error.message.is_empty() {
        let _ = write!(text, ": {}", error.message);
    }
    text
}

/// An action error's details under its line, by key: a list of strings (an `exec` command's
/// `stderr_tail`) one line each, as the command wrote them; anything else as JSON.
fn error_details(text: &mut String, error: &pb::JobError, json: &Json) {
    use prost_types::value::Kind;
    let Some(details) = &error.details else {
        return;
    };
    let mut keys: Vec<&String> = details.fields.keys().collect();
    keys.sort();
    for key in keys {
        let value = &details.fields[key];
        match &value.kind {
            Some(Kind::ListValue(list))
                if list
                    .values
                    .iter()
                    .all(|v| matches!(v.kind, Some(Kind::StringValue(_)))) =>
            {
                let _ = writeln!(text, "        {key}:");
                for line in &list.values {
                    if let Some(Kind::StringValue(line)) = &line.kind {
                        let _ = writeln!(text, "          {line}");
                    }
                }
            }
            _ => {
                let _ = writeln!(text, "        {key}: {}", json.value(value));
            }
        }
    }
}

/// The error of an action's last attempt, when the action waits for the next one: PENDING
/// again, it keeps that error until it starts.
pub fn last_attempt_error(action: &pb::ActionStatus) -> Option<&pb::JobError> {
    action
        .error
        .as_ref()
        .filter(|_| action.state() == pb::ActionState::Pending)
}

/// A time in RFC 3339, to the millisecond only when it has a fraction.
pub fn instant(time: prost_types::Timestamp) -> Option<String> {
    let at = system_time(time)?;
    Some(if time.nanos == 0 {
        humantime::format_rfc3339_seconds(at).to_string()
    } else {
        humantime::format_rfc3339_millis(at).to_string()
    })
}

/// The full summary of a job; its id alone on the first line, so `head -1` gets it.
pub fn job(job: &pb::Job, json: &Json) -> String {
    let mut text = format!("{}\n", job.id);
    let _ = writeln!(
        text,
        "  state:    {}  (attempt {}/{}, version {})",
        job_state(job.state()),
        job.attempt,
        job.max_attempts,
        job.version
    );
    let _ = writeln!(text, "  progress: {}", progress(job.progress.as_ref()));
    if job.cancel_requested && !super::is_terminal(job) {
        let _ = writeln!(text, "  cancel:   requested; the handler is stopping");
    }
    if job.priority != 0 {
        let _ = writeln!(text, "  priority: {}", job.priority);
    }
    if !job.labels.is_empty() {
        let mut labels: Vec<_> = job.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let _ = writeln!(text, "  labels:   {}", labels.join(", "));
    }
    // Only worth a line when the server has tenants: without auth every job is `default`'s.
    if !job.tenant.is_empty() && job.tenant != "default" {
        let _ = writeln!(text, "  tenant:   {}", job.tenant);
    }
    if let Some(created) = job.create_time.and_then(system_time) {
        let _ = writeln!(
            text,
            "  created:  {}",
            humantime::format_rfc3339_seconds(created)
        );
    }
    if let Some((what, time)) = waits_for(job) {
        let _ = writeln!(text, "  {:<10}{time}", format!("{what}:"));
    }
    if let Some(error) = &job.error {
        let _ = writeln!(text, "  error:    {}", job_error(error));
    }
    for (i, action) in job.actions.iter().enumerate() {
        let _ = writeln!(
            text,
            "  [{i}] {}  {}  {}",
            action.name,
            action_state(action.state()),
            progress(action.progress.as_ref())
        );
        if let Some(result) = &action.result {
            let _ = writeln!(text, "      result: {}", json.value(result));
        }
        if let Some(error) = &action.error {
            let label = if last_attempt_error(action).is_some() {
                "last attempt"
            } else {
                "error"
            };
            let _ = writeln!(text, "      {label}:  {}", job_error(error));
            error_details(&mut text, error, json);
        }
    }
    if let Some(webhook) = &job.webhook {
        let events = strip(webhook.events().as_str_name(), "WEBHOOK_EVENTS_");
        let _ = writeln!(text, "  webhook:  {}  ({events})", webhook.url);
    }
    for delivery in &job.webhook_deliveries {
        let state = strip(delivery.state().as_str_name(), "WEBHOOK_DELIVERY_STATE_");
        let _ = write!(
            text,
            "    {}  {} v{}  {state}, {} attempt(s)",
            delivery.delivery_id,
            job_state(delivery.job_state()),
            delivery.job_version,
            delivery.attempts
        );
        if !delivery.last_error.is_empty() {
            let _ = write!(text, "; last error: {}", delivery.last_error);
        }
        if delivery.state() == pb::WebhookDeliveryState::Pending
            && let Some(next) = delivery.next_attempt_time.and_then(instant)
        {
            let _ = write!(text, "; next attempt at {next}");
        }
        text.push('\n');
    }
    text.trim_end().to_owned()
}

/// A job as a wait left it: its summary, then whether it had ended (`done`), since a wait
/// may also run out first.
pub fn waited(job: &pb::Job, done: bool, json: &Json) -> String {
    let done = if done {
        "yes, the job ended"
    } else {
        "no, the wait ran out first"
    };
    format!("{}\n  done:     {done}", self::job(job, json))
}

/// [`job`] as last seen by a wait that lost the server before the job ended.
pub fn end_unknown(job: &pb::Job, json: &Json) -> String {
    format!(
        "{}\n  done:     unknown, the server could not be reached",
        self::job(job, json)
    )
}

/// What a QUEUED job waits for before it may start, if anything, and until when: `due`, its
/// `schedule_time` (it never ran), or `retry at`, the end of a retry's backoff.
pub fn waits_for(job: &pb::Job) -> Option<(&'static str, String)> {
    if job.state() != pb::JobState::Queued {
        return None;
    }
    if let Some(next) = job.next_attempt_time.and_then(instant) {
        return Some(("retry at", next));
    }
    job.schedule_time
        .filter(|_| job.start_time.is_none())
        .and_then(instant)
        .map(|due| ("due", due))
}

/// One line per job: id, state, progress, creation time, action names; for a job waiting for
/// its time, `due` or `retry at` and the time.
pub fn job_list(jobs: &[pb::Job]) -> String {
    let mut text = String::new();
    for job in jobs {
        let actions: Vec<&str> = job.actions.iter().map(|a| a.name.as_str()).collect();
        let created = job
            .create_time
            .and_then(system_time)
            .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .unwrap_or_default();
        let _ = write!(
            text,
            "{}  {:<9}  {:>3}%  {}  {}",
            job.id,
            job_state(job.state()),
            job.progress.as_ref().map_or(0, |p| p.percent),
            created,
            actions.join(",")
        );
        if let Some((what, time)) = waits_for(job) {
            let _ = write!(text, "  {what} {time}");
        }
        text.push('\n');
    }
    text.trim_end().to_owned()
}

/// One change of a job, as a line: when, which job, its state and progress, and what went
/// wrong or the progress message. The id comes second, so `awk '{print $2}'` gets it.
pub fn job_change(job: &pb::Job) -> String {
    let when = job
        .update_time
        .and_then(system_time)
        .map(|t| humantime::format_rfc3339_millis(t).to_string())
        .unwrap_or_default();
    let progress = job.progress.as_ref();
    let detail = match (&job.error, waiting(job)) {
        (Some(error), _) => job_error(error),
        (None, Some(waiting)) => waiting,
        (None, None) => progress.map(|p| p.message.clone()).unwrap_or_default(),
    };
    let line = format!(
        "{when}  {}  {:<9}  {:>3}%  {detail}",
        job.id,
        job_state(job.state()),
        progress.map_or(0, |p| p.percent),
    );
    line.trim_end().to_owned()
}

/// For a job waiting for its time: `due` and when; for one waiting out a retry's backoff,
/// which attempt comes when, and why the last one failed (its action, PENDING again, keeps
/// that error until it starts).
fn waiting(job: &pb::Job) -> Option<String> {
    let (what, time) = waits_for(job)?;
    if job.next_attempt_time.is_none() {
        return Some(format!("{what} {time}"));
    }
    let mut text = format!("attempt {}/{} at {time}", job.attempt, job.max_attempts);
    let failed = job.actions.iter().find_map(last_attempt_error);
    if let Some(error) = failed {
        let _ = write!(text, "; the last failed: {}", job_error(error));
    }
    Some(text)
}

/// Each action with its description and params.
pub fn actions(actions: &[pb::ActionInfo]) -> String {
    let mut text = String::new();
    for action in actions {
        let input = if action.uses_input {
            "  (reads input)"
        } else {
            ""
        };
        let _ = writeln!(text, "{}{input}\n  {}", action.name, action.description);
        for param in &action.params {
            let required = if param.required { ", required" } else { "" };
            let _ = writeln!(
                text,
                "    {} ({}{required}): {}",
                param.name, param.r#type, param.description
            );
        }
    }
    text.trim_end().to_owned()
}

/// The time a timestamp tells, when RFC 3339 can print it: humantime formats only times from
/// 1970 to the end of year 9999 (it panics outside), and a server's answer is not to crash the
/// CLI, so any other is shown as no time at all.
fn system_time(timestamp: prost_types::Timestamp) -> Option<SystemTime> {
    const END_OF_9999: i64 = 253_402_300_799;
    if !(0..=END_OF_9999).contains(&timestamp.seconds) {
        return None;
    }
    SystemTime::try_from(timestamp).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_shows_id_first_then_actions_with_results_and_errors() {
        let json = Json::new().unwrap();
        let job = pb::Job {
            id: "0190-abc".to_owned(),
            state: pb::JobState::Failed as i32,
            attempt: 1,
            max_attempts: 1,
            actions: vec![pb::ActionStatus {
                name: "fail".to_owned(),
                state: pb::ActionState::Failed as i32,
                result: Some(prost_types::Value {
                    kind: Some(prost_types::value::Kind::NumberValue(1.0)),
                }),
                error: Some(pb::JobError {
                    code: "INTERNAL".to_owned(),
                    reason: "FAILED_AS_ASKED".to_owned(),
                    message: "as asked".to_owned(),
                    details: None,
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = super::job(&job, &json);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "0190-abc");
        assert!(text.contains("state:    FAILED  (attempt 1/1"), "{text}");
        assert!(text.contains("[0] fail  FAILED  0%"), "{text}");
        assert!(text.contains("result: 1\n"), "{text}");
        assert!(
            text.contains("error:  INTERNAL FAILED_AS_ASKED: as asked"),
            "{text}"
        );
    }

    #[test]
    fn an_action_error_s_details_are_shown_a_tail_line_by_line() {
        use prost_types::value::Kind;
        let json = Json::new().unwrap();
        let string = |s: &str| prost_types::Value {
            kind: Some(Kind::StringValue(s.to_owned())),
        };
        let details = prost_types::Struct {
            fields: [
                (
                    "exit_code".to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::NumberValue(3.0)),
                    },
                ),
                (
                    "stderr_tail".to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::ListValue(prost_types::ListValue {
                            values: vec![string("first line"), string("err line")],
                        })),
                    },
                ),
            ]
            .into(),
        };
        let job = pb::Job {
            id: "0190-abc".to_owned(),
            state: pb::JobState::Failed as i32,
            actions: vec![pb::ActionStatus {
                name: "exec".to_owned(),
                state: pb::ActionState::Failed as i32,
                error: Some(pb::JobError {
                    code: "UNKNOWN".to_owned(),
                    reason: "EXIT_STATUS".to_owned(),
                    message: "exited with status 3".to_owned(),
                    details: Some(details),
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = super::job(&job, &json);
        assert!(
            text.contains(
                "        exit_code: 3\n        stderr_tail:\n          first line\n          err line"
            ),
            "{text}"
        );
    }

    #[test]
    fn due_is_shown_only_while_the_job_waits_for_its_time() {
        let json = Json::new().unwrap();
        let mut job = pb::Job {
            id: "0190-abc".to_owned(),
            state: pb::JobState::Queued as i32,
            schedule_time: Some(prost_types::Timestamp {
                seconds: 1_796_115_600,
                nanos: 250_000_000,
            }),
            ..Default::default()
        };
        let text = super::job(&job, &json);
        assert!(
            text.contains("due:      2026-12-01T09:00:00.250Z"),
            "{text}"
        );
        job.state = pb::JobState::Succeeded as i32;
        job.start_time = Some(prost_types::Timestamp {
            seconds: 1_796_115_600,
            nanos: 300_000_000,
        });
        assert!(!super::job(&job, &json).contains("due:"));
    }

    #[test]
    fn retry_at_is_shown_only_while_the_job_waits_out_its_backoff() {
        let json = Json::new().unwrap();
        let mut job = pb::Job {
            id: "0190-abc".to_owned(),
            state: pb::JobState::Queued as i32,
            attempt: 2,
            max_attempts: 3,
            start_time: Some(prost_types::Timestamp {
                seconds: 1_796_115_590,
                nanos: 0,
            }),
            next_attempt_time: Some(prost_types::Timestamp {
                seconds: 1_796_115_600,
                nanos: 0,
            }),
            ..Default::default()
        };
        let text = super::job(&job, &json);
        assert!(text.contains("  retry at: 2026-12-01T09:00:00Z"), "{text}");
        assert!(text.contains("(attempt 2/3"), "{text}");
        job.state = pb::JobState::Running as i32;
        assert!(!super::job(&job, &json).contains("retry at:"));
    }

    #[test]
    fn summaries_and_lists_say_what_a_job_waits_for_its_priority_and_a_pending_cancel() {
        let json = Json::new().unwrap();
        let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
        let scheduled = pb::Job {
            id: "a".to_owned(),
            state: pb::JobState::Queued as i32,
            schedule_time: at(1_796_115_600),
            priority: -5,
            ..Default::default()
        };
        let retrying = pb::Job {
            id: "b".to_owned(),
            state: pb::JobState::Queued as i32,
            start_time: at(1_796_115_000),
            schedule_time: at(1_796_114_000),
            next_attempt_time: at(1_796_115_600),
            ..Default::default()
        };
        let stopping = pb::Job {
            id: "c".to_owned(),
            state: pb::JobState::Running as i32,
            cancel_requested: true,
            ..Default::default()
        };
        let list = job_list(&[scheduled.clone(), retrying.clone(), stopping.clone()]);
        let lines: Vec<&str> = list.lines().collect();
        assert!(lines[0].ends_with("  due 2026-12-01T09:00:00Z"), "{list}");
        assert!(
            lines[1].ends_with("  retry at 2026-12-01T09:00:00Z"),
            "{list}"
        );
        assert!(
            !lines[2].contains("due") && !lines[2].contains("retry"),
            "{list}"
        );

        let text = job(&scheduled, &json);
        assert!(text.contains("  priority: -5"), "{text}");
        assert!(!text.contains("cancel:"), "{text}");
        let text = job(&retrying, &json);
        assert!(
            text.contains("  retry at: ") && !text.contains("due:"),
            "{text}"
        );
        assert!(
            !text.contains("priority:"),
            "the default is not worth a line: {text}"
        );
        let text = job(&stopping, &json);
        assert!(
            text.contains("  cancel:   requested; the handler is stopping"),
            "{text}"
        );

        let mut delivered = stopping.clone();
        delivered.webhook_deliveries = vec![pb::WebhookDelivery {
            delivery_id: "d1".to_owned(),
            job_state: pb::JobState::Succeeded as i32,
            job_version: 5,
            state: pb::WebhookDeliveryState::Pending as i32,
            attempts: 1,
            last_error: "HTTP 503".to_owned(),
            next_attempt_time: at(1_796_115_600),
            ..Default::default()
        }];
        let text = job(&delivered, &json);
        assert!(
            text.contains(
                "d1  SUCCEEDED v5  PENDING, 1 attempt(s); last error: HTTP 503; next attempt at \
                 2026-12-01T09:00:00Z"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_change_to_a_retry_says_which_attempt_comes_when_and_why_the_last_failed() {
        let mut job = pb::Job {
            id: "j".to_owned(),
            state: pb::JobState::Queued as i32,
            attempt: 2,
            max_attempts: 3,
            next_attempt_time: Some(prost_types::Timestamp {
                seconds: 1_796_115_600,
                nanos: 0,
            }),
            actions: vec![pb::ActionStatus {
                name: "fail".to_owned(),
                state: pb::ActionState::Pending as i32,
                error: Some(pb::JobError {
                    code: "INTERNAL".to_owned(),
                    reason: "FAILED_AS_ASKED".to_owned(),
                    message: "first try fails".to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let line = job_change(&job);
        assert!(
            line.ends_with(
                "QUEUED       0%  attempt 2/3 at 2026-12-01T09:00:00Z; the last failed: \
                 INTERNAL FAILED_AS_ASKED: first try fails"
            ),
            "{line}"
        );
        let text = super::job(&job, &Json::new().unwrap());
        assert!(
            text.contains("      last attempt:  INTERNAL FAILED_AS_ASKED: first try fails"),
            "{text}"
        );
        job.state = pb::JobState::Running as i32;
        assert!(
            !job_change(&job).contains("attempt"),
            "{}",
            job_change(&job)
        );
        let scheduled = pb::Job {
            id: "s".to_owned(),
            state: pb::JobState::Queued as i32,
            schedule_time: Some(prost_types::Timestamp {
                seconds: 1_796_115_600,
                nanos: 0,
            }),
            ..Default::default()
        };
        assert!(
            job_change(&scheduled).ends_with("QUEUED       0%  due 2026-12-01T09:00:00Z"),
            "{}",
            job_change(&scheduled)
        );
    }

    #[test]
    fn times_outside_what_rfc3339_prints_show_as_no_time() {
        let at = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
        for unprintable in [-1, 253_402_300_800, i64::MAX] {
            assert_eq!(instant(at(unprintable)), None, "{unprintable}");
            let job = pb::Job {
                id: "far".to_owned(),
                state: pb::JobState::Queued as i32,
                create_time: Some(at(unprintable)),
                update_time: Some(at(unprintable)),
                next_attempt_time: Some(at(unprintable)),
                schedule_time: Some(at(unprintable)),
                ..Default::default()
            };
            job_change(&job);
            job_list(std::slice::from_ref(&job));
            super::job(&job, &Json::new().unwrap());
        }
        assert_eq!(
            instant(at(253_402_300_799)).as_deref(),
            Some("9999-12-31T23:59:59Z")
        );
    }
}
