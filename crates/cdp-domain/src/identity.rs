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
}

impl Claim {
    /// The customer the identifier was first linked to.
    pub fn linked_to(&self) -> CustomerId {
        self.first_customer.unwrap_or(self.customer)
    }
}

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
        }
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

/// Decides which customer `event` belongs to. Pure: reads only.
pub fn decide<G: GraphRead>(
    graph: &G,
    rules: &IdentityRules,
    event: &Touchpoint,
) -> Result<Resolution, G::Error> {
    let event_id = event.event_id();
    let at = event.envelope.occurred_at;
    let mut ignored = Vec::new();
    let mut usable = Vec::new();
    for id in &event.personal.identifiers {
        match rules.blocked(id) {
            Some(reason) => ignored.push((id.clone(), Ignored::Blocked(reason))),
            None => usable.push(id.clone()),
        }
    }
    let mut owned = Vec::with_capacity(usable.len());
    for id in rules.strongest_first(&usable) {
        let owner = graph.owner(id)?;
        owned.push((id.clone(), owner));
    }

    // The strongest identifier that already belongs to someone anchors the event.
    let mut members: Vec<Member> = Vec::new();
    let mut counts: BTreeMap<IdKind, u32> = BTreeMap::new();
    if let Some((id, Some(anchor))) = owned.iter().find(|(_, o)| o.is_some())
        && let Some(node) = graph.node(*anchor)?
    {
        for i in &node.identifiers {
            *counts.entry(i.kind.clone()).or_default() += 1;
        }
        members.push(Member {
            node,
            joined_by: id.clone(),
            rule: format!("{} match", id.kind),
        });
    }

    let mut claims = Vec::new();
    for (id, owner) in owned {
        match owner {
            Some(o) if members.iter().any(|m| m.node.id == o) => {}
            Some(o) => {
                let Some(other) = graph.node(o)? else {
                    continue;
                };
                let union_anonymous = members.iter().all(|m| m.node.is_anonymous(rules));
                let rule = if rules.may_merge(&id.kind) {
                    format!("{} may merge customers", id.kind)
                } else if other.is_anonymous(rules) || union_anonymous {
                    format!(
                        "{} folds an anonymous customer into an identified one",
                        id.kind
                    )
                } else {
                    ignored.push((id, Ignored::MergeNotAllowed { other: o }));
                    continue;
                };
                let over = other
                    .identifiers
                    .iter()
                    .map(|i| i.kind.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .find(|k| {
                        counts.get(k).copied().unwrap_or(0) + other.count(k) > rules.limit(k)
                    });
                if let Some(kind) = over {
                    let limit = rules.limit(&kind);
                    ignored.push((
                        id,
                        Ignored::MergeWouldExceedLimit {
                            other: o,
                            kind,
                            limit,
                        },
                    ));
                    continue;
                }
                for i in &other.identifiers {
                    *counts.entry(i.kind.clone()).or_default() += 1;
                }
                members.push(Member {
                    node: other,
                    joined_by: id,
                    rule,
                });
            }
            None => {
                let have = counts.entry(id.kind.clone()).or_default();
                let limit = rules.limit(&id.kind);
                if *have < limit {
                    *have += 1;
                    claims.push(id);
                } else {
                    ignored.push((id, Ignored::LimitReached { limit }));
                }
            }
        }
    }

    if members.is_empty() && claims.is_empty() {
        return Ok(Resolution::Unresolvable { ignored });
    }
    let (customer_id, created) = match members
        .iter()
        .min_by_key(|m| (m.node.created_at, m.node.id))
    {
        Some(s) => (s.node.id, false),
        None => (
            CustomerId::derived_from(event_id, event.envelope.received_at),
            true,
        ),
    };
    let merges = members
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
        claims,
        merges,
        ignored,
    }))
}

/// Writes a decision into the graph: creates the customer, links the claimed
/// identifiers, and turns merged customers into redirects to the survivor.
pub fn apply<G: GraphWrite>(graph: &mut G, decision: &Decision) -> Result<(), G::Error> {
    let existing = graph.node(decision.customer_id)?;
    if existing.is_some() && decision.claims.is_empty() && decision.merges.is_empty() {
        // A known customer seen again: the graph does not change (most events).
        return Ok(());
    }
    let mut survivor = match existing {
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
    for id in &decision.claims {
        graph.put_claim(
            id,
            &Claim {
                customer: survivor.id,
                first_customer: Some(survivor.id),
                event_id: decision.event_id,
                at: decision.at,
            },
        )?;
        survivor.identifiers.insert(id.clone());
    }
    graph.put_node(&survivor)
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
    fn the_identifier_beyond_the_limit_is_kept_but_not_linked() {
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
        assert_eq!(d.customer_id, a.customer_id);
        assert_eq!(
            d.ignored,
            vec![(
                Identifier::new(IdKind::UserId, "u2"),
                Ignored::LimitReached { limit: 1 }
            )]
        );
        assert_eq!(
            g.owner(&Identifier::new(IdKind::UserId, "u2")).unwrap(),
            None
        );
    }

    #[test]
    fn a_merge_that_would_exceed_a_limit_does_not_happen() {
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
        assert!(
            matches!(d.ignored[0].1, Ignored::MergeWouldExceedLimit { other, .. } if other == b.customer_id)
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
}
