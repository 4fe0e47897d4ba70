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
            // A server configured with small pages keeps its default within them.
            Ok(0) => limits.default_page_size.min(limits.max_page_size),
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

/// Room in a response for what is not a page item (the token, framing).
const RESPONSE_OVERHEAD: usize = 1024;

/// Shortens a page whose items (one per job of `jobs`, in order) would not fit in one response
/// of `max_message_bytes`, ending it early with a token after its last item: a client reads
/// the rest on the next page, instead of every read of the page failing. `size` is an item's
/// encoded size. A page keeps at least one item (a single job is bounded when it is
/// submitted).
pub(super) fn fit_message<T>(
    items: &mut Vec<T>,
    jobs: &[Arc<Job>],
    next_page_token: &mut String,
    max_message_bytes: usize,
    size: impl Fn(&T) -> usize,
) {
    let budget = max_message_bytes.saturating_sub(RESPONSE_OVERHEAD);
    let mut total = 0;
    let fits = items
        .iter()
        .position(|item| {
            // Each item also takes a tag and a length prefix.
            total += size(item) + 11;
            total > budget
        })
        .unwrap_or(items.len())
        .max(1);
    if fits < items.len() {
        items.truncate(fits);
        if let Some(last) = jobs.get(fits - 1) {
            *next_page_token = last.id.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(n: usize) -> Vec<Arc<Job>> {
        (0..n)
            .map(|_| {
                Arc::new(Job::new(
                    JobId::generate(),
                    crate::job::NewJob::default(),
                    1,
                    std::time::SystemTime::now(),
                ))
            })
            .collect()
    }

    #[test]
    fn a_default_page_stays_within_a_smaller_configured_maximum() {
        let limits = Limits {
            max_page_size: 10,
            ..Limits::default()
        };
        let mut violations = Vec::new();
        let page = Page::parse(0, "", &limits, "ListJobs", &mut violations);
        assert_eq!((page.limit, violations.len()), (10, 0));
        let page = Page::parse(11, "", &limits, "ListJobs", &mut violations);
        assert_eq!(page.limit, 0);
        assert_eq!(violations[0].field, "page_size");
    }

    #[test]
    fn a_page_too_large_for_one_message_ends_early_with_a_token_after_its_last_item() {
        let three = jobs(3);
        let mut items = vec![600, 600, 600];
        let mut token = String::new();
        fit_message(&mut items, &three, &mut token, 1024 + 1300, |i| *i);
        assert_eq!(items, [600, 600]);
        assert_eq!(token, three[1].id.to_string());

        let two = jobs(2);
        let mut one = vec![10_000, 1];
        let mut token = "unchanged".to_owned();
        fit_message(&mut one, &two, &mut token, 2048, |i| *i);
        assert_eq!(one, [10_000], "at least one item");
        assert_eq!(token, two[0].id.to_string());

        let mut small = vec![10, 10];
        let mut token = "next".to_owned();
        fit_message(&mut small, &two, &mut token, 4096, |i| *i);
        assert_eq!(small.len(), 2);
        assert_eq!(token, "next", "a page that fits is left as it is");
    }
}
