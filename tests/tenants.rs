//! Tenants and API keys end to end: two tenants with their own keys, through real tonic
//! clients. Every RPC of `longrun.v1.Jobs` and of the `google.longrunning.Operations` facade
//! is scoped to the caller's tenant; another tenant's job id answers exactly the NOT_FOUND an
//! unknown id gets; calls without a valid key are UNAUTHENTICATED; health and reflection need
//! no key; the per-tenant quotas hold at their edge.

mod common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::*;
use longrun::{
    api::{
        longrunning::{
            CancelOperationRequest, DeleteOperationRequest, GetOperationRequest,
            ListOperationsRequest, WaitOperationRequest,
        },
        pb,
    },
    config::TenantQuota,
    store::{MemoryStore, Store},
};
use tokio_stream::StreamExt;
use tonic::{Code, Status};
use tonic_types::StatusExt;

const ACME_KEY: &str = "acme-secret-key";
const GLOBEX_KEY: &str = "globex-secret-key";

fn two_tenants() -> longrun::config::Config {
    auth_config(&[("acme", ACME_KEY), ("globex", GLOBEX_KEY)])
}

/// A status's code, message and ErrorInfo (reason, domain, sorted metadata).
type Shape = (
    Code,
    String,
    Option<(String, String, Vec<(String, String)>)>,
);

/// What a status says, with `id` replaced, so the answer for another tenant's job can be
/// compared with the answer for an unknown id.
fn shape(status: &Status, id: &str) -> Shape {
    let info = status.get_details_error_info().map(|info| {
        let mut metadata: Vec<(String, String)> = info
            .metadata
            .into_iter()
            .map(|(k, v)| (k, v.replace(id, "ID")))
            .collect();
        metadata.sort();
        (info.reason, info.domain, metadata)
    });
    (status.code(), status.message().replace(id, "ID"), info)
}

/// Asserts that `foreign` (the answer for another tenant's job `foreign_id`) is exactly the
/// answer for an unknown id (`unknown`, for `unknown_id`).
fn same_as_unknown(
    what: &str,
    foreign: Status,
    foreign_id: &str,
    unknown: Status,
    unknown_id: &str,
) {
    assert_eq!(foreign.code(), Code::NotFound, "{what}: {foreign:?}");
    assert_eq!(
        shape(&foreign, foreign_id),
        shape(&unknown, unknown_id),
        "{what}: another tenant's job must look exactly like an unknown one"
    );
}

async fn submit_keyed(client: &mut KeyedClient, request: pb::SubmitRequest) -> pb::Job {
    client
        .submit(request)
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("job")
}

async fn list_keyed(client: &mut KeyedClient, page_size: i32, token: &str) -> pb::ListJobsResponse {
    client
        .list_jobs(pb::ListJobsRequest {
            page_size,
            page_token: token.to_owned(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
}

async fn wait_keyed(client: &mut KeyedClient, id: &str) -> pb::Job {
    let response = client
        .wait_job(pb::WaitJobRequest {
            job_id: id.to_owned(),
            timeout: Some(millis(PATIENCE.as_millis() as i64)),
        })
        .await
        .expect("wait")
        .into_inner();
    assert!(response.done);
    response.job.expect("job")
}

#[tokio::test]
async fn each_tenant_sees_watches_cancels_and_deletes_only_its_own_jobs() {
    let gate = Gate::new(false);
    let server = TestServer::start_with(two_tenants(), gate.registry()).await;
    let mut acme = keyed_client(server.addr, ApiKey::bearer(ACME_KEY)).await;
    let mut globex = keyed_client(server.addr, ApiKey::bearer(GLOBEX_KEY)).await;
    let mut acme_ops = keyed_operations(server.addr, ApiKey::bearer(ACME_KEY)).await;
    let mut globex_ops = keyed_operations(server.addr, ApiKey::bearer(GLOBEX_KEY)).await;

    // Idempotency keys are per tenant: the same key gives each tenant its own job.
    let keyed = |key: &str| pb::SubmitRequest {
        idempotency_key: key.to_owned(),
        ..request(vec![gated()])
    };
    let running = submit_keyed(&mut acme, keyed("same-key")).await;
    assert_eq!(running.tenant, "acme");
    gate.next_started().await;
    let globex_job = submit_keyed(&mut globex, keyed("same-key")).await;
    assert_eq!(globex_job.tenant, "globex");
    assert_ne!(
        globex_job.id, running.id,
        "another tenant's key is not this one's"
    );
    let again = submit_keyed(&mut acme, keyed("same-key")).await;
    assert_eq!(
        again.id, running.id,
        "a tenant's retried Submit returns its first job"
    );
    let finished = submit_keyed(
        &mut acme,
        request(vec![action("echo", serde_json::json!({}))]),
    )
    .await;
    wait_keyed(&mut acme, &finished.id).await;

    let unknown = uuid::Uuid::now_v7().to_string();
    let a_id = running.id.clone();

    // GetStatus.
    let get = |id: &str| pb::GetStatusRequest {
        job_id: id.to_owned(),
    };
    let foreign = globex.get_status(get(&a_id)).await.unwrap_err();
    let not_found = globex.get_status(get(&unknown)).await.unwrap_err();
    same_as_unknown("GetStatus", foreign, &a_id, not_found, &unknown);

    // WatchJob.
    let watch = |id: &str| pb::WatchJobRequest {
        job_id: id.to_owned(),
        after_version: 0,
    };
    let foreign = globex
        .watch_job(watch(&a_id))
        .await
        .map(|_| ())
        .unwrap_err();
    let not_found = globex
        .watch_job(watch(&unknown))
        .await
        .map(|_| ())
        .unwrap_err();
    same_as_unknown("WatchJob", foreign, &a_id, not_found, &unknown);

    // WaitJob.
    let wait = |id: &str| pb::WaitJobRequest {
        job_id: id.to_owned(),
        timeout: Some(millis(50)),
    };
    let foreign = globex.wait_job(wait(&a_id)).await.unwrap_err();
    let not_found = globex.wait_job(wait(&unknown)).await.unwrap_err();
    same_as_unknown("WaitJob", foreign, &a_id, not_found, &unknown);

    // Cancel: refused, and the job is left running.
    let cancel = |id: &str| pb::CancelRequest {
        job_id: id.to_owned(),
    };
    let foreign = globex.cancel(cancel(&a_id)).await.unwrap_err();
    let not_found = globex.cancel(cancel(&unknown)).await.unwrap_err();
    same_as_unknown("Cancel", foreign, &a_id, not_found, &unknown);

    // DeleteJob: refused for a finished job of another tenant, which stays.
    let done_id = finished.id.clone();
    let delete = |id: &str| pb::DeleteJobRequest {
        job_id: id.to_owned(),
    };
    let foreign = globex.delete_job(delete(&done_id)).await.unwrap_err();
    let not_found = globex.delete_job(delete(&unknown)).await.unwrap_err();
    same_as_unknown("DeleteJob", foreign, &done_id, not_found, &unknown);

    // The Operations facade, the same way.
    let name = |id: &str| format!("operations/{id}");
    let foreign = globex_ops
        .get_operation(GetOperationRequest { name: name(&a_id) })
        .await
        .unwrap_err();
    let not_found = globex_ops
        .get_operation(GetOperationRequest {
            name: name(&unknown),
        })
        .await
        .unwrap_err();
    same_as_unknown("GetOperation", foreign, &a_id, not_found, &unknown);
    let foreign = globex_ops
        .cancel_operation(CancelOperationRequest { name: name(&a_id) })
        .await
        .unwrap_err();
    let not_found = globex_ops
        .cancel_operation(CancelOperationRequest {
            name: name(&unknown),
        })
        .await
        .unwrap_err();
    same_as_unknown("CancelOperation", foreign, &a_id, not_found, &unknown);
    let foreign = globex_ops
        .delete_operation(DeleteOperationRequest {
            name: name(&done_id),
        })
        .await
        .unwrap_err();
    let not_found = globex_ops
        .delete_operation(DeleteOperationRequest {
            name: name(&unknown),
        })
        .await
        .unwrap_err();
    same_as_unknown("DeleteOperation", foreign, &done_id, not_found, &unknown);
    let wait_op = |id: &str| WaitOperationRequest {
        name: name(id),
        timeout: Some(millis(50)),
    };
    let foreign = globex_ops.wait_operation(wait_op(&a_id)).await.unwrap_err();
    let not_found = globex_ops
        .wait_operation(wait_op(&unknown))
        .await
        .unwrap_err();
    same_as_unknown("WaitOperation", foreign, &a_id, not_found, &unknown);

    // Listing: each tenant's own jobs only, through both APIs.
    let acme_ids: Vec<String> = list_keyed(&mut acme, 100, "")
        .await
        .jobs
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(acme_ids, vec![finished.id.clone(), running.id.clone()]);
    let globex_jobs = list_keyed(&mut globex, 100, "").await.jobs;
    assert_eq!(globex_jobs.len(), 1);
    assert_eq!(globex_jobs[0].id, globex_job.id);
    let ops = globex_ops
        .list_operations(ListOperationsRequest {
            name: "operations".to_owned(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("list operations")
        .into_inner()
        .operations;
    assert_eq!(
        ops.iter().map(|o| o.name.clone()).collect::<Vec<_>>(),
        vec![name(&globex_job.id)]
    );

    // Nothing the other tenant tried changed acme's jobs.
    let still = acme
        .get_status(get(&a_id))
        .await
        .expect("own job")
        .into_inner();
    assert_eq!(state(still.job.as_ref().unwrap()), pb::JobState::Running);
    acme.get_status(get(&done_id))
        .await
        .expect("finished job kept");

    // Its owner can do all of it.
    let op = acme_ops
        .get_operation(GetOperationRequest { name: name(&a_id) })
        .await
        .expect("own operation")
        .into_inner();
    assert_eq!(op.name, name(&a_id));
    acme.cancel(cancel(&a_id)).await.expect("own cancel");
    gate.release(1);
    let cancelled = wait_keyed(&mut acme, &a_id).await;
    assert_eq!(state(&cancelled), pb::JobState::Cancelled);
    acme.delete_job(delete(&done_id)).await.expect("own delete");
    gate.release(1);
    wait_keyed(&mut globex, &globex_job.id).await;
}

#[tokio::test]
async fn list_pages_are_full_however_many_jobs_other_tenants_have() {
    let server =
        TestServer::start_with(two_tenants(), longrun::actions::Registry::with_builtins()).await;
    list_pages_are_full(&server).await;
}

#[tokio::test]
async fn list_pages_are_full_with_the_sqlite_store_too() {
    let dir = tempfile::tempdir().unwrap();
    let store = longrun::store::SqliteStore::open(dir.path(), Default::default()).unwrap();
    let server = TestServer::start_on(
        Arc::new(store),
        two_tenants(),
        longrun::actions::Registry::with_builtins(),
    )
    .await;
    list_pages_are_full(&server).await;
}

/// Three jobs of acme's, then five newer ones of globex's: acme's pages of two are full.
async fn list_pages_are_full(server: &TestServer) {
    let mut acme = keyed_client(server.addr, ApiKey::bearer(ACME_KEY)).await;
    let mut globex = keyed_client(server.addr, ApiKey::bearer(GLOBEX_KEY)).await;
    let echo = || request(vec![action("echo", serde_json::json!({}))]);
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(submit_keyed(&mut acme, echo()).await.id);
    }
    // Newer jobs of the other tenant, more than a page.
    for _ in 0..5 {
        submit_keyed(&mut globex, echo()).await;
    }
    let first = list_keyed(&mut acme, 2, "").await;
    assert_eq!(
        first.jobs.len(),
        2,
        "a page is full, not cut short by other tenants' rows"
    );
    assert!(!first.next_page_token.is_empty());
    let second = list_keyed(&mut acme, 2, &first.next_page_token).await;
    let listed: Vec<String> = first
        .jobs
        .iter()
        .chain(&second.jobs)
        .map(|j| j.id.clone())
        .collect();
    mine.reverse();
    assert_eq!(listed, mine);
    assert!(second.next_page_token.is_empty());
}

#[tokio::test]
async fn watch_jobs_streams_only_the_callers_jobs_live_and_on_resume() {
    let gate = Gate::new(false);
    let server = TestServer::start_with(two_tenants(), gate.registry()).await;
    let mut acme = keyed_client(server.addr, ApiKey::bearer(ACME_KEY)).await;
    let mut globex = keyed_client(server.addr, ApiKey::bearer(GLOBEX_KEY)).await;

    // Unfinished jobs of both tenants exist before the watch opens.
    let globex_running = submit_keyed(&mut globex, request(vec![gated()])).await;
    gate.next_started().await;
    let acme_running = submit_keyed(&mut acme, request(vec![gated()])).await;
    gate.next_started().await;

    let mut stream = acme
        .watch_jobs(pb::WatchJobsRequest::default())
        .await
        .expect("watch jobs")
        .into_inner();
    // Live: the other tenant's changes interleave with a new acme job.
    let globex_live = submit_keyed(
        &mut globex,
        request(vec![action("echo", serde_json::json!({}))]),
    )
    .await;
    wait_keyed(&mut globex, &globex_live.id).await;
    let acme_live = submit_keyed(
        &mut acme,
        request(vec![action("echo", serde_json::json!({}))]),
    )
    .await;
    let mut seen: Vec<pb::WatchJobsResponse> = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = stream.next().await {
            let message = message.expect("message");
            let job = message.job.clone().expect("job");
            seen.push(message);
            if job.id == acme_live.id && state(&job) == pb::JobState::Succeeded {
                return;
            }
        }
        panic!("the stream ended");
    })
    .await
    .expect("acme's new job is seen to the end");
    for message in &seen {
        let job = message.job.as_ref().unwrap();
        assert_eq!(job.tenant, "acme", "only acme's jobs: {job:?}");
    }
    assert!(
        seen.iter()
            .any(|m| m.job.as_ref().unwrap().id == acme_running.id),
        "acme's unfinished job comes first"
    );

    // Resuming from the first cursor replays acme's logged changes only.
    let cursor = seen[0].cursor.clone();
    drop(stream);
    let mut resumed = acme
        .watch_jobs(pb::WatchJobsRequest {
            after_cursor: cursor,
            ..Default::default()
        })
        .await
        .expect("resume")
        .into_inner();
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = resumed.next().await {
            let job = message.expect("message").job.expect("job");
            assert_eq!(job.tenant, "acme", "{job:?}");
            if job.id == acme_live.id && state(&job) == pb::JobState::Succeeded {
                return;
            }
        }
        panic!("the resumed stream ended");
    })
    .await
    .expect("the resumed stream reaches the same point");
    gate.release(2);
    wait_keyed(&mut globex, &globex_running.id).await;
    wait_keyed(&mut acme, &acme_running.id).await;
}

#[tokio::test]
async fn calls_without_a_valid_key_are_unauthenticated_and_change_nothing() {
    let server =
        TestServer::start_with(two_tenants(), longrun::actions::Registry::with_builtins()).await;
    let mut acme = keyed_client(server.addr, ApiKey::bearer(ACME_KEY)).await;
    let existing = submit_keyed(
        &mut acme,
        request(vec![action("echo", serde_json::json!({}))]),
    )
    .await;
    wait_keyed(&mut acme, &existing.id).await;
    let id = existing.id.clone();
    let name = format!("operations/{id}");

    let keys = [
        ("no key", ApiKey::none()),
        ("unknown key", ApiKey::bearer("not-a-key")),
        ("wrong scheme", ApiKey::raw(&format!("Basic {ACME_KEY}"))),
        ("bare key", ApiKey::raw(ACME_KEY)),
        ("empty bearer", ApiKey::raw("Bearer ")),
    ];
    for (case, key) in keys {
        let mut jobs = keyed_client(server.addr, key.clone()).await;
        let mut ops = keyed_operations(server.addr, key).await;
        let mut answers: Vec<(&str, Status)> = vec![
            (
                "Submit",
                jobs.submit(request(vec![action("echo", serde_json::json!({}))]))
                    .await
                    .unwrap_err(),
            ),
            (
                "GetStatus",
                jobs.get_status(pb::GetStatusRequest { job_id: id.clone() })
                    .await
                    .unwrap_err(),
            ),
            (
                "WatchJob",
                jobs.watch_job(pb::WatchJobRequest {
                    job_id: id.clone(),
                    after_version: 0,
                })
                .await
                .map(|_| ())
                .unwrap_err(),
            ),
            (
                "WatchJobs",
                jobs.watch_jobs(pb::WatchJobsRequest::default())
                    .await
                    .map(|_| ())
                    .unwrap_err(),
            ),
            (
                "WaitJob",
                jobs.wait_job(pb::WaitJobRequest {
                    job_id: id.clone(),
                    timeout: None,
                })
                .await
                .unwrap_err(),
            ),
            (
                "Cancel",
                jobs.cancel(pb::CancelRequest { job_id: id.clone() })
                    .await
                    .unwrap_err(),
            ),
            (
                "ListJobs",
                jobs.list_jobs(pb::ListJobsRequest::default())
                    .await
                    .unwrap_err(),
            ),
            (
                "DeleteJob",
                jobs.delete_job(pb::DeleteJobRequest { job_id: id.clone() })
                    .await
                    .unwrap_err(),
            ),
            (
                "ListActions",
                jobs.list_actions(pb::ListActionsRequest::default())
                    .await
                    .unwrap_err(),
            ),
            (
                "GetOperation",
                ops.get_operation(GetOperationRequest { name: name.clone() })
                    .await
                    .unwrap_err(),
            ),
            (
                "ListOperations",
                ops.list_operations(ListOperationsRequest {
                    name: "operations".to_owned(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            ),
            (
                "CancelOperation",
                ops.cancel_operation(CancelOperationRequest { name: name.clone() })
                    .await
                    .unwrap_err(),
            ),
            (
                "DeleteOperation",
                ops.delete_operation(DeleteOperationRequest { name: name.clone() })
                    .await
                    .unwrap_err(),
            ),
            (
                "WaitOperation",
                ops.wait_operation(WaitOperationRequest {
                    name: name.clone(),
                    timeout: None,
                })
                .await
                .unwrap_err(),
            ),
        ];
        for (rpc, status) in answers.drain(..) {
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{case}: {rpc}: {status:?}"
            );
            assert!(
                !status.message().contains("acme"),
                "{case}: {rpc}: names no tenant"
            );
        }
    }
    // Nothing was stored, cancelled or deleted.
    let listed = list_keyed(&mut acme, 100, "").await.jobs;
    assert_eq!(listed.len(), 1);
    assert_eq!(state(&listed[0]), pb::JobState::Succeeded);
    assert_eq!(
        server
            .executor
            .store()
            .list(&longrun::store::ListQuery {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn health_and_reflection_answer_without_a_key() {
    let server =
        TestServer::start_with(two_tenants(), longrun::actions::Registry::with_builtins()).await;
    let mut health = HealthClient::new(channel(server.addr).await);
    let status = health
        .check(HealthCheckRequest {
            service: "longrun.v1.Jobs".to_owned(),
        })
        .await
        .expect("health needs no key")
        .into_inner();
    assert_eq!(status.status(), ServingStatus::Serving);

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel(server.addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection needs no key")
        .into_inner();
    let response = responses.next().await.expect("a response").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    assert!(list.service.iter().any(|s| s.name == "longrun.v1.Jobs"));
}

#[tokio::test]
async fn auth_off_serves_everyone_as_the_default_tenant() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let job = submit(
        &mut client,
        request(vec![action("echo", serde_json::json!({}))]),
    )
    .await;
    assert_eq!(job.tenant, "default");
    // A key is ignored when authentication is off.
    let mut keyed = keyed_client(server.addr, ApiKey::bearer("anything")).await;
    keyed
        .get_status(pb::GetStatusRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect("the same default tenant");
}

fn quota(max_queued: Option<usize>, per_second: Option<f64>, burst: Option<u32>) -> TenantQuota {
    TenantQuota {
        max_queued_jobs: max_queued,
        submits_per_second: per_second,
        submit_burst: burst,
    }
}

/// A config with the given per-tenant quotas (the file's `[quotas.tenants.NAME]`).
fn quota_config(concurrency: usize, tenants: &[(&str, TenantQuota)]) -> longrun::config::Config {
    let mut text = String::from("[auth]\nenabled = true\n");
    for (tenant, key) in [("acme", ACME_KEY), ("globex", GLOBEX_KEY)] {
        text.push_str(&format!(
            "[[auth.keys]]\ntenant = \"{tenant}\"\nkey_sha256 = \"{}\"\n",
            hex::encode(longrun::api::auth::hash_key(key))
        ));
    }
    for (tenant, q) in tenants {
        text.push_str(&format!("[quotas.tenants.{tenant}]\n"));
        if let Some(n) = q.max_queued_jobs {
            text.push_str(&format!("max_queued_jobs = {n}\n"));
        }
        if let Some(r) = q.submits_per_second {
            text.push_str(&format!("submits_per_second = {r:?}\n"));
        }
        if let Some(b) = q.submit_burst {
            text.push_str(&format!("submit_burst = {b}\n"));
        }
    }
    let file = longrun::config::FileConfig::parse(&text).expect("config parses");
    let mut config = longrun::config::Config::resolve(Default::default(), file);
    let test = test_config();
    config.store = test.store;
    config.executor = longrun::executor::ExecutorConfig {
        concurrency,
        ..config.executor
    };
    config.executor.cancel_grace = test.executor.cancel_grace;
    config.shutdown_grace = test.shutdown_grace;
    config
}

fn error_reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

#[tokio::test]
async fn a_tenants_queue_quota_holds_at_its_edge_across_cancel_and_start() {
    let gate = Gate::new(false);
    let config = quota_config(1, &[("acme", quota(Some(2), None, None))]);
    assert_eq!(config.executor.tenant_queue_limit("acme"), Some(2));
    let server = TestServer::start_with(config, gate.registry()).await;
    let mut acme = keyed_client(server.addr, ApiKey::bearer(ACME_KEY)).await;
    let mut globex = keyed_client(server.addr, ApiKey::bearer(GLOBEX_KEY)).await;

    // One runs (and so is not waiting), two wait: exactly at the limit.
    let running = submit_keyed(&mut acme, request(vec![gated()])).await;
    gate.next_started().await;
    let first = submit_keyed(&mut acme, request(vec![gated()])).await;
    let _second = submit_keyed(&mut acme, request(vec![gated()])).await;
    let refused = acme.submit(request(vec![gated()])).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(error_reason(&refused), "TENANT_QUEUE_FULL");
    assert!(refused.get_details_retry_info().is_some(), "retry info");
    assert!(
        refused.message().contains("max_queued_jobs"),
        "{}",
        refused.message()
    );
    assert_eq!(
        list_keyed(&mut acme, 100, "").await.jobs.len(),
        3,
        "nothing stored"
    );
    // Another tenant is not held back by acme's quota.
    let other = submit_keyed(&mut globex, request(vec![gated()])).await;

    // Cancelling a waiting job frees its slot.
    acme.cancel(pb::CancelRequest {
        job_id: first.id.clone(),
    })
    .await
    .expect("cancel");
    let third = submit_keyed(&mut acme, request(vec![gated()])).await;
    acme.submit(request(vec![gated()])).await.unwrap_err();

    // A job that starts leaves the queue: its slot is free again.
    gate.release(1);
    wait_keyed(&mut acme, &running.id).await;
    gate.next_started().await;
    let fourth = submit_keyed(&mut acme, request(vec![gated()])).await;
    assert_eq!(
        acme.submit(request(vec![gated()]))
            .await
            .unwrap_err()
            .code(),
        Code::ResourceExhausted
    );
    gate.release(10);
    for id in [&third.id, &fourth.id] {
        wait_keyed(&mut acme, id).await;
    }
    wait_keyed(&mut globex, &other.id).await;
}

#[tokio::test]
async fn queued_jobs_recovered_at_start_count_against_their_tenants_quota() {
    // A previous run left three of acme's jobs queued.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    for _ in 0..3 {
        let spec = longrun::job::NewJob {
            actions: vec![longrun::job::NewAction {
                name: "gate".to_owned(),
                params: Default::default(),
                input: Default::default(),
            }],
            tenant: "acme".to_owned(),
            ..Default::default()
        };
        let job = longrun::job::Job::new(
            longrun::job::JobId::generate(),
            spec,
            1,
            std::time::SystemTime::now(),
        );
        store.create(&job).await.unwrap();
    }
    let gate = Gate::new(false);
    let config = quota_config(1, &[("acme", quota(Some(2), None, None))]);
    let server = TestServer::start_on(store, config, gate.registry()).await;
    gate.next_started().await;
    let mut acme = keyed_client(server.addr, ApiKey::bearer(ACME_KEY)).await;
    let refused = acme.submit(request(vec![gated()])).await.unwrap_err();
    assert_eq!(error_reason(&refused), "TENANT_QUEUE_FULL", "{refused:?}");
    gate.release(1);
    gate.next_started().await;
    submit_keyed(&mut acme, request(vec![gated()])).await;
    gate.release(10);
}

#[tokio::test]
async fn a_tenants_submit_rate_holds_at_its_burst_and_says_when_to_retry() {
    // A burst of 3 and a refill so slow that the test never sees a token come back.
    let config = quota_config(4, &[("globex", quota(None, Some(0.001), Some(3)))]);
    let server = TestServer::start_with(config, longrun::actions::Registry::with_builtins()).await;
    let mut acme = keyed_client(server.addr, ApiKey::bearer(ACME_KEY)).await;
    let mut globex = keyed_client(server.addr, ApiKey::bearer(GLOBEX_KEY)).await;
    let echo = || request(vec![action("echo", serde_json::json!({}))]);
    // A call refused as invalid takes its token too, and is still told what is wrong.
    let invalid = globex.submit(request(vec![])).await.unwrap_err();
    assert_eq!(
        invalid.code(),
        Code::InvalidArgument,
        "{}",
        invalid.message()
    );
    for _ in 0..2 {
        submit_keyed(&mut globex, echo()).await;
    }
    let refused = globex.submit(echo()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(error_reason(&refused), "TENANT_RATE_LIMITED");
    let retry = refused
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("retry delay");
    assert!(retry > Duration::from_secs(60), "{retry:?}");
    assert!(refused.message().contains("submits_per_second"));
    // Past the rate an invalid call is refused before it is looked at, so a flood of bad
    // requests is bounded like any other.
    let invalid = globex.submit(request(vec![])).await.unwrap_err();
    assert_eq!(error_reason(&invalid), "TENANT_RATE_LIMITED", "{invalid:?}");
    assert_eq!(
        list_keyed(&mut globex, 100, "").await.jobs.len(),
        2,
        "nothing stored"
    );
    // Another tenant has its own bucket (here: no limit at all).
    for _ in 0..5 {
        submit_keyed(&mut acme, echo()).await;
    }
    let info: HashMap<String, String> = refused.get_details_error_info().unwrap().metadata;
    assert_eq!(info.get("tenant").map(String::as_str), Some("globex"));
}

#[tokio::test]
async fn quotas_that_would_do_nothing_or_refuse_everything_refuse_to_start() {
    let start = |config| async move {
        longrun::server::Server::start(
            Arc::new(MemoryStore::new()),
            longrun::actions::Registry::with_builtins(),
            config,
        )
        .await
        .err()
        .expect("refused")
        .to_string()
    };
    // A misspelt tenant would leave `acme` without its quota, silently.
    let typo = quota_config(1, &[("acmee", quota(Some(5), None, None))]);
    let error = start(typo).await;
    assert!(
        error.contains("[quotas.tenants.acmee]") && error.contains("acme, globex"),
        "{error}"
    );
    let mut none_queued = quota_config(1, &[]);
    none_queued.executor.max_queued_per_tenant = Some(0);
    let error = start(none_queued).await;
    assert!(
        error.contains("[quotas] max_queued_jobs must be at least 1"),
        "{error}"
    );
    // Both real tenants with quotas of their own: taken.
    let fine = quota_config(
        1,
        &[
            ("acme", quota(Some(1), None, None)),
            ("globex", quota(None, Some(5.0), None)),
        ],
    );
    longrun::server::Server::start(
        Arc::new(MemoryStore::new()),
        longrun::actions::Registry::with_builtins(),
        fine,
    )
    .await
    .expect("starts");
}

#[tokio::test]
async fn auth_on_without_keys_refuses_to_start() {
    let config = auth_config(&[]);
    let error = longrun::server::Server::start(
        Arc::new(MemoryStore::new()),
        longrun::actions::Registry::with_builtins(),
        config,
    )
    .await
    .err()
    .expect("no keys, no server");
    assert!(error.to_string().contains("no API keys"), "{error}");
}
