//! The `credentials` topic: API keys issued and revoked at run time (keys
//! from the configuration are not in it). Only the SHA-256 of a key is
//! kept; every process folds the topic to know which keys are valid.

use cdp_log::{LogRecord, Record};
use serde::{Deserialize, Serialize};

/// A change to the set of issued keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum CredentialChange {
    Issued(IssuedKey),
    Revoked { id: String, at: i64, by: String },
}

/// An issued key, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedKey {
    pub id: String,
    pub name: String,
    pub role: String,
    /// SHA-256 of the whole key, hex.
    pub key_sha256: String,
    #[serde(default)]
    pub sources: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub disclosure: Option<String>,
    #[serde(default)]
    pub team: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub issued_by: String,
}

impl CredentialChange {
    pub fn id(&self) -> &str {
        match self {
            CredentialChange::Issued(k) => &k.id,
            CredentialChange::Revoked { id, .. } => id,
        }
    }
}

/// The log record of a change, keyed by credential id.
pub fn record(c: &CredentialChange) -> Result<Record, serde_json::Error> {
    Ok(Record {
        key: c.id().as_bytes().to_vec(),
        value: serde_json::to_vec(c)?,
        ..Record::default()
    })
}

pub fn read(r: &LogRecord) -> Result<CredentialChange, serde_json::Error> {
    serde_json::from_slice(&r.value)
}
