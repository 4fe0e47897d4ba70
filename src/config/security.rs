//! The security-related parts of the configuration: `[auth]` (API keys), `[quotas]`
//! (per-tenant limits), the TLS files and the `--auth` switch. See `docs/security.md`.

use std::{collections::BTreeMap, path::PathBuf};

use serde::Deserialize;

use crate::api::quotas::Rate;

/// On or off, for flags that override a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// One API key of the `[auth]` table: `{ tenant = "acme", key_sha256 = "<hex>" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// The tenant the key authenticates as.
    pub tenant: String,
    /// The SHA-256 of the key, in hex (`longrun hash-key` prints it): the key itself is never
    /// written down on the server.
    pub key_sha256: String,
}

/// The `[auth]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Whether API keys are required [default: off on a loopback listen address, on otherwise].
    pub enabled: Option<bool>,
    /// The API keys.
    pub keys: Vec<KeyEntry>,
}

/// One tenant's quotas, in `[quotas]` (every tenant's default) or `[quotas.tenants.NAME]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantQuota {
    /// Jobs the tenant may have waiting in the queue [default: no limit but
    /// max_queue_length].
    pub max_queued_jobs: Option<usize>,
    /// Submits a second, sustained [default: no limit].
    pub submits_per_second: Option<f64>,
    /// Submits at once after a quiet spell [default: submits_per_second rounded up, at least 1].
    pub submit_burst: Option<u32>,
}

impl TenantQuota {
    pub(super) fn or(&self, fallback: &TenantQuota) -> TenantQuota {
        TenantQuota {
            max_queued_jobs: self.max_queued_jobs.or(fallback.max_queued_jobs),
            submits_per_second: self.submits_per_second.or(fallback.submits_per_second),
            submit_burst: self.submit_burst.or(fallback.submit_burst),
        }
    }

    pub(super) fn rate(&self) -> Option<Rate> {
        let per_second = self.submits_per_second?;
        // Kept as given: `serve` refuses a rate that is not above 0 or a burst of 0, naming it.
        let burst = self
            .submit_burst
            .unwrap_or_else(|| per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
        Some(Rate { per_second, burst })
    }
}

/// The `[quotas]` table: defaults for every tenant, and per-tenant overrides.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaSettings {
    /// Every tenant's quotas, unless overridden.
    #[serde(flatten)]
    pub default: TenantQuota,
    /// Per-tenant overrides; a field left out falls back to the default.
    pub tenants: BTreeMap<String, TenantQuota>,
}

/// Authentication, resolved.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Whether API keys are required.
    pub enabled: bool,
    /// The configured keys (hashes), checked when the server starts.
    pub keys: Vec<KeyEntry>,
}

/// The PEM labels a certificate is written under.
pub const PEM_CERTIFICATE: &[&str] = &["CERTIFICATE"];
/// The PEM labels a private key is written under (PKCS#8, PKCS#1 RSA, SEC1 EC).
pub const PEM_PRIVATE_KEY: &[&str] = &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"];

/// Whether `pem` holds a block under one of `labels`: a file given for a certificate that
/// holds none (a key, an empty file) is named as such, rather than failing the TLS setup with
/// a message about something else.
fn holds_pem(pem: &[u8], labels: &[&str]) -> bool {
    let text = String::from_utf8_lossy(pem);
    labels
        .iter()
        .any(|label| text.contains(&format!("-----BEGIN {label}-----")))
}

/// Reads the PEM file at `path`, which must hold a block under one of `labels` (`what` it
/// holds, for the message): the error says which of the two went wrong, for the caller to
/// prefix with the setting or flag that named the file.
pub fn read_pem(path: &std::path::Path, labels: &[&str], what: &str) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if holds_pem(&pem, labels) {
        Ok(pem)
    } else {
        Err(format!("{} holds no PEM {what}", path.display()))
    }
}

/// TLS, resolved: PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}
