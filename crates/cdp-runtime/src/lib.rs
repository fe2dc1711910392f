//! Shared plumbing for the CDP services: configuration, telemetry,
//! shutdown and the one place where errors become gRPC statuses.

pub mod config;
pub mod error;
pub mod shutdown;
pub mod telemetry;

pub use config::{ConfigError, PlatformConfig};
pub use error::ServiceError;
