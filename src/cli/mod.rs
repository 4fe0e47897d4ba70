//! The command-line client: `submit`, `status`, `watch`, `wait`, `cancel`, `list` and
//! `actions`, each a thin layer over one `longrun.v1.Jobs` call (see `docs/cli.md`).
//!
//! Every subcommand prints the response in text or proto3 JSON (`--output`), and reports the
//! outcome in its exit code (see [`exit`]), so scripts can branch on a job's fate.

mod bars;
mod commands;
mod error;
mod json;
mod reconnect;
mod submit;
mod text;
mod wait;
mod watch;
mod watch_jobs;

use std::{
    io::Write as _,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use longrun::{
    api::pb::{self, jobs_client::JobsClient},
    job::{TRACEPARENT_ENV, TRACESTATE_ENV, TraceContext},
};
use tonic::{
    codec::CompressionEncoding,
    metadata::{Ascii, MetadataValue},
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

pub use commands::{ActionsArgs, CancelArgs, DeleteArgs, ListArgs, StatusArgs};
pub use submit::SubmitArgs;
pub use wait::WaitArgs;
pub use watch::WatchArgs;
pub use watch_jobs::WatchJobsArgs;

/// Exit codes, shared by every subcommand and documented in `docs/cli.md`.
pub mod exit {
    /// The command did what was asked; for commands that follow a job, it SUCCEEDED.
    pub const OK: i32 = 0;
    /// The job ended FAILED.
    pub const JOB_FAILED: i32 = 1;
    /// The command line was malformed (clap's own code, kept apart from the job outcomes).
    pub const USAGE: i32 = 2;
    /// The job ended CANCELLED.
    pub const JOB_CANCELLED: i32 = 3;
    /// The wait ran out before the job ended (`wait`, `submit --wait`).
    pub const NOT_DONE: i32 = 4;
    /// The command could not be carried out: bad input, an RPC error, the server unreachable.
    pub const ERROR: i32 = 5;
}

/// The exit codes, as `--help` shows them for the commands that do not follow a job.
const PLAIN_EXIT_CODES_HELP: &str = "Exit codes: 0 done, 2 a mistake on the command line, \
5 any other error (the server unreachable, an RPC error such as NOT_FOUND).";

/// The exit codes, as `--help` shows them for the commands that wait for a job with a time
/// limit (`submit`, `wait`).
const EXIT_CODES_HELP: &str = "Exit codes: 0 the job SUCCEEDED, 1 it FAILED, 3 it was CANCELLED, \
4 the wait ran out first, 2 a mistake on the command line, 5 any other error \
(the server unreachable, an RPC error).";

/// The exit codes, as `watch --help` shows them: it follows the job to its end, with no time
/// limit, so never 4.
const WATCH_EXIT_CODES_HELP: &str = "Exit codes: 0 the job SUCCEEDED, 1 it FAILED, 3 it was \
CANCELLED, 2 a mistake on the command line, 5 any other error (the server unreachable, an RPC \
error).";

/// The client subcommands, flattened into the binary's own subcommand list.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Submits a job; with --watch, follows it with live progress bars.
    Submit(SubmitArgs),
    /// Prints a job's current snapshot.
    Status(StatusArgs),
    /// Follows a job until it ends, reconnecting by itself if the connection drops.
    Watch(WatchArgs),
    /// Prints every change of the jobs carrying some labels as it happens, one stream for all
    /// of them; with --until-done, until they have all ended.
    WatchJobs(WatchJobsArgs),
    /// Waits (without streaming) until a job ends or the timeout runs out.
    Wait(WaitArgs),
    /// Cancels a job.
    Cancel(CancelArgs),
    /// Removes a finished job now, rather than when retention would.
    Delete(DeleteArgs),
    /// Lists jobs, newest first.
    List(ListArgs),
    /// Lists the actions the server runs, with their params.
    Actions(ActionsArgs),
}

/// Options every client subcommand takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// The server's address (a bare host:port means plaintext http://host:port; https://
    /// means TLS).
    #[arg(long, env = "LONGRUN_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// The API key to send (as `authorization: Bearer <key>`) to a server that requires one.
    /// Prefer the environment variable: a flag shows in the process list.
    #[arg(long, env = "LONGRUN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A PEM CA certificate to trust for an https:// server, instead of the system roots.
    #[arg(long, env = "LONGRUN_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// A PEM client certificate, for a server that requires one (mTLS); needs --client-key.
    #[arg(long, env = "LONGRUN_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --client-cert.
    #[arg(long, env = "LONGRUN_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<std::path::PathBuf>,
    /// How to print responses: a readable summary, or proto3 JSON (one object per line).
    #[arg(long, value_enum, ignore_case = true, default_value_t = Format::Text)]
    pub output: Format,
}

impl Command {
    /// The connection options every subcommand has.
    fn client(&self) -> &ClientArgs {
        match self {
            Command::Submit(args) => &args.client,
            Command::Status(args) => &args.client,
            Command::Cancel(args) => &args.client,
            Command::Delete(args) => &args.client,
            Command::Watch(args) => &args.client,
            Command::WatchJobs(args) => &args.client,
            Command::Wait(args) => &args.client,
            Command::List(args) => &args.client,
            Command::Actions(args) => &args.client,
        }
    }
}

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A readable summary.
    Text,
    /// Proto3 canonical JSON of each response message, one per line (as grpcurl shows it).
    Json,
}

/// How long to try to open a connection before calling the server unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often to ping an idle connection, so a watch on a connection that died silently (a
/// dropped NAT entry, a peer gone without a FIN) fails and resumes instead of hanging forever.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection counts as dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The largest response accepted: the server's own default maximum message size.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Runs a client subcommand and returns the process exit code. Errors are printed here, on
/// stderr, so that `main` only has to exit with the code.
pub async fn run(command: Command) -> i32 {
    let connection = {
        let client = command.client();
        error::Connection {
            tls: client.addr.starts_with("https://"),
            client_certificate: client.client_cert.is_some(),
        }
    };
    let result = match command {
        Command::Submit(args) => submit::run(args).await,
        Command::Status(args) => commands::status(args).await,
        Command::Watch(args) => watch::run(args).await,
        Command::WatchJobs(args) => watch_jobs::run(args).await,
        Command::Wait(args) => wait::run(args).await,
        Command::Cancel(args) => commands::cancel(args).await,
        Command::Delete(args) => commands::delete(args).await,
        Command::List(args) => commands::list(args).await,
        Command::Actions(args) => commands::actions(args).await,
    };
    let code = result.unwrap_or_else(|error| {
        eprintln!("{}", error::report(&error));
        if let Some(hint) = error::transport_hint(&error, connection) {
            eprintln!("  ({hint})");
        }
        if error::is_usage(&error) {
            exit::USAGE
        } else {
            exit::ERROR
        }
    });
    // `process::exit` skips destructors, so flush what is still buffered first.
    let _ = std::io::stdout().flush();
    code
}

/// The printing half of a command: the format and the JSON transcoder.
pub(crate) struct Printer {
    format: Format,
    json: json::Json,
    /// Whether stdout was closed by its reader (`| head -1`): nothing more is printed.
    closed: AtomicBool,
}

impl Printer {
    fn new(format: Format) -> anyhow::Result<Self> {
        Ok(Self {
            format,
            json: json::Json::new()?,
            closed: AtomicBool::new(false),
        })
    }

    /// Whether nobody reads stdout any more, so a command may skip output-only work.
    fn closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Prints `message` (of proto type `full_name`) as one JSON line, or `text` of it.
    fn print<M: prost::Message>(
        &self,
        message: &M,
        full_name: &str,
        text: impl FnOnce(&json::Json) -> String,
    ) -> anyhow::Result<()> {
        let line = match self.format {
            Format::Json => self.json.encode(message, full_name)?,
            // Nothing to say (an empty page of `list`) is no output, not a blank line.
            Format::Text => match text(&self.json) {
                text if text.is_empty() => return Ok(()),
                text => text,
            },
        };
        if !self.closed() && !write_line(&line)? {
            self.closed.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Writes `line` to stdout; `Ok(false)` once its reader has gone. The reader has what it
/// wanted (`ID=$(longrun submit ... | head -1)`): that ends the output, not the command, whose
/// exit code still tells how it went.
pub(crate) fn write_line(line: &str) -> anyhow::Result<bool> {
    match writeln!(std::io::stdout().lock(), "{line}") {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(error) => Err(error).context("writing to stdout"),
    }
}

/// What every call carries besides its message: the API key and the trace context, when
/// there are.
#[derive(Clone)]
pub(crate) struct CallHeaders(Vec<(&'static str, MetadataValue<Ascii>)>);

impl tonic::service::Interceptor for CallHeaders {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        for (name, value) in &self.0 {
            request.metadata_mut().insert(*name, value.clone());
        }
        Ok(request)
    }
}

/// The trace context the CLI was started in (`TRACEPARENT` and `TRACESTATE`, as
/// OpenTelemetry passes them to a process), sent with every call so that a job submitted from
/// a traced script or CI step joins its trace. Invalid values are ignored, as a server ignores
/// invalid headers; a state goes only with a valid trace context.
fn trace_context_from_env() -> Option<TraceContext> {
    let from_env = |name: &str| std::env::var(name).ok();
    Some(TraceContext {
        parent: from_env(TRACEPARENT_ENV)?.trim().parse().ok()?,
        state: from_env(TRACESTATE_ENV).and_then(|state| state.parse().ok()),
    })
}

/// A client of `longrun.v1.Jobs` that sends the API key and the trace context.
pub(crate) type Client = JobsClient<InterceptedService<Channel, CallHeaders>>;

/// Opens a channel to the server (over TLS for https://), or explains plainly that it cannot
/// be reached.
async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    let addr = args.addr.as_str();
    let uri = endpoint_uri(addr)?;
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| error::Usage(format!("--addr {addr:?} is not a valid address: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let wants_tls = args.ca_cert.is_some() || args.client_cert.is_some();
    if uri.starts_with("https://") || wants_tls {
        if !uri.starts_with("https://") {
            return Err(error::Usage(
                "--ca-cert and --client-cert need an https:// --addr".to_owned(),
            )
            .into());
        }
        // A file that cannot be read, or that does not hold what its flag takes, is a mistake
        // on the command line, as for --file: not a connection failure (exit 5) blamed on the
        // server's certificate or a TLS handshake.
        use longrun::config::{
            PEM_CERTIFICATE as CERTIFICATE, PEM_PRIVATE_KEY as PRIVATE_KEY, read_pem,
        };
        let read = |flag: &str, path: &std::path::Path, holds: &[&str], what: &str| {
            read_pem(path, holds, what)
                .map_err(|problem| error::Usage(format!("{flag}: {problem}")))
        };
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &args.ca_cert {
            let pem = read("--ca-cert", ca, CERTIFICATE, "certificate")?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
            tls = tls.identity(Identity::from_pem(
                read("--client-cert", cert, CERTIFICATE, "certificate")?,
                read("--client-key", key, PRIVATE_KEY, "private key")?,
            ));
        }
        endpoint = endpoint
            .tls_config(tls)
            .context("setting up TLS for the connection")?;
    }
    let key = args.api_key.as_deref().map(bearer).transpose()?.flatten();
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| error::Unreachable::new(addr, &source))?;
    // Offered so that a server told to compress its responses (`--response-compression`)
    // does so for the CLI too, which helps over slow links.
    let trace = trace_context_from_env();
    let trace_headers = trace
        .iter()
        .flat_map(TraceContext::headers)
        // Checked values, so always valid header values.
        .filter_map(|(name, value)| Some((name, value.parse().ok()?)));
    let headers = key
        .map(|key| ("authorization", key))
        .into_iter()
        .chain(trace_headers)
        .collect();
    Ok(JobsClient::with_interceptor(channel, CallHeaders(headers))
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate)
        .max_decoding_message_size(MAX_MESSAGE_BYTES))
}

/// The URI to connect to for `--addr`: a bare `host:port` is plaintext `http://host:port`;
/// `http://` and `https://` are taken as given, their port defaulting to 80 and 443.
///
/// Checked here rather than left to the connection: a missing or malformed port would
/// otherwise reach port 80 (or a port the URI parser made of it) and be reported as a server
/// that is not running, exit code 5, when the mistake is on the command line.
fn endpoint_uri(addr: &str) -> Result<String, error::Usage> {
    let mistake = |why: &str| error::Usage(format!("--addr {addr:?} {why}"));
    let (uri, bare) = match addr.split_once("://") {
        None => (format!("http://{addr}"), true),
        // Schemes are case-insensitive (RFC 3986); the rest of the code reads them lowercase.
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
        {
            (format!("{}://{rest}", scheme.to_ascii_lowercase()), false)
        }
        // Anything else would be sent as plaintext HTTP/2 all the same, hiding the mistake.
        Some((scheme, _)) => {
            return Err(mistake(&format!(
                "uses {scheme}://, which is not supported; use host:port, http://host:port or \
                 https://host:port"
            )));
        }
    };
    let parsed: tonic::transport::Uri = uri
        .parse()
        .map_err(|e| mistake(&format!("is not a valid address: {e}")))?;
    let authority = parsed
        .authority()
        .filter(|a| !a.host().is_empty())
        .ok_or_else(|| mistake("has no host"))?;
    if authority.as_str().contains('@') {
        return Err(mistake(
            "has credentials (user@), which would not be sent; give an API key with --api-key",
        ));
    }
    if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() {
        return Err(mistake(
            "has a path; give only the scheme, host and port of the server",
        ));
    }
    // Not `Authority::port`, which reads a port that is not a number as no port at all.
    let after_host = match authority.as_str().rfind(']') {
        Some(bracket) => &authority.as_str()[bracket + 1..],
        None => authority.as_str(),
    };
    match after_host.rsplit_once(':').map(|(_, port)| port) {
        Some("") => return Err(mistake("has an empty port")),
        Some(port) => match port.parse::<u16>() {
            Ok(number) if number > 0 => {}
            _ => {
                return Err(mistake(&format!(
                    "has port {port:?}, which is not a port number (1 to 65535)"
                )));
            }
        },
        None if bare => {
            return Err(mistake(
                "has no port; use host:port (e.g. 127.0.0.1:50051), or http:// or https:// \
                 for their default ports",
            ));
        }
        None => {}
    }
    Ok(uri)
}

/// Whether an API key can be sent in an `authorization` header: printable ASCII.
pub(crate) fn is_sendable_key(key: &str) -> bool {
    key.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
}

/// The `authorization` value for an API key; none for an empty key (`LONGRUN_API_KEY=` set
/// but empty means no key, as unset does). Checked here, since a header takes bytes that are
/// not printable ASCII (UTF-8 among them) and a server would only answer that the key is not
/// valid.
fn bearer(key: &str) -> Result<Option<MetadataValue<Ascii>>, error::Usage> {
    let key = key.trim();
    if key.is_empty() {
        return Ok(None);
    }
    if !is_sendable_key(key) {
        return Err(error::Usage(
            "--api-key (or LONGRUN_API_KEY) must be printable ASCII (as API keys are)".to_owned(),
        ));
    }
    format!("Bearer {key}").parse().map(Some).map_err(|_| {
        error::Usage("--api-key (or LONGRUN_API_KEY) must be printable ASCII".to_owned())
    })
}

/// The exit code for a job in `state` at the end of a command that followed it.
fn job_exit_code(job: &pb::Job) -> i32 {
    match job.state() {
        pb::JobState::Succeeded => exit::OK,
        pb::JobState::Failed => exit::JOB_FAILED,
        pb::JobState::Cancelled => exit::JOB_CANCELLED,
        pb::JobState::Unspecified | pb::JobState::Queued | pb::JobState::Running => exit::NOT_DONE,
    }
}

/// Whether a job has reached a state that never changes again.
fn is_terminal(job: &pb::Job) -> bool {
    matches!(
        job.state(),
        pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled
    )
}

/// Parses a human duration such as `30s`, `1m30s` or `250ms`.
fn parse_duration(text: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(text)
}

/// A duration as the wire type, refusing the ones protobuf cannot carry.
fn wire_duration(flag: &str, duration: Duration) -> anyhow::Result<prost_types::Duration> {
    prost_types::Duration::try_from(duration)
        .map_err(|_| anyhow::anyhow!("{flag}: {duration:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::{bearer, endpoint_uri};

    #[test]
    fn an_api_key_must_be_printable_ascii_and_an_empty_one_is_none() {
        assert_eq!(bearer(" k3y-_.~ \n").unwrap().unwrap(), "Bearer k3y-_.~");
        assert_eq!(bearer("").unwrap(), None, "an empty key is no key");
        assert_eq!(bearer("  ").unwrap(), None);
        for (key, why) in [
            ("ключ", "printable ASCII"),
            ("a\u{7f}b", "printable ASCII"),
            ("a\tb", "printable ASCII"),
        ] {
            let refused = bearer(key).expect_err(key).0;
            assert!(refused.contains(why), "{key:?}: {refused}");
        }
    }

    #[test]
    fn a_bare_host_and_port_is_plaintext_and_schemes_are_kept() {
        assert_eq!(
            endpoint_uri("127.0.0.1:50051").unwrap(),
            "http://127.0.0.1:50051"
        );
        assert_eq!(endpoint_uri("[::1]:7").unwrap(), "http://[::1]:7");
        assert_eq!(
            endpoint_uri("https://jobs.example.com").unwrap(),
            "https://jobs.example.com"
        );
        assert_eq!(
            endpoint_uri("http://localhost:65535/").unwrap(),
            "http://localhost:65535/"
        );
        assert_eq!(
            endpoint_uri("HTTPS://jobs.example.com:443").unwrap(),
            "https://jobs.example.com:443",
            "schemes are case-insensitive"
        );
    }

    #[test]
    fn addresses_without_a_usable_port_or_host_are_refused_naming_the_flag() {
        for (addr, why) in [
            ("localhost", "has no port"),
            ("[::1]", "has no port"),
            ("localhost:abc", "not a port number"),
            ("localhost:99999", "not a port number"),
            ("localhost:0", "not a port number"),
            ("http://localhost:", "empty port"),
            ("localhost:", "empty port"),
            ("http://localhost:50051/jobs", "has a path"),
            ("ftp://localhost:21", "not supported"),
            ("http://user:pw@localhost:50051", "credentials"),
            ("http://", "address"),
        ] {
            let refused = endpoint_uri(addr).expect_err(addr).0;
            assert!(
                refused.starts_with(&format!("--addr {addr:?}")),
                "{addr}: {refused}"
            );
            assert!(refused.contains(why), "{addr}: {refused}");
        }
    }
}
