//! Webhooks: the durable outbox's delivery side. The store writes a delivery row in the same
//! transaction as each state a job's webhook subscribes to (see [`crate::job::delivery_for`]);
//! the [`worker`] sends each one as a signed JSON POST, retries with exponential backoff and
//! full jitter, and records every attempt, so that a delivery is made at least once, across
//! crashes, or ends DEAD with its last error on the job. Receivers deduplicate by delivery id.
//!
//! [`WebhookPolicy`] is the Submit-time check: URL form, secret, and the SSRF guard
//! ([`guard`]), which the worker's DNS resolver applies again at every connection.

pub mod body;
pub mod guard;
pub mod resolver;
pub mod sign;
pub mod worker;

use std::{fmt, sync::Arc, time::Duration};

use crate::job::{FieldViolation, WebhookEvents, WebhookSpec};

pub use guard::{AllowList, UrlRefused, is_internal};
pub use resolver::GuardedResolver;
pub use worker::{WebhookWorker, WorkerError};

/// How long Submit waits for a webhook host's DNS answer before refusing it.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest webhook secret accepted, in bytes.
pub const MAX_SECRET_BYTES: usize = 1024;

/// The `[webhooks]` settings, each with its documented default.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// The signing secret of webhooks whose Submit gives none [default: none, so every
    /// webhook must bring its own].
    pub secret: Option<String>,
    /// Hosts webhooks may reach although they resolve to internal addresses: host names or
    /// IP literals, optionally `host:port` [default: none].
    pub allow_hosts: Vec<String>,
    /// Attempts per delivery, the first included, before it is marked DEAD [default: 8].
    pub max_attempts: u32,
    /// The wait before the second attempt; each later one doubles it, and every wait is drawn
    /// at random below that ("full jitter") [default: 1s].
    pub backoff: Duration,
    /// The longest wait between attempts [default: 10min].
    pub backoff_max: Duration,
    /// How long one attempt may take, connecting included [default: 10s].
    pub timeout: Duration,
    /// Deliveries attempted at once [default: 16].
    pub concurrency: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            secret: None,
            allow_hosts: Vec::new(),
            max_attempts: 8,
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(600),
            timeout: Duration::from_secs(10),
            concurrency: 16,
        }
    }
}

impl fmt::Debug for WebhookConfig {
    // By hand, so that the secret never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("allow_hosts", &self.allow_hosts)
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("backoff_max", &self.backoff_max)
            .field("timeout", &self.timeout)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

/// A webhook whose form and secret passed [`WebhookPolicy::validate`]; the guard is next.
#[derive(Debug, Clone)]
pub struct CheckedWebhook {
    parsed: reqwest::Url,
    spec: WebhookSpec,
}

/// What Submit checks of a webhook: the URL's form, that it does not reach an internal
/// address (unless allowed), and that a signing secret is known.
#[derive(Clone, Default)]
pub struct WebhookPolicy {
    default_secret: Option<String>,
    allow: Arc<AllowList>,
}

impl fmt::Debug for WebhookPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookPolicy")
            .field("default_secret", &self.default_secret.is_some())
            .field("allow", &self.allow)
            .finish()
    }
}

impl WebhookPolicy {
    /// The policy of `config`.
    pub fn new(config: &WebhookConfig) -> Self {
        Self {
            default_secret: config.secret.clone().filter(|s| !s.is_empty()),
            allow: Arc::new(AllowList::new(&config.allow_hosts)),
        }
    }

    /// The webhook to store, or every violation, each naming its field under `webhook.`:
    /// [`WebhookPolicy::validate`], then, if that passed, [`WebhookPolicy::guard`].
    pub async fn check(
        &self,
        url: &str,
        secret: &str,
        events: WebhookEvents,
    ) -> Result<WebhookSpec, Vec<FieldViolation>> {
        let checked = self.validate(url, secret, events)?;
        self.guard(checked).await.map_err(|v| vec![v])
    }

    /// The checks that need no network: the URL's form, and that a secret is known (the
    /// request's, else the server's default). Every violation names its field.
    pub fn validate(
        &self,
        url: &str,
        secret: &str,
        events: WebhookEvents,
    ) -> Result<CheckedWebhook, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        let secret = if secret.is_empty() {
            self.default_secret.clone()
        } else {
            Some(secret.to_owned())
        };
        match &secret {
            None => violations.push(FieldViolation::new(
                "webhook.secret",
                "is required: this server has no default webhook secret ([webhooks] secret)",
            )),
            Some(s) if s.len() > MAX_SECRET_BYTES => violations.push(FieldViolation::new(
                "webhook.secret",
                format!("must be at most {MAX_SECRET_BYTES} bytes"),
            )),
            Some(_) => {}
        }
        let parsed = guard::parse_url(url)
            .map_err(|refused| {
                violations.push(FieldViolation::new("webhook.url", refused.to_string()))
            })
            .ok();
        match (parsed, secret) {
            (Some(parsed), Some(secret)) if violations.is_empty() => Ok(CheckedWebhook {
                spec: WebhookSpec {
                    // As parsed: what is sent, and what a retried Submit is compared by.
                    url: parsed.as_str().to_owned(),
                    secret,
                    events,
                },
                parsed,
            }),
            _ => Err(violations),
        }
    }

    /// The SSRF guard: resolves the host (within [`RESOLVE_TIMEOUT`]) and refuses it, naming
    /// `webhook.url`, if any address it resolves to is internal and the allow list does not
    /// name it.
    pub async fn guard(&self, checked: CheckedWebhook) -> Result<WebhookSpec, FieldViolation> {
        guard::check_url(&checked.parsed, &self.allow, RESOLVE_TIMEOUT)
            .await
            .map_err(|refused| FieldViolation::new("webhook.url", refused.to_string()))?;
        Ok(checked.spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_secret_is_required_from_the_request_or_the_server() {
        let config = WebhookConfig {
            allow_hosts: vec!["127.0.0.1".into()],
            ..WebhookConfig::default()
        };
        let strict = WebhookPolicy::new(&config);
        let url = "http://127.0.0.1:1/hook";
        let err = strict
            .check(url, "", WebhookEvents::Terminal)
            .await
            .unwrap_err();
        assert_eq!(err[0].field, "webhook.secret");
        let spec = strict.check(url, "own", WebhookEvents::All).await.unwrap();
        assert_eq!(spec.secret, "own");
        // Kept as parsed: what is sent, shown, and compared when a Submit is retried.
        let spec = strict
            .check("HTTP://127.0.0.1:1/a/../hook", "own", WebhookEvents::All)
            .await
            .unwrap();
        assert_eq!(spec.url, url);

        let defaulted = WebhookPolicy::new(&WebhookConfig {
            secret: Some("server".into()),
            ..config
        });
        let spec = defaulted
            .check(url, "", WebhookEvents::Terminal)
            .await
            .unwrap();
        assert_eq!(spec.secret, "server");
        assert!(!format!("{defaulted:?}").contains("server\""));
    }

    #[tokio::test]
    async fn bad_urls_name_the_url_field() {
        let policy = WebhookPolicy::new(&WebhookConfig {
            secret: Some("s".into()),
            ..WebhookConfig::default()
        });
        for url in ["", "nope", "http://10.0.0.1/", "http://localhost/"] {
            let err = policy
                .check(url, "", WebhookEvents::Terminal)
                .await
                .unwrap_err();
            assert_eq!(err.len(), 1);
            assert_eq!(err[0].field, "webhook.url", "{url}");
        }
    }
}
