//! Listing jobs (newest first, filters, pages), deleting finished ones, and listing actions.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use longrun::{
    actions::ExecCommand,
    api::pb::{self, JobState},
    config::Config,
};
use serde_json::json;
use tonic::Code;

fn echo() -> pb::ActionSpec {
    action("echo", json!({}))
}

fn one_at_a_time() -> Config {
    let mut config = test_config();
    config.executor.concurrency = 1;
    config
}

fn ids(jobs: &[pb::Job]) -> Vec<String> {
    jobs.iter().map(|j| j.id.clone()).collect()
}

async fn list(
    client: &mut pb::jobs_client::JobsClient<tonic::transport::Channel>,
    req: pb::ListJobsRequest,
) -> pb::ListJobsResponse {
    client.list_jobs(req).await.expect("list").into_inner()
}

fn by_states(states: &[JobState]) -> pb::ListJobsRequest {
    pb::ListJobsRequest {
        states: states.iter().map(|s| *s as i32).collect(),
        ..Default::default()
    }
}

fn by_labels(labels: &[(&str, &str)]) -> pb::ListJobsRequest {
    pb::ListJobsRequest {
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn list_jobs_returns_newest_first() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let mut submitted = Vec::new();
    for _ in 0..5 {
        submitted.push(submit(&mut client, request(vec![echo()])).await.id);
    }
    let listed = list_all(&mut client).await;
    submitted.reverse();
    assert_eq!(ids(&listed), submitted);
}

#[tokio::test]
async fn list_jobs_filters_by_state() {
    let gate = Gate::default();
    let server = TestServer::start_with(one_at_a_time(), gate.registry()).await;
    let mut client = server.client.clone();
    let succeeded = submit(&mut client, request(vec![echo()])).await;
    wait_done(&mut client, &succeeded.id).await;
    let failed = submit(&mut client, request(vec![action("fail", json!({}))])).await;
    wait_done(&mut client, &failed.id).await;
    let running = submit(&mut client, request(vec![gated()])).await;
    gate.next_started().await;
    let queued = submit(&mut client, request(vec![echo()])).await;
    let cancelled = submit(&mut client, request(vec![echo()])).await;
    cancel(&mut client, &cancelled.id).await;

    let cases: Vec<(Vec<JobState>, Vec<&str>)> = vec![
        (vec![JobState::Succeeded], vec![&succeeded.id]),
        (vec![JobState::Running], vec![&running.id]),
        (vec![JobState::Queued], vec![&queued.id]),
        (
            vec![JobState::Failed, JobState::Cancelled],
            vec![&cancelled.id, &failed.id],
        ),
        (
            vec![],
            vec![
                &cancelled.id,
                &queued.id,
                &running.id,
                &failed.id,
                &succeeded.id,
            ],
        ),
    ];
    for (states, expected) in cases {
        let listed = list(&mut client, by_states(&states)).await;
        assert_eq!(ids(&listed.jobs), expected, "states {states:?}");
        assert!(listed.next_page_token.is_empty());
    }
    gate.release(1);
}

#[tokio::test]
async fn list_jobs_filters_by_labels_and_every_label_must_match() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let mut jobs = HashMap::new();
    for (name, labels) in [
        ("a-prod", vec![("team", "a"), ("env", "prod")]),
        ("a-dev", vec![("team", "a"), ("env", "dev")]),
        ("b-prod", vec![("team", "b"), ("env", "prod")]),
        ("none", vec![]),
    ] {
        let mut req = request(vec![echo()]);
        req.labels = labels
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        jobs.insert(name, submit(&mut client, req).await.id);
    }
    type Labels<'a> = Vec<(&'a str, &'a str)>;
    let cases: Vec<(Labels<'_>, Vec<&str>)> = vec![
        (vec![("team", "a")], vec!["a-dev", "a-prod"]),
        (vec![("env", "prod")], vec!["b-prod", "a-prod"]),
        (vec![("team", "a"), ("env", "prod")], vec!["a-prod"]),
        (vec![("team", "b"), ("env", "dev")], vec![]),
        (vec![("team", "c")], vec![]),
        (vec![("owner", "x")], vec![]),
    ];
    for (labels, expected) in cases {
        let listed = list(&mut client, by_labels(&labels)).await;
        let expected: Vec<String> = expected.iter().map(|n| jobs[n].clone()).collect();
        assert_eq!(ids(&listed.jobs), expected, "labels {labels:?}");
    }

    // Labels and states combine.
    let done = wait_done(&mut client, &jobs["a-prod"]).await;
    assert_eq!(state(&done), JobState::Succeeded);
    let mut req = by_labels(&[("team", "a")]);
    req.states = vec![JobState::Failed as i32];
    assert!(list(&mut client, req).await.jobs.is_empty());
}

/// The ids on each page of ListJobs with `page_size`, following tokens until one is empty:
/// no page empty, and no more than `most` pages (so paging ends).
async fn every_page(
    client: &mut pb::jobs_client::JobsClient<tonic::transport::Channel>,
    page_size: i32,
    most: usize,
) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(
            client,
            pb::ListJobsRequest {
                page_size,
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await;
        assert!(!page.jobs.is_empty(), "no empty page (size {page_size})");
        pages.push(ids(&page.jobs));
        token = page.next_page_token;
        if token.is_empty() {
            return pages;
        }
        assert!(pages.len() <= most, "paging ends (size {page_size})");
    }
}

#[tokio::test]
async fn paging_covers_every_job_exactly_once_and_the_last_page_has_no_token() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let mut submitted = Vec::new();
    for _ in 0..6 {
        submitted.push(submit(&mut client, request(vec![echo()])).await.id);
    }
    submitted.reverse();

    for page_size in 1..=7 {
        let pages = every_page(&mut client, page_size, 6).await;
        assert!(
            pages.iter().all(|page| page.len() <= page_size as usize),
            "size {page_size}: {pages:?}"
        );
        let expected_pages = submitted.len().div_ceil(page_size as usize);
        assert_eq!(pages.len(), expected_pages, "page size {page_size}");
        let all: Vec<String> = pages.concat();
        assert_eq!(
            all, submitted,
            "each job once, newest first (size {page_size})"
        );
    }
}

/// A page whose jobs would not fit in one response of `max_message_bytes` ends early, with a
/// token after its last job, rather than failing every read of it; ListOperations alike.
#[tokio::test]
async fn a_page_too_large_for_one_message_ends_early_and_paging_still_covers_every_job() {
    let mut config = test_config();
    config.limits.max_message_bytes = 64 * 1024;
    let server = TestServer::start_with(config, longrun::actions::Registry::with_builtins()).await;
    let mut client = server.client.clone();
    // ~12 KiB of params a job, echoed back as its result: ~24 KiB a snapshot.
    let message = "x".repeat(12 * 1024);
    let mut submitted = Vec::new();
    for _ in 0..6 {
        let job = submit(
            &mut client,
            request(vec![action("echo", json!({ "message": message }))]),
        )
        .await;
        wait_done(&mut client, &job.id).await;
        submitted.push(job.id);
    }
    submitted.reverse();

    let pages = every_page(&mut client, 0, 6).await;
    assert!(
        pages.len() > 1,
        "the default page of 50 was split: {pages:?}"
    );
    assert_eq!(pages.concat(), submitted, "each job once, newest first");

    let mut operations = longrun::api::longrunning::operations_client::OperationsClient::connect(
        format!("http://{}", server.addr),
    )
    .await
    .unwrap();
    let first = operations
        .list_operations(longrun::api::longrunning::ListOperationsRequest {
            name: "operations".to_owned(),
            ..Default::default()
        })
        .await
        .expect("the first page fits")
        .into_inner();
    assert!(first.operations.len() < 6);
    assert!(!first.next_page_token.is_empty());
}

#[tokio::test]
async fn deleting_a_finished_job_removes_it_and_frees_its_idempotency_key() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let mut req = request(vec![echo()]);
    req.idempotency_key = "order-7".to_owned();
    let first = submit(&mut client, req.clone()).await;
    wait_done(&mut client, &first.id).await;
    let kept = submit(&mut client, request(vec![echo()])).await;

    client
        .delete_job(pb::DeleteJobRequest {
            job_id: first.id.clone(),
        })
        .await
        .expect("a finished job is deleted");
    let status = client
        .get_status(pb::GetStatusRequest {
            job_id: first.id.clone(),
        })
        .await
        .expect_err("gone");
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .watch_job(pb::WatchJobRequest {
            job_id: first.id.clone(),
            after_version: 1,
        })
        .await
        .expect_err("gone");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(ids(&list_all(&mut client).await), [kept.id]);
    let status = client
        .delete_job(pb::DeleteJobRequest {
            job_id: first.id.clone(),
        })
        .await
        .expect_err("already deleted");
    assert_eq!(status.code(), Code::NotFound);

    let second = submit(&mut client, req).await;
    assert_ne!(second.id, first.id, "the key makes a new job");
    assert_eq!(second.version, 1);
    assert_eq!(
        state(&wait_done(&mut client, &second.id).await),
        JobState::Succeeded
    );
}

#[tokio::test]
async fn deleting_a_queued_or_running_job_is_refused_and_leaves_it_untouched() {
    let gate = Gate::default();
    let server = TestServer::start_with(one_at_a_time(), gate.registry()).await;
    let mut client = server.client.clone();
    let running = submit(&mut client, request(vec![gated()])).await;
    gate.next_started().await;
    let queued = submit(&mut client, request(vec![echo()])).await;

    for id in [&running.id, &queued.id] {
        let before = get(&mut client, id).await;
        let status = client
            .delete_job(pb::DeleteJobRequest { job_id: id.clone() })
            .await
            .expect_err("refused");
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{}",
            status.message()
        );
        assert_eq!(get(&mut client, id).await, before, "untouched");
    }
    gate.release(1);
    assert_eq!(
        state(&wait_done(&mut client, &running.id).await),
        JobState::Succeeded
    );
    assert_eq!(
        state(&wait_done(&mut client, &queued.id).await),
        JobState::Succeeded
    );
}

fn params_of(info: &pb::ActionInfo) -> HashSet<(String, String, bool)> {
    info.params
        .iter()
        .map(|p| (p.name.clone(), p.r#type.clone(), p.required))
        .collect()
}

fn param(name: &str, kind: &str, required: bool) -> (String, String, bool) {
    (name.to_owned(), kind.to_owned(), required)
}

#[tokio::test]
async fn list_actions_describes_the_builtins_and_their_params() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let actions = client
        .list_actions(pb::ListActionsRequest {})
        .await
        .expect("list actions")
        .into_inner()
        .actions;
    let names: Vec<&str> = actions.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["echo", "fail", "sha256", "sleep"]);
    let by_name: HashMap<&str, &pb::ActionInfo> =
        actions.iter().map(|a| (a.name.as_str(), a)).collect();
    assert_eq!(
        params_of(by_name["sleep"]),
        HashSet::from([
            param("duration_ms", "integer", false),
            param("steps", "integer", false)
        ])
    );
    assert_eq!(
        params_of(by_name["echo"]),
        HashSet::from([param("message", "string", false)])
    );
    assert_eq!(
        params_of(by_name["fail"]),
        HashSet::from([
            param("code", "string", false),
            param("reason", "string", false),
            param("message", "string", false),
            param("fail_attempts", "integer", false),
            param("retryable", "boolean", false),
        ])
    );
    assert!(params_of(by_name["sha256"]).is_empty());
    assert!(by_name["sha256"].uses_input);
    assert!(!by_name["sleep"].uses_input);
    for info in &actions {
        assert!(!info.description.is_empty(), "{} is described", info.name);
        for p in &info.params {
            assert!(
                !p.description.is_empty(),
                "{}.{} is described",
                info.name,
                p.name
            );
        }
    }
}

#[tokio::test]
async fn list_actions_includes_exec_with_its_declared_commands() {
    let mut config = test_config();
    config.exec_commands.insert(
        "hello".to_owned(),
        ExecCommand {
            program: "/bin/echo".into(),
            args: vec!["hello".to_owned()],
            description: "Says hello.".to_owned(),
            allow_extra_args: false,
            env: Default::default(),
            working_dir: None,
        },
    );
    let registry = config.registry();
    let server = TestServer::start_with(config, registry).await;
    let mut client = server.client.clone();
    let actions = client
        .list_actions(pb::ListActionsRequest {})
        .await
        .expect("list actions")
        .into_inner()
        .actions;
    let names: Vec<&str> = actions.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["echo", "exec", "fail", "sha256", "sleep"]);
    let exec = actions.iter().find(|a| a.name == "exec").unwrap();
    assert_eq!(
        params_of(exec),
        HashSet::from([
            param("command", "string", true),
            param("args", "array", false)
        ])
    );
    assert!(exec.uses_input);
    assert!(
        exec.description.contains("hello"),
        "the declared command is listed: {}",
        exec.description
    );
}

#[tokio::test]
async fn state_filter_unspecified_matches_nothing_as_the_proto_documents() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    submit(&mut client, request(vec![echo()])).await;
    let listed = list(&mut client, by_states(&[JobState::Unspecified])).await;
    assert!(listed.jobs.is_empty());
}

/// Progress is written to the store only now and then; a listing read from the store (ListJobs,
/// ListOperations, the start of WatchJobs) shows a running job with its newest progress all
/// the same, as GetStatus and watchers do.
#[tokio::test]
async fn listings_show_a_running_jobs_newest_progress_not_the_stored_one() {
    let mut config = test_config();
    config.executor.progress_persist_interval = Some(std::time::Duration::from_secs(3600));
    let server = TestServer::start_with(config, longrun::actions::Registry::with_builtins()).await;
    let mut client = server.client.clone();
    // A step (and a progress report) every 100 ms, for an hour.
    let job = submit(&mut client, request(vec![sleep(3_600_000, 36_000)])).await;
    let steps = |job: &pb::Job| {
        job.actions[0]
            .progress
            .as_ref()
            .map_or(0, |progress| progress.current)
    };
    let reported = until(&mut client, &job.id, |j| steps(j) >= 2).await;

    let listed = list(&mut client, pb::ListJobsRequest::default()).await.jobs;
    assert_eq!(ids(&listed), vec![job.id.clone()]);
    assert!(
        steps(&listed[0]) >= 2 && listed[0].version >= reported.version,
        "listed at step {} and version {}, watched at step {} and version {}",
        steps(&listed[0]),
        listed[0].version,
        steps(&reported),
        reported.version
    );

    let mut operations = longrun::api::longrunning::operations_client::OperationsClient::new(
        channel(server.addr).await,
    );
    let listed = operations
        .list_operations(longrun::api::longrunning::ListOperationsRequest::default())
        .await
        .expect("ListOperations")
        .into_inner()
        .operations;
    let metadata = listed[0].metadata.as_ref().expect("metadata");
    let listed: pb::Job = prost::Message::decode(metadata.value.as_slice()).expect("a Job");
    assert!(
        steps(&listed) >= 2,
        "ListOperations at step {}",
        steps(&listed)
    );

    // WatchJobs without a cursor starts with a snapshot of each unfinished job.
    let mut stream = client
        .watch_jobs(pb::WatchJobsRequest::default())
        .await
        .expect("WatchJobs")
        .into_inner();
    let first = tokio::time::timeout(PATIENCE, futures::StreamExt::next(&mut stream))
        .await
        .expect("the first snapshot in time")
        .expect("a message")
        .expect("not an error")
        .job
        .expect("a job");
    assert!(
        steps(&first) >= 2,
        "WatchJobs began at step {}",
        steps(&first)
    );

    cancel(&mut client, &job.id).await;
}

/// A page token reads the next page of the query it came from, whatever the page size; with
/// another filter, or altered, it is INVALID_ARGUMENT naming `page_token`, never some other
/// page.
#[tokio::test]
async fn a_page_token_is_bound_to_its_query() {
    let server = TestServer::start().await;
    let mut client = server.client.clone();
    let mut labelled = request(vec![echo()]);
    labelled.labels = HashMap::from([("team".to_owned(), "a".to_owned())]);
    for _ in 0..3 {
        let job = submit(&mut client, labelled.clone()).await;
        wait_done(&mut client, &job.id).await;
    }
    let query = |page_size, page_token: &str| pb::ListJobsRequest {
        labels: labelled.labels.clone(),
        page_size,
        page_token: page_token.to_owned(),
        ..Default::default()
    };
    let first = list(&mut client, query(1, "")).await;
    let token = first.next_page_token;
    let rest = list(&mut client, query(5, &token)).await;
    assert_eq!(rest.jobs.len(), 2, "the page size may change");

    // The states filter is a set: its order and repeats do not make another query.
    let ended = [pb::JobState::Succeeded as i32, pb::JobState::Failed as i32];
    let mut by_state = query(1, "");
    by_state.states = ended.to_vec();
    let first_ended = list(&mut client, by_state.clone()).await;
    by_state.states = vec![ended[1], ended[0], ended[1]];
    by_state.page_token = first_ended.next_page_token;
    by_state.page_size = 5;
    let rest_ended = list(&mut client, by_state).await;
    assert_eq!(rest_ended.jobs.len(), 2, "the same states, reordered");

    let mut other_filter = query(1, &token);
    other_filter.labels.clear();
    let mut altered = token.clone().into_bytes();
    altered[3] = if altered[3] == b'A' { b'B' } else { b'A' };
    let altered = query(1, std::str::from_utf8(&altered).unwrap());
    for (what, request) in [("another filter", other_filter), ("altered", altered)] {
        let status = client.list_jobs(request).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}");
        assert_eq!(bad_request_fields(&status), ["page_token"], "{what}");
    }
}
