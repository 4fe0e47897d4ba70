//! longrun: a gRPC service for long-running jobs. Submit work, get a job id at once, and have
//! every state change and progress update pushed over a stream instead of polling for it.
//!
//! As a library it runs the same server with your own actions:
//!
//! ```no_run
//! use std::sync::Arc;
//! use longrun::{actions::Registry, config::Config, server::Server, store::MemoryStore};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut registry = Registry::with_builtins();
//! # #[cfg(any())]
//! registry.register("resize", MyResizeHandler); // any longrun::actions::Handler
//! let server = Server::start(Arc::new(MemoryStore::new()), registry, Config::default()).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
//! server.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
// `deny`, not `forbid`: one audited exception, `actions::exec::process::die_with_server`.
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

pub mod actions;
pub mod api;
mod cancelled;
pub mod config;
pub mod events;
pub mod executor;
pub mod job;
mod log_throttle;
pub mod metrics;
pub mod server;
pub mod store;
pub mod webhooks;

/// `error` followed by each of its causes, `: `-separated: some libraries' own text says
/// only "transport error", and the reason is in the causes.
pub(crate) fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // An error that writes its source into its own text (`job …: {source}`) has said it.
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
