//! The whole platform in one process (`cdp dev`): ingest, identity, profile
//! and query installed side by side on one gRPC server and one HTTP server,
//! on whichever back ends the configuration names (embedded by default).
//! The per-service binaries (`cdp-ingest`, ...) install one each.

pub mod parquet;
pub mod rebuild;
pub mod replay;

use std::net::SocketAddr;
use std::sync::Arc;

use cdp_log::EventLog;
use cdp_runtime::PlatformConfig;
use cdp_runtime::serve::{self, Context, Parts, StartError};
use tokio_util::sync::CancellationToken;

/// Installs every service.
pub async fn install_all(ctx: &Context, parts: &mut Parts) -> Result<(), StartError> {
    cdp_identity::install(ctx, parts).await?;
    cdp_profile::install(ctx, parts).await?;
    cdp_ingest::install(ctx, parts).await?;
    cdp_query::install(ctx, parts).await?;
    Ok(())
}

/// A running platform.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The event log, for operators' and benchmarks' questions (lag).
    pub log: Arc<dyn EventLog>,
    inner: serve::Running,
}

impl Running {
    /// Waits until every task has stopped (after the cancellation token fired).
    pub async fn wait(self) {
        self.inner.wait().await;
    }
}

/// Starts every service in this process. Stops when `cancel` fires: the
/// servers stop taking requests, workers finish and commit their batch.
pub async fn start(
    config: &PlatformConfig,
    cancel: CancellationToken,
) -> Result<Running, StartError> {
    let ctx = Context::open(config.clone(), cancel.clone()).await?;
    let mut parts = Parts::new()?;
    ctx.watch_generations(&mut parts);
    install_all(&ctx, &mut parts).await?;
    let inner = serve::serve(parts, config, cancel).await?;
    let http_addr = inner.http_addr.unwrap_or(config.http.addr);
    tracing::info!(grpc = %inner.grpc_addr, http = %http_addr, data_dir = %config.data_dir.display(), "cdp is ready");
    Ok(Running {
        grpc_addr: inner.grpc_addr,
        http_addr,
        log: Arc::clone(&ctx.backends.log),
        inner,
    })
}
