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
pub mod segment;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;
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

/// A segment a customer is a member of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub version: u64,
    pub since: UnixMillis,
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
}

impl Audience {
    /// No computed trait and no membership: nothing to keep.
    pub fn is_empty(&self) -> bool {
        self.computed.is_empty()
            && self.members.is_empty()
            && self.due.is_none()
            && self.known.is_empty()
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
        self.reconcile(defs, view, &cause, now)
    }

    /// Whether every computed trait `segment` reads is known.
    pub fn determined(&self, defs: &Definitions, segment: &Segment) -> bool {
        defs.traits
            .iter()
            .all(|d| !segment.reads(&d.name) || self.known.get(&d.name) == Some(&d.version))
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
    /// traits.
    fn reconcile(
        &mut self,
        defs: &Definitions,
        view: &ProfileView,
        cause: &Cause,
        now: UnixMillis,
    ) -> Vec<Change> {
        self.computed.expire(&defs.traits, &defs.held_traits, now);
        let results = self.evaluate(defs, view, now);
        let mut changes = Vec::new();
        // Segments deleted since (not those held: defined, unusable now).
        let gone: Vec<String> = self
            .members
            .keys()
            .filter(|name| !results.contains_key(*name) && !defs.held_segments.contains(*name))
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
        // Names no longer defined are forgotten (a trait defined again
        // starts unknown).
        self.known.retain(|name, _| {
            defs.traits.iter().any(|d| &d.name == name) || defs.held_traits.contains(name)
        });
        for s in &defs.segments {
            let name = &s.def.name;
            if !self.determined(defs, s) {
                // It reads a trait that may miss past events: left as it
                // is until a backfill knows the trait.
                continue;
            }
            let member = matches!(results.get(name), Some(Ok(true)));
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
        if applied {
            // States kept under newer definitions than these miss this
            // event: no longer known, the process ahead folds them again.
            for name in self.computed.newer_than(&defs.traits) {
                self.known.remove(&name);
            }
            self.computed.fold(&defs.traits, t);
        }
        self.reconcile(
            defs,
            view,
            &Cause::Event {
                event_id: t.event_id(),
            },
            now,
        )
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
        self.reconcile(defs, view, &Cause::Merge { absorbed }, now)
    }

    /// At a window's expiry (or any time after it).
    pub fn on_expiry(
        &mut self,
        defs: &Definitions,
        view: &ProfileView,
        now: UnixMillis,
    ) -> Vec<Change> {
        let due = self.due.unwrap_or(now);
        self.reconcile(defs, view, &Cause::Expiry { due }, now)
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
        self.reconcile(defs, view, &cause, now)
    }

    /// Leaves every segment.
    pub fn exit_all(&mut self, cause: &Cause, now: UnixMillis) -> Vec<Change> {
        self.due = None;
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
