//! Identity resolution: which customer an event belongs to, which
//! identifiers it links, and which customers it merges.
//!
//! [`decide`] is pure: it reads the graph through [`GraphRead`] and returns a
//! [`Decision`] as data. [`apply`] writes a decision through [`GraphWrite`].
//! Stores implement the two traits over their own transactions, so the rules
//! live here and only here.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::event::{CustomerId, EventId, IdKind, Identifier, Touchpoint, UnixMillis};
use crate::redirect::{self, RedirectError};
use crate::rules::{BlockReason, IdentityRules};

/// Who an identifier was linked to, by which event, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The customer that holds the identifier (rewritten when that customer
    /// is merged away; follow redirects to be sure).
    pub customer: CustomerId,
    /// The customer the identifier was first linked to, never rewritten:
    /// where an explanation of the identifier starts.
    #[serde(default)]
    pub first_customer: Option<CustomerId>,
    pub event_id: EventId,
    pub at: UnixMillis,
    /// When an event of its holder last carried it (kept for reassignable
    /// kinds, to a day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<UnixMillis>,
    /// Other people it was seen with but not linked to, most recent last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sightings: Vec<Sighting>,
    /// Set when it was seen with too many people: it no longer links or
    /// attributes until an operator blocks or releases it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<Quarantine>,
}

impl Claim {
    /// A claim of `customer` made by `event_id` at `at`.
    pub fn new(customer: CustomerId, event_id: EventId, at: UnixMillis) -> Claim {
        Claim {
            customer,
            first_customer: Some(customer),
            event_id,
            at,
            last_seen: Some(at),
            sightings: Vec::new(),
            quarantined: None,
        }
    }

    /// The customer the identifier was first linked to.
    pub fn linked_to(&self) -> CustomerId {
        self.first_customer.unwrap_or(self.customer)
    }

    /// When an event of its holder last carried it (its link, for a claim
    /// that never recorded one).
    pub fn last_seen(&self) -> UnixMillis {
        self.last_seen.unwrap_or(self.at).max(self.at)
    }

    /// Whether it has gone unseen with its holder for longer than `silence`
    /// by `at`. A claim stored before `last_seen` was kept is never silent:
    /// its silence is unknown.
    pub fn silent(&self, at: UnixMillis, silence: UnixMillis) -> bool {
        self.last_seen
            .is_some_and(|seen| at.saturating_sub(seen.max(self.at)) > silence)
    }

    /// Whether someone other than its holder was seen with it since `since`.
    pub fn seen_with_others_since(&self, since: UnixMillis) -> bool {
        self.sightings.iter().any(|s| s.at >= since)
    }
}

/// A person an identifier was seen with but not linked to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sighting {
    pub customer: CustomerId,
    pub event_id: EventId,
    pub at: UnixMillis,
}

/// Why an identifier stopped linking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// The event that made it one person too many.
    pub event_id: EventId,
    pub at: UnixMillis,
    /// How many different people it had been seen with.
    pub people: u32,
    pub limit: u32,
}

/// Sightings kept per identifier: enough to count any sensible limit
/// (`shared_by_at_most` is at most this).
pub const MAX_SIGHTINGS: usize = 32;
/// `last_seen` is refreshed when it is older than this.
const SEEN_GRANULARITY_MS: i64 = 86_400_000;

/// Why two customers were merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeCause {
    pub event_id: EventId,
    /// The identifier of the event that pointed at the merged customer.
    pub identifier: Identifier,
    /// The rule that allowed the merge.
    pub rule: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Merge {
    pub loser: CustomerId,
    pub survivor: CustomerId,
    pub at: UnixMillis,
    pub cause: MergeCause,
}

/// A customer in the identity graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerNode {
    pub id: CustomerId,
    /// When the event that created the customer happened; the older customer
    /// survives a merge.
    pub created_at: UnixMillis,
    pub created_by: EventId,
    /// Identifiers linked to this customer (empty once merged away).
    pub identifiers: BTreeSet<Identifier>,
    /// Set once this customer was merged into another: a redirect.
    pub merged_into: Option<CustomerId>,
    /// Merges into this customer, oldest first, with their causes.
    pub merges: Vec<Merge>,
}

impl CustomerNode {
    fn count(&self, kind: &IdKind) -> u32 {
        u32::try_from(self.identifiers.iter().filter(|i| &i.kind == kind).count())
            .unwrap_or(u32::MAX)
    }

    /// Anonymous: holds only identifiers of kinds that may not merge.
    pub fn is_anonymous(&self, rules: &IdentityRules) -> bool {
        self.identifiers.iter().all(|i| !rules.may_merge(&i.kind))
    }
}

/// Why one identifier of an event was not linked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ignored {
    Blocked(BlockReason),
    /// The customer already holds `limit` identifiers of this kind.
    LimitReached {
        limit: u32,
    },
    /// The identifier belongs to another customer and its kind may not merge.
    MergeNotAllowed {
        other: CustomerId,
    },
    /// Merging the other customer would exceed the limit of `kind`.
    MergeWouldExceedLimit {
        other: CustomerId,
        kind: IdKind,
        limit: u32,
    },
    /// The identifier belongs to another customer who holds a `kind`, a
    /// kind stronger than it, different from the one of this event's
    /// customer: two people share it (a family's phone, a shop's tablet).
    ConflictsWithStronger {
        other: CustomerId,
        kind: IdKind,
    },
    /// Seen with too many people: it no longer links or attributes.
    Quarantined {
        since: UnixMillis,
    },
    /// The source's credentials are public (a website's write key): it may
    /// not link through a contact identifier anyone could have typed.
    UntrustedSource {
        found_through: Identifier,
    },
    /// The value was not a valid identifier of its kind; the event was kept
    /// without it.
    Invalid {
        reason: String,
    },
}

impl Ignored {
    pub fn describe(&self) -> String {
        match self {
            Ignored::Blocked(BlockReason::Value(v)) => format!("blocked value {v:?}"),
            Ignored::Blocked(BlockReason::Pattern(p)) => format!("blocked by pattern {p:?}"),
            Ignored::LimitReached { limit } => {
                format!("customer already holds {limit} of this kind")
            }
            Ignored::MergeNotAllowed { other } => {
                format!("belongs to customer {other} and this kind may not merge customers")
            }
            Ignored::MergeWouldExceedLimit { other, kind, limit } => format!(
                "belongs to customer {other}; merging would exceed the limit of {limit} {kind}"
            ),
            Ignored::ConflictsWithStronger { other, kind } => format!(
                "belongs to customer {other}, who holds a different {kind} (a stronger kind): \
                 shared by two people, so it neither links nor decides"
            ),
            Ignored::Quarantined { since } => format!(
                "quarantined since {since} (ms since the epoch): seen with too many people; \
                 an operator may block or release it"
            ),
            Ignored::UntrustedSource { found_through } => format!(
                "the source is not trusted to link: the customer was found only through the \
                 {} it sent",
                found_through.kind
            ),
            Ignored::Invalid { reason } => format!("not a valid identifier: {reason}"),
        }
    }

    /// A stable name of the reason, for APIs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Ignored::Blocked(_) => "blocked",
            Ignored::LimitReached { .. } => "limit_reached",
            Ignored::MergeNotAllowed { .. } => "merge_not_allowed",
            Ignored::MergeWouldExceedLimit { .. } => "merge_would_exceed_limit",
            Ignored::ConflictsWithStronger { .. } => "conflicts_with_stronger",
            Ignored::Quarantined { .. } => "quarantined",
            Ignored::UntrustedSource { .. } => "untrusted_source",
            Ignored::Invalid { .. } => "invalid",
        }
    }

    /// The other customer the identifier belongs to, if that is the reason.
    pub fn other(&self) -> Option<CustomerId> {
        match self {
            Ignored::MergeNotAllowed { other }
            | Ignored::MergeWouldExceedLimit { other, .. }
            | Ignored::ConflictsWithStronger { other, .. } => Some(*other),
            _ => None,
        }
    }

    /// Whether the identifier was seen with a person it does not belong to
    /// (evidence that it is shared).
    fn is_sighting(&self) -> bool {
        matches!(
            self,
            Ignored::MergeNotAllowed { .. } | Ignored::ConflictsWithStronger { .. }
        )
    }
}

/// The outcome of resolving one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub event_id: EventId,
    pub at: UnixMillis,
    /// The customer the event belongs to (the survivor of any merge).
    pub customer_id: CustomerId,
    /// Whether the event created this customer.
    pub created: bool,
    /// Identifiers newly linked to `customer_id`.
    pub claims: Vec<Identifier>,
    /// Customers merged into `customer_id` by this event.
    pub merges: Vec<Merge>,
    /// Identifiers kept on the event but not linked, with the reason.
    pub ignored: Vec<(Identifier, Ignored)>,
    /// Reassignable identifiers (recycled phone numbers) taken from the
    /// customer that held them before, after a long silence.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recycled: Vec<(Identifier, CustomerId)>,
    /// Identifiers of other customers seen with this one (recorded on
    /// their claims, to detect shared values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sightings: Vec<Identifier>,
    /// Identifiers this event showed to be shared by too many people.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantined: Vec<Quarantined>,
    /// Identifiers of this customer whose `last_seen` moves to this event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seen: Vec<Identifier>,
}

/// An identifier quarantined by a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub identifier: Identifier,
    /// The customer that holds it.
    pub holder: CustomerId,
    pub people: u32,
    pub limit: u32,
}

impl Decision {
    /// Whether applying the decision changes the graph.
    pub fn changes_graph(&self) -> bool {
        self.created
            || !self.claims.is_empty()
            || !self.merges.is_empty()
            || !self.recycled.is_empty()
            || !self.sightings.is_empty()
            || !self.quarantined.is_empty()
            || !self.seen.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resolution {
    Resolved(Decision),
    /// No identifier of the event may link (all blocked): the event cannot be
    /// attributed and goes to the dead letters.
    Unresolvable {
        ignored: Vec<(Identifier, Ignored)>,
    },
}

/// A touchpoint with the customer it belongs to and the merges its
/// resolution caused, which the profile fold applies before the event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedTouchpoint {
    pub customer_id: CustomerId,
    pub merges: Vec<Merge>,
    pub touchpoint: Touchpoint,
}

/// Read access to an identity graph.
pub trait GraphRead {
    type Error: From<RedirectError>;
    fn claim(&self, id: &Identifier) -> Result<Option<Claim>, Self::Error>;
    fn node(&self, customer: CustomerId) -> Result<Option<CustomerNode>, Self::Error>;

    /// Follows redirects to the customer that currently stands for `customer`.
    fn root(&self, customer: CustomerId) -> Result<CustomerId, Self::Error> {
        redirect::follow(customer, |c| Ok(self.node(c)?.and_then(|n| n.merged_into)))
    }

    /// The customer that owns `id` now, if any.
    fn owner(&self, id: &Identifier) -> Result<Option<CustomerId>, Self::Error> {
        match self.claim(id)? {
            Some(c) => self.root(c.customer).map(Some),
            None => Ok(None),
        }
    }
}

/// Write access to an identity graph.
pub trait GraphWrite: GraphRead {
    fn put_claim(&mut self, id: &Identifier, claim: &Claim) -> Result<(), Self::Error>;
    fn put_node(&mut self, node: &CustomerNode) -> Result<(), Self::Error>;
}

struct Member {
    node: CustomerNode,
    joined_by: Identifier,
    rule: String,
}

/// An identifier of the event with its claim and the customer holding it now.
struct Seen {
    id: Identifier,
    claim: Option<Claim>,
    owner: Option<CustomerId>,
}

/// The people an event is about, built strongest identifier first.
#[derive(Default)]
struct Cluster {
    members: Vec<Member>,
    /// Identifiers the event links (new, or recycled from a former holder).
    claims: Vec<Identifier>,
    /// Identifiers per kind, held by the members or linked by the event.
    counts: BTreeMap<IdKind, u32>,
}

impl Cluster {
    fn is_empty(&self) -> bool {
        self.members.is_empty() && self.claims.is_empty()
    }

    fn has(&self, customer: CustomerId) -> bool {
        self.members.iter().any(|m| m.node.id == customer)
    }

    /// Holds no identifier of a kind that may merge: anonymous so far.
    fn is_anonymous(&self, rules: &IdentityRules) -> bool {
        self.members.iter().all(|m| m.node.is_anonymous(rules))
            && self.claims.iter().all(|c| !rules.may_merge(&c.kind))
    }

    fn add(&mut self, member: Member) {
        for i in &member.node.identifiers {
            *self.counts.entry(i.kind.clone()).or_default() += 1;
        }
        self.members.push(member);
    }

    /// Links `id` if its kind's limit allows.
    fn claim(&mut self, id: Identifier, rules: &IdentityRules) -> Result<(), Ignored> {
        let have = self.counts.entry(id.kind.clone()).or_default();
        let limit = rules.limit(&id.kind);
        if *have < limit {
            *have += 1;
            self.claims.push(id);
            Ok(())
        } else {
            Err(Ignored::LimitReached { limit })
        }
    }

    /// Whether customer `other`, reached through `id`, may join the people
    /// the event is about.
    fn admits(
        &self,
        other: &CustomerNode,
        id: &Identifier,
        rules: &IdentityRules,
    ) -> Result<String, Ignored> {
        let rule = if rules.may_merge(&id.kind) {
            format!("{} may merge customers", id.kind)
        } else if other.is_anonymous(rules) || self.is_anonymous(rules) {
            format!(
                "{} folds an anonymous customer into an identified one",
                id.kind
            )
        } else {
            return Err(Ignored::MergeNotAllowed { other: other.id });
        };
        // A weaker identifier never joins people who each hold a different
        // identifier of a stronger kind (the family's phone, the shop's tablet).
        let priority = rules.priority(&id.kind);
        let conflict = other
            .identifiers
            .iter()
            .map(|i| &i.kind)
            .filter(|k| rules.priority(k) < priority)
            .find(|k| self.counts.get(*k).copied().unwrap_or(0) > 0);
        if let Some(kind) = conflict {
            return Err(Ignored::ConflictsWithStronger {
                other: other.id,
                kind: kind.clone(),
            });
        }
        let over = other
            .identifiers
            .iter()
            .map(|i| i.kind.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .find(|k| self.counts.get(k).copied().unwrap_or(0) + other.count(k) > rules.limit(k));
        if let Some(kind) = over {
            let limit = rules.limit(&kind);
            return Err(Ignored::MergeWouldExceedLimit {
                other: other.id,
                kind,
                limit,
            });
        }
        Ok(rule)
    }
}

/// Decides which customer `event` belongs to. Pure: reads only.
///
/// Identifiers are taken strongest first. The first one held by a customer
/// finds that customer; each further one joins its customer only if the
/// rules allow (kinds that may merge, limits, no two different identifiers
/// of a stronger kind), new identifiers are linked, and an identifier that
/// may not join is recorded with its reason instead. An event whose strong
/// identifiers are new goes with them, never with the holder of a weaker
/// shared one: the event and its links always agree.
pub fn decide<G: GraphRead>(
    graph: &G,
    rules: &IdentityRules,
    event: &Touchpoint,
) -> Result<Resolution, G::Error> {
    let event_id = event.event_id();
    let at = event.envelope.occurred_at;
    let mut ignored: Vec<(Identifier, Ignored)> = event
        .personal
        .dropped
        .iter()
        .map(|d| {
            (
                Identifier::new(d.kind.clone(), d.value.clone()),
                Ignored::Invalid {
                    reason: d.reason.clone(),
                },
            )
        })
        .collect();
    let mut usable = Vec::new();
    for id in &event.personal.identifiers {
        match rules.blocked(id) {
            Some(reason) => ignored.push((id.clone(), Ignored::Blocked(reason))),
            None => usable.push(id.clone()),
        }
    }
    let mut seen: Vec<Seen> = Vec::with_capacity(usable.len());
    for id in rules.strongest_first(&usable) {
        let claim = graph.claim(id)?;
        if let Some(q) = claim.as_ref().and_then(|c| c.quarantined.as_ref())
            && !rules.released(id)
        {
            ignored.push((id.clone(), Ignored::Quarantined { since: q.at }));
            continue;
        }
        let owner = match &claim {
            Some(c) => Some(graph.root(c.customer)?),
            None => None,
        };
        seen.push(Seen {
            id: id.clone(),
            claim,
            owner,
        });
    }
    // Among identifiers of equal strength, those already held come first:
    // who the event is about does not depend on how new values sort.
    seen.sort_by_key(|s| (rules.priority(&s.id.kind), s.owner.is_none()));

    // A source anyone can send as links only through what it carries from
    // call to call (an anonymous or device id), never through a contact
    // identifier typed into a form.
    if rules.is_untrusted(&event.envelope.source_id) {
        let session = seen
            .iter()
            .find(|s| s.owner.is_some() && !rules.is_contact(&s.id.kind))
            .and_then(|s| s.owner);
        match session {
            Some(on) => {
                seen.retain(|s| match s.owner {
                    Some(o) if o != on && rules.is_contact(&s.id.kind) => {
                        ignored.push((
                            s.id.clone(),
                            Ignored::UntrustedSource {
                                found_through: s.id.clone(),
                            },
                        ));
                        false
                    }
                    _ => true,
                });
            }
            None => {
                if let Some((through, found)) = seen
                    .iter()
                    .find(|s| s.owner.is_some() && rules.is_contact(&s.id.kind))
                    .and_then(|s| Some((s.id.clone(), s.owner?)))
                {
                    seen.retain(|s| {
                        if s.owner == Some(found) {
                            true
                        } else {
                            ignored.push((
                                s.id.clone(),
                                Ignored::UntrustedSource {
                                    found_through: through.clone(),
                                },
                            ));
                            false
                        }
                    });
                }
            }
        }
    }

    let mut cluster = Cluster::default();
    let mut recycled = Vec::new();
    for s in &seen {
        let id = s.id.clone();
        let Some(owner) = s.owner else {
            if let Err(why) = cluster.claim(id.clone(), rules) {
                ignored.push((id, why));
            }
            continue;
        };
        if cluster.has(owner) {
            continue;
        }
        // A reassignable value back after a long silence, with someone
        // else's identifiers, belongs to someone new (a recycled number).
        let stale = match (&s.claim, rules.recycle_after_ms(&id.kind)) {
            (Some(c), Some(after)) => c.silent(at, after),
            _ => false,
        };
        if stale && !cluster.is_empty() && !cluster.is_anonymous(rules) {
            match cluster.claim(id.clone(), rules) {
                Ok(()) => recycled.push((id, owner)),
                Err(why) => ignored.push((id, why)),
            }
            continue;
        }
        let Some(node) = graph.node(owner)? else {
            continue;
        };
        if cluster.is_empty() {
            cluster.add(Member {
                node,
                rule: format!("{} match", id.kind),
                joined_by: id,
            });
            continue;
        }
        match cluster.admits(&node, &id, rules) {
            Ok(rule) => cluster.add(Member {
                node,
                joined_by: id,
                rule,
            }),
            Err(why) => ignored.push((id, why)),
        }
    }

    if cluster.is_empty() {
        return Ok(Resolution::Unresolvable { ignored });
    }
    let (customer_id, created) = match cluster
        .members
        .iter()
        .min_by_key(|m| (m.node.created_at, m.node.id))
    {
        Some(s) => (s.node.id, false),
        None => (
            CustomerId::derived_from(event_id, event.envelope.received_at),
            true,
        ),
    };
    let members: BTreeSet<CustomerId> = cluster.members.iter().map(|m| m.node.id).collect();

    // Shared values: each identifier seen with a person it does not belong
    // to is recorded on its claim (once a day per person); one seen with too
    // many different people (merged customers counted once) is quarantined.
    let mut sightings = Vec::new();
    let mut quarantined = Vec::new();
    for (id, why) in &ignored {
        let Some(holder) = why.other().filter(|_| why.is_sighting()) else {
            continue;
        };
        let Some(claim) = seen
            .iter()
            .find(|s| &s.id == id)
            .and_then(|s| s.claim.as_ref())
        else {
            continue;
        };
        let recent = claim.sightings.iter().any(|s| {
            s.customer == customer_id && at.saturating_sub(s.at).abs() < SEEN_GRANULARITY_MS
        });
        if recent {
            continue;
        }
        sightings.push(id.clone());
        let limit = rules.shared_by_at_most(id);
        if limit == 0 {
            continue;
        }
        let since = at.saturating_sub(rules.shared_window_ms());
        let mut people = BTreeSet::from([holder, customer_id]);
        for s in claim.sightings.iter().filter(|s| s.at >= since) {
            people.insert(graph.root(s.customer)?);
        }
        let people = u32::try_from(people.len()).unwrap_or(u32::MAX);
        if people > limit {
            quarantined.push(Quarantined {
                identifier: id.clone(),
                holder,
                people,
                limit,
            });
        }
    }
    // Reassignable values carried by their holder: remember when, to a day.
    // Only when the holder is not in doubt: another of the holder's
    // identifiers is on the event, or nobody else has been seen with the
    // value lately (a shared number alone cannot say who carries it).
    let window = at.saturating_sub(rules.shared_window_ms());
    let confirmed = |holder: CustomerId| {
        seen.iter()
            .any(|s| s.owner == Some(holder) && rules.recycle_after_ms(&s.id.kind).is_none())
    };
    let refreshed = seen
        .iter()
        .filter(|s| s.owner.is_some_and(|o| members.contains(&o)))
        .filter(|s| rules.recycle_after_ms(&s.id.kind).is_some())
        .filter(|s| {
            s.claim.as_ref().is_some_and(|c| {
                (c.last_seen.is_none() || at.saturating_sub(c.last_seen()) > SEEN_GRANULARITY_MS)
                    && (s.owner.is_some_and(confirmed) || !c.seen_with_others_since(window))
            })
        })
        .map(|s| s.id.clone())
        .collect();

    let merges = cluster
        .members
        .into_iter()
        .filter(|m| m.node.id != customer_id)
        .map(|m| Merge {
            loser: m.node.id,
            survivor: customer_id,
            at,
            cause: MergeCause {
                event_id,
                identifier: m.joined_by,
                rule: m.rule,
            },
        })
        .collect();
    Ok(Resolution::Resolved(Decision {
        event_id,
        at,
        customer_id,
        created,
        claims: cluster.claims,
        merges,
        ignored,
        recycled,
        sightings,
        quarantined,
        seen: refreshed,
    }))
}

/// Writes a decision into the graph: creates the customer, links the claimed
/// identifiers (taking recycled ones from their former holder), turns merged
/// customers into redirects to the survivor, and records sightings,
/// quarantines and when reassignable identifiers were last seen.
pub fn apply<G: GraphWrite>(graph: &mut G, decision: &Decision) -> Result<(), G::Error> {
    if !decision.changes_graph() {
        // A known customer seen again: the graph does not change (most events).
        return Ok(());
    }
    let mut survivor = match graph.node(decision.customer_id)? {
        Some(n) => n,
        None => CustomerNode {
            id: decision.customer_id,
            created_at: decision.at,
            created_by: decision.event_id,
            identifiers: BTreeSet::new(),
            merged_into: None,
            merges: Vec::new(),
        },
    };
    for merge in &decision.merges {
        let Some(mut loser) = graph.node(merge.loser)? else {
            continue;
        };
        let moved = std::mem::take(&mut loser.identifiers);
        for id in &moved {
            if let Some(mut claim) = graph.claim(id)? {
                claim.customer = survivor.id;
                graph.put_claim(id, &claim)?;
            }
        }
        survivor.identifiers.extend(moved);
        loser.merged_into = Some(survivor.id);
        graph.put_node(&loser)?;
        survivor.merges.push(merge.clone());
    }
    for (id, former) in &decision.recycled {
        let former = graph.root(*former)?;
        if former != survivor.id
            && let Some(mut node) = graph.node(former)?
            && node.identifiers.remove(id)
        {
            graph.put_node(&node)?;
        }
    }
    for id in &decision.claims {
        graph.put_claim(id, &Claim::new(survivor.id, decision.event_id, decision.at))?;
        survivor.identifiers.insert(id.clone());
    }
    for id in &decision.sightings {
        if let Some(mut claim) = graph.claim(id)? {
            let later = claim
                .sightings
                .iter()
                .any(|s| s.customer == decision.customer_id && s.at > decision.at);
            if !later {
                claim
                    .sightings
                    .retain(|s| s.customer != decision.customer_id);
                claim.sightings.push(Sighting {
                    customer: decision.customer_id,
                    event_id: decision.event_id,
                    at: decision.at,
                });
            }
            claim.sightings.sort_by_key(|s| s.at);
            let excess = claim.sightings.len().saturating_sub(MAX_SIGHTINGS);
            claim.sightings.drain(..excess);
            if let Some(q) = decision.quarantined.iter().find(|q| &q.identifier == id)
                && claim.quarantined.is_none()
            {
                claim.quarantined = Some(Quarantine {
                    event_id: decision.event_id,
                    at: decision.at,
                    people: q.people,
                    limit: q.limit,
                });
            }
            graph.put_claim(id, &claim)?;
        }
    }
    for id in &decision.seen {
        if let Some(mut claim) = graph.claim(id)?
            && (claim.last_seen.is_none() || claim.last_seen() < decision.at)
        {
            claim.last_seen = Some(decision.at);
            graph.put_claim(id, &claim)?;
        }
    }
    if decision.created || !decision.claims.is_empty() || !decision.merges.is_empty() {
        graph.put_node(&survivor)?;
    }
    Ok(())
}

/// Decides and applies in one step.
pub fn resolve<G: GraphWrite>(
    graph: &mut G,
    rules: &IdentityRules,
    event: &Touchpoint,
) -> Result<Resolution, G::Error> {
    let resolution = decide(graph, rules, event)?;
    if let Resolution::Resolved(d) = &resolution {
        apply(graph, d)?;
    }
    Ok(resolution)
}

/// The decision taken for each event, kept beside the graph (in the same
/// transaction, or the same commit point) so that a re-delivered event gets
/// the same customer and the same merges.
pub trait DecisionLog: GraphWrite {
    /// The decision stored for `event`, if any.
    fn decision(&self, event: &Touchpoint) -> Result<Option<Resolution>, Self::Error>;
    fn put_decision(
        &mut self,
        event: &Touchpoint,
        resolution: &Resolution,
    ) -> Result<(), Self::Error>;
}

/// Resolves `event` once: the decision stored for it is returned as it was;
/// otherwise it is decided, applied to the graph and stored. Only decisions
/// are stored: an event no identifier may attribute may resolve once the
/// rules change and it is re-driven.
pub fn resolve_once<G: DecisionLog>(
    graph: &mut G,
    rules: &IdentityRules,
    event: &Touchpoint,
) -> Result<Resolution, G::Error> {
    if let Some(stored) = graph.decision(event)? {
        return Ok(stored);
    }
    let resolution = resolve(graph, rules, event)?;
    if matches!(resolution, Resolution::Resolved(_)) {
        graph.put_decision(event, &resolution)?;
    }
    Ok(resolution)
}

/// An in-memory identity graph: the reference model and the unit-test store.
#[derive(Debug, Clone, Default)]
pub struct MemoryGraph {
    claims: HashMap<Identifier, Claim>,
    nodes: HashMap<CustomerId, CustomerNode>,
}

impl MemoryGraph {
    pub fn new() -> Self {
        Self::default()
    }

    /// Customers that have not been merged away.
    pub fn roots(&self) -> impl Iterator<Item = &CustomerNode> {
        self.nodes.values().filter(|n| n.merged_into.is_none())
    }
}

impl GraphRead for MemoryGraph {
    type Error = RedirectError;

    fn claim(&self, id: &Identifier) -> Result<Option<Claim>, Self::Error> {
        Ok(self.claims.get(id).cloned())
    }

    fn node(&self, customer: CustomerId) -> Result<Option<CustomerNode>, Self::Error> {
        Ok(self.nodes.get(&customer).cloned())
    }
}

impl GraphWrite for MemoryGraph {
    fn put_claim(&mut self, id: &Identifier, claim: &Claim) -> Result<(), Self::Error> {
        self.claims.insert(id.clone(), claim.clone());
        Ok(())
    }

    fn put_node(&mut self, node: &CustomerNode) -> Result<(), Self::Error> {
        self.nodes.insert(node.id, node.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Attributes, Channel, Envelope, EventType, Personal};
    use uuid::Uuid;

    fn event(n: u128, at: i64, ids: &[(IdKind, &str)]) -> Touchpoint {
        let mut identifiers: Vec<Identifier> = ids
            .iter()
            .map(|(k, v)| Identifier::new(k.clone(), *v))
            .collect();
        identifiers.sort();
        Touchpoint {
            envelope: Envelope {
                event_id: EventId(Uuid::from_u128(n)),
                event_type: EventType::ProductViewed,
                channel: Channel::Web,
                source_id: "test".into(),
                occurred_at: at,
                received_at: at,
                properties: Attributes::new(),
            },
            personal: Personal {
                identifiers,
                traits: Attributes::new(),
                ..Personal::default()
            },
        }
    }

    fn resolved(g: &mut MemoryGraph, rules: &IdentityRules, e: &Touchpoint) -> Decision {
        match resolve(g, rules, e).unwrap() {
            Resolution::Resolved(d) => d,
            other => panic!("expected a decision, got {other:?}"),
        }
    }

    #[test]
    fn a_new_identifier_creates_a_customer_derived_from_the_event() {
        let rules = IdentityRules::default();
        let mut g = MemoryGraph::new();
        let e = event(1, 10, &[(IdKind::Email, "a@shop.vn")]);
        let d = resolved(&mut g, &rules, &e);
        assert!(d.created);
        assert_eq!(
            d.customer_id,
            CustomerId::derived_from(e.event_id(), e.envelope.received_at)
        );
        assert_eq!(
            g.owner(&Identifier::new(IdKind::Email, "a@shop.vn"))
                .unwrap(),
            Some(d.customer_id)
        );
    }

    #[test]
    fn a_shared_identifier_merges_into_the_older_customer_and_records_the_cause() {
        let rules = IdentityRules::default();
        let mut g = MemoryGraph::new();
        let a = resolved(
            &mut g,
            &rules,
            &event(1, 10, &[(IdKind::Email, "a@shop.vn")]),
        );
        let b = resolved(
            &mut g,
            &rules,
            &event(2, 20, &[(IdKind::Phone, "+84912345678")]),
        );
        let m = resolved(
            &mut g,
            &rules,
            &event(
                3,
                30,
                &[
                    (IdKind::Email, "a@shop.vn"),
                    (IdKind::Phone, "+84912345678"),
                ],
            ),
        );
        assert_eq!(m.customer_id, a.customer_id);
        assert_eq!(m.merges.len(), 1);
        assert_eq!(m.merges[0].loser, b.customer_id);
        assert_eq!(m.merges[0].cause.event_id, EventId(Uuid::from_u128(3)));
        assert_eq!(
            m.merges[0].cause.identifier,
            Identifier::new(IdKind::Phone, "+84912345678")
        );
        // The loser redirects to the survivor; the claim still knows where it started.
        assert_eq!(g.root(b.customer_id).unwrap(), a.customer_id);
        let claim = g
            .claim(&Identifier::new(IdKind::Phone, "+84912345678"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (claim.customer, claim.linked_to()),
            (a.customer_id, b.customer_id)
        );
        assert_eq!(
            g.owner(&Identifier::new(IdKind::Phone, "+84912345678"))
                .unwrap(),
            Some(a.customer_id)
        );
    }

    #[test]
    fn blocked_devices_do_not_merge_two_shoppers() {
        let rules = IdentityRules::default();
        let mut g = MemoryGraph::new();
        let x = resolved(
            &mut g,
            &rules,
            &event(
                1,
                10,
                &[
                    (IdKind::Phone, "+84912345678"),
                    (IdKind::DeviceId, "pos-q1-01"),
                ],
            ),
        );
        let y = resolved(
            &mut g,
            &rules,
            &event(
                2,
                20,
                &[
                    (IdKind::Phone, "+84987654321"),
                    (IdKind::DeviceId, "pos-q1-01"),
                ],
            ),
        );
        assert_ne!(x.customer_id, y.customer_id);
        assert!(matches!(y.ignored[0].1, Ignored::Blocked(_)));
    }

    #[test]
    fn an_event_with_only_blocked_identifiers_is_unresolvable() {
        let rules = IdentityRules::default();
        let mut g = MemoryGraph::new();
        let r = resolve(
            &mut g,
            &rules,
            &event(1, 10, &[(IdKind::DeviceId, "pos-q1-01")]),
        )
        .unwrap();
        assert!(matches!(r, Resolution::Unresolvable { .. }));
    }

    #[test]
    fn an_event_goes_with_its_strong_new_identifier_not_with_the_holder_of_a_weaker_one() {
        let rules = IdentityRules::default(); // user_id limit 1
        let mut g = MemoryGraph::new();
        let a = resolved(
            &mut g,
            &rules,
            &event(
                1,
                10,
                &[(IdKind::UserId, "u1"), (IdKind::Email, "a@shop.vn")],
            ),
        );
        let d = resolved(
            &mut g,
            &rules,
            &event(
                2,
                20,
                &[(IdKind::UserId, "u2"), (IdKind::Email, "a@shop.vn")],
            ),
        );
        // u2 is someone else: the event is theirs, and the email stays where it was.
        assert!(d.created);
        assert_ne!(d.customer_id, a.customer_id);
        assert_eq!(d.claims, vec![Identifier::new(IdKind::UserId, "u2")]);
        assert_eq!(
            d.ignored,
            vec![(
                Identifier::new(IdKind::Email, "a@shop.vn"),
                Ignored::ConflictsWithStronger {
                    other: a.customer_id,
                    kind: IdKind::UserId
                }
            )]
        );
        assert_eq!(
            g.owner(&Identifier::new(IdKind::UserId, "u2")).unwrap(),
            Some(d.customer_id)
        );
        assert_eq!(
            g.owner(&Identifier::new(IdKind::Email, "a@shop.vn"))
                .unwrap(),
            Some(a.customer_id)
        );
    }

    #[test]
    fn the_identifier_beyond_the_limit_is_kept_but_not_linked() {
        let rules = IdentityRules::default(); // email limit 3
        let mut g = MemoryGraph::new();
        let mut ids = vec![(IdKind::UserId, "u1")];
        let emails = ["a@shop.vn", "b@shop.vn", "c@shop.vn", "d@shop.vn"];
        ids.extend(emails.iter().map(|e| (IdKind::Email, *e)));
        let d = resolved(&mut g, &rules, &event(1, 10, &ids));
        assert_eq!(d.claims.len(), 4);
        assert_eq!(
            d.ignored,
            vec![(
                Identifier::new(IdKind::Email, "d@shop.vn"),
                Ignored::LimitReached { limit: 3 }
            )]
        );
        assert_eq!(
            g.owner(&Identifier::new(IdKind::Email, "d@shop.vn"))
                .unwrap(),
            None
        );
    }

    #[test]
    fn a_merge_that_would_exceed_a_limit_does_not_happen() {
        let rules = IdentityRules::default(); // phone limit 2
        let mut g = MemoryGraph::new();
        let a = resolved(
            &mut g,
            &rules,
            &event(
                1,
                10,
                &[
                    (IdKind::Email, "a@shop.vn"),
                    (IdKind::Phone, "+84911111111"),
                    (IdKind::Phone, "+84922222222"),
                ],
            ),
        );
        let b = resolved(
            &mut g,
            &rules,
            &event(2, 20, &[(IdKind::Phone, "+84933333333")]),
        );
        let d = resolved(
            &mut g,
            &rules,
            &event(
                3,
                30,
                &[
                    (IdKind::Email, "a@shop.vn"),
                    (IdKind::Phone, "+84933333333"),
                ],
            ),
        );
        assert_eq!(d.customer_id, a.customer_id);
        assert!(d.merges.is_empty());
        assert!(
            matches!(d.ignored[0].1, Ignored::MergeWouldExceedLimit { other, .. } if other == b.customer_id)
        );
    }

    #[test]
    fn two_people_each_with_a_stronger_identifier_never_merge_through_a_shared_weaker_one() {
        let rules = IdentityRules::default();
        let mut g = MemoryGraph::new();
        let a = resolved(
            &mut g,
            &rules,
            &event(
                1,
                10,
                &[(IdKind::UserId, "u1"), (IdKind::Email, "a@shop.vn")],
            ),
        );
        let b = resolved(
            &mut g,
            &rules,
            &event(
                2,
                20,
                &[(IdKind::UserId, "u2"), (IdKind::Phone, "+84912345678")],
            ),
        );
        let d = resolved(
            &mut g,
            &rules,
            &event(
                3,
                30,
                &[
                    (IdKind::Email, "a@shop.vn"),
                    (IdKind::Phone, "+84912345678"),
                ],
            ),
        );
        assert_eq!(d.customer_id, a.customer_id);
        assert!(d.merges.is_empty());
        assert_eq!(
            d.ignored[0].1,
            Ignored::ConflictsWithStronger {
                other: b.customer_id,
                kind: IdKind::UserId
            }
        );
    }

    #[test]
    fn weak_kinds_attach_but_do_not_merge_identified_customers() {
        let rules = IdentityRules::default();
        let mut g = MemoryGraph::new();
        let a = resolved(
            &mut g,
            &rules,
            &event(
                1,
                10,
                &[(IdKind::Email, "a@shop.vn"), (IdKind::DeviceId, "d1")],
            ),
        );
        let b = resolved(
            &mut g,
            &rules,
            &event(
                2,
                20,
                &[(IdKind::Email, "b@shop.vn"), (IdKind::DeviceId, "d2")],
            ),
        );
        let d = resolved(
            &mut g,
            &rules,
            &event(3, 30, &[(IdKind::DeviceId, "d1"), (IdKind::DeviceId, "d2")]),
        );
        assert_eq!(d.customer_id, a.customer_id);
        assert!(d.merges.is_empty());
        assert_eq!(
            d.ignored,
            vec![(
                Identifier::new(IdKind::DeviceId, "d2"),
                Ignored::MergeNotAllowed {
                    other: b.customer_id
                }
            )]
        );
    }

    #[test]
    fn an_anonymous_browser_is_folded_into_the_customer_who_logs_in() {
        let rules = IdentityRules::default();
        let mut g = MemoryGraph::new();
        let known = resolved(
            &mut g,
            &rules,
            &event(1, 10, &[(IdKind::Email, "a@shop.vn")]),
        );
        let anon = resolved(
            &mut g,
            &rules,
            &event(2, 20, &[(IdKind::AnonymousId, "anon-1")]),
        );
        let login = resolved(
            &mut g,
            &rules,
            &event(
                3,
                30,
                &[
                    (IdKind::AnonymousId, "anon-1"),
                    (IdKind::Email, "a@shop.vn"),
                ],
            ),
        );
        assert_eq!(login.customer_id, known.customer_id);
        assert_eq!(login.merges.len(), 1);
        assert_eq!(login.merges[0].loser, anon.customer_id);
    }

    fn untrusted(mut e: Touchpoint) -> Touchpoint {
        e.envelope.source_id = "website".into();
        e
    }

    const DAY: i64 = 86_400_000;

    #[test]
    fn a_family_phone_never_pulls_a_second_loyalty_card_into_the_first_holder() {
        let rules = IdentityRules::default();
        let mut g = MemoryGraph::new();
        let home = (IdKind::Phone, "+84912345678");
        let mom = resolved(
            &mut g,
            &rules,
            &event(1, 10, &[home.clone(), (IdKind::LoyaltyId, "LC1")]),
        );
        let daughter = resolved(
            &mut g,
            &rules,
            &event(2, 20, &[home.clone(), (IdKind::LoyaltyId, "LC2")]),
        );
        assert_ne!(daughter.customer_id, mom.customer_id);
        assert_eq!(
            daughter.claims,
            vec![Identifier::new(IdKind::LoyaltyId, "LC2")]
        );
        assert_eq!(
            daughter.ignored,
            vec![(
                Identifier::new(home.0.clone(), home.1),
                Ignored::ConflictsWithStronger {
                    other: mom.customer_id,
                    kind: IdKind::LoyaltyId
                }
            )]
        );
        // The daughter's card keeps finding her, the phone stays with its holder.
        let again = resolved(
            &mut g,
            &rules,
            &event(3, 30, &[home.clone(), (IdKind::LoyaltyId, "LC2")]),
        );
        assert_eq!(again.customer_id, daughter.customer_id);
        assert!(again.merges.is_empty());
    }

    #[test]
    fn a_sign_up_on_a_shared_tablet_is_the_new_persons_with_all_its_identifiers() {
        let rules = IdentityRules::default();
        let mut g = MemoryGraph::new();
        let tablet = (IdKind::DeviceId, "tablet-q1");
        let first = resolved(
            &mut g,
            &rules,
            &event(1, 10, &[tablet.clone(), (IdKind::Phone, "+84911111111")]),
        );
        let signup = resolved(
            &mut g,
            &rules,
            &event(2, 20, &[tablet.clone(), (IdKind::LoyaltyId, "LC9")]),
        );
        assert!(signup.created, "{signup:?}");
        assert_eq!(
            signup.claims,
            vec![Identifier::new(IdKind::LoyaltyId, "LC9")]
        );
        assert_eq!(
            signup.ignored,
            vec![(
                Identifier::new(tablet.0.clone(), tablet.1),
                Ignored::MergeNotAllowed {
                    other: first.customer_id
                }
            )]
        );
        assert_eq!(
            g.owner(&Identifier::new(IdKind::LoyaltyId, "LC9")).unwrap(),
            Some(signup.customer_id)
        );
    }

    #[test]
    fn a_value_seen_with_too_many_people_is_quarantined_and_stops_attributing() {
        let rules = IdentityRules::default(); // device_id: at most 3 people
        let mut g = MemoryGraph::new();
        let tablet = (IdKind::DeviceId, "tablet-q1");
        let first = resolved(
            &mut g,
            &rules,
            &event(1, 10, &[tablet.clone(), (IdKind::Email, "p0@shop.vn")]),
        );
        let mut last = None;
        for n in 1..=3u128 {
            let email = format!("p{n}@shop.vn");
            let d = resolved(
                &mut g,
                &rules,
                &event(
                    1 + n,
                    10 + n as i64,
                    &[tablet.clone(), (IdKind::Email, &email)],
                ),
            );
            assert_ne!(d.customer_id, first.customer_id);
            last = Some(d);
        }
        let last = last.unwrap();
        assert_eq!(last.quarantined.len(), 1, "{last:?}");
        assert_eq!(
            (last.quarantined[0].people, last.quarantined[0].limit),
            (4, 3)
        );
        let id = Identifier::new(tablet.0.clone(), tablet.1);
        let claim = g.claim(&id).unwrap().unwrap();
        assert!(claim.quarantined.is_some());
        assert_eq!(claim.sightings.len(), 3);
        // Quarantined: alone, it no longer attributes.
        let r = resolve(&mut g, &rules, &event(9, 90, std::slice::from_ref(&tablet))).unwrap();
        assert!(
            matches!(&r, Resolution::Unresolvable { ignored } if matches!(ignored[0].1, Ignored::Quarantined { .. })),
            "{r:?}"
        );
        // Released by the operator, it attributes to its holder again.
        let mut config = crate::rules::IdentityRulesConfig::default();
        if let Some(device) = config.kinds.get_mut("device_id") {
            device.released.push("TABLET-Q1".into());
        }
        let released = IdentityRules::new(config).unwrap();
        let d = resolved(
            &mut g,
            &released,
            &event(10, 100, std::slice::from_ref(&tablet)),
        );
        assert_eq!(d.customer_id, first.customer_id);
    }

    #[test]
    fn a_recycled_number_starts_a_new_claim_after_its_silence() {
        let rules = IdentityRules::default(); // phone: recycled after 180 days
        let mut g = MemoryGraph::new();
        let phone = (IdKind::Phone, "+84912345678");
        let card = (IdKind::LoyaltyId, "LC-OLD");
        let old = resolved(
            &mut g,
            &rules,
            &event(1, 10, &[phone.clone(), card.clone()]),
        );
        // Alone, with nobody else ever seen with it: its holder's, "seen".
        let alone = resolved(
            &mut g,
            &rules,
            &event(2, 50 * DAY, std::slice::from_ref(&phone)),
        );
        assert_eq!(alone.customer_id, old.customer_id);
        assert_eq!(alone.seen.len(), 1);
        // Carried by its holder (with the holder's card) after 100 days: seen.
        let seen = resolved(
            &mut g,
            &rules,
            &event(6, 100 * DAY, &[phone.clone(), card.clone()]),
        );
        assert_eq!(seen.customer_id, old.customer_id);
        assert_eq!(seen.seen.len(), 1);
        // 200 days later (100 after it was last seen), with someone else's email: still the holder's.
        let soon = resolved(
            &mut g,
            &rules,
            &event(3, 200 * DAY, &[phone.clone(), (IdKind::Email, "a@shop.vn")]),
        );
        assert_eq!(soon.customer_id, old.customer_id);
        // A year after it was last seen, with a new subscriber's email: theirs.
        let new = resolved(
            &mut g,
            &rules,
            &event(
                4,
                500 * DAY,
                &[phone.clone(), (IdKind::Email, "new@shop.vn")],
            ),
        );
        assert_ne!(new.customer_id, old.customer_id);
        assert_eq!(
            new.recycled,
            vec![(Identifier::new(phone.0.clone(), phone.1), old.customer_id)]
        );
        let id = Identifier::new(phone.0.clone(), phone.1);
        assert_eq!(g.owner(&id).unwrap(), Some(new.customer_id));
        assert!(
            !g.node(old.customer_id)
                .unwrap()
                .unwrap()
                .identifiers
                .contains(&id)
        );
        // Alone, after the silence, it is not recycled: no one else is in sight.
        let alone = resolved(
            &mut g,
            &rules,
            &event(5, 501 * DAY, std::slice::from_ref(&phone)),
        );
        assert_eq!(alone.customer_id, new.customer_id);
    }

    #[test]
    fn a_regular_who_gives_only_a_phone_keeps_it_and_old_claims_are_never_recycled() {
        let rules = IdentityRules::default();
        let mut g = MemoryGraph::new();
        let phone = (IdKind::Phone, "+84987654321");
        let first = resolved(&mut g, &rules, &event(1, 10, std::slice::from_ref(&phone)));
        // Every month at the till with the phone alone...
        for month in 1..=8u128 {
            let d = resolved(
                &mut g,
                &rules,
                &event(
                    1 + month,
                    30 * DAY * month as i64,
                    std::slice::from_ref(&phone),
                ),
            );
            assert_eq!(d.customer_id, first.customer_id);
        }
        // ...then they give an email: the same person, not a recycled number.
        let d = resolved(
            &mut g,
            &rules,
            &event(
                20,
                250 * DAY,
                &[phone.clone(), (IdKind::Email, "regular@shop.vn")],
            ),
        );
        assert_eq!(d.customer_id, first.customer_id);
        assert!(d.recycled.is_empty());

        // A claim stored before `last_seen` was kept: its silence is unknown.
        let legacy_phone = Identifier::new(IdKind::Phone, "+84911112222");
        let legacy = resolved(
            &mut g,
            &rules,
            &event(30, 10, &[(IdKind::Phone, "+84911112222")]),
        );
        let mut claim = g.claim(&legacy_phone).unwrap().unwrap();
        claim.last_seen = None;
        g.put_claim(&legacy_phone, &claim).unwrap();
        let d = resolved(
            &mut g,
            &rules,
            &event(
                31,
                900 * DAY,
                &[
                    (IdKind::Phone, "+84911112222"),
                    (IdKind::Email, "x@shop.vn"),
                ],
            ),
        );
        assert_eq!(d.customer_id, legacy.customer_id);
        assert!(d.recycled.is_empty());
    }

    #[test]
    fn who_an_event_is_about_does_not_depend_on_how_new_values_sort() {
        let rules = IdentityRules::default(); // phone limit 2
        for new_phone in ["+84900000001", "+84999999999"] {
            let mut g = MemoryGraph::new();
            let a = resolved(
                &mut g,
                &rules,
                &event(
                    1,
                    10,
                    &[
                        (IdKind::Phone, "+84955555551"),
                        (IdKind::Phone, "+84955555552"),
                    ],
                ),
            );
            let d = resolved(
                &mut g,
                &rules,
                &event(
                    2,
                    20,
                    &[(IdKind::Phone, "+84955555551"), (IdKind::Phone, new_phone)],
                ),
            );
            assert_eq!(d.customer_id, a.customer_id, "with {new_phone}");
            assert_eq!(
                d.ignored,
                vec![(
                    Identifier::new(IdKind::Phone, new_phone),
                    Ignored::LimitReached { limit: 2 }
                )]
            );
        }
    }

    #[test]
    fn an_untrusted_source_cannot_attach_to_a_customer_found_through_a_typed_email() {
        let rules = IdentityRules::default().with_untrusted_sources(["website".to_string()]);
        let mut g = MemoryGraph::new();
        let victim = resolved(
            &mut g,
            &rules,
            &event(
                1,
                10,
                &[
                    (IdKind::Email, "victim@shop.vn"),
                    (IdKind::Phone, "+84911111111"),
                ],
            ),
        );
        // Someone types the victim's email on the website with their own browser and phone.
        let typed = resolved(
            &mut g,
            &rules,
            &untrusted(event(
                2,
                20,
                &[
                    (IdKind::Email, "victim@shop.vn"),
                    (IdKind::Phone, "+84922222222"),
                    (IdKind::AnonymousId, "anon-x"),
                ],
            )),
        );
        assert_eq!(typed.customer_id, victim.customer_id);
        assert!(
            typed.claims.is_empty() && typed.merges.is_empty(),
            "{typed:?}"
        );
        assert!(
            typed
                .ignored
                .iter()
                .all(|(_, why)| matches!(why, Ignored::UntrustedSource { .. }))
        );
        assert_eq!(
            g.owner(&Identifier::new(IdKind::Phone, "+84922222222"))
                .unwrap(),
            None
        );
        // A browser already on a customer may add to it.
        let anon = resolved(
            &mut g,
            &rules,
            &untrusted(event(3, 30, &[(IdKind::AnonymousId, "anon-y")])),
        );
        let added = resolved(
            &mut g,
            &rules,
            &untrusted(event(
                4,
                40,
                &[
                    (IdKind::AnonymousId, "anon-y"),
                    (IdKind::Email, "mine@shop.vn"),
                ],
            )),
        );
        assert_eq!(added.customer_id, anon.customer_id);
        assert_eq!(
            added.claims,
            vec![Identifier::new(IdKind::Email, "mine@shop.vn")]
        );
        // But that browser typing the victim's email does not join the victim.
        let joined = resolved(
            &mut g,
            &rules,
            &untrusted(event(
                5,
                50,
                &[
                    (IdKind::AnonymousId, "anon-y"),
                    (IdKind::Email, "victim@shop.vn"),
                ],
            )),
        );
        assert_eq!(joined.customer_id, anon.customer_id);
        assert!(joined.merges.is_empty());
    }

    #[test]
    fn an_invalid_identifier_is_explained_and_the_rest_still_resolves() {
        let rules = IdentityRules::default();
        let mut g = MemoryGraph::new();
        let mut e = event(1, 10, &[(IdKind::Email, "a@shop.vn")]);
        e.personal.dropped.push(crate::event::DroppedIdentifier {
            kind: IdKind::Phone,
            value: "12".into(),
            reason: "phone is not a valid phone number".into(),
        });
        let d = resolved(&mut g, &rules, &e);
        assert_eq!(d.ignored.len(), 1);
        assert_eq!(d.ignored[0].1.code(), "invalid");
    }
}
