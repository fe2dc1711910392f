//! What every CDP process shares: load the configuration, open the back
//! ends (with the opener `cdp-wiring` passes in), let the services install
//! their gRPC services, HTTP routes and background tasks, serve them with
//! health and reflection, and shut down gracefully on SIGTERM (stop intake,
//! let workers finish and commit).
//!
//! The per-service binaries (`cdp-ingest`, `cdp-identity`, `cdp-profile`,
//! `cdp-query`, `cdp-projection`) and `cdp dev` differ only in which
//! services they install.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use cdp_domain::IdentityRules;
use cdp_log::consumer::ConsumerOptions;
use cdp_log::{EventLog, LogError, Membership};
use cdp_store::{LiveStores, ProfileChanges, StoreError};
use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;
use tonic_health::server::HealthReporter;

use crate::config::PipelineConfig;
use crate::{ConfigError, PlatformConfig};

/// The ports every service is wired with. Which implementation fills them
/// (embedded, or Kafka and ScyllaDB) is the binary's choice (`cdp-wiring`).
#[derive(Clone)]
pub struct Backends {
    pub log: Arc<dyn EventLog>,
    /// The stores of the active projection generation (see
    /// `cdp_store::generations`): take one generation's stores with
    /// `live.current()` for a whole request or batch.
    pub live: Arc<LiveStores>,
    /// The data keys every record's personal part is sealed under
    /// (crypto-shredding; see `cdp_store::keys`).
    pub keyring: Arc<cdp_store::Keyring>,
}

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("event log ({what}): {source}")]
    Log { what: String, source: LogError },
    #[error("store ({what}): {source}")]
    Store { what: String, source: StoreError },
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error("configuration: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// What services are wired with.
pub struct Context {
    pub config: PlatformConfig,
    pub backends: Backends,
    pub rules: Arc<IdentityRules>,
    /// Which customers' views changed (in this process).
    pub changes: ProfileChanges,
    /// Fires on shutdown.
    pub cancel: CancellationToken,
    /// Credentials, masking, rate limits and the audit writer.
    pub access: Arc<crate::auth::Access>,
    /// The process's load, read by every listener's guard.
    pub load: Arc<crate::limits::Load>,
    /// The audience definitions (the `audience-definitions` topic).
    pub audiences: Arc<crate::audiences::AudienceRegistry>,
    /// The audit writer, until [`Context::start_access`] runs it.
    audit_writer: std::sync::Mutex<Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>>,
}

impl Context {
    pub fn new(
        config: PlatformConfig,
        backends: Backends,
        cancel: CancellationToken,
    ) -> Result<Self, StartError> {
        let rules = Arc::new(config.identity_rules()?);
        let (access, writer) =
            crate::auth::Access::start(&config, Arc::clone(&backends.log), cancel.clone())
                .map_err(|reason| StartError::Invalid {
                    field: "credentials",
                    reason,
                })?;
        let load = crate::limits::Load::new(&config.limits);
        let audiences = Arc::new(crate::audiences::AudienceRegistry::new(
            Arc::clone(&backends.log),
            std::time::Duration::from_secs(1),
        ));
        Ok(Context {
            load,
            audiences,
            config,
            backends,
            rules,
            changes: ProfileChanges::default(),
            cancel,
            access,
            audit_writer: std::sync::Mutex::new(Some(Box::pin(writer))),
        })
    }

    /// Runs the audit writer and keeps the issued credentials fresh (read
    /// again every few seconds, so a revocation reaches every process).
    pub fn start_access(&self, parts: &mut Parts) {
        if let Some(writer) = self.audit_writer.lock().ok().and_then(|mut w| w.take()) {
            parts.tasks.spawn(writer);
        }
        let access = Arc::clone(&self.access);
        let cancel = self.cancel.clone();
        parts.tasks.spawn(async move {
            let mut tick = tokio::time::interval(CREDENTIAL_REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Err(error) = access.registry.refresh().await {
                    tracing::warn!(%error, "cannot read the issued credentials");
                }
                access.housekeeping();
            }
        });
    }

    /// Follows the active projection generation: when a rebuild switches
    /// it, this process's stores move to the new one within
    /// `pipeline.generation_refresh_ms`.
    pub fn watch_generations(&self, parts: &mut Parts) {
        let live = Arc::clone(&self.backends.live);
        let every = Duration::from_millis(self.config.pipeline.generation_refresh_ms);
        let cancel = self.cancel.clone();
        parts.tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Err(error) = live.refresh().await {
                    tracing::warn!(%error, "cannot read the active projection generation");
                }
            }
        });
    }

    /// Options of a consumer loop named `name`.
    pub fn consumer_options(&self, name: &str) -> ConsumerOptions {
        consumer_options(name, &self.config.pipeline)
    }

    /// Spawns `count` workers of a consumer group in this process (at least
    /// one): worker `i` is `run(membership, options, cancel)`, named
    /// `name-i`, owning its share of the partitions among every replica of
    /// the process (`pipeline.processes`), and stopped on shutdown.
    pub fn spawn_workers<F, Fut>(&self, parts: &mut Parts, name: &str, count: u32, run: F)
    where
        F: Fn(Membership, ConsumerOptions, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let members = count.max(1);
        for index in 0..members {
            parts.tasks.spawn(run(
                self.config.pipeline.membership(index, members),
                self.consumer_options(&format!("{name}-{index}")),
                self.cancel.clone(),
            ));
        }
    }
}

pub fn consumer_options(name: &str, p: &PipelineConfig) -> ConsumerOptions {
    ConsumerOptions {
        name: name.to_owned(),
        batch_size: p.batch_size,
        poll_interval: Duration::from_millis(p.poll_interval_ms),
        commit_interval: Duration::from_millis(p.commit_interval_ms),
        retry_min: Duration::from_millis(p.retry_min_ms),
        retry_max: Duration::from_millis(p.retry_max_ms),
    }
}

/// How often every process reads the issued credentials again.
const CREDENTIAL_REFRESH: Duration = Duration::from_secs(2);

/// The pieces services add to a process.
pub struct Parts {
    pub grpc: RoutesBuilder,
    pub health: HealthReporter,
    http: Option<axum::Router>,
    pub tasks: JoinSet<()>,
}

impl Parts {
    /// gRPC health and reflection, nothing else yet.
    pub fn new() -> Result<Self, StartError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        // Both reflection versions: grpcurl speaks v1, the official Python
        // client (grpcio-reflection) and older tools only v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(cdp_proto::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let v1 = reflection()
            .build_v1()
            .map_err(|e| StartError::Reflection(e.to_string()))?;
        let v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| StartError::Reflection(e.to_string()))?;
        let mut grpc = RoutesBuilder::default();
        grpc.add_service(health_service)
            .add_service(v1)
            .add_service(v1alpha);
        Ok(Parts {
            grpc,
            health,
            http: None,
            tasks: JoinSet::new(),
        })
    }

    /// Adds HTTP routes (the Segment API, webhooks, the console).
    pub fn http(&mut self, router: axum::Router) {
        self.http = Some(match self.http.take() {
            Some(r) => r.merge(router),
            None => router,
        });
    }
}

/// A running process.
pub struct Running {
    pub grpc_addr: SocketAddr,
    /// Set when a service installed HTTP routes.
    pub http_addr: Option<SocketAddr>,
    tasks: JoinSet<()>,
}

impl Running {
    /// Waits until every task has stopped (after the cancellation token fired).
    pub async fn wait(mut self) {
        while let Some(result) = self.tasks.join_next().await {
            if let Err(error) = result {
                tracing::error!(%error, "a task failed");
            }
        }
    }
}

/// Binds and serves the parts until `cancel` fires.
pub async fn serve(
    parts: Parts,
    context: &Context,
    cancel: CancellationToken,
) -> Result<Running, StartError> {
    let config = &context.config;
    let Parts {
        grpc,
        http,
        mut tasks,
        ..
    } = parts;
    let bind_error = |addr| move |source| StartError::Bind { addr, source };
    let limits = &config.limits;
    let mut http_addr = None;
    if let Some(app) = http {
        let listener = tokio::net::TcpListener::bind(config.http.addr)
            .await
            .map_err(bind_error(config.http.addr))?;
        http_addr = Some(
            listener
                .local_addr()
                .map_err(bind_error(config.http.addr))?,
        );
        // Shed and time out before anything else looks at a request.
        let app = app.layer(axum::middleware::from_fn_with_state(
            crate::limits::ShedLayer::new(Arc::clone(&context.load)),
            crate::limits::shed_http,
        ));
        let acceptor = crate::limits::Acceptor::new(listener, limits);
        let cancel = cancel.clone();
        let header_timeout = Duration::from_secs(limits.header_timeout_secs);
        match &config.http.tls {
            None => {
                tasks.spawn(serve_http(acceptor, app, header_timeout, cancel));
            }
            Some(tls) => {
                let listener = crate::tls::TlsListener::new(acceptor, tls)?;
                tasks.spawn(serve_http(listener, app, header_timeout, cancel));
            }
        }
    }
    let listener = tokio::net::TcpListener::bind(config.server.grpc_addr)
        .await
        .map_err(bind_error(config.server.grpc_addr))?;
    let grpc_addr = listener
        .local_addr()
        .map_err(bind_error(config.server.grpc_addr))?;
    // Every call is shed when the process is overloaded, then
    // authenticated and authorised, before a service sees it.
    let mut server = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(limits.request_timeout_secs))
        .max_concurrent_streams(u32::try_from(limits.max_requests).ok())
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Keep-alive pings keep an idle HTTP/2 connection "active", so
        // connections are recycled after a while (clients reconnect).
        .max_connection_age(MAX_CONNECTION_AGE);
    if let Some(tls) = &config.server.tls {
        server = server
            .tls_config(crate::tls::grpc(tls)?)
            .map_err(|e| crate::tls::TlsError {
                field: "server.tls",
                reason: e.to_string(),
            })?;
    }
    let router = server
        .layer(crate::limits::ShedLayer::new(Arc::clone(&context.load)))
        .layer(crate::auth::AuthLayer::new(Arc::clone(&context.access)))
        .add_routes(grpc.routes());
    let incoming = crate::limits::Acceptor::new(listener, limits).into_stream();
    tasks.spawn(async move {
        if let Err(error) = router
            .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
            .await
        {
            tracing::error!(%error, "gRPC server failed");
        }
        tracing::info!("gRPC server stopped");
    });
    Ok(Running {
        grpc_addr,
        http_addr,
        tasks,
    })
}

/// How often idle gRPC connections are pinged (well within
/// `limits.idle_timeout_secs`, so live ones are never taken for idle).
const KEEPALIVE: Duration = Duration::from_secs(30);

/// How long a gRPC connection lives before the server asks the client to
/// reconnect (GOAWAY; calls in progress finish).
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);

/// Serves HTTP on `listener`: HTTP/1 requests whose headers take longer
/// than `header_timeout` are dropped, and on shutdown open connections get
/// a few seconds to finish.
async fn serve_http<L>(
    mut listener: L,
    app: axum::Router,
    header_timeout: Duration,
    cancel: CancellationToken,
) where
    L: axum::serve::Listener<Addr = SocketAddr>,
    L::Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(KEEPALIVE));
    loop {
        let (io, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            c = listener.accept() => c,
        };
        let service = tower::ServiceExt::map_request(
            app.clone(),
            move |mut r: http::Request<hyper::body::Incoming>| {
                r.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                r
            },
        );
        let connection = builder.serve_connection_with_upgrades(
            TokioIo::new(io),
            hyper_util::service::TowerToHyperService::new(service),
        );
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "HTTP connection ended");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!("HTTP connections still open after 10 s; closing them");
        }
    }
    tracing::info!("HTTP server stopped");
}

/// The command line of every CDP process.
#[derive(Debug, Clone, clap::Parser)]
pub struct ProcessArgs {
    /// Configuration file (TOML). Environment variables CDP__SECTION__KEY override it.
    #[arg(long, env = "CDP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where gRPC listens (overrides server.grpc_addr).
    #[arg(long)]
    pub grpc_addr: Option<SocketAddr>,
    /// Where the HTTP API listens (overrides http.addr).
    #[arg(long)]
    pub http_addr: Option<SocketAddr>,
    /// Where embedded data is kept (overrides data_dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl ProcessArgs {
    /// Loads the configuration and applies the overrides.
    pub fn load(&self) -> Result<PlatformConfig, ConfigError> {
        let mut config = PlatformConfig::load(self.config.as_deref())?;
        if let Some(a) = self.grpc_addr {
            config.server.grpc_addr = a;
        }
        if let Some(a) = self.http_addr {
            config.http.addr = a;
        }
        if let Some(d) = &self.data_dir {
            config.data_dir = d.clone();
        }
        // The addresses may have moved beyond 127.0.0.1.
        config.check_exposure()?;
        Ok(config)
    }
}

/// Runs one process: opens the back ends with `open`, lets `install` add
/// the services, serves them, prints `CDP_READY grpc=<addr> http=<addr|none>`
/// (for scripts and tests that listen on port 0) and waits for SIGTERM or
/// Ctrl-C.
pub async fn run_process<O, F>(
    name: &str,
    config: PlatformConfig,
    open: O,
    install: F,
) -> Result<(), StartError>
where
    O: AsyncFnOnce(&PlatformConfig) -> Result<Backends, BackendError>,
    F: AsyncFnOnce(&Context, &mut Parts) -> Result<(), StartError>,
{
    let cancel = CancellationToken::new();
    crate::shutdown::on_signal(cancel.clone());
    let backends = open(&config).await?;
    let context = Context::new(config, backends, cancel.clone())?;
    let mut parts = Parts::new()?;
    context.start_access(&mut parts);
    context.watch_generations(&mut parts);
    parts.tasks.spawn(Arc::clone(&context.load).monitor(
        Some((
            Arc::clone(&context.backends.log),
            Arc::clone(&context.backends.live),
        )),
        cancel.clone(),
    ));
    install(&context, &mut parts).await?;
    let running = serve(parts, &context, cancel).await?;
    let http = running
        .http_addr
        .map_or_else(|| "none".to_owned(), |a| a.to_string());
    println!("CDP_READY grpc={} http={http}", running.grpc_addr);
    tracing::info!(process = name, grpc = %running.grpc_addr, http = %http, "ready");
    running.wait().await;
    tracing::info!(process = name, "stopped");
    Ok(())
}

/// Loads the configuration, sets up telemetry and a multi-threaded runtime,
/// and runs [`run_process`]. Binaries call it through `cdp-wiring`, which
/// supplies `open`.
pub fn main_with<O, F>(name: &str, args: &ProcessArgs, open: O, install: F) -> ExitCode
where
    O: AsyncFnOnce(&PlatformConfig) -> Result<Backends, BackendError>,
    F: AsyncFnOnce(&Context, &mut Parts) -> Result<(), StartError>,
{
    let config = match args.load() {
        Ok(c) => c,
        Err(error) => {
            eprintln!("{name}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(name)
        .build()
    {
        Ok(r) => r,
        Err(error) => {
            eprintln!("{name}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let _telemetry = {
        let _entered = runtime.enter();
        crate::telemetry::init(&config.telemetry, name)
    };
    match runtime.block_on(run_process(name, config, open, install)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "{name} failed to start");
            eprintln!("{name}: {error}");
            ExitCode::FAILURE
        }
    }
}
