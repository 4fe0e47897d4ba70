//! longrun: a gRPC service for long-running jobs.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod job;
pub mod store;
pub mod actions;
pub mod events;
