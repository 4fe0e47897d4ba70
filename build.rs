//! Generates the gRPC code and the descriptor set served by reflection, from `proto/` alone:
//! `protox` parses the files in-process, so building needs no `protoc` and downloads nothing.

use std::{env, fs, path::PathBuf};

const PROTO_FILES: &[&str] = &["longrun/v1/jobs.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTO_FILES, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("longrun_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .bytes(".longrun.v1.ActionSpec.input")
        .compile_fds(descriptors)?;

    // The benchmark harness's bare echo service: not part of the public contract, only
    // compiled into `benches/`.
    println!("cargo:rerun-if-changed=benches/proto");
    let echo = protox::compile(["echo.proto"], ["benches/proto"])?;
    tonic_prost_build::configure().compile_fds(echo)?;
    Ok(())
}
