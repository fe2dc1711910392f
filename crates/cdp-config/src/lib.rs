//! Layered configuration: built-in defaults, then a TOML file, then
//! environment variables `CDP__SECTION__KEY` (for example
//! `CDP__SERVER__GRPC_ADDR=127.0.0.1:6000`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cdp_domain::{IdentityRules, IdentityRulesConfig, ValidationLimits};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub mod access;
mod backends;

pub use access::{AccessConfig, CredentialConfig};

pub use backends::{KafkaConfig, ScyllaConfig};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: identity rules: {0}")]
    Rules(#[from] cdp_domain::rules::RulesError),
    #[error("configuration: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The file is refused before it is parsed; `line` and `column` count from 1.
    #[error("configuration: {path}: line {line}, column {column}: {reason}")]
    File {
        path: String,
        line: usize,
        column: usize,
        reason: String,
    },
}

/// Deepest dotted key accepted in the file (`a.b.c` is 3). The platform's
/// own keys are at most 4 deep; the TOML parser refuses keys of 80 segments
/// without saying where, and builds a table per segment before it does.
pub const MAX_KEY_DEPTH: usize = 16;

/// Refuses a key of more than [`MAX_KEY_DEPTH`] dotted segments, naming its
/// line and column. The text is read with the TOML lexer, so dots inside
/// strings and comments do not count.
fn check_key_depth(path: &Path, text: &str) -> Result<(), ConfigError> {
    use toml_parser::lexer::TokenKind;
    let source = toml_parser::Source::new(text);
    let mut depth = 1usize;
    let mut start: Option<usize> = None;
    for token in source.lex() {
        let at = token.span().start();
        match token.kind() {
            TokenKind::Dot => {
                depth += 1;
                if depth > MAX_KEY_DEPTH {
                    let start = start.unwrap_or(at).min(text.len());
                    let before = &text[..start];
                    let line = before.matches('\n').count() + 1;
                    let column = before
                        .rfind('\n')
                        .map_or(before, |nl| &before[nl + 1..])
                        .chars()
                        .count()
                        + 1;
                    return Err(ConfigError::File {
                        path: path.display().to_string(),
                        line,
                        column,
                        reason: format!(
                            "a key of more than {MAX_KEY_DEPTH} dotted parts; no setting nests that deep"
                        ),
                    });
                }
            }
            TokenKind::Whitespace => {}
            TokenKind::Atom | TokenKind::BasicString | TokenKind::LiteralString => {
                start.get_or_insert(at);
            }
            _ => {
                depth = 1;
                start = None;
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the gRPC API listens (ingest, profile, health, reflection).
    pub grpc_addr: SocketAddr,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Serve gRPC over TLS (and require client certificates signed by
    /// `client_ca`: mutual TLS).
    pub tls: Option<TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            max_message_bytes: 4 * 1024 * 1024,
            tls: None,
        }
    }
}

/// A certificate and its key, PEM files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificates of the authority that signs clients' certificates:
    /// when set, a client without one is refused (gRPC only).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Where the log lives: `embedded` (files under `data_dir`, one process)
    /// or `kafka`.
    pub backend: LogBackend,
    /// Partitions of every topic (fixed when the topics are created).
    pub partitions: u32,
    /// Settings of the Kafka back end (`backend = "kafka"`).
    pub kafka: KafkaConfig,
    /// Page cache of the embedded log, in MiB (part of the process's memory).
    pub embedded_cache_mib: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            backend: LogBackend::Embedded,
            partitions: 4,
            kafka: KafkaConfig::default(),
            embedded_cache_mib: 32,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogBackend {
    Embedded,
    Kafka,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Where identity graph and profiles live: `embedded` (files under
    /// `data_dir`, one process) or `scylla` (ScyllaDB or any CQL server).
    pub backend: StoreBackend,
    /// Settings of the ScyllaDB back end (`backend = "scylla"`).
    pub scylla: ScyllaConfig,
    /// Page cache of each embedded store generation, in MiB, shared by its
    /// graph and views files (part of the process's memory; reads beyond it
    /// go to the OS page cache; pages written between syncs wait in half of it).
    pub embedded_cache_mib: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Embedded,
            scylla: ScyllaConfig::default(),
            embedded_cache_mib: 128,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    #[default]
    Embedded,
    Scylla,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Records a worker takes from the log at once.
    pub batch_size: usize,
    /// Longest a worker waits for new records before polling again, in ms.
    pub poll_interval_ms: u64,
    /// Longest a worker keeps handled batches before it makes them durable
    /// and commits their positions, while records keep coming, in ms (an
    /// idle worker commits at once). See `docs/ARCHITECTURE.md`.
    pub commit_interval_ms: u64,
    /// Retry back-off bounds for a failing store or log, in ms.
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    /// Identity workers in this process (they split the partitions).
    pub identity_workers: u32,
    /// Profile workers in this process.
    pub profile_workers: u32,
    /// Processes that run these workers side by side (replicas of
    /// `cdp-identity` or `cdp-profile`), and which one this is (0-based,
    /// for example a StatefulSet ordinal). Together they split the
    /// partitions: no partition is consumed twice.
    pub processes: u32,
    pub process_index: u32,
    /// How often a process checks which projection generation is active
    /// (after a rebuild switched it), in ms.
    pub generation_refresh_ms: u64,
    /// How far behind the log (touchpoints not yet resolved) a generation
    /// may be when it is activated without `force`.
    pub activation_max_lag: u64,
    /// How long the generation a switch retired is kept before it may be
    /// dropped without `force`, in seconds.
    pub drop_grace_secs: u64,
    /// How often a profile process looks for audience timers that are due
    /// (windowed computed traits letting events go), in ms; 0 turns the
    /// timers off (memberships then change at each customer's next event).
    pub audience_timer_ms: u64,
}

impl PipelineConfig {
    /// The share of the partitions of worker `worker` of `workers` in this process.
    pub fn membership(&self, worker: u32, workers: u32) -> cdp_log::Membership {
        let workers = workers.max(1);
        cdp_log::Membership {
            index: self.process_index * workers + worker,
            members: self.processes.max(1) * workers,
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            batch_size: 256,
            poll_interval_ms: 200,
            commit_interval_ms: 1_000,
            retry_min_ms: 50,
            retry_max_ms: 5_000,
            identity_workers: 1,
            processes: 1,
            process_index: 0,
            generation_refresh_ms: 1_000,
            profile_workers: 1,
            activation_max_lag: 1_000,
            drop_grace_secs: 600,
            audience_timer_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `tracing` filter, as in RUST_LOG (which overrides it).
    pub filter: String,
    pub format: LogFormat,
    /// OpenTelemetry collector to export spans to over OTLP/gRPC, such as
    /// `http://127.0.0.1:4317`. Export is off when unset.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            filter: "info".into(),
            format: LogFormat::Text,
            otlp_endpoint: None,
        }
    }
}

/// A secret (write key, app secret): never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Where the Segment-compatible HTTP API and the webhooks listen.
    pub addr: SocketAddr,
    /// Largest `/v1/batch` body, after decompression (Segment: 500 KB).
    pub max_batch_bytes: usize,
    /// Serve HTTPS (the Segment API, webhooks and the console).
    pub tls: Option<TlsConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_batch_bytes: 500 * 1024,
            tls: None,
        }
    }
}

/// A source: one system that sends events (a website, an app, a POS).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub id: String,
    /// The channel of its events unless an event says otherwise.
    pub channel: String,
    /// The Segment write key (HTTP basic auth user name).
    pub write_key: Secret,
    /// Event types it may send (empty: any).
    #[serde(default)]
    pub allowed_types: Vec<String>,
    /// Whether its events may link identifiers like a server-side source.
    /// A write key is public by nature (it ships in a web page or an app),
    /// so by default its events may add identifiers only to the customer
    /// they are already on, never attach to a customer found only through a
    /// typed email or phone (see `identity.untrusted_sources`).
    #[serde(default)]
    pub trusted_to_link: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZaloConfig {
    pub source_id: String,
    /// The OA secret key that signs webhook events.
    pub oa_secret_key: Secret,
    /// Events whose (signed) timestamp is older than this, or as far in
    /// the future, are refused: a captured request cannot be replayed
    /// later. Zalo delivers within seconds.
    #[serde(default = "default_webhook_max_age_secs")]
    pub max_age_secs: u64,
}

fn default_webhook_max_age_secs() -> u64 {
    900
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessengerConfig {
    pub source_id: String,
    /// The Facebook app secret that signs webhook calls.
    pub app_secret: Secret,
    /// The token Facebook echoes when the webhook is verified.
    pub verify_token: Secret,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    pub zalo: Option<ZaloConfig>,
    pub messenger: Option<MessengerConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileConfig {
    /// Trust of sources (by source id, else channel name; default 0). A trait
    /// from a more trusted source wins; between equals, the newer value.
    pub source_trust: std::collections::BTreeMap<String, i64>,
}

/// A customer-service agent who may use the console: shorthand for a
/// credential with the `agent` role (or the one given).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub name: String,
    /// The agent's key.
    pub token: Secret,
    /// agent (the default), supervisor or admin.
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub team: String,
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// The whole platform's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlatformConfig {
    /// Where the embedded log and store keep their files.
    pub data_dir: PathBuf,
    pub server: ServerConfig,
    pub http: HttpConfig,
    /// Sources allowed to send over HTTP, each with its write key.
    pub sources: Vec<SourceConfig>,
    pub webhooks: WebhooksConfig,
    pub log: LogConfig,
    pub store: StoreConfig,
    pub pipeline: PipelineConfig,
    pub identity: IdentityRulesConfig,
    pub validation: ValidationLimits,
    pub profile: ProfileConfig,
    /// Agents of the console (shorthand credentials).
    pub agents: Vec<AgentConfig>,
    /// API keys of every caller of the gRPC API and the console.
    pub credentials: Vec<CredentialConfig>,
    pub access: AccessConfig,
    pub telemetry: TelemetryConfig,
    /// What one client, or a crowd of them, may take from a process.
    pub limits: LimitsConfig,
    /// Crypto-shredding and erasure.
    pub privacy: PrivacyConfig,
}

/// What becomes of a new event that carries an erased (suppressed) identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuppressedEvents {
    /// Not appended; answered as suppressed.
    Drop,
    /// Appended without the suppressed identifiers and without traits; an
    /// event left with no identifier is dropped.
    Anonymise,
}

/// Crypto-shredding: every record's personal part is sealed under the data
/// keys of its identifiers, which are wrapped by the master key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyConfig {
    /// The master keys, one `<version> <base64 of 32 bytes>` per line (the
    /// highest version wraps). Default: `<data_dir>/master.keys`, created
    /// with a fresh key when absent. Every process of one platform must
    /// read the same keys; keep the file out of the data's backups.
    pub master_key_file: Option<PathBuf>,
    /// How long a process keeps a data key in memory: an erasure reaches
    /// every process within this time.
    pub key_cache_secs: u64,
    /// Most data keys a process keeps in memory.
    pub key_cache_entries: usize,
    /// New events carrying an erased identifier.
    pub suppressed: SuppressedEvents,
    /// Days within which an erasure must be complete, reported with each
    /// request (Decree 13 asks for 72 hours).
    pub erasure_deadline_days: u32,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            master_key_file: None,
            key_cache_secs: 5,
            key_cache_entries: 200_000,
            suppressed: SuppressedEvents::Drop,
            erasure_deadline_days: 3,
        }
    }
}

impl PrivacyConfig {
    /// The master key file in effect.
    pub fn master_key_path(&self, data_dir: &Path) -> PathBuf {
        self.master_key_file
            .clone()
            .unwrap_or_else(|| data_dir.join("master.keys"))
    }
}

/// Bounds on every listener (gRPC and HTTP, each) and when to shed load:
/// overload turns into refusals (`RESOURCE_EXHAUSTED`, HTTP 503 with
/// `Retry-After`), never into unbounded memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open connections per listener; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Requests waiting for their answer per listener; more are refused at
    /// once. A stream counts until its response starts; open streams are
    /// bounded by `max_connections` and HTTP/2's `max_concurrent_streams`
    /// (set to this value per connection).
    pub max_requests: usize,
    /// A connection that has sent nothing this long after it opened, or a
    /// request whose headers are not complete by then, is closed.
    pub header_timeout_secs: u64,
    /// A connection on which nothing is sent or received for this long is
    /// closed (an idle HTTP/1 keep-alive connection sooner, by the header
    /// timeout). HTTP/2 keep-alive pings count as traffic, so gRPC
    /// connections are also recycled after 30 minutes.
    pub idle_timeout_secs: u64,
    /// A request that has no answer this long gets one (408 / `DEADLINE_EXCEEDED`);
    /// streams that have started are not cut.
    pub request_timeout_secs: u64,
    /// Writes (ingest, webhooks) are refused while the pipeline is more
    /// than this many touchpoints behind the log.
    pub shed_lag: u64,
    /// Everything but health is refused while the process holds more than
    /// this much memory (MiB); 0: 80% of the machine's or cgroup's memory.
    pub shed_memory_mib: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 4096,
            max_requests: 1024,
            header_timeout_secs: 10,
            idle_timeout_secs: 300,
            request_timeout_secs: 60,
            shed_lag: 2_000_000,
            shed_memory_mib: 0,
        }
    }
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            data_dir: PathBuf::from("data"),
            server: ServerConfig::default(),
            http: HttpConfig::default(),
            sources: Vec::new(),
            webhooks: WebhooksConfig::default(),
            log: LogConfig::default(),
            store: StoreConfig::default(),
            pipeline: PipelineConfig::default(),
            identity: IdentityRulesConfig::default(),
            validation: ValidationLimits::default(),
            profile: ProfileConfig::default(),
            agents: Vec::new(),
            credentials: Vec::new(),
            access: AccessConfig::default(),
            telemetry: TelemetryConfig::default(),
            limits: LimitsConfig::default(),
            privacy: PrivacyConfig::default(),
        }
    }
}

impl PlatformConfig {
    /// Loads defaults, then `file` if given, then `CDP__*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let defaults = config::Config::try_from(&PlatformConfig::default())?;
        let mut builder = config::Config::builder().add_source(defaults);
        if let Some(path) = file {
            // A file that cannot be read is reported by the loader below.
            if let Ok(text) = std::fs::read_to_string(path) {
                check_key_depth(path, &text)?;
            }
            builder = builder.add_source(config::File::from(path).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("CDP")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                // CDP__STORE__SCYLLA__NODES=host1:9042,host2:9042
                .list_separator(",")
                .with_list_parse_key("store.scylla.nodes"),
        );
        let loaded: PlatformConfig = builder.build()?.try_deserialize()?;
        loaded.check()?;
        Ok(loaded)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        for (field, value) in [
            ("limits.max_connections", l.max_connections as u64),
            ("limits.max_requests", l.max_requests as u64),
            ("limits.header_timeout_secs", l.header_timeout_secs),
            ("limits.idle_timeout_secs", l.idle_timeout_secs),
            ("limits.request_timeout_secs", l.request_timeout_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    field,
                    reason: "must be above 0".into(),
                });
            }
        }
        if self.log.partitions == 0 || self.log.partitions > 1024 {
            return Err(ConfigError::Invalid {
                field: "log.partitions",
                reason: format!("must be between 1 and 1024, not {}", self.log.partitions),
            });
        }
        if self.pipeline.process_index >= self.pipeline.processes.max(1) {
            return Err(ConfigError::Invalid {
                field: "pipeline.process_index",
                reason: format!(
                    "must be below pipeline.processes ({}), not {}",
                    self.pipeline.processes, self.pipeline.process_index
                ),
            });
        }
        if self.pipeline.generation_refresh_ms == 0 {
            return Err(ConfigError::Invalid {
                field: "pipeline.generation_refresh_ms",
                reason: "must be at least 1".into(),
            });
        }
        if self.pipeline.batch_size == 0 {
            return Err(ConfigError::Invalid {
                field: "pipeline.batch_size",
                reason: "must be at least 1".into(),
            });
        }
        IdentityRules::new(self.identity.clone())?;
        access::check(&self.all_credentials(), &self.access)?;
        if self
            .http
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca.is_some())
        {
            return Err(ConfigError::Invalid {
                field: "http.tls.client_ca",
                reason: "client certificates are for gRPC (server.tls.client_ca); browsers and SDKs send none".into(),
            });
        }
        self.check_exposure()?;
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.sources {
            if s.id.trim().is_empty() || s.write_key.expose().trim().is_empty() {
                return Err(ConfigError::Invalid {
                    field: "sources",
                    reason: "every source needs an id and a write_key".into(),
                });
            }
            if let Err(reason) = s.channel.parse::<cdp_domain::Channel>() {
                return Err(ConfigError::Invalid {
                    field: "sources.channel",
                    reason: format!("source {}: {reason}", s.id),
                });
            }
            if !seen.insert(s.write_key.expose().to_owned()) {
                return Err(ConfigError::Invalid {
                    field: "sources.write_key",
                    reason: format!("source {} reuses another source's write key", s.id),
                });
            }
        }
        Ok(())
    }

    /// Every configured credential: `[[credentials]]` and the agents.
    pub fn all_credentials(&self) -> Vec<CredentialConfig> {
        let mut all = self.credentials.clone();
        all.extend(self.agents.iter().map(|a| CredentialConfig {
            name: a.name.clone(),
            role: a.role.clone().unwrap_or_else(|| "agent".into()),
            key: Some(a.token.clone()),
            key_sha256: None,
            sources: Vec::new(),
            scopes: a.scopes.clone(),
            disclosure: None,
            team: a.team.clone(),
            expires_at: None,
            reads_per_minute: None,
        }));
        let bootstrap = self.access.admin_key_sha256.trim();
        if !bootstrap.is_empty() {
            all.push(CredentialConfig {
                name: "bootstrap-admin".into(),
                role: "admin".into(),
                key: None,
                key_sha256: Some(bootstrap.to_owned()),
                sources: Vec::new(),
                scopes: Vec::new(),
                disclosure: None,
                team: String::new(),
                expires_at: None,
                reads_per_minute: None,
            });
        }
        all
    }

    /// Whether every port this configuration opens is on the loopback
    /// interface.
    pub fn loopback_only(&self) -> bool {
        self.server.grpc_addr.ip().is_loopback() && self.http.addr.ip().is_loopback()
    }

    /// Demo secrets (`dev-…`, as in `cdp.example.toml`) and a missing
    /// platform secret are refused on a port other machines can reach,
    /// unless `access.allow_demo_credentials` says otherwise.
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        if self.loopback_only() || self.access.allow_demo_credentials {
            return Ok(());
        }
        let mut secrets: Vec<(String, &str)> = Vec::new();
        for s in &self.sources {
            secrets.push((format!("sources[{}].write_key", s.id), s.write_key.expose()));
        }
        for a in &self.agents {
            secrets.push((format!("agents[{}].token", a.name), a.token.expose()));
        }
        for c in &self.credentials {
            if let Some(k) = &c.key {
                secrets.push((format!("credentials[{}].key", c.name), k.expose()));
            }
        }
        if let Some(z) = &self.webhooks.zalo {
            secrets.push((
                "webhooks.zalo.oa_secret_key".into(),
                z.oa_secret_key.expose(),
            ));
        }
        if let Some(m) = &self.webhooks.messenger {
            secrets.push((
                "webhooks.messenger.app_secret".into(),
                m.app_secret.expose(),
            ));
            secrets.push((
                "webhooks.messenger.verify_token".into(),
                m.verify_token.expose(),
            ));
        }
        secrets.push(("access.secret".into(), self.access.secret.expose()));
        if self.access.secret.expose().len() < 16 {
            return Err(ConfigError::Invalid {
                field: "access.secret",
                reason: "a secret of at least 16 characters is required when a port listens beyond 127.0.0.1".into(),
            });
        }
        if let Some((field, _)) = secrets.iter().find(|(_, v)| access::is_demo_secret(v)) {
            return Err(ConfigError::Invalid {
                field: "access.allow_demo_credentials",
                reason: format!(
                    "{field} is a demo secret (dev-…) and a port listens beyond 127.0.0.1: replace it, or set access.allow_demo_credentials = true"
                ),
            });
        }
        Ok(())
    }

    /// How the profile fold treats events.
    pub fn fold_options(&self) -> cdp_domain::FoldOptions {
        cdp_domain::FoldOptions {
            default_currency: self.validation.default_currency.clone(),
            source_trust: self.profile.source_trust.clone(),
            audiences: Default::default(),
        }
    }

    /// The identity rules, with the Segment sources not trusted to link
    /// added to the untrusted ones.
    pub fn identity_rules(&self) -> Result<IdentityRules, ConfigError> {
        Ok(
            IdentityRules::new(self.identity.clone())?.with_untrusted_sources(
                self.sources
                    .iter()
                    .filter(|s| !s.trusted_to_link)
                    .map(|s| s.id.clone()),
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_overrides_defaults_and_keeps_the_rest() {
        let mut f = tempfile::NamedTempFile::with_suffix(".toml").unwrap();
        writeln!(
            f,
            "data_dir = \"/tmp/x\"\n[server]\ngrpc_addr = \"127.0.0.1:6001\"\n[identity.kinds.device_id]\npriority = 8\nlimit = 3\nblocked = [\"shared-kiosk\"]"
        )
        .unwrap();
        let c = PlatformConfig::load(Some(f.path())).unwrap();
        assert_eq!(c.server.grpc_addr.port(), 6001);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.log.partitions, 4);
        assert_eq!(
            c.identity.kinds["device_id"].blocked,
            vec!["shared-kiosk".to_string()]
        );
        assert!(c.identity.kinds.contains_key("email"));
    }

    #[test]
    fn the_distributed_back_ends_are_chosen_in_the_file() {
        let mut f = tempfile::NamedTempFile::with_suffix(".toml").unwrap();
        writeln!(
            f,
            "[log]\nbackend = \"kafka\"\n[log.kafka]\nbrokers = \"k1:9092,k2:9092\"\n[store]\nbackend = \"scylla\"\n[store.scylla]\nnodes = [\"s1:9042\", \"s2:9042\"]\nkeyspace = \"shop\""
        )
        .unwrap();
        let c = PlatformConfig::load(Some(f.path())).unwrap();
        assert_eq!(c.log.backend, LogBackend::Kafka);
        assert_eq!(c.log.kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(c.log.kafka.topic_prefix, "cdp.", "unset keys keep defaults");
        assert_eq!(c.store.backend, StoreBackend::Scylla);
        assert_eq!(c.store.scylla.nodes, vec!["s1:9042", "s2:9042"]);
        assert_eq!(c.store.scylla.keyspace, "shop");
        let mut f = tempfile::NamedTempFile::with_suffix(".toml").unwrap();
        writeln!(f, "[log]\nbackend = \"rabbitmq\"").unwrap();
        let err = PlatformConfig::load(Some(f.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("rabbitmq"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let mut f = tempfile::NamedTempFile::with_suffix(".toml").unwrap();
        writeln!(f, "[log]\npartitions = 0").unwrap();
        let err = PlatformConfig::load(Some(f.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("log.partitions"), "{err}");
        let mut f = tempfile::NamedTempFile::with_suffix(".toml").unwrap();
        writeln!(f, "[server]\ngrpc_adr = \"x\"").unwrap();
        assert!(PlatformConfig::load(Some(f.path())).is_err());
    }

    #[test]
    fn a_key_nested_too_deep_is_refused_at_its_line_and_column() {
        let deep = vec!["e"; MAX_KEY_DEPTH + 1].join(" . ");
        let mut f = tempfile::NamedTempFile::with_suffix(".toml").unwrap();
        writeln!(
            f,
            "t = \"a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s\" # x.y.z\n[server]\n  [{deep}]\nx = 1"
        )
        .unwrap();
        let err = PlatformConfig::load(Some(f.path())).unwrap_err();
        match &err {
            ConfigError::File { line, column, .. } => assert_eq!((*line, *column), (3, 4), "{err}"),
            other => panic!("expected a file error, got {other}"),
        }
        let mut f = tempfile::NamedTempFile::with_suffix(".toml").unwrap();
        let key = vec!["e"; MAX_KEY_DEPTH].join(".");
        writeln!(f, "[{key}]\nx = 1").unwrap();
        let err = PlatformConfig::load(Some(f.path())).unwrap_err();
        assert!(
            matches!(err, ConfigError::Load(_)),
            "a key of {MAX_KEY_DEPTH} parts is parsed and refused as unknown: {err}"
        );
    }
}

#[cfg(test)]
mod example {
    use super::*;

    #[test]
    fn the_example_configuration_loads_and_partial_kind_rules_keep_their_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cdp.example.toml");
        let c = PlatformConfig::load(Some(&path)).unwrap();
        let rules = c.identity_rules().unwrap();
        assert!(rules.is_known(&cdp_domain::IdKind::Custom("crm_id".into())));
        // Write-key sources link only through what they carry, unless trusted.
        assert!(rules.is_untrusted("website") && rules.is_untrusted("mobile-app"));
        assert!(!rules.is_untrusted("pos"));
        // Blocked values are normalised like events.
        assert!(
            rules
                .blocked(&cdp_domain::Identifier::new(
                    cdp_domain::IdKind::Phone,
                    "+84999999999"
                ))
                .is_some()
        );
        assert!(
            c.identity.kinds["device_id"]
                .blocked_patterns
                .contains(&"kiosk-*".to_string())
        );
        // Kinds the file does not mention keep the built-in rules.
        assert_eq!(
            c.identity.kinds["email"],
            IdentityRulesConfig::default().kinds["email"]
        );
    }

    #[test]
    fn demo_secrets_and_a_missing_platform_secret_are_refused_beyond_loopback() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cdp.example.toml");
        let mut c = PlatformConfig::load(Some(&path)).unwrap();
        assert!(c.check_exposure().is_ok(), "127.0.0.1 serves the demo keys");
        c.server.grpc_addr = "0.0.0.0:50051".parse().unwrap();
        let e = c.check_exposure().unwrap_err().to_string();
        assert!(e.contains("access.secret"), "{e}");
        c.access.secret = Secret::new("a-real-secret-of-enough-length");
        let e = c.check_exposure().unwrap_err().to_string();
        assert!(
            e.contains("demo secret") && e.contains("sources[website]"),
            "{e}"
        );
        c.access.allow_demo_credentials = true;
        assert!(c.check_exposure().is_ok());
    }

    #[test]
    fn credentials_name_a_known_role_one_key_and_sources_only_for_ingest() {
        use std::io::Write as _;
        let load = |toml: &str| {
            let mut f = tempfile::NamedTempFile::with_suffix(".toml").unwrap();
            writeln!(f, "{toml}").unwrap();
            PlatformConfig::load(Some(f.path())).map_err(|e| e.to_string())
        };
        let ok = load(
            "[[credentials]]\nname = \"crm\"\nrole = \"ingest\"\nkey_sha256 = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\nsources = [\"crm\"]",
        );
        assert!(ok.is_ok(), "{ok:?}");
        for (toml, says) in [
            (
                "[[credentials]]\nname = \"x\"\nrole = \"root\"\nkey = \"long-enough-key\"",
                "unknown role",
            ),
            (
                "[[credentials]]\nname = \"x\"\nrole = \"ingest\"\nkey = \"long-enough-key\"",
                "names the sources",
            ),
            (
                "[[credentials]]\nname = \"x\"\nrole = \"agent\"\nkey = \"long-enough-key\"\nsources = [\"crm\"]",
                "only ingest",
            ),
            (
                "[[credentials]]\nname = \"x\"\nrole = \"agent\"\nkey = \"short\"",
                "at least 8",
            ),
            (
                "[[credentials]]\nname = \"x\"\nrole = \"agent\"",
                "exactly one of key",
            ),
            (
                "[[credentials]]\nname = \"x\"\nrole = \"agent\"\nkey_sha256 = \"abc\"",
                "64 hex",
            ),
            (
                "[[credentials]]\nname = \"x\"\nrole = \"agent\"\nkey = \"long-enough-key\"\nexpires_at = \"soon\"",
                "expires_at",
            ),
        ] {
            let e = load(toml).unwrap_err();
            assert!(e.contains(says), "{toml}: {e}");
        }
        let c = load("[access]\nadmin_key_sha256 = \"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"").unwrap();
        assert!(
            c.all_credentials()
                .iter()
                .any(|k| k.name == "bootstrap-admin" && k.role == "admin")
        );
    }
}
