use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use serde_json::{Value, json};
use uuid::Uuid;

use super::*;
use crate::identity::Merge;
use crate::profile::{Folded, ProfileSlot, expire_audience, fold_resolved};
use crate::{Channel, Envelope, EventType, Personal};

const DAY: i64 = 86_400_000;
const T0: i64 = 1_780_000_000_000;

fn ev(n: u128, at: i64, ty: &str, channel: Channel, props: Value) -> Touchpoint {
    Touchpoint {
        envelope: Envelope {
            event_id: EventId(Uuid::from_u128(n)),
            event_type: EventType::from(ty),
            channel,
            source_id: "pos-1".into(),
            occurred_at: at,
            received_at: at,
            properties: props.as_object().cloned().unwrap_or_default(),
        },
        personal: Personal::default(),
    }
}

fn order(n: u128, at: i64, channel: Channel, revenue: i64, product: &str) -> Touchpoint {
    ev(
        n,
        at,
        "Order Completed",
        channel,
        json!({"order_id": format!("SO-{n}"), "revenue": revenue, "currency": "VND",
               "store_id": "HN-01", "products": [{"product_id": product, "price": revenue}]}),
    )
}

fn view(n: u128, at: i64, product: &str) -> Touchpoint {
    ev(
        n,
        at,
        "Product Viewed",
        Channel::Web,
        json!({"product_id": product}),
    )
}

fn def(
    name: &str,
    aggregate: Aggregate,
    property: Option<&str>,
    types: &[&str],
    window: &str,
) -> TraitDef {
    TraitDef {
        name: name.into(),
        version: 1,
        aggregate,
        property: property.map(str::to_owned),
        filter: EventFilter {
            types: types.iter().map(|t| (*t).to_owned()).collect(),
            ..EventFilter::default()
        },
        window: window.parse().unwrap(),
    }
}

fn seg(name: &str, condition: &str) -> SegmentDef {
    SegmentDef {
        name: name.into(),
        version: 1,
        condition: condition.into(),
        description: String::new(),
    }
}

fn shop_traits() -> Vec<TraitDef> {
    vec![
        def(
            "spend_90d",
            Aggregate::Sum,
            Some("revenue"),
            &["order_completed"],
            "90d",
        ),
        def(
            "views_7d",
            Aggregate::Count,
            None,
            &["product_viewed"],
            "7d",
        ),
        def(
            "orders_7d",
            Aggregate::Count,
            None,
            &["order_completed"],
            "7d",
        ),
        def(
            "orders",
            Aggregate::Count,
            None,
            &["order_completed"],
            "all",
        ),
        def(
            "top_product",
            Aggregate::MostFrequent,
            Some("products.product_id"),
            &[],
            "all",
        ),
        def(
            "products",
            Aggregate::UniqueList,
            Some("products.product_id"),
            &[],
            "all",
        ),
        def(
            "product_count",
            Aggregate::UniqueCount,
            Some("products.product_id"),
            &[],
            "all",
        ),
        def(
            "first_channel",
            Aggregate::First,
            Some("$channel"),
            &[],
            "all",
        ),
        def(
            "last_store",
            Aggregate::Last,
            Some("store_id"),
            &["order_completed"],
            "all",
        ),
        def(
            "avg_order",
            Aggregate::Avg,
            Some("revenue"),
            &["order_completed"],
            "all",
        ),
        def(
            "max_order_30d",
            Aggregate::Max,
            Some("revenue"),
            &["order_completed"],
            "30d",
        ),
        def(
            "min_order",
            Aggregate::Min,
            Some("revenue"),
            &["order_completed"],
            "all",
        ),
    ]
}

fn shop() -> Definitions {
    Definitions::new(
        shop_traits(),
        vec![
            seg("vip", "traits.spend_90d >= 3000000"),
            seg("browsers", "traits.views_7d >= 2 && traits.orders_7d == 0"),
            seg(
                "store_buyers",
                "traits.orders_7d >= 1 && profile.journey_stage in [\"act\", \"advocate\"] && profile.orders_count >= 1 && \"store\" in profile.channels",
            ),
            seg("fans", "traits.top_product == \"P1\" || size(traits.products) >= 3"),
        ],
    )
    .unwrap()
}

#[test]
fn windows_parse_and_print() {
    assert_eq!("7d".parse::<Window>().unwrap().millis(), Some(7 * DAY));
    assert_eq!("24h".parse::<Window>().unwrap().to_string(), "1d");
    assert_eq!("90m".parse::<Window>().unwrap().to_string(), "90m");
    assert_eq!("all".parse::<Window>().unwrap(), Window::ALL_TIME);
    for bad in ["7w", "0d", "-3d", "d", "99999d"] {
        assert!(bad.parse::<Window>().is_err(), "{bad}");
    }
    let t: TraitDef = serde_json::from_value(json!({
        "name": "orders_7d", "aggregate": "count", "window": "7d",
        "filter": {"types": ["order_completed"]}
    }))
    .unwrap();
    assert_eq!(t.window.millis(), Some(7 * DAY));
    let bad = serde_json::from_value::<TraitDef>(json!({
        "name": "x", "aggregate": "count", "window": "7 days"
    }))
    .unwrap_err();
    assert!(bad.to_string().contains("\"7 days\""), "{bad}");
}

#[test]
fn bad_trait_definitions_name_the_field() {
    let cases = [
        (
            def("Orders", Aggregate::Count, None, &[], "all"),
            "traits[0].name",
        ),
        (
            def("n", Aggregate::Count, Some("revenue"), &[], "all"),
            "traits[0].property",
        ),
        (
            def("n", Aggregate::Sum, None, &[], "all"),
            "traits[0].property",
        ),
        (
            def("n", Aggregate::Sum, Some("a..b"), &[], "all"),
            "traits[0].property",
        ),
        (
            def("n", Aggregate::Sum, Some("$when"), &[], "all"),
            "traits[0].property",
        ),
        // Personal data is not for audiences.
        (
            def("n", Aggregate::Last, Some("shipping_address"), &[], "all"),
            "traits[0].property",
        ),
        (
            def(
                "n",
                Aggregate::UniqueList,
                Some("recipients.phone"),
                &[],
                "all",
            ),
            "traits[0].property",
        ),
    ];
    for (t, field) in cases {
        let e = Definitions::new(vec![t], vec![]).unwrap_err();
        assert_eq!(e.field, field, "{e}");
    }
    let mut t = def("n", Aggregate::Count, None, &[], "all");
    t.filter.conditions.push(Condition {
        property: "revenue".into(),
        op: Op::Gt,
        value: json!("lots"),
    });
    let e = Definitions::new(vec![t], vec![]).unwrap_err();
    assert_eq!(e.field, "traits[0].filter.conditions[0].value");
    assert!(e.reason.contains("number"), "{e}");
    let twice = vec![
        def("n", Aggregate::Count, None, &[], "all"),
        def("n", Aggregate::Count, None, &[], "7d"),
    ];
    let e = Definitions::new(twice, vec![]).unwrap_err();
    assert_eq!(e.field, "traits[1].name");
}

#[test]
fn bad_conditions_are_refused_with_line_and_column() {
    let traits = shop_traits();
    let refused = |condition: &str| {
        Definitions::new(traits.clone(), vec![seg("s", condition)])
            .map(|_| ())
            .unwrap_err()
    };
    let e = refused("traits.orders_7d >= ");
    assert_eq!(e.field, "segments[0].condition");
    assert!(e.reason.starts_with("line 1, column 21:"), "{e}");
    let e = refused("traits.orders_7d >= 1 )");
    assert!(e.reason.starts_with("line 1, column 23:"), "{e}");

    let e = refused("traits.orders_7d >= 1 &&\n  traits.spend_30d > 0");
    assert!(e.reason.starts_with("line 2, column 3"), "{e}");
    assert!(e.reason.contains("`spend_30d`"), "{e}");
    assert!(
        e.reason.contains("spend_90d"),
        "lists the defined ones: {e}"
    );

    let e = refused("profile.last_seen > now - 7");
    assert!(e.reason.contains("line 1, column 21"), "{e}");
    assert!(e.reason.contains("window"), "{e}");

    let e = refused("customer.vip");
    assert!(e.reason.contains("`customer`"), "{e}");

    // Comprehension variables are not free variables.
    Definitions::new(
        traits.clone(),
        vec![seg(
            "s",
            "profile.channels.exists(c, c == \"store\") && has(traits.orders)",
        )],
    )
    .unwrap();
    let e = refused("");
    assert!(e.reason.contains("empty"), "{e}");
}

#[test]
fn conditions_read_no_personal_trait_and_held_segments_keep_their_members() {
    let defs = Definitions::new(
        vec![],
        vec![
            seg("tiered", "profile.traits.tier == \"gold\""),
            seg(
                "probing",
                "has(profile.traits.email) || has(profile.customer_id)",
            ),
        ],
    )
    .unwrap();
    let options = FoldOptions::default();
    let mut p = Profile::new(CustomerId(Uuid::from_u128(1)));
    let mut e = view(1, T0, "P1");
    e.personal.traits = json!({"tier": "gold", "email": "lan@shop.vn", "phone": "+84912345678"})
        .as_object()
        .cloned()
        .unwrap();
    p.apply(&e, &options);
    let mut aud = Audience::default();
    let changes = aud.on_event(&defs, &p.view(), &e, true, T0);
    let entered: Vec<_> = changes.iter().map(|c| c.segment.as_str()).collect();
    assert_eq!(entered, ["tiered"]);
    let input = segment::segment_profile(&p.view());
    assert!(input["traits"].get("email").is_none() && input["traits"].get("phone").is_none());
    assert!(input.get("customer_id").is_none());

    // The segment's record cannot be read now: held, its members stay.
    let mut held = Definitions::default();
    held.held_segments.insert("tiered".into());
    assert!(aud.on_definitions(&held, &p.view(), T0 + 1).is_empty());
    assert!(aud.members.contains_key("tiered"));
    // Deleted for real: exited, with when the membership began.
    let exits = aud.on_definitions(&Definitions::default(), &p.view(), T0 + 2);
    assert_eq!(exits.len(), 1);
    assert_eq!(exits[0].since, Some(T0));
}

#[test]
fn computed_values() {
    let defs = shop();
    let mut c = Computed::default();
    let events = [
        order(1, T0, Channel::Store, 1_000_000, "P1"),
        order(2, T0 + DAY, Channel::Web, 500_000, "P2"),
        order(3, T0 + 40 * DAY, Channel::Store, 2_000_000, "P1"),
        view(4, T0 + 41 * DAY, "P3"),
        ev(
            5,
            T0 + 41 * DAY,
            "order_completed",
            Channel::App,
            json!({"revenue": "250000.5"}),
        ),
    ];
    for e in &events {
        c.fold(&defs.traits, e);
    }
    let now = T0 + 42 * DAY;
    let v = c.values(&defs.traits, now);
    assert_eq!(v["orders"], json!(4));
    assert_eq!(v["orders_7d"], json!(2));
    assert_eq!(v["views_7d"], json!(1));
    // 90 days back from day 42 holds every order.
    assert_eq!(v["spend_90d"], json!(3_750_000.5));
    assert_eq!(v["avg_order"], json!(937_500.125));
    assert_eq!(v["min_order"], json!(250_000.5));
    assert_eq!(v["max_order_30d"], json!(2_000_000));
    assert_eq!(v["top_product"], json!("P1"));
    assert_eq!(v["products"], json!(["P1", "P2"]));
    assert_eq!(v["product_count"], json!(2));
    assert_eq!(v["first_channel"], json!("store"));
    // The last order with a store_id: event 5 has none.
    assert_eq!(v["last_store"], json!("HN-01"));

    // An empty customer: counts and sums are 0, lists empty, the rest null.
    let e = Computed::default().values(&defs.traits, now);
    assert_eq!(e["orders"], json!(0));
    assert_eq!(e["spend_90d"], json!(0));
    assert_eq!(e["products"], json!([]));
    assert_eq!(e["avg_order"], Value::Null);
    assert_eq!(e["first_channel"], Value::Null);
}

#[test]
fn filters_compare_numbers_text_and_lists() {
    let mut t = def(
        "big_hn",
        Aggregate::Count,
        None,
        &["order_completed"],
        "all",
    );
    t.filter.channels = vec![Channel::Store, Channel::Web];
    t.filter.conditions = vec![
        Condition {
            property: "revenue".into(),
            op: Op::Gte,
            value: json!(1_000_000),
        },
        Condition {
            property: "store_id".into(),
            op: Op::In,
            value: json!(["HN-01", "HN-02"]),
        },
        Condition {
            property: "products.product_id".into(),
            op: Op::Ne,
            value: json!("P9"),
        },
    ];
    let defs = Definitions::new(vec![t], vec![]).unwrap();
    let kept = |e: &Touchpoint| defs.traits[0].matches(e);
    assert!(kept(&order(1, T0, Channel::Store, 1_000_000, "P1")));
    assert!(!kept(&order(2, T0, Channel::Store, 999_999, "P1")));
    assert!(
        !kept(&order(3, T0, Channel::App, 2_000_000, "P1")),
        "channel"
    );
    assert!(!kept(&order(4, T0, Channel::Store, 2_000_000, "P9")), "ne");
    assert!(!kept(&view(5, T0, "P1")), "type");
    let text_amount = ev(
        6,
        T0,
        "Order Completed",
        Channel::Web,
        json!({"revenue": "1500000", "store_id": "HN-02"}),
    );
    assert!(kept(&text_amount), "a number sent as text compares as one");
}

/// Profiles in memory, folded as a store folds them, with the
/// definitions and the processing time in the options.
struct Shop {
    store: BTreeMap<CustomerId, ProfileSlot>,
    options: FoldOptions,
}

impl Shop {
    fn new(defs: Definitions) -> Self {
        let mut options = FoldOptions::default();
        options.audiences.definitions = Some(std::sync::Arc::new(defs));
        Shop {
            store: BTreeMap::new(),
            options,
        }
    }

    fn defs(&self) -> &Definitions {
        self.options.audiences.definitions.as_deref().unwrap()
    }

    fn fold(&mut self, r: &crate::ResolvedTouchpoint, now: UnixMillis) -> Folded {
        self.options.audiences.now = now;
        fold_resolved(&mut self.store, r, &self.options).unwrap()
    }

    fn expire(&mut self, c: CustomerId, now: UnixMillis) -> Vec<Change> {
        self.options.audiences.now = now;
        expire_audience(&mut self.store, c, &self.options).unwrap()
    }

    /// The definitions change (the stores learn it from the registry).
    fn redefine(&mut self, defs: Definitions) {
        self.options.audiences.definitions = Some(std::sync::Arc::new(defs));
    }

    /// A backfill of customer `c`, given every event there is.
    fn backfill(&mut self, c: CustomerId, events: &[Touchpoint], now: UnixMillis) -> Vec<Change> {
        self.options.audiences.now = now;
        let Some(ProfileSlot::Live(mut p)) = self.store.get(&c).cloned() else {
            return Vec::new();
        };
        let changes = crate::profile::backfill_audience(&mut p, &self.options, events);
        self.store.insert(c, ProfileSlot::Live(p));
        changes
    }

    /// The segments (of those it can evaluate) whose membership of live
    /// customer `c` differs from what evaluating them all at `now` gives
    /// (unless its timer is due: then a window may have let events go
    /// since): what re-evaluating only the segments whose inputs changed
    /// must never leave.
    fn out_of_line(&self, c: CustomerId, now: UnixMillis) -> Vec<String> {
        let Some(ProfileSlot::Live(p)) = self.store.get(&c) else {
            return Vec::new();
        };
        if p.audience.due.is_some_and(|due| due <= now) {
            return Vec::new();
        }
        let defs = self.defs();
        let results = p.audience.evaluate(defs, &p.view(), now);
        defs.segments
            .iter()
            .filter(|s| p.audience.determined(defs, s))
            .filter(|s| {
                let member = matches!(results.get(&s.def.name), Some(Ok(true)));
                member != p.audience.members.contains_key(&s.def.name)
            })
            .map(|s| s.def.name.clone())
            .collect()
    }

    fn audience(&self, c: CustomerId) -> Audience {
        match self.store.get(&c) {
            Some(ProfileSlot::Live(p)) => p.audience.clone(),
            _ => Audience::default(),
        }
    }
}

fn resolved(customer: CustomerId, merges: Vec<Merge>, t: &Touchpoint) -> crate::ResolvedTouchpoint {
    crate::ResolvedTouchpoint {
        customer_id: customer,
        merges,
        touchpoint: t.clone(),
    }
}

fn merge(loser: CustomerId, survivor: CustomerId, at: UnixMillis, carrier: &Touchpoint) -> Merge {
    Merge {
        loser,
        survivor,
        at,
        cause: crate::identity::MergeCause {
            event_id: carrier.event_id(),
            identifier: crate::Identifier::new(crate::IdKind::Phone, "+84912345678"),
            rule: "phone".into(),
        },
    }
}

fn kinds(changes: &[(CustomerId, Change)]) -> Vec<(CustomerId, &str, ChangeKind)> {
    changes
        .iter()
        .map(|(c, ch)| (*c, ch.segment.as_str(), ch.kind))
        .collect()
}

#[test]
fn a_customer_enters_through_a_store_purchase_and_exits_when_the_window_expires() {
    let mut shop = Shop::new(shop());
    let c = CustomerId(Uuid::from_u128(7));
    let purchase = order(1, T0, Channel::Store, 1_200_000, "P2");
    let folded = shop.fold(&resolved(c, vec![], &purchase), T0 + 1_000);
    assert!(folded.timeline.is_some());
    assert_eq!(
        kinds(&folded.changes),
        [(c, "store_buyers", ChangeKind::Entered)]
    );
    assert_eq!(
        folded.changes[0].1.cause,
        Cause::Event {
            event_id: purchase.event_id()
        }
    );

    // The same event again changes nothing.
    let again = shop.fold(&resolved(c, vec![], &purchase), T0 + 2_000);
    assert_eq!(again, Folded::default());
    let defs = shop.defs().clone();
    assert_eq!(
        shop.audience(c).computed.values(&defs.traits, T0 + 2_000)["orders"],
        json!(1)
    );

    // The 7-day window lets the purchase go at exactly T0 + 7 days.
    let expiry = shop.audience(c).next_expiry(&defs).unwrap();
    assert_eq!(expiry, T0 + 7 * DAY);
    // What a store indexes the customer's timer by.
    assert_eq!(shop.audience(c).due, Some(expiry));
    assert!(shop.expire(c, expiry - 1).is_empty());
    let exits = shop.expire(c, expiry);
    assert_eq!(exits.len(), 1);
    assert_eq!(
        (exits[0].segment.as_str(), exits[0].kind, &exits[0].cause),
        (
            "store_buyers",
            ChangeKind::Exited,
            &Cause::Expiry { due: expiry }
        )
    );
    // The 30-day and 90-day windows still hold it.
    assert_eq!(shop.audience(c).next_expiry(&defs), Some(T0 + 30 * DAY));
    assert_eq!(shop.audience(c).due, Some(T0 + 30 * DAY));
}

#[test]
fn a_merge_of_two_half_qualifying_customers_makes_one_member_with_one_entered() {
    let mut shop = Shop::new(
        Definitions::new(
            shop_traits(),
            vec![seg("omni", "traits.views_7d >= 1 && traits.orders_7d >= 1")],
        )
        .unwrap(),
    );
    let (a, b) = (
        CustomerId(Uuid::from_u128(1)),
        CustomerId(Uuid::from_u128(2)),
    );
    let seen = view(1, T0, "P1");
    let bought = order(2, T0 + 1, Channel::Store, 300_000, "P1");
    assert!(
        shop.fold(&resolved(a, vec![], &seen), T0 + 10)
            .changes
            .is_empty()
    );
    assert!(
        shop.fold(&resolved(b, vec![], &bought), T0 + 10)
            .changes
            .is_empty()
    );

    let carrier = ev(3, T0 + 2, "Page Viewed", Channel::Web, json!({}));
    let folded = shop.fold(
        &resolved(b, vec![merge(b, a, T0 + 2, &carrier)], &carrier),
        T0 + 20,
    );
    assert_eq!(kinds(&folded.changes), [(a, "omni", ChangeKind::Entered)]);
    assert_eq!(folded.changes[0].1.cause, Cause::Merge { absorbed: b });
    assert!(matches!(shop.store.get(&b), Some(ProfileSlot::MergedInto(s)) if *s == a));

    // A redelivered record changes nothing.
    let again = shop.fold(&resolved(b, vec![], &bought), T0 + 30);
    assert_eq!(again, Folded::default());

    // The timer lets both events go after 7 days.
    let defs = shop.defs().clone();
    let at = shop.audience(a).next_expiry(&defs).unwrap();
    assert_eq!(at, T0 + 7 * DAY);
    let exits = shop.expire(a, at);
    assert_eq!(exits.len(), 1);
    assert_eq!(exits[0].cause, Cause::Expiry { due: at });
    assert_eq!(shop.audience(a).due, shop.audience(a).next_expiry(&defs));
    assert!(shop.audience(a).due > Some(at), "the next window's turn");
    assert!(shop.expire(b, at).is_empty(), "merged away");
}

#[test]
fn the_absorbed_customer_exits_everything_and_the_survivor_stays_without_a_new_entered() {
    let mut shop = Shop::new(shop());
    let (a, b) = (
        CustomerId(Uuid::from_u128(1)),
        CustomerId(Uuid::from_u128(2)),
    );
    let one = order(1, T0, Channel::Store, 3_500_000, "P1");
    let two = order(2, T0, Channel::Store, 3_600_000, "P1");
    let entered_a = shop.fold(&resolved(a, vec![], &one), T0).changes;
    let entered_b = shop.fold(&resolved(b, vec![], &two), T0).changes;
    assert_eq!(entered_a.len(), 3, "vip, store_buyers, fans: {entered_a:?}");
    assert_eq!(entered_b.len(), 3);
    let carrier = view(3, T0, "P1");
    let folded = shop.fold(
        &resolved(a, vec![merge(b, a, T0, &carrier)], &carrier),
        T0 + 1,
    );
    let exits: Vec<_> = folded.changes.iter().filter(|(c, _)| *c == b).collect();
    assert_eq!(exits.len(), 3);
    assert!(
        exits
            .iter()
            .all(|(_, c)| c.kind == ChangeKind::Exited
                && c.cause == Cause::MergedInto { survivor: a })
    );
    assert_eq!(
        folded.changes.len(),
        3,
        "no new entry for a: {:?}",
        folded.changes
    );
    let defs = shop.defs().clone();
    assert_eq!(
        shop.audience(a).computed.values(&defs.traits, T0 + 1)["spend_90d"],
        json!(7_100_000)
    );
}

#[test]
fn a_fold_without_definitions_leaves_the_audience_state_alone() {
    let mut shop = Shop::new(shop());
    let c = CustomerId(Uuid::from_u128(1));
    let entered = shop.fold(
        &resolved(c, vec![], &order(1, T0, Channel::Store, 3_500_000, "P1")),
        T0,
    );
    assert_eq!(entered.changes.len(), 3);
    let before = shop.audience(c);
    let mut blind = FoldOptions::default();
    blind.audiences.now = T0 + 1;
    let folded = fold_resolved(
        &mut shop.store,
        &resolved(c, vec![], &view(2, T0 + 1, "P2")),
        &blind,
    )
    .unwrap();
    assert!(folded.timeline.is_some());
    assert!(folded.changes.is_empty());
    assert_eq!(shop.audience(c), before);
    assert!(
        expire_audience(&mut shop.store, c, &blind)
            .unwrap()
            .is_empty()
    );
    // An empty set of definitions is a decision: every segment is exited.
    let none = FoldOptions {
        audiences: crate::profile::AudienceOptions::new(
            std::sync::Arc::new(Definitions::default()),
            T0 + 2,
        ),
        ..FoldOptions::default()
    };
    let exits = expire_audience(&mut shop.store, c, &none).unwrap();
    assert_eq!(exits.len(), 3);
    assert!(
        exits
            .iter()
            .all(|e| e.kind == ChangeKind::Exited && matches!(e.cause, Cause::Definition { .. }))
    );
    assert!(shop.audience(c).is_empty());
}

#[test]
fn without_definitions_the_profile_keeps_no_audience_state() {
    let mut options = FoldOptions::default();
    options.audiences.now = T0;
    let mut store: BTreeMap<CustomerId, ProfileSlot> = BTreeMap::new();
    let c = CustomerId(Uuid::from_u128(1));
    let folded = fold_resolved(
        &mut store,
        &resolved(c, vec![], &order(1, T0, Channel::Store, 1, "P1")),
        &options,
    )
    .unwrap();
    assert!(folded.changes.is_empty());
    let Some(ProfileSlot::Live(p)) = store.get(&c) else {
        panic!("no profile")
    };
    assert!(p.audience.is_empty());
    assert!(!serde_json::to_string(p).unwrap().contains("audience"));
}

#[test]
fn a_deleted_segment_exits_and_an_updated_trait_is_backfilled() {
    let defs = shop();
    let options = FoldOptions::default();
    let mut p = Profile::new(CustomerId(Uuid::from_u128(1)));
    let mut aud = Audience::default();
    aud.know_all(&defs);
    let e = order(1, T0, Channel::Store, 3_500_000, "P1");
    let applied = p.apply(&e, &options);
    aud.on_event(&defs, &p.view(), &e, applied, T0);
    assert!(aud.members.contains_key("vip"));

    let mut traits = shop_traits();
    traits[0].version = 2; // spend_90d updated: its state is refolded by the stage.
    let fewer =
        Definitions::new(traits, vec![seg("fans", "traits.top_product == \"P1\"")]).unwrap();
    let changes = aud.on_definitions(&fewer, &p.view(), T0 + 1);
    let exited: BTreeSet<_> = changes
        .iter()
        .filter(|c| c.kind == ChangeKind::Exited)
        .map(|c| c.segment.as_str())
        .collect();
    assert_eq!(exited, BTreeSet::from(["store_buyers", "vip"]));
    assert!(
        changes
            .iter()
            .all(|c| matches!(c.cause, Cause::Definition { .. }))
    );
    assert_eq!(aud.computed.value(&fewer.traits[0], T0 + 1), json!(0));
    // Until a backfill, the updated trait may miss past events.
    let unknown: Vec<&str> = aud
        .unknown(&fewer)
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(unknown, ["spend_90d"]);
    let changes = aud.backfill(&fewer, &p.view(), std::slice::from_ref(&e), T0 + 2);
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(
        aud.computed.value(&fewer.traits[0], T0 + 2),
        json!(3_500_000)
    );
    assert!(aud.unknown(&fewer).is_empty());
}

#[test]
fn a_segment_over_a_trait_defined_after_the_first_event_waits_for_its_backfill() {
    let options = FoldOptions::default();
    let mut p = Profile::new(CustomerId(Uuid::from_u128(1)));
    let mut aud = Audience::default();
    let before = Definitions::new(shop_traits(), vec![]).unwrap();
    aud.know_all(&before);
    let first = order(1, T0, Channel::Store, 300_000, "P1");
    let applied = p.apply(&first, &options);
    aud.on_event(&before, &p.view(), &first, applied, T0);

    // "No order at all" over a trait defined after the first order: the
    // customer's state has not seen that order, so the segment waits
    // instead of taking them in.
    let mut traits = shop_traits();
    traits.push(def(
        "orders_ever",
        Aggregate::Count,
        None,
        &["order_completed"],
        "all",
    ));
    let after = Definitions::new(
        traits,
        vec![
            seg("never_bought", "traits.orders_ever == 0"),
            seg("in_store", "\"store\" in profile.channels"),
        ],
    )
    .unwrap();
    let second = view(2, T0 + 1, "P2");
    let applied = p.apply(&second, &options);
    let changes = aud.on_event(&after, &p.view(), &second, applied, T0 + 1);
    let entered: Vec<&str> = changes.iter().map(|c| c.segment.as_str()).collect();
    assert_eq!(entered, ["in_store"], "a segment on known data only");
    assert!(!aud.members.contains_key("never_bought"));

    // The backfill folds both events: one order, so not a member.
    let changes = aud.backfill(&after, &p.view(), &[first, second], T0 + 2);
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(
        aud.computed.values(&after.traits, T0 + 2)["orders_ever"],
        json!(1)
    );
    assert!(aud.unknown(&after).is_empty());

    // A condition reading `traits` whole waits for every trait.
    let whole =
        Definitions::new(after.traits.to_vec(), vec![seg("any", "size(traits) > 0")]).unwrap();
    assert!(whole.segments[0].reads("orders_ever") && whole.segments[0].reads("views_7d"));
    let narrow = &after.segments[0];
    assert!(narrow.reads("orders_ever") && !narrow.reads("views_7d"));
}

#[test]
fn an_unknown_trait_makes_the_customer_due_at_once_and_its_timer_folds_the_past() {
    use crate::profile::{Refresh, refresh_audience};
    // An order before anything was defined.
    let mut shop = Shop::new(Definitions::default());
    let c = CustomerId(Uuid::from_u128(7));
    let first = order(1, T0, Channel::Store, 300_000, "P1");
    shop.fold(&resolved(c, vec![], &first), T0);

    let mut traits = vec![def(
        "orders_ever",
        Aggregate::Count,
        None,
        &["order_completed"],
        "all",
    )];
    traits.extend(shop_traits());
    shop.redefine(
        Definitions::new(traits, vec![seg("repeat", "traits.orders_ever >= 2")]).unwrap(),
    );
    let second = order(2, T0 + 1, Channel::Web, 100_000, "P2");
    let folded = shop.fold(&resolved(c, vec![], &second), T0 + 10);
    assert!(
        folded.changes.is_empty(),
        "the segment waits: {:?}",
        folded.changes
    );
    assert_eq!(shop.audience(c).due, Some(T0 + 10), "due at once");

    // The timer finds the trait unknown: it asks for the events, folds
    // them, and the customer enters (cause `definition`).
    let Some(ProfileSlot::Live(mut p)) = shop.store.get(&c).cloned() else {
        panic!("no profile");
    };
    shop.options.audiences.now = T0 + 11;
    let (changed, changes) = refresh_audience(&mut p, &shop.options, Refresh::Timer, |_| {
        Ok::<_, ()>(vec![first.clone(), second.clone()])
    })
    .unwrap();
    assert!(changed);
    assert_eq!(changes.len(), 1);
    assert_eq!(
        (
            changes[0].segment.as_str(),
            changes[0].kind,
            &changes[0].cause
        ),
        (
            "repeat",
            ChangeKind::Entered,
            &Cause::Definition { events: 2 }
        )
    );
    assert!(p.audience.unknown(shop.defs()).is_empty());
    assert_eq!(p.audience.due, p.audience.next_expiry(shop.defs()));

    // Known now: the next timer does not ask for events again.
    let (_, again) = refresh_audience(&mut p, &shop.options, Refresh::Timer, |_| {
        Err::<Vec<Touchpoint>, _>("asked for events again")
    })
    .unwrap();
    assert!(again.is_empty());
}

#[test]
fn an_older_definition_does_not_start_a_newer_state_over() {
    let mut newer = def(
        "orders",
        Aggregate::Count,
        None,
        &["order_completed"],
        "all",
    );
    newer.version = 2;
    let older = def(
        "orders",
        Aggregate::Count,
        None,
        &["order_completed"],
        "all",
    );
    let mut computed = Computed::default();
    computed.fold(
        std::slice::from_ref(&newer),
        &order(1, T0, Channel::Store, 1, "P1"),
    );
    // A process still on version 1 folds the next order: the version-2
    // state is neither started over nor counted into (the behind process
    // leaves it to the definitions it does not know yet).
    computed.fold(
        std::slice::from_ref(&older),
        &order(2, T0, Channel::Store, 1, "P1"),
    );
    assert_eq!(computed.value(&newer, T0), json!(1));
    let mut aud = Audience::default();
    aud.known.insert("orders".into(), 2);
    let behind = Definitions::new(vec![older], vec![]).unwrap();
    assert!(
        aud.unknown(&behind).is_empty(),
        "not the behind process's to fold"
    );

    // Through the audience: the event the behind process folded is missing
    // from the version-2 state, which is no longer known, so the process
    // ahead folds it again.
    aud.computed = computed;
    let p = Profile::new(CustomerId(Uuid::from_u128(1)));
    let e = order(3, T0, Channel::Store, 1, "P1");
    aud.on_event(&behind, &p.view(), &e, true, T0);
    let ahead = Definitions::new(vec![newer], vec![]).unwrap();
    assert_eq!(aud.unknown(&ahead).len(), 1);
}

#[test]
fn state_round_trips_through_json() {
    let defs = shop();
    let options = FoldOptions::default();
    let mut p = Profile::new(CustomerId(Uuid::from_u128(1)));
    let mut aud = Audience::default();
    for e in [
        order(1, T0, Channel::Store, 3_500_000, "P1"),
        view(2, T0 + 1, "P2"),
        order(3, T0 + 2, Channel::Web, 100_000, "P3"),
    ] {
        let applied = p.apply(&e, &options);
        aud.on_event(&defs, &p.view(), &e, applied, T0 + 3);
    }
    let json = serde_json::to_string(&aud).unwrap();
    let back: Audience = serde_json::from_str(&json).unwrap();
    assert_eq!(back, aud);
    assert_eq!(
        back.computed.values(&defs.traits, T0 + 3),
        aud.computed.values(&defs.traits, T0 + 3)
    );
}

#[test]
fn distinct_values_keep_the_smallest_whatever_the_order() {
    let t = def("ids", Aggregate::UniqueCount, Some("sku"), &[], "all");
    let defs = vec![t];
    let events: Vec<_> = (0..(computed::MAX_DISTINCT as u128 + 50))
        .map(|i| ev(i, T0, "x", Channel::Web, json!({"sku": format!("S{i:05}")})))
        .collect();
    let mut forward = Computed::default();
    let mut backward = Computed::default();
    for e in &events {
        forward.fold(&defs, e);
    }
    for e in events.iter().rev() {
        backward.fold(&defs, e);
    }
    assert_eq!(forward, backward);
    assert_eq!(forward.value(&defs[0], T0), json!(computed::MAX_DISTINCT));
}

// ---------------------------------------------------------------------
// Incremental memberships equal the reference under any event order,
// duplicates, merges at any point and expiries at any time.

#[derive(Debug, Clone)]
struct Gen {
    customer: usize,
    day: i64,
    kind: u8,
    revenue: i64,
    product: u8,
    channel: u8,
}

fn gen_event() -> impl Strategy<Value = Gen> {
    (0..3usize, 0..40i64, 0..3u8, 1..40i64, 0..5u8, 0..3u8).prop_map(
        |(customer, day, kind, revenue, product, channel)| Gen {
            customer,
            day,
            kind,
            revenue,
            product,
            channel,
        },
    )
}

fn touchpoint(i: usize, g: &Gen) -> Touchpoint {
    let at = T0 + g.day * DAY + i64::try_from(i).unwrap_or(0);
    let channel = [Channel::Web, Channel::Store, Channel::App][usize::from(g.channel)];
    let product = format!("P{}", g.product);
    let n = u128::try_from(i).unwrap_or(0) + 1;
    match g.kind {
        0 => order(n, at, channel, g.revenue * 100_000, &product),
        1 => view(n, at, &product),
        _ => ev(n, at, "Page Viewed", channel, json!({"path": "/"})),
    }
}

/// One step of a schedule.
#[derive(Debug, Clone)]
enum Step {
    Event(usize),
    /// The event at that index delivered again.
    Again(usize),
    /// Customer `loser` merged into `survivor`, carried by a new event.
    Merge(usize, usize),
    Expire,
    /// The full definitions replace the early ones.
    Redefine,
    /// Every customer backfilled.
    Backfill,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn incremental_memberships_equal_the_reference(
        events in prop::collection::vec(gen_event(), 1..30),
        order_seed in prop::collection::vec(any::<u32>(), 30),
        merges in prop::collection::vec((0..3usize, 0..3usize, 0..40usize), 0..3),
        expiries in prop::collection::vec(0..40usize, 0..4),
        again in prop::collection::vec(0..30usize, 0..4),
        redefine in proptest::option::of(0..40usize),
        backfills in prop::collection::vec(0..40usize, 0..2),
    ) {
        // The shop's, and segments a customer without any event is a
        // member of (its first event may leave them).
        let mut segments: Vec<SegmentDef> = shop().segments.iter().map(|s| s.def.clone()).collect();
        segments.push(seg("never_ordered", "traits.orders == 0"));
        segments.push(seg("no_profile_orders", "profile.orders_count == 0 && size(profile.channels) < 2"));
        let defs = Definitions::new(shop_traits(), segments).unwrap();
        // Some schedules start with fewer definitions, and get the full
        // ones part way through (customers with events by then wait for a
        // backfill).
        let early = Definitions::new(defs.traits[..2].to_vec(), vec![]).unwrap();
        let mut shop = Shop::new(if redefine.is_some() { early } else { defs.clone() });
        let mut tps: Vec<Touchpoint> = events.iter().enumerate().map(|(i, g)| touchpoint(i, g)).collect();
        let mut owner: Vec<usize> = events.iter().map(|g| g.customer).collect();
        // Any arrival order.
        let mut arrival: Vec<usize> = (0..tps.len()).collect();
        arrival.sort_by_key(|i| order_seed[*i % order_seed.len()].wrapping_mul(u32::try_from(*i).unwrap_or(0) + 1));
        let mut steps: Vec<Step> = arrival.iter().map(|i| Step::Event(*i)).collect();
        for (a, b, at) in &merges {
            if a != b {
                steps.insert((*at).min(steps.len()), Step::Merge(*a, *b));
            }
        }
        for at in &expiries {
            steps.insert((*at).min(steps.len()), Step::Expire);
        }
        if let Some(at) = redefine {
            steps.insert(at.min(steps.len()), Step::Redefine);
        }
        for at in &backfills {
            steps.insert((*at).min(steps.len()), Step::Backfill);
        }
        for i in &again {
            if *i < tps.len() {
                // Re-delivered after it was first delivered.
                let first = steps.iter().position(|s| matches!(s, Step::Event(j) if j == i)).unwrap_or(0);
                steps.insert(first + 1, Step::Again(*i));
            }
        }

        let ids: Vec<CustomerId> = (0..3).map(|i| CustomerId(Uuid::from_u128(100 + i))).collect();
        let mut root: Vec<usize> = (0..3).collect();
        let find = |root: &Vec<usize>, mut c: usize| { while root[c] != c { c = root[c]; } c };
        let mut log: Vec<(CustomerId, Change)> = Vec::new();
        // Processing time: a day per step, whatever the events' own times.
        let mut now = T0;
        for step in &steps {
            now += DAY;
            match step {
                Step::Event(i) | Step::Again(i) => {
                    let folded = shop.fold(&resolved(ids[owner[*i]], vec![], &tps[*i]), now);
                    prop_assert_eq!(folded.timeline.is_some(), matches!(step, Step::Event(_)));
                    log.extend(folded.changes);
                    let c = ids[find(&root, owner[*i])];
                    prop_assert_eq!(shop.out_of_line(c, now), Vec::<String>::new());
                }
                Step::Merge(loser, survivor) => {
                    let (l, s) = (find(&root, *loser), find(&root, *survivor));
                    if l == s { continue; }
                    root[l] = s;
                    let carrier = ev(1_000 + tps.len() as u128, now, "Page Viewed", Channel::App, json!({}));
                    let r = resolved(ids[l], vec![merge(ids[l], ids[s], now, &carrier)], &carrier);
                    log.extend(shop.fold(&r, now).changes);
                    tps.push(carrier);
                    owner.push(l);
                }
                Step::Expire => {
                    for id in &ids {
                        log.extend(shop.expire(*id, now).into_iter().map(|c| (*id, c)));
                        prop_assert_eq!(shop.out_of_line(*id, now), Vec::<String>::new());
                    }
                }
                Step::Redefine => shop.redefine(defs.clone()),
                Step::Backfill => {
                    for id in &ids {
                        log.extend(shop.backfill(*id, &tps, now).into_iter().map(|c| (*id, c)));
                    }
                }
            }
        }
        // A last backfill and a last timer at the end.
        now += DAY;
        shop.redefine(defs.clone());
        for id in &ids {
            log.extend(shop.backfill(*id, &tps, now).into_iter().map(|c| (*id, c)));
            log.extend(shop.expire(*id, now).into_iter().map(|c| (*id, c)));
        }

        let options = FoldOptions::default();
        for (c, &id) in ids.iter().enumerate() {
            if find(&root, c) != c {
                continue;
            }
            let mine: Vec<Touchpoint> = (0..tps.len())
                .filter(|i| find(&root, owner[*i]) == c)
                .map(|i| tps[i].clone())
                .collect();
            if mine.is_empty() {
                // Without an event there is no customer (nor a profile).
                continue;
            }
            let want = reference(&defs, id, &mine, &options, now);
            let have = shop.audience(id);
            prop_assert_eq!(&have.computed.values(&defs.traits, now), &want.traits);
            let members: BTreeSet<String> = have.members.keys().cloned().collect();
            prop_assert_eq!(&members, &want.members);
            // The timer a store indexes is the next expiry of the state.
            prop_assert_eq!(have.due, have.next_expiry(&defs));
        }

        // The change records alone say who is in what: entries and exits
        // alternate, starting with an entry, and end where the state is.
        let mut member: BTreeMap<(CustomerId, String), bool> = BTreeMap::new();
        for (c, ch) in &log {
            let was = member.insert((*c, ch.segment.clone()), ch.kind == ChangeKind::Entered).unwrap_or(false);
            prop_assert_eq!(was, ch.kind == ChangeKind::Exited, "{:?} for customer {}", ch, c);
        }
        for id in &ids {
            let from_log: BTreeSet<String> = member.iter()
                .filter(|((cc, _), m)| cc == id && **m)
                .map(|((_, s), _)| s.clone())
                .collect();
            let state: BTreeSet<String> = shop.audience(*id).members.keys().cloned().collect();
            prop_assert_eq!(from_log, state);
        }
    }
}

#[test]
fn window_entries_and_memberships_are_stored_as_lists_and_read_in_either_form() {
    let entry = computed::Entry {
        at: T0,
        event: EventId(Uuid::from_u128(9)),
        values: vec![json!(125_000)],
    };
    let stored = serde_json::to_value(&entry).unwrap();
    assert_eq!(
        stored,
        json!([T0, "00000000-0000-0000-0000-000000000009", [125_000]])
    );
    let count = computed::Entry {
        values: vec![],
        ..entry.clone()
    };
    assert_eq!(
        serde_json::to_value(&count).unwrap(),
        json!([T0, "00000000-0000-0000-0000-000000000009"])
    );
    // Rows written before keep reading.
    let old: computed::Entry = serde_json::from_value(json!({
        "at": T0, "event": "00000000-0000-0000-0000-000000000009", "values": [125_000]
    }))
    .unwrap();
    assert_eq!(old, entry);
    let old: computed::Entry = serde_json::from_value(json!({
        "at": T0, "event": "00000000-0000-0000-0000-000000000009"
    }))
    .unwrap();
    assert_eq!(old, count);
    for form in [stored, serde_json::to_value(&count).unwrap()] {
        let back: computed::Entry = serde_json::from_value(form.clone()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), form);
    }

    let member = Member {
        version: 3,
        since: T0,
    };
    assert_eq!(serde_json::to_value(&member).unwrap(), json!([3, T0]));
    let old: Member = serde_json::from_value(json!({"version": 3, "since": T0})).unwrap();
    assert_eq!(old, member);
    let back: Member = serde_json::from_value(json!([3, T0])).unwrap();
    assert_eq!(back, member);
    // A malformed row is an error, not a default.
    assert!(serde_json::from_value::<Member>(json!([3])).is_err());
    assert!(serde_json::from_value::<computed::Entry>(json!([T0])).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// A unique list or count over a window keeps each value on its newest
    /// event only: its values at any instant are those of every event in
    /// the window, whatever the order events came in, with merges and
    /// re-deliveries, and from a state a build kept whole.
    #[test]
    fn windowed_unique_values_equal_those_of_every_event_in_the_window(
        events in prop::collection::vec((0..20i64, 0..6u8, 0..3u8, any::<bool>()), 1..40),
        split in 0..40usize,
        reads in prop::collection::vec(0..30i64, 1..6),
    ) {
        let list = def("seen_5d", Aggregate::UniqueList, Some("sku"), &[], "5d");
        let count = def("seen_count_5d", Aggregate::UniqueCount, Some("sku"), &[], "5d");
        let defs = vec![list.clone(), count.clone()];
        let tps: Vec<Touchpoint> = events
            .iter()
            .enumerate()
            .map(|(i, (day, sku, extra, number))| {
                // Text and numbers that read the same are one value; some
                // events carry two values, some none.
                let first = if *number { json!(u64::from(*sku)) } else { json!(sku.to_string()) };
                let props = match extra {
                    0 => json!({"sku": first}),
                    1 => json!({"sku": [first, format!("x{sku}")]}),
                    _ => json!({"other": 1}),
                };
                ev(i as u128 + 1, T0 + day * DAY + i as i64, "x", Channel::Web, props)
            })
            .collect();
        // Two customers folding parts in opposite orders, then merged, and
        // some events delivered twice.
        let (a_part, b_part) = tps.split_at(split.min(tps.len()));
        let mut a = Computed::default();
        for t in a_part.iter().rev() {
            a.fold(&defs, t);
        }
        let mut b = Computed::default();
        for t in b_part {
            b.fold(&defs, t);
        }
        a.absorb(b);
        for t in tps.iter().step_by(3) {
            // The profile folds an event once; a state merged twice must
            // still count it once.
            let mut again = Computed::default();
            again.fold(&defs, t);
            a.absorb(again);
        }
        for read in reads {
            let now = T0 + read * DAY;
            let mut want: BTreeSet<String> = BTreeSet::new();
            for (t, (_, sku, extra, _)) in tps.iter().zip(&events) {
                if t.envelope.occurred_at + 5 * DAY > now {
                    match extra {
                        0 => { want.insert(sku.to_string()); }
                        1 => { want.insert(sku.to_string()); want.insert(format!("x{sku}")); }
                        _ => {}
                    }
                }
            }
            let want_list: Vec<Value> = want.iter().map(|s| json!(s)).collect();
            prop_assert_eq!(a.value(&list, now), Value::Array(want_list));
            prop_assert_eq!(a.value(&count, now), json!(want.len()));
            // No more than one entry per value.
            let entries = a.traits["seen_5d"].entries.len();
            prop_assert!(entries <= 12, "{} entries", entries);
        }
        // A state an earlier build kept whole (every event) is compacted
        // on its next event, with the same values.
        let mut whole = Computed::default();
        for t in &tps {
            let mut one = Computed::default();
            one.fold(&defs, t);
            if let Some(mut s) = one.traits.remove("seen_5d") {
                s.latest = false;
                let kept = whole.traits.entry("seen_5d".into()).or_insert_with(|| computed::TraitState { version: 1, ..computed::TraitState::default() });
                kept.entries.extend(s.entries);
            }
        }
        if let Some(s) = whole.traits.get_mut("seen_5d") {
            s.entries.sort_by_key(|e| (e.at, e.event));
        }
        let late = ev(10_000, T0, "x", Channel::Web, json!({"other": 1}));
        let marker = ev(10_001, T0 - DAY, "x", Channel::Web, json!({"sku": "zz"}));
        whole.fold(std::slice::from_ref(&list), &late);
        whole.fold(std::slice::from_ref(&list), &marker);
        prop_assert!(whole.traits["seen_5d"].latest);
        let mut fresh = Computed::default();
        for t in tps.iter().chain([&marker]) {
            fresh.fold(std::slice::from_ref(&list), t);
        }
        for read in 0..30 {
            let now = T0 + read * DAY;
            prop_assert_eq!(whole.value(&list, now), fresh.value(&list, now));
        }
    }
}

#[test]
fn a_merge_settled_without_evaluation_makes_the_next_event_evaluate_every_segment() {
    let defs = shop();
    let options = FoldOptions::default();
    let fold = |p: &mut Profile, e: &Touchpoint, now: UnixMillis| {
        let first = p.applied.is_empty();
        assert!(p.apply(e, &options));
        let view = p.view();
        if first {
            p.audience.on_first_event(&defs, &view, e, now)
        } else {
            p.audience.on_event(&defs, &view, e, true, now)
        }
    };
    let mut survivor = Profile::new(CustomerId(Uuid::from_u128(1)));
    fold(&mut survivor, &view(1, T0, "P1"), T0 + 1);
    let mut absorbed = Profile::new(CustomerId(Uuid::from_u128(2)));
    fold(
        &mut absorbed,
        &order(2, T0, Channel::Web, 3_500_000, "P2"),
        T0 + 1,
    );
    assert!(absorbed.audience.members.contains_key("vip"));
    assert!(!survivor.audience.members.contains_key("vip"));
    // A store settles the merge (or a fold without definitions makes it):
    // the traits add up with no evaluation.
    survivor.absorb(absorbed);
    // The next event changes no trait `vip` reads: it is evaluated all the same.
    fold(&mut survivor, &view(3, T0 + 2, "P1"), T0 + 3);
    assert!(survivor.audience.members.contains_key("vip"));
}

#[test]
fn a_unique_window_kept_whole_takes_in_one_kept_per_value_without_losing_values() {
    let t = def("skus_7d", Aggregate::UniqueList, Some("sku"), &[], "7d");
    let defs = vec![t.clone()];
    let both = ev(1, T0, "x", Channel::Web, json!({"sku": ["a", "b"]}));
    let mut theirs = Computed::default();
    theirs.fold(&defs, &both);
    assert!(theirs.traits["skus_7d"].latest);
    // Ours as an earlier build kept it: every event whole.
    let mut ours = Computed::default();
    ours.traits.insert(
        "skus_7d".into(),
        computed::TraitState {
            version: 1,
            entries: vec![computed::Entry {
                at: T0 - 1,
                event: EventId(Uuid::from_u128(2)),
                values: vec![json!("c"), json!("a")],
            }],
            ..computed::TraitState::default()
        },
    );
    ours.absorb(theirs);
    assert_eq!(ours.value(&t, T0 + 1), json!(["a", "b", "c"]));
    assert!(ours.traits["skus_7d"].latest);
    assert_eq!(ours.traits["skus_7d"].entries.len(), 3);
}
