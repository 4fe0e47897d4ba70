//! The delivery client's DNS resolver: the SSRF guard at the moment of connecting, so a name
//! that passed at Submit and later resolves to an internal address (DNS rebinding) still
//! cannot reach it.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::guard::{AllowList, is_internal, resolve};

/// The delivery client's DNS resolver: resolves with the system resolver, then drops every
/// internal address unless the name is on the allow list, so a connection can only be made
/// to an address that passed the guard at the moment of connecting.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    allow: Arc<AllowList>,
    timeout: Duration,
}

impl GuardedResolver {
    /// A resolver that lets `allow`'s hosts reach any address, giving up after `timeout`.
    pub fn new(allow: Arc<AllowList>, timeout: Duration) -> Self {
        Self { allow, timeout }
    }

    /// The addresses of `name` a webhook may connect to; an error when none is left.
    pub async fn lookup(&self, name: &str) -> Result<Vec<SocketAddr>, String> {
        let addrs = resolve(name, 0, self.timeout).await?;
        if self.allow.allows_name(name) {
            return Ok(addrs);
        }
        let total = addrs.len();
        let public: Vec<SocketAddr> = addrs.into_iter().filter(|a| !is_internal(a.ip())).collect();
        if public.is_empty() {
            return Err(format!(
                "{name} resolves only to internal addresses ({total} found); refused"
            ));
        }
        Ok(public)
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let resolver = self.clone();
        Box::pin(async move {
            let addrs = resolver.lookup(name.as_str()).await?;
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_resolver_drops_internal_addresses_unless_allowed() {
        let timeout = Duration::from_secs(5);
        let strict = GuardedResolver::new(Arc::new(AllowList::default()), timeout);
        let error = strict.lookup("localhost").await.unwrap_err();
        assert!(error.contains("internal"), "{error}");
        assert!(strict.lookup("127.0.0.1").await.is_err());

        let open = GuardedResolver::new(Arc::new(AllowList::new(["localhost:8080"])), timeout);
        let addrs = open.lookup("localhost").await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
    }
}
