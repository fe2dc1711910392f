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

/// The `cdp` binary: `$CDP_BIN`, else next to the test executable's target dir.
pub fn cdp_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CDP_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("no current exe: {e}"));
    // target/<profile>/deps/<test> -> target/<profile>/cdp
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("odd test path {}", exe.display()));
    let bin = dir.join("cdp");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build -p cdp) or set CDP_BIN",
        bin.display()
    );
    bin
}

/// A `cdp dev` process with its own data directory.
pub struct CdpProcess {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub http: SocketAddr,
    data: PathBuf,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

/// Write keys and webhook secrets of the test configuration.
pub const WEB_KEY: &str = "test-web-key";
pub const POS_KEY: &str = "test-pos-key";
pub const ZALO_SECRET: &str = "test-zalo-secret";
pub const MESSENGER_SECRET: &str = "test-messenger-secret";
pub const MESSENGER_VERIFY: &str = "test-verify-token";
pub const AGENT_TOKEN: &str = "test-agent-token";

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
"#;

impl CdpProcess {
    pub fn start() -> Self {
        Self::start_with(DEFAULT_CONFIG)
    }

    pub fn start_with(config_toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let config = dir.path().join("cdp.toml");
        std::fs::write(&config, config_toml).unwrap_or_else(|e| panic!("write config: {e}"));
        let data = dir.path().join("data");
        let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut p = CdpProcess {
            child: None,
            addr: unbound,
            http: unbound,
            data,
            config,
            _dir: dir,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.with_extension("log"))
            .unwrap_or_else(|e| panic!("log file: {e}"));
        let mut child = Command::new(cdp_binary())
            .arg("--config")
            .arg(&self.config)
            .arg("dev")
            .arg("--grpc-addr")
            .arg("127.0.0.1:0")
            .arg("--http-addr")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&self.data)
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start cdp: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let mut lines = BufReader::new(stdout).lines();
        let (addr, http) = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(rest) = line.strip_prefix("CDP_READY grpc=") {
                        let (grpc, http) = rest
                            .split_once(" http=")
                            .unwrap_or_else(|| panic!("bad ready line {line}"));
                        let parse = |a: &str| {
                            a.parse::<SocketAddr>()
                                .unwrap_or_else(|e| panic!("bad address {a}: {e}"))
                        };
                        break (parse(grpc), parse(http));
                    }
                }
                _ => panic!("cdp exited before it was ready; its log:\n{}", self.log()),
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        self.addr = addr;
        self.http = http;
        self.child = Some(child);
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush or commit anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: the graceful path.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let Some(mut c) = self.child.take() else {
            panic!("not running")
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        c.wait().unwrap_or_else(|e| panic!("wait: {e}"))
    }

    /// Starts again on the same data directory with another configuration.
    pub fn restart_with(&mut self, config_toml: &str) {
        std::fs::write(&self.config, config_toml).unwrap_or_else(|e| panic!("write config: {e}"));
        self.restart();
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Starts again on the same data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap_or_else(|e| panic!("url: {e}"))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.url()))
    }

    pub async fn ingest(&self) -> IngestServiceClient<Channel> {
        IngestServiceClient::new(self.channel().await)
    }

    pub async fn profiles(&self) -> ProfileServiceClient<Channel> {
        ProfileServiceClient::new(self.channel().await)
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

pub fn to_struct(v: Value) -> Option<prost_types::Struct> {
    match v {
        Value::Object(m) => Some(cdp_proto::convert::json_to_struct(&m)),
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
    client: &mut ProfileServiceClient<Channel>,
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
    client: &mut ProfileServiceClient<Channel>,
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
            Err(s) if s.code() == tonic::Code::NotFound => {}
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

/// A test tool that `make test` installs, or None when it is missing and
/// `require_var` is unset (a developer's plain `cargo test`); when
/// `require_var` is set, a missing tool fails the test.
pub fn tool<T>(found: Option<T>, require_var: &str, what: &str) -> Option<T> {
    if found.is_none() {
        assert!(
            std::env::var_os(require_var).is_none(),
            "{what} is required but missing"
        );
        eprintln!("{what} missing; `make test` installs it");
    }
    found
}
