//! An in-memory [`Store`]: for tests and `--store memory`. Nothing survives a restart.

use std::{
    collections::{BTreeMap, HashMap},
    sync::RwLock,
    time::SystemTime,
};

use async_trait::async_trait;

use super::{Created, Deleted, EventPage, ListQuery, Store, StoreError, has_labels, in_tenant};
use crate::job::{Job, JobId, JobState};

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
    removed_through: i64,
    /// Idempotency keys by tenant, then key.
    keys: HashMap<(String, String), JobId>,
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
    fn remove(&mut self, id: JobId) -> Option<Job> {
        let job = self.jobs.remove(&id)?;
        for (seq, _) in self.log.remove(&id).unwrap_or_default() {
            self.events.remove(&seq);
            self.removed_through = self.removed_through.max(seq);
        }
        if let Some(key) = &job.idempotency_key {
            self.keys.remove(&(job.tenant.clone(), key.clone()));
        }
        Some(job)
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
        Ok(Created::New)
    }

    async fn save(&self, job: &Job) -> Result<(), StoreError> {
        let mut inner = self.write();
        let stored = inner
            .jobs
            .get_mut(&job.id)
            .ok_or(StoreError::Missing(job.id))?;
        if job.version <= stored.version {
            return Err(StoreError::StaleVersion {
                id: job.id,
                stored: stored.version,
                attempted: job.version,
            });
        }
        *stored = job.clone();
        if job.logged_version == job.version {
            inner.log(job);
        }
        Ok(())
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        Ok(self.read().jobs.get(&id).cloned())
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
        let mut page = EventPage {
            scanned_to: inner.last_seq,
            removed_through: inner.removed_through,
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
                inner.remove(id);
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
            inner.remove(*id);
        }
        Ok(expired.len())
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
