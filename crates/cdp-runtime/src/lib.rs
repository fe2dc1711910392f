//! Shared plumbing for the CDP services: configuration, telemetry,
//! shutdown and the one place where errors become gRPC statuses.

pub mod backend;
pub mod config;
pub mod error;
pub mod generation;
pub mod serve;
pub mod shutdown;
pub mod telemetry;
pub mod trace;

pub use config::{ConfigError, PlatformConfig};
pub use error::ServiceError;

/// Every binary linking the runtime allocates with mimalloc: with many
/// worker threads folding JSON, glibc's per-thread arenas fragment and hold
/// on to freed memory (peak RSS measured by `make bench`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Milliseconds since the Unix epoch, by the system clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
