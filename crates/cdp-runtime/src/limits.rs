//! What one client, or a crowd of them, may take from a process: open
//! connections per listener, time to send a request, idle time, requests in
//! progress, and load shedding when the pipeline falls behind or memory runs
//! high. Overload turns into refusals (`RESOURCE_EXHAUSTED` with
//! `grpc-retry-pushback-ms`, HTTP 503 with `Retry-After`), never into
//! unbounded memory.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use cdp_config::LimitsConfig;
use cdp_log::EventLog;
use cdp_store::LiveStores;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::ServiceError;

/// The load of one process, read by every listener's guard.
pub struct Load {
    limits: LimitsConfig,
    /// Bytes the process may hold before it sheds everything but health.
    memory_bound: u64,
    rss: AtomicU64,
    lag: AtomicU64,
    memory_high: AtomicBool,
    lagging: AtomicBool,
}

impl Load {
    pub fn new(limits: &LimitsConfig) -> Arc<Load> {
        let memory_bound = match limits.shed_memory_mib {
            0 => available_memory().map_or(u64::MAX, |m| m / 10 * 8),
            mib => mib.saturating_mul(1 << 20),
        };
        Arc::new(Load {
            limits: limits.clone(),
            memory_bound,
            rss: AtomicU64::new(0),
            lag: AtomicU64::new(0),
            memory_high: AtomicBool::new(false),
            lagging: AtomicBool::new(false),
        })
    }

    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    /// Why a request must be refused now, if it must: `write` requests
    /// (ingest, webhooks) also while the pipeline lags.
    pub fn refusal(&self, write: bool) -> Option<ServiceError> {
        if self.memory_high.load(Ordering::Relaxed) {
            return Some(ServiceError::Overloaded(format!(
                "the process holds {} MiB, over its bound of {} MiB (limits.shed_memory_mib); retry shortly",
                self.rss.load(Ordering::Relaxed) >> 20,
                self.memory_bound >> 20
            )));
        }
        if write && self.lagging.load(Ordering::Relaxed) {
            return Some(ServiceError::Overloaded(format!(
                "the pipeline is {} touchpoints behind the log, over limits.shed_lag = {}; retry shortly",
                self.lag.load(Ordering::Relaxed),
                self.limits.shed_lag
            )));
        }
        None
    }

    /// Measures memory (every process) and, given the log, the pipeline's
    /// lag, once a second until `cancel` fires.
    pub async fn monitor(
        self: Arc<Self>,
        log: Option<(Arc<dyn EventLog>, Arc<LiveStores>)>,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Some(rss) = resident_bytes() {
                self.rss.store(rss, Ordering::Relaxed);
                let high = rss > self.memory_bound;
                if high != self.memory_high.swap(high, Ordering::Relaxed) {
                    tracing::warn!(
                        rss_mib = rss >> 20,
                        bound_mib = self.memory_bound >> 20,
                        shedding = high,
                        "memory bound crossed"
                    );
                }
            }
            if let Some((log, live)) = &log {
                let group = cdp_pipeline::group::identity(live.current().generation);
                // Bounded, and given up on shutdown: with Kafka down the
                // offsets take long, and memory must still be measured.
                let measured = tokio::select! {
                    _ = cancel.cancelled() => break,
                    m = tokio::time::timeout(
                        Duration::from_secs(2),
                        cdp_log::lag(log.as_ref(), &group, cdp_pipeline::topic::TOUCHPOINTS),
                    ) => m,
                };
                match measured.unwrap_or_else(|_| {
                    Err(cdp_log::LogError::Unavailable(
                        "the lag took over 2 s".into(),
                    ))
                }) {
                    Ok(lag) => {
                        self.lag.store(lag, Ordering::Relaxed);
                        let behind = lag > self.limits.shed_lag;
                        if behind != self.lagging.swap(behind, Ordering::Relaxed) {
                            tracing::warn!(
                                lag,
                                bound = self.limits.shed_lag,
                                shedding = behind,
                                "pipeline lag bound crossed"
                            );
                        }
                    }
                    Err(error) => tracing::debug!(%error, "cannot measure the pipeline's lag"),
                }
            }
        }
    }
}

/// The process's resident memory (`VmRSS` of `/proc/self/status`).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The memory this process may use: the cgroup's limit, else the machine's.
fn available_memory() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    match (cgroup, total) {
        (Some(c), Some(t)) => Some(c.min(t)),
        (c, t) => c.or(t),
    }
}

/// Whether a request path writes events (shed first when the pipeline lags).
pub fn is_write(path: &str) -> bool {
    path.starts_with("/cdp.v1.IngestService/")
        || path.starts_with("/v1/")
        || path.starts_with("/webhooks/")
}

/// Whether a request path is exempt from shedding (health checks).
pub fn is_health(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path == "/healthz"
}

/// A connection that holds its listener's permit and is closed when it
/// sends nothing: within `first` of opening, or for `idle` after that.
pub struct Guarded<IO> {
    io: IO,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    first: bool,
}

impl<IO> Guarded<IO> {
    pub fn new(io: IO, permit: OwnedSemaphorePermit, first: Duration, idle: Duration) -> Self {
        Guarded {
            io,
            _permit: permit,
            idle,
            deadline: Box::pin(tokio::time::sleep(first)),
            first: true,
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                    self.first = false;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    if self.first {
                        "the client sent nothing after connecting (limits.header_timeout_secs)"
                    } else {
                        "the connection was idle (limits.idle_timeout_secs)"
                    },
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<IO> Guarded<IO> {
    /// Something went out: a response streaming to a client that sends
    /// nothing (server-sent events) is not idle. What the server writes
    /// before the client said anything (HTTP/2 settings, a TLS hello) does
    /// not keep a silent connection open.
    fn wrote(&mut self, written: &Poll<io::Result<usize>>) {
        if !self.first
            && let Poll::Ready(Ok(n)) = written
            && *n > 0
        {
            let next = Instant::now() + self.idle;
            self.deadline.as_mut().reset(next);
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(&written);
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Guarded<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Accepts at most `limits.max_connections` connections at a time (more
/// wait in the kernel's backlog), each guarded.
pub struct Acceptor {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    first: Duration,
    idle: Duration,
}

impl Acceptor {
    pub fn new(listener: TcpListener, limits: &LimitsConfig) -> Self {
        Acceptor {
            listener,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            first: Duration::from_secs(limits.header_timeout_secs),
            idle: Duration::from_secs(limits.idle_timeout_secs),
        }
    }

    pub async fn accept(&self) -> (Guarded<TcpStream>, SocketAddr) {
        let permit = match Arc::clone(&self.permits).acquire_owned().await {
            Ok(p) => p,
            // The semaphore is never closed.
            Err(_) => return std::future::pending().await,
        };
        loop {
            match self.listener.accept().await {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    return (Guarded::new(tcp, permit, self.first, self.idle), peer);
                }
                // Out of file descriptors, a reset before accept: wait a little.
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// The connections, as a stream (for tonic).
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = Result<Guarded<TcpStream>, io::Error>> + Send + 'static {
        futures::stream::unfold(self, |acceptor| async move {
            let (conn, _) = acceptor.accept().await;
            Some((Ok(conn), acceptor))
        })
    }
}

impl axum::serve::Listener for Acceptor {
    type Io = Guarded<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        Acceptor::accept(self).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// Refuses a request when the process sheds load or too many are in
/// progress on this listener, before anything else looks at it.
#[derive(Clone)]
pub struct ShedLayer {
    load: Arc<Load>,
    in_flight: Arc<Semaphore>,
}

impl ShedLayer {
    pub fn new(load: Arc<Load>) -> Self {
        let in_flight = Arc::new(Semaphore::new(load.limits().max_requests));
        ShedLayer { load, in_flight }
    }

    /// Admits a request for `path`: the permit is held until its answer
    /// (its headers) is ready, or the reason it is refused.
    pub fn admit(&self, path: &str) -> Result<Option<OwnedSemaphorePermit>, ServiceError> {
        if is_health(path) {
            return Ok(None);
        }
        if let Some(refused) = self.load.refusal(is_write(path)) {
            return Err(refused);
        }
        Arc::clone(&self.in_flight)
            .try_acquire_owned()
            .map(Some)
            .map_err(|_| {
                ServiceError::Overloaded(format!(
                    "{} requests are in progress on this listener (limits.max_requests); retry shortly",
                    self.load.limits().max_requests
                ))
            })
    }
}

impl<S> tower::Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            layer: self.clone(),
        }
    }
}

/// The gRPC face of [`ShedLayer`].
#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    layer: ShedLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Shed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.layer.admit(request.uri().path()) {
            Ok(permit) => {
                let call = self.inner.call(request);
                Box::pin(async move {
                    let response = call.await;
                    drop(permit);
                    response
                })
            }
            Err(refused) => {
                tracing::debug!(error = %refused, "request shed");
                let response = tonic::Status::from(refused).into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

/// The HTTP face of [`ShedLayer`], with the request timeout: an axum
/// middleware.
pub async fn shed_http(
    axum::extract::State(layer): axum::extract::State<ShedLayer>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let permit = match layer.admit(request.uri().path()) {
        Ok(p) => p,
        Err(refused) => return refused.into_response(),
    };
    let timeout = Duration::from_secs(layer.load.limits().request_timeout_secs);
    let response = match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(r) => r,
        // 503 with Retry-After: Segment's clients retry it (the ids make
        // the retry safe); a 408 they would drop.
        Err(_) => ServiceError::Overloaded(format!(
            "no answer within {}s (limits.request_timeout_secs)",
            timeout.as_secs()
        ))
        .into_response(),
    };
    drop(permit);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LimitsConfig {
        LimitsConfig {
            max_requests: 2,
            shed_memory_mib: 1 << 30,
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn requests_beyond_the_bound_are_refused_and_health_always_passes() {
        let layer = ShedLayer::new(Load::new(&limits()));
        let a = layer.admit("/cdp.v1.ProfileService/GetProfile").unwrap();
        let b = layer.admit("/cdp.v1.ProfileService/GetProfile").unwrap();
        let refused = layer
            .admit("/cdp.v1.ProfileService/GetProfile")
            .unwrap_err();
        assert!(
            refused.to_string().contains("limits.max_requests"),
            "{refused}"
        );
        assert!(layer.admit("/grpc.health.v1.Health/Check").is_ok());
        drop((a, b));
        assert!(layer.admit("/cdp.v1.ProfileService/GetProfile").is_ok());
    }

    #[test]
    fn writes_are_shed_while_the_pipeline_lags_and_everything_when_memory_is_high() {
        let load = Load::new(&limits());
        let layer = ShedLayer::new(Arc::clone(&load));
        load.lagging.store(true, Ordering::Relaxed);
        assert!(layer.admit("/cdp.v1.IngestService/Track").is_err());
        assert!(layer.admit("/v1/batch").is_err());
        assert!(layer.admit("/cdp.v1.ProfileService/GetProfile").is_ok());
        load.memory_high.store(true, Ordering::Relaxed);
        let refused = layer
            .admit("/cdp.v1.ProfileService/GetProfile")
            .unwrap_err();
        assert_eq!(refused.code(), crate::error::ErrorCode::Overloaded);
        assert!(layer.admit("/grpc.health.v1.Health/Check").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_times_out_and_a_talking_one_does_not() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let permits = Arc::new(Semaphore::new(2));
        let (client, server) = tokio::io::duplex(64);
        let mut guarded = Guarded::new(
            server,
            Arc::clone(&permits).acquire_owned().await.unwrap(),
            Duration::from_secs(10),
            Duration::from_secs(60),
        );
        let mut client = client;
        client.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 3);
        // Idle for less than the bound: still open.
        tokio::time::advance(Duration::from_secs(30)).await;
        client.write_all(b" /").await.unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 2);
        // Then silent past it.
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("idle"), "{err}");
        drop(guarded);
        assert_eq!(permits.available_permits(), 2, "the permit comes back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_streaming_to_a_silent_client_is_not_idle() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let permits = Arc::new(Semaphore::new(1));
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut guarded = Guarded::new(
            server,
            Arc::clone(&permits).acquire_owned().await.unwrap(),
            Duration::from_secs(10),
            Duration::from_secs(60),
        );
        let mut client = client;
        client.write_all(b"GET /events").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 11);
        // The server keeps writing (server-sent events) every 40 s, the
        // client says nothing: 4 minutes later the connection still stands.
        for _ in 0..6 {
            tokio::time::advance(Duration::from_secs(40)).await;
            guarded.write_all(b": keep-alive\n").await.unwrap();
            let pending =
                tokio::time::timeout(Duration::from_millis(1), guarded.read(&mut buf)).await;
            assert!(pending.is_err(), "the read must still wait, not time out");
        }
    }
}
