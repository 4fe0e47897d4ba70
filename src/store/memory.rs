//! An in-memory [`Store`]: for tests and `--store memory`. Nothing survives a restart.

use std::{
    collections::{BTreeMap, HashMap},
    sync::RwLock,
    time::SystemTime,
};

use async_trait::async_trait;
use uuid::Uuid;

use super::{
    Created, Deleted, DueDelivery, EventPage, ListQuery, Store, StoreError, apply_attempt,
    has_labels, in_tenant,
};
use crate::job::{AttemptOutcome, Delivery, DeliveryState, Job, JobId, JobState, delivery_for};

#[derive(Default)]
struct Inner {
    jobs: BTreeMap<JobId, Job>,
    /// Each job's logged snapshots with their sequence numbers, oldest first.
    log: HashMap<JobId, Vec<(i64, Job)>>,
    /// The global event log: sequence number to job. Assigned under the write lock, so the
    /// events a reader sees always form a prefix.
    events: BTreeMap<i64, JobId>,
    /// The last sequence number handed out.
    last_seq: i64,
    /// The highest number retention removed (it removes many jobs: one mark for all).
    removed_through: i64,
    /// Jobs removed one by one (DeleteJob), by their newest event: a resume is refused only
    /// by those it could have matched. Dropped once retention's mark passes them.
    deleted: BTreeMap<i64, (String, BTreeMap<String, String>)>,
    /// Idempotency keys by tenant, then key.
    keys: HashMap<(String, String), JobId>,
    /// The webhook outbox, by delivery id (UUIDv7: in order of writing).
    deliveries: BTreeMap<Uuid, Delivery>,
}

/// Jobs kept in process memory, behind one lock that is never held across an await.
#[derive(Default)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-written job behind (every write
        // is a single insert), so a poisoned lock is still consistent.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// Removes a job with its history: `one_by_one` for a DeleteJob (remembered with what its
    /// events matched), else for retention (raising the one mark).
    fn remove(&mut self, id: JobId, one_by_one: bool) -> Option<Job> {
        let job = self.jobs.remove(&id)?;
        let mut newest = 0;
        for (seq, _) in self.log.remove(&id).unwrap_or_default() {
            self.events.remove(&seq);
            newest = newest.max(seq);
        }
        if one_by_one {
            self.deleted
                .insert(newest, (job.tenant.clone(), job.labels.clone()));
        } else {
            self.removed_through = self.removed_through.max(newest);
            self.deleted = self.deleted.split_off(&(self.removed_through + 1));
        }
        if let Some(key) = &job.idempotency_key {
            self.keys.remove(&(job.tenant.clone(), key.clone()));
        }
        self.deliveries.retain(|_, d| d.job_id != id);
        Some(job)
    }

    /// Writes the delivery that storing `job` over `previous` asks for, under the same lock.
    fn outbox(&mut self, previous: Option<JobState>, job: &Job) {
        if let Some(new) = delivery_for(previous, job) {
            self.deliveries.insert(new.id, Delivery::pending(new, job));
        }
    }

    /// Appends `job` to its log and to the global event log.
    fn log(&mut self, job: &Job) {
        self.last_seq += 1;
        self.events.insert(self.last_seq, job.id);
        self.log
            .entry(job.id)
            .or_default()
            .push((self.last_seq, job.clone()));
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create(&self, job: &Job) -> Result<Created, StoreError> {
        let mut inner = self.write();
        if let Some(key) = &job.idempotency_key {
            let scoped = (job.tenant.clone(), key.clone());
            if let Some(existing) = inner.keys.get(&scoped).and_then(|id| inner.jobs.get(id)) {
                return Ok(Created::Existing(Box::new(existing.clone())));
            }
            inner.keys.insert(scoped, job.id);
        }
        inner.jobs.insert(job.id, job.clone());
        inner.log(job);
        inner.outbox(None, job);
        Ok(Created::New)
    }

    async fn save(&self, job: &Job) -> Result<(), StoreError> {
        let mut inner = self.write();
        let stored = inner
            .jobs
            .get_mut(&job.id)
            .ok_or(StoreError::Missing(job.id))?;
        // Nothing changes a terminal job's state again (as the other stores refuse it): a
        // writer that holds an older snapshot of a job ended meanwhile is refused.
        if job.version <= stored.version
            || (stored.state.is_terminal() && job.state != stored.state)
        {
            return Err(StoreError::StaleVersion {
                id: job.id,
                stored: stored.version,
                attempted: job.version,
            });
        }
        let previous = stored.state;
        *stored = job.clone();
        if job.logged_version == job.version {
            inner.log(job);
        }
        inner.outbox(Some(previous), job);
        Ok(())
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        Ok(self.read().jobs.get(&id).cloned())
    }

    async fn owned_by(&self, id: JobId, tenant: &str) -> Result<bool, StoreError> {
        Ok(self
            .read()
            .jobs
            .get(&id)
            .is_some_and(|job| job.tenant == tenant))
    }

    async fn get_owned(&self, id: JobId, tenant: &str) -> Result<Option<Job>, StoreError> {
        Ok(self
            .read()
            .jobs
            .get(&id)
            .filter(|job| job.tenant == tenant)
            .cloned())
    }

    async fn by_idempotency_key(&self, tenant: &str, key: &str) -> Result<Option<Job>, StoreError> {
        let inner = self.read();
        let scoped = (tenant.to_owned(), key.to_owned());
        Ok(inner
            .keys
            .get(&scoped)
            .and_then(|id| inner.jobs.get(id))
            .cloned())
    }

    async fn transitions(&self, id: JobId, after_version: i64) -> Result<Vec<Job>, StoreError> {
        Ok(self
            .read()
            .log
            .get(&id)
            .map(|log| {
                log.iter()
                    .filter(|(_, job)| job.version > after_version)
                    .map(|(_, job)| job.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<Job>, StoreError> {
        let inner = self.read();
        let newest_first: Box<dyn Iterator<Item = &Job>> = match query.before {
            Some(before) => Box::new(inner.jobs.range(..before).rev().map(|(_, job)| job)),
            None => Box::new(inner.jobs.values().rev()),
        };
        Ok(newest_first
            .filter(|job| query.matches(job))
            .take(query.limit)
            .cloned()
            .collect())
    }

    async fn events_after(
        &self,
        after_seq: i64,
        tenant: Option<&str>,
        labels: &BTreeMap<String, String>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        let inner = self.read();
        let deleted_matching = inner
            .deleted
            .range(after_seq.saturating_add(1)..)
            .filter(|(_, (job_tenant, job_labels))| {
                tenant.is_none_or(|tenant| tenant == job_tenant)
                    && labels.iter().all(|(k, v)| job_labels.get(k) == Some(v))
            })
            .map(|(seq, _)| *seq)
            .max()
            .unwrap_or(0);
        let mut page = EventPage {
            scanned_to: inner.last_seq,
            removed_through: inner.removed_through.max(deleted_matching),
            ..EventPage::default()
        };
        for (&seq, id) in inner.events.range(after_seq.saturating_add(1)..) {
            let Some((_, job)) = inner
                .log
                .get(id)
                .and_then(|log| log.iter().find(|(s, _)| *s == seq))
            else {
                return Err(StoreError::Corrupt(format!("event {seq} has no snapshot")));
            };
            if !in_tenant(job, tenant) || !has_labels(job, labels) {
                continue;
            }
            page.events.push((seq, job.clone()));
            if page.events.len() >= limit {
                page.scanned_to = seq;
                break;
            }
        }
        Ok(page)
    }

    async fn unfinished_at(
        &self,
        tenant: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<(i64, Vec<Job>), StoreError> {
        let inner = self.read();
        let jobs = inner
            .jobs
            .values()
            .filter(|job| !job.is_terminal() && in_tenant(job, tenant) && has_labels(job, labels))
            .cloned()
            .collect();
        Ok((inner.last_seq, jobs))
    }

    async fn delete(&self, id: JobId) -> Result<Deleted, StoreError> {
        let mut inner = self.write();
        match inner.jobs.get(&id) {
            None => Ok(Deleted::NotFound),
            Some(job) if !job.is_terminal() => Ok(Deleted::NotTerminal(Box::new(job.clone()))),
            Some(_) => {
                inner.remove(id, true);
                Ok(Deleted::Removed)
            }
        }
    }

    async fn unfinished(&self) -> Result<Vec<Job>, StoreError> {
        Ok(self
            .read()
            .jobs
            .values()
            .filter(|job| matches!(job.state, JobState::Queued | JobState::Running))
            .cloned()
            .collect())
    }

    async fn purge_finished(
        &self,
        ended_before: SystemTime,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let mut inner = self.write();
        let expired: Vec<JobId> = inner
            .jobs
            .values()
            .filter(|job| job.is_terminal() && job.end_time.is_some_and(|t| t < ended_before))
            .map(|job| job.id)
            .take(limit)
            .collect();
        for id in &expired {
            inner.remove(*id, false);
        }
        // Past the newest `REMEMBERED_DELETIONS`, deleted jobs are folded into the mark.
        let excess = inner
            .deleted
            .len()
            .saturating_sub(crate::store::REMEMBERED_DELETIONS);
        if let Some(forget_through) = excess.checked_sub(1)
            && let Some(&newest_forgotten) = inner.deleted.keys().nth(forget_through)
        {
            inner.removed_through = inner.removed_through.max(newest_forgotten);
            inner.deleted = inner.deleted.split_off(&(newest_forgotten + 1));
        }
        Ok(expired.len())
    }

    async fn deliveries(&self, id: JobId) -> Result<Vec<Delivery>, StoreError> {
        Ok(self
            .read()
            .deliveries
            .values()
            .filter(|d| d.job_id == id)
            .cloned()
            .collect())
    }

    async fn due_deliveries(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        let inner = self.read();
        let mut due: Vec<&Delivery> = inner
            .deliveries
            .values()
            .filter(|d| {
                d.state == DeliveryState::Pending
                    && d.next_attempt_at.is_some_and(|t| t <= now)
                    && !inner.deliveries.values().any(|e| {
                        e.job_id == d.job_id
                            && e.state == DeliveryState::Pending
                            && e.job_version < d.job_version
                    })
            })
            .collect();
        due.sort_by_key(|d| (d.next_attempt_at, d.id));
        due.into_iter()
            .take(limit)
            .map(|d| {
                let job = inner
                    .log
                    .get(&d.job_id)
                    .and_then(|log| log.iter().find(|(_, j)| j.version == d.job_version))
                    .map(|(_, job)| job.clone())
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!("delivery {} has no snapshot", d.id))
                    })?;
                Ok(DueDelivery {
                    delivery: d.clone(),
                    job,
                })
            })
            .collect()
    }

    async fn record_delivery_attempt(
        &self,
        id: Uuid,
        outcome: &AttemptOutcome,
    ) -> Result<Option<Delivery>, StoreError> {
        let mut inner = self.write();
        Ok(inner
            .deliveries
            .get_mut(&id)
            .filter(|d| d.state == DeliveryState::Pending)
            .map(|delivery| {
                apply_attempt(delivery, outcome);
                delivery.clone()
            }))
    }

    async fn pending_deliveries(&self) -> Result<usize, StoreError> {
        Ok(self
            .read()
            .deliveries
            .values()
            .filter(|d| d.state == DeliveryState::Pending)
            .count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[tokio::test]
    async fn memory_store_conforms() {
        conformance::run_all(|| async { MemoryStore::new() }).await;
    }
}
