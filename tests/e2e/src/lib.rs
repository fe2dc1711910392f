//! A harness that runs the real `cdp` binary and talks to it over gRPC, so
//! the end-to-end tests see exactly what an adapter or an agent sees.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cdp_proto::v1::ingest_service_client::IngestServiceClient;
use cdp_proto::v1::profile_service_client::ProfileServiceClient;
use cdp_proto::v1::{
    self, CustomerProfile, GetProfileRequest, Identifier, PersonalData, Touchpoint,
};
use serde_json::Value;
use tonic::transport::Channel;

/// A binary of this workspace: `$CDP_BIN_DIR/<name>`, else next to the
/// test executable's target dir (`cdp` may also be given as `$CDP_BIN`).
pub fn binary(name: &str) -> PathBuf {
    if name == "cdp"
        && let Some(p) = std::env::var_os("CDP_BIN")
    {
        return PathBuf::from(p);
    }
    let dir = match std::env::var_os("CDP_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().unwrap_or_else(|e| panic!("no current exe: {e}"));
            let here = exe
                .parent()
                .unwrap_or_else(|| panic!("odd executable path {}", exe.display()));
            if here.join(name).exists() {
                // A binary beside this one (the benchmark in target/<profile>/).
                here.to_path_buf()
            } else {
                // A test: target/<profile>/deps/<test> -> target/<profile>/
                here.parent()
                    .unwrap_or_else(|| panic!("odd test path {}", exe.display()))
                    .to_path_buf()
            }
        }
    };
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --workspace --bins) or set CDP_BIN_DIR",
        bin.display()
    );
    bin
}

/// The `cdp` binary.
pub fn cdp_binary() -> PathBuf {
    binary("cdp")
}

/// Which back end the end-to-end tests run on: `CDP_E2E_BACKEND=embedded`
/// (the default: one `cdp dev` process) or `distributed` (the five service
/// binaries on Kafka and ScyllaDB/Cassandra, see `make infra-up`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Distributed,
}

impl Backend {
    pub fn from_env() -> Self {
        match std::env::var("CDP_E2E_BACKEND").as_deref() {
            Ok("distributed") => Backend::Distributed,
            Ok("embedded") | Err(_) => Backend::Embedded,
            Ok(other) => panic!("CDP_E2E_BACKEND={other}: use embedded or distributed"),
        }
    }
}

/// Where the distributed back end's servers are.
fn infra_env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// The harness's run directory (`CDP_INFRA_RUN`, by default under
/// `CDP_INFRA_CACHE` or `~/.cache/cdp-infra`).
fn infra_run() -> PathBuf {
    std::env::var("CDP_INFRA_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            std::env::var("CDP_INFRA_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default())
                        .join(".cache/cdp-infra")
                })
                .join("run")
        })
}

/// The files under `roots`, at any depth.
fn files_under(roots: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = roots;
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.filter_map(Result::ok).map(|e| e.path()));
            }
        } else if p.is_file() {
            files.push(p);
        }
    }
    files
}

/// How long a process may take to print its ready line.
const STARTUP_PATIENCE: Duration = Duration::from_secs(90);

/// One process of the platform under test.
struct Proc {
    name: &'static str,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    grpc: SocketAddr,
    http: Option<SocketAddr>,
    log: PathBuf,
}

impl Proc {
    fn spawn(&mut self, config: &Path, data: &Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("log file: {e}"));
        let mut child = Command::new(binary(self.name))
            .args(&self.args)
            .arg("--config")
            .arg(config)
            .arg("--grpc-addr")
            .arg("127.0.0.1:0")
            .arg("--http-addr")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.name));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        // Read stdout on a thread (it keeps draining it, so the child never
        // blocks on a full pipe) and wait for the ready line with a deadline:
        // a process that hangs while starting fails the test, not the run.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("CDP_READY ") {
                    let _ = ready_tx.send(line);
                }
            }
        });
        let line = match ready_rx.recv_timeout(STARTUP_PATIENCE) {
            Ok(line) => line,
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                let what = match why {
                    std::sync::mpsc::RecvTimeoutError::Timeout => {
                        format!("was not ready after {STARTUP_PATIENCE:?}")
                    }
                    std::sync::mpsc::RecvTimeoutError::Disconnected => {
                        "exited before it was ready".to_owned()
                    }
                };
                panic!(
                    "{} {what}; its log:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )
            }
        };
        let rest = line
            .strip_prefix("CDP_READY grpc=")
            .unwrap_or_else(|| panic!("bad ready line {line}"));
        let (grpc, http) = rest
            .split_once(" http=")
            .unwrap_or_else(|| panic!("bad ready line {line}"));
        let parse = |a: &str| {
            a.parse::<SocketAddr>()
                .unwrap_or_else(|e| panic!("bad address {a}: {e}"))
        };
        let (grpc, http) = (parse(grpc), (http != "none").then(|| parse(http)));
        self.grpc = grpc;
        self.http = http;
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let Some(mut c) = self.child.take() else {
            panic!("{} is not running", self.name)
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        c.wait().unwrap_or_else(|e| panic!("wait: {e}"))
    }
}

/// The platform under test: one `cdp dev` process (embedded back end) or
/// the five service processes (distributed back end), each with its own
/// data, topics or keyspace.
pub struct CdpProcess {
    procs: Vec<Proc>,
    pub backend: Backend,
    /// The gRPC address of ingest (the one process when embedded).
    pub addr: SocketAddr,
    /// The HTTP address of ingest (the Segment API and webhooks).
    pub http: SocketAddr,
    data: PathBuf,
    config: PathBuf,
    /// The ScyllaDB keyspace and Kafka topic prefix (distributed).
    pub namespace: String,
    _dir: tempfile::TempDir,
}

/// Write keys and webhook secrets of the test configuration.
pub const WEB_KEY: &str = "test-web-key";
pub const POS_KEY: &str = "test-pos-key";
pub const ZALO_SECRET: &str = "test-zalo-secret";
pub const MESSENGER_SECRET: &str = "test-messenger-secret";
pub const MESSENGER_VERIFY: &str = "test-verify-token";
pub const AGENT_TOKEN: &str = "test-agent-token";

/// Keys of the test credentials, one per role (added to every test
/// configuration by [`with_credentials`]). Ingest relays every source; the
/// admin sees personal data in clear (the tests check values), every other
/// role sees what it would in production.
pub const INGEST_KEY: &str = "test-ingest-key";
pub const ADMIN_KEY: &str = "test-admin-key";
/// An unscoped agent without a read limit (the benchmark's lookups).
pub const AGENT_KEY: &str = "test-agent-key";
pub const SUPERVISOR_KEY: &str = "test-supervisor-key";
pub const ANALYST_KEY: &str = "test-analyst-key";
pub const OPERATOR_KEY: &str = "test-operator-key";
/// An agent of the `hcm` team, restricted to customers seen at stores of
/// `region:south` (see [`CREDENTIALS`]).
pub const SCOPED_AGENT_KEY: &str = "test-scoped-agent-key";
/// An ingest key of the `pos` source only.
pub const POS_INGEST_KEY: &str = "test-pos-ingest-key";
/// The data protection officer (consent, exports).
pub const PRIVACY_KEY: &str = "test-privacy-key";

/// The credentials appended to every test configuration.
pub const CREDENTIALS: &str = r#"
[[credentials]]
name = "test-ingest"
role = "ingest"
key = "test-ingest-key"
sources = ["*"]
[[credentials]]
name = "test-pos-ingest"
role = "ingest"
key = "test-pos-ingest-key"
sources = ["pos"]
[[credentials]]
name = "test-admin"
role = "admin"
key = "test-admin-key"
disclosure = "clear"
# The tests poll views as the admin.
reads_per_minute = 1000000
[[credentials]]
name = "test-agent"
role = "agent"
key = "test-agent-key"
reads_per_minute = 1000000
[[credentials]]
name = "test-supervisor"
role = "supervisor"
key = "test-supervisor-key"
team = "hcm"
[[credentials]]
name = "test-analyst"
role = "analyst"
key = "test-analyst-key"
[[credentials]]
name = "test-operator"
role = "operator"
key = "test-operator-key"
[[credentials]]
name = "test-scoped-agent"
role = "agent"
key = "test-scoped-agent-key"
team = "hcm"
scopes = ["region:south"]
[[credentials]]
name = "test-privacy"
role = "privacy"
key = "test-privacy-key"
disclosure = "clear"
"#;

/// A test configuration with the test credentials, unless
/// `CDP_E2E_NO_CREDENTIALS` is set (to drive a build that predates them,
/// as the benchmark's before/after comparisons do).
pub fn with_credentials(config_toml: &str) -> String {
    if std::env::var_os("CDP_E2E_NO_CREDENTIALS").is_some() {
        return config_toml.to_owned();
    }
    format!("{config_toml}\n{CREDENTIALS}")
}

pub use cdp_proto::client::Authed;

/// The configuration (TOML) of test processes: 4 partitions, 2 identity and
/// 2 profile workers, two HTTP sources and both webhooks.
pub const DEFAULT_CONFIG: &str = r#"
[log]
partitions = 4
[pipeline]
identity_workers = 2
profile_workers = 2
poll_interval_ms = 100
[[sources]]
id = "website"
channel = "web"
write_key = "test-web-key"
[[sources]]
id = "pos"
channel = "store"
write_key = "test-pos-key"
allowed_types = ["Order Completed", "Identify"]
[webhooks.zalo]
source_id = "zalo-oa"
oa_secret_key = "test-zalo-secret"
[webhooks.messenger]
source_id = "facebook-page"
app_secret = "test-messenger-secret"
verify_token = "test-verify-token"
[profile]
source_trust = { crm = 10, website = 1 }
[[agents]]
name = "agent.lan"
token = "test-agent-token"
team = "hcm"
"#;

impl CdpProcess {
    pub fn start() -> Self {
        Self::start_with(DEFAULT_CONFIG)
    }

    /// Starts the platform on the back end of [`Backend::from_env`].
    pub fn start_with(config_toml: &str) -> Self {
        Self::start_on(Backend::from_env(), config_toml)
    }

    pub fn start_on(backend: Backend, config_toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let config = dir.path().join("cdp.toml");
        std::fs::write(&config, with_credentials(config_toml))
            .unwrap_or_else(|e| panic!("write config: {e}"));
        let data = dir.path().join("data");
        let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
        let namespace = format!("e2e_{}", uuid::Uuid::new_v4().simple());
        let proc = |name: &'static str, args: &[&str], env: &[(String, String)]| Proc {
            name,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: env.to_vec(),
            child: None,
            grpc: unbound,
            http: None,
            log: dir.path().join(format!("{name}.log")),
        };
        let procs = match backend {
            Backend::Embedded => vec![proc("cdp", &["dev"], &[])],
            Backend::Distributed => {
                let env = [
                    ("CDP__LOG__BACKEND", "kafka".to_owned()),
                    (
                        "CDP__LOG__KAFKA__BROKERS",
                        infra_env("CDP_KAFKA_BROKERS", "127.0.0.1:9092"),
                    ),
                    ("CDP__LOG__KAFKA__TOPIC_PREFIX", format!("{namespace}.")),
                    ("CDP__STORE__BACKEND", "scylla".to_owned()),
                    (
                        "CDP__STORE__SCYLLA__NODES",
                        infra_env("CDP_CQL_ADDR", "127.0.0.1:9042"),
                    ),
                    ("CDP__STORE__SCYLLA__KEYSPACE", namespace.clone()),
                ]
                .map(|(k, v)| (k.to_owned(), v));
                // The first process creates the keyspace and the topics;
                // the others start after it is ready.
                vec![
                    proc("cdp-query", &[], &env),
                    proc("cdp-ingest", &[], &env),
                    proc("cdp-identity", &[], &env),
                    proc("cdp-profile", &[], &env),
                    proc("cdp-projection", &[], &env),
                ]
            }
        };
        let mut p = CdpProcess {
            procs,
            backend,
            addr: unbound,
            http: unbound,
            data,
            config,
            namespace,
            _dir: dir,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        for proc in &mut self.procs {
            if proc.child.is_none() {
                proc.spawn(&self.config, &self.data);
            }
        }
        let (grpc, http) = {
            let ingest = self.proc("cdp-ingest");
            (ingest.grpc, ingest.http)
        };
        self.addr = grpc;
        self.http = http.unwrap_or_else(|| panic!("ingest serves no HTTP"));
    }

    /// The process running `service` (`cdp-ingest`, `cdp-identity`,
    /// `cdp-profile`, `cdp-query`, `cdp-projection`): the one `cdp` process
    /// when embedded.
    fn proc(&self, service: &str) -> &Proc {
        self.procs
            .iter()
            .find(|p| p.name == service)
            .or_else(|| self.procs.iter().find(|p| p.name == "cdp"))
            .unwrap_or_else(|| panic!("no process for {service}"))
    }

    fn proc_mut(&mut self, service: &str) -> &mut Proc {
        let i = self
            .procs
            .iter()
            .position(|p| p.name == service)
            .or_else(|| self.procs.iter().position(|p| p.name == "cdp"))
            .unwrap_or_else(|| panic!("no process for {service}"));
        &mut self.procs[i]
    }

    /// The logs of every process so far.
    pub fn log(&self) -> String {
        self.procs
            .iter()
            .map(|p| {
                format!(
                    "--- {} ---\n{}",
                    p.name,
                    std::fs::read_to_string(&p.log).unwrap_or_default()
                )
            })
            .collect()
    }

    /// SIGKILL every process: no chance to flush or commit anything.
    pub fn kill(&mut self) {
        for p in &mut self.procs {
            p.kill();
        }
    }

    /// SIGKILL the process running `service` (all of them when embedded).
    pub fn kill_service(&mut self, service: &str) {
        self.proc_mut(service).kill();
    }

    /// SIGTERM the process running `service` and wait for it to exit.
    pub fn stop_service(&mut self, service: &str) -> std::process::ExitStatus {
        self.proc_mut(service).terminate()
    }

    /// Starts every process that is not running.
    pub fn start_stopped(&mut self) {
        self.spawn();
    }

    /// SIGTERM every process and wait: the graceful path. Returns the first
    /// unsuccessful exit status, if any, else the last one.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut result = None;
        for p in self.procs.iter_mut().rev() {
            let status = p.terminate();
            if result.is_none_or(|r: std::process::ExitStatus| r.success()) {
                result = Some(status);
            }
        }
        result.unwrap_or_else(|| panic!("no process"))
    }

    /// Starts again on the same data with another configuration.
    pub fn restart_with(&mut self, config_toml: &str) {
        std::fs::write(&self.config, with_credentials(config_toml))
            .unwrap_or_else(|e| panic!("write config: {e}"));
        self.restart();
    }

    /// The Segment-compatible HTTP API and the webhooks.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// The agent console (the query service's HTTP).
    pub fn console_url(&self) -> String {
        let q = self.proc("cdp-query");
        format!(
            "http://{}",
            q.http.unwrap_or_else(|| panic!("query serves no HTTP"))
        )
    }

    /// A console session for `key` (`POST /api/login`).
    pub async fn console_session(&self, key: &str) -> String {
        let answer: Value = reqwest::Client::new()
            .post(format!("{}/api/login", self.console_url()))
            .json(&serde_json::json!({"token": key}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("console login: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("console login answer: {e}"));
        answer["session"]
            .as_str()
            .unwrap_or_else(|| panic!("console login refused: {answer}"))
            .to_owned()
    }

    /// Starts again on the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The gRPC endpoint of ingest.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id of the process running `service`.
    pub fn pid(&self, service: &str) -> u32 {
        self.proc(service)
            .child
            .as_ref()
            .map(Child::id)
            .unwrap_or_else(|| panic!("{service} is not running"))
    }

    /// Where the embedded back end keeps its data.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Every file holding this platform's event log: the embedded log's
    /// files, or the Kafka log segments (and indexes) of this run's topics
    /// (under the harness's run directory, `CDP_INFRA_RUN`).
    pub fn log_files(&self) -> Vec<PathBuf> {
        let roots: Vec<PathBuf> = match self.backend {
            Backend::Embedded => vec![self.data.join("log")],
            Backend::Distributed => {
                let data = infra_run().join("kafka/data");
                std::fs::read_dir(&data)
                    .unwrap_or_else(|e| panic!("Kafka's log directory {}: {e}", data.display()))
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with(&format!("{}.", self.namespace)))
                    })
                    .collect()
            }
        };
        files_under(roots)
    }

    /// Every file holding this platform's data: the whole embedded data
    /// directory; or the Kafka log segments of this run's topics, and the
    /// SSTables of this run's keyspaces and Cassandra's commit log after
    /// `nodetool flush` (through `deploy/harness/infra.sh flush`).
    pub fn stored_files(&self) -> Vec<PathBuf> {
        match self.backend {
            Backend::Embedded => files_under(vec![self.data.clone()]),
            Backend::Distributed => {
                let script =
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/harness/infra.sh");
                let status = Command::new(&script)
                    .arg("flush")
                    .status()
                    .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
                assert!(status.success(), "nodetool flush failed: {status}");
                let cassandra = infra_run().join("cassandra/data");
                let tables = cassandra.join("data");
                let namespace = self.namespace.to_lowercase();
                let mut roots: Vec<PathBuf> = std::fs::read_dir(&tables)
                    .unwrap_or_else(|e| panic!("Cassandra's data {}: {e}", tables.display()))
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                            n == namespace || n.starts_with(&format!("{namespace}_"))
                        })
                    })
                    .collect();
                assert!(
                    !roots.is_empty(),
                    "no keyspace of {namespace} in {}",
                    tables.display()
                );
                roots.push(cassandra.join("commitlog"));
                let mut files = files_under(roots);
                files.extend(self.log_files());
                files
            }
        }
    }

    /// The gRPC address of the query service (profiles, identity).
    pub fn query_addr(&self) -> SocketAddr {
        self.proc("cdp-query").grpc
    }

    async fn connect(addr: SocketAddr) -> Channel {
        let url = format!("http://{addr}");
        Channel::from_shared(url.clone())
            .unwrap_or_else(|e| panic!("url: {e}"))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"))
    }

    /// A channel to `addr` whose calls carry `key` (none: no credential).
    pub async fn connect_as(addr: SocketAddr, key: Option<&str>) -> Authed {
        let bearer = cdp_proto::client::Bearer::new(key).unwrap_or_else(|e| panic!("key: {e}"));
        cdp_proto::client::authed(Self::connect(addr).await, bearer)
    }

    /// A channel to ingest (DeadLetterService), as the test admin.
    pub async fn channel(&self) -> Authed {
        Self::connect_as(self.addr, Some(ADMIN_KEY)).await
    }

    /// A channel to ingest as the test relay (IngestService, every source).
    pub async fn ingest_channel(&self) -> Authed {
        Self::connect_as(self.addr, Some(INGEST_KEY)).await
    }

    /// A channel to the query service (ProfileService, IdentityService,
    /// AccessService), as the test admin (personal data in clear).
    pub async fn query_channel(&self) -> Authed {
        Self::connect_as(self.query_addr(), Some(ADMIN_KEY)).await
    }

    /// The gRPC address of the projection service (rebuilds, generations,
    /// replay).
    pub fn projection_addr(&self) -> SocketAddr {
        self.proc("cdp-projection").grpc
    }

    /// A channel to the projection service (ProjectionService, ReplayService),
    /// as the test admin.
    pub async fn projection_channel(&self) -> Authed {
        Self::connect_as(self.projection_addr(), Some(ADMIN_KEY)).await
    }

    pub async fn ingest(&self) -> IngestServiceClient<Authed> {
        IngestServiceClient::new(self.ingest_channel().await)
    }

    /// Sends one touchpoint with `Track` and returns the answer (a refusal panics).
    pub async fn track(&self, t: Touchpoint) -> v1::TrackResponse {
        self.ingest()
            .await
            .track(v1::TrackRequest {
                touchpoint: Some(t),
            })
            .await
            .unwrap_or_else(|s| panic!("Track failed: {s}"))
            .into_inner()
    }

    pub async fn profiles(&self) -> ProfileServiceClient<Authed> {
        ProfileServiceClient::new(self.query_channel().await)
    }

    /// Starts a rebuild of every event into a new generation and waits
    /// until it is activated (`activate`), or has caught up when it does
    /// not activate; returns the generation.
    pub async fn rebuild_until(&self, activate: bool) -> u32 {
        use cdp_proto::v1::projection_service_client::ProjectionServiceClient;
        use cdp_proto::v1::rebuild_status::State;
        let mut projections = ProjectionServiceClient::new(self.projection_channel().await);
        let done = if activate {
            State::Activated
        } else {
            State::CaughtUp
        };
        let started = projections
            .start_rebuild(v1::StartRebuildRequest {
                activate,
                generation: 0,
            })
            .await
            .unwrap_or_else(|s| panic!("StartRebuild failed: {s}"))
            .into_inner();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let status = projections
                .get_rebuild(v1::GetRebuildRequest {
                    generation: started.generation,
                })
                .await
                .unwrap_or_else(|s| panic!("GetRebuild failed: {s}"))
                .into_inner();
            match status.state() {
                state if state == done => {
                    assert!(status.records_done >= status.records_total.min(1));
                    return status.generation;
                }
                State::Running => {}
                other => panic!(
                    "the rebuild ended {other:?}: {}\n{}",
                    status.error,
                    self.log()
                ),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the rebuild did not finish in 120 s: {status:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for CdpProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn id(kind: &str, value: &str) -> Identifier {
    Identifier {
        kind: kind.into(),
        value: value.into(),
    }
}

/// JSON as a client sends it: at any depth (the server's conversions stop
/// at `MAX_NESTING`; a client's need not).
pub fn to_struct(v: Value) -> Option<prost_types::Struct> {
    fn value(v: Value) -> prost_types::Value {
        use prost_types::value::Kind;
        let kind = match v {
            Value::Null => Kind::NullValue(0),
            Value::Bool(b) => Kind::BoolValue(b),
            Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
            Value::String(s) => Kind::StringValue(s),
            Value::Array(items) => Kind::ListValue(prost_types::ListValue {
                values: items.into_iter().map(value).collect(),
            }),
            Value::Object(m) => Kind::StructValue(object(m)),
        };
        prost_types::Value { kind: Some(kind) }
    }
    fn object(m: serde_json::Map<String, Value>) -> prost_types::Struct {
        prost_types::Struct {
            fields: m.into_iter().map(|(k, v)| (k, value(v))).collect(),
        }
    }
    match v {
        Value::Object(m) => Some(object(m)),
        _ => None,
    }
}

/// A touchpoint as an adapter would build it.
pub fn touchpoint(
    event_type: &str,
    channel: &str,
    source: &str,
    ids: Vec<Identifier>,
    properties: Value,
) -> Touchpoint {
    Touchpoint {
        event_id: uuid::Uuid::new_v4().to_string(),
        r#type: event_type.into(),
        channel: channel.into(),
        source_id: source.into(),
        occurred_at: None,
        properties: to_struct(properties),
        personal: Some(PersonalData {
            identifiers: ids,
            traits: None,
        }),
    }
}

/// Polls `GetProfile` by `identifier` until `done` holds or `patience` ends;
/// returns the profile (or panics with what was seen).
pub async fn profile_when(
    client: &mut ProfileServiceClient<Authed>,
    identifier: Identifier,
    patience: Duration,
    done: impl Fn(&CustomerProfile) -> bool,
) -> CustomerProfile {
    match profile_until(client, identifier, patience, done).await {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// Like [`profile_when`], but a timeout is an error carrying the last profile seen.
pub async fn profile_until(
    client: &mut ProfileServiceClient<Authed>,
    identifier: Identifier,
    patience: Duration,
    done: impl Fn(&CustomerProfile) -> bool,
) -> Result<CustomerProfile, String> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut last = None;
    loop {
        let request = GetProfileRequest {
            lookup: Some(v1::get_profile_request::Lookup::Identifier(
                identifier.clone(),
            )),
            timeline_limit: 200,
            as_of: None,
        };
        match client.get_profile(request).await {
            Ok(r) => {
                if let Some(p) = r.into_inner().profile {
                    if done(&p) {
                        return Ok(p);
                    }
                    last = Some(p);
                }
            }
            // Not folded yet, or a back end restarting.
            Err(s) if matches!(s.code(), tonic::Code::NotFound | tonic::Code::Unavailable) => {}
            Err(s) => panic!("GetProfile failed: {s}"),
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "profile of {identifier:?} never satisfied the condition; last seen: {last:#?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The metrics of a profile, or a panic.
pub fn metrics(p: &CustomerProfile) -> &v1::ProfileMetrics {
    p.metrics
        .as_ref()
        .unwrap_or_else(|| panic!("profile without metrics"))
}

/// A tag that keeps one test's identifiers apart from every other's.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A random valid Vietnamese mobile number, as the 9 digits after the
/// national `0` (so `0{mobile}` and `+84{mobile}` are the same number).
pub fn mobile() -> String {
    format!(
        "9{}{:07}",
        ["1", "7", "8"][(uuid::Uuid::new_v4().as_u128() % 3) as usize],
        uuid::Uuid::new_v4().as_u128() % 10_000_000
    )
}

/// A test tool that `make test` installs. Tests that need one are
/// `#[ignore]`d (a plain `cargo test` reports them as ignored, never as
/// passed); run with `--include-ignored`, a missing tool fails the test.
pub fn tool<T>(found: Option<T>, what: &str) -> T {
    found.unwrap_or_else(|| panic!("{what} is missing: `make tools` installs it"))
}

/// A generated event as an adapter sends it.
pub fn to_api(raw: &cdp_domain::RawTouchpoint) -> Touchpoint {
    Touchpoint {
        event_id: raw.event_id.clone().unwrap_or_default(),
        r#type: raw.event_type.clone().unwrap_or_default(),
        channel: raw.channel.clone().unwrap_or_default(),
        source_id: raw.source_id.clone().unwrap_or_default(),
        occurred_at: raw.occurred_at.map(cdp_proto::convert::millis_to_timestamp),
        properties: Some(cdp_proto::convert::json_to_struct(&raw.properties)),
        personal: Some(PersonalData {
            identifiers: raw
                .identifiers
                .iter()
                .map(|i| id(&i.kind, &i.value))
                .collect(),
            traits: Some(cdp_proto::convert::json_to_struct(&raw.traits)),
        }),
    }
}

/// The identity rules of [`DEFAULT_CONFIG`]: the defaults, with its two
/// Segment sources untrusted to link (as the platform derives them).
pub fn test_rules() -> cdp_domain::IdentityRules {
    cdp_domain::IdentityRules::default()
        .with_untrusted_sources(["website".to_owned(), "pos".to_owned()])
}

/// The reference fold (`cdp_domain::reference`) of generated events,
/// validated as ingest validates them at `now`.
pub fn reference_of(
    events: &[cdp_domain::journey::GeneratedEvent],
    now: i64,
) -> Result<cdp_domain::reference::ReferenceModel, String> {
    use cdp_domain::{ValidationLimits, validate};
    let rules = test_rules();
    let mut model = cdp_domain::reference::ReferenceModel::new(
        rules.clone(),
        cdp_domain::profile::FoldOptions::default(),
    );
    for g in events {
        let t = validate(
            &g.event,
            &rules,
            &ValidationLimits::default(),
            cdp_domain::Context {
                now,
                fresh_event_id: uuid::Uuid::nil(),
            },
        )
        .map_err(|e| format!("generated event rejected: {e}"))?;
        model
            .apply(&t)
            .map_err(|e| format!("the reference model: {e}"))?;
    }
    Ok(model)
}

/// Waits until the platform shows every customer of the reference fold with
/// the reference's metrics and identifiers, each as its own profile; the
/// first difference after `patience` is the error.
pub async fn expect_reference(
    profiles: &mut ProfileServiceClient<Authed>,
    model: &cdp_domain::reference::ReferenceModel,
    patience: Duration,
) -> Result<usize, String> {
    use std::collections::BTreeSet;
    let mut seen = BTreeSet::new();
    let expected = model.customers();
    for customer in &expected {
        let want = cdp_proto::convert::metrics(&customer.view);
        let Some(any) = customer.identifiers.iter().next() else {
            return Err("a reference customer without identifiers".into());
        };
        let p = profile_until(profiles, id(any.kind.as_str(), &any.value), patience, |p| {
            metrics(p) == &want
        })
        .await
        .map_err(|e| format!("expected {want:#?}\n{e}"))?;
        let got: BTreeSet<(String, String)> = p
            .identifiers
            .iter()
            .map(|i| (i.kind.clone(), i.value.clone()))
            .collect();
        let wanted: BTreeSet<(String, String)> = customer
            .identifiers
            .iter()
            .map(|i| (i.kind.to_string(), i.value.clone()))
            .collect();
        if got != wanted {
            return Err(format!("identifiers differ: got {got:?}, want {wanted:?}"));
        }
        if !seen.insert(p.customer_id.clone()) {
            return Err(format!(
                "two reference customers map to profile {}",
                p.customer_id
            ));
        }
    }
    Ok(expected.len())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
