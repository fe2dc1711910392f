//! Wiring of the whole platform in one process (`cdp dev`): the embedded
//! log and store, the identity and profile workers, and one gRPC server for
//! ingest, profiles, health and reflection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cdp_identity::IdentityWorker;
use cdp_ingest::dead_letters::DeadLetters;
use cdp_ingest::http::{HttpState, Source};
use cdp_ingest::{IngestGrpc, Ingestor};
use cdp_log::consumer::ConsumerOptions;
use cdp_log::{EmbeddedLog, EventLog, Membership};
use cdp_profile::ProfileWorker;
use cdp_proto::v1::dead_letter_service_server::DeadLetterServiceServer;
use cdp_proto::v1::identity_service_server::IdentityServiceServer;
use cdp_proto::v1::ingest_service_server::IngestServiceServer;
use cdp_proto::v1::profile_service_server::ProfileServiceServer;
use cdp_query::console::{Agent, ConsoleState};
use cdp_query::explain::IdentityGrpc;
use cdp_query::{ProfileGrpc, ProfileQuery};
use cdp_runtime::PlatformConfig;
use cdp_runtime::config::PipelineConfig;
use cdp_store::{EmbeddedStore, IdentityStore, ProfileChanges, ProfileStore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] cdp_runtime::ConfigError),
    #[error("embedded log at {path}: {source}")]
    Log {
        path: String,
        source: cdp_log::LogError,
    },
    #[error("embedded store at {path}: {source}")]
    Store {
        path: String,
        source: cdp_store::StoreError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error("configuration: sources: {0}")]
    Source(String),
}

fn consumer_options(name: &str, p: &PipelineConfig) -> ConsumerOptions {
    ConsumerOptions {
        name: name.to_owned(),
        batch_size: p.batch_size,
        poll_interval: Duration::from_millis(p.poll_interval_ms),
        retry_min: Duration::from_millis(p.retry_min_ms),
        retry_max: Duration::from_millis(p.retry_max_ms),
    }
}

/// A running platform.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The event log, for operators' and benchmarks' questions (lag).
    pub log: Arc<dyn EventLog>,
    tasks: JoinSet<()>,
}

impl Running {
    /// Waits until every task has stopped (after the cancellation token fired).
    pub async fn wait(mut self) {
        while let Some(result) = self.tasks.join_next().await {
            if let Err(error) = result {
                tracing::error!(%error, "a platform task failed");
            }
        }
    }
}

/// Starts everything on the embedded log and store. Stops when `cancel` fires:
/// the server stops taking requests, workers finish and commit their batch.
pub async fn start_embedded(
    config: &PlatformConfig,
    cancel: CancellationToken,
) -> Result<Running, StartError> {
    let rules = Arc::new(config.identity_rules()?);
    let limits = Arc::new(config.validation.clone());
    let log_dir = config.data_dir.join("log");
    let store_dir = config.data_dir.join("store");
    let log =
        EmbeddedLog::open(&log_dir, config.log.partitions).map_err(|source| StartError::Log {
            path: log_dir.display().to_string(),
            source,
        })?;
    let store = EmbeddedStore::open(&store_dir).map_err(|source| StartError::Store {
        path: store_dir.display().to_string(),
        source,
    })?;
    let log: Arc<dyn EventLog> = Arc::new(log);
    let identity: Arc<dyn IdentityStore> = Arc::new(store.clone());
    let profiles: Arc<dyn ProfileStore> = Arc::new(store);

    let changes = ProfileChanges::default();
    let mut tasks = JoinSet::new();
    let p = &config.pipeline;
    for i in 0..p.identity_workers.max(1) {
        let worker =
            IdentityWorker::new(Arc::clone(&log), Arc::clone(&identity), Arc::clone(&rules));
        let membership = Membership {
            index: i,
            members: p.identity_workers.max(1),
        };
        let options = consumer_options(&format!("identity-{i}"), p);
        let cancel = cancel.clone();
        tasks.spawn(async move {
            if let Err(error) = worker.run(membership, options, cancel).await {
                tracing::error!(%error, "identity worker could not start");
            }
        });
    }
    for i in 0..p.profile_workers.max(1) {
        let worker = ProfileWorker::new(
            Arc::clone(&log),
            Arc::clone(&profiles),
            config.fold_options(),
            changes.clone(),
        );
        let membership = Membership {
            index: i,
            members: p.profile_workers.max(1),
        };
        let options = consumer_options(&format!("profile-{i}"), p);
        let cancel = cancel.clone();
        tasks.spawn(async move {
            if let Err(error) = worker.run(membership, options, cancel).await {
                tracing::error!(%error, "profile worker could not start");
            }
        });
    }

    let ingestor = Ingestor::new(Arc::clone(&log), Arc::clone(&rules), limits);
    let query = ProfileQuery::new(identity, profiles, rules, config.fold_options(), changes);
    let console = Arc::new(ConsoleState {
        query: query.clone(),
        agents: config
            .agents
            .iter()
            .map(|a| Agent {
                name: a.name.clone(),
                token: a.token.expose().to_owned(),
            })
            .collect(),
        log: Arc::clone(&log),
    });
    let dead_letters = DeadLetters::new(Arc::clone(&log), ingestor.clone());

    let http_state = Arc::new(HttpState {
        ingestor: ingestor.clone(),
        sources: config
            .sources
            .iter()
            .map(Source::from_config)
            .collect::<Result<_, _>>()
            .map_err(StartError::Source)?,
        max_event_bytes: config.validation.max_event_bytes,
        max_batch_bytes: config.http.max_batch_bytes,
        zalo: config.webhooks.zalo.clone(),
        messenger: config.webhooks.messenger.clone(),
    });
    let bind_error = |addr| move |source| StartError::Bind { addr, source };
    let http_listener = tokio::net::TcpListener::bind(config.http.addr)
        .await
        .map_err(bind_error(config.http.addr))?;
    let http_addr = http_listener
        .local_addr()
        .map_err(bind_error(config.http.addr))?;
    let http_cancel = cancel.clone();
    tasks.spawn(async move {
        let app = cdp_ingest::http::router(http_state).merge(cdp_query::console::router(console));
        if let Err(error) = axum::serve(http_listener, app)
            .with_graceful_shutdown(http_cancel.cancelled_owned())
            .await
        {
            tracing::error!(%error, "HTTP server failed");
        }
        tracing::info!("HTTP server stopped");
    });

    let listener = tokio::net::TcpListener::bind(config.server.grpc_addr)
        .await
        .map_err(bind_error(config.server.grpc_addr))?;
    let grpc_addr = listener
        .local_addr()
        .map_err(bind_error(config.server.grpc_addr))?;
    let router = grpc_router(
        ingestor,
        query,
        dead_letters,
        config.server.max_message_bytes,
    )
    .await?;
    let server_cancel = cancel.clone();
    tasks.spawn(async move {
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        if let Err(error) = router
            .serve_with_incoming_shutdown(incoming, server_cancel.cancelled_owned())
            .await
        {
            tracing::error!(%error, "gRPC server failed");
        }
        tracing::info!("gRPC server stopped");
    });
    tracing::info!(grpc = %grpc_addr, http = %http_addr, data_dir = %config.data_dir.display(), "cdp dev is ready");
    Ok(Running {
        grpc_addr,
        http_addr,
        log,
        tasks,
    })
}

/// The gRPC services of the platform, with health and reflection.
pub async fn grpc_router(
    ingestor: Ingestor,
    query: ProfileQuery,
    dead_letters: DeadLetters,
    max_message_bytes: usize,
) -> Result<tonic::transport::server::Router, StartError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<IngestServiceServer<IngestGrpc>>()
        .await;
    health
        .set_serving::<ProfileServiceServer<ProfileGrpc>>()
        .await;
    health
        .set_serving::<DeadLetterServiceServer<DeadLetters>>()
        .await;
    health
        .set_serving::<IdentityServiceServer<IdentityGrpc>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cdp_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    Ok(tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            IngestServiceServer::new(IngestGrpc::new(ingestor))
                .max_decoding_message_size(max_message_bytes),
        )
        .add_service(ProfileServiceServer::new(ProfileGrpc::new(query.clone())))
        .add_service(IdentityServiceServer::new(IdentityGrpc::new(query)))
        .add_service(DeadLetterServiceServer::new(dead_letters)))
}
