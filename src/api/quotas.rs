//! Per-tenant quotas enforced at the edge: submissions per second (a token bucket per tenant)
//! and open watch streams (per connection and per tenant). The per-tenant queue quota lives in
//! the executor's scheduler, which knows when a job leaves the queue.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;
use tonic::{Code, Status};
use tonic_types::ErrorDetails;

use super::{Limits, status::ERROR_DOMAIN};

/// A sustained rate with a burst allowance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// The most tokens a bucket holds: how many calls may come at once after a quiet spell.
    pub burst: u32,
}

/// Submissions per second, per tenant.
#[derive(Debug, Default)]
pub struct SubmitRates {
    /// The rate of a tenant without its own; `None` for unlimited.
    default: Option<Rate>,
    per_tenant: BTreeMap<String, Rate>,
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl SubmitRates {
    /// Limits every tenant to `default` (unless `per_tenant` gives it its own rate).
    pub fn new(default: Option<Rate>, per_tenant: BTreeMap<String, Rate>) -> Self {
        Self {
            default,
            per_tenant,
            buckets: Mutex::default(),
        }
    }

    fn rate(&self, tenant: &str) -> Option<Rate> {
        self.per_tenant.get(tenant).copied().or(self.default)
    }

    fn buckets(&self) -> MutexGuard<'_, HashMap<Arc<str>, Bucket>> {
        // Each critical section is one arithmetic update: a poisoned lock is still consistent.
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a token from `tenant`'s bucket, or says how long until one is there.
    pub fn check(&self, tenant: &Arc<str>) -> Result<(), Status> {
        self.check_at(tenant, Instant::now())
    }

    fn check_at(&self, tenant: &Arc<str>, now: Instant) -> Result<(), Status> {
        let Some(rate) = self.rate(tenant) else {
            return Ok(());
        };
        let burst = f64::from(rate.burst.max(1));
        let mut buckets = self.buckets();
        let bucket = buckets.entry(Arc::clone(tenant)).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate.per_second).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = if rate.per_second > 0.0 {
            Duration::from_secs_f64(((1.0 - bucket.tokens) / rate.per_second).min(3600.0))
        } else {
            Duration::from_secs(3600)
        };
        drop(buckets);
        Err(rate_limited(tenant, rate, wait))
    }
}

/// A rate as a person reads it: `0.5`, `2`; one far from 1 in scientific notation (`1e-9`),
/// where Rust's `Display` would write out every zero.
fn rate_text(per_second: f64) -> String {
    if per_second != 0.0 && !(1e-3..1e9).contains(&per_second.abs()) {
        format!("{per_second:e}")
    } else {
        per_second.to_string()
    }
}

fn rate_limited(tenant: &str, rate: Rate, wait: Duration) -> Status {
    let details = ErrorDetails::with_error_info(
        "TENANT_RATE_LIMITED",
        ERROR_DOMAIN,
        HashMap::from([
            ("tenant".to_owned(), tenant.to_owned()),
            ("submits_per_second".to_owned(), rate_text(rate.per_second)),
        ]),
    );
    // Rounded up to whole milliseconds so that a client waiting exactly this long finds a token.
    let wait = Duration::from_millis(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX) + 1);
    super::status::retry_after(
        Code::ResourceExhausted,
        format!(
            "tenant {tenant} submits faster than its quota ({} a second, submits_per_second); \
             retry in {} ms",
            rate_text(rate.per_second),
            wait.as_millis()
        ),
        details,
        wait,
    )
}

/// Counts open watch streams per connection and per tenant.
#[derive(Debug)]
pub struct Watches {
    per_connection: usize,
    per_tenant: usize,
    open: Mutex<WatchCounts>,
}

#[derive(Debug, Default)]
struct WatchCounts {
    connections: HashMap<SocketAddr, usize>,
    tenants: HashMap<Arc<str>, usize>,
}

/// One open watch, counted until dropped (the stream ends, fails, or the client goes away).
#[derive(Debug)]
pub struct WatchPermit {
    watches: Arc<Watches>,
    connection: Option<SocketAddr>,
    tenant: Arc<str>,
}

impl Watches {
    /// Counts against `limits`' `max_watches_per_connection` and `max_watches_per_tenant`.
    pub fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            per_connection: limits.max_watches_per_connection,
            per_tenant: limits.max_watches_per_tenant,
            open: Mutex::default(),
        })
    }

    fn open(&self) -> MutexGuard<'_, WatchCounts> {
        // Each critical section is a few counter updates: a poisoned lock is still consistent.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more watch on `connection` (the peer's address; `None` when the transport
    /// does not say) by `tenant`, or refuses with RESOURCE_EXHAUSTED naming the limit.
    pub fn acquire(
        self: &Arc<Self>,
        connection: Option<SocketAddr>,
        tenant: &Arc<str>,
    ) -> Result<WatchPermit, Status> {
        let mut open = self.open();
        if let Some(addr) = connection
            && open.connections.get(&addr).copied().unwrap_or(0) >= self.per_connection
        {
            return Err(too_many(
                "max_watches_per_connection",
                self.per_connection,
                "on this connection",
            ));
        }
        if open.tenants.get(tenant).copied().unwrap_or(0) >= self.per_tenant {
            return Err(too_many(
                "max_watches_per_tenant",
                self.per_tenant,
                &format!("for tenant {tenant}"),
            ));
        }
        if let Some(addr) = connection {
            *open.connections.entry(addr).or_default() += 1;
        }
        *open.tenants.entry(Arc::clone(tenant)).or_default() += 1;
        Ok(WatchPermit {
            watches: Arc::clone(self),
            connection,
            tenant: Arc::clone(tenant),
        })
    }

    /// Watches open now by `tenant`.
    pub fn open_by_tenant(&self, tenant: &str) -> usize {
        self.open().tenants.get(tenant).copied().unwrap_or(0)
    }
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        let mut open = self.watches.open();
        if let Some(addr) = self.connection {
            decrement(&mut open.connections, &addr);
        }
        decrement(&mut open.tenants, &self.tenant);
    }
}

fn decrement<K: std::hash::Hash + Eq + ?Sized, Q: std::borrow::Borrow<K> + std::hash::Hash + Eq>(
    map: &mut HashMap<Q, usize>,
    key: &K,
) {
    if let Some(count) = map.get_mut(key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            map.remove(key);
        }
    }
}

fn too_many(limit_name: &str, limit: usize, scope: &str) -> Status {
    let details = ErrorDetails::with_error_info(
        "TOO_MANY_WATCHES",
        ERROR_DOMAIN,
        HashMap::from([("limit".to_owned(), limit_name.to_owned())]),
    );
    super::status::with_details(
        Code::ResourceExhausted,
        format!("{limit} watches are open {scope}, the most allowed ({limit_name}); close one"),
        details,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_far_from_one_are_written_in_scientific_notation() {
        assert_eq!(rate_text(0.5), "0.5");
        assert_eq!(rate_text(2.0), "2");
        assert_eq!(rate_text(1e-300), "1e-300");
        assert_eq!(rate_text(2.5e12), "2.5e12");
    }
    use tonic_types::StatusExt;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_the_rate() {
        let rates = SubmitRates::new(
            Some(Rate {
                per_second: 2.0,
                burst: 3,
            }),
            BTreeMap::new(),
        );
        let tenant: Arc<str> = Arc::from("a");
        let start = Instant::now();
        for _ in 0..3 {
            rates.check_at(&tenant, start).unwrap();
        }
        let refused = rates.check_at(&tenant, start).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        let retry = refused
            .get_details_retry_info()
            .unwrap()
            .retry_delay
            .unwrap();
        assert!(retry > Duration::from_millis(400) && retry <= Duration::from_millis(501));
        let pushback: u128 = refused
            .metadata()
            .get("grpc-retry-pushback-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("a pushback trailer");
        assert_eq!(
            pushback,
            retry.as_millis(),
            "the same delay for gRPC's retries"
        );
        rates.check_at(&Arc::from("b"), start).unwrap();
        let later = start + Duration::from_millis(501);
        rates.check_at(&tenant, later).unwrap();
        assert!(rates.check_at(&tenant, later).is_err());
    }

    #[test]
    fn watch_permits_count_until_dropped() {
        let limits = Limits {
            max_watches_per_connection: 2,
            max_watches_per_tenant: 3,
            ..Limits::default()
        };
        let watches = Watches::new(&limits);
        let conn: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let other: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let t: Arc<str> = Arc::from("t");
        let a = watches.acquire(Some(conn), &t).unwrap();
        let _b = watches.acquire(Some(conn), &t).unwrap();
        let full = watches.acquire(Some(conn), &t).unwrap_err();
        assert!(full.message().contains("max_watches_per_connection"));
        let _c = watches.acquire(Some(other), &t).unwrap();
        let full = watches.acquire(Some(other), &t).unwrap_err();
        assert!(full.message().contains("max_watches_per_tenant"));
        drop(a);
        assert_eq!(watches.open_by_tenant("t"), 2);
        watches.acquire(Some(conn), &t).unwrap();
    }
}
