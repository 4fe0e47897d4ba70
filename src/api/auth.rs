//! Authentication and tenants at the edge.
//!
//! [`Authenticator`] is a tonic interceptor on `longrun.v1.Jobs` and
//! `google.longrunning.Operations` (not on health or reflection: probes and discovery need no
//! key). It reads `authorization: Bearer <key>`, hashes the key with SHA-256 and looks the hash
//! up among the configured ones: the server never holds a key itself, only its hash, and the
//! lookup compares hashes, so how long it takes says nothing about how close a guess was. The
//! tenant found goes into the request's extensions as a [`Tenant`]; the handlers read it with
//! [`tenant`] and scope everything they do to it.

use std::{collections::HashMap, sync::Arc};

use sha2::{Digest, Sha256};
use tonic::{Request, Status, metadata::MetadataMap, service::Interceptor};

use super::status::job_not_found;
use crate::{
    executor::Executor,
    job::{DEFAULT_TENANT, Job, JobId},
};

/// The tenant a request was authenticated as; set by [`Authenticator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub Arc<str>);

/// The caller's tenant. A request that did not pass an [`Authenticator`] (a service embedded
/// without one) is the [`DEFAULT_TENANT`]'s, as every request is when authentication is off.
pub fn tenant<T>(request: &Request<T>) -> Arc<str> {
    request
        .extensions()
        .get::<Tenant>()
        .map_or_else(|| Arc::from(DEFAULT_TENANT), |t| Arc::clone(&t.0))
}

/// The SHA-256 of an API key, as configured (`key_sha256`) and as looked up.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// API keys by the SHA-256 of the key.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    by_hash: HashMap<[u8; 32], Arc<str>>,
}

/// Why an API key entry of the config is refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// `key_sha256` is not 64 hex digits.
    #[error("key_sha256 of tenant {tenant:?} is not a SHA-256 in hex (64 hex digits)")]
    BadHash {
        /// The entry's tenant.
        tenant: String,
    },
    /// The tenant name is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("tenant name {0:?} must be 1 to 64 characters of letters, digits, '.', '_' or '-'")]
    BadTenant(String),
    /// Two entries carry the same key.
    #[error("two API keys have the same hash (tenants {0:?} and {1:?})")]
    Duplicate(String, String),
}

/// Whether `name` is a usable tenant name: kept simple so it is safe in logs, metrics and
/// error details.
pub fn valid_tenant(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl ApiKeys {
    /// Builds the table from `(tenant, hex sha256)` entries, refusing malformed ones.
    pub fn from_hashes<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, KeyError> {
        let mut by_hash: HashMap<[u8; 32], Arc<str>> = HashMap::new();
        for (tenant, hex_hash) in entries {
            if !valid_tenant(tenant) {
                return Err(KeyError::BadTenant(tenant.to_owned()));
            }
            let mut hash = [0u8; 32];
            hex::decode_to_slice(hex_hash.trim(), &mut hash).map_err(|_| KeyError::BadHash {
                tenant: tenant.to_owned(),
            })?;
            if let Some(other) = by_hash.insert(hash, Arc::from(tenant)) {
                return Err(KeyError::Duplicate(other.to_string(), tenant.to_owned()));
            }
        }
        Ok(Self { by_hash })
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The tenant of `key`, if it is one of these.
    pub fn tenant_of(&self, key: &str) -> Option<&Arc<str>> {
        self.by_hash.get(&hash_key(key))
    }
}

/// The interceptor that authenticates every call of the services it wraps. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Authenticator {
    /// `None` when authentication is off: every call is the default tenant's.
    keys: Option<Arc<ApiKeys>>,
    default_tenant: Tenant,
}

impl Authenticator {
    /// Requires one of `keys` on every call.
    pub fn with_keys(keys: ApiKeys) -> Self {
        Self {
            keys: Some(Arc::new(keys)),
            default_tenant: Tenant(Arc::from(DEFAULT_TENANT)),
        }
    }

    /// Lets every call in, as the [`DEFAULT_TENANT`].
    pub fn off() -> Self {
        Self {
            keys: None,
            default_tenant: Tenant(Arc::from(DEFAULT_TENANT)),
        }
    }

    /// The tenant `metadata` authenticates as.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Tenant, Status> {
        let Some(keys) = &self.keys else {
            return Ok(self.default_tenant.clone());
        };
        let mut values = metadata.get_all("authorization").iter();
        let Some(value) = values.next() else {
            return Err(Status::unauthenticated(
                "this call needs an API key: send the metadata `authorization: Bearer <key>`",
            ));
        };
        // Which of several keys counts would depend on who added which (a client, a proxy):
        // refused rather than guessed.
        if values.next().is_some() {
            return Err(Status::unauthenticated(
                "this call carries more than one `authorization` metadata entry; send one",
            ));
        }
        // One answer for every other failure (not text, not Bearer, unknown key), so a caller
        // learns nothing about which part was wrong.
        let refused = || Status::unauthenticated("the API key is not valid");
        let value = value.to_str().map_err(|_| refused())?;
        let (scheme, key) = value.split_once(' ').ok_or_else(refused)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(refused());
        }
        let key = key.trim();
        if key.is_empty() {
            return Err(refused());
        }
        keys.tenant_of(key)
            .map(|tenant| Tenant(Arc::clone(tenant)))
            .ok_or_else(refused)
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let tenant = self.authenticate(request.metadata()).inspect_err(|status| {
            // Debug only: a client without a key would otherwise flood the log.
            tracing::debug!(peer = ?request.remote_addr(), reason = status.message(), "call refused");
        })?;
        request.extensions_mut().insert(tenant);
        Ok(request)
    }
}

/// Whether `job` is visible to `tenant`.
pub fn owns(tenant: &str, job: &Job) -> bool {
    job.tenant == tenant
}

/// Succeeds when job `id` exists and belongs to `tenant`; otherwise the very NOT_FOUND an
/// unknown id gets, so another tenant's ids cannot even be confirmed to exist.
///
/// A job's tenant never changes, so a snapshot held in memory (a job queued, run or watched)
/// answers without a store read; the call that follows still reports a job removed meanwhile.
/// Otherwise the store answers without reading the job ([`crate::store::Store::owned_by`]):
/// checked before a job is read, a call for another tenant's job takes no longer for a large
/// job than for a small one.
pub async fn check_owner(executor: &Executor, tenant: &str, id: JobId) -> Result<(), Status> {
    executor.until_recovered().await?;
    let owned = match executor.in_memory(id) {
        Some(live) => owns(tenant, &live),
        None => executor.store().owned_by(id, tenant).await?,
    };
    if owned {
        Ok(())
    } else {
        Err(job_not_found(id))
    }
}

/// Job `id`'s newest snapshot (see [`crate::events::current`]) if it belongs to `tenant`;
/// otherwise the NOT_FOUND of an unknown id. One read, with the tenant in the query
/// ([`crate::store::Store::get_owned`]): another tenant's job is never read, so the answer
/// does not come slower for a large one.
pub async fn current_owned(executor: &Executor, tenant: &str, id: JobId) -> Result<Job, Status> {
    executor.until_recovered().await?;
    let stored = executor
        .store()
        .get_owned(id, tenant)
        .await?
        .ok_or_else(|| job_not_found(id))?;
    Ok(crate::events::newest_of(stored, executor.hub()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: &str) -> MetadataMap {
        let mut map = MetadataMap::new();
        map.insert("authorization", value.parse().unwrap());
        map
    }

    #[test]
    fn keys_are_looked_up_by_hash() {
        let hash = hex::encode(hash_key("s3cret"));
        let keys = ApiKeys::from_hashes([("acme", hash.as_str())]).unwrap();
        let auth = Authenticator::with_keys(keys);
        let tenant = auth.authenticate(&metadata("Bearer s3cret")).unwrap();
        assert_eq!(&*tenant.0, "acme");
        assert_eq!(
            &*auth.authenticate(&metadata("bearer  s3cret")).unwrap().0,
            "acme"
        );
        for bad in [
            "Bearer wrong",
            "Basic s3cret",
            "s3cret",
            "Bearer ",
            "Bearer",
        ] {
            let status = auth.authenticate(&metadata(bad)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad}");
            assert_eq!(status.message(), "the API key is not valid", "{bad}");
        }
        let missing = auth.authenticate(&MetadataMap::new()).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        // Two entries, even both valid: refused, whichever comes first.
        for second in ["Bearer s3cret", "Bearer wrong"] {
            let mut two = metadata("Bearer s3cret");
            two.append("authorization", second.parse().unwrap());
            let status = auth.authenticate(&two).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{second}");
            assert!(status.message().contains("more than one"), "{status:?}");
        }
    }

    #[test]
    fn malformed_entries_are_refused() {
        let hash = hex::encode(hash_key("k"));
        assert!(matches!(
            ApiKeys::from_hashes([("acme", "abc")]),
            Err(KeyError::BadHash { .. })
        ));
        assert!(matches!(
            ApiKeys::from_hashes([("a b", hash.as_str())]),
            Err(KeyError::BadTenant(_))
        ));
        assert!(matches!(
            ApiKeys::from_hashes([("a", hash.as_str()), ("b", hash.as_str())]),
            Err(KeyError::Duplicate(..))
        ));
    }

    #[test]
    fn off_means_the_default_tenant() {
        let tenant = Authenticator::off()
            .authenticate(&MetadataMap::new())
            .unwrap();
        assert_eq!(&*tenant.0, DEFAULT_TENANT);
    }
}
