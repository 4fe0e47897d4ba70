//! Page size and page token handling shared by `Jobs/ListJobs` and
//! `Operations/ListOperations`: both page over the store's newest-first list, and a page token
//! is the id of the last job of the previous page.

use std::sync::Arc;

use super::Limits;
use crate::{
    executor::Executor,
    job::{FieldViolation, Job, JobId},
    store::{ListQuery, StoreError},
};

/// A validated page request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Page {
    /// At most this many jobs.
    pub limit: usize,
    /// Only jobs older than this one (the previous page's last).
    pub before: Option<JobId>,
}

impl Page {
    /// Validates `page_size` and `page_token`, adding a violation per bad field; `method` names
    /// the call whose earlier response a token must come from.
    pub fn parse(
        page_size: i32,
        page_token: &str,
        limits: &Limits,
        method: &str,
        violations: &mut Vec<FieldViolation>,
    ) -> Self {
        let limit = match usize::try_from(page_size) {
            Ok(0) => limits.default_page_size,
            Ok(n) if n <= limits.max_page_size => n,
            _ => {
                violations.push(FieldViolation::new(
                    "page_size",
                    format!("must be between 0 and {}", limits.max_page_size),
                ));
                0
            }
        };
        let before = if page_token.is_empty() {
            None
        } else {
            match page_token.parse::<JobId>() {
                Ok(id) => Some(id),
                Err(_) => {
                    violations.push(FieldViolation::new(
                        "page_token",
                        format!("is not a token from a previous {method} response"),
                    ));
                    None
                }
            }
        };
        Self { limit, before }
    }

    /// Reads this page of `query` (whose `before` and `limit` it sets) and the token of the
    /// next one, empty when there are no more jobs. Running jobs show their newest progress
    /// (see [`crate::events::Hub::with_newest_progress`]).
    pub async fn read(
        self,
        executor: &Executor,
        mut query: ListQuery,
    ) -> Result<(Vec<Arc<Job>>, String), StoreError> {
        query.before = self.before;
        // One more than asked tells whether another page exists.
        query.limit = self.limit + 1;
        let mut jobs = executor.store().list(&query).await?;
        let next_page_token = if jobs.len() > self.limit {
            jobs.truncate(self.limit);
            jobs.last()
                .map(|job| job.id.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let hub = executor.hub();
        let jobs = jobs
            .into_iter()
            .map(|job| hub.with_newest_progress(job))
            .collect();
        Ok((jobs, next_page_token))
    }
}
