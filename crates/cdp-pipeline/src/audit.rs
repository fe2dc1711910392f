//! The `audit` topic: who read or changed what, when, from where, as a
//! hash chain so a removed or altered record is detectable.
//!
//! Each writer (one per process) keeps its own chain: records carry the
//! chain id, a sequence number from 0, the hash of the previous record of
//! the chain and their own hash, SHA-256 over the previous hash and the
//! record's content. All records of a chain are keyed by the chain id, so
//! they sit in one partition in order. [`verify`] walks every chain and
//! names the first record that does not fit.

use std::collections::BTreeMap;

use cdp_log::{LogRecord, Record};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One access or change, as an auditor reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: i64,
    /// The credential's name.
    #[serde(alias = "agent")]
    pub actor: String,
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub team: String,
    /// The gRPC method or console route (`ProfileService/GetProfile`).
    #[serde(default)]
    pub action: String,
    /// `allowed`, `denied` or `failed`.
    #[serde(default)]
    pub outcome: String,
    #[serde(default)]
    pub customer_id: String,
    /// What was disclosed or changed: `profile`, `timeline`, a field name.
    #[serde(default)]
    pub fields: Vec<String>,
    /// How the customer was found, masked (`phone:0912***678`).
    #[serde(default)]
    pub lookup: String,
    #[serde(default)]
    pub reason: String,
    /// The client's address.
    #[serde(default)]
    pub client: String,
    #[serde(default)]
    pub request_id: String,
}

/// An entry sealed into its chain, as the log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub chain: String,
    pub seq: u64,
    /// Hash of the previous record of the chain (hex), [`GENESIS`] for the first.
    pub prev: String,
    pub entry: AuditEntry,
    pub hash: String,
}

/// The `prev` of a chain's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of a record's content and its predecessor.
pub fn hash_of(chain: &str, seq: u64, prev: &str, entry: &AuditEntry) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    // Field order is fixed by the struct, so the same content always
    // serialises to the same bytes.
    let body = serde_json::to_vec(&(chain, seq, entry)).unwrap_or_default();
    h.update(&body);
    hex::encode(h.finalize())
}

/// A writer's chain: seals entries one after the other.
#[derive(Debug, Clone)]
pub struct Chain {
    id: String,
    next: u64,
    prev: String,
}

impl Chain {
    pub fn new(id: impl Into<String>) -> Self {
        Chain {
            id: id.into(),
            next: 0,
            prev: GENESIS.to_owned(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `entry` as the next record. The chain only moves on when
    /// [`Chain::commit`] says the records were appended.
    pub fn seal(&self, entries: Vec<AuditEntry>) -> Vec<Sealed> {
        let mut prev = self.prev.clone();
        let mut seq = self.next;
        entries
            .into_iter()
            .map(|entry| {
                let hash = hash_of(&self.id, seq, &prev, &entry);
                let sealed = Sealed {
                    chain: self.id.clone(),
                    seq,
                    prev: std::mem::replace(&mut prev, hash.clone()),
                    entry,
                    hash,
                };
                seq += 1;
                sealed
            })
            .collect()
    }

    /// The sealed records are in the log: continue after them.
    pub fn commit(&mut self, sealed: &[Sealed]) {
        if let Some(last) = sealed.last() {
            self.next = last.seq + 1;
            self.prev = last.hash.clone();
        }
    }
}

/// The log record of a sealed entry (keyed by chain: one partition, in order).
pub fn record(s: &Sealed) -> Result<Record, serde_json::Error> {
    Ok(Record {
        key: s.chain.clone().into_bytes(),
        value: serde_json::to_vec(s)?,
        ..Record::default()
    })
}

/// What an `audit` record holds: a sealed entry, or an entry written
/// before the chain existed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Sealed(Sealed),
    Legacy(AuditEntry),
}

impl Stored {
    pub fn entry(&self) -> &AuditEntry {
        match self {
            Stored::Sealed(s) => &s.entry,
            Stored::Legacy(e) => e,
        }
    }
}

/// Decodes an `audit` record's value.
pub fn decode(bytes: &[u8]) -> Result<Stored, serde_json::Error> {
    match serde_json::from_slice::<Sealed>(bytes) {
        Ok(s) => Ok(Stored::Sealed(s)),
        Err(_) => serde_json::from_slice::<AuditEntry>(bytes).map(Stored::Legacy),
    }
}

pub fn read(r: &LogRecord) -> Result<Stored, serde_json::Error> {
    decode(&r.value)
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verification {
    pub chains: usize,
    pub records: usize,
    /// Records written before chaining existed (not verifiable).
    pub legacy: usize,
    /// Every record that breaks its chain, with why.
    pub problems: Vec<String>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks every chain in `lines` (the JSON of each record, in any order):
/// each starts at 0 from [`GENESIS`], has no gap, links to its
/// predecessor, and its hash matches its content.
pub fn verify<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Verification {
    let mut v = Verification::default();
    let mut chains: BTreeMap<String, Vec<Sealed>> = BTreeMap::new();
    for (i, line) in lines.into_iter().enumerate() {
        match decode(line) {
            Ok(Stored::Sealed(s)) => chains.entry(s.chain.clone()).or_default().push(s),
            Ok(Stored::Legacy(_)) => v.legacy += 1,
            Err(e) => v
                .problems
                .push(format!("record {i}: not an audit record: {e}")),
        }
    }
    v.chains = chains.len();
    for (chain, mut records) in chains {
        records.sort_by_key(|s| s.seq);
        v.records += records.len();
        let mut prev = GENESIS.to_owned();
        let mut expected = 0;
        for s in &records {
            let at = format!("chain {chain} record {}", s.seq);
            if s.seq != expected {
                v.problems.push(if s.seq > expected {
                    format!("{at}: records {expected}..{} are missing", s.seq - 1)
                } else {
                    format!("{at}: appears twice")
                });
            }
            if s.prev != prev {
                v.problems
                    .push(format!("{at}: does not follow the record before it"));
            }
            if hash_of(&s.chain, s.seq, &s.prev, &s.entry) != s.hash {
                v.problems
                    .push(format!("{at}: its content was altered (hash mismatch)"));
            }
            prev = s.hash.clone();
            expected = s.seq + 1;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(actor: &str, customer: &str) -> AuditEntry {
        AuditEntry {
            at: 1,
            actor: actor.into(),
            role: "agent".into(),
            action: "ProfileService/GetProfile".into(),
            outcome: "allowed".into(),
            customer_id: customer.into(),
            fields: vec!["profile".into()],
            ..AuditEntry::default()
        }
    }

    fn lines(chain: &mut Chain, n: usize) -> Vec<Vec<u8>> {
        let sealed = chain.seal((0..n).map(|i| entry("lan", &format!("c{i}"))).collect());
        chain.commit(&sealed);
        sealed
            .iter()
            .map(|s| serde_json::to_vec(s).unwrap())
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies_across_batches() {
        let mut c = Chain::new("a");
        let mut all = lines(&mut c, 3);
        all.extend(lines(&mut c, 2));
        let v = verify(all.iter().map(Vec::as_slice));
        assert!(v.ok(), "{:?}", v.problems);
        assert_eq!((v.chains, v.records), (1, 5));
    }

    #[test]
    fn an_altered_removed_or_reordered_record_is_named() {
        let mut c = Chain::new("a");
        let all = lines(&mut c, 4);
        let mut altered = all.clone();
        altered[1] = String::from_utf8(altered[1].clone())
            .unwrap()
            .replace("\"lan\"", "\"mai\"")
            .into_bytes();
        let v = verify(altered.iter().map(Vec::as_slice));
        assert_eq!(
            v.problems,
            vec!["chain a record 1: its content was altered (hash mismatch)"]
        );
        let mut removed = all.clone();
        removed.remove(2);
        let v = verify(removed.iter().map(Vec::as_slice));
        assert!(
            v.problems[0].contains("records 2..2 are missing"),
            "{:?}",
            v.problems
        );
        // A forged record with a recomputed hash still breaks the link after it.
        let mut forged: Sealed = serde_json::from_slice(&all[1]).unwrap();
        forged.entry.customer_id = "someone-else".into();
        forged.hash = hash_of(&forged.chain, forged.seq, &forged.prev, &forged.entry);
        let mut with_forgery = all.clone();
        with_forgery[1] = serde_json::to_vec(&forged).unwrap();
        let v = verify(with_forgery.iter().map(Vec::as_slice));
        assert_eq!(
            v.problems,
            vec!["chain a record 2: does not follow the record before it"]
        );
    }

    #[test]
    fn records_from_before_the_chain_are_counted_not_failed() {
        let legacy = br#"{"agent":"lan","customer_id":"c","lookup":"phone:x","at":3}"#;
        let v = verify([legacy.as_slice()]);
        assert!(v.ok());
        assert_eq!(v.legacy, 1);
        let Stored::Legacy(e) = decode(legacy).unwrap() else {
            panic!("not legacy")
        };
        assert_eq!(e.actor, "lan");
    }
}
