//! The scaffolding of a CDP process: the services it installs, gRPC and
//! HTTP serving, telemetry, graceful shutdown, and the one error model
//! (one code, mapped to a gRPC status and to an HTTP status). It sees the
//! ports only: which back ends fill them is `cdp-wiring`'s choice.

pub mod audiences;
pub mod audit;
pub mod auth;
pub mod error;
pub mod limits;
pub mod serve;
pub mod shutdown;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod trace;

/// The configuration (`cdp-config`), as services read it.
pub use cdp_config as config;
pub use cdp_config::{ConfigError, PlatformConfig};
pub use error::{ErrorCode, ServiceError};

/// Where a worker reads the time (ms since the Unix epoch): the system
/// clock in a process ([`system_clock`]), one moved by hand in tests.
pub type Clock = std::sync::Arc<dyn Fn() -> i64 + Send + Sync>;

/// [`now_ms`] as a [`Clock`].
pub fn system_clock() -> Clock {
    std::sync::Arc::new(now_ms)
}

/// Milliseconds since the Unix epoch, by the system clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
