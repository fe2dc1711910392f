//! `[access]` and `[[credentials]]`: who may call the platform and what
//! they see (see `cdp_domain::access` for the rules).

use std::collections::BTreeMap;

use cdp_domain::access::{Disclosure, Role};
use serde::{Deserialize, Serialize};

use crate::{ConfigError, Secret};

/// An API key from the configuration. Keys issued at run time
/// (`cdp credentials issue`) live in the log instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    pub name: String,
    /// ingest, agent, supervisor, analyst, operator or admin.
    pub role: String,
    /// The key itself (development only; prefer `key_sha256`).
    #[serde(default)]
    pub key: Option<Secret>,
    /// The SHA-256 of the key, in hex (`printf %s "$KEY" | sha256sum`).
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// Sources an `ingest` credential may send for (`*`: every source).
    #[serde(default)]
    pub sources: Vec<String>,
    /// Labels (`[access.labels]`) the credential is restricted to.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// clear, masked or pseudonymised (empty: the role's default).
    #[serde(default)]
    pub disclosure: Option<String>,
    /// Supervisors read the audit of their team.
    #[serde(default)]
    pub team: String,
    /// When the key stops working (RFC 3339; none: never).
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Reads per minute for this key (a sync job, an export), instead of
    /// `access.reads_per_minute`.
    #[serde(default)]
    pub reads_per_minute: Option<u32>,
}

impl CredentialConfig {
    pub fn role(&self) -> Result<Role, String> {
        self.role.parse()
    }

    pub fn disclosure(&self) -> Result<Option<Disclosure>, String> {
        self.disclosure.as_deref().map(str::parse).transpose()
    }

    /// The expiry in Unix milliseconds.
    pub fn expires_at_ms(&self) -> Result<Option<i64>, String> {
        self.expires_at
            .as_deref()
            .map(|s| {
                chrono::DateTime::parse_from_rfc3339(s)
                    .map(|t| t.timestamp_millis())
                    .map_err(|e| format!("expires_at {s:?}: {e}"))
            })
            .transpose()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessConfig {
    /// The platform secret: signs console sessions and keys analysts'
    /// pseudonyms. Required when a port is reachable from other machines.
    pub secret: Secret,
    /// How long a console sign-in lasts, in minutes.
    pub session_minutes: u64,
    /// Failed sign-ins (console) or unknown keys (gRPC) allowed per client
    /// address per minute before it is answered 429 / RESOURCE_EXHAUSTED.
    pub failed_logins_per_minute: u32,
    /// Reads of personal data (lookups, searches, timelines) allowed per
    /// credential per minute.
    pub reads_per_minute: u32,
    /// An alert record when one credential reads more distinct customers
    /// than this in an hour.
    pub alert_reads_per_hour: u32,
    /// How long a revealed field stays shown, in seconds.
    pub reveal_seconds: u64,
    /// Lifetime of keys issued by `cdp credentials issue`, in days.
    pub credential_ttl_days: u64,
    /// Serve demo secrets (values starting with `dev-`) on a port other
    /// machines can reach. Never in production.
    pub allow_demo_credentials: bool,
    /// Labels of sources (`pos-hcm-01 = ["region:south", "brand:an"]`):
    /// a credential scoped to a label sees customers seen at those sources.
    pub labels: BTreeMap<String, Vec<String>>,
    /// Trait and property keys agents see in clear (they greet customers by
    /// name).
    pub visible_to_agents: Vec<String>,
    /// More keys holding personal data (matched as a part of the key), on
    /// top of the built-in ones (email, phone, address, birthday...).
    pub personal_keys: Vec<String>,
    /// The SHA-256 (hex) of a first admin's key, for deployments configured
    /// by environment only (`CDP__ACCESS__ADMIN_KEY_SHA256`): that admin
    /// issues every other key with `cdp credentials issue`.
    pub admin_key_sha256: String,
    /// When an audited request may answer: `queued` (its audit record is
    /// in the writer's queue, appended at once; a crash may lose the last
    /// few milliseconds of records) or `durable` (the record is durable in
    /// the log: a synced append per request).
    pub audit_wait: AuditWait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditWait {
    #[default]
    Queued,
    Durable,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            secret: Secret::default(),
            session_minutes: 480,
            failed_logins_per_minute: 10,
            reads_per_minute: 600,
            alert_reads_per_hour: 1000,
            reveal_seconds: 60,
            credential_ttl_days: 90,
            allow_demo_credentials: false,
            labels: BTreeMap::new(),
            visible_to_agents: cdp_domain::access::PersonalKeys::default().visible_when_masked,
            personal_keys: Vec::new(),
            admin_key_sha256: String::new(),
            audit_wait: AuditWait::Queued,
        }
    }
}

impl AccessConfig {
    /// The rules of what is personal.
    pub fn personal_keys(&self) -> cdp_domain::access::PersonalKeys {
        let mut keys = cdp_domain::access::PersonalKeys::default();
        keys.containing
            .extend(self.personal_keys.iter().map(|k| k.to_ascii_lowercase()));
        keys.visible_when_masked = self.visible_to_agents.clone();
        keys
    }
}

/// A secret shipped in the example configuration.
pub fn is_demo_secret(s: &str) -> bool {
    s.starts_with("dev-")
}

pub(crate) fn check(
    credentials: &[CredentialConfig],
    access: &AccessConfig,
) -> Result<(), ConfigError> {
    let invalid = |field, reason: String| ConfigError::Invalid { field, reason };
    let mut names = std::collections::BTreeSet::new();
    for c in credentials {
        let who = &c.name;
        if who.trim().is_empty() {
            return Err(invalid(
                "credentials.name",
                "every credential needs a name".into(),
            ));
        }
        if !names.insert(who.as_str()) {
            return Err(invalid("credentials.name", format!("{who} is named twice")));
        }
        let role = c
            .role()
            .map_err(|e| invalid("credentials.role", format!("{who}: {e}")))?;
        c.disclosure()
            .map_err(|e| invalid("credentials.disclosure", format!("{who}: {e}")))?;
        c.expires_at_ms()
            .map_err(|e| invalid("credentials.expires_at", format!("{who}: {e}")))?;
        match (&c.key, &c.key_sha256) {
            (Some(k), None) if k.expose().len() >= 8 => {}
            (Some(_), None) => {
                return Err(invalid(
                    "credentials.key",
                    format!("{who}: a key needs at least 8 characters"),
                ));
            }
            (None, Some(h)) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {}
            (None, Some(_)) => {
                return Err(invalid(
                    "credentials.key_sha256",
                    format!("{who}: 64 hex digits (the SHA-256 of the key)"),
                ));
            }
            _ => {
                return Err(invalid(
                    "credentials.key",
                    format!("{who}: give exactly one of key and key_sha256"),
                ));
            }
        }
        if role == Role::Ingest && c.sources.is_empty() {
            return Err(invalid(
                "credentials.sources",
                format!("{who}: an ingest credential names the sources it sends for"),
            ));
        }
        if role != Role::Ingest && !c.sources.is_empty() {
            return Err(invalid(
                "credentials.sources",
                format!("{who}: only ingest credentials send for sources"),
            ));
        }
    }
    if access.session_minutes == 0 || access.reveal_seconds == 0 {
        return Err(invalid(
            "access",
            "session_minutes and reveal_seconds must be at least 1".into(),
        ));
    }
    Ok(())
}
