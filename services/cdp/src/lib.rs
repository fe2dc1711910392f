//! The CDP's binaries. `cdp dev` installs every service side by side on one
//! gRPC server and one HTTP server, on whichever back ends the
//! configuration names (embedded by default); the per-service binaries
//! (`src/bin/cdp-ingest.rs`, ...) install one each. Only binaries link
//! `cdp-wiring` (the back ends and the allocator): the service libraries
//! see the ports. The operators' commands (`cdp replay`, `cdp rebuild`,
//! `cdp generations`) are gRPC clients of a running process.

pub mod access;
pub mod parquet;
pub mod rebuild;
pub mod replay;

use cdp_runtime::serve::{Context, Parts, StartError};

/// Installs every service.
pub async fn install_all(ctx: &Context, parts: &mut Parts) -> Result<(), StartError> {
    cdp_identity::install(ctx, parts).await?;
    cdp_profile::install(ctx, parts).await?;
    cdp_ingest::install(ctx, parts).await?;
    cdp_query::install(ctx, parts).await?;
    cdp_projection::install(ctx, parts).await?;
    Ok(())
}
