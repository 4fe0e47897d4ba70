//! The `longrun` binary: `longrun serve` runs the service; the other subcommands are its
//! command-line client.

mod cli;

/// mimalloc instead of glibc's malloc: a server that decodes, encodes and frees many small
/// messages across threads spent a sixth to a third of its worker time in glibc's malloc and
/// free. Built with arenas committed on demand (`.cargo/config.toml`), which keeps resident
/// memory per idle watch stream level with glibc's. See BENCHMARKS.md, fifth session.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use longrun::{
    config::{Config, FileConfig, Settings, StoreKind},
    server::Server,
};

/// longrun: a gRPC service for long-running jobs, and its command-line client.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Runs the service (durable embedded store in ./longrun-data by default; no setup needed).
    Serve(ServeArgs),
    /// Prints the SHA-256 (hex) of an API key read from stdin, for `key_sha256` in the config
    /// file's `[[auth.keys]]`: the server is only ever given the hash.
    HashKey,
    /// Gives the space of removed jobs back to the file system: rewrites the database of a
    /// data directory no server is running on (SQLite's VACUUM). Needs free disk about the
    /// size of the database while it runs.
    Compact(DataDirArgs),
    /// Copies the database of a data directory to a new file, consistent and compact, while a
    /// server may be running on it. To restore, stop the server and put the copy in place of
    /// longrun.db in an empty data directory.
    Backup(BackupArgs),
    #[command(flatten)]
    Client(cli::Command),
}

#[derive(clap::Args)]
struct DataDirArgs {
    /// Directory of the embedded store.
    #[arg(long, env = "LONGRUN_DATA_DIR", default_value = "longrun-data")]
    data_dir: PathBuf,
}

#[derive(clap::Args)]
struct BackupArgs {
    /// The file to write the copy to; it must not exist yet.
    dest: PathBuf,
    #[command(flatten)]
    dir: DataDirArgs,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// A TOML config file: a `[server]` table with the settings below, and `[exec.commands.*]`,
    /// `[webhooks]`, `[quotas]` and `[auth]` (see docs/operations.md).
    #[arg(long, env = "LONGRUN_CONFIG")]
    config: Option<PathBuf>,
    /// How log lines are written to stderr: `text` for a person, `json` (one object a line,
    /// with the spans it happened in, such as the RPC and the job id) for a log collector.
    #[arg(long, value_enum, env = "LONGRUN_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    settings: Settings,
}

/// The forms `serve` writes its log in.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines, coloured at a terminal.
    Text,
    /// One JSON object a line: timestamp, level, target, fields, and the current span with
    /// the list of spans it is in.
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        // One line with every cause, never anyhow's backtrace (RUST_BACKTRACE is often set on
        // developers' machines, and a refused setting is not a crash).
        Command::Serve(args) => {
            let log_format = args.log_format;
            let result = serve(args).await;
            if log_format == LogFormat::Json
                && let Err(error) = &result
            {
                // A log collector reads every line as JSON, the last one too.
                tracing::error!("{error:#}");
                std::process::exit(1);
            }
            exit_on_error(result, 1)
        }
        // 2 for what the user gave, as the client commands exit on a usage mistake.
        Command::HashKey => exit_on_error(hash_key(), 2),
        Command::Compact(args) => exit_on_error(compact(&args.data_dir), 1),
        Command::Backup(args) => exit_on_error(backup(&args.dir.data_dir, &args.dest), 1),
        Command::Client(command) => std::process::exit(cli::run(command).await),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // PostgreSQL's NOTICEs ("relation … already exists, skipping" at every start) are not the
    // operator's business unless asked for.
    const DEFAULT_FILTER: &str = "info,tokio_postgres=warn";
    // RUST_LOG set but empty is taken as unset (an empty filter would hide all but errors,
    // the address served on included); one that does not parse is said so once logging is up.
    let (filter, bad_filter) = match std::env::var("RUST_LOG") {
        Ok(text) if !text.trim().is_empty() => {
            match tracing_subscriber::EnvFilter::try_new(&text) {
                Ok(filter) => (Some(filter), None),
                Err(error) => (None, Some(format!("{text:?}: {error}"))),
            }
        }
        Err(std::env::VarError::NotUnicode(_)) => (None, Some("is not UTF-8".to_owned())),
        _ => (None, None),
    };
    let filter = filter.unwrap_or_else(|| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        // Colours for a person at a terminal only, never escape codes in a log file.
        LogFormat::Text => log
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => log
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    if let Some(problem) = bad_filter {
        tracing::warn!("RUST_LOG {problem}; logging with the default filter {DEFAULT_FILTER:?}");
    }
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            // TOML's error quotes the line it is about, which may hold a database URL or a
            // webhook secret.
            FileConfig::parse(&text)
                .map_err(|error| {
                    anyhow::anyhow!(longrun::config::redact_secrets(&error.to_string()))
                })
                .with_context(|| format!("parsing config file {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let config = Config::resolve(args.settings, file);
    // Before the store is opened: opening a data directory migrates it, and a refused config
    // must not have upgraded a directory an older binary still serves.
    Server::check_config(&config).context("checking the configuration")?;
    // What this server runs with, in one line: what an operator checks first when it does
    // not behave as they thought they configured it.
    tracing::info!(
        config_file = args.config.as_ref().map(|path| tracing::field::display(path.display())),
        concurrency = config.executor.concurrency,
        max_queue_length = config.executor.max_queue_length,
        max_message_bytes = config.limits.max_message_bytes,
        retention = %humantime::format_duration(config.retention),
        shutdown_grace = %humantime::format_duration(config.shutdown_grace),
        auth = config.auth.enabled,
        tls = config.tls.is_some(),
        "settings"
    );
    if let Some(addr) = config
        .metrics_listen
        .filter(|addr| !addr.ip().is_loopback())
    {
        tracing::warn!(
            %addr,
            "metrics are served without authentication on a non-loopback address: whoever \
             reaches it reads job counts and action names"
        );
    }
    // Both bound before the store is opened too: a port in use is refused without having
    // created (or migrated) a data directory. Connections made meanwhile wait in the backlog.
    let listen = config.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("serving metrics on {addr}"))?,
        ),
        None => None,
    };
    let store = config
        .open_store()
        .await
        .with_context(|| match &config.store {
            StoreKind::Postgres(url) => {
                format!("opening the PostgreSQL store at {}", url.target())
            }
            _ => format!("opening the data directory {}", config.data_dir.display()),
        })?;
    match &config.store {
        StoreKind::Sqlite => {
            tracing::info!(dir = %config.data_dir.display(), "using the SQLite store");
        }
        StoreKind::Postgres(_) => tracing::info!("using the PostgreSQL store"),
        StoreKind::Memory => {
            tracing::warn!("using the memory store: jobs do not survive a restart");
        }
    }
    // Before recovery runs their jobs again: what `exec` commands of a server killed with
    // SIGKILL started would otherwise run on beside the new attempts.
    #[cfg(target_os = "linux")]
    longrun::actions::kill_orphaned_commands();
    let registry = config.registry();
    let mut server = Server::start(store, registry, config)
        .await
        .context("starting the server")?;
    if let Some(listener) = metrics_listener {
        server = server.with_metrics_listener(listener);
    }
    server
        .serve(listener, shutdown_signal())
        .await
        .context("serving")?;
    Ok(())
}

/// Ends a command that is not a server: its error on stderr as the client commands print
/// theirs, `error:` and the causes (without the backtrace `main` would add under
/// `RUST_BACKTRACE`), and exit `code`.
fn exit_on_error(result: anyhow::Result<()>, code: i32) -> anyhow::Result<()> {
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(code);
    }
    Ok(())
}

fn compact(dir: &std::path::Path) -> anyhow::Result<()> {
    let compacted = longrun::store::compact(dir)
        .with_context(|| format!("compacting the data directory {}", dir.display()))?;
    cli::write_line(&format!(
        "compacted {}: {} bytes before, {} after",
        dir.display(),
        compacted.before,
        compacted.after
    ))?;
    Ok(())
}

fn backup(dir: &std::path::Path, dest: &std::path::Path) -> anyhow::Result<()> {
    let size = longrun::store::backup(dir, dest).with_context(|| {
        format!(
            "backing up the data directory {} to {}",
            dir.display(),
            dest.display()
        )
    })?;
    cli::write_line(&format!(
        "backed up {} to {} ({size} bytes)",
        dir.display(),
        dest.display()
    ))?;
    Ok(())
}

/// Reads a key from stdin (one line; surrounding whitespace is not part of it) and prints its
/// hash.
fn hash_key() -> anyhow::Result<()> {
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        // Otherwise it sits there silently, waiting for a line.
        eprintln!("API key (shown as typed; end with Enter):");
    }
    let mut key = String::new();
    std::io::stdin()
        .read_line(&mut key)
        .context("reading the key from stdin")?;
    let key = key.trim();
    anyhow::ensure!(
        !key.is_empty(),
        "no key on stdin: pipe the key in, e.g. `echo -n \"$KEY\" | longrun hash-key`"
    );
    // A key a client could never send in an `authorization` header would match nothing.
    anyhow::ensure!(
        cli::is_sendable_key(key),
        "the key must be printable ASCII (as clients send it in the authorization header)"
    );
    // Not `println!`, which panics on a closed stdout.
    cli::write_line(&hex::encode(longrun::api::auth::hash_key(key)))?;
    Ok(())
}

/// Completes on SIGINT or SIGTERM; from then on, a second one ends the process at once.
async fn shutdown_signal() {
    signalled().await;
    tracing::info!(
        "shutting down: running jobs get the shutdown grace period; a second Ctrl-C or SIGTERM \
         stops at once"
    );
    tokio::spawn(async {
        signalled().await;
        // What a kill -9 leaves is what recovery picks up at the next start: every
        // acknowledged change is on disk already.
        tracing::warn!(
            "second signal: stopping now; unfinished jobs are recovered at the next start"
        );
        std::process::exit(130);
    });
}

/// Completes on the next SIGINT or SIGTERM. Not SIGHUP: a server started under `nohup`
/// ignores it, as it should, and a handler installed here would replace that.
async fn signalled() {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
