//! Installs the query side in a process: `ProfileService`,
//! `IdentityService`, `AccessService`, `PrivacyService` and
//! `AudienceService` over gRPC and the agent console
//! over HTTP.

use std::sync::Arc;

use cdp_proto::v1::access_service_server::AccessServiceServer;
use cdp_proto::v1::audience_service_server::AudienceServiceServer;
use cdp_proto::v1::identity_service_server::IdentityServiceServer;
use cdp_proto::v1::privacy_service_server::PrivacyServiceServer;
use cdp_proto::v1::profile_service_server::ProfileServiceServer;
use cdp_runtime::serve::{Context, Parts, StartError};

use crate::access::AccessGrpc;
use crate::audiences::AudienceGrpc;
use crate::grpc::{IdentityGrpc, ProfileGrpc};
use crate::privacy::PrivacyGrpc;

use crate::{ProfileQuery, console, follow};

pub async fn install(ctx: &Context, parts: &mut Parts) -> Result<(), StartError> {
    let query = ProfileQuery::new(
        Arc::clone(&ctx.backends.live),
        Arc::clone(&ctx.rules),
        ctx.config.fold_options(),
        ctx.changes.clone(),
        Arc::clone(&ctx.backends.keyring),
    )
    .with_history(Arc::clone(&ctx.backends.log))
    .with_audiences(Arc::clone(&ctx.audiences))
    .with_shutdown(ctx.cancel.clone());
    let api = Arc::new(AccessGrpc::new(query.clone(), Arc::clone(&ctx.access)));
    let console = Arc::new(console::ConsoleState {
        query: query.clone(),
        access: Arc::clone(&ctx.access),
        api: Arc::clone(&api),
    });
    parts.http(console::router(console));
    if ctx.config.log.backend == cdp_runtime::config::LogBackend::Kafka {
        // Profile workers may run elsewhere: follow what they announce.
        parts.tasks.spawn(follow::follow_changes(
            Arc::clone(&ctx.backends.log),
            ctx.changes.clone(),
            ctx.consumer_options("query-changes"),
            ctx.cancel.clone(),
        ));
        // Erasures carried out by another query replica.
        let q = query.clone();
        parts.tasks.spawn(follow::follow_erasures(
            Arc::clone(&ctx.backends.log),
            move || q.forget_history(),
            ctx.cancel.clone(),
        ));
    }
    parts
        .health
        .set_serving::<ProfileServiceServer<ProfileGrpc>>()
        .await;
    parts
        .health
        .set_serving::<IdentityServiceServer<IdentityGrpc>>()
        .await;
    parts
        .health
        .set_serving::<AccessServiceServer<AccessGrpc>>()
        .await;
    parts
        .health
        .set_serving::<PrivacyServiceServer<PrivacyGrpc>>()
        .await;
    parts
        .health
        .set_serving::<AudienceServiceServer<AudienceGrpc>>()
        .await;
    let privacy = PrivacyGrpc::new(
        query.clone(),
        Arc::clone(&ctx.access),
        Arc::clone(&ctx.backends.log),
        Arc::clone(&ctx.rules),
        Arc::new(ctx.config.validation.clone()),
        ctx.config.privacy.erasure_deadline_days,
    );
    parts
        .grpc
        .add_service(ProfileServiceServer::new(ProfileGrpc::new(
            query.clone(),
            Arc::clone(&ctx.access),
        )))
        .add_service(IdentityServiceServer::new(IdentityGrpc::new(
            query.clone(),
            Arc::clone(&ctx.access),
        )))
        .add_service(AccessServiceServer::from_arc(api))
        .add_service(PrivacyServiceServer::new(privacy))
        .add_service(AudienceServiceServer::new(AudienceGrpc::new(
            Arc::clone(&ctx.audiences),
            Arc::clone(&ctx.access),
            Arc::clone(&ctx.backends.log),
            query,
        )));
    Ok(())
}
