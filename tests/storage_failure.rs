//! A store that stops taking writes for a while (a full disk): a job whose run a failed write
//! aborted does not stay RUNNING until the next start. Once writes go through again it is
//! settled as a restart would settle it: queued again with an attempt more, FAILED
//! `INTERRUPTED` when out of attempts, CANCELLED when a cancel came meanwhile; its watchers
//! and waiters are told.

mod common;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use common::*;
use longrun::{
    api::pb::{self, JobState},
    job::{AttemptOutcome, Delivery, Job, JobId},
    store::{Created, Deleted, DueDelivery, EventPage, ListQuery, MemoryStore, Store, StoreError},
};
use tonic::transport::Channel;

/// A memory store whose `save` fails as a full disk does while `full` is set.
#[derive(Default)]
struct FillingDisk {
    inner: MemoryStore,
    full: AtomicBool,
}

impl FillingDisk {
    fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::SeqCst);
    }
}

#[async_trait]
impl Store for FillingDisk {
    async fn create(&self, job: &Job) -> Result<Created, StoreError> {
        self.inner.create(job).await
    }
    async fn save(&self, job: &Job) -> Result<(), StoreError> {
        if self.full.load(Ordering::SeqCst) {
            return Err(StoreError::Full {
                context: "committing a batch of writes".to_owned(),
                source: "No space left on device".into(),
            });
        }
        self.inner.save(job).await
    }
    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        self.inner.get(id).await
    }
    async fn by_idempotency_key(&self, tenant: &str, key: &str) -> Result<Option<Job>, StoreError> {
        self.inner.by_idempotency_key(tenant, key).await
    }
    async fn transitions(&self, id: JobId, after: i64) -> Result<Vec<Job>, StoreError> {
        self.inner.transitions(id, after).await
    }
    async fn list(&self, query: &ListQuery) -> Result<Vec<Job>, StoreError> {
        self.inner.list(query).await
    }
    async fn delete(&self, id: JobId) -> Result<Deleted, StoreError> {
        self.inner.delete(id).await
    }
    async fn unfinished(&self) -> Result<Vec<Job>, StoreError> {
        self.inner.unfinished().await
    }
    async fn events_after(
        &self,
        after_seq: i64,
        tenant: Option<&str>,
        labels: &BTreeMap<String, String>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        self.inner
            .events_after(after_seq, tenant, labels, limit)
            .await
    }
    async fn unfinished_at(
        &self,
        tenant: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<(i64, Vec<Job>), StoreError> {
        self.inner.unfinished_at(tenant, labels).await
    }
    async fn purge_finished(&self, before: SystemTime, limit: usize) -> Result<usize, StoreError> {
        self.inner.purge_finished(before, limit).await
    }
    async fn deliveries(&self, id: JobId) -> Result<Vec<Delivery>, StoreError> {
        self.inner.deliveries(id).await
    }
    async fn due_deliveries(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        self.inner.due_deliveries(now, limit).await
    }
    async fn record_delivery_attempt(
        &self,
        id: uuid::Uuid,
        outcome: &AttemptOutcome,
    ) -> Result<Option<Delivery>, StoreError> {
        self.inner.record_delivery_attempt(id, outcome).await
    }
    async fn pending_deliveries(&self) -> Result<usize, StoreError> {
        self.inner.pending_deliveries().await
    }
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

/// The gated job's end cannot be stored: its run is aborted, and it stays RUNNING while the
/// disk is full. Returns once that is so.
async fn abort_its_end(
    store: &FillingDisk,
    gate: &Gate,
    client: &mut pb::jobs_client::JobsClient<Channel>,
    job: &pb::Job,
) {
    assert_eq!(gate.next_started().await, job.id);
    store.set_full(true);
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

    store.set_full(false);
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
    store.set_full(false);
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

    let mut canceller = client.clone();
    let id = job.id.clone();
    let cancel = tokio::spawn(async move {
        canceller
            .cancel(pb::CancelRequest { job_id: id })
            .await
            .map(|r| r.into_inner())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    store.set_full(false);
    let done = wait_done(&mut client, &job.id).await;
    assert_eq!(state(&done), JobState::Cancelled);
    assert!(cancel.await.unwrap().is_ok());
    assert_eq!(gate.started_within(Duration::from_millis(200)).await, None);
}
