//! Generates the gRPC code and the descriptor set served by reflection, from `proto/` alone:
//! `protox` parses the files in-process, so building needs no `protoc` and downloads nothing.

use std::{env, fs, path::PathBuf};

/// The served files: longrun's own contract, the upstream `google.longrunning` API that the
/// Operations facade implements, and the rich error details our errors carry, so reflection
/// clients (grpcurl, buf curl) can decode them (vendored unchanged under `proto/third_party`).
const PROTO_FILES: &[&str] = &[
    "longrun/v1/jobs.proto",
    "google/longrunning/operations.proto",
    "google/rpc/error_details.proto",
];

/// Where imports resolve: our files first, then the vendored upstream ones. The well-known
/// types (`google/protobuf/*`) come with protox.
const INCLUDES: &[&str] = &["proto", "proto/third_party"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTO_FILES, INCLUDES)?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("longrun_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .bytes(".longrun.v1.ActionSpec.input")
        // A job's labels in key order on the wire: the same job then always encodes to the
        // same bytes (clients compare and cache responses, operations especially, by them).
        .btree_map(".longrun.v1.Job.labels")
        // `google.rpc.Status` and its detail messages already exist in tonic-types, which the
        // rich error model uses; one type for both keeps conversions away.
        .extern_path(".google.rpc", "::tonic_types::pb")
        // tonic-prost's codec, with params nested past protobuf's recursion limit refused as
        // bad input (see `src/api/codec.rs`).
        .codec_path("crate::api::codec::LongrunCodec")
        .compile_fds(descriptors)?;

    // The benchmark harness's bare echo service: not part of the public contract, only
    // compiled into `benches/`.
    println!("cargo:rerun-if-changed=benches/proto");
    let echo = protox::compile(["echo.proto"], ["benches/proto"])?;
    tonic_prost_build::configure().compile_fds(echo)?;
    Ok(())
}
