//! Compiles `proto/cdp/v1` with a vendored protoc: no system protoc needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> = [
        "touchpoint",
        "ingest",
        "profile",
        "log",
        "admin",
        "identity",
        "replay",
        "projection",
        "access",
        "privacy",
        "audience",
    ]
    .iter()
    .map(|name| root.join(format!("cdp/v1/{name}.proto")))
    .collect();
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Every message's cost is bounded before it is decoded.
        .codec_path("crate::codec::GuardedCodec")
        .file_descriptor_set_path(out.join("cdp_v1_descriptor.bin"))
        .compile_with_config(
            config,
            &protos,
            &[root, protoc_bin_vendored::include_path()?],
        )?;
    Ok(())
}
