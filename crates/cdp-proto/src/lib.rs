//! The `cdp.v1` API, generated from `proto/` at build time, and the
//! conversions between its messages and the domain model. The encoding of
//! log records lives with the rest of the pipeline's contract, in
//! `cdp-pipeline`.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("cdp.v1");

    /// Encoded descriptors of every `cdp.v1` file, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cdp_v1_descriptor");
}

pub mod client;
pub mod codec;
pub mod convert;
