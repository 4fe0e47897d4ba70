//! The server's configuration: one struct, filled from defaults, then an optional TOML file,
//! then command-line flags; the flags an operator sets per deployment (addresses, store,
//! TLS, auth) also read a `LONGRUN_*` environment variable, between the file and the flag.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use serde::Deserialize;

mod security;

pub use security::{
    AuthConfig, AuthSettings, KeyEntry, PEM_CERTIFICATE, PEM_PRIVATE_KEY, QuotaSettings, Switch,
    TenantQuota, TlsFiles, read_pem,
};

use crate::{
    actions::{Exec, ExecCommand, Registry},
    api::{Limits, quotas::Rate},
    executor::{ExecutorConfig, InterruptedPolicy},
    store::{
        MemoryStore, PostgresOptions, PostgresStore, SqliteOptions, SqliteStore, Store, StoreError,
    },
    webhooks::WebhookConfig,
};

/// Which store keeps the jobs. Parsed from `sqlite`, `memory`, or a `postgres://` (or
/// `postgresql://`) URL.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum StoreKind {
    /// SQLite in the data directory: durable, the default.
    Sqlite,
    /// Process memory: nothing survives a restart (for tests and demos).
    Memory,
    /// A PostgreSQL database; several servers on one database (and schema) serve its jobs as
    /// replicas.
    Postgres(DatabaseUrl),
}

impl std::str::FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sqlite" => Ok(StoreKind::Sqlite),
            "memory" => Ok(StoreKind::Memory),
            url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(StoreKind::Postgres(DatabaseUrl(url.to_owned())))
            }
            other => Err(format!(
                "expected `sqlite`, `memory` or a postgres:// URL, not {}",
                shown_store(other)
            )),
        }
    }
}

/// A store setting that is none of the known forms, for its error message: a URL (say a
/// `postgress://` typo) may hold a password, so it shows with the password masked.
fn shown_store(text: &str) -> String {
    if text.contains("://") {
        format!("`{}`", redact_secrets(text))
    } else if text.contains(['=', '@']) || text.contains(char::is_whitespace) {
        // A libpq `key=value` string, say: it may hold a password anywhere.
        "a value that is not a URL".to_owned()
    } else {
        format!("`{text}`")
    }
}

/// `text` with the secrets an operator may have written in it replaced by `***`: the password
/// of every URL (`scheme://user:password@host`), every `password=` value (a libpq query
/// parameter), and the value of every `secret`, `password` or `key` setting on a line of
/// its own (`secret = "…"`, as a config file parser quotes the line it is about). For
/// messages that quote what an operator wrote (a mistyped store URL, a config file line):
/// they must not print a password or a signing secret on a terminal or into a log.
pub fn redact_secrets(text: &str) -> String {
    text.lines().map(redact_line).collect::<Vec<_>>().join("\n")
        + if text.ends_with('\n') { "\n" } else { "" }
}

fn redact_line(line: &str) -> String {
    // A setting whose name says it is secret: `secret = "…"`, `api_key = "…"`.
    if let Some((name, _)) = line.split_once('=') {
        // After a parser's `2 | ` line-number gutter, if any.
        let name = name
            .rsplit('|')
            .next()
            .unwrap_or(name)
            .trim()
            .to_ascii_lowercase();
        let secret_name = ["secret", "password", "key"]
            .iter()
            .any(|word| name.ends_with(word));
        if secret_name && !name.contains(char::is_whitespace) {
            return format!("{} \"***\"", &line[..=line.find('=').unwrap_or(0)]);
        }
    }
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // A password may hold `/`, `?` or `#` written raw: the user info runs to the last
        // `@` before the URL ends.
        let end = after
            .find(|c: char| matches!(c, '"' | '\'' | '`') || c.is_whitespace())
            .unwrap_or(after.len());
        let url = &after[..end];
        match url
            .rsplit_once('@')
            .and_then(|(user_info, host)| Some((user_info.split_once(':')?.0, host)))
        {
            Some((user, host)) => {
                out.push_str(user);
                out.push_str(":***@");
                out.push_str(&mask_password_parameters(host));
            }
            None => out.push_str(&mask_password_parameters(url)),
        }
        rest = &after[end..];
    }
    out.push_str(&mask_password_parameters(rest));
    out
}

/// `text` with the value of every `password=` parameter replaced by `***`.
fn mask_password_parameters(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.to_ascii_lowercase().find("password=") {
        let (before, after) = rest.split_at(at + "password=".len());
        out.push_str(before);
        out.push_str("***");
        let end = after
            .find(|c: char| matches!(c, '&' | '"' | '\'' | '`') || c.is_whitespace())
            .unwrap_or(after.len());
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Parses `--store` (and `LONGRUN_STORE`) with an error of its own: clap's would quote the
/// value as given, the password of a mistyped URL included.
#[derive(Clone, Copy, Debug)]
struct StoreParser;

impl clap::builder::TypedValueParser for StoreParser {
    type Value = StoreKind;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<StoreKind, clap::Error> {
        let name = arg.map_or_else(|| "--store".to_owned(), ToString::to_string);
        let invalid = |problem: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '{name}': {problem}\n"),
            )
            .with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| invalid("not UTF-8".to_owned()))?;
        text.parse().map_err(invalid)
    }
}

impl TryFrom<String> for StoreKind {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// A PostgreSQL connection URL. It may hold a password, so it never prints: `Debug` shows
/// only that it is set.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Where it points, for messages: hosts, ports and database, never the user or password.
    pub fn target(&self) -> String {
        let Ok(config) = self.0.parse::<tokio_postgres::Config>() else {
            return "(a URL that does not parse)".to_owned();
        };
        let ports = config.get_ports();
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let host = crate::store::host_text(host);
                match ports.get(i).or(ports.first()) {
                    Some(port) => format!("{host}:{port}"),
                    None => host,
                }
            })
            .collect();
        let hosts = if hosts.is_empty() {
            "localhost".to_owned()
        } else {
            hosts.join(",")
        };
        let mut target = format!(
            "{hosts}/{}",
            config.get_dbname().unwrap_or("(default database)")
        );
        // The schema, when the URL names one (`options=-csearch_path=…`): which of several
        // longrun services on one database a message is about.
        if let Some(path) = config.get_options().and_then(search_path) {
            target.push_str(&format!(" (search_path {path})"));
        }
        target
    }
}

/// The `search_path` a connection's `options` set (`-c search_path=a,b` or
/// `-csearch_path=a`), if any.
fn search_path(options: &str) -> Option<&str> {
    let (_, rest) = options.split_once("search_path=")?;
    let path = rest.split_whitespace().next()?;
    (!path.is_empty()).then_some(path)
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl(<redacted>)")
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(DatabaseUrl(s.to_owned()))
    }
}

fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// Parses an address to listen on: an IP address and a port. A host name is refused with what
/// to write instead (which of its addresses to bind would be a guess).
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!(
            "{text:?} is not an IP address and port: use e.g. 127.0.0.1:50051 (this machine \
             only), 0.0.0.0:50051 (every interface) or [::1]:50051; host names such as \
             localhost are not taken"
        )
    })
}

/// Settings that may come from the config file or from flags. Every one is optional here;
/// [`Config::resolve`] fills in the documented defaults.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address to serve gRPC on [default: 127.0.0.1:50051].
    #[arg(long, env = "LONGRUN_LISTEN", value_parser = parse_listen)]
    pub listen: Option<SocketAddr>,
    /// Directory of the embedded store [default: ./longrun-data].
    #[arg(long, env = "LONGRUN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to serve Prometheus metrics on, at `GET /metrics` [default: off].
    #[arg(long, env = "LONGRUN_METRICS_LISTEN", value_parser = parse_listen)]
    pub metrics_listen: Option<SocketAddr>,
    /// Where jobs are kept: `sqlite`, `memory` or a `postgres://user@host/db` URL
    /// [default: sqlite, or PostgreSQL when LONGRUN_DATABASE_URL is set].
    #[arg(long, env = "LONGRUN_STORE", hide_env_values = true, value_parser = StoreParser)]
    pub store: Option<StoreKind>,
    /// The PostgreSQL database to keep jobs in, when --store is not given (see docs/postgres.md).
    #[arg(long, env = "LONGRUN_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<DatabaseUrl>,
    /// Jobs run at once [default: 16].
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Jobs that may wait in the queue; Submit past it gets RESOURCE_EXHAUSTED [default: 100000].
    #[arg(long)]
    pub max_queue_length: Option<usize>,
    /// Largest gRPC message in bytes, either way [default: 16777216].
    #[arg(long)]
    pub max_message_bytes: Option<usize>,
    /// Actions a job may have [default: 100].
    #[arg(long)]
    pub max_actions_per_job: Option<usize>,
    /// An action's params, encoded, in bytes [default: 65536].
    #[arg(long)]
    pub max_params_bytes: Option<usize>,
    /// An action's binary input in bytes [default: 8388608].
    #[arg(long)]
    pub max_input_bytes: Option<usize>,
    /// Labels per job or filter [default: 64].
    #[arg(long)]
    pub max_labels: Option<usize>,
    /// Attempts a job gets when its Submit does not say [default: 1].
    #[arg(long)]
    pub default_max_attempts: Option<u32>,
    /// The most attempts a Submit may ask for; more is INVALID_ARGUMENT [default: 100].
    #[arg(long)]
    pub max_attempts_limit: Option<u32>,
    /// An idempotency key, in bytes [default: 256].
    #[arg(long)]
    pub max_idempotency_key_bytes: Option<usize>,
    /// How far ahead of the server's clock a Submit may schedule a job (`schedule_time`); 0
    /// allows no scheduling ahead [default: 30days].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub max_schedule_delay: Option<Duration>,
    /// The wait before the first retry, doubled for each further one [default: 1s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Option<Duration>,
    /// The longest wait between retries [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Option<Duration>,
    /// How long a cancelled handler may take to stop before it is killed [default: 10s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub cancel_grace: Option<Duration>,
    /// How often a running job's progress is written to the store at most; watchers,
    /// GetStatus and listings on this server see every report at once either way [default: 1s
    /// with PostgreSQL, where it is how soon the other replicas see progress; 10s otherwise].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub progress_persist_interval: Option<Duration>,
    /// The shortest time between two messages of one job's progress on one watch stream;
    /// reports in between are coalesced to the newest, and state changes are never held back
    /// [default: 100ms; 0s sends every report]. Keeps a slow reader from falling behind a
    /// window's worth of old progress.
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub watch_progress_interval: Option<Duration>,
    /// How long running jobs may take to finish on shutdown before they are stopped [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Option<Duration>,
    /// With several replicas on one PostgreSQL database: how long a replica's claim on a job
    /// lasts unless renewed, so how soon the jobs of a replica that died run elsewhere
    /// [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub lease: Option<Duration>,
    /// What to do with jobs found RUNNING after a crash: `requeue` while they have attempts
    /// left (else fail with INTERRUPTED), or `fail` all [default: requeue].
    #[arg(long, value_enum)]
    pub interrupted: Option<InterruptedPolicy>,
    /// How long finished jobs are kept [default: 14days].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// Interval of HTTP/2 keepalive pings on idle connections, so long watches survive proxies
    /// [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Option<Duration>,
    /// How long a keepalive ping may go unanswered before the connection is closed (a peer
    /// that vanished without a word) [default: 20s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Option<Duration>,
    /// Close each connection this long after it was opened: it is sent GOAWAY, so its client
    /// opens a new one (through the load balancer, to any replica) for its next calls, while
    /// calls in progress finish [default: never].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Option<Duration>,
    /// With --max-connection-age: how long calls still open on a connection past its age (watch
    /// streams) may run before the connection is cut; their clients resume elsewhere with
    /// `after_version` [default: as long as they last].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub max_connection_age_grace: Option<Duration>,
    /// Compress responses with `gzip` or `deflate` for clients that accept it (their
    /// grpc-accept-encoding says so); requests compressed with either are always accepted
    /// [default: none, since on a fast network compressing costs more CPU than it saves].
    #[arg(long, value_enum)]
    pub response_compression: Option<ResponseCompression>,
    /// Let browser pages from this origin (`scheme://host[:port]`; `*` for any) call the
    /// gRPC-Web and Connect endpoints: answers CORS preflights and marks responses; repeat for
    /// more origins [default: none, so only same-origin pages can call].
    #[arg(long = "cors-allow-origin", value_name = "ORIGIN")]
    pub cors_allow_origins: Option<Vec<String>>,
    /// How deep an action's params may nest [default: 32].
    #[arg(long)]
    pub max_params_depth: Option<usize>,
    /// A label key, in bytes [default: 256].
    #[arg(long)]
    pub max_label_key_bytes: Option<usize>,
    /// A label value, in bytes [default: 256].
    #[arg(long)]
    pub max_label_value_bytes: Option<usize>,
    /// The largest ListJobs/ListOperations page; a larger page_size is INVALID_ARGUMENT
    /// [default: 1000].
    #[arg(long)]
    pub max_page_size: Option<usize>,
    /// WatchJob/WatchJobs streams open at once on one connection [default: 1000].
    #[arg(long)]
    pub max_watches_per_connection: Option<usize>,
    /// WatchJob/WatchJobs streams open at once by one tenant [default: 10000].
    #[arg(long)]
    pub max_watches_per_tenant: Option<usize>,
    /// Require API keys (`on`) or serve everyone as the tenant `default` (`off`) [default: off
    /// when listening on a loopback address, on otherwise; the config file's `[auth] enabled`].
    #[arg(long, value_enum, env = "LONGRUN_AUTH")]
    pub auth: Option<Switch>,
    /// Serve TLS with this PEM certificate chain (needs a key: --tls-key or the config file's
    /// tls_key) [default: plaintext h2c].
    // The three are checked together once merged with the config file (a partial setting is
    // refused at start), not here: a flag may complete what the file gives.
    #[arg(long, env = "LONGRUN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "LONGRUN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this PEM CA (mTLS); needs a certificate and key,
    /// from these flags or the config file.
    #[arg(long, env = "LONGRUN_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
}

impl Settings {
    /// These settings, with the gaps filled from `fallback`.
    fn or(self, fallback: Settings) -> Settings {
        Settings {
            listen: self.listen.or(fallback.listen),
            data_dir: self.data_dir.or(fallback.data_dir),
            metrics_listen: self.metrics_listen.or(fallback.metrics_listen),
            store: self.store.or(fallback.store),
            database_url: self.database_url.or(fallback.database_url),
            concurrency: self.concurrency.or(fallback.concurrency),
            max_queue_length: self.max_queue_length.or(fallback.max_queue_length),
            max_message_bytes: self.max_message_bytes.or(fallback.max_message_bytes),
            max_actions_per_job: self.max_actions_per_job.or(fallback.max_actions_per_job),
            max_params_bytes: self.max_params_bytes.or(fallback.max_params_bytes),
            max_input_bytes: self.max_input_bytes.or(fallback.max_input_bytes),
            max_labels: self.max_labels.or(fallback.max_labels),
            default_max_attempts: self.default_max_attempts.or(fallback.default_max_attempts),
            max_attempts_limit: self.max_attempts_limit.or(fallback.max_attempts_limit),
            max_idempotency_key_bytes: self
                .max_idempotency_key_bytes
                .or(fallback.max_idempotency_key_bytes),
            max_schedule_delay: self.max_schedule_delay.or(fallback.max_schedule_delay),
            retry_backoff: self.retry_backoff.or(fallback.retry_backoff),
            retry_backoff_max: self.retry_backoff_max.or(fallback.retry_backoff_max),
            cancel_grace: self.cancel_grace.or(fallback.cancel_grace),
            progress_persist_interval: self
                .progress_persist_interval
                .or(fallback.progress_persist_interval),
            watch_progress_interval: self
                .watch_progress_interval
                .or(fallback.watch_progress_interval),
            shutdown_grace: self.shutdown_grace.or(fallback.shutdown_grace),
            lease: self.lease.or(fallback.lease),
            interrupted: self.interrupted.or(fallback.interrupted),
            retention: self.retention.or(fallback.retention),
            keepalive_interval: self.keepalive_interval.or(fallback.keepalive_interval),
            keepalive_timeout: self.keepalive_timeout.or(fallback.keepalive_timeout),
            max_connection_age: self.max_connection_age.or(fallback.max_connection_age),
            max_connection_age_grace: self
                .max_connection_age_grace
                .or(fallback.max_connection_age_grace),
            response_compression: self.response_compression.or(fallback.response_compression),
            cors_allow_origins: self.cors_allow_origins.or(fallback.cors_allow_origins),
            max_params_depth: self.max_params_depth.or(fallback.max_params_depth),
            max_label_key_bytes: self.max_label_key_bytes.or(fallback.max_label_key_bytes),
            max_label_value_bytes: self
                .max_label_value_bytes
                .or(fallback.max_label_value_bytes),
            max_page_size: self.max_page_size.or(fallback.max_page_size),
            max_watches_per_connection: self
                .max_watches_per_connection
                .or(fallback.max_watches_per_connection),
            max_watches_per_tenant: self
                .max_watches_per_tenant
                .or(fallback.max_watches_per_tenant),
            auth: self.auth.or(fallback.auth),
            tls_cert: self.tls_cert.or(fallback.tls_cert),
            tls_key: self.tls_key.or(fallback.tls_key),
            tls_client_ca: self.tls_client_ca.or(fallback.tls_client_ca),
        }
    }
}

/// How the server compresses its responses. Whatever this says, a response is compressed only
/// for a client whose `grpc-accept-encoding` names the encoding; the others get it plain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ResponseCompression {
    /// Responses are sent uncompressed.
    #[default]
    None,
    /// gzip, which every gRPC implementation can decode.
    Gzip,
    /// deflate (zlib), offered by gRPC's C-core based clients (Python, Ruby, C++, PHP).
    Deflate,
}

impl ResponseCompression {
    /// The encoding tonic is told to send, if any.
    pub fn encoding(self) -> Option<tonic::codec::CompressionEncoding> {
        match self {
            Self::None => None,
            Self::Gzip => Some(tonic::codec::CompressionEncoding::Gzip),
            Self::Deflate => Some(tonic::codec::CompressionEncoding::Deflate),
        }
    }
}

/// The `[exec]` table of the config file: the commands the `exec` action may run.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecSettings {
    /// Declared commands by name.
    pub commands: BTreeMap<String, ExecCommand>,
}

/// The `[webhooks]` table of the config file; see [`WebhookConfig`] for each default.
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    /// The signing secret of webhooks whose Submit gives none.
    pub secret: Option<String>,
    /// Hosts (or `host:port`) webhooks may reach although they resolve to internal addresses.
    pub allow_hosts: Vec<String>,
    /// Attempts per delivery before it is marked DEAD.
    pub max_attempts: Option<u32>,
    /// The wait before the second attempt, doubled for each later one (full jitter).
    #[serde(with = "humantime_serde")]
    pub backoff: Option<Duration>,
    /// The longest wait between attempts.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Option<Duration>,
    /// How long one attempt may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Deliveries attempted at once.
    pub concurrency: Option<usize>,
}

impl std::fmt::Debug for WebhookSettings {
    // By hand, so that the secret never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
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

impl WebhookSettings {
    /// These settings over the defaults.
    fn resolve(self) -> WebhookConfig {
        let defaults = WebhookConfig::default();
        WebhookConfig {
            secret: self.secret.filter(|s| !s.is_empty()),
            allow_hosts: self.allow_hosts,
            max_attempts: self.max_attempts.unwrap_or(defaults.max_attempts),
            backoff: self.backoff.unwrap_or(defaults.backoff),
            backoff_max: self.backoff_max.unwrap_or(defaults.backoff_max),
            timeout: self.timeout.unwrap_or(defaults.timeout),
            concurrency: self.concurrency.unwrap_or(defaults.concurrency),
        }
    }
}

/// The config file: a `[server]` table with the same settings as the flags, an `[exec]`
/// table, `[auth]`, `[quotas]` and `[webhooks]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Server settings.
    #[serde(rename = "server")]
    pub settings: Settings,
    /// Commands for the `exec` action.
    pub exec: ExecSettings,
    /// Webhook delivery settings.
    pub webhooks: WebhookSettings,
    /// API keys and whether they are required.
    pub auth: AuthSettings,
    /// Per-tenant quotas.
    pub quotas: QuotaSettings,
}

impl FileConfig {
    /// Parses a config file's text. A file that sets authentication twice, as `[server] auth`
    /// and `[auth] enabled`, is refused: one would silently win over the other, and guessing
    /// wrong serves without keys.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        let file: Self = toml::from_str(text)?;
        if file.settings.auth.is_some() && file.auth.enabled.is_some() {
            return Err(<toml::de::Error as serde::de::Error>::custom(
                "both [server] auth and [auth] enabled are set: keep one",
            ));
        }
        Ok(file)
    }
}

/// The resolved configuration of a server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address `longrun serve` binds. [`crate::server::Server::serve`] serves on the listener
    /// it is given instead, but this address still decides the default of `auth` (off only
    /// on loopback) in [`Config::resolve`]: an embedder that binds another address sets
    /// `auth.enabled` itself (`serve` warns loudly when a listener that is not loopback
    /// serves without authentication).
    pub listen: SocketAddr,
    /// Directory of the embedded store. Read by [`Config::open_store`]: an embedder that
    /// opens its store itself and hands it to [`crate::server::Server::start`] need not set it.
    pub data_dir: PathBuf,
    /// Where Prometheus metrics are served, if anywhere. `longrun serve` binds it; an
    /// embedder binds it and passes it to [`crate::server::Server::with_metrics_listener`].
    pub metrics_listen: Option<SocketAddr>,
    /// Which store keeps the jobs: what [`Config::open_store`] opens. `Server::start` serves
    /// the store it is given, whatever this says.
    pub store: StoreKind,
    /// Limits enforced at the edge.
    pub limits: Limits,
    /// The executor's limits and timings.
    pub executor: ExecutorConfig,
    /// How long running jobs may take to finish on shutdown.
    pub shutdown_grace: Duration,
    /// How long a replica's lease on a job lasts (PostgreSQL store only).
    pub lease: Duration,
    /// How long finished jobs are kept.
    pub retention: Duration,
    /// HTTP/2 keepalive ping interval.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// How long after it was opened a connection is sent GOAWAY, if ever.
    pub max_connection_age: Option<Duration>,
    /// How long calls still open past `max_connection_age` may run before the connection is
    /// cut; `None` for as long as they last.
    pub max_connection_age_grace: Option<Duration>,
    /// How responses are compressed for clients that accept it.
    pub response_compression: ResponseCompression,
    /// The origins whose browser pages may call across origins (CORS); `*` for any, empty for
    /// none.
    pub cors_allow_origins: Vec<String>,
    /// Commands for the `exec` action. They exist on a server whose registry has the `exec`
    /// action, as [`Config::registry`] builds it; `Registry::with_builtins()` alone has none.
    pub exec_commands: BTreeMap<String, ExecCommand>,
    /// Webhook checks and delivery.
    pub webhooks: WebhookConfig,
    /// API keys.
    pub auth: AuthConfig,
    /// TLS, if served; plaintext h2c otherwise.
    pub tls: Option<TlsFiles>,
    /// Submits a second allowed to a tenant without its own rate; `None` for no limit.
    pub submit_rate: Option<Rate>,
    /// Per-tenant submit rates.
    pub tenant_submit_rates: BTreeMap<String, Rate>,
}

impl Default for Config {
    fn default() -> Self {
        Self::resolve(Settings::default(), FileConfig::default())
    }
}

impl Config {
    /// The actions this config runs: the built-ins, plus `exec` when commands are declared.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::with_builtins();
        if !self.exec_commands.is_empty() {
            registry.register(
                "exec",
                Exec::new(self.exec_commands.clone(), self.executor.cancel_grace),
            );
        }
        registry
    }

    /// Opens the configured store: SQLite in the data directory (on a blocking thread: it
    /// creates the directory, takes the lock and migrates), PostgreSQL, or memory.
    ///
    /// Several servers may open one PostgreSQL database (and schema): they are replicas that
    /// share its jobs, with leases of `lease`.
    pub async fn open_store(&self) -> Result<Arc<dyn Store>, StoreError> {
        Ok(match &self.store {
            StoreKind::Postgres(url) => {
                let options = PostgresOptions {
                    lease: self.lease,
                    ..PostgresOptions::default()
                };
                Arc::new(PostgresStore::open(url.expose(), options).await?)
            }
            StoreKind::Memory => Arc::new(MemoryStore::new()),
            StoreKind::Sqlite => {
                let dir = self.data_dir.clone();
                let store = tokio::task::spawn_blocking(move || {
                    SqliteStore::open(&dir, SqliteOptions::default())
                })
                .await
                .map_err(|e| StoreError::backend("opening the store", e))??;
                Arc::new(store)
            }
        })
    }

    /// Flags over file over defaults.
    pub fn resolve(flags: Settings, file: FileConfig) -> Self {
        let s = flags.or(file.settings);
        let quotas = file.quotas;
        let listen = s
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051)));
        let limit_defaults = Limits::default();
        let exec_defaults = ExecutorConfig::default();
        Self {
            listen,
            data_dir: s.data_dir.unwrap_or_else(|| PathBuf::from("longrun-data")),
            metrics_listen: s.metrics_listen,
            store: match (s.store, s.database_url) {
                (Some(store), _) => store,
                (None, Some(url)) => StoreKind::Postgres(url),
                (None, None) => StoreKind::Sqlite,
            },
            limits: Limits {
                max_message_bytes: s
                    .max_message_bytes
                    .unwrap_or(limit_defaults.max_message_bytes),
                max_actions_per_job: s
                    .max_actions_per_job
                    .unwrap_or(limit_defaults.max_actions_per_job),
                max_params_bytes: s
                    .max_params_bytes
                    .unwrap_or(limit_defaults.max_params_bytes),
                max_input_bytes: s.max_input_bytes.unwrap_or(limit_defaults.max_input_bytes),
                max_labels: s.max_labels.unwrap_or(limit_defaults.max_labels),
                max_params_depth: s
                    .max_params_depth
                    .unwrap_or(limit_defaults.max_params_depth),
                max_label_key_bytes: s
                    .max_label_key_bytes
                    .unwrap_or(limit_defaults.max_label_key_bytes),
                max_label_value_bytes: s
                    .max_label_value_bytes
                    .unwrap_or(limit_defaults.max_label_value_bytes),
                max_page_size: s.max_page_size.unwrap_or(limit_defaults.max_page_size),
                max_idempotency_key_bytes: s
                    .max_idempotency_key_bytes
                    .unwrap_or(limit_defaults.max_idempotency_key_bytes),
                max_schedule_delay: s
                    .max_schedule_delay
                    .unwrap_or(limit_defaults.max_schedule_delay),
                max_watches_per_connection: s
                    .max_watches_per_connection
                    .unwrap_or(limit_defaults.max_watches_per_connection),
                max_watches_per_tenant: s
                    .max_watches_per_tenant
                    .unwrap_or(limit_defaults.max_watches_per_tenant),
                watch_progress_interval: s
                    .watch_progress_interval
                    .unwrap_or(limit_defaults.watch_progress_interval),
                ..limit_defaults
            },
            executor: ExecutorConfig {
                concurrency: s.concurrency.unwrap_or(exec_defaults.concurrency),
                max_queue_length: s.max_queue_length.unwrap_or(exec_defaults.max_queue_length),
                default_max_attempts: s
                    .default_max_attempts
                    .unwrap_or(exec_defaults.default_max_attempts),
                max_attempts_limit: s
                    .max_attempts_limit
                    .unwrap_or(exec_defaults.max_attempts_limit),
                retry_backoff_initial: s
                    .retry_backoff
                    .unwrap_or(exec_defaults.retry_backoff_initial),
                retry_backoff_max: s
                    .retry_backoff_max
                    .unwrap_or(exec_defaults.retry_backoff_max),
                cancel_grace: s.cancel_grace.unwrap_or(exec_defaults.cancel_grace),
                progress_persist_interval: s.progress_persist_interval,
                interrupted_policy: s.interrupted.unwrap_or(exec_defaults.interrupted_policy),
                max_queued_per_tenant: quotas.default.max_queued_jobs,
                tenant_max_queued: quotas
                    .tenants
                    .iter()
                    .filter_map(|(tenant, q)| {
                        let limit = q.or(&quotas.default).max_queued_jobs?;
                        Some((tenant.clone(), limit))
                    })
                    .collect(),
                ..exec_defaults
            },
            shutdown_grace: s.shutdown_grace.unwrap_or(Duration::from_secs(30)),
            lease: s.lease.unwrap_or(Duration::from_secs(30)),
            retention: s
                .retention
                .unwrap_or(Duration::from_secs(14 * 24 * 60 * 60)),
            keepalive_interval: s.keepalive_interval.unwrap_or(Duration::from_secs(30)),
            keepalive_timeout: s.keepalive_timeout.unwrap_or(Duration::from_secs(20)),
            max_connection_age: s.max_connection_age,
            max_connection_age_grace: s.max_connection_age_grace,
            response_compression: s.response_compression.unwrap_or_default(),
            cors_allow_origins: s.cors_allow_origins.unwrap_or_default(),
            exec_commands: file.exec.commands,
            webhooks: file.webhooks.resolve(),
            auth: AuthConfig {
                // Off by default only where nobody else can connect.
                enabled: match s.auth {
                    Some(switch) => switch == Switch::On,
                    None => file.auth.enabled.unwrap_or(!listen.ip().is_loopback()),
                },
                keys: file.auth.keys,
            },
            // A partial setting (a key without a certificate, a client CA alone) is kept with
            // the missing paths empty, so that the server refuses it at start instead of
            // silently serving plaintext.
            tls: match (s.tls_cert, s.tls_key, s.tls_client_ca) {
                (None, None, None) => None,
                (cert, key, client_ca) => Some(TlsFiles {
                    cert: cert.unwrap_or_default(),
                    key: key.unwrap_or_default(),
                    client_ca,
                }),
            },
            submit_rate: quotas.default.rate(),
            tenant_submit_rates: quotas
                .tenants
                .iter()
                .filter_map(|(tenant, q)| Some((tenant.clone(), q.or(&quotas.default).rate()?)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_flag_completes_what_the_file_gives() {
        let file = FileConfig::parse(
            "[server]\ntls_cert = \"/etc/longrun/cert.pem\"\ntls_key = \"/etc/longrun/key.pem\"\n",
        )
        .unwrap();
        let flags = Settings {
            tls_client_ca: Some(PathBuf::from("/etc/longrun/ca.pem")),
            ..Settings::default()
        };
        let tls = Config::resolve(flags, file).tls.expect("TLS on");
        assert_eq!(tls.cert, PathBuf::from("/etc/longrun/cert.pem"));
        assert_eq!(tls.key, PathBuf::from("/etc/longrun/key.pem"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("/etc/longrun/ca.pem")));
    }

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let file = FileConfig::parse(
            r#"
            [server]
            concurrency = 3
            max_queue_length = 7
            cancel_grace = "250ms"
            max_attempts_limit = 20
            max_idempotency_key_bytes = 64
            max_schedule_delay = "2h"
            "#,
        )
        .unwrap();
        let flags = Settings {
            concurrency: Some(5),
            max_idempotency_key_bytes: Some(32),
            ..Settings::default()
        };
        let config = Config::resolve(flags, file);
        assert_eq!(config.executor.concurrency, 5);
        assert_eq!(config.executor.max_attempts_limit, 20);
        assert_eq!(config.limits.max_idempotency_key_bytes, 32);
        assert_eq!(config.executor.max_queue_length, 7);
        assert_eq!(config.executor.cancel_grace, Duration::from_millis(250));
        assert_eq!(config.limits.max_actions_per_job, 100);
        assert_eq!(config.store, StoreKind::Sqlite);
        assert_eq!(config.retention, Duration::from_secs(14 * 86400));
        assert_eq!(config.limits.max_schedule_delay, Duration::from_secs(7200));
        let defaults = Config::resolve(Settings::default(), FileConfig::default());
        assert_eq!(
            defaults.limits.max_schedule_delay,
            Duration::from_secs(30 * 86400)
        );
    }

    #[test]
    fn response_compression_is_off_unless_the_file_or_a_flag_names_an_encoding() {
        let file = || FileConfig::parse("[server]\nresponse_compression = \"deflate\"\n").unwrap();
        assert_eq!(
            Config::default().response_compression,
            ResponseCompression::None
        );
        assert_eq!(
            Config::resolve(Settings::default(), file()).response_compression,
            ResponseCompression::Deflate
        );
        let flags = Settings {
            response_compression: Some(ResponseCompression::Gzip),
            ..Settings::default()
        };
        let config = Config::resolve(flags, file());
        assert_eq!(
            config.response_compression.encoding(),
            Some(tonic::codec::CompressionEncoding::Gzip)
        );
        assert!(FileConfig::parse("[server]\nresponse_compression = \"zstd\"\n").is_err());
    }

    #[test]
    fn cors_origins_come_from_the_file_or_the_repeated_flag() {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            settings: Settings,
        }
        let file = || {
            FileConfig::parse("[server]\ncors_allow_origins = [\"https://app.example.com\"]\n")
                .unwrap()
        };
        assert!(Config::default().cors_allow_origins.is_empty());
        assert_eq!(
            Config::resolve(Settings::default(), file()).cors_allow_origins,
            ["https://app.example.com"]
        );
        let flags = <Flags as clap::Parser>::try_parse_from([
            "serve",
            "--cors-allow-origin",
            "http://localhost:5173",
            "--cors-allow-origin",
            "https://admin.example.com",
        ])
        .unwrap();
        assert_eq!(
            Config::resolve(flags.settings, file()).cors_allow_origins,
            ["http://localhost:5173", "https://admin.example.com"]
        );
    }

    #[test]
    fn progress_is_written_every_second_only_where_other_replicas_read_it() {
        let interval = |flags: Settings, file: &str, shared: bool| {
            Config::resolve(flags, FileConfig::parse(file).unwrap())
                .executor
                .progress_write_interval(shared)
        };
        assert_eq!(
            interval(Settings::default(), "", false),
            Duration::from_secs(10)
        );
        assert_eq!(
            interval(Settings::default(), "", true),
            Duration::from_secs(1)
        );
        let file = "[server]\nprogress_persist_interval = \"2s\"";
        assert_eq!(
            interval(Settings::default(), file, true),
            Duration::from_secs(2)
        );
        let flag = Settings {
            progress_persist_interval: Some(Duration::from_millis(500)),
            ..Settings::default()
        };
        assert_eq!(interval(flag, file, false), Duration::from_millis(500));
    }

    #[test]
    fn secrets_are_masked_in_quoted_text() {
        for (text, shown) in [
            ("postgres://u:pw@h/db", "postgres://u:***@h/db"),
            ("x postgres://u:p:w@h:5432 y", "x postgres://u:***@h:5432 y"),
            (
                "\"a://u:p@h\" and b://v:q@i?x",
                "\"a://u:***@h\" and b://v:***@i?x",
            ),
            ("postgres://u:pa/ss#x@h/db", "postgres://u:***@h/db"),
            (
                "postgres://h/db?user=u&password=s3cret&x=1",
                "postgres://h/db?user=u&password=***&x=1",
            ),
            (
                "host=db password=s3cret dbname=x",
                "host=db password=*** dbname=x",
            ),
            ("postgres://user@h/db", "postgres://user@h/db"),
            ("postgres://h/db", "postgres://h/db"),
            ("no url here", "no url here"),
            ("ends with ://", "ends with ://"),
            ("secret = \"whsec_1\"", "secret = \"***\""),
            ("3 | secret = \"whsec_1\"", "3 | secret = \"***\""),
            (
                "  api_key=\"k\"\nconcurrency = 2\n",
                "  api_key= \"***\"\nconcurrency = 2\n",
            ),
        ] {
            assert_eq!(redact_secrets(text), shown, "{text}");
        }
        assert_eq!(shown_store("sqlit"), "`sqlit`");
        assert_eq!(
            shown_store("host=db password=x"),
            "a value that is not a URL"
        );
    }

    #[test]
    fn the_store_is_sqlite_memory_or_a_postgres_url() {
        let url = "postgres://u:hunter2pw@db/jobs";
        let flags = Settings {
            store: Some(url.parse().unwrap()),
            ..Settings::default()
        };
        let config = Config::resolve(flags, FileConfig::default());
        let StoreKind::Postgres(parsed) = &config.store else {
            panic!("not postgres: {:?}", config.store);
        };
        assert_eq!(parsed.expose(), url);
        assert!(
            !format!("{config:?}").contains("hunter2pw"),
            "the URL's password never prints"
        );
        assert_eq!(
            parsed.target(),
            "db:5432/jobs",
            "where, for messages; never who"
        );
        let several: StoreKind = "postgres://u:pw@a:5433,b/x".parse().unwrap();
        let StoreKind::Postgres(several) = several else {
            panic!("not postgres");
        };
        assert_eq!(several.target(), "a:5433,b:5432/x");
        let schema: StoreKind = "postgres://u:pw@h/x?options=-csearch_path%3Dsvc_a"
            .parse()
            .unwrap();
        let StoreKind::Postgres(schema) = schema else {
            panic!("not postgres");
        };
        assert_eq!(schema.target(), "h:5432/x (search_path svc_a)");
        assert_eq!("memory".parse::<StoreKind>(), Ok(StoreKind::Memory));
        assert!("mysql://x".parse::<StoreKind>().is_err());
        // A mistyped URL is named in the error, its password masked, wherever it was written.
        let typo = "postgress://app:Hunter2Secret@db/jobs";
        let error = typo.parse::<StoreKind>().unwrap_err();
        assert!(error.contains("`postgress://app:***@db/jobs`"), "{error}");
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            _settings: Settings,
        }
        let flag = <Flags as clap::Parser>::try_parse_from(["serve", "--store", typo])
            .err()
            .expect("a typo is refused")
            .to_string();
        assert!(
            flag.contains("--store") && !flag.contains("Hunter2Secret"),
            "{flag}"
        );
        let toml = FileConfig::parse(&format!("[server]\nstore = \"{typo}\"\n"))
            .unwrap_err()
            .to_string();
        assert!(toml.contains("Hunter2Secret"), "TOML quotes the line");
        let redacted = redact_secrets(&toml);
        assert!(
            redacted.contains("postgress://app:***@db/jobs") && !redacted.contains("Hunter2"),
            "{redacted}"
        );

        // LONGRUN_DATABASE_URL (or the file's `database_url`) alone chooses PostgreSQL; an
        // explicit store wins over it.
        let file = FileConfig::parse("[server]\ndatabase_url = \"postgresql://db/x\"").unwrap();
        assert!(matches!(
            Config::resolve(Settings::default(), file.clone()).store,
            StoreKind::Postgres(_)
        ));
        let flags = Settings {
            store: Some(StoreKind::Sqlite),
            ..Settings::default()
        };
        assert_eq!(Config::resolve(flags, file).store, StoreKind::Sqlite);
    }

    #[test]
    fn exec_is_registered_only_with_declared_commands() {
        assert!(Config::default().registry().get("exec").is_none());
        let file = FileConfig::parse(
            r#"
            [exec.commands.hello]
            program = "/bin/echo"
            args = ["hello"]
            "#,
        )
        .unwrap();
        let config = Config::resolve(Settings::default(), file);
        assert!(config.registry().get("exec").is_some());
    }

    #[test]
    fn webhooks_table_sets_delivery_and_guard() {
        let file = FileConfig::parse(
            r#"
            [webhooks]
            secret = "whsec_x"
            allow_hosts = ["127.0.0.1", "hooks.internal:8443"]
            max_attempts = 3
            backoff = "50ms"
            timeout = "2s"
            "#,
        )
        .unwrap();
        assert!(!format!("{file:?}").contains("whsec_x"));
        let config = Config::resolve(Settings::default(), file);
        assert_eq!(config.webhooks.secret.as_deref(), Some("whsec_x"));
        assert_eq!(config.webhooks.allow_hosts.len(), 2);
        assert_eq!(config.webhooks.max_attempts, 3);
        assert_eq!(config.webhooks.backoff, Duration::from_millis(50));
        assert_eq!(config.webhooks.backoff_max, Duration::from_secs(600));
        assert_eq!(config.webhooks.timeout, Duration::from_secs(2));
        assert_eq!(Config::default().webhooks, WebhookConfig::default());
        assert!(FileConfig::parse("[webhooks]\nsecrets = \"x\"").is_err());
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let error = FileConfig::parse("[server]\nconcurency = 3").unwrap_err();
        assert!(error.to_string().contains("concurency"));
    }

    #[test]
    fn auth_defaults_to_off_only_on_loopback() {
        let on_loopback = Config::resolve(Settings::default(), FileConfig::default());
        assert!(!on_loopback.auth.enabled);
        let exposed = Settings {
            listen: Some("0.0.0.0:50051".parse().unwrap()),
            ..Settings::default()
        };
        assert!(
            Config::resolve(exposed.clone(), FileConfig::default())
                .auth
                .enabled
        );
        let forced_off = Settings {
            auth: Some(Switch::Off),
            ..exposed
        };
        assert!(
            !Config::resolve(forced_off, FileConfig::default())
                .auth
                .enabled
        );
        let file = FileConfig::parse("[auth]\nenabled = true").unwrap();
        assert!(Config::resolve(Settings::default(), file).auth.enabled);
        let twice = FileConfig::parse("[server]\nauth = \"off\"\n[auth]\nenabled = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            twice.contains("both [server] auth and [auth] enabled"),
            "{twice}"
        );
    }

    #[test]
    fn quotas_have_defaults_and_per_tenant_overrides() {
        let file = FileConfig::parse(
            r#"
            [quotas]
            max_queued_jobs = 10
            submits_per_second = 2.5

            [quotas.tenants.big]
            max_queued_jobs = 1000
            submit_burst = 7

            [[auth.keys]]
            tenant = "big"
            key_sha256 = "00"
            "#,
        )
        .unwrap();
        let config = Config::resolve(Settings::default(), file);
        assert_eq!(config.executor.tenant_queue_limit("small"), Some(10));
        assert_eq!(config.executor.tenant_queue_limit("big"), Some(1000));
        assert_eq!(
            config.submit_rate,
            Some(Rate {
                per_second: 2.5,
                burst: 3
            })
        );
        assert_eq!(
            config.tenant_submit_rates.get("big"),
            Some(&Rate {
                per_second: 2.5,
                burst: 7
            })
        );
        assert_eq!(config.auth.keys.len(), 1);
        assert!(FileConfig::parse("[quotas]\nmax_queued = 3").is_err());
        assert!(FileConfig::parse("[quotas.tenants.a]\nmax_queued = 3").is_err());
        assert!(FileConfig::parse("[auth]\nenable = true").is_err());
    }

    #[test]
    fn tls_settings_come_from_flags_or_the_server_table() {
        let file = FileConfig::parse(
            "[server]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\ntls_client_ca = \"ca.pem\"",
        )
        .unwrap();
        let tls = Config::resolve(Settings::default(), file).tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("c.pem"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("ca.pem")));
        assert!(Config::default().tls.is_none());
    }
}
