//! One behavioural test suite that every [`Store`] backend must pass, so that the memory,
//! SQLite and PostgreSQL stores cannot drift apart.

use std::{
    collections::BTreeMap,
    future::Future,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use serde_json::{Map, json};

mod outbox;

use super::{Created, Deleted, EventPage, ListQuery, Store};
use crate::job::Job;
use crate::job::{JobError, JobId, JobState, NewAction, NewJob, Progress, TraceContext};

/// A queued job with `actions` actions, the given labels and idempotency key.
pub fn sample_job(actions: usize, labels: &[(&str, &str)], key: Option<&str>) -> Job {
    let spec = NewJob {
        actions: (0..actions)
            .map(|i| NewAction {
                name: "echo".to_owned(),
                params: Map::from_iter([("i".to_owned(), json!(i))]),
                input: Bytes::from_static(b"in\0put"),
            })
            .collect(),
        idempotency_key: key.map(str::to_owned),
        timeout: Some(Duration::from_millis(1500)),
        max_attempts: Some(3),
        priority: 7,
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        webhook: None,
        tenant: String::new(),
        // Set, so that every round trip also proves the trace context and its state are kept.
        trace: Some(TraceContext {
            parent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .expect("a valid traceparent"),
            state: "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".parse().ok(),
        }),
        // Set (in the past, so due at once, and to the nanosecond), so that every round trip
        // also proves the schedule is kept exactly.
        schedule_time: Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)),
    };
    Job::new(JobId::generate(), spec, 1, SystemTime::now())
}

/// [`sample_job`] owned by `tenant`.
pub fn tenant_job(tenant: &str, labels: &[(&str, &str)], key: Option<&str>) -> Job {
    let mut job = sample_job(1, labels, key);
    job.tenant = tenant.to_owned();
    job
}

/// Runs every conformance check, each against a fresh store from `make`.
pub async fn run_all<S, F, Fut>(make: F)
where
    S: Store,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    create_and_get_round_trip(&make().await).await;
    create_started_stores_the_started_job_and_logs_both(&make().await).await;
    idempotency_key_returns_first_job(&make().await).await;
    save_logs_state_changes_but_not_progress(&make().await).await;
    save_refuses_stale_versions(&make().await).await;
    a_terminal_state_is_final(&make().await).await;
    list_is_newest_first_filtered_and_paged(&make().await).await;
    delete_only_terminal_jobs(&make().await).await;
    unfinished_and_purge(&make().await).await;
    events_number_logged_changes_in_commit_order(&make().await).await;
    events_filter_by_labels_and_page(&make().await).await;
    removed_events_are_marked_and_never_reused(&make().await).await;
    only_the_newest_deletions_are_remembered(&make().await).await;
    unfinished_at_agrees_with_the_event_log(&make().await).await;
    outbox::run_all(&make).await;
    tenants_are_kept_apart(&make().await).await;
}

async fn tenants_are_kept_apart(store: &impl Store) {
    assert_eq!(
        sample_job(1, &[], None).tenant,
        crate::job::DEFAULT_TENANT,
        "a job submitted without a tenant is the default tenant's"
    );
    // The same idempotency key in two tenants: two jobs; again in the first: its first job.
    let a_keyed = tenant_job("a", &[("team", "x")], Some("k"));
    let b_keyed = tenant_job("b", &[("team", "x")], Some("k"));
    assert_eq!(store.create(&a_keyed).await.unwrap(), Created::New);
    assert_eq!(store.create(&b_keyed).await.unwrap(), Created::New);
    assert!(store.owned_by(a_keyed.id, "a").await.unwrap());
    assert!(!store.owned_by(a_keyed.id, "b").await.unwrap());
    assert!(!store.owned_by(a_keyed.id, "").await.unwrap());
    assert!(!store.owned_by(JobId::generate(), "a").await.unwrap());
    assert_eq!(
        store.get_owned(a_keyed.id, "a").await.unwrap().as_ref(),
        Some(&a_keyed)
    );
    assert_eq!(store.get_owned(a_keyed.id, "b").await.unwrap(), None);
    assert_eq!(store.get_owned(JobId::generate(), "a").await.unwrap(), None);
    let again = tenant_job("a", &[], Some("k"));
    assert_eq!(
        store.create(&again).await.unwrap(),
        Created::Existing(Box::new(a_keyed.clone()))
    );
    // Tenant b's jobs are newer and more numerous than a's: a's page must still be full.
    let a_older = tenant_job("a", &[("team", "x")], None);
    store.create(&a_older).await.unwrap();
    let mut b_ids = vec![b_keyed.id];
    for _ in 0..5 {
        let job = tenant_job("b", &[("team", "x")], None);
        store.create(&job).await.unwrap();
        b_ids.push(job.id);
    }
    let query = |tenant: &str, limit, labels: &[(&str, &str)]| ListQuery {
        tenant: Some(tenant.to_owned()),
        limit,
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..ListQuery::default()
    };
    let ids = |jobs: Vec<Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    let a_page = store.list(&query("a", 2, &[])).await.unwrap();
    assert_eq!(ids(a_page), vec![a_older.id, a_keyed.id]);
    let a_labelled = store.list(&query("a", 2, &[("team", "x")])).await.unwrap();
    assert_eq!(ids(a_labelled), vec![a_older.id, a_keyed.id]);
    let a_queued = ListQuery {
        states: vec![JobState::Queued, JobState::Running],
        ..query("a", 5, &[])
    };
    assert_eq!(ids(store.list(&a_queued).await.unwrap()).len(), 2);
    let b_page = store.list(&query("b", 10, &[])).await.unwrap();
    assert_eq!(b_page.len(), 6);
    assert!(b_page.iter().all(|job| job.tenant == "b"));
    let everyone = ListQuery {
        limit: 100,
        ..ListQuery::default()
    };
    assert_eq!(store.list(&everyone).await.unwrap().len(), 8);

    // The event log and the unfinished snapshot, scoped the same way.
    let no_labels = BTreeMap::new();
    let a_events = store
        .events_after(0, Some("a"), &no_labels, 100)
        .await
        .unwrap();
    assert_eq!(
        a_events
            .events
            .iter()
            .map(|(_, j)| j.id)
            .collect::<Vec<_>>(),
        vec![a_keyed.id, a_older.id]
    );
    let b_first = store
        .events_after(0, Some("b"), &no_labels, 1)
        .await
        .unwrap();
    assert_eq!(b_first.events.len(), 1);
    assert_eq!(b_first.events[0].1.id, b_keyed.id);
    assert_eq!(
        store
            .events_after(0, None, &no_labels, 100)
            .await
            .unwrap()
            .events
            .len(),
        8
    );
    let (_, b_unfinished) = store.unfinished_at(Some("b"), &no_labels).await.unwrap();
    let mut unfinished_ids = ids(b_unfinished);
    unfinished_ids.sort();
    b_ids.sort();
    assert_eq!(unfinished_ids, b_ids);
    let (_, none_of_c) = store.unfinished_at(Some("c"), &no_labels).await.unwrap();
    assert!(none_of_c.is_empty());
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// `(job id, version)` of each event, and whether the sequence numbers rise.
fn event_keys(page: &EventPage) -> (Vec<(JobId, i64)>, bool) {
    let keys = page.events.iter().map(|(_, j)| (j.id, j.version)).collect();
    let rising = page.events.windows(2).all(|w| w[0].0 < w[1].0);
    (keys, rising)
}

async fn events_number_logged_changes_in_commit_order(store: &impl Store) {
    let now = SystemTime::now();
    let none = BTreeMap::new();
    let mut a = sample_job(1, &[("team", "a")], None);
    let mut b = sample_job(1, &[("team", "b")], None);
    store.create(&a).await.unwrap();
    store.create(&b).await.unwrap();
    a.start(now).unwrap();
    store.save(&a).await.unwrap();
    a.start_action(0, now).unwrap();
    store.save(&a).await.unwrap();
    assert!(a.report_progress(0, Progress::percent(50, "half"), now));
    store.save(&a).await.unwrap(); // progress: stored, not an event
    b.cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
        .unwrap();
    store.save(&b).await.unwrap();

    let page = store.events_after(0, None, &none, 100).await.unwrap();
    let (keys, rising) = event_keys(&page);
    assert!(rising, "sequence numbers rise");
    assert_eq!(
        keys,
        vec![(a.id, 1), (b.id, 1), (a.id, 2), (a.id, 3), (b.id, 2)],
        "every logged change, in commit order, progress left out"
    );
    assert_eq!(
        page.events.last().unwrap().1,
        b,
        "events carry the snapshot"
    );
    assert_eq!(page.scanned_to, page.events.last().unwrap().0);
    assert_eq!(page.removed_through, 0);

    let (third, _) = page.events[2];
    let rest = store.events_after(third, None, &none, 100).await.unwrap();
    assert_eq!(event_keys(&rest).0, vec![(a.id, 3), (b.id, 2)]);
    let end = store
        .events_after(page.scanned_to, None, &none, 100)
        .await
        .unwrap();
    assert!(end.events.is_empty());
    assert_eq!(
        end.scanned_to, page.scanned_to,
        "nothing newer: still at the head"
    );
}

async fn events_filter_by_labels_and_page(store: &impl Store) {
    let mut wanted = Vec::new();
    for i in 0..6 {
        let team = if i % 3 == 0 { "x" } else { "y" };
        let job = sample_job(1, &[("team", team), ("env", "prod")], None);
        store.create(&job).await.unwrap();
        if team == "x" {
            wanted.push((job.id, 1));
        }
    }
    let x = labels(&[("team", "x"), ("env", "prod")]);
    let first = store.events_after(0, None, &x, 1).await.unwrap();
    assert_eq!(event_keys(&first).0, wanted[..1]);
    assert_eq!(
        first.scanned_to, first.events[0].0,
        "a full page ends at its last event"
    );
    let second = store
        .events_after(first.scanned_to, None, &x, 10)
        .await
        .unwrap();
    assert_eq!(event_keys(&second).0, wanted[1..]);
    let all = store
        .events_after(0, None, &BTreeMap::new(), 10)
        .await
        .unwrap();
    assert_eq!(
        second.scanned_to,
        all.events.last().unwrap().0,
        "a short page covers up to the newest event, matching or not"
    );
    let nobody = store
        .events_after(0, None, &labels(&[("team", "z")]), 10)
        .await
        .unwrap();
    assert!(nobody.events.is_empty());
    assert_eq!(nobody.scanned_to, second.scanned_to);
}

async fn removed_events_are_marked_and_never_reused(store: &impl Store) {
    let now = SystemTime::now();
    let none = BTreeMap::new();
    let keep = sample_job(1, &[], None);
    let mut gone = sample_job(1, &[], None);
    store.create(&keep).await.unwrap();
    store.create(&gone).await.unwrap();
    gone.cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
        .unwrap();
    store.save(&gone).await.unwrap();
    let before = store.events_after(0, None, &none, 10).await.unwrap();
    let head = before.scanned_to;
    assert_eq!(store.delete(gone.id).await.unwrap(), Deleted::Removed);

    let after = store.events_after(0, None, &none, 10).await.unwrap();
    assert_eq!(event_keys(&after).0, vec![(keep.id, 1)]);
    assert_eq!(
        after.removed_through, head,
        "the newest removed event is marked"
    );
    assert_eq!(after.scanned_to, head, "the head does not move back");
    // A deleted job's history is gone only for readers it could have matched.
    let other_labels = store
        .events_after(0, None, &labels(&[("team", "z")]), 10)
        .await
        .unwrap();
    assert_eq!(
        other_labels.removed_through, 0,
        "not a job of this selector"
    );
    let other_tenant = store
        .events_after(0, Some("someone-else"), &none, 10)
        .await
        .unwrap();
    assert_eq!(other_tenant.removed_through, 0, "not a job of this tenant");
    let own_tenant = store
        .events_after(0, Some(gone.tenant.as_str()), &none, 10)
        .await
        .unwrap();
    assert_eq!(own_tenant.removed_through, head);

    let next = sample_job(1, &[], None);
    store.create(&next).await.unwrap();
    let page = store.events_after(head, None, &none, 10).await.unwrap();
    assert_eq!(event_keys(&page).0, vec![(next.id, 1)]);
    assert!(
        page.events[0].0 > head,
        "a removed number is never handed out again"
    );

    let mut old = next.clone();
    old.cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
        .unwrap();
    store.save(&old).await.unwrap();
    let newest = store
        .events_after(0, None, &none, 10)
        .await
        .unwrap()
        .scanned_to;
    assert_eq!(
        store
            .purge_finished(now + Duration::from_secs(1), 10)
            .await
            .unwrap(),
        1
    );
    let purged = store.events_after(0, None, &none, 10).await.unwrap();
    assert_eq!(
        purged.removed_through, newest,
        "retention marks its removals too"
    );
    let purged = store
        .events_after(0, None, &labels(&[("team", "z")]), 10)
        .await
        .unwrap();
    assert_eq!(
        purged.removed_through, newest,
        "for every reader: retention removes too many jobs to say which"
    );
}

/// Past [`super::REMEMBERED_DELETIONS`] jobs removed by DeleteJob, a retention sweep folds
/// the oldest into the removed-events mark, which every selector then sees.
async fn only_the_newest_deletions_are_remembered(store: &impl Store) {
    let now = SystemTime::now();
    let other_labels = BTreeMap::from([("team".to_owned(), "nobody".to_owned())]);
    let mut newest_seqs = Vec::new();
    for _ in 0..super::REMEMBERED_DELETIONS + 2 {
        let mut job = sample_job(1, &[("team", "deleting")], None);
        store.create(&job).await.unwrap();
        job.cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
            .unwrap();
        store.save(&job).await.unwrap();
        let page = store
            .events_after(0, None, &BTreeMap::new(), 10_000)
            .await
            .unwrap();
        newest_seqs.push(page.events.last().unwrap().0);
        assert_eq!(store.delete(job.id).await.unwrap(), Deleted::Removed);
    }
    let before = store
        .events_after(0, None, &other_labels, 100)
        .await
        .unwrap();
    assert_eq!(before.removed_through, 0, "remembered one by one");
    // Nothing has ended long enough ago to be purged: only the deletions are folded.
    let long_ago = now - std::time::Duration::from_secs(3600);
    assert_eq!(store.purge_finished(long_ago, 100).await.unwrap(), 0);
    let after = store
        .events_after(0, None, &other_labels, 100)
        .await
        .unwrap();
    assert_eq!(
        after.removed_through, newest_seqs[1],
        "the two oldest deletions are folded into the mark"
    );
    let later = store
        .events_after(newest_seqs[1], None, &other_labels, 100)
        .await
        .unwrap();
    assert_eq!(
        later.removed_through, newest_seqs[1],
        "a cursor past them stands"
    );
}

async fn unfinished_at_agrees_with_the_event_log(store: &impl Store) {
    let now = SystemTime::now();
    let mut running = sample_job(1, &[("team", "a")], None);
    let other = sample_job(1, &[("team", "b")], None);
    let mut done = sample_job(1, &[("team", "a")], None);
    for job in [&running, &other, &done] {
        store.create(job).await.unwrap();
    }
    running.start(now).unwrap();
    store.save(&running).await.unwrap();
    done.cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
        .unwrap();
    store.save(&done).await.unwrap();

    let (head, jobs) = store
        .unfinished_at(None, &labels(&[("team", "a")]))
        .await
        .unwrap();
    assert_eq!(jobs, vec![running.clone()]);
    let page = store
        .events_after(0, None, &BTreeMap::new(), 100)
        .await
        .unwrap();
    assert_eq!(
        head,
        page.events.last().unwrap().0,
        "the head is the newest event"
    );
    let (_, all) = store.unfinished_at(None, &BTreeMap::new()).await.unwrap();
    assert_eq!(
        all.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![running.id, other.id]
    );
}

async fn create_and_get_round_trip(store: &impl Store) {
    let job = sample_job(2, &[("team", "a")], None);
    assert_eq!(store.create(&job).await.unwrap(), Created::New);
    let stored = store.get(job.id).await.unwrap().expect("stored job");
    assert_eq!(stored, job, "a stored job reads back exactly");
    assert_eq!(store.get(JobId::generate()).await.unwrap(), None);
    // A handler may return JSON null: it reads back as that result, not as none.
    let mut null_result = sample_job(2, &[], None);
    store.create(&null_result).await.unwrap();
    let now = SystemTime::now();
    null_result.start(now).unwrap();
    null_result.start_action(0, now).unwrap();
    null_result
        .succeed_action(0, serde_json::Value::Null, now)
        .unwrap();
    store.save(&null_result).await.unwrap();
    let stored = store
        .get(null_result.id)
        .await
        .unwrap()
        .expect("stored job");
    assert_eq!(stored.actions[0].result, Some(serde_json::Value::Null));
    assert_eq!(stored.actions[1].result, None, "not run: no result");
    assert_eq!(stored, null_result);
}

/// `create_started` leaves what `create` then `save` would: the started snapshot current, both
/// snapshots logged in order, the job found by its labels and new state, and a webhook that
/// reports every state told of both.
async fn create_started_stores_the_started_job_and_logs_both(store: &impl Store) {
    let now = SystemTime::now();
    let mut job = sample_job(2, &[("team", "a")], None);
    job.webhook = Some(crate::job::WebhookSpec {
        url: "https://example.com/hook".to_owned(),
        secret: "s".to_owned(),
        events: crate::job::WebhookEvents::All,
    });
    let mut started = job.clone();
    started.start(now).unwrap();
    started.start_action(0, now).unwrap();
    store.create_started(&job, &started).await.unwrap();

    assert_eq!(store.get(job.id).await.unwrap(), Some(started.clone()));
    let log = store.transitions(job.id, 0).await.unwrap();
    assert_eq!(
        log,
        vec![job.clone(), started.clone()],
        "both snapshots, in order"
    );
    let none = BTreeMap::new();
    let page = store.events_after(0, None, &none, 10).await.unwrap();
    assert_eq!(event_keys(&page), (vec![(job.id, 1), (job.id, 3)], true));

    let running = ListQuery {
        states: vec![JobState::Running],
        labels: labels(&[("team", "a")]),
        limit: 10,
        ..ListQuery::default()
    };
    assert_eq!(store.list(&running).await.unwrap(), vec![started.clone()]);
    let queued = ListQuery {
        states: vec![JobState::Queued],
        limit: 10,
        ..ListQuery::default()
    };
    assert!(store.list(&queued).await.unwrap().is_empty());
    let (_, unfinished) = store.unfinished_at(None, &none).await.unwrap();
    assert_eq!(unfinished, vec![started.clone()]);
    let reported: Vec<(JobState, i64)> = store
        .deliveries(job.id)
        .await
        .unwrap()
        .iter()
        .map(|d| (d.job_state, d.job_version))
        .collect();
    assert_eq!(
        reported,
        vec![(JobState::Queued, 1), (JobState::Running, 3)]
    );

    // The job goes on from there as any other.
    started.succeed_action(0, json!(1), now).unwrap();
    started.start_action(1, now).unwrap();
    store.save(&started).await.unwrap();
    assert_eq!(store.get(job.id).await.unwrap(), Some(started));
}

async fn idempotency_key_returns_first_job(store: &impl Store) {
    let first = sample_job(1, &[], Some("key-1"));
    let second = sample_job(1, &[], Some("key-1"));
    assert_eq!(store.create(&first).await.unwrap(), Created::New);
    assert_eq!(
        store.create(&second).await.unwrap(),
        Created::Existing(Box::new(first.clone()))
    );
    assert_eq!(store.get(second.id).await.unwrap(), None, "nothing stored");
    let tenant = &first.tenant;
    assert_eq!(
        store.by_idempotency_key(tenant, "key-1").await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        store.by_idempotency_key(tenant, "key-2").await.unwrap(),
        None
    );
    assert_eq!(
        store
            .by_idempotency_key("another-tenant", "key-1")
            .await
            .unwrap(),
        None,
        "keys are per tenant"
    );
}

async fn save_logs_state_changes_but_not_progress(store: &impl Store) {
    let now = SystemTime::now();
    let mut job = sample_job(1, &[], None);
    store.create(&job).await.unwrap();
    job.start(now).unwrap();
    store.save(&job).await.unwrap();
    job.start_action(0, now).unwrap();
    store.save(&job).await.unwrap();
    assert!(job.report_progress(0, Progress::percent(40, "working"), now));
    store.save(&job).await.unwrap();
    assert_eq!(store.get(job.id).await.unwrap().unwrap(), job);
    job.succeed_action(0, json!({"ok": true}), now).unwrap();
    store.save(&job).await.unwrap();
    job.succeed(now).unwrap();
    store.save(&job).await.unwrap();

    let log = store.transitions(job.id, 0).await.unwrap();
    let versions: Vec<i64> = log.iter().map(|j| j.version).collect();
    assert_eq!(versions, vec![1, 2, 3, 5, 6], "progress (v4) is not logged");
    assert_eq!(log.last().unwrap(), &job);
    let after = store.transitions(job.id, 3).await.unwrap();
    assert_eq!(
        after.iter().map(|j| j.version).collect::<Vec<_>>(),
        vec![5, 6]
    );
    assert!(store.transitions(job.id, 6).await.unwrap().is_empty());
}

async fn save_refuses_stale_versions(store: &impl Store) {
    let now = SystemTime::now();
    let mut job = sample_job(1, &[], None);
    store.create(&job).await.unwrap();
    let stale = job.clone();
    job.start(now).unwrap();
    store.save(&job).await.unwrap();
    assert!(store.save(&stale).await.is_err(), "older version refused");
    assert!(store.save(&job).await.is_err(), "same version refused");
    let unknown = sample_job(1, &[], None);
    assert!(store.save(&unknown).await.is_err(), "missing job refused");
}

/// A writer holding an older snapshot of a job that was ended meanwhile (a queued job
/// cancelled as it was being started) is refused, even with a higher version.
async fn a_terminal_state_is_final(store: &impl Store) {
    let now = SystemTime::now();
    let mut job = sample_job(1, &[], None);
    store.create(&job).await.unwrap();
    let mut stale = job.clone();
    job.cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
        .unwrap();
    store.save(&job).await.unwrap();
    stale.start(now).unwrap();
    stale.start_action(0, now).unwrap();
    assert!(stale.version > job.version);
    assert!(
        store.save(&stale).await.is_err(),
        "a RUNNING snapshot over a CANCELLED job refused"
    );
    let stored = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(stored.state, JobState::Cancelled);
    assert_eq!(stored.version, job.version);
    assert_eq!(
        store
            .transitions(job.id, 0)
            .await
            .unwrap()
            .iter()
            .map(|j| j.state)
            .collect::<Vec<_>>(),
        [JobState::Queued, JobState::Cancelled]
    );
}

async fn list_is_newest_first_filtered_and_paged(store: &impl Store) {
    let now = SystemTime::now();
    let mut ids = Vec::new();
    for i in 0..5 {
        let team = if i % 2 == 0 { "even" } else { "odd" };
        let mut job = sample_job(1, &[("team", team)], None);
        store.create(&job).await.unwrap();
        if i == 4 {
            job.cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
                .unwrap();
            store.save(&job).await.unwrap();
        }
        ids.push(job.id);
    }
    let all = store
        .list(&ListQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let listed: Vec<JobId> = all.iter().map(|j| j.id).collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);

    let page = store
        .list(&ListQuery {
            limit: 2,
            before: Some(ids[3]),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![ids[2], ids[1]]
    );

    let even = store
        .list(&ListQuery {
            labels: BTreeMap::from([("team".to_owned(), "even".to_owned())]),
            states: vec![JobState::Queued],
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        even.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![ids[2], ids[0]]
    );
}

async fn delete_only_terminal_jobs(store: &impl Store) {
    let now = SystemTime::now();
    let mut job = sample_job(1, &[], Some("del-key"));
    store.create(&job).await.unwrap();
    assert!(matches!(
        store.delete(job.id).await.unwrap(),
        Deleted::NotTerminal(_)
    ));
    job.cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
        .unwrap();
    store.save(&job).await.unwrap();
    assert_eq!(store.delete(job.id).await.unwrap(), Deleted::Removed);
    assert_eq!(store.get(job.id).await.unwrap(), None);
    assert!(store.transitions(job.id, 0).await.unwrap().is_empty());
    assert_eq!(store.delete(job.id).await.unwrap(), Deleted::NotFound);
    let again = sample_job(1, &[], Some("del-key"));
    assert_eq!(
        store.create(&again).await.unwrap(),
        Created::New,
        "a deleted job frees its idempotency key"
    );
}

async fn unfinished_and_purge(store: &impl Store) {
    let now = SystemTime::now();
    let queued = sample_job(1, &[], None);
    let mut running = sample_job(1, &[], None);
    let mut done = sample_job(1, &[], None);
    for job in [&queued, &running, &done] {
        store.create(job).await.unwrap();
    }
    running.start(now).unwrap();
    store.save(&running).await.unwrap();
    done.cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
        .unwrap();
    store.save(&done).await.unwrap();

    let unfinished: Vec<JobId> = store
        .unfinished()
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(unfinished, vec![queued.id, running.id]);

    assert_eq!(
        store
            .purge_finished(now - Duration::from_secs(60), 10)
            .await
            .unwrap(),
        0,
        "not expired yet"
    );
    assert_eq!(
        store
            .purge_finished(now + Duration::from_secs(1), 10)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.get(done.id).await.unwrap(), None);
    assert!(store.get(running.id).await.unwrap().is_some());
}
