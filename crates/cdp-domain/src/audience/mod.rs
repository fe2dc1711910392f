//! Audiences: computed traits ([`computed`]) and segments ([`segment`]),
//! kept per customer as one more fold of the log, like the profile.
//!
//! [`Audience`] is a customer's part: the states of its computed traits
//! and the segments it is a member of. Each input that can change a
//! membership re-evaluates it and returns the [`Change`]s (`Entered`,
//! `Exited`) with their cause:
//!
//! - an event ([`Audience::on_event`]), folded once (the profile's applied
//!   set decides, in the same transaction);
//! - a window's expiry ([`Audience::on_expiry`]), at [`Audience::due`]:
//!   every re-evaluation sets it, and a store indexes customers by it so a
//!   timer finds the ones due (a window lets its events go on time, not
//!   at the customer's next event);
//! - a definition created, updated or deleted ([`Audience::on_definitions`]);
//! - a merge ([`Audience::on_merge`]): the absorbed customer exits every
//!   segment, the survivor is re-evaluated at once on the merged state.
//!
//! The state lives in the profile (`Profile::audience`), so it is stored,
//! sealed, erased and rebuilt with it, in the same row and transaction:
//! `profile::fold_resolved` does all of the above when
//! `FoldOptions::audiences` carries definitions, and returns the changes;
//! `profile::expire_audience` is a customer's timer.
//!
//! [`reference`] evaluates every definition over a customer's whole event
//! set at once: the incremental path must agree with it under any order,
//! partitioning and merges (the property test below).

pub mod computed;
mod native;
pub mod segment;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;

pub use computed::{Aggregate, Computed, Condition, EventFilter, Op, TraitDef, Window};
pub use segment::{Input, Segment, SegmentDef};

use crate::{CustomerId, EventId, FoldOptions, Profile, ProfileView, Touchpoint, UnixMillis};

/// A definition that cannot be used: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {reason}")]
pub struct DefinitionError {
    pub field: String,
    pub reason: String,
}

/// The computed traits and segments of a workspace, checked together.
#[derive(Debug, Clone, Default)]
pub struct Definitions {
    pub traits: Vec<TraitDef>,
    pub segments: Vec<Segment>,
    /// Computed traits defined but not usable now (a record this build
    /// cannot read, a definition that no longer checks): their states are
    /// kept, not dropped as if deleted.
    pub held_traits: BTreeSet<String>,
    /// Segments defined but not usable now: their members stay members
    /// until the definition can be read again.
    pub held_segments: BTreeSet<String>,
    /// Derived from the fields above at first use (set them before).
    plan: OnceLock<Plan>,
}

/// What a set of definitions reads, worked out once.
#[derive(Debug, Clone)]
struct Plan {
    /// The first 8 bytes of the SHA-256 of [`Definitions::fingerprint`].
    id: u64,
    /// The same of the whole definitions (conditions, filters, windows),
    /// not only their names and versions: what a [`Basis`] names.
    whole: u64,
    /// The `profile` fields some segment reads (`None`: all of them).
    profile_fields: Option<BTreeSet<String>>,
    /// A customer without any event: the digest of what the segments read
    /// of its profile, and whether it is a member of each segment (what a
    /// customer's first event starts from).
    empty_digest: u64,
    empty_results: Vec<bool>,
}

impl Definitions {
    /// Checks every definition; the error names the definition and field
    /// (`traits[2].filter.conditions[0].value: ...`).
    pub fn new(traits: Vec<TraitDef>, segments: Vec<SegmentDef>) -> Result<Self, DefinitionError> {
        let within = |what: &str, i: usize, e: DefinitionError| DefinitionError {
            field: format!("{what}[{i}].{}", e.field),
            reason: e.reason,
        };
        let mut names = BTreeSet::new();
        for (i, t) in traits.iter().enumerate() {
            t.check().map_err(|e| within("traits", i, e))?;
            if !names.insert(t.name.as_str()) {
                return Err(within("traits", i, duplicate(&t.name)));
            }
        }
        let mut compiled = Vec::with_capacity(segments.len());
        let mut names = BTreeSet::new();
        for (i, s) in segments.into_iter().enumerate() {
            if !names.insert(s.name.clone()) {
                return Err(within("segments", i, duplicate(&s.name)));
            }
            compiled.push(Segment::compile(s, &traits).map_err(|e| within("segments", i, e))?);
        }
        Ok(Definitions {
            traits,
            segments: compiled,
            ..Definitions::default()
        })
    }

    pub fn is_empty(&self) -> bool {
        self.traits.is_empty() && self.segments.is_empty()
    }

    /// Names the definitions: every name with its version, held ones
    /// marked, in order. Two processes with the same definitions give the
    /// same text.
    pub fn fingerprint(&self) -> String {
        let mut parts: Vec<String> = self
            .traits
            .iter()
            .map(|t| format!("trait/{}@{}", t.name, t.version))
            .chain(
                self.segments
                    .iter()
                    .map(|s| format!("segment/{}@{}", s.def.name, s.def.version)),
            )
            .chain(self.held_traits.iter().map(|t| format!("trait/{t}@held")))
            .chain(
                self.held_segments
                    .iter()
                    .map(|s| format!("segment/{s}@held")),
            )
            .collect();
        parts.sort();
        parts.join(",")
    }

    fn plan(&self) -> &Plan {
        self.plan.get_or_init(|| {
            let sha = Sha256::digest(self.fingerprint().as_bytes());
            let mut id = [0u8; 8];
            id.copy_from_slice(&sha[..8]);
            let profile_fields = read_union(
                self.segments
                    .iter()
                    .map(|s| s.profile_read().map(|r| r.iter().cloned())),
            );
            let view = Profile::new(CustomerId(uuid::Uuid::nil())).view();
            let empty = Audience::default();
            let segments: Vec<&Segment> = self.segments.iter().collect();
            // An empty state's values do not depend on the instant.
            let empty_results = empty.results(self, &segments, &view, 0);
            let whole = digest(&serde_json::json!({
                "fingerprint": self.fingerprint(),
                "traits": self.traits,
                "segments": self.segments.iter().map(|s| &s.def).collect::<Vec<_>>(),
            }));
            Plan {
                id: u64::from_be_bytes(id),
                whole,
                empty_digest: digest(&profile_read(&profile_fields, &view)),
                profile_fields,
                empty_results,
            }
        })
    }

    /// A short name of the definitions: the first 8 bytes of the SHA-256
    /// of their [`fingerprint`](Self::fingerprint).
    pub fn id(&self) -> u64 {
        self.plan().id
    }

    /// A digest of what the segments read of a customer's `profile`.
    fn profile_digest(&self, view: &ProfileView) -> u64 {
        digest(&profile_read(&self.plan().profile_fields, view))
    }
}

/// The `profile` fields in `fields` (`None`: all of them).
fn profile_read(fields: &Option<BTreeSet<String>>, view: &ProfileView) -> Value {
    match fields {
        None => segment::segment_profile(view),
        Some(fields) => segment::profile_fields(view, fields),
    }
}

/// Everything some conditions read, given what each reads (`None`: one
/// reads the whole variable, so all of it is read).
fn read_union<T: Ord, R: IntoIterator<Item = T>>(
    reads: impl IntoIterator<Item = Option<R>>,
) -> Option<BTreeSet<T>> {
    let mut all = BTreeSet::new();
    for read in reads {
        all.extend(read?);
    }
    Some(all)
}

/// The first 8 bytes of the SHA-256 of `value`'s JSON.
fn digest(value: &Value) -> u64 {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// What a customer's memberships were last brought in line with: the
/// definitions (a digest of all of them, conditions included) and what their segments read of the
/// profile (a digest). While both stay the same, an event re-evaluates
/// only the segments reading a computed trait it changed: the others
/// would give what they gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Basis {
    pub definitions: u64,
    pub profile: u64,
}

/// Which segments a re-evaluation must evaluate.
enum Scope<'a> {
    /// Every one (definitions changed, a merge, a backfill).
    All,
    /// Those reading what changed: these computed traits, those a window
    /// let events go from, and the profile when its digest changed.
    Changed(&'a [String]),
    /// A customer's first event, folded into these computed traits: those
    /// reading what changed from a customer without any event; the others
    /// give what they give for that customer.
    First(&'a [String]),
}

fn duplicate(name: &str) -> DefinitionError {
    DefinitionError {
        field: "name".into(),
        reason: format!("{name:?} is defined twice"),
    }
}

/// Entering or leaving a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Entered,
    Exited,
}

/// What made a membership change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Cause {
    Event {
        event_id: EventId,
    },
    /// The customer absorbed `absorbed` (survivor side).
    Merge {
        absorbed: CustomerId,
    },
    /// The customer was merged into `survivor` and exits everything.
    MergedInto {
        survivor: CustomerId,
    },
    /// A computed trait's window let an event go: the timer of the
    /// customer's state that was due at `due` (what names the change: a
    /// timer run again after a crash finds the same state and makes the
    /// same changes).
    Expiry {
        #[serde(default)]
        due: UnixMillis,
    },
    /// A definition was created, updated or deleted; `events`: how many
    /// events the customer had then (what tells a later entry by a
    /// definition apart from this one: one needs an event or a merge in
    /// between).
    Definition {
        #[serde(default)]
        events: u64,
    },
}

/// One membership change of one customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub segment: String,
    /// The definition version it was evaluated under.
    pub version: u64,
    pub kind: ChangeKind,
    pub cause: Cause,
    pub at: UnixMillis,
    /// Of an exit: when the membership it ends began (a membership ends
    /// once, so this names the exit whatever its cause and time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<UnixMillis>,
}

/// A segment a customer is a member of. Stored as `[version, since]`;
/// read from that or from an object with the same names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Member {
    pub version: u64,
    pub since: UnixMillis,
}

impl Serialize for Member {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (self.version, self.since).serialize(serializer)
    }
}

/// A customer's audience state: computed traits and memberships.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Audience {
    #[serde(default)]
    pub computed: Computed,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub members: BTreeMap<String, Member>,
    /// When a windowed trait next lets an event go under the definitions
    /// of the last re-evaluation (`None`: never on its own). Set by every
    /// re-evaluation; what a store indexes its timers by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<UnixMillis>,
    /// The computed traits (name to definition version) whose state holds
    /// every event of the customer: those defined before its first event,
    /// and those a backfill folded its past events into. A segment that
    /// reads a trait not known here is not evaluated (its membership stays
    /// as it is) until a backfill ([`Audience::backfill`]) knows it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub known: BTreeMap<String, u64>,
    /// What the memberships were last brought in line with (`None`: not
    /// yet, or by a build that did not keep it: every segment is
    /// evaluated next time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<Basis>,
}

impl Audience {
    /// No computed trait and no membership: nothing to keep.
    pub fn is_empty(&self) -> bool {
        self.computed.is_empty()
            && self.members.is_empty()
            && self.due.is_none()
            && self.known.is_empty()
            && self.basis.is_none()
    }

    /// A customer's first event: every trait defined now holds all of its
    /// events.
    pub fn know_all(&mut self, defs: &Definitions) {
        self.known = defs
            .traits
            .iter()
            .map(|d| (d.name.clone(), d.version))
            .collect();
    }

    /// Takes in the state of a customer merged into this one: the computed
    /// traits add up, and a trait is known when both sides knew it (or
    /// the side that had no event yet took the other's word).
    pub fn absorb(&mut self, other: Audience, had_events: bool, they_had_events: bool) {
        self.computed.absorb(other.computed);
        // The traits changed with no evaluation (a store settling a merge,
        // a fold without definitions): the next one evaluates every
        // segment.
        self.basis = None;
        self.known = match (had_events, they_had_events) {
            (false, _) => other.known,
            (true, false) => std::mem::take(&mut self.known),
            (true, true) => std::mem::take(&mut self.known)
                .into_iter()
                .filter(|(name, v)| other.known.get(name) == Some(v))
                .collect(),
        };
    }

    /// The computed traits of `defs` whose state may miss some of the
    /// customer's events (a state known under a newer version than `defs`
    /// has, by a process further ahead, is not this one's to fold).
    pub fn unknown<'d>(&self, defs: &'d Definitions) -> Vec<&'d TraitDef> {
        let newer = self.computed.newer_than(&defs.traits);
        defs.traits
            .iter()
            .filter(|d| self.known.get(&d.name).is_none_or(|v| *v < d.version))
            .filter(|d| !newer.contains(&d.name))
            .collect()
    }

    /// After definitions changed: folds `events` (every event folded into
    /// the customer, in any order) into the traits not known yet, from
    /// scratch, and re-evaluates every segment (cause `definition`).
    pub fn backfill(
        &mut self,
        defs: &Definitions,
        view: &ProfileView,
        events: &[Touchpoint],
        now: UnixMillis,
    ) -> Vec<Change> {
        for def in self.unknown(defs) {
            self.computed.refold(def, events);
            self.known.insert(def.name.clone(), def.version);
        }
        let cause = Cause::Definition {
            events: view.events_count,
        };
        self.reconcile(defs, view, &cause, now, Scope::All)
    }

    /// Whether every computed trait `segment` reads is known.
    pub fn determined(&self, defs: &Definitions, segment: &Segment) -> bool {
        !self.undetermined(defs).any(|name| segment.reads(name))
    }

    /// The computed traits not known under `defs` (at another version or
    /// not at all): a segment reading one waits for the backfill.
    fn undetermined<'d>(&'d self, defs: &'d Definitions) -> impl Iterator<Item = &'d str> {
        defs.traits
            .iter()
            .filter(|d| self.known.get(&d.name) != Some(&d.version))
            .map(|d| d.name.as_str())
    }

    /// The segments a customer described by `view` and this state belongs
    /// to at `now`, with the reason any condition could not tell.
    pub fn evaluate(
        &self,
        defs: &Definitions,
        view: &ProfileView,
        now: UnixMillis,
    ) -> BTreeMap<String, Result<bool, String>> {
        let values = self.computed.values(&defs.traits, now);
        let input = Input::new(view, &values);
        defs.segments
            .iter()
            .map(|s| (s.def.name.clone(), s.matches(&input)))
            .collect()
    }

    /// Drops what windows no longer hold at `now`, then brings the
    /// memberships in line with the definitions, the view and the computed
    /// traits (evaluating the segments `scope` says may have changed).
    fn reconcile(
        &mut self,
        defs: &Definitions,
        view: &ProfileView,
        cause: &Cause,
        now: UnixMillis,
        scope: Scope,
    ) -> Vec<Change> {
        let expired = self.computed.expire(&defs.traits, &defs.held_traits, now);
        let basis = Basis {
            definitions: defs.plan().whole,
            profile: defs.profile_digest(view),
        };
        // Without segments there is nothing to keep (nor to skip).
        let prior = std::mem::replace(
            &mut self.basis,
            (!defs.segments.is_empty()).then_some(basis),
        );
        let first = matches!(scope, Scope::First(_));
        // The computed traits that changed and whether the profile did,
        // when only those can change a membership: the memberships were
        // last brought in line under these definitions (or there were none
        // yet, for a customer's first event).
        let changed = match scope {
            Scope::Changed(folded) if prior.is_some_and(|p| p.definitions == basis.definitions) => {
                Some((
                    folded.iter().chain(&expired).collect::<BTreeSet<_>>(),
                    prior.is_none_or(|p| p.profile != basis.profile),
                ))
            }
            Scope::First(folded) => Some((
                folded.iter().chain(&expired).collect::<BTreeSet<_>>(),
                basis.profile != defs.plan().empty_digest,
            )),
            _ => None,
        };
        let mut changes = Vec::new();
        if changed.is_none() {
            self.forget_deleted(defs, view, now, &mut changes);
        }
        let undetermined: Vec<&str> = self.undetermined(defs).collect();
        let mut evaluated: Vec<&Segment> = Vec::new();
        // Segments not evaluated whose result is known: a customer's first
        // event starts from those of a customer without any event.
        let mut known: Vec<(&Segment, bool)> = Vec::new();
        for (i, s) in defs.segments.iter().enumerate() {
            // One reading a trait that may miss past events is left as it
            // is until a backfill knows the trait.
            if undetermined.iter().any(|name| s.reads(name)) {
                continue;
            }
            let evaluate = match &changed {
                None => true,
                Some((traits, profile)) => {
                    (*profile && s.reads_profile()) || traits.iter().any(|t| s.reads(t))
                }
            };
            if evaluate {
                evaluated.push(s);
            } else if first {
                let member = defs.plan().empty_results.get(i).copied().unwrap_or(false);
                known.push((s, member));
            }
        }
        let results = self.results(defs, &evaluated, view, now);
        let outcome = evaluated.into_iter().zip(results).chain(known);
        for (s, member) in outcome {
            let name = &s.def.name;
            match (member, self.members.get_mut(name)) {
                (true, None) => {
                    self.members.insert(
                        name.clone(),
                        Member {
                            version: s.def.version,
                            since: now,
                        },
                    );
                    changes.push(Change {
                        segment: name.clone(),
                        version: s.def.version,
                        kind: ChangeKind::Entered,
                        cause: cause.clone(),
                        at: now,
                        since: None,
                    });
                }
                (true, Some(m)) => m.version = s.def.version,
                (false, Some(_)) => {
                    let since = self.members.remove(name).map(|m| m.since);
                    changes.push(Change {
                        segment: name.clone(),
                        version: s.def.version,
                        kind: ChangeKind::Exited,
                        cause: cause.clone(),
                        at: now,
                        since,
                    });
                }
                (false, None) => {}
            }
        }
        // A trait that may miss past events makes the customer due at
        // once: the store's timer folds them (see `profile::refresh_audience`).
        self.due = if self.unknown(defs).is_empty() {
            self.computed.next_expiry(&defs.traits)
        } else {
            Some(now)
        };
        changes
    }

    /// Exits the segments no longer defined (not those held: defined,
    /// unusable now) and forgets the computed traits no longer defined (a
    /// trait defined again starts unknown).
    fn forget_deleted(
        &mut self,
        defs: &Definitions,
        view: &ProfileView,
        now: UnixMillis,
        changes: &mut Vec<Change>,
    ) {
        let defined: BTreeSet<&str> = defs.segments.iter().map(|s| s.def.name.as_str()).collect();
        let gone: Vec<String> = self
            .members
            .keys()
            .filter(|name| !defined.contains(name.as_str()) && !defs.held_segments.contains(*name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(m) = self.members.remove(&name) {
                changes.push(Change {
                    segment: name,
                    version: m.version,
                    kind: ChangeKind::Exited,
                    cause: Cause::Definition {
                        events: view.events_count,
                    },
                    at: now,
                    since: Some(m.since),
                });
            }
        }
        self.known.retain(|name, _| {
            defs.traits.iter().any(|d| &d.name == name) || defs.held_traits.contains(name)
        });
    }

    /// Whether the customer is a member of each of `segments` at `now` (a
    /// condition that cannot tell counts as not), converting only the
    /// computed traits and profile fields they read.
    fn results(
        &self,
        defs: &Definitions,
        segments: &[&Segment],
        view: &ProfileView,
        now: UnixMillis,
    ) -> Vec<bool> {
        if segments.is_empty() {
            return Vec::new();
        }
        let traits: Option<BTreeSet<&str>> = read_union(
            segments
                .iter()
                .map(|s| s.traits_read().map(|r| r.iter().map(String::as_str))),
        );
        let fields: Option<BTreeSet<String>> = read_union(
            segments
                .iter()
                .map(|s| s.profile_read().map(|r| r.iter().cloned())),
        );
        let json: BTreeMap<String, Value> = defs
            .traits
            .iter()
            .filter(|d| traits.as_ref().is_none_or(|t| t.contains(d.name.as_str())))
            .map(|d| (d.name.clone(), self.computed.value(d, now)))
            .collect();
        let convert = |v: &Value| cel::to_value(v).unwrap_or(cel::Value::Null);
        let names: Vec<&str> = match &fields {
            Some(fields) => fields.iter().map(String::as_str).collect(),
            None => segment::PROFILE_FIELDS.to_vec(),
        };
        let values = native::Values {
            traits: json.iter().map(|(k, v)| (k.clone(), convert(v))).collect(),
            fields: names
                .into_iter()
                .filter_map(|name| {
                    let v = segment::profile_field(view, name)?;
                    Some((name.to_owned(), convert(&v)))
                })
                .collect(),
        };
        // The interpreter's context, for the conditions of other shapes.
        let mut input: Option<Input> = None;
        segments
            .iter()
            .map(|s| {
                s.decide(&values).unwrap_or_else(|| {
                    let input = input
                        .get_or_insert_with(|| Input::with_fields(view, fields.as_ref(), &json));
                    s.matches(input) == Ok(true)
                })
            })
            .collect()
    }

    /// The profile's first event `t`, folded (the profile had no event
    /// before, so this state is a new customer's), with `view` the
    /// profile's view now: every trait defined now holds all of its events.
    pub fn on_first_event(
        &mut self,
        defs: &Definitions,
        view: &ProfileView,
        t: &Touchpoint,
        now: UnixMillis,
    ) -> Vec<Change> {
        // A new customer's state, unless a merge or a backfill made one
        // before its first event: then every segment is evaluated (the
        // traits it now knows may decide segments left as they were).
        let fresh = self.computed.is_empty() && self.members.is_empty() && self.basis.is_none();
        self.know_all(defs);
        // States kept under newer definitions than these (by a process
        // further ahead) miss this event: not known.
        for name in self.computed.newer_than(&defs.traits) {
            self.known.remove(&name);
        }
        let folded = self.computed.fold(&defs.traits, t);
        let cause = Cause::Event {
            event_id: t.event_id(),
        };
        let scope = if fresh {
            Scope::First(&folded)
        } else {
            Scope::All
        };
        self.reconcile(defs, view, &cause, now, scope)
    }

    /// After the profile folded `t` (`applied`: it was new to it), with
    /// `view` the profile's view now.
    pub fn on_event(
        &mut self,
        defs: &Definitions,
        view: &ProfileView,
        t: &Touchpoint,
        applied: bool,
        now: UnixMillis,
    ) -> Vec<Change> {
        let mut folded = Vec::new();
        let mut forgot = false;
        if applied {
            // States kept under newer definitions than these miss this
            // event: no longer known, the process ahead folds them again.
            for name in self.computed.newer_than(&defs.traits) {
                forgot |= self.known.remove(&name).is_some();
            }
            folded = self.computed.fold(&defs.traits, t);
        }
        let cause = Cause::Event {
            event_id: t.event_id(),
        };
        let scope = if forgot {
            Scope::All
        } else {
            Scope::Changed(&folded)
        };
        self.reconcile(defs, view, &cause, now, scope)
    }

    /// This customer absorbed customer `absorbed` (whose computed traits
    /// `Profile::absorb` added to these, and who exits everything with
    /// [`exit_all`](Self::exit_all)), and is now described by `view`.
    pub fn on_merge(
        &mut self,
        absorbed: CustomerId,
        defs: &Definitions,
        view: &ProfileView,
        now: UnixMillis,
    ) -> Vec<Change> {
        self.reconcile(defs, view, &Cause::Merge { absorbed }, now, Scope::All)
    }

    /// At a window's expiry (or any time after it).
    pub fn on_expiry(
        &mut self,
        defs: &Definitions,
        view: &ProfileView,
        now: UnixMillis,
    ) -> Vec<Change> {
        let due = self.due.unwrap_or(now);
        self.reconcile(defs, view, &Cause::Expiry { due }, now, Scope::Changed(&[]))
    }

    /// After definitions changed (the computed traits of an updated
    /// definition refolded by the caller).
    pub fn on_definitions(
        &mut self,
        defs: &Definitions,
        view: &ProfileView,
        now: UnixMillis,
    ) -> Vec<Change> {
        let cause = Cause::Definition {
            events: view.events_count,
        };
        self.reconcile(defs, view, &cause, now, Scope::All)
    }

    /// Leaves every segment.
    pub fn exit_all(&mut self, cause: &Cause, now: UnixMillis) -> Vec<Change> {
        self.due = None;
        self.basis = None;
        std::mem::take(&mut self.members)
            .into_iter()
            .map(|(segment, m)| Change {
                segment,
                version: m.version,
                kind: ChangeKind::Exited,
                cause: cause.clone(),
                at: now,
                since: Some(m.since),
            })
            .collect()
    }

    /// When a windowed trait next changes on its own.
    pub fn next_expiry(&self, defs: &Definitions) -> Option<UnixMillis> {
        self.computed.next_expiry(&defs.traits)
    }
}

/// A computed trait's value for one customer, as shown to people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraitValue {
    pub name: String,
    pub version: u64,
    pub value: Value,
    /// False while a backfill has not folded the customer's earlier events
    /// into it (the value counts only what came after the definition).
    pub complete: bool,
}

impl TraitValue {
    /// Masks the value as `masker` masks the property it is read from (a
    /// key the deployment counts as personal whole, free text's emails and
    /// phone numbers otherwise).
    pub fn mask(&mut self, def: &TraitDef, masker: &crate::access::Masker) {
        let key = def
            .property
            .as_deref()
            .and_then(|p| p.rsplit('.').next())
            .unwrap_or(&def.name);
        masker.keyed(key, &mut self.value);
    }
}

impl Audience {
    /// Every defined computed trait's value at `now`, by name.
    pub fn trait_values(&self, defs: &Definitions, now: UnixMillis) -> Vec<TraitValue> {
        defs.traits
            .iter()
            .map(|d| TraitValue {
                name: d.name.clone(),
                version: d.version,
                value: self.computed.value(d, now),
                complete: self.known.get(&d.name) == Some(&d.version),
            })
            .collect()
    }
}

/// What [`reference`] computes for one customer.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluated {
    pub traits: BTreeMap<String, Value>,
    pub members: BTreeSet<String>,
}

/// Every definition evaluated over a customer's whole event set at `now`,
/// from scratch: the meaning the incremental path must keep.
pub fn reference(
    defs: &Definitions,
    customer: CustomerId,
    events: &[Touchpoint],
    options: &FoldOptions,
    now: UnixMillis,
) -> Evaluated {
    let mut profile = Profile::new(customer);
    let mut computed = Computed::default();
    for t in events {
        if profile.apply(t, options) {
            computed.fold(&defs.traits, t);
        }
    }
    let traits = computed.values(&defs.traits, now);
    let input = Input::new(&profile.view(), &traits);
    let members = defs
        .segments
        .iter()
        .filter(|s| s.matches(&input) == Ok(true))
        .map(|s| s.def.name.clone())
        .collect();
    Evaluated { traits, members }
}

#[cfg(test)]
mod tests;
