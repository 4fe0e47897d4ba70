//! A memory store that hands every call on, after the test's hooks have had their say: for
//! tests that need a store to be slow or to fail at one point and behave everywhere else.

use std::{collections::BTreeMap, time::SystemTime};

use async_trait::async_trait;
use longrun::{
    job::{AttemptOutcome, Delivery, Job, JobId},
    store::{Created, Deleted, DueDelivery, EventPage, ListQuery, MemoryStore, Store, StoreError},
};

/// What a [`HookedStore`] does before handing a call on; by default, nothing.
#[async_trait]
pub trait StoreHooks: Send + Sync + 'static {
    /// Before `save`: an error is the save's answer, and nothing is saved.
    async fn before_save(&self, _job: &Job) -> Result<(), StoreError> {
        Ok(())
    }

    /// Before `unfinished`, which recovery reads at start.
    async fn before_unfinished(&self) {}

    /// After `create` has stored a job, before its answer: a store that is slow to answer.
    async fn after_create(&self, _job: &Job) {}
}

/// A [`MemoryStore`] behind `hooks`.
#[derive(Default)]
pub struct HookedStore<H> {
    pub inner: MemoryStore,
    pub hooks: H,
}

impl<H> HookedStore<H> {
    pub fn new(hooks: H) -> Self {
        Self {
            inner: MemoryStore::new(),
            hooks,
        }
    }
}

#[async_trait]
impl<H: StoreHooks> Store for HookedStore<H> {
    async fn create(&self, job: &Job) -> Result<Created, StoreError> {
        let created = self.inner.create(job).await?;
        self.hooks.after_create(job).await;
        Ok(created)
    }
    async fn save(&self, job: &Job) -> Result<(), StoreError> {
        self.hooks.before_save(job).await?;
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
        self.hooks.before_unfinished().await;
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
