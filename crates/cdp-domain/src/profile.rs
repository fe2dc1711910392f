//! The profile fold: the customer view as a function of the events.
//!
//! The fold is built to converge: applying the same set of events in any
//! order, and joining profiles when customers merge, yields the same view.
//! Sums are kept per event (the `applied` set makes re-delivery a no-op),
//! "latest" values are last-writer-wins registers ordered by
//! `(occurred_at, event_id)`, and the cart and tickets are per-key registers.
//! That is what lets partitioned workers and a rebuild from the log agree
//! with the sequential reference fold.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::{Channel, CustomerId, EventId, EventType, Touchpoint, UnixMillis};
use crate::identity::ResolvedTouchpoint;
use crate::props;
use crate::timeline::TimelineEntry;

/// Order of "latest" values: time first, the event id breaks ties.
pub type Stamp = (UnixMillis, EventId);

/// How the fold treats what it folds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FoldOptions {
    /// Currency of orders that name none.
    pub default_currency: String,
    /// Trust of sources, by source id or else by channel name (default 0).
    /// A trait from a more trusted source wins over one from a less trusted
    /// source; between equals, the newer value wins.
    pub source_trust: BTreeMap<String, i64>,
    /// The computed traits and segments folded along (not configuration:
    /// the workers set them from the definitions in the log).
    #[serde(skip)]
    pub audiences: AudienceOptions,
}

impl Default for FoldOptions {
    fn default() -> Self {
        FoldOptions {
            default_currency: "VND".into(),
            source_trust: BTreeMap::new(),
            audiences: AudienceOptions::default(),
        }
    }
}

/// The audience definitions a fold evaluates, and the instant it
/// evaluates them at (processing time: windows end there).
///
/// Without definitions (`None`, a fold that does not evaluate audiences:
/// time travel, tools) the audience state is left as it is; with a set of
/// definitions, even an empty one, memberships follow it (a segment no
/// longer defined is exited).
#[derive(Clone, Default)]
pub struct AudienceOptions {
    pub definitions: Option<std::sync::Arc<crate::audience::Definitions>>,
    pub now: UnixMillis,
}

impl AudienceOptions {
    pub fn new(definitions: std::sync::Arc<crate::audience::Definitions>, now: UnixMillis) -> Self {
        AudienceOptions {
            definitions: Some(definitions),
            now,
        }
    }
}

impl std::fmt::Debug for AudienceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.definitions.as_deref();
        f.debug_struct("AudienceOptions")
            .field("traits", &d.map(|d| d.traits.len()))
            .field("segments", &d.map(|d| d.segments.len()))
            .field("now", &self.now)
            .finish()
    }
}

/// The same definitions (the same `Arc`) at the same instant.
impl PartialEq for AudienceOptions {
    fn eq(&self, other: &Self) -> bool {
        let same = match (&self.definitions, &other.definitions) {
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same && self.now == other.now
    }
}

impl FoldOptions {
    pub fn trust(&self, t: &Touchpoint) -> i64 {
        self.source_trust
            .get(&t.envelope.source_id)
            .or_else(|| self.source_trust.get(t.envelope.channel.as_str()))
            .copied()
            .unwrap_or(0)
    }
}

/// A value with the time and source it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sourced<T> {
    pub value: T,
    /// Trust of the source (see [`FoldOptions::source_trust`]); orders
    /// conflicting values before time does.
    #[serde(default)]
    pub trust: i64,
    pub at: UnixMillis,
    pub event_id: EventId,
    pub channel: Channel,
    pub source_id: String,
}

impl<T> Sourced<T> {
    fn of(value: T, t: &Touchpoint) -> Self {
        Self::trusted(value, t, 0)
    }

    fn trusted(value: T, t: &Touchpoint, trust: i64) -> Self {
        Sourced {
            value,
            trust,
            at: t.envelope.occurred_at,
            event_id: t.envelope.event_id,
            channel: t.envelope.channel,
            source_id: t.envelope.source_id.clone(),
        }
    }

    fn stamp(&self) -> (i64, UnixMillis, EventId) {
        (self.trust, self.at, self.event_id)
    }
}

/// Keeps the later of two sourced values.
fn lww<T: Clone>(slot: &mut Option<Sourced<T>>, candidate: &Sourced<T>) {
    if slot.as_ref().is_none_or(|s| s.stamp() < candidate.stamp()) {
        *slot = Some(candidate.clone());
    }
}

fn lww_map<K: Ord + Clone, T: Clone>(
    map: &mut BTreeMap<K, Sourced<T>>,
    key: &K,
    candidate: &Sourced<T>,
) {
    let mut slot = map.remove(key);
    lww(&mut slot, candidate);
    if let Some(v) = slot {
        map.insert(key.clone(), v);
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderFact {
    pub event_id: EventId,
    pub at: UnixMillis,
    pub amount: Decimal,
    pub currency: String,
    pub items: i64,
    pub channel: Channel,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Money {
    pub count: u64,
    pub total: Decimal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CartLine {
    /// Additions still counted: event -> (time, quantity).
    pub adds: BTreeMap<EventId, (UnixMillis, i64)>,
    /// The latest removal of this product.
    pub removed_at: Option<UnixMillis>,
    pub name: Option<Sourced<String>>,
    pub price: Option<Sourced<Decimal>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    pub opened: Option<Sourced<String>>,
    pub resolved: Option<Sourced<String>>,
    pub last_message: Option<Sourced<String>>,
}

impl Ticket {
    /// Open if opened after its latest resolution.
    pub fn is_open(&self) -> bool {
        match (&self.opened, &self.resolved) {
            (Some(o), Some(r)) => o.stamp() > r.stamp(),
            (Some(_), None) => true,
            _ => false,
        }
    }
}

/// The folded state of one customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub customer_id: CustomerId,
    /// Events folded in; re-delivery of one of these is a no-op.
    pub applied: BTreeSet<EventId>,
    /// Customers merged into this one (transitively).
    pub merged_from: BTreeSet<CustomerId>,
    pub first_seen: Option<UnixMillis>,
    pub last_seen: Option<UnixMillis>,
    /// Per channel: event count and last time seen.
    pub channels: BTreeMap<Channel, (u64, UnixMillis)>,
    pub traits: BTreeMap<String, Sourced<Value>>,
    /// Orders by order id (or event id when the order has none). When two
    /// events report one order, the earliest report counts.
    pub orders: BTreeMap<String, OrderFact>,
    pub spend: BTreeMap<String, Money>,
    pub refunds: BTreeMap<String, Money>,
    pub cart: BTreeMap<String, CartLine>,
    /// The latest order: it empties the cart.
    pub cart_cleared_at: Option<UnixMillis>,
    pub tickets: BTreeMap<String, Ticket>,
    pub last_message: Option<Sourced<String>>,
    pub points_earned: i64,
    pub points_redeemed: i64,
    pub feedback: Option<Sourced<(i64, String)>>,
    /// Consent by `purpose` or `purpose:channel` (see [`crate::consent`]):
    /// the latest statement, with its notice version and evidence.
    pub consent: BTreeMap<String, Sourced<crate::consent::Grant>>,
    /// Count of events per type, for the journey stage.
    pub event_types: BTreeMap<String, u64>,
    /// Per source id: when the customer was last seen there (access scopes
    /// are labels of sources). Absent in profiles folded before it existed.
    #[serde(default)]
    pub sources: BTreeMap<String, UnixMillis>,
    /// Every search term its events brought ([`crate::search::terms`]):
    /// what a search checks its candidates against, where the stores keep
    /// only keyed hashes of them. Absent in profiles folded before it
    /// existed.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub search_terms: BTreeSet<String>,
    /// Computed traits and segment memberships ([`crate::audience`]),
    /// folded with the profile in the same row while definitions exist.
    #[serde(default, skip_serializing_if = "crate::audience::Audience::is_empty")]
    pub audience: crate::audience::Audience,
}

impl Profile {
    pub fn new(customer_id: CustomerId) -> Self {
        Profile {
            customer_id,
            applied: BTreeSet::new(),
            merged_from: BTreeSet::new(),
            first_seen: None,
            last_seen: None,
            channels: BTreeMap::new(),
            traits: BTreeMap::new(),
            orders: BTreeMap::new(),
            spend: BTreeMap::new(),
            refunds: BTreeMap::new(),
            cart: BTreeMap::new(),
            cart_cleared_at: None,
            tickets: BTreeMap::new(),
            last_message: None,
            points_earned: 0,
            points_redeemed: 0,
            feedback: None,
            consent: BTreeMap::new(),
            event_types: BTreeMap::new(),
            sources: BTreeMap::new(),
            search_terms: BTreeSet::new(),
            audience: crate::audience::Audience::default(),
        }
    }

    /// Whether one of its search terms starts with `prefix` (a profile
    /// folded before terms were kept matches any prefix: it cannot tell).
    pub fn matches_search(&self, prefix: &str) -> bool {
        self.search_terms.is_empty() || self.search_terms.iter().any(|t| t.starts_with(prefix))
    }

    /// Folds one event in. Returns false (and changes nothing) when the event
    /// was already applied.
    pub fn apply(&mut self, t: &Touchpoint, options: &FoldOptions) -> bool {
        let default_currency = options.default_currency.as_str();
        if !self.applied.insert(t.envelope.event_id) {
            return false;
        }
        let env = &t.envelope;
        let at = env.occurred_at;
        self.first_seen = Some(self.first_seen.map_or(at, |f| f.min(at)));
        self.last_seen = Some(self.last_seen.map_or(at, |l| l.max(at)));
        let ch = self.channels.entry(env.channel).or_insert((0, at));
        ch.0 += 1;
        ch.1 = ch.1.max(at);
        *self
            .event_types
            .entry(env.event_type.as_str().to_owned())
            .or_default() += 1;
        let seen = self.sources.entry(env.source_id.clone()).or_insert(at);
        *seen = (*seen).max(at);
        self.search_terms.extend(crate::search::terms(t));
        for (key, value) in &t.personal.traits {
            let trust = options.trust(t);
            lww_map(
                &mut self.traits,
                key,
                &Sourced::trusted(value.clone(), t, trust),
            );
        }
        let p = &env.properties;
        match &env.event_type {
            EventType::OrderCompleted => {
                let amount = props::order_amount(p)
                    .ok()
                    .flatten()
                    .map_or(Decimal::ZERO, |(_, a)| a);
                let currency = props::currency(p, "currency")
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| default_currency.to_owned());
                let key = props::id(p, "order_id")
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| env.event_id.to_string());
                let fact = OrderFact {
                    event_id: env.event_id,
                    at,
                    amount,
                    currency,
                    items: props::item_count(p),
                    channel: env.channel,
                };
                self.add_order(key, fact);
                self.clear_cart(at);
            }
            EventType::OrderRefunded => {
                let amount = props::order_amount(p)
                    .ok()
                    .flatten()
                    .map_or(Decimal::ZERO, |(_, a)| a);
                let currency = props::currency(p, "currency")
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| default_currency.to_owned());
                let m = self.refunds.entry(currency).or_default();
                m.count += 1;
                m.total += amount;
            }
            EventType::ProductAdded => {
                if let Ok(Some(line)) = props::product(p) {
                    let entry = self
                        .cart
                        .entry(line.product_id)
                        .or_insert_with(|| CartLine {
                            adds: BTreeMap::new(),
                            removed_at: None,
                            name: None,
                            price: None,
                        });
                    entry.adds.insert(env.event_id, (at, line.quantity));
                    if let Some(n) = line.name {
                        lww(&mut entry.name, &Sourced::of(n, t));
                    }
                    if let Some(pr) = line.price {
                        lww(&mut entry.price, &Sourced::of(pr, t));
                    }
                }
                self.prune_cart();
            }
            EventType::ProductRemoved => {
                if let Ok(Some(line)) = props::product(p) {
                    let entry = self
                        .cart
                        .entry(line.product_id)
                        .or_insert_with(|| CartLine {
                            adds: BTreeMap::new(),
                            removed_at: None,
                            name: None,
                            price: None,
                        });
                    entry.removed_at = Some(entry.removed_at.map_or(at, |r| r.max(at)));
                }
                self.prune_cart();
            }
            EventType::TicketOpened | EventType::TicketResolved => {
                if let Ok(Some(id)) = props::id(p, "ticket_id") {
                    let text = props::text(p, "subject")
                        .or_else(|| props::text(p, "resolution"))
                        .unwrap_or_default();
                    let ticket = self.tickets.entry(id).or_default();
                    let slot = if env.event_type == EventType::TicketOpened {
                        &mut ticket.opened
                    } else {
                        &mut ticket.resolved
                    };
                    lww(slot, &Sourced::of(text, t));
                    if let Some(msg) = props::text(p, "message") {
                        lww(&mut ticket.last_message, &Sourced::of(msg, t));
                    }
                }
            }
            EventType::MessageReceived => {
                if let Some(msg) = props::text(p, "text").or_else(|| props::text(p, "message")) {
                    let sourced = Sourced::of(msg, t);
                    if let Ok(Some(id)) = props::id(p, "ticket_id") {
                        lww(
                            &mut self.tickets.entry(id).or_default().last_message,
                            &sourced,
                        );
                    }
                    lww(&mut self.last_message, &sourced);
                }
            }
            EventType::PointsEarned => {
                self.points_earned += props::integer(p, "points", 0, i64::MAX)
                    .ok()
                    .flatten()
                    .unwrap_or(0);
            }
            EventType::PointsRedeemed => {
                self.points_redeemed += props::integer(p, "points", 0, i64::MAX)
                    .ok()
                    .flatten()
                    .unwrap_or(0);
            }
            EventType::FeedbackSubmitted => {
                if let Ok(Some(r)) = props::integer(p, "rating", 1, 5) {
                    let comment = props::text(p, "comment").unwrap_or_default();
                    lww(&mut self.feedback, &Sourced::of((r, comment), t));
                }
            }
            _ => {}
        }
        // Any event may carry consent (the Segment `context.consent` shape);
        // validation refused what cannot be read, and older records with an
        // unreadable statement are left as they were.
        if let Ok(changes) = crate::consent::changes(t) {
            for c in changes {
                let grant = crate::consent::Grant {
                    granted: c.granted,
                    notice_version: c.notice_version.clone(),
                };
                lww_map(&mut self.consent, &c.key(), &Sourced::of(grant, t));
            }
        }
        true
    }

    fn add_order(&mut self, key: String, fact: OrderFact) {
        match self.orders.get(&key) {
            Some(existing) if (existing.at, existing.event_id) <= (fact.at, fact.event_id) => {}
            Some(existing) => {
                let old = existing.clone();
                self.unspend(&old);
                self.spend_on(&fact);
                self.orders.insert(key, fact);
            }
            None => {
                self.spend_on(&fact);
                self.orders.insert(key, fact);
            }
        }
    }

    fn spend_on(&mut self, fact: &OrderFact) {
        let m = self.spend.entry(fact.currency.clone()).or_default();
        m.count += 1;
        m.total += fact.amount;
    }

    fn unspend(&mut self, fact: &OrderFact) {
        if let Some(m) = self.spend.get_mut(&fact.currency) {
            m.count = m.count.saturating_sub(1);
            m.total -= fact.amount;
            if m.count == 0 {
                self.spend.remove(&fact.currency);
            }
        }
    }

    fn clear_cart(&mut self, at: UnixMillis) {
        self.cart_cleared_at = Some(self.cart_cleared_at.map_or(at, |c| c.max(at)));
        self.prune_cart();
    }

    /// Drops additions that can never count again (older than the latest
    /// clearing or removal) and lines that the clearing made moot.
    fn prune_cart(&mut self) {
        let cleared = self.cart_cleared_at.unwrap_or(i64::MIN);
        self.cart.retain(|_, line| {
            let threshold = cleared.max(line.removed_at.unwrap_or(i64::MIN));
            line.adds.retain(|_, (at, _)| *at > threshold);
            !line.adds.is_empty() || line.removed_at.is_some_and(|r| r > cleared)
        });
    }

    /// Joins `other` (a customer merged into this one) into this profile.
    /// Equivalent to having folded both customers' events into one.
    pub fn absorb(&mut self, other: Profile) {
        let (had_events, they_had_events) = (!self.applied.is_empty(), !other.applied.is_empty());
        let overlap = self.applied.intersection(&other.applied).count();
        debug_assert_eq!(overlap, 0, "an event was folded into two customers");
        self.applied.extend(other.applied);
        self.merged_from.insert(other.customer_id);
        self.merged_from.extend(other.merged_from);
        self.search_terms.extend(other.search_terms);
        self.first_seen = min_opt(self.first_seen, other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
        for (ch, (n, last)) in other.channels {
            let e = self.channels.entry(ch).or_insert((0, last));
            e.0 += n;
            e.1 = e.1.max(last);
        }
        for (k, n) in other.event_types {
            *self.event_types.entry(k).or_default() += n;
        }
        for (source, at) in other.sources {
            let seen = self.sources.entry(source).or_insert(at);
            *seen = (*seen).max(at);
        }
        for (k, v) in other.traits {
            lww_map(&mut self.traits, &k, &v);
        }
        for (k, fact) in other.orders {
            self.add_order(k, fact);
        }
        for (cur, m) in other.refunds {
            let e = self.refunds.entry(cur).or_default();
            e.count += m.count;
            e.total += m.total;
        }
        for (pid, line) in other.cart {
            match self.cart.get_mut(&pid) {
                None => {
                    self.cart.insert(pid, line);
                }
                Some(mine) => {
                    mine.adds.extend(line.adds);
                    mine.removed_at = mine.removed_at.max(line.removed_at);
                    if let Some(n) = &line.name {
                        lww(&mut mine.name, n);
                    }
                    if let Some(p) = &line.price {
                        lww(&mut mine.price, p);
                    }
                }
            }
        }
        self.cart_cleared_at = self.cart_cleared_at.max(other.cart_cleared_at);
        self.prune_cart();
        for (id, t) in other.tickets {
            let mine = self.tickets.entry(id).or_default();
            for (slot, v) in [
                (&mut mine.opened, t.opened),
                (&mut mine.resolved, t.resolved),
                (&mut mine.last_message, t.last_message),
            ] {
                if let Some(v) = v {
                    lww(slot, &v);
                }
            }
        }
        if let Some(m) = &other.last_message {
            lww(&mut self.last_message, m);
        }
        self.points_earned += other.points_earned;
        self.points_redeemed += other.points_redeemed;
        if let Some(f) = &other.feedback {
            lww(&mut self.feedback, f);
        }
        for (k, v) in other.consent {
            lww_map(&mut self.consent, &k, &v);
        }
        // The computed traits add up; the absorbed customer's memberships
        // end with it (the fold records its exits and re-evaluates).
        self.audience
            .absorb(other.audience, had_events, they_had_events);
    }

    /// The computed view an agent reads.
    pub fn view(&self) -> ProfileView {
        let cleared = self.cart_cleared_at.unwrap_or(i64::MIN);
        let cart = self
            .cart
            .iter()
            .filter_map(|(pid, line)| {
                let threshold = cleared.max(line.removed_at.unwrap_or(i64::MIN));
                let live: Vec<&(UnixMillis, i64)> = line
                    .adds
                    .values()
                    .filter(|(at, _)| *at > threshold)
                    .collect();
                let quantity: i64 = live.iter().map(|(_, q)| q).sum();
                (quantity > 0).then(|| CartItemView {
                    product_id: pid.clone(),
                    name: line.name.as_ref().map(|n| n.value.clone()),
                    quantity,
                    price: line.price.as_ref().map(|p| p.value),
                    added_at: live.iter().map(|(at, _)| *at).max().unwrap_or(0),
                })
            })
            .collect();
        let mut tickets: Vec<TicketView> = self
            .tickets
            .iter()
            .map(|(id, t)| TicketView {
                ticket_id: id.clone(),
                open: t.is_open(),
                subject: t
                    .opened
                    .as_ref()
                    .map(|o| o.value.clone())
                    .unwrap_or_default(),
                channel: t.opened.as_ref().or(t.resolved.as_ref()).map(|o| o.channel),
                opened_at: t.opened.as_ref().map(|o| o.at),
                resolved_at: t.resolved.as_ref().map(|r| r.at),
                last_message: t.last_message.as_ref().map(|m| m.value.clone()),
            })
            .collect();
        tickets.sort_by_key(|t| std::cmp::Reverse((t.open, t.opened_at)));
        let preferred_channel = self
            .channels
            .iter()
            .max_by_key(|(ch, (n, last))| (*n, *last, std::cmp::Reverse(**ch)))
            .map(|(ch, _)| *ch);
        let spend = self
            .spend
            .iter()
            .map(|(cur, m)| SpendView {
                currency: cur.clone(),
                orders: m.count,
                total: m.total.normalize(),
                average: if m.count == 0 {
                    Decimal::ZERO
                } else {
                    (m.total / Decimal::from(m.count)).round_dp(2).normalize()
                },
            })
            .collect();
        let refunds = self
            .refunds
            .iter()
            .map(|(cur, m)| SpendView {
                currency: cur.clone(),
                orders: m.count,
                total: m.total.normalize(),
                average: Decimal::ZERO,
            })
            .collect();
        ProfileView {
            customer_id: self.customer_id,
            events_count: self.applied.len() as u64,
            first_seen: self.first_seen,
            last_seen: self.last_seen,
            last_seen_by_channel: self
                .channels
                .iter()
                .map(|(c, (_, last))| (*c, *last))
                .collect(),
            preferred_channel,
            traits: self
                .traits
                .iter()
                .map(|(k, v)| (k.clone(), v.value.clone()))
                .collect(),
            orders_count: self.orders.len() as u64,
            spend,
            refunds,
            first_order_at: self.orders.values().map(|o| o.at).min(),
            last_order_at: self.orders.values().map(|o| o.at).max(),
            cart,
            open_tickets: tickets.iter().filter(|t| t.open).count() as u64,
            tickets,
            last_message: self.last_message.as_ref().map(|m| m.value.clone()),
            loyalty_points: self.points_earned - self.points_redeemed,
            last_feedback_rating: self.feedback.as_ref().map(|f| f.value.0),
            consent: self
                .consent
                .iter()
                .map(|(k, v)| (k.clone(), v.value.granted))
                .collect(),
            consents: crate::consent::records(&self.consent),
            stage: self.stage(),
        }
    }

    fn count(&self, t: &EventType) -> u64 {
        self.event_types.get(t.as_str()).copied().unwrap_or(0)
    }

    /// The 5A journey stage, from the events seen.
    pub fn stage(&self) -> Stage {
        let orders = self.orders.len();
        let promoter = self.feedback.as_ref().is_some_and(|f| f.value.0 >= 4);
        if orders >= 2 || (orders >= 1 && promoter) {
            Stage::Advocate
        } else if orders >= 1 {
            Stage::Act
        } else if [
            EventType::ProductAdded,
            EventType::CheckoutStarted,
            EventType::TicketOpened,
            EventType::MessageReceived,
            EventType::CallCompleted,
        ]
        .iter()
        .any(|t| self.count(t) > 0)
        {
            Stage::Ask
        } else if self.count(&EventType::ProductViewed) > 0 {
            Stage::Appeal
        } else {
            Stage::Aware
        }
    }
}

fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// The 5A customer path (Kotler): aware, appeal, ask, act, advocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Aware,
    Appeal,
    Ask,
    Act,
    Advocate,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Aware => "aware",
            Stage::Appeal => "appeal",
            Stage::Ask => "ask",
            Stage::Act => "act",
            Stage::Advocate => "advocate",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpendView {
    pub currency: String,
    pub orders: u64,
    pub total: Decimal,
    pub average: Decimal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CartItemView {
    pub product_id: String,
    pub name: Option<String>,
    pub quantity: i64,
    pub price: Option<Decimal>,
    pub added_at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketView {
    pub ticket_id: String,
    pub open: bool,
    pub subject: String,
    pub channel: Option<Channel>,
    pub opened_at: Option<UnixMillis>,
    pub resolved_at: Option<UnixMillis>,
    pub last_message: Option<String>,
}

/// The computed single customer view (without identifiers and timeline,
/// which come from the identity graph and the timeline store).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileView {
    pub customer_id: CustomerId,
    pub events_count: u64,
    pub first_seen: Option<UnixMillis>,
    pub last_seen: Option<UnixMillis>,
    pub last_seen_by_channel: BTreeMap<Channel, UnixMillis>,
    pub preferred_channel: Option<Channel>,
    pub traits: BTreeMap<String, Value>,
    pub orders_count: u64,
    pub spend: Vec<SpendView>,
    pub refunds: Vec<SpendView>,
    pub first_order_at: Option<UnixMillis>,
    pub last_order_at: Option<UnixMillis>,
    pub cart: Vec<CartItemView>,
    pub open_tickets: u64,
    pub tickets: Vec<TicketView>,
    pub last_message: Option<String>,
    pub loyalty_points: i64,
    pub last_feedback_rating: Option<i64>,
    pub consent: BTreeMap<String, bool>,
    /// Every kept consent statement with its evidence.
    #[serde(default)]
    pub consents: Vec<crate::consent::Record>,
    pub stage: Stage,
}

impl ProfileView {
    /// The view without its customer id, for comparing two runs whose
    /// customers were created in a different order.
    pub fn without_id(&self) -> ProfileView {
        ProfileView {
            customer_id: CustomerId(uuid::Uuid::nil()),
            ..self.clone()
        }
    }
}

/// What a store keeps under a customer id: a live profile, or a redirect
/// left behind by a merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ProfileSlot {
    Live(Box<Profile>),
    MergedInto(CustomerId),
}

/// Storage access for [`fold_resolved`]; stores implement it over their own
/// transaction (or with optimistic concurrency).
pub trait ProfileAccess {
    type Error: From<crate::redirect::RedirectError>;
    fn load(&mut self, customer: CustomerId) -> Result<Option<ProfileSlot>, Self::Error>;
    /// Keeps `slot` as `customer`'s (by value: a profile is not copied
    /// to be saved).
    fn save(&mut self, customer: CustomerId, slot: ProfileSlot) -> Result<(), Self::Error>;

    /// Follows merge redirects to the live customer.
    fn live_root(&mut self, customer: CustomerId) -> Result<CustomerId, Self::Error> {
        crate::redirect::follow(customer, |c| {
            Ok(match self.load(c)? {
                Some(ProfileSlot::MergedInto(next)) => Some(next),
                _ => None,
            })
        })
    }
}

/// Folds one resolved touchpoint: first the merges its resolution caused
/// (the loser's profile is absorbed and becomes a redirect), then the event
/// itself on the surviving profile. Idempotent: a re-delivered record
/// changes nothing. Returns the timeline entry when the event was new.
pub fn fold_resolved<A: ProfileAccess>(
    access: &mut A,
    resolved: &ResolvedTouchpoint,
    options: &FoldOptions,
) -> Result<Folded, A::Error> {
    use crate::audience::Cause;
    let defs = options.audiences.definitions.as_deref();
    let now = options.audiences.now;
    let mut folded = Folded::default();
    for merge in &resolved.merges {
        let survivor = access.live_root(merge.survivor)?;
        let loser = access.live_root(merge.loser)?;
        if survivor == loser {
            continue;
        }
        let mut target = match access.load(survivor)? {
            Some(ProfileSlot::Live(p)) => *p,
            _ => Profile::new(survivor),
        };
        if let Some(ProfileSlot::Live(absorbed)) = access.load(loser)? {
            let mut absorbed = *absorbed;
            if defs.is_some() {
                let exits = absorbed
                    .audience
                    .exit_all(&Cause::MergedInto { survivor }, now);
                folded.changes.extend(exits.into_iter().map(|c| (loser, c)));
            }
            target.absorb(absorbed);
        } else {
            target.merged_from.insert(loser);
        }
        if let Some(defs) = defs.filter(|d| !d.is_empty() || !target.audience.is_empty()) {
            let view = target.view();
            let changes = target.audience.on_merge(loser, defs, &view, now);
            folded
                .changes
                .extend(changes.into_iter().map(|c| (survivor, c)));
        }
        access.save(loser, ProfileSlot::MergedInto(survivor))?;
        access.save(survivor, ProfileSlot::Live(Box::new(target)))?;
    }
    let customer = access.live_root(resolved.customer_id)?;
    let mut profile = match access.load(customer)? {
        Some(ProfileSlot::Live(p)) => *p,
        _ => Profile::new(customer),
    };
    let first = profile.applied.is_empty();
    if !profile.apply(&resolved.touchpoint, options) {
        return Ok(folded);
    }
    if let Some(defs) = defs.filter(|d| !d.is_empty() || !profile.audience.is_empty()) {
        let view = profile.view();
        let changes = if first {
            // Nothing came before: every trait defined now sees it all.
            profile
                .audience
                .on_first_event(defs, &view, &resolved.touchpoint, now)
        } else {
            profile
                .audience
                .on_event(defs, &view, &resolved.touchpoint, true, now)
        };
        folded
            .changes
            .extend(changes.into_iter().map(|c| (customer, c)));
    }
    access.save(customer, ProfileSlot::Live(Box::new(profile)))?;
    folded.timeline = Some(TimelineEntry::of(
        customer,
        &resolved.touchpoint,
        &options.default_currency,
    ));
    Ok(folded)
}

/// What folding one resolved touchpoint did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Folded {
    /// The event's timeline entry, when it was new.
    pub timeline: Option<TimelineEntry>,
    /// Segment memberships entered and exited, by customer, in order.
    pub changes: Vec<(CustomerId, crate::audience::Change)>,
}

/// A customer's audience timer: at (or after) its next expiry, drops what
/// windows no longer hold and re-evaluates its memberships at
/// `options.audiences.now`. Nothing for a customer merged away.
pub fn expire_audience<A: ProfileAccess>(
    access: &mut A,
    customer: CustomerId,
    options: &FoldOptions,
) -> Result<Vec<crate::audience::Change>, A::Error> {
    let Some(defs) = options.audiences.definitions.as_deref() else {
        return Ok(Vec::new());
    };
    let Some(ProfileSlot::Live(mut profile)) = access.load(customer)? else {
        return Ok(Vec::new());
    };
    if profile.audience.is_empty() && defs.is_empty() {
        return Ok(Vec::new());
    }
    let before = profile.audience.clone();
    let view = profile.view();
    let changes = profile
        .audience
        .on_expiry(defs, &view, options.audiences.now);
    if profile.audience != before {
        access.save(customer, ProfileSlot::Live(profile))?;
    }
    Ok(changes)
}

/// Brings a live profile's audience up to the definitions of `options`
/// after they changed (see `Audience::backfill`): `events` are the events
/// folded into it (from its timeline and those of the customers it
/// absorbed; others are ignored), needed only when
/// `profile.audience.unknown(defs)` is not empty. Returns the changes; the
/// caller saves the profile when its audience changed.
pub fn backfill_audience(
    profile: &mut Profile,
    options: &FoldOptions,
    events: &[Touchpoint],
) -> Vec<crate::audience::Change> {
    let Some(defs) = options.audiences.definitions.as_deref() else {
        return Vec::new();
    };
    if profile.audience.is_empty() && defs.is_empty() {
        return Vec::new();
    }
    // Each event folded into the profile, once.
    let folded: Vec<Touchpoint> = events
        .iter()
        .filter(|t| profile.applied.contains(&t.event_id()))
        .map(|t| (t.event_id(), t))
        .collect::<BTreeMap<_, _>>()
        .into_values()
        .cloned()
        .collect();
    let view = profile.view();
    profile
        .audience
        .backfill(defs, &view, &folded, options.audiences.now)
}

/// Why a store refreshes a customer's audience (see [`refresh_audience`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Its timer came (`Audience::due`).
    Timer,
    /// A backfill pass after the definitions changed.
    Backfill,
}

/// A live profile's audience brought up to the definitions of `options`
/// at `options.audiences.now`, by a store's timer or backfill pass. When
/// a computed trait may miss some of the customer's events, `events` is
/// asked for them (the events of its timeline and of the customers it
/// absorbed) and they are folded ([`backfill_audience`]); otherwise a
/// timer lets expired window entries go (cause `expiry`) and a backfill
/// pass evaluates every segment again (cause `definition`). Returns
/// whether the audience changed (the caller saves the profile then) and
/// the changes. Without definitions nothing changes.
pub fn refresh_audience<E>(
    profile: &mut Profile,
    options: &FoldOptions,
    why: Refresh,
    events: impl FnOnce(&Profile) -> Result<Vec<Touchpoint>, E>,
) -> Result<(bool, Vec<crate::audience::Change>), E> {
    let Some(defs) = options.audiences.definitions.as_deref() else {
        return Ok((false, Vec::new()));
    };
    let before = profile.audience.clone();
    let changes = if !profile.audience.unknown(defs).is_empty() {
        let events = events(profile)?;
        backfill_audience(profile, options, &events)
    } else {
        match why {
            Refresh::Backfill => backfill_audience(profile, options, &[]),
            Refresh::Timer => {
                if profile.audience.is_empty() && defs.is_empty() {
                    return Ok((false, Vec::new()));
                }
                let view = profile.view();
                profile
                    .audience
                    .on_expiry(defs, &view, options.audiences.now)
            }
        }
    };
    Ok((profile.audience != before, changes))
}

/// Profiles in memory: the reference model's store.
impl ProfileAccess for BTreeMap<CustomerId, ProfileSlot> {
    type Error = crate::redirect::RedirectError;

    fn load(&mut self, customer: CustomerId) -> Result<Option<ProfileSlot>, Self::Error> {
        Ok(self.get(&customer).cloned())
    }

    fn save(&mut self, customer: CustomerId, slot: ProfileSlot) -> Result<(), Self::Error> {
        self.insert(customer, slot);
        Ok(())
    }
}

/// Recency, frequency and monetary scores (1 to 5) and the segment they make.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rfm {
    pub recency_days: i64,
    pub frequency: u64,
    pub monetary: Decimal,
    pub recency_score: u8,
    pub frequency_score: u8,
    pub monetary_score: u8,
    /// champions, loyal, new, potential, at_risk or hibernating.
    pub segment: &'static str,
}

impl Profile {
    /// RFM as of `now`, on spend in `currency` (thresholds suit VND retail).
    /// None for a customer who never ordered.
    pub fn rfm(&self, now: UnixMillis, currency: &str) -> Option<Rfm> {
        let last = self.orders.values().map(|o| o.at).max()?;
        let recency_days = (now - last).max(0) / 86_400_000;
        let frequency = self.orders.len() as u64;
        let monetary = self.spend.get(currency).map_or(Decimal::ZERO, |m| m.total);
        let r = match recency_days {
            0..=30 => 5,
            31..=90 => 4,
            91..=180 => 3,
            181..=365 => 2,
            _ => 1,
        };
        let f = match frequency {
            10.. => 5,
            5..=9 => 4,
            3..=4 => 3,
            2 => 2,
            _ => 1,
        };
        let m = [20_000_000, 10_000_000, 5_000_000, 1_000_000]
            .iter()
            .position(|t| monetary >= Decimal::from(*t))
            .map_or(1, |i| 5 - i as u8);
        let segment = match (r, f) {
            (4..=5, 4..=5) => "champions",
            (3..=5, 3..=5) => "loyal",
            (4..=5, 1) => "new",
            (1..=2, 3..=5) => "at_risk",
            (1..=2, _) => "hibernating",
            _ => "potential",
        };
        Some(Rfm {
            recency_days,
            frequency,
            monetary,
            recency_score: r,
            frequency_score: f,
            monetary_score: m,
            segment,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Envelope, Personal};
    use serde_json::json;
    use uuid::Uuid;

    const DAY: i64 = 86_400_000;

    fn ev(n: u128, at: i64, ty: &str, channel: Channel, source: &str, props: Value) -> Touchpoint {
        Touchpoint {
            envelope: Envelope {
                event_id: EventId(Uuid::from_u128(n)),
                event_type: EventType::from(ty),
                channel,
                source_id: source.into(),
                occurred_at: at,
                received_at: at,
                properties: props.as_object().cloned().unwrap_or_default(),
            },
            personal: Personal::default(),
        }
    }

    fn with_traits(mut t: Touchpoint, traits: Value) -> Touchpoint {
        t.personal.traits = traits.as_object().cloned().unwrap_or_default();
        t
    }

    fn fold(events: &[Touchpoint], options: &FoldOptions) -> Profile {
        let mut p = Profile::new(CustomerId(Uuid::nil()));
        for e in events {
            p.apply(e, options);
        }
        p
    }

    fn view(events: &[Touchpoint]) -> ProfileView {
        fold(events, &FoldOptions::default()).view()
    }

    #[test]
    fn orders_spend_average_first_last_and_refunds() {
        let v = view(&[
            ev(
                1,
                10 * DAY,
                "Order Completed",
                Channel::Store,
                "pos",
                json!({"order_id": "A", "total": 1_000_000}),
            ),
            ev(
                2,
                20 * DAY,
                "Order Completed",
                Channel::Web,
                "web",
                json!({"order_id": "B", "total": 500_000}),
            ),
            ev(
                3,
                30 * DAY,
                "Order Completed",
                Channel::Web,
                "web",
                json!({"order_id": "C", "total": 20, "currency": "USD"}),
            ),
            ev(
                4,
                40 * DAY,
                "Order Refunded",
                Channel::Web,
                "web",
                json!({"order_id": "B", "total": 500_000}),
            ),
        ]);
        assert_eq!(v.orders_count, 3);
        let vnd = v.spend.iter().find(|s| s.currency == "VND").unwrap();
        assert_eq!(
            (vnd.orders, vnd.total, vnd.average),
            (2, Decimal::from(1_500_000), Decimal::from(750_000))
        );
        assert_eq!(
            v.spend.iter().find(|s| s.currency == "USD").unwrap().total,
            Decimal::from(20)
        );
        assert_eq!(
            (v.first_order_at, v.last_order_at),
            (Some(10 * DAY), Some(30 * DAY))
        );
        assert_eq!(v.refunds[0].total, Decimal::from(500_000));
    }

    #[test]
    fn one_order_reported_by_two_systems_counts_once() {
        let v = view(&[
            ev(
                1,
                10,
                "Order Completed",
                Channel::Store,
                "pos",
                json!({"order_id": "A", "total": 100}),
            ),
            ev(
                2,
                11,
                "Order Completed",
                Channel::Other,
                "erp",
                json!({"order_id": "A", "total": 100}),
            ),
        ]);
        assert_eq!(v.orders_count, 1);
        assert_eq!(v.spend[0].total, Decimal::from(100));
    }

    #[test]
    fn last_seen_per_channel_and_the_preferred_channel() {
        let v = view(&[
            ev(
                1,
                10,
                "Product Viewed",
                Channel::Web,
                "web",
                json!({"product_id": "p"}),
            ),
            ev(
                2,
                20,
                "Product Viewed",
                Channel::Web,
                "web",
                json!({"product_id": "p"}),
            ),
            ev(
                3,
                30,
                "Message Received",
                Channel::Chat,
                "zalo",
                json!({"text": "hi"}),
            ),
        ]);
        assert_eq!(v.last_seen_by_channel[&Channel::Web], 20);
        assert_eq!(v.last_seen_by_channel[&Channel::Chat], 30);
        assert_eq!(v.preferred_channel, Some(Channel::Web));
        assert_eq!((v.first_seen, v.last_seen), (Some(10), Some(30)));
        assert_eq!(v.last_message.as_deref(), Some("hi"));
    }

    #[test]
    fn the_cart_moves_across_channels_and_an_order_clears_it() {
        let added_on_web = ev(
            1,
            10,
            "Product Added",
            Channel::Web,
            "web",
            json!({"product_id": "SHOE", "name": "Giày", "price": 1_250_000, "quantity": 1}),
        );
        let added_in_app = ev(
            2,
            20,
            "Product Added",
            Channel::App,
            "app",
            json!({"product_id": "SHIRT", "quantity": 2}),
        );
        let removed = ev(
            3,
            25,
            "Product Removed",
            Channel::App,
            "app",
            json!({"product_id": "SHIRT"}),
        );
        // What the store sees before the order: the web cart.
        let before = view(&[added_on_web.clone(), added_in_app.clone(), removed.clone()]);
        assert_eq!(before.cart.len(), 1);
        assert_eq!(
            (before.cart[0].product_id.as_str(), before.cart[0].quantity),
            ("SHOE", 1)
        );
        assert_eq!(before.cart[0].name.as_deref(), Some("Giày"));
        let ordered = ev(
            4,
            30,
            "Order Completed",
            Channel::Store,
            "pos",
            json!({"order_id": "X", "total": 1_250_000}),
        );
        assert!(
            view(&[added_on_web.clone(), added_in_app, removed, ordered.clone()])
                .cart
                .is_empty()
        );
        // An item added after the order is in the next cart.
        let later = ev(
            5,
            40,
            "Product Added",
            Channel::Web,
            "web",
            json!({"product_id": "HAT"}),
        );
        assert_eq!(view(&[added_on_web, ordered, later]).cart.len(), 1);
    }

    #[test]
    fn tickets_open_resolve_and_keep_their_last_message() {
        let v = view(&[
            ev(
                1,
                10,
                "Ticket Opened",
                Channel::CallCenter,
                "hotline",
                json!({"ticket_id": "T1", "subject": "Giao chậm"}),
            ),
            ev(
                2,
                20,
                "Message Received",
                Channel::Chat,
                "zalo",
                json!({"ticket_id": "T1", "text": "Đã giao chưa?"}),
            ),
            ev(
                3,
                30,
                "Ticket Opened",
                Channel::Email,
                "mail",
                json!({"ticket_id": "T2", "subject": "Đổi size"}),
            ),
            ev(
                4,
                40,
                "Ticket Resolved",
                Channel::Email,
                "mail",
                json!({"ticket_id": "T2"}),
            ),
        ]);
        assert_eq!(v.open_tickets, 1);
        let t1 = v.tickets.iter().find(|t| t.ticket_id == "T1").unwrap();
        assert!(t1.open);
        assert_eq!(t1.last_message.as_deref(), Some("Đã giao chưa?"));
        let t2 = v.tickets.iter().find(|t| t.ticket_id == "T2").unwrap();
        assert_eq!((t2.open, t2.resolved_at), (false, Some(40)));
    }

    #[test]
    fn loyalty_feedback_and_consent() {
        let v = view(&[
            ev(
                1,
                10,
                "Points Earned",
                Channel::Store,
                "pos",
                json!({"points": 500}),
            ),
            ev(
                2,
                20,
                "Points Redeemed",
                Channel::Web,
                "web",
                json!({"points": 120}),
            ),
            ev(
                3,
                30,
                "Feedback Submitted",
                Channel::Email,
                "survey",
                json!({"rating": 2}),
            ),
            ev(
                4,
                40,
                "Feedback Submitted",
                Channel::Email,
                "survey",
                json!({"rating": 5}),
            ),
            ev(
                5,
                50,
                "Consent Updated",
                Channel::Web,
                "web",
                json!({"purpose": "marketing", "channel": "email", "granted": true}),
            ),
            ev(
                6,
                60,
                "Consent Updated",
                Channel::Chat,
                "zalo",
                json!({"purpose": "marketing", "channel": "zalo", "granted": true}),
            ),
            ev(
                7,
                70,
                "Consent Updated",
                Channel::Web,
                "web",
                json!({"purpose": "marketing", "channel": "email", "granted": "revoked"}),
            ),
        ]);
        assert_eq!(v.loyalty_points, 380);
        assert_eq!(v.last_feedback_rating, Some(5));
        assert!(!v.consent["marketing:email"], "revoked after being granted");
        assert!(v.consent["marketing:zalo"]);
    }

    #[test]
    fn the_journey_stage_follows_the_events() {
        let viewed = ev(
            1,
            10,
            "Product Viewed",
            Channel::Web,
            "web",
            json!({"product_id": "p"}),
        );
        let asked = ev(
            2,
            20,
            "Message Received",
            Channel::Chat,
            "zalo",
            json!({"text": "?"}),
        );
        let bought = ev(
            3,
            30,
            "Order Completed",
            Channel::Store,
            "pos",
            json!({"order_id": "1", "total": 1}),
        );
        let praised = ev(
            4,
            40,
            "Feedback Submitted",
            Channel::Email,
            "s",
            json!({"rating": 5}),
        );
        assert_eq!(
            view(&[ev(9, 1, "Identify", Channel::Web, "web", json!({}))]).stage,
            Stage::Aware
        );
        assert_eq!(view(std::slice::from_ref(&viewed)).stage, Stage::Appeal);
        assert_eq!(view(&[viewed.clone(), asked.clone()]).stage, Stage::Ask);
        assert_eq!(
            view(&[viewed.clone(), asked.clone(), bought.clone()]).stage,
            Stage::Act
        );
        assert_eq!(
            view(&[viewed, asked, bought, praised]).stage,
            Stage::Advocate
        );
    }

    #[test]
    fn a_trusted_source_wins_and_among_equals_the_newer_value() {
        let options = FoldOptions {
            source_trust: [("crm".to_string(), 10), ("web".to_string(), 1)]
                .into_iter()
                .collect(),
            ..FoldOptions::default()
        };
        let crm = with_traits(
            ev(1, 10, "Identify", Channel::CallCenter, "crm", json!({})),
            json!({"name": "Nguyễn Thị Lan"}),
        );
        let web_later = with_traits(
            ev(2, 20, "Identify", Channel::Web, "web", json!({})),
            json!({"name": "lan123", "city": "HCM"}),
        );
        let web_latest = with_traits(
            ev(3, 30, "Identify", Channel::Web, "web", json!({})),
            json!({"city": "Hà Nội"}),
        );
        for order in [
            [&crm, &web_later, &web_latest],
            [&web_latest, &web_later, &crm],
        ] {
            let mut p = Profile::new(CustomerId(Uuid::nil()));
            for e in order {
                p.apply(e, &options);
            }
            assert_eq!(p.traits["name"].value, json!("Nguyễn Thị Lan"));
            assert_eq!(p.traits["name"].source_id, "crm");
            assert_eq!(p.traits["name"].at, 10);
            assert_eq!(p.traits["city"].value, json!("Hà Nội"));
        }
    }

    #[test]
    fn rfm_scores_and_segments() {
        let now = 400 * DAY;
        let orders: Vec<Touchpoint> = (0..6)
            .map(|i| {
                ev(
                    i,
                    now - (i as i64 + 1) * DAY,
                    "Order Completed",
                    Channel::Store,
                    "pos",
                    json!({"order_id": i.to_string(), "total": 2_000_000}),
                )
            })
            .collect();
        let p = fold(&orders, &FoldOptions::default());
        let rfm = p.rfm(now, "VND").unwrap();
        assert_eq!((rfm.recency_days, rfm.frequency), (1, 6));
        assert_eq!(
            (rfm.recency_score, rfm.frequency_score, rfm.monetary_score),
            (5, 4, 4)
        );
        assert_eq!(rfm.segment, "champions");
        let lapsed = fold(&orders[..1], &FoldOptions::default())
            .rfm(now + 300 * DAY, "VND")
            .unwrap();
        assert_eq!(lapsed.segment, "hibernating");
        assert!(
            Profile::new(CustomerId(Uuid::nil()))
                .rfm(now, "VND")
                .is_none()
        );
    }
}
