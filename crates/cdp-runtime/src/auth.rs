//! Who is calling: credentials (API keys from the configuration and keys
//! issued at run time through the `credentials` topic), the principal a
//! key stands for, rate limits, console sessions, and the one tower layer
//! that authenticates and authorises every gRPC call before any service
//! sees it (default deny: a method without a permission in
//! `cdp_domain::access::permission_of` is refused).
//!
//! Keys are stored as SHA-256 hashes and compared in constant time; an
//! unknown key costs the client a slot of its address's failure budget.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use cdp_config::{AccessConfig, CredentialConfig};
use cdp_domain::Profile;
use cdp_domain::access::{Disclosure, Masker, Permission, Role};
use cdp_log::EventLog;
use cdp_pipeline::credentials::{CredentialChange, IssuedKey};
use cdp_pipeline::{AuditEntry, topic};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::ServiceError;
use crate::audit::Auditor;

/// Who a credential stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub credential_id: String,
    pub name: String,
    pub role: Role,
    /// Sources an ingest credential sends for.
    pub sources: Vec<String>,
    /// Labels the principal is restricted to (empty: all customers).
    pub scopes: BTreeSet<String>,
    pub disclosure: Disclosure,
    pub team: String,
    /// Reads per minute, when the key has its own limit.
    pub reads_per_minute: Option<u32>,
}

/// The caller of one request, as the auth layer found it (in the request's
/// extensions for gRPC services).
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Arc<Principal>,
    /// The client's address.
    pub client: String,
    pub request_id: String,
    /// The method (`ProfileService/GetProfile`) or console route.
    pub action: String,
}

impl Caller {
    /// The caller of a gRPC request. Every method is behind the auth layer,
    /// so a missing caller is a wiring bug, answered as unauthenticated.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Caller, ServiceError> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| unauthenticated("a credential is required"))
    }

    /// A caller without a (valid) credential, for the audit of a refusal.
    pub fn anonymous(client: Option<SocketAddr>, request_id: String, action: String) -> Caller {
        Caller {
            principal: Arc::new(Principal {
                credential_id: String::new(),
                name: "anonymous".into(),
                role: Role::Agent,
                sources: Vec::new(),
                scopes: BTreeSet::new(),
                disclosure: Disclosure::Masked,
                team: String::new(),
                reads_per_minute: None,
            }),
            client: client.map(|c| c.to_string()).unwrap_or_default(),
            request_id,
            action,
        }
    }

    /// An audit entry of this caller.
    pub fn entry(&self, outcome: &str) -> AuditEntry {
        AuditEntry {
            at: crate::now_ms(),
            actor: self.principal.name.clone(),
            role: self.principal.role.to_string(),
            team: self.principal.team.clone(),
            action: self.action.clone(),
            outcome: outcome.to_owned(),
            client: self.client.clone(),
            request_id: self.request_id.clone(),
            ..AuditEntry::default()
        }
    }
}

fn unauthenticated(message: &str) -> ServiceError {
    ServiceError::Unauthenticated {
        message: message.to_owned(),
        challenge: Some("Bearer realm=\"cdp\""),
    }
}

/// One key the registry knows.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub id: String,
    pub name: String,
    pub role: Role,
    hash: [u8; 32],
    pub sources: Vec<String>,
    pub scopes: Vec<String>,
    pub disclosure: Option<Disclosure>,
    pub team: String,
    pub created_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    /// `config` or `issued`.
    pub origin: &'static str,
    pub reads_per_minute: Option<u32>,
}

impl KeyEntry {
    fn principal(&self) -> Principal {
        Principal {
            credential_id: self.id.clone(),
            name: self.name.clone(),
            role: self.role,
            sources: self.sources.clone(),
            scopes: self.scopes.iter().cloned().collect(),
            disclosure: self
                .disclosure
                .unwrap_or_else(|| self.role.default_disclosure()),
            team: self.team.clone(),
            reads_per_minute: self.reads_per_minute,
        }
    }

    fn usable_at(&self, now: i64) -> Result<(), &'static str> {
        if self.revoked_at.is_some() {
            return Err("this credential was revoked");
        }
        if self.expires_at.is_some_and(|e| e <= now) {
            return Err("this credential has expired");
        }
        Ok(())
    }
}

fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

fn parse_hash(hex_digest: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(hex_digest).ok()?;
    bytes.try_into().ok()
}

fn from_config(c: &CredentialConfig) -> Result<KeyEntry, String> {
    let hash = match (&c.key, &c.key_sha256) {
        (Some(k), _) => sha256(k.expose()),
        (None, Some(h)) => parse_hash(h).ok_or("key_sha256 is not 64 hex digits")?,
        (None, None) => return Err("no key".into()),
    };
    Ok(KeyEntry {
        id: format!("config:{}", c.name),
        name: c.name.clone(),
        role: c.role()?,
        hash,
        sources: c.sources.clone(),
        scopes: c.scopes.clone(),
        disclosure: c.disclosure()?,
        team: c.team.clone(),
        created_at: None,
        expires_at: c.expires_at_ms()?,
        revoked_at: None,
        origin: "config",
        reads_per_minute: c.reads_per_minute,
    })
}

fn from_issued(k: &IssuedKey) -> Option<KeyEntry> {
    Some(KeyEntry {
        id: k.id.clone(),
        name: k.name.clone(),
        role: k.role.parse().ok()?,
        hash: parse_hash(&k.key_sha256)?,
        sources: k.sources.clone(),
        scopes: k.scopes.clone(),
        disclosure: k.disclosure.as_deref().and_then(|d| d.parse().ok()),
        team: k.team.clone(),
        created_at: Some(k.created_at),
        expires_at: k.expires_at,
        revoked_at: None,
        origin: "issued",
        reads_per_minute: None,
    })
}

/// Every key: the configuration's, and those issued through the log.
pub struct Registry {
    config: Vec<KeyEntry>,
    issued: RwLock<Arc<Vec<KeyEntry>>>,
    log: Arc<dyn EventLog>,
    /// Held while the issued keys are read, one reading at a time: when
    /// the last reading started, whether it succeeded or not (none before
    /// the first).
    reading: tokio::sync::Mutex<Option<Instant>>,
}

/// How often unknown keys may trigger a re-read of the issued keys.
const MISS_REFRESH: Duration = Duration::from_millis(500);

impl Registry {
    pub fn new(credentials: &[CredentialConfig], log: Arc<dyn EventLog>) -> Result<Self, String> {
        let config = credentials
            .iter()
            .map(|c| from_config(c).map_err(|e| format!("credentials[{}]: {e}", c.name)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Registry {
            config,
            issued: RwLock::new(Arc::new(Vec::new())),
            log,
            reading: tokio::sync::Mutex::new(None),
        })
    }

    fn issued(&self) -> Arc<Vec<KeyEntry>> {
        match self.issued.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Reads the issued keys again from the `credentials` topic.
    pub async fn refresh(&self) -> Result<(), ServiceError> {
        let mut last = self.reading.lock().await;
        self.read_issued(&mut last).await
    }

    /// One reading of the topic, under the reading lock.
    async fn read_issued(&self, last: &mut Option<Instant>) -> Result<(), ServiceError> {
        // Noted before reading: a failed reading counts against the budget
        // too, so misses during a log outage do not each try in turn.
        *last = Some(Instant::now());
        let mut keys: Vec<KeyEntry> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        cdp_log::scan::<ServiceError>(self.log.as_ref(), topic::CREDENTIALS, 512, |r| {
            match cdp_pipeline::credentials::read(r) {
                Ok(CredentialChange::Issued(k)) => {
                    if let Some(e) = from_issued(&k) {
                        index.insert(e.id.clone(), keys.len());
                        keys.push(e);
                    }
                }
                Ok(CredentialChange::Revoked { id, at, .. }) => {
                    if let Some(&i) = index.get(&id) {
                        keys[i].revoked_at = Some(at);
                    }
                }
                Err(error) => tracing::warn!(%error, "an unreadable credentials record"),
            }
            Ok(())
        })
        .await?;
        match self.issued.write() {
            Ok(mut g) => *g = Arc::new(keys),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(keys),
        }
        Ok(())
    }

    /// After a miss: makes sure a reading that started after `asked` has
    /// completed, so a key issued anywhere before the request arrived is
    /// known. Misses that arrive together share one reading, and unknown
    /// keys reach the log at most once per `MISS_REFRESH` (a caller waits
    /// for the rest of it rather than being refused too early).
    async fn read_since(&self, asked: Instant) -> Result<(), ServiceError> {
        let mut last = self.reading.lock().await;
        if last.is_some_and(|started| started >= asked) {
            return Ok(());
        }
        if let Some(started) = *last {
            tokio::time::sleep_until((started + MISS_REFRESH).into()).await;
        }
        self.read_issued(&mut last).await
    }

    /// The key whose hash matches, compared in constant time against every
    /// known key.
    fn find(&self, token: &str) -> Option<KeyEntry> {
        let hash = sha256(token);
        let issued = self.issued();
        let mut found = None;
        for e in self.config.iter().chain(issued.iter()) {
            if bool::from(e.hash.ct_eq(&hash)) && found.is_none() {
                found = Some(e.clone());
            }
        }
        found
    }

    /// The principal of a key, reading newly issued keys when it is unknown.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, ServiceError> {
        let asked = Instant::now();
        let mut found = self.find(token);
        if found.is_none() {
            self.read_since(asked).await?;
            found = self.find(token);
        }
        let entry = found.ok_or_else(|| unauthenticated("unknown credential"))?;
        entry.usable_at(crate::now_ms()).map_err(unauthenticated)?;
        Ok(entry.principal())
    }

    /// The principal of a credential id, if it is still usable.
    pub fn by_id(&self, id: &str) -> Result<Principal, ServiceError> {
        let issued = self.issued();
        let entry = self
            .config
            .iter()
            .chain(issued.iter())
            .find(|e| e.id == id)
            .ok_or_else(|| unauthenticated("unknown credential"))?;
        entry.usable_at(crate::now_ms()).map_err(unauthenticated)?;
        Ok(entry.principal())
    }

    /// Every key (without secrets).
    pub fn list(&self) -> Vec<KeyEntry> {
        let issued = self.issued();
        self.config.iter().chain(issued.iter()).cloned().collect()
    }

    /// A new key: the change to append and the secret, shown once.
    pub fn issue(&self, spec: IssuedKey) -> (CredentialChange, String) {
        let id = spec.id.clone();
        let mut secret_bytes = [0u8; 24];
        rand::Rng::fill(&mut rand::rng(), &mut secret_bytes[..]);
        let secret = format!(
            "cdp_{id}_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret_bytes)
        );
        let key = IssuedKey {
            key_sha256: hex::encode(sha256(&secret)),
            ..spec
        };
        (CredentialChange::Issued(key), secret)
    }

    /// Appends a change and reads the keys again.
    pub async fn append(&self, change: &CredentialChange) -> Result<(), ServiceError> {
        let record = cdp_pipeline::credentials::record(change)
            .map_err(|e| ServiceError::Internal(format!("credential record: {e}")))?;
        self.log.append(topic::CREDENTIALS, vec![record]).await?;
        self.refresh().await
    }
}

type HmacSha256 = Hmac<Sha256>;

/// Everything that decides and records access, shared by every service of
/// a process.
pub struct Access {
    pub registry: Registry,
    pub config: AccessConfig,
    masker: Masker,
    /// Per-key read limits: one keyed limiter per distinct quota (the
    /// default, and each key's own).
    reads: HashMap<u32, DefaultKeyedRateLimiter<String>>,
    /// Failed sign-ins per address in the current minute: when the
    /// minute started, and how many.
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// Calls without a key per address in the current minute: beyond the
    /// same budget they are refused without an audit record each.
    anonymous: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    auditor: Auditor,
    session_key: Vec<u8>,
    /// Seals cursors a caller must not read in clear ([`Access::seal_cursor`]).
    cursor_key: cdp_seal::DataKey,
    /// Distinct customers read per credential in the current hour.
    usage: Mutex<HashMap<String, Usage>>,
    log: Arc<dyn EventLog>,
    /// Sources whose keys are public (write keys not trusted to link).
    untrusted: std::collections::HashSet<String>,
}

struct Usage {
    hour: i64,
    customers: HashSet<String>,
    alerted: bool,
}

/// Adds one to an address's count in the current window; the new count.
fn count(window: &Mutex<HashMap<IpAddr, (Instant, u32)>>, ip: IpAddr) -> u32 {
    let Ok(mut w) = window.lock() else { return 0 };
    if w.len() > 100_000 {
        w.retain(|_, (since, _)| since.elapsed() < FAILURE_WINDOW);
    }
    let entry = w.entry(ip).or_insert((Instant::now(), 0));
    if entry.0.elapsed() >= FAILURE_WINDOW {
        *entry = (Instant::now(), 0);
    }
    entry.1 += 1;
    entry.1
}

/// The window of failed sign-ins.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// The platform secret when none is configured (allowed only while every
/// port is on 127.0.0.1): random, made at first start and kept in
/// `<data_dir>/access-secret` (readable by the owner only), so sessions and
/// pseudonyms survive restarts and nobody can know it in advance.
fn local_secret(data_dir: &std::path::Path) -> Result<String, String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join("access-secret");
    let fail = |e: std::io::Error| format!("access.secret: {}: {e}", path.display());
    if let Ok(existing) = std::fs::read_to_string(&path) {
        return Ok(existing.trim().to_owned());
    }
    std::fs::create_dir_all(data_dir).map_err(fail)?;
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut bytes[..]);
    let secret = hex::encode(bytes);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            f.write_all(secret.as_bytes()).map_err(fail)?;
            f.sync_all().map_err(fail)?;
            Ok(secret)
        }
        // Another process of this data directory made it first.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .map_err(fail),
        Err(e) => Err(fail(e)),
    }
}

impl Access {
    /// Builds the access state and the audit writer (run the returned
    /// future as a task; it drains and stops when `cancel` fires).
    pub fn start(
        config: &cdp_config::PlatformConfig,
        log: Arc<dyn EventLog>,
        cancel: CancellationToken,
    ) -> Result<(Arc<Access>, impl Future<Output = ()> + Send + 'static), String> {
        let access = config.access.clone();
        let credentials = config.all_credentials();
        let registry = Registry::new(&credentials, Arc::clone(&log))?;
        let secret = match access.secret.expose() {
            "" => local_secret(&config.data_dir)?,
            s => s.to_owned(),
        };
        let derive = |label: &str| -> Vec<u8> {
            let mut mac = match HmacSha256::new_from_slice(secret.as_bytes()) {
                Ok(m) => m,
                Err(_) => return label.as_bytes().to_vec(),
            };
            mac.update(label.as_bytes());
            mac.finalize().into_bytes().to_vec()
        };
        let per_minute =
            |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN));
        let (auditor, writer) = Auditor::start(
            Arc::clone(&log),
            access.audit_wait == cdp_config::access::AuditWait::Durable,
            cancel,
        );
        let masker = Masker::new(
            Disclosure::Masked,
            access.personal_keys(),
            &derive("pseudonyms"),
        );
        Ok((
            Arc::new(Access {
                registry,
                masker,
                reads: credentials
                    .iter()
                    .filter_map(|c| c.reads_per_minute)
                    .chain([access.reads_per_minute])
                    .map(|n| (n, RateLimiter::keyed(per_minute(n))))
                    .collect(),
                failures: Mutex::new(HashMap::new()),
                anonymous: Mutex::new(HashMap::new()),
                auditor,
                session_key: derive("console-sessions"),
                cursor_key: cdp_seal::DataKey::from_slice(&derive("cursors"))
                    .map_err(|e| format!("access.secret: a cursor key: {e}"))?,
                usage: Mutex::new(HashMap::new()),
                log,
                untrusted: config
                    .sources
                    .iter()
                    .filter(|s| !s.trusted_to_link)
                    .map(|s| s.id.clone())
                    .chain(config.identity.untrusted_sources.iter().cloned())
                    .collect(),
                config: access,
            }),
            writer,
        ))
    }

    /// A cursor that names what its caller must not read in clear (for a
    /// scoped key, a customer outside its scope), sealed with a key every
    /// process derives from the platform secret and bound to `context`
    /// (the caller's credential and what it lists): only that caller,
    /// listing the same thing, can go on from it, in any process.
    pub fn seal_cursor(&self, context: &str, cursor: &str) -> Result<String, ServiceError> {
        use base64::Engine;
        cdp_seal::seal_with(&self.cursor_key, context.as_bytes(), cursor.as_bytes())
            .map(|sealed| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sealed))
            .map_err(|e| ServiceError::Internal(format!("sealing a cursor: {e}")))
    }

    /// The cursor [`seal_cursor`](Self::seal_cursor) sealed for `context`;
    /// the error says why not, for the caller's `cursor` field.
    pub fn open_cursor(&self, context: &str, sealed: &str) -> Result<String, String> {
        use base64::Engine;
        let refused = || "is not a cursor this listing gave to this key".to_owned();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sealed)
            .map_err(|_| refused())?;
        let plain = cdp_seal::open_with(&self.cursor_key, context.as_bytes(), &bytes)
            .map_err(|_| refused())?;
        String::from_utf8(plain).map_err(|_| refused())
    }

    /// How `p` sees personal values.
    pub fn masker(&self, p: &Principal) -> Masker {
        self.masker.with(p.disclosure)
    }

    /// A masker for one disclosure (a reveal, an export granted clear).
    pub fn masker_with(&self, d: Disclosure) -> Masker {
        self.masker.with(d)
    }

    /// Whether `p` may see a customer seen at the sources of `profile`.
    pub fn in_scope(&self, p: &Principal, profile: &Profile) -> bool {
        if p.scopes.is_empty() {
            return true;
        }
        // Only sources whose keys are not public: a website's write key
        // must not bring a stranger into a store's scope.
        let labels = profile
            .sources
            .keys()
            .filter(|s| !self.untrusted.contains(s.as_str()))
            .filter_map(|s| self.config.labels.get(s))
            .flatten()
            .map(String::as_str);
        cdp_domain::access::in_scope(&p.scopes, labels)
    }

    /// Refuses a read beyond the credential's rate.
    pub fn check_rate(&self, p: &Principal) -> Result<(), ServiceError> {
        let quota = p.reads_per_minute.unwrap_or(self.config.reads_per_minute);
        let Some(limiter) = self.reads.get(&quota) else {
            return Ok(());
        };
        limiter.check_key(&p.credential_id).map_err(|_| {
            ServiceError::RateLimited(format!("{quota} reads per minute for this credential"))
        })
    }

    /// Refuses every sign-in from an address that failed
    /// `access.failed_logins_per_minute` times in the current minute.
    pub fn check_blocked(&self, client: Option<IpAddr>) -> Result<(), ServiceError> {
        let Some(ip) = client else { return Ok(()) };
        let Ok(failures) = self.failures.lock() else {
            return Ok(());
        };
        match failures.get(&ip) {
            Some((since, n))
                if since.elapsed() < FAILURE_WINDOW
                    && *n >= self.config.failed_logins_per_minute =>
            {
                Err(ServiceError::RateLimited(
                    "too many failed sign-ins from this address; wait a minute".into(),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed sign-in against the client's address.
    pub fn failed(&self, client: Option<IpAddr>) {
        if let Some(ip) = client {
            count(&self.failures, ip);
        }
    }

    /// Counts a call without a key; whether the address is past its budget.
    fn anonymous_over_budget(&self, client: Option<IpAddr>) -> bool {
        client.is_some_and(|ip| count(&self.anonymous, ip) > self.config.failed_logins_per_minute)
    }

    /// Forgets rate-limit state of idle keys (call now and then).
    pub fn housekeeping(&self) {
        self.reads.values().for_each(|r| r.retain_recent());
        for window in [&self.failures, &self.anonymous] {
            if let Ok(mut w) = window.lock() {
                w.retain(|_, (since, _)| since.elapsed() < FAILURE_WINDOW);
            }
        }
    }

    /// Writes an audit entry; the call fails when it cannot be recorded
    /// (no record, no data).
    pub async fn audit(&self, entry: AuditEntry) -> Result<(), ServiceError> {
        self.auditor.record(entry).await
    }

    /// Writes an audit entry and waits until it, and every entry before it,
    /// is durable: admin changes, and reads of the audit.
    pub async fn audit_durable(&self, entry: AuditEntry) -> Result<(), ServiceError> {
        self.auditor.record_durable(entry).await
    }

    /// Records a read of personal data about `customer_id` (audited, and
    /// counted towards the unusual-reads alert).
    pub async fn read(
        &self,
        caller: &Caller,
        customer_id: &str,
        fields: &[&str],
        lookup: &str,
    ) -> Result<(), ServiceError> {
        let mut entry = caller.entry("allowed");
        entry.customer_id = customer_id.to_owned();
        entry.fields = fields.iter().map(|f| (*f).to_owned()).collect();
        entry.lookup = lookup.to_owned();
        self.audit(entry).await?;
        self.count_read(caller, customer_id).await;
        Ok(())
    }

    async fn count_read(&self, caller: &Caller, customer_id: &str) {
        let now = crate::now_ms();
        let hour = now / 3_600_000;
        let threshold = self.config.alert_reads_per_hour;
        let crossed = {
            let Ok(mut usage) = self.usage.lock() else {
                return;
            };
            let u = usage
                .entry(caller.principal.credential_id.clone())
                .or_insert_with(|| Usage {
                    hour,
                    customers: HashSet::new(),
                    alerted: false,
                });
            if u.hour != hour {
                *u = Usage {
                    hour,
                    customers: HashSet::new(),
                    alerted: false,
                };
            }
            u.customers.insert(customer_id.to_owned());
            let n = u.customers.len();
            if !u.alerted && n > threshold as usize {
                u.alerted = true;
                Some(n)
            } else {
                None
            }
        };
        if let Some(n) = crossed {
            tracing::warn!(actor = %caller.principal.name, customers = n, threshold, "unusual number of profiles read");
            let alert = cdp_pipeline::codec::unusual_reads_record(
                &caller.principal.name,
                caller.principal.role.as_str(),
                u32::try_from(n).unwrap_or(u32::MAX),
                threshold,
                hour * 3_600_000,
                now,
            );
            let record = cdp_log::Record {
                key: caller.principal.name.clone().into_bytes(),
                value: alert,
                ..cdp_log::Record::default()
            };
            if let Err(error) = self.log.append(topic::ALERTS, vec![record]).await {
                tracing::error!(%error, "cannot append an unusual-reads alert");
            }
        }
    }

    /// Lets `caller` go on if its role grants `needs` (`None`: a method
    /// nobody may call) and, for reads, its rate allows; a refusal is
    /// audited. The one decision of the gRPC layer and the console alike.
    pub async fn permit(
        &self,
        caller: Caller,
        needs: Option<Permission>,
    ) -> Result<Caller, ServiceError> {
        let refused = match needs {
            Some(p) if caller.principal.role.allows(p) => {
                if p.is_rate_limited() {
                    self.check_rate(&caller.principal).err()
                } else {
                    None
                }
            }
            _ => Some(ServiceError::PermissionDenied(format!(
                "the {} role may not call {}",
                caller.principal.role, caller.action
            ))),
        };
        match refused {
            Some(e) => {
                self.denied(caller, &e).await;
                Err(e)
            }
            None => Ok(caller),
        }
    }

    /// Records a refused call.
    pub async fn denied(&self, caller: Caller, why: &ServiceError) {
        let mut entry = caller.entry("denied");
        entry.reason = why.to_string();
        if let Err(error) = self.audit(entry).await {
            tracing::error!(%error, "cannot audit a denied call");
        }
    }

    /// A console session for `p`: `<credential id>.<expiry ms>.<mac>`.
    pub fn session(&self, p: &Principal) -> (String, i64) {
        let expires =
            crate::now_ms() + i64::try_from(self.config.session_minutes).unwrap_or(480) * 60_000;
        let body = format!(
            "{}.{expires}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&p.credential_id)
        );
        (format!("{body}.{}", self.sign(&body)), expires)
    }

    fn sign(&self, body: &str) -> String {
        let mut mac = match HmacSha256::new_from_slice(&self.session_key) {
            Ok(m) => m,
            Err(_) => return String::new(),
        };
        mac.update(body.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// The principal of a console session, if it is genuine, not expired,
    /// and its credential still usable.
    pub fn from_session(&self, token: &str) -> Result<Principal, ServiceError> {
        let invalid = || unauthenticated("sign in again: the session is not valid");
        let (body, mac) = token.rsplit_once('.').ok_or_else(invalid)?;
        if !bool::from(self.sign(body).as_bytes().ct_eq(mac.as_bytes())) {
            return Err(invalid());
        }
        let (id, expires) = body.split_once('.').ok_or_else(invalid)?;
        let expires: i64 = expires.parse().map_err(|_| invalid())?;
        if expires <= crate::now_ms() {
            return Err(unauthenticated("the session has expired: sign in again"));
        }
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(id)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(invalid)?;
        self.registry.by_id(&id)
    }
}

/// The bearer token of an `authorization` value.
pub fn bearer(value: Option<&str>) -> Option<&str> {
    let v = value?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Authenticates and authorises every gRPC call (see the module docs).
#[derive(Clone)]
pub struct AuthLayer {
    access: Arc<Access>,
}

impl AuthLayer {
    pub fn new(access: Arc<Access>) -> Self {
        AuthLayer { access }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            access: Arc::clone(&self.access),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    access: Arc<Access>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The service that was made ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let access = Arc::clone(&self.access);
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            if cdp_domain::access::is_public(&path) {
                return inner.call(request).await;
            }
            let seen = Seen {
                client: client_of(&request),
                request_id: request_id_of(&request),
                token: bearer(
                    request
                        .headers()
                        .get(http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok()),
                )
                .map(str::to_owned),
            };
            match authorize(&access, seen, &path).await {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(e) => Ok(tonic::Status::from(e).into_http()),
            }
        })
    }
}

fn client_of<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let ext = request.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        // Over TLS the TCP details sit inside the TLS ones.
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

fn request_id_of<B>(request: &http::Request<B>) -> String {
    request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// The action name of a gRPC path: `ProfileService/GetProfile`.
fn action_of(path: &str) -> String {
    path.trim_start_matches('/')
        .trim_start_matches("cdp.v1.")
        .to_owned()
}

/// What the layer read off a request before deciding.
struct Seen {
    client: Option<SocketAddr>,
    request_id: String,
    token: Option<String>,
}

async fn authorize(access: &Access, seen: Seen, path: &str) -> Result<Caller, ServiceError> {
    let Seen {
        client,
        request_id,
        token,
    } = seen;
    let anonymous = |why: &str| {
        Caller::anonymous(
            client,
            request_id.clone(),
            format!("{} ({why})", action_of(path)),
        )
    };
    let principal = match token.as_deref() {
        None => {
            let e = unauthenticated("a credential is required: authorization: Bearer <key>");
            // A flood of calls without a key from one address is refused
            // without writing a record for each (keys from it still work).
            if !access.anonymous_over_budget(client.map(|c| c.ip())) {
                access.denied(anonymous("no credential"), &e).await;
            }
            return Err(e);
        }
        Some(token) => {
            access.check_blocked(client.map(|c| c.ip()))?;
            match access.registry.authenticate(token).await {
                Ok(p) => p,
                Err(e) => {
                    access.failed(client.map(|c| c.ip()));
                    access.denied(anonymous("bad credential"), &e).await;
                    return Err(e);
                }
            }
        }
    };
    let caller = Caller {
        principal: Arc::new(principal),
        client: client.map(|c| c.to_string()).unwrap_or_default(),
        request_id,
        action: action_of(path),
    };
    access
        .permit(caller, cdp_domain::access::permission_of(path))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_case_insensitively_and_empty_ones_refused() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }

    fn access(dir: &std::path::Path) -> Arc<Access> {
        let mut config = cdp_config::PlatformConfig {
            data_dir: dir.to_path_buf(),
            ..Default::default()
        };
        config.agents.push(cdp_config::AgentConfig {
            name: "lan".into(),
            token: cdp_config::Secret::new("lan-key-123"),
            role: None,
            team: "hcm".into(),
            scopes: Vec::new(),
        });
        let log = Arc::new(cdp_log::EmbeddedLog::open(dir, &cdp_pipeline::topic::ALL, 1).unwrap());
        let (access, _writer) = Access::start(&config, log, CancellationToken::new()).unwrap();
        access
    }

    #[tokio::test]
    async fn keys_authenticate_in_constant_time_and_sessions_cannot_be_forged() {
        let dir = tempfile::tempdir().unwrap();
        let access = access(dir.path());
        let lan = access.registry.authenticate("lan-key-123").await.unwrap();
        assert_eq!((lan.name.as_str(), lan.role), ("lan", Role::Agent));
        assert_eq!(lan.disclosure, Disclosure::Masked);
        assert!(access.registry.authenticate("lan-key-124").await.is_err());
        let (session, expires) = access.session(&lan);
        assert!(expires > crate::now_ms());
        assert_eq!(access.from_session(&session).unwrap(), lan);
        // Another credential id under the same signature, or a longer life.
        let (body, mac) = session.rsplit_once('.').unwrap();
        let (id, exp) = body.split_once('.').unwrap();
        let other = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("config:admin");
        assert!(
            access
                .from_session(&format!("{other}.{exp}.{mac}"))
                .is_err()
        );
        assert!(
            access
                .from_session(&format!("{id}.{}.{mac}", exp.len() + 1))
                .is_err()
        );
        assert!(access.from_session("garbage").is_err());
    }

    #[tokio::test]
    async fn a_key_issued_by_another_process_is_known_at_its_first_use() {
        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn EventLog> =
            Arc::new(cdp_log::EmbeddedLog::open(dir.path(), &topic::ALL, 1).unwrap());
        let here = Registry::new(&[], Arc::clone(&log)).unwrap();
        let there = Registry::new(&[], Arc::clone(&log)).unwrap();
        // This process has just read the keys (its periodic refresh, or a
        // miss), so the next miss falls inside the re-read budget.
        assert!(here.authenticate("cdp_nobody").await.is_err());
        let (change, secret) = there.issue(IssuedKey {
            id: "k1".into(),
            name: "agent.hoa".into(),
            role: "agent".into(),
            key_sha256: String::new(),
            sources: Vec::new(),
            scopes: Vec::new(),
            disclosure: None,
            team: "hn".into(),
            created_at: crate::now_ms(),
            expires_at: None,
            issued_by: "test".into(),
        });
        there.append(&change).await.unwrap();
        let p = here.authenticate(&secret).await.unwrap();
        assert_eq!((p.name.as_str(), p.role), ("agent.hoa", Role::Agent));
        // Misses arriving together share one reading and are all refused.
        let misses = futures::future::join_all((0..20).map(|i| {
            let here = &here;
            async move { here.authenticate(&format!("cdp_wrong_{i}")).await }
        }))
        .await;
        assert!(misses.iter().all(|m| m.is_err()));
    }

    #[test]
    fn failed_sign_ins_block_an_address_after_the_budget() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let access = rt.block_on(async { access(dir.path()) });
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        for _ in 0..access.config.failed_logins_per_minute {
            assert!(access.check_blocked(Some(ip)).is_ok());
            access.failed(Some(ip));
        }
        assert!(access.check_blocked(Some(ip)).is_err());
        assert!(
            access
                .check_blocked(Some("10.0.0.8".parse().unwrap()))
                .is_ok()
        );
    }

    #[test]
    fn actions_are_named_without_the_package() {
        assert_eq!(
            action_of("/cdp.v1.ProfileService/GetProfile"),
            "ProfileService/GetProfile"
        );
    }
}
