//! The definitions an analyst at a Vietnamese omnichannel fashion retailer
//! would save over the events [`super::generate`] sends (product views on
//! the web, cart adds in the app, orders at the store POS with a `total` in
//! VND and their `products`, refunds and tickets at the hotline, Zalo
//! chats, loyalty points, email surveys): 20 computed traits, 50 segments
//! and a probe of each (points redeemed, an event the population never
//! sends). `cdp-bench --audiences` saves them through `AudienceService`;
//! the `bench-audience` example folds the population with them in memory.

use std::str::FromStr;

use serde_json::Value;

use crate::Channel;
use crate::audience::{
    Aggregate, Condition, DefinitionError, Definitions, EventFilter, Op, SegmentDef, TraitDef,
    Window,
};

/// A computed trait as an analyst would save it.
#[derive(Clone, Copy)]
pub struct Trait {
    pub name: &'static str,
    pub aggregate: &'static str,
    /// Empty for `count`.
    pub property: &'static str,
    pub types: &'static [&'static str],
    pub channels: &'static [&'static str],
    /// `(property, op, value as JSON)`, all must hold.
    pub conditions: &'static [(&'static str, &'static str, &'static str)],
    pub window: &'static str,
}

pub const fn count(
    name: &'static str,
    types: &'static [&'static str],
    channels: &'static [&'static str],
    window: &'static str,
) -> Trait {
    Trait {
        name,
        aggregate: "count",
        property: "",
        types,
        channels,
        conditions: &[],
        window,
    }
}

pub const fn of(
    name: &'static str,
    aggregate: &'static str,
    property: &'static str,
    types: &'static [&'static str],
    window: &'static str,
) -> Trait {
    Trait {
        name,
        aggregate,
        property,
        types,
        channels: &[],
        conditions: &[],
        window,
    }
}

impl Trait {
    pub const fn when(
        self,
        conditions: &'static [(&'static str, &'static str, &'static str)],
    ) -> Self {
        Trait { conditions, ..self }
    }
}

pub const ORDER: &[&str] = &["Order Completed"];
pub const VIEW: &[&str] = &["Product Viewed"];
pub const INTEREST: &[&str] = &["Product Viewed", "Product Added"];

/// The analyst's computed traits (the population's events span the last 30
/// days, so 7d, 30d, 90d and all-time windows each keep a different share).
pub const TRAITS: [Trait; 20] = [
    count("orders_7d", ORDER, &[], "7d"),
    count("orders_30d", ORDER, &[], "30d"),
    count("orders_all", ORDER, &[], "all"),
    of("spend_30d", "sum", "total", ORDER, "30d"),
    of("spend_90d", "sum", "total", ORDER, "90d"),
    of("avg_order_90d", "avg", "total", ORDER, "90d"),
    of("max_order_all", "max", "total", ORDER, "all"),
    count("big_orders_90d", ORDER, &[], "90d").when(&[("total", "gte", "1000000")]),
    count("refunds_90d", &["Order Refunded"], &["call_center"], "90d"),
    count("web_views_7d", VIEW, &["web"], "7d"),
    count("web_views_30d", VIEW, &["web"], "30d"),
    count("app_adds_30d", &["Product Added"], &["app"], "30d"),
    // Jeans and shoes: the two items above 500,000 VND.
    count("premium_interest_30d", INTEREST, &[], "30d").when(&[(
        "product_id",
        "in",
        r#"["SKU-QU-02","SKU-GI-03"]"#,
    )]),
    of("top_viewed_30d", "most_frequent", "product_id", VIEW, "30d"),
    of(
        "top_bought_all",
        "most_frequent",
        "products.product_id",
        ORDER,
        "all",
    ),
    of(
        "products_seen_90d",
        "unique_count",
        "product_id",
        INTEREST,
        "90d",
    ),
    of("channels_30d", "unique_count", "$channel", &[], "30d"),
    count("tickets_30d", &["Ticket Opened"], &["call_center"], "30d"),
    count("zalo_messages_7d", &["Message Received"], &["chat"], "7d"),
    Trait {
        channels: &["store"],
        ..of("points_90d", "sum", "points", &["Points Earned"], "90d")
    },
];

/// The analyst's segments: `(name, condition)`.
pub const SEGMENTS: [(&str, &str); 50] = [
    ("buyers_7d", "traits.orders_7d >= 1"),
    ("buyers_30d", "traits.orders_30d >= 1"),
    ("repeat_buyers_30d", "traits.orders_30d >= 2"),
    ("ever_bought", "traits.orders_all >= 1"),
    ("never_bought", "traits.orders_all == 0"),
    (
        "lapsed_buyers",
        "traits.orders_all >= 1 && traits.orders_30d == 0",
    ),
    ("vip_90d", "traits.spend_90d >= 5000000"),
    ("high_spend_30d", "traits.spend_30d >= 2000000"),
    (
        "mid_spend_30d",
        "traits.spend_30d >= 1000000 && traits.spend_30d < 2000000",
    ),
    (
        "low_spend_30d",
        "traits.spend_30d > 0 && traits.spend_30d < 1000000",
    ),
    (
        "high_aov_90d",
        "traits.avg_order_90d != null && traits.avg_order_90d >= 1500000",
    ),
    ("big_ticket_90d", "traits.big_orders_90d >= 1"),
    (
        "order_over_2m",
        "traits.max_order_all != null && traits.max_order_all >= 2000000",
    ),
    ("refunders_90d", "traits.refunds_90d >= 1"),
    ("serial_refunders_90d", "traits.refunds_90d >= 2"),
    (
        "refund_churn_risk",
        "traits.refunds_90d >= 1 && traits.orders_30d == 0",
    ),
    (
        "browsed_no_order_7d",
        "traits.web_views_7d >= 1 && traits.orders_7d == 0",
    ),
    (
        "window_shoppers_30d",
        "traits.web_views_30d >= 2 && traits.orders_30d == 0",
    ),
    ("engaged_browsers_7d", "traits.web_views_7d >= 2"),
    (
        "app_cart_abandoners_30d",
        "traits.app_adds_30d >= 1 && traits.orders_30d == 0",
    ),
    ("app_shoppers_30d", "traits.app_adds_30d >= 1"),
    ("cart_open", "profile.cart_items > 0"),
    (
        "cart_abandoners",
        "profile.cart_items > 0 && traits.orders_7d == 0",
    ),
    ("premium_interest_30d", "traits.premium_interest_30d >= 1"),
    (
        "premium_prospects",
        "traits.premium_interest_30d >= 1 && traits.orders_all == 0",
    ),
    (
        "shoe_fans",
        r#"traits.top_viewed_30d == "SKU-GI-03" || traits.top_bought_all == "SKU-GI-03""#,
    ),
    (
        "jeans_fans",
        r#"traits.top_viewed_30d == "SKU-QU-02" || traits.top_bought_all == "SKU-QU-02""#,
    ),
    (
        "tee_fans",
        r#"traits.top_viewed_30d == "SKU-AO-01" || traits.top_bought_all == "SKU-AO-01""#,
    ),
    ("broad_browsers_90d", "traits.products_seen_90d >= 2"),
    ("whole_range_90d", "traits.products_seen_90d >= 3"),
    ("omnichannel_30d", "traits.channels_30d >= 3"),
    ("multichannel_30d", "traits.channels_30d >= 2"),
    ("single_channel_30d", "traits.channels_30d == 1"),
    (
        "store_buyers_7d",
        r#"traits.orders_7d >= 1 && "store" in profile.channels"#,
    ),
    (
        "web_and_store",
        r#""web" in profile.channels && "store" in profile.channels"#,
    ),
    ("app_users", r#""app" in profile.channels"#),
    ("zalo_chatters_7d", "traits.zalo_messages_7d >= 1"),
    (
        "zalo_buyers_30d",
        "traits.zalo_messages_7d >= 1 && traits.orders_30d >= 1",
    ),
    ("hotline_callers_30d", "traits.tickets_30d >= 1"),
    ("open_tickets", "profile.open_tickets > 0"),
    (
        "detractors",
        "profile.last_feedback_rating != null && profile.last_feedback_rating <= 2",
    ),
    (
        "promoters",
        "profile.last_feedback_rating != null && profile.last_feedback_rating >= 4",
    ),
    ("survey_reachable", r#""email" in profile.channels"#),
    ("loyalty_active_90d", "traits.points_90d >= 1"),
    ("loyalty_high_90d", "traits.points_90d >= 300"),
    ("points_balance_500", "profile.loyalty_points >= 500"),
    ("stage_act", r#"profile.journey_stage == "act""#),
    ("stage_advocate", r#"profile.journey_stage == "advocate""#),
    (
        "considering",
        r#"profile.journey_stage in ["appeal", "ask"]"#,
    ),
    (
        "win_back_7d",
        "traits.orders_all >= 1 && traits.orders_7d == 0 && traits.web_views_7d >= 1",
    ),
];

/// The probe of membership freshness: points redeemed at a store, which the
/// population never sends, so one sample event makes its customer enter.
pub const PROBE_TRAIT: Trait = count(
    "points_redeemed_all",
    &["Points Redeemed"],
    &["store"],
    "all",
);
pub const PROBE_SEGMENT: (&str, &str) = ("redeemers", "traits.points_redeemed_all >= 1");

impl Trait {
    /// The domain's definition (version 1).
    pub fn to_def(&self) -> Result<TraitDef, DefinitionError> {
        let bad = |field: &str, reason: String| DefinitionError {
            field: format!("{}.{field}", self.name),
            reason,
        };
        let quoted = |s: &str| Value::String(s.to_owned());
        Ok(TraitDef {
            name: self.name.to_owned(),
            version: 1,
            aggregate: Aggregate::from_str(self.aggregate).map_err(|e| bad("aggregate", e))?,
            property: (!self.property.is_empty()).then(|| self.property.to_owned()),
            filter: EventFilter {
                types: self.types.iter().map(|t| (*t).to_owned()).collect(),
                channels: self
                    .channels
                    .iter()
                    .map(|c| Channel::from_str(c).map_err(|e| bad("channels", e)))
                    .collect::<Result<_, _>>()?,
                conditions: self
                    .conditions
                    .iter()
                    .map(|(property, op, value)| {
                        Ok(Condition {
                            property: (*property).to_owned(),
                            op: serde_json::from_value::<Op>(quoted(op))
                                .map_err(|e| bad("op", e.to_string()))?,
                            value: serde_json::from_str(value)
                                .map_err(|e| bad("value", e.to_string()))?,
                        })
                    })
                    .collect::<Result<_, DefinitionError>>()?,
            },
            window: Window::from_str(self.window).map_err(|e| bad("window", e))?,
        })
    }
}

/// The 20 traits and 50 segments, with the probes when `probe`, checked
/// together as the registry would (version 1 each).
pub fn definitions(probe: bool) -> Result<Definitions, DefinitionError> {
    let probes = probe.then_some(()).into_iter();
    let traits = TRAITS
        .iter()
        .chain(probes.clone().map(|()| &PROBE_TRAIT))
        .map(Trait::to_def)
        .collect::<Result<Vec<_>, _>>()?;
    let segments = SEGMENTS
        .iter()
        .chain(probes.map(|()| &PROBE_SEGMENT))
        .map(|(name, condition)| SegmentDef {
            name: (*name).to_owned(),
            version: 1,
            condition: (*condition).to_owned(),
            description: String::new(),
        })
        .collect();
    Definitions::new(traits, segments)
}

/// The bench's population of `customers` (1 to 4 events each over the 29
/// days before `now`), validated and resolved in memory as the identity
/// worker would (fragments of a person merge when an event links them):
/// what a profile worker folds. Returns the records and how many merges
/// they carry.
pub fn resolved_population(
    seed: u64,
    customers: usize,
    now: crate::UnixMillis,
) -> Result<(Vec<crate::ResolvedTouchpoint>, usize), String> {
    use crate::identity::{self, MemoryGraph, Resolution};
    let config = super::JourneyConfig {
        customers,
        min_events: 1,
        max_events: 4,
        namespace: format!("a{seed}"),
        start: now - 30 * 86_400_000,
        span_ms: 29 * 86_400_000,
    };
    let (_, generated) = super::generate(seed, &config);
    let (rules, limits) = (
        crate::IdentityRules::default(),
        crate::ValidationLimits::default(),
    );
    let mut graph = MemoryGraph::new();
    let (mut resolved, mut merges) = (Vec::with_capacity(generated.len()), 0);
    for (i, g) in generated.iter().enumerate() {
        let ctx = crate::Context {
            now,
            fresh_event_id: uuid::Uuid::from_u64_pair(seed, i as u64),
        };
        let touchpoint = crate::validate(&g.event, &rules, &limits, ctx)
            .map_err(|r| format!("a generated event was refused: {r:?}"))?;
        let resolution =
            identity::resolve(&mut graph, &rules, &touchpoint).map_err(|e| e.to_string())?;
        if let Resolution::Resolved(d) = resolution {
            merges += d.merges.len();
            resolved.push(crate::ResolvedTouchpoint {
                customer_id: d.customer_id,
                merges: d.merges,
                touchpoint,
            });
        }
    }
    Ok((resolved, merges))
}
