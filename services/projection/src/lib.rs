//! Projection administration and replay: what operators and analysts do
//! with the log as a whole, apart from the customer view.
//!
//! - [`rebuild`]: fold the log again into a new projection generation while
//!   the active one serves, then switch to it;
//! - [`grpc`]: `ProjectionService` (rebuilds, generations, pipeline lag);
//! - [`compare`]: what activating a shadow generation would change;
//! - [`replay`]: `ReplayService`, the touchpoints streamed back, filtered,
//!   with a resumable cursor.

use std::sync::Arc;

use cdp_proto::v1::projection_service_server::ProjectionServiceServer;
use cdp_proto::v1::replay_service_server::ReplayServiceServer;
use cdp_runtime::serve::{Context, Parts, StartError};

pub mod compare;
pub mod grpc;
pub mod rebuild;
pub mod replay;

/// Installs `ProjectionService` and `ReplayService` in a process.
pub async fn install(ctx: &Context, parts: &mut Parts) -> Result<(), StartError> {
    let rebuilder = rebuild::Rebuilder::new(
        Arc::clone(&ctx.backends.log),
        Arc::clone(ctx.backends.live.generations()),
        Arc::clone(&ctx.rules),
        ctx.config.fold_options(),
        ctx.consumer_options("rebuild"),
        ctx.cancel.clone(),
        Arc::clone(&ctx.backends.keyring),
    )
    .with_audiences(Arc::clone(&ctx.audiences));
    // Replay resolves a customer lookup the way the view does.
    let query = cdp_query::ProfileQuery::new(
        Arc::clone(&ctx.backends.live),
        Arc::clone(&ctx.rules),
        ctx.config.fold_options(),
        ctx.changes.clone(),
        Arc::clone(&ctx.backends.keyring),
    );
    parts
        .health
        .set_serving::<ProjectionServiceServer<grpc::ProjectionGrpc>>()
        .await;
    parts
        .health
        .set_serving::<ReplayServiceServer<replay::ReplayGrpc>>()
        .await;
    parts
        .grpc
        .add_service(ProjectionServiceServer::new(grpc::ProjectionGrpc::new(
            rebuilder,
            Arc::clone(&ctx.access),
            grpc::SwitchGuards {
                max_lag: ctx.config.pipeline.activation_max_lag,
                drop_grace: std::time::Duration::from_secs(ctx.config.pipeline.drop_grace_secs),
            },
        )))
        .add_service(ReplayServiceServer::new(replay::ReplayGrpc::new(
            Arc::clone(&ctx.backends.log),
            query,
            Arc::clone(&ctx.access),
        )));
    Ok(())
}
