//! Unit tests of the job model: versions, logging, and each transition.

use super::*;
use serde_json::json;

#[test]
fn snapshots_round_trip_through_json_with_base64_inputs() {
    let mut job = job(1, 1);
    job.actions[0].input = Bytes::from_static(b"\x00\xffdata");
    let text = serde_json::to_string(&job).unwrap();
    assert!(text.contains("\"AP9kYXRh\""), "{text}");
    assert_eq!(serde_json::from_str::<Job>(&text).unwrap(), job);
}

fn job(actions: usize, max_attempts: u32) -> Job {
    let spec = NewJob {
        actions: (0..actions)
            .map(|i| NewAction {
                name: format!("a{i}"),
                params: Map::new(),
                input: Bytes::new(),
            })
            .collect(),
        max_attempts: Some(max_attempts),
        ..NewJob::default()
    };
    Job::new(JobId::generate(), spec, 1, SystemTime::UNIX_EPOCH)
}

#[test]
fn new_job_is_queued_at_version_one() {
    let job = job(2, 1);
    assert_eq!(job.state, JobState::Queued);
    assert_eq!((job.version, job.logged_version, job.attempt), (1, 1, 1));
    assert_eq!(job.progress().total, 2);
}

#[test]
fn every_change_bumps_the_version_and_state_changes_are_logged() {
    let now = SystemTime::now();
    let mut job = job(2, 1);
    job.start(now).unwrap();
    assert_eq!((job.version, job.logged_version), (2, 2));
    job.start_action(0, now).unwrap();
    assert!(job.report_progress(0, Progress::percent(50, "half"), now));
    assert_eq!((job.version, job.logged_version), (4, 3));
    assert!(!job.report_progress(0, Progress::percent(50, "half"), now));
    assert_eq!(job.progress().percent, 25);
    assert_eq!(job.progress().message, "half");
    job.succeed_action(0, json!(1), now).unwrap();
    job.start_action(1, now).unwrap();
    job.succeed_action(1, json!(2), now).unwrap();
    job.succeed(now).unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.progress().percent, 100);
    assert_eq!(job.version, job.logged_version);
}

#[test]
fn failing_action_skips_the_rest() {
    let now = SystemTime::now();
    let mut job = job(3, 1);
    job.start(now).unwrap();
    job.start_action(0, now).unwrap();
    let error = JobError::new("INTERNAL", "BOOM", "it broke");
    job.fail_action(0, error.clone(), now).unwrap();
    assert!(!job.has_attempts_left());
    job.fail(error.clone(), now).unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.error, Some(error));
    assert_eq!(job.actions[0].state, ActionState::Failed);
    assert_eq!(job.actions[1].state, ActionState::Skipped);
    assert_eq!(job.actions[2].error.as_ref().unwrap().reason, "NOT_RUN");
    assert!(job.start(now).is_err());
}

#[test]
fn a_handlers_huge_error_is_kept_within_bounds_wherever_it_is_repeated() {
    let now = SystemTime::now();
    let mut job = job(100, 1);
    job.start(now).unwrap();
    job.start_action(0, now).unwrap();
    let mut error = JobError::new("C".repeat(1000), "R".repeat(1000), "m".repeat(100_000));
    error
        .details
        .insert("blob".to_owned(), json!("d".repeat(100_000)));
    job.fail_action(0, error.clone(), now).unwrap();
    job.fail(error, now).unwrap();
    let kept = job.error.as_ref().unwrap();
    assert!(kept.message.len() <= MAX_ERROR_MESSAGE_BYTES + '…'.len_utf8());
    assert!(kept.code.len() < 200 && kept.reason.len() < 200);
    assert!(
        kept.details.contains_key("details_dropped"),
        "{:?}",
        kept.details.keys()
    );
    assert_eq!(job.actions[0].error.as_ref(), Some(kept));
    // The 99 actions not run each say why, briefly.
    let notes: usize = job.actions[1..]
        .iter()
        .map(|a| a.error.as_ref().unwrap().message.len())
        .sum();
    assert!(notes < 99 * 300, "{notes}");
    // Small details are kept as they are.
    let small = JobError::new("INTERNAL", "BOOM", "it broke");
    assert_eq!(small.clone().bounded(), small);
    // A code that is no status code's name is UNKNOWN; one in another case is the name.
    assert_eq!(kept.code, "UNKNOWN");
    assert_eq!(
        JobError::new("not_found", "R", "m").bounded().code,
        "NOT_FOUND"
    );
    // Details nested past what a protobuf decoder reads back are dropped, saying where.
    let mut nested = json!("bottom");
    // With "bottom" itself, crate::job::MAX_RESULT_DEPTH levels below `details`.
    for _ in 1..crate::job::MAX_RESULT_DEPTH {
        nested = json!({ "a": nested });
    }
    let mut deep = JobError::new("INTERNAL", "DEEP", "m");
    deep.details.insert("fits".to_owned(), nested.clone());
    assert_eq!(deep.clone().bounded(), deep, "as many levels as are kept");
    deep.details.insert("over".to_owned(), json!([nested]));
    let dropped = deep.bounded().details;
    assert_eq!(dropped.len(), 1);
    let note = dropped["details_dropped"].as_str().unwrap();
    assert!(note.starts_with("details.over[0].a.a"), "{note}");
}

#[test]
fn retry_keeps_succeeded_actions_and_bumps_attempt() {
    let now = SystemTime::now();
    let mut job = job(2, 3);
    job.start(now).unwrap();
    job.start_action(0, now).unwrap();
    job.succeed_action(0, json!("ok"), now).unwrap();
    job.start_action(1, now).unwrap();
    job.fail_action(1, JobError::new("INTERNAL", "X", "x"), now)
        .unwrap();
    job.retry(now, Duration::from_secs(3)).unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.attempt, 2);
    // The backoff is the job's own: due then, and not before.
    let next = now + Duration::from_secs(3);
    assert_eq!(job.next_attempt_time, Some(next));
    assert_eq!(job.due_after(now), Some(next));
    assert_eq!(job.due_after(next), None);
    // A retried job keeps its place in line: ready since its submission.
    assert_eq!(job.ready_time(), job.create_time);
    assert_eq!(job.actions[0].state, ActionState::Succeeded);
    assert_eq!(job.actions[1].state, ActionState::Pending);
    assert_eq!(job.next_action(), Some(1));
    // Waiting, the action still says why its last attempt failed; started again, it does not.
    assert_eq!(job.actions[1].error.as_ref().unwrap().reason, "X");
    job.start(next).unwrap();
    assert_eq!(job.next_attempt_time, None);
    job.start_action(1, now).unwrap();
    assert_eq!(job.actions[1].error, None);
    job.succeed_action(1, json!("ok"), now).unwrap();
    assert_eq!(job.actions[1].error, None);
}

#[test]
fn a_retry_is_due_at_the_later_of_its_backoff_and_its_schedule() {
    let now = SystemTime::now();
    let mut job = job(1, 3);
    let late = now + Duration::from_secs(60);
    job.schedule_time = Some(late);
    job.start(late).unwrap();
    job.retry(late, Duration::from_secs(2)).unwrap();
    assert_eq!(job.due_after(late), Some(late + Duration::from_secs(2)));
    // Clock skew between replicas may put a backoff before the schedule: that still holds.
    job.next_attempt_time = Some(now);
    assert_eq!(job.due_after(now - Duration::from_secs(1)), Some(late));
    // A cancel during the backoff leaves no attempt to wait for.
    job.next_attempt_time = Some(late + Duration::from_secs(2));
    job.actions[0].error = Some(JobError::new("INTERNAL", "BOOM", "it broke"));
    job.cancel(
        JobError::new("CANCELLED", "CANCELLED", "the job was cancelled"),
        late,
    )
    .unwrap();
    assert_eq!(job.next_attempt_time, None);
    // The action did run once: its note says so, and why that attempt failed.
    assert_eq!(job.actions[0].state, ActionState::Skipped);
    assert_eq!(
        job.actions[0].error.as_ref().unwrap().message,
        "action 0 was not run again: the job was cancelled; its last attempt failed: \
         INTERNAL/BOOM: it broke"
    );
}

#[test]
fn interrupt_requeues_with_the_next_attempt_and_jumps_versions() {
    let now = SystemTime::now();
    let mut job = job(1, 2);
    job.start(now).unwrap();
    job.start_action(0, now).unwrap();
    let seen = job.version;
    job.interrupt(now).unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.attempt, 2);
    assert_eq!(job.actions[0].state, ActionState::Pending);
    assert!(job.version > seen + MAX_UNPERSISTED_VERSIONS);
    assert_eq!(job.version, job.logged_version);
}

#[test]
fn set_aside_requeues_the_same_attempt_and_jumps_versions() {
    let now = SystemTime::now();
    let mut job = job(1, 1);
    job.start(now).unwrap();
    job.start_action(0, now).unwrap();
    let seen = job.version;
    job.set_aside(now).unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert_eq!((job.attempt, job.max_attempts), (1, 1));
    assert_eq!(job.actions[0].state, ActionState::Pending);
    assert!(job.version > seen + MAX_UNPERSISTED_VERSIONS);
    assert_eq!(job.version, job.logged_version);
}

#[test]
fn retry_beyond_max_attempts_is_refused() {
    let now = SystemTime::now();
    let mut job = job(1, 1);
    job.start(now).unwrap();
    assert!(job.retry(now, Duration::ZERO).is_err());
    assert_eq!(job.state, JobState::Running);
}

#[test]
fn cancel_marks_running_action_cancelled() {
    let now = SystemTime::now();
    let mut job = job(2, 1);
    job.start(now).unwrap();
    job.start_action(0, now).unwrap();
    job.cancel(JobError::new("CANCELLED", "CANCELLED", "by request"), now)
        .unwrap();
    assert_eq!(job.actions[0].state, ActionState::Cancelled);
    assert_eq!(job.actions[1].state, ActionState::Skipped);
    assert!(job.cancel(JobError::default(), now).is_err());
}

#[test]
fn progress_of_units_is_clamped() {
    assert_eq!(Progress::of(5, 10, "").percent, 50);
    assert_eq!(Progress::of(50, 10, "").percent, 100);
    assert_eq!(Progress::of(1, 0, "").percent, 0);
    assert_eq!(Progress::percent(200, "").percent, 100);
}

#[test]
fn ids_parse_and_sort_by_time() {
    let a = JobId::generate();
    let b = JobId::generate();
    assert!(a < b);
    assert_eq!(a.to_string().parse::<JobId>().unwrap(), a);
    assert_eq!(a.to_wire(), a.to_string(), "sent as displayed");
    assert!("nope".parse::<JobId>().is_err());
}

#[test]
fn only_a_running_job_can_be_asked_to_cancel_and_the_request_is_logged() {
    let now = SystemTime::now();
    let mut job = job(1, 1);
    assert!(
        job.request_cancel(now).is_err(),
        "queued: cancelled at once instead"
    );
    job.start(now).unwrap();
    let before = job.version;
    job.request_cancel(now).unwrap();
    assert!(job.cancel_requested);
    assert_eq!(job.version, before + 1);
    assert_eq!(job.logged_version, job.version);
    job.cancel_interrupted(JobError::new("CANCELLED", "CANCELLED", "cancelled"), now)
        .unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert!(job.version > before + MAX_UNPERSISTED_VERSIONS);
}

#[test]
fn failing_an_interrupted_job_jumps_versions_too() {
    let now = SystemTime::now();
    let mut job = job(1, 3);
    job.start(now).unwrap();
    job.start_action(0, now).unwrap();
    let seen = job.version;
    job.fail_interrupted(JobError::new("ABORTED", "INTERRUPTED", "stopped"), now)
        .unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.actions[0].state, ActionState::Cancelled);
    assert!(job.version > seen + MAX_UNPERSISTED_VERSIONS);
    assert_eq!(job.version, job.logged_version);
}

#[test]
fn an_older_snapshot_refreshed_from_a_newer_one_equals_it_and_another_job_is_refused() {
    let now = SystemTime::now();
    let mut params = Map::new();
    params.insert("topic".into(), json!("t"));
    let mut current = job(2, 2);
    current.actions[0].params = params;
    current.labels.insert("team".into(), "a".into());
    current.tenant = "acme".into();
    // Every kind of change a job goes through, each checked against the snapshot before it
    // and against one several changes older.
    let changes: &[fn(&mut Job, SystemTime)] = &[
        |j, now| j.start(now).unwrap(),
        |j, now| j.start_action(0, now).unwrap(),
        |j, now| assert!(j.report_progress(0, Progress::of(1, 3, "one"), now)),
        |j, now| assert!(j.report_progress(0, Progress::of(2, 3, "a longer message"), now)),
        |j, now| j.request_cancel(now).unwrap(),
        |j, now| {
            j.fail_action(0, JobError::new("INTERNAL", "X", "x"), now)
                .unwrap()
        },
        |j, now| j.retry(now, Duration::from_millis(5)).unwrap(),
        |j, now| j.start(now).unwrap(),
        |j, now| j.start_action(0, now).unwrap(),
        |j, now| j.succeed_action(0, json!({"n": 1}), now).unwrap(),
        |j, now| j.start_action(1, now).unwrap(),
        |j, now| j.succeed_action(1, json!([1, 2]), now).unwrap(),
        |j, now| j.succeed(now).unwrap(),
    ];
    let mut oldest = current.clone();
    for change in changes {
        let mut previous = current.clone();
        change(&mut current, now);
        assert!(previous.refresh_from(&current));
        assert_eq!(previous, current);
    }
    assert!(oldest.refresh_from(&current));
    assert_eq!(oldest, current);

    let mut other = job(2, 2);
    let before = other.clone();
    assert!(!other.refresh_from(&current), "another job");
    assert_eq!(other, before, "left as it was");
}

#[test]
fn a_request_differs_from_a_job_only_in_what_the_job_keeps_of_it() {
    let webhook = |url: &str, secret: &str, events| WebhookSpec {
        url: url.to_owned(),
        secret: secret.to_owned(),
        events,
    };
    let spec = NewJob {
        actions: vec![NewAction {
            name: "a".to_owned(),
            params: json!({"n": 1.5}).as_object().unwrap().clone(),
            input: Bytes::from_static(b"in"),
        }],
        idempotency_key: Some("k".to_owned()),
        webhook: Some(webhook(
            "https://h/x",
            "one",
            crate::job::WebhookEvents::All,
        )),
        ..NewJob::default()
    };
    let job = Job::new(JobId::generate(), spec.clone(), 3, SystemTime::UNIX_EPOCH);
    assert_eq!(spec.first_difference(&job), None);

    let differs = |change: fn(&mut NewJob)| {
        let mut asked = spec.clone();
        change(&mut asked);
        let by_request = asked.first_difference(&job);
        // A keyed Submit compares the job it made of the request instead, on a server whose
        // default number of attempts (1) differs from the one the stored job got (3).
        let made = Job::new(JobId::generate(), asked.clone(), 1, SystemTime::now());
        assert_eq!(
            made.first_difference_as_asked(asked.max_attempts, &job),
            by_request,
            "the job made of the request tells the same"
        );
        by_request
    };
    // What a retry may change without asking for another job.
    assert_eq!(
        differs(|s| s.max_attempts = Some(3)),
        None,
        "the default given"
    );
    assert_eq!(
        differs(|s| s.webhook.as_mut().unwrap().secret = "two".to_owned()),
        None,
        "the secret is filled in by the server when not given"
    );
    assert_eq!(differs(|s| s.idempotency_key = None), None);
    // What makes it another job.
    assert_eq!(
        differs(|s| s.max_attempts = Some(2)).as_deref(),
        Some("max_attempts")
    );
    assert_eq!(
        differs(|s| s.webhook.as_mut().unwrap().url = "https://h/y".to_owned()).as_deref(),
        Some("webhook")
    );
    assert_eq!(
        differs(|s| s.webhook.as_mut().unwrap().events = Default::default()).as_deref(),
        Some("webhook")
    );
    assert_eq!(differs(|s| s.webhook = None).as_deref(), Some("webhook"));
    assert_eq!(
        differs(|s| {
            s.actions[0].params.insert("m".to_owned(), json!(1));
        })
        .as_deref(),
        Some("actions[0].params")
    );
    assert_eq!(
        differs(|s| s.actions[0].input = Bytes::new()).as_deref(),
        Some("actions[0].input")
    );
    assert_eq!(
        differs(|s| s.timeout = Some(Duration::from_secs(1))).as_deref(),
        Some("timeout")
    );
}

#[test]
fn webhook_urls_compare_as_normalized() {
    assert!(same_url(
        "HTTP://Example.COM:80/a/../b",
        "http://example.com/b"
    ));
    assert!(same_url("not a url", "not a url"));
    assert!(!same_url("http://example.com/a", "http://example.com/b"));
}
