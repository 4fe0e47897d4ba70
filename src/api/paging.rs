//! Page size and page token handling shared by `Jobs/ListJobs` and
//! `Operations/ListOperations`: both page over the store's newest-first list. A page token
//! names the last job of the previous page and is bound to the query it came from: a token
//! used with another filter, another method or another tenant, or altered, is refused rather
//! than silently giving some other page.

use std::sync::Arc;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};

use super::Limits;
use crate::{
    executor::Executor,
    job::{FieldViolation, Job, JobId},
    store::{ListQuery, StoreError},
};

/// How much of the digest a token carries: enough that a token from another query, or an
/// edited one, is caught; not a secret (a client could forge one for its own queries, which
/// only reads what it may read anyway).
const CHECK_BYTES: usize = 8;

/// A validated page request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Page {
    /// At most this many jobs.
    pub limit: usize,
    /// Only jobs older than this one (the previous page's last).
    pub before: Option<JobId>,
    /// The digest of the query's parts that must not change from page to page.
    scope: [u8; 32],
}

/// The digest of what a query's pages share: each part is length-prefixed, so that parts
/// cannot run into each other.
pub(super) fn scope<'a>(parts: impl IntoIterator<Item = &'a str>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().into()
}

fn check(scope: &[u8; 32], id: &JobId) -> [u8; CHECK_BYTES] {
    let digest = Sha256::new()
        .chain_update(scope)
        .chain_update(id.as_uuid().as_bytes())
        .finalize();
    let mut check = [0; CHECK_BYTES];
    check.copy_from_slice(&digest[..CHECK_BYTES]);
    check
}

impl Page {
    /// Validates `page_size` and `page_token`, adding a violation per bad field; `method` names
    /// the call whose earlier response a token must come from.
    pub fn parse(
        page_size: i32,
        page_token: &str,
        scope: [u8; 32],
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
            let id = Self::token_id(page_token, &scope);
            if id.is_none() {
                violations.push(FieldViolation::new(
                    "page_token",
                    format!(
                        "is not a token from a previous {method} response with the same \
                         filter (only page_size may change from page to page)"
                    ),
                ));
            }
            id
        };
        Self {
            limit,
            before,
            scope,
        }
    }

    /// The job a token names, if it is a token this query gave.
    fn token_id(token: &str, scope: &[u8; 32]) -> Option<JobId> {
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        let (id, given) = bytes.split_at_checked(16)?;
        let id = JobId::from(uuid::Uuid::from_slice(id).ok()?);
        (given == check(scope, &id)).then_some(id)
    }

    /// The token of the page after the one that ends with `last`.
    pub fn token_after(&self, last: &JobId) -> String {
        let mut bytes = Vec::with_capacity(16 + CHECK_BYTES);
        bytes.extend_from_slice(last.as_uuid().as_bytes());
        bytes.extend_from_slice(&check(&self.scope, last));
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Reads this page of `query` (whose `before` and `limit` it sets) and the token of the
    /// next one, empty when there are no more jobs. Running jobs show their newest progress
    /// (see [`crate::events::Hub::with_newest_progress`]).
    async fn read(
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
                .map(|job| self.token_after(&job.id))
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

    /// Reads this page of `query` as response items (`item` of each job), shortened where
    /// they would not fit in one response of `max_message_bytes` (see [`fit_message`]), and
    /// the token of the next page.
    pub async fn read_items<T: prost::Message>(
        self,
        executor: &Executor,
        query: ListQuery,
        max_message_bytes: usize,
        item: impl Fn(&Job) -> T,
    ) -> Result<(Vec<T>, String), StoreError> {
        let (jobs, mut next_page_token) = self.read(executor, query).await?;
        let mut items: Vec<T> = jobs.iter().map(|job| item(job)).collect();
        fit_message(
            &self,
            &mut items,
            &jobs,
            &mut next_page_token,
            max_message_bytes,
            T::encoded_len,
        );
        Ok((items, next_page_token))
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
    page: &Page,
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
            *next_page_token = page.token_after(&last.id);
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

    fn first_page(limits: &Limits) -> Page {
        let mut violations = Vec::new();
        let page = Page::parse(
            0,
            "",
            scope(["ListJobs"]),
            limits,
            "ListJobs",
            &mut violations,
        );
        assert!(violations.is_empty());
        page
    }

    #[test]
    fn a_default_page_stays_within_a_smaller_configured_maximum() {
        let limits = Limits {
            max_page_size: 10,
            ..Limits::default()
        };
        assert_eq!(first_page(&limits).limit, 10);
        let mut violations = Vec::new();
        let page = Page::parse(
            11,
            "",
            scope(["ListJobs"]),
            &limits,
            "ListJobs",
            &mut violations,
        );
        assert_eq!(page.limit, 0);
        assert_eq!(violations[0].field, "page_size");
    }

    #[test]
    fn a_token_reads_back_only_in_the_query_it_came_from_and_unaltered() {
        let limits = Limits::default();
        let id = JobId::generate();
        let token = first_page(&limits).token_after(&id);
        let parse = |token: &str, scope: [u8; 32]| {
            let mut violations = Vec::new();
            let page = Page::parse(0, token, scope, &limits, "ListJobs", &mut violations);
            (page.before, violations.len())
        };
        assert_eq!(parse(&token, scope(["ListJobs"])), (Some(id), 0));
        assert_eq!(parse(&token, scope(["ListJobs", "label"])).1, 1);
        assert_eq!(parse(&token, scope(["ListOperations"])).1, 1);
        // Any one character changed, the id's or the check's, is caught.
        for i in 0..token.len() {
            let mut altered = token.clone().into_bytes();
            altered[i] = if altered[i] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(altered).unwrap();
            assert_eq!(parse(&altered, scope(["ListJobs"])).1, 1, "{altered}");
        }
        // The bare job ids older servers gave are not tokens.
        assert_eq!(parse(&id.to_string(), scope(["ListJobs"])).1, 1);
        // Parts cannot run into each other.
        assert_ne!(scope(["ab", "c"]), scope(["a", "bc"]));
    }

    #[test]
    fn a_page_too_large_for_one_message_ends_early_with_a_token_after_its_last_item() {
        let page = first_page(&Limits::default());
        let three = jobs(3);
        let mut items = vec![600, 600, 600];
        let mut token = String::new();
        fit_message(&page, &mut items, &three, &mut token, 1024 + 1300, |i| *i);
        assert_eq!(items, [600, 600]);
        assert_eq!(token, page.token_after(&three[1].id));

        let two = jobs(2);
        let mut one = vec![10_000, 1];
        let mut token = "unchanged".to_owned();
        fit_message(&page, &mut one, &two, &mut token, 2048, |i| *i);
        assert_eq!(one, [10_000], "at least one item");
        assert_eq!(token, page.token_after(&two[0].id));

        let mut small = vec![10, 10];
        let mut token = "next".to_owned();
        fit_message(&page, &mut small, &two, &mut token, 4096, |i| *i);
        assert_eq!(small.len(), 2);
        assert_eq!(token, "next", "a page that fits is left as it is");
    }
}
