//! The audience topics (see `cdp_domain::audience`):
//!
//! - `audience-definitions`: computed traits and segments saved and
//!   deleted, keyed by kind and name (so the changes of one definition
//!   stay in order); every process folds it to know the definitions, the
//!   way it folds `credentials`;
//! - `audience-changes`: segment memberships entered and exited, keyed by
//!   customer, each with its cause, so a downstream consumer (a journey,
//!   an export) follows who enters and leaves what;
//! - `audience-backfills`: how far the profiles of a generation are
//!   brought up to the definitions after they changed.
//!
//! Both are JSON: they are small, read by tools, and carry no personal
//! data (customer ids, segment names, event ids).

use std::collections::BTreeMap;

use cdp_domain::audience::{Change, DefinitionError, Definitions, SegmentDef, TraitDef};
use cdp_domain::{CustomerId, UnixMillis};
use cdp_log::{LogRecord, Record};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A computed trait or a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefinitionKind {
    Trait,
    Segment,
}

impl DefinitionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DefinitionKind::Trait => "trait",
            DefinitionKind::Segment => "segment",
        }
    }
}

/// A change to the definitions, with who made it and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum DefinitionChange {
    /// Created or updated (its `version` is the new one).
    TraitSaved {
        definition: TraitDef,
        at: UnixMillis,
        by: String,
    },
    SegmentSaved {
        definition: SegmentDef,
        at: UnixMillis,
        by: String,
    },
    Deleted {
        kind: DefinitionKind,
        name: String,
        /// The version deleted.
        version: u64,
        at: UnixMillis,
        by: String,
    },
}

impl DefinitionChange {
    pub fn kind(&self) -> DefinitionKind {
        match self {
            DefinitionChange::TraitSaved { .. } => DefinitionKind::Trait,
            DefinitionChange::SegmentSaved { .. } => DefinitionKind::Segment,
            DefinitionChange::Deleted { kind, .. } => *kind,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            DefinitionChange::TraitSaved { definition, .. } => &definition.name,
            DefinitionChange::SegmentSaved { definition, .. } => &definition.name,
            DefinitionChange::Deleted { name, .. } => name,
        }
    }
}

/// The record of a definition change, keyed `trait/<name>` or
/// `segment/<name>`.
pub fn definition_record(c: &DefinitionChange) -> Result<Record, serde_json::Error> {
    Ok(Record {
        key: format!("{}/{}", c.kind().as_str(), c.name()).into_bytes(),
        value: serde_json::to_vec(c)?,
        ..Record::default()
    })
}

pub fn read_definition(r: &LogRecord) -> Result<DefinitionChange, serde_json::Error> {
    serde_json::from_slice(&r.value)
}

/// The definitions the `audience-definitions` topic holds, folded record
/// by record: the latest save of each name, unless deleted since.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DefinitionSet {
    traits: BTreeMap<String, TraitDef>,
    segments: BTreeMap<String, SegmentDef>,
    /// The highest version each name ever had (deleted ones too), so a
    /// name created again gets a version of its own.
    versions: BTreeMap<(DefinitionKind, String), u64>,
    /// Names whose latest record this build cannot read (written by a
    /// newer one): held, neither evaluated nor taken for deleted.
    held: std::collections::BTreeSet<(DefinitionKind, String)>,
}

impl DefinitionSet {
    /// Folds one change. A save gets the version after the highest this
    /// name had: the records of one name are in one partition, so every
    /// process numbers them alike, even when two writers raced.
    pub fn apply(&mut self, c: DefinitionChange) {
        let key = (c.kind(), c.name().to_owned());
        self.held.remove(&key);
        let top = self.versions.entry(key).or_default();
        match c {
            DefinitionChange::TraitSaved { mut definition, .. } => {
                *top += 1;
                definition.version = *top;
                self.traits.insert(definition.name.clone(), definition);
            }
            DefinitionChange::SegmentSaved { mut definition, .. } => {
                *top += 1;
                definition.version = *top;
                self.segments.insert(definition.name.clone(), definition);
            }
            DefinitionChange::Deleted { kind, name, .. } => match kind {
                DefinitionKind::Trait => {
                    self.traits.remove(&name);
                }
                DefinitionKind::Segment => {
                    self.segments.remove(&name);
                }
            },
        }
    }

    /// A record of this topic that could not be read: the name its key
    /// gives (`trait/<name>`, `segment/<name>`) is held.
    pub fn hold_unreadable(&mut self, key: &[u8]) {
        let key = String::from_utf8_lossy(key);
        let held = match key.split_once('/') {
            Some(("trait", name)) => (DefinitionKind::Trait, name.to_owned()),
            Some(("segment", name)) => (DefinitionKind::Segment, name.to_owned()),
            _ => return,
        };
        self.held.insert(held);
    }

    /// The version the next save of `name` gets (unless another writer
    /// saves it first).
    pub fn next_version(&self, kind: DefinitionKind, name: &str) -> u64 {
        self.versions
            .get(&(kind, name.to_owned()))
            .copied()
            .unwrap_or(0)
            + 1
    }

    pub fn traits(&self) -> impl Iterator<Item = &TraitDef> {
        self.traits.values()
    }

    pub fn segments(&self) -> impl Iterator<Item = &SegmentDef> {
        self.segments.values()
    }

    pub fn trait_def(&self, name: &str) -> Option<&TraitDef> {
        self.traits.get(name)
    }

    pub fn segment_def(&self, name: &str) -> Option<&SegmentDef> {
        self.segments.get(name)
    }

    /// The checked definitions (what a change must leave valid), or the
    /// first problem.
    pub fn check(&self) -> Result<Definitions, DefinitionError> {
        Definitions::new(
            self.traits.values().cloned().collect(),
            self.segments.values().cloned().collect(),
        )
    }

    /// The definitions a fold evaluates: every trait that checks, and every
    /// segment that compiles against them; the others are returned with
    /// their problem (writers check before appending, so only writers
    /// racing each other leave such a set).
    pub fn usable(&self) -> (Definitions, Vec<(String, DefinitionError)>) {
        let mut problems = Vec::new();
        let mut defs = Definitions::default();
        for (kind, name) in &self.held {
            match kind {
                DefinitionKind::Trait => defs.held_traits.insert(name.clone()),
                DefinitionKind::Segment => defs.held_segments.insert(name.clone()),
            };
        }
        for t in self.traits.values() {
            if defs.held_traits.contains(&t.name) {
                continue;
            }
            match t.check() {
                Ok(()) => defs.traits.push(t.clone()),
                Err(e) => {
                    problems.push((format!("trait {}", t.name), e));
                    defs.held_traits.insert(t.name.clone());
                }
            }
        }
        for s in self.segments.values() {
            if defs.held_segments.contains(&s.name) {
                continue;
            }
            match cdp_domain::audience::Segment::compile(s.clone(), &defs.traits) {
                Ok(compiled) => defs.segments.push(compiled),
                Err(e) => {
                    problems.push((format!("segment {}", s.name), e));
                    defs.held_segments.insert(s.name.clone());
                }
            }
        }
        (defs, problems)
    }
}

/// One membership change as the `audience-changes` topic holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipChange {
    pub customer_id: CustomerId,
    /// The projection generation whose fold made it: consumers follow
    /// the active one (a rebuild makes its own).
    pub generation: u32,
    /// The definitions it was evaluated under ([`fingerprint_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definitions: Option<String>,
    #[serde(flatten)]
    pub change: Change,
}

/// Whether a backfill is going on or done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackfillState {
    Running,
    Done,
}

/// How far the profiles of a generation are brought up to a set of
/// definitions (`ProfileStore::backfill_audiences`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillProgress {
    pub generation: u32,
    /// Which definitions ([`fingerprint`]).
    pub definitions: String,
    pub state: BackfillState,
    /// Profile rows read so far.
    pub scanned: u64,
    /// Customers whose memberships changed, and the changes.
    pub customers_changed: u64,
    pub changes: u64,
    /// Customers whose row could not be read (logged and left out).
    #[serde(default)]
    pub failed: u64,
    /// Where the next page starts (the store's own cursor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    pub started_at: UnixMillis,
    pub updated_at: UnixMillis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<UnixMillis>,
}

/// Names a set of definitions ([`Definitions::fingerprint`]): every name
/// with its version, held ones marked.
pub fn fingerprint(defs: &Definitions) -> String {
    defs.fingerprint()
}

/// A short name of a set of definitions (16 hex digits of the SHA-256 of
/// its [`fingerprint`], [`Definitions::id`]), for records written by the
/// thousand.
pub fn fingerprint_id(defs: &Definitions) -> String {
    format!("{:016x}", defs.id())
}

pub fn backfill_record(p: &BackfillProgress) -> Result<Record, serde_json::Error> {
    Ok(Record {
        key: format!("generation/{}", p.generation).into_bytes(),
        value: serde_json::to_vec(p)?,
        ..Record::default()
    })
}

pub fn read_backfill(r: &LogRecord) -> Result<BackfillProgress, serde_json::Error> {
    serde_json::from_slice(&r.value)
}

/// The record of a membership change, keyed by customer. Its idempotency
/// key names the change without its time (an exit by the start of the
/// membership it ends, an entry by its cause), so a fold repeated after a
/// crash appends it once on a log that deduplicates. Entries caused by a
/// timer are named by the instant it was due at, those caused by a
/// definition change by the definitions.
pub fn change_record(m: &MembershipChange) -> Result<Record, serde_json::Error> {
    use cdp_domain::audience::Cause;
    let c = &m.change;
    let name = match (c.kind, c.since) {
        // A membership ends once: its start names its exit.
        (cdp_domain::audience::ChangeKind::Exited, Some(since)) => {
            format!("exited/since/{since}")
        }
        (kind, _) => {
            let cause = match &c.cause {
                Cause::Event { event_id } => format!("event/{event_id}"),
                Cause::Merge { absorbed } => format!("merge/{absorbed}"),
                Cause::MergedInto { survivor } => format!("merged-into/{survivor}"),
                // A timer is named by the instant it was due at; an
                // entry caused by a definition change by the definitions
                // (a customer is brought up to a set of them once, so a
                // backfill page done again after a crash names the same
                // entries).
                Cause::Expiry { due } => format!("expiry/{due}"),
                Cause::Definition { events } => match &m.definitions {
                    Some(set) => format!("definition/{set}/{events}"),
                    None => format!("definition/at/{}", c.at),
                },
            };
            format!("{kind:?}/{}/{cause}", c.version)
        }
    };
    let name = format!("{}/{}/{}/{name}", m.generation, m.customer_id, c.segment);
    Ok(Record {
        key: crate::key::customer(m.customer_id),
        value: serde_json::to_vec(m)?,
        idempotency_key: Some(change_key(m.customer_id, &name)),
        ..Record::default()
    })
}

/// A change's idempotency key: its customer's id, then 16 bytes of the
/// SHA-256 of its name. The customer first keeps the keys of one
/// customer's changes together where a log indexes them (the embedded
/// log's index of keys seen, a B-tree: a fold's changes touch one page per
/// customer, not one per change).
fn change_key(customer: CustomerId, name: &str) -> Vec<u8> {
    let mut key = customer.0.as_bytes().to_vec();
    key.extend_from_slice(&Sha256::digest(name.as_bytes())[..16]);
    key
}

pub fn read_change(r: &LogRecord) -> Result<MembershipChange, serde_json::Error> {
    serde_json::from_slice(&r.value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdp_domain::EventId;
    use cdp_domain::audience::{Aggregate, Cause, ChangeKind, EventFilter};

    fn count(name: &str, version: u64) -> TraitDef {
        TraitDef {
            name: name.into(),
            version,
            aggregate: Aggregate::Count,
            property: None,
            filter: EventFilter::default(),
            window: Default::default(),
        }
    }

    fn segment(name: &str, version: u64, condition: &str) -> SegmentDef {
        SegmentDef {
            name: name.into(),
            version,
            condition: condition.into(),
            description: String::new(),
        }
    }

    fn log_record(r: Record) -> LogRecord {
        LogRecord {
            topic: crate::topic::AUDIENCE_DEFINITIONS,
            partition: 0,
            offset: 0,
            key: r.key,
            value: r.value,
            headers: r.headers,
            timestamp: 0,
        }
    }

    #[test]
    fn the_set_keeps_the_latest_save_and_versions_survive_deletion() {
        let mut set = DefinitionSet::default();
        let changes = [
            DefinitionChange::TraitSaved {
                definition: count("orders", 1),
                at: 1,
                by: "admin".into(),
            },
            DefinitionChange::SegmentSaved {
                definition: segment("buyers", 1, "traits.orders >= 1"),
                at: 2,
                by: "admin".into(),
            },
            DefinitionChange::SegmentSaved {
                definition: segment("buyers", 2, "traits.orders >= 2"),
                at: 3,
                by: "admin".into(),
            },
            DefinitionChange::Deleted {
                kind: DefinitionKind::Segment,
                name: "buyers".into(),
                version: 2,
                at: 4,
                by: "admin".into(),
            },
        ];
        for c in changes {
            let back = read_definition(&log_record(definition_record(&c).unwrap())).unwrap();
            assert_eq!(back, c);
            set.apply(back);
        }
        assert_eq!(set.segments().count(), 0);
        assert_eq!(set.next_version(DefinitionKind::Segment, "buyers"), 3);
        // Two writers that raced with the same version are numbered apart.
        for _ in 0..2 {
            set.apply(DefinitionChange::SegmentSaved {
                definition: segment("buyers", 3, "traits.orders >= 3"),
                at: 5,
                by: "admin".into(),
            });
        }
        assert_eq!(set.segment_def("buyers").map(|d| d.version), Some(4));
        // A record this build cannot read holds its name.
        set.hold_unreadable(b"segment/buyers");
        let (defs, _) = set.usable();
        assert!(defs.segments.is_empty());
        assert!(defs.held_segments.contains("buyers"));
        assert_eq!(set.next_version(DefinitionKind::Trait, "orders"), 2);
        assert_eq!(set.next_version(DefinitionKind::Trait, "new"), 1);
        assert!(set.check().is_ok());
    }

    #[test]
    fn a_segment_left_without_its_trait_is_set_aside_not_fatal() {
        let mut set = DefinitionSet::default();
        set.apply(DefinitionChange::SegmentSaved {
            definition: segment("buyers", 1, "traits.orders >= 1"),
            at: 1,
            by: "admin".into(),
        });
        assert!(set.check().is_err());
        let (defs, problems) = set.usable();
        assert!(defs.segments.is_empty());
        assert_eq!(problems.len(), 1);
        assert!(problems[0].1.reason.contains("orders"), "{:?}", problems);
    }

    #[test]
    fn change_records_name_the_change_without_its_time() {
        let c = |at| MembershipChange {
            customer_id: CustomerId(uuid::Uuid::from_u128(1)),
            generation: 1,
            definitions: Some("trait/orders@1,segment/buyers@1".into()),
            change: Change {
                segment: "buyers".into(),
                version: 1,
                kind: ChangeKind::Entered,
                cause: Cause::Event {
                    event_id: EventId(uuid::Uuid::from_u128(9)),
                },
                at,
                since: None,
            },
        };
        let (a, b) = (
            change_record(&c(10)).unwrap(),
            change_record(&c(20)).unwrap(),
        );
        assert_eq!(a.idempotency_key, b.idempotency_key);
        assert_eq!(
            a.key,
            crate::key::customer(CustomerId(uuid::Uuid::from_u128(1)))
        );
        let back: MembershipChange = serde_json::from_slice(&a.value).unwrap();
        assert_eq!(back, c(10));
        let json: serde_json::Value = serde_json::from_slice(&a.value).unwrap();
        assert_eq!(json["kind"], "entered");
        assert_eq!(json["cause"]["kind"], "event");

        // An entry of a backfill is named by the definitions: done again
        // later (after a crash) it is the same record; under other
        // definitions it is another.
        let by_definition = |at, set: &str| MembershipChange {
            definitions: Some(set.into()),
            change: Change {
                cause: Cause::Definition { events: 3 },
                ..c(at).change
            },
            ..c(at)
        };
        let key = |m: &MembershipChange| change_record(m).unwrap().idempotency_key;
        assert_eq!(
            key(&by_definition(10, "segment/buyers@1")),
            key(&by_definition(99, "segment/buyers@1"))
        );
        assert_ne!(
            key(&by_definition(10, "segment/buyers@1")),
            key(&by_definition(10, "segment/buyers@2"))
        );
    }
}
