//! A client that gives up halfway through a Submit or a Cancel (its deadline passes, or it
//! disconnects, and the server drops the call) leaves nothing half done: the job it submitted
//! is queued and runs, the queue place it took is given back, the job it cancelled ends
//! CANCELLED and its watchers are told. And a Cancel that finds a job while its Submit is
//! still storing it ends the job: it never runs.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use common::hooked_store::{HookedStore, StoreHooks};
use common::*;
use longrun::{
    api::pb::{self, JobState, jobs_client::JobsClient},
    job::{self, Job},
    store::StoreError,
};
use serde_json::json;
use tokio::sync::Notify;
use tonic::transport::Channel;

/// Hooks that hold the answer of the next `create` (`hold_create`), or the next save of a
/// CANCELLED job (`hold_cancel`), telling `held`, until `resume`; and refuse the next save of
/// a CANCELLED job (`fail_cancel`).
#[derive(Default)]
struct SlowAnswers {
    hold_create: AtomicBool,
    hold_cancel: AtomicBool,
    fail_cancel: AtomicBool,
    held: Notify,
    resume: Notify,
}

impl SlowAnswers {
    async fn hold(&self) {
        self.held.notify_one();
        self.resume.notified().await;
    }
}

#[async_trait]
impl StoreHooks for SlowAnswers {
    async fn after_create(&self, _job: &Job) {
        if self.hold_create.swap(false, Ordering::SeqCst) {
            self.hold().await;
        }
    }

    async fn before_save(&self, job: &Job) -> Result<(), StoreError> {
        if job.state != job::JobState::Cancelled {
            return Ok(());
        }
        if self.hold_cancel.swap(false, Ordering::SeqCst) {
            self.hold().await;
        }
        if self.fail_cancel.swap(false, Ordering::SeqCst) {
            return Err(StoreError::backend(
                "saving a job",
                "the disk went away for a moment",
            ));
        }
        Ok(())
    }
}

type SlowStore = HookedStore<SlowAnswers>;

/// A server on a slow store, running one job at a time, with a queue of `max_queue_length`.
async fn start(gate: &Gate, max_queue_length: usize) -> (Arc<SlowStore>, TestServer) {
    let store = Arc::new(SlowStore::default());
    let mut config = test_config();
    config.executor.concurrency = 1;
    config.executor.max_queue_length = max_queue_length;
    let server = TestServer::start_on(store.clone(), config, gate.registry()).await;
    (store, server)
}

/// Waits (bounded) until the store holds an answer back.
async fn until_held(store: &SlowStore) {
    tokio::time::timeout(PATIENCE, store.hooks.held.notified())
        .await
        .expect("the store is asked in time");
}

/// Ends a call by closing its client's connection, as a client that goes away does; the
/// server drops the call. Waits a moment for the server to see the connection close.
async fn hang_up<T>(call: tokio::task::JoinHandle<T>) {
    call.abort();
    assert!(
        call.await.is_err_and(|e| e.is_cancelled()),
        "the call was still waiting"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// The one job in the store's listing.
async fn the_only_job(client: &mut JobsClient<Channel>) -> pb::Job {
    let mut jobs = list_all(client).await;
    assert_eq!(jobs.len(), 1, "one job stored: {jobs:?}");
    jobs.remove(0)
}

#[tokio::test]
async fn a_submit_whose_client_gave_up_while_its_job_was_stored_still_queues_and_runs_it() {
    let gate = Gate::default();
    let (store, server) = start(&gate, 1).await;
    let mut client = server.client.clone();

    store.hooks.hold_create.store(true, Ordering::SeqCst);
    let mut giving_up = connect(server.addr).await;
    let submitting = tokio::spawn(async move {
        giving_up
            .submit(request(vec![action(
                "echo",
                json!({"message": "left behind"}),
            )]))
            .await
    });
    until_held(&store).await;
    hang_up(submitting).await;
    store.hooks.resume.notify_one();

    // Stored, then queued and run, though nobody waited for the answer.
    let job = the_only_job(&mut client).await;
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!(state(&done), JobState::Succeeded);

    // Its place in the queue (one in all) was given back: the next job is taken.
    let next = submit(&mut client, request(vec![action("echo", json!({}))])).await;
    assert_eq!(
        state(&wait_done(&mut client, &next.id).await),
        JobState::Succeeded
    );
}

#[tokio::test]
async fn a_cancel_whose_client_gave_up_still_ends_the_queued_job_and_tells_its_watchers() {
    let gate = Gate::default();
    let (store, server) = start(&gate, 10).await;
    let mut client = server.client.clone();
    let running = submit(&mut client, request(vec![gated()])).await;
    assert_eq!(gate.next_started().await, running.id);
    let queued = submit(&mut client, request(vec![action("echo", json!({}))])).await;
    assert_eq!(state(&queued), JobState::Queued);
    let watch = {
        let (mut watcher, id) = (client.clone(), queued.id.clone());
        tokio::spawn(async move { watch_to_end(&mut watcher, &id, 0).await })
    };

    store.hooks.hold_cancel.store(true, Ordering::SeqCst);
    let mut giving_up = connect(server.addr).await;
    let job_id = queued.id.clone();
    let cancelling =
        tokio::spawn(async move { giving_up.cancel(pb::CancelRequest { job_id }).await });
    until_held(&store).await;
    hang_up(cancelling).await;
    store.hooks.resume.notify_one();

    let seen = watch.await.unwrap();
    assert_eq!(
        seen.last().map(state),
        Some(JobState::Cancelled),
        "the watcher is told: {seen:?}"
    );
    assert_eq!(
        state(&get(&mut client, &queued.id).await),
        JobState::Cancelled
    );
    gate.release(1);
    assert_eq!(
        state(&wait_done(&mut client, &running.id).await),
        JobState::Succeeded
    );
}

/// With the one worker busy on `running` (so the new job is stored QUEUED, not started at
/// submission), submits an echo job while the store holds the answer to its create, finds it
/// listed (it is, as soon as it is stored) and sends a Cancel of it before the Submit is
/// answered; then lets the store answer. Returns the job as listed, and the two calls.
async fn cancel_while_it_is_stored(
    store: &SlowStore,
    client: &mut JobsClient<Channel>,
    running: &pb::Job,
) -> (
    pb::Job,
    tokio::task::JoinHandle<Result<tonic::Response<pb::SubmitResponse>, tonic::Status>>,
    tokio::task::JoinHandle<Result<tonic::Response<pb::CancelResponse>, tonic::Status>>,
) {
    store.hooks.hold_create.store(true, Ordering::SeqCst);
    let mut submitter = client.clone();
    let submitting = tokio::spawn(async move {
        submitter
            .submit(request(vec![action("echo", json!({}))]))
            .await
    });
    until_held(store).await;
    let job = list_all(client)
        .await
        .into_iter()
        .find(|j| j.id != running.id)
        .expect("the new job is listed");
    let mut canceller = client.clone();
    let job_id = job.id.clone();
    let cancelling =
        tokio::spawn(async move { canceller.cancel(pb::CancelRequest { job_id }).await });
    // The Cancel reaches the server before the store answers the Submit.
    tokio::time::sleep(Duration::from_millis(200)).await;
    store.hooks.resume.notify_one();
    (job, submitting, cancelling)
}

#[tokio::test]
async fn a_cancel_of_a_job_still_being_stored_ends_it_and_it_never_runs() {
    let gate = Gate::default();
    let (store, server) = start(&gate, 10).await;
    let mut client = server.client.clone();
    let running = submit(&mut client, request(vec![gated()])).await;
    assert_eq!(gate.next_started().await, running.id);

    let (job, submitting, cancelling) =
        cancel_while_it_is_stored(&store, &mut client, &running).await;

    let submitted = submitting.await.unwrap().expect("the Submit is answered");
    assert_eq!(submitted.into_inner().job.unwrap().id, job.id);
    let cancelled = cancelling.await.unwrap().expect("the Cancel is answered");
    assert_eq!(
        state(&cancelled.into_inner().job.unwrap()),
        JobState::Cancelled
    );

    // The worker frees up: the cancelled job must not run.
    gate.release(1);
    assert_eq!(
        state(&wait_done(&mut client, &running.id).await),
        JobState::Succeeded
    );
    let history: Vec<JobState> = watch_to_end(&mut client, &job.id, 0)
        .await
        .iter()
        .map(state)
        .collect();
    assert_eq!(history.last(), Some(&JobState::Cancelled), "{history:?}");
    assert!(!history.contains(&JobState::Running), "{history:?}");
    let stored = get(&mut client, &job.id).await;
    assert_eq!(state(&stored), JobState::Cancelled);
    assert!(stored.start_time.is_none(), "never started: {stored:?}");
}

#[tokio::test]
async fn a_cancel_of_a_job_being_stored_whose_save_fails_is_stored_once_the_store_takes_it() {
    let gate = Gate::default();
    let (store, server) = start(&gate, 10).await;
    let mut client = server.client.clone();
    let running = submit(&mut client, request(vec![gated()])).await;
    assert_eq!(gate.next_started().await, running.id);

    store.hooks.fail_cancel.store(true, Ordering::SeqCst);
    let (job, submitting, cancelling) =
        cancel_while_it_is_stored(&store, &mut client, &running).await;
    submitting.await.unwrap().expect("the Submit is answered");

    // The cancellation could not be stored with the Submit: it is tried again, and the job,
    // out of the queue meanwhile, does not run when the worker frees up.
    gate.release(1);
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!(state(&done), JobState::Cancelled);
    assert!(done.start_time.is_none(), "never started: {done:?}");
    cancelling.await.unwrap().expect("the Cancel is answered");
}
