//! A store that stops taking writes for a while (a full disk): a job whose run a failed write
//! aborted does not stay RUNNING until the next start. Once writes go through again it is
//! settled as a restart would settle it: queued again with an attempt more, FAILED
//! `INTERRUPTED` when out of attempts, CANCELLED when a cancel came meanwhile; its watchers
//! and waiters are told.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use common::hooked_store::{HookedStore, StoreHooks};
use common::*;
use longrun::{
    api::pb::{self, JobState},
    job::Job,
    store::StoreError,
};
use tonic::transport::Channel;

/// Hooks that fail `save` as a full disk does while `full` is set, counting the saves refused;
/// and, once `hold_next_queued` is set, hold the next save of a QUEUED job (telling `held`)
/// until `resume`.
#[derive(Default)]
struct Disk {
    full: AtomicBool,
    refused: AtomicUsize,
    hold_next_queued: AtomicBool,
    held: tokio::sync::Notify,
    resume: tokio::sync::Notify,
}

#[async_trait]
impl StoreHooks for Disk {
    async fn before_save(&self, job: &Job) -> Result<(), StoreError> {
        if self.full.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Full {
                context: "committing a batch of writes".to_owned(),
                source: "No space left on device".into(),
            });
        }
        if job.state == longrun::job::JobState::Queued
            && self.hold_next_queued.swap(false, Ordering::SeqCst)
        {
            self.held.notify_one();
            self.resume.notified().await;
        }
        Ok(())
    }
}

/// A memory store whose disk fills up when the test says so.
type FillingDisk = HookedStore<Disk>;

fn set_full(store: &FillingDisk, full: bool) {
    store.hooks.full.store(full, Ordering::SeqCst);
}

async fn start(gate: &Gate) -> (Arc<FillingDisk>, TestServer) {
    let store = Arc::new(FillingDisk::default());
    let mut config = test_config();
    config.executor.concurrency = 1;
    let server = TestServer::start_on(store.clone(), config, gate.registry()).await;
    (store, server)
}

async fn get(client: &mut longrun::api::pb::jobs_client::JobsClient<Channel>, id: &str) -> pb::Job {
    client
        .get_status(pb::GetStatusRequest {
            job_id: id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
}

/// A Cancel of job `id`, made in the background: its answer.
fn spawn_cancel(
    client: &pb::jobs_client::JobsClient<Channel>,
    id: &str,
) -> tokio::task::JoinHandle<Result<pb::CancelResponse, tonic::Status>> {
    let mut canceller = client.clone();
    let job_id = id.to_owned();
    tokio::spawn(async move {
        canceller
            .cancel(pb::CancelRequest { job_id })
            .await
            .map(|r| r.into_inner())
    })
}

/// The gated job's end cannot be stored: its run is aborted, and it stays RUNNING while the
/// disk is full. Returns once that is so.
async fn abort_its_end(
    store: &FillingDisk,
    gate: &Gate,
    client: &mut pb::jobs_client::JobsClient<Channel>,
    job: &pb::Job,
) {
    assert_eq!(gate.next_started().await, job.id);
    set_full(store, true);
    gate.release(1);
    // The run settles nothing while the disk is full: give it time to try.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state(&get(client, &job.id).await), JobState::Running);
}

#[tokio::test]
async fn a_job_whose_end_could_not_be_stored_runs_again_once_the_disk_has_room() {
    let gate = Gate::default();
    let (store, server) = start(&gate).await;
    let mut client = server.client.clone();
    let mut req = request(vec![gated()]);
    req.max_attempts = 2;
    let job = submit(&mut client, req).await;
    let mut watch = client
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    abort_its_end(&store, &gate, &mut client, &job).await;

    set_full(&store, false);
    assert_eq!(
        gate.next_started().await,
        job.id,
        "run again, without a restart"
    );
    gate.release(1);
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!(state(&done), JobState::Succeeded);
    assert_eq!(done.attempt, 2);

    // The watcher saw it go back to the queue, then end.
    let mut states = Vec::new();
    while let Some(message) = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .expect("the watch ends")
        .unwrap()
    {
        let job = message.job.expect("a snapshot");
        states.push((state(&job), job.attempt));
    }
    assert!(
        states.contains(&(JobState::Queued, 2)) && states.last() == Some(&(JobState::Succeeded, 2)),
        "{states:?}"
    );
}

#[tokio::test]
async fn out_of_attempts_it_fails_interrupted_and_its_waiter_is_told() {
    let gate = Gate::default();
    let (store, server) = start(&gate).await;
    let mut client = server.client.clone();
    let job = submit(&mut client, request(vec![gated()])).await;
    abort_its_end(&store, &gate, &mut client, &job).await;

    let mut waiter = client.clone();
    let id = job.id.clone();
    let wait = tokio::spawn(async move { wait_done(&mut waiter, &id).await });
    set_full(&store, false);
    let done = tokio::time::timeout(PATIENCE, wait).await.unwrap().unwrap();
    assert_eq!(state(&done), JobState::Failed);
    let error = done.error.expect("the job's error");
    assert_eq!(error.reason, "INTERRUPTED", "{error:?}");
    assert_eq!(gate.started_within(Duration::from_millis(200)).await, None);
}

#[tokio::test]
async fn a_cancel_while_the_disk_is_full_ends_it_cancelled_once_it_has_room() {
    let gate = Gate::default();
    let (store, server) = start(&gate).await;
    let mut client = server.client.clone();
    let mut req = request(vec![gated()]);
    req.max_attempts = 3;
    let job = submit(&mut client, req).await;
    abort_its_end(&store, &gate, &mut client, &job).await;

    let cancel = spawn_cancel(&client, &job.id);
    tokio::time::sleep(Duration::from_millis(200)).await;
    set_full(&store, false);
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!(state(&done), JobState::Cancelled);
    assert!(cancel.await.unwrap().is_ok());
    assert_eq!(gate.started_within(Duration::from_millis(200)).await, None);
}

/// A Cancel that comes while the aborted job's settling stores it back in the queue (after the
/// settling looked for one) ends it CANCELLED, not queued to run again with its canceller
/// left waiting (before the fix the Cancel answered after 5 s with the job QUEUED, and the job
/// ran again).
#[tokio::test]
async fn a_cancel_while_the_aborted_job_is_being_queued_again_ends_it_cancelled() {
    let gate = Gate::default();
    let (store, server) = start(&gate).await;
    let mut client = server.client.clone();
    let mut req = request(vec![gated()]);
    req.max_attempts = 3;
    let job = submit(&mut client, req).await;
    abort_its_end(&store, &gate, &mut client, &job).await;

    store.hooks.hold_next_queued.store(true, Ordering::SeqCst);
    set_full(&store, false);
    tokio::time::timeout(PATIENCE, store.hooks.held.notified())
        .await
        .expect("the settling stores the job QUEUED");
    let cancel = spawn_cancel(&client, &job.id);
    tokio::time::sleep(Duration::from_millis(200)).await;
    store.hooks.resume.notify_one();
    let answer = tokio::time::timeout(PATIENCE, cancel)
        .await
        .expect("the Cancel is answered")
        .unwrap()
        .expect("the Cancel succeeds");
    assert_eq!(state(&answer.job.expect("the job")), JobState::Cancelled);
    assert_eq!(
        state(&wait_done(&mut client, &job.id).await),
        JobState::Cancelled
    );
    assert_eq!(gate.started_within(Duration::from_millis(300)).await, None);
}

/// While the disk is full, a queued job whose start cannot be stored is not started, aborted
/// and queued again as fast as the machine goes (before the fix: thousands of tries a second,
/// each logging an error): the executor backs off from 100 ms to 5 s, and the job runs once
/// the disk has room.
#[tokio::test]
async fn queued_jobs_are_not_restarted_in_a_loop_while_the_disk_is_full() {
    let gate = Gate::default();
    let (store, server) = start(&gate).await;
    let mut client = server.client.clone();
    let mut first = request(vec![gated()]);
    first.max_attempts = 2; // runs again once settled
    let first = submit(&mut client, first).await;
    // Created (creates still go through) and queued behind the first, which holds the worker.
    let queued = submit(&mut client, request(vec![gated()])).await;
    abort_its_end(&store, &gate, &mut client, &first).await;
    let before = store.hooks.refused.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refused = store.hooks.refused.load(Ordering::SeqCst) - before;
    // Backing off, the queued job's start and the first job's settling are each tried a few
    // times in this second; in a loop it would be thousands.
    assert!(refused <= 20, "{refused} saves tried in one second");
    assert_eq!(state(&get(&mut client, &queued.id).await), JobState::Queued);

    set_full(&store, false);
    let mut started = Vec::new();
    for _ in 0..2 {
        started.push(gate.next_started().await);
        gate.release(1);
    }
    started.sort();
    let mut both = vec![first.id.clone(), queued.id.clone()];
    both.sort();
    assert_eq!(started, both, "both run once the disk has room");
    for id in [&first.id, &queued.id] {
        assert_eq!(
            state(&wait_done(&mut client, id).await),
            JobState::Succeeded
        );
    }
}

/// A Cancel of a queued job whose write the full disk refuses fails, and the job keeps its
/// place in the queue (before the fix it was taken out and left QUEUED in the store with
/// nothing to run it until a restart); once the disk has room, a Cancel ends it.
#[tokio::test]
async fn a_cancel_the_full_disk_refuses_leaves_the_job_in_line() {
    let gate = Gate::default();
    let (store, server) = start(&gate).await;
    let mut client = server.client.clone();
    let later = std::time::SystemTime::now() + Duration::from_secs(3600);
    let job = submit(
        &mut client,
        pb::SubmitRequest {
            schedule_time: Some(later.into()),
            ..request(vec![gated()])
        },
    )
    .await;
    assert_eq!(server.executor.queue_length(), 1);

    set_full(&store, true);
    let refused = client
        .cancel(pb::CancelRequest {
            job_id: job.id.clone(),
        })
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(server.executor.queue_length(), 1, "still in line");
    assert_eq!(state(&get(&mut client, &job.id).await), JobState::Queued);

    set_full(&store, false);
    let cancelled = cancel(&mut client, &job.id).await;
    assert_eq!(state(&cancelled), JobState::Cancelled);
    assert_eq!(server.executor.queue_length(), 0);
}
