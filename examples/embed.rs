//! The README's "As a library" example, kept compiling by `cargo test` (which builds
//! examples): `cargo run --example embed` serves on 127.0.0.1:50051 until Ctrl-C.

use longrun::{actions::Registry, config::Config, server::Server, store::MemoryStore};
use std::sync::Arc;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // longrun logs through `tracing` (its warnings too: no auth, plaintext off loopback).
    tracing_subscriber::fmt::init();
    #[allow(unused_mut)] // mutable for the register call below
    let mut registry = Registry::with_builtins();
    // registry.register("resize", MyResize); // any type implementing longrun::actions::Handler
    let store = Arc::new(MemoryStore::new()); // or SqliteStore::open("./longrun-data", Default::default())?
    let server = Server::start(store, registry, Config::default()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
    server
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
