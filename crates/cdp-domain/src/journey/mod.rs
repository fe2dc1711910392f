//! A generator of omnichannel journeys with ground truth, for property
//! tests, end-to-end tests and benchmarks. Deterministic for a seed.

pub mod audiences;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::event::{Attributes, RawIdentifier, RawTouchpoint, UnixMillis};

#[derive(Debug, Clone)]
pub struct JourneyConfig {
    pub customers: usize,
    pub min_events: usize,
    pub max_events: usize,
    /// Prefix that keeps identifiers of different runs apart.
    pub namespace: String,
    /// Events happen within `[start, start + span_ms)`.
    pub start: UnixMillis,
    pub span_ms: i64,
}

impl Default for JourneyConfig {
    fn default() -> Self {
        JourneyConfig {
            customers: 20,
            min_events: 3,
            max_events: 15,
            namespace: "gen".into(),
            start: 1_760_000_000_000,
            span_ms: 30 * 86_400_000,
        }
    }
}

/// A generated person and the identifiers they use.
#[derive(Debug, Clone)]
pub struct Person {
    pub index: usize,
    /// Family, middle and given name, with their diacritics.
    pub name: String,
    pub email: String,
    pub phone_digits: String,
    pub anonymous_id: String,
    pub device_id: String,
    pub zalo_id: String,
    pub loyalty_id: String,
}

/// An event with the person it truly belongs to.
#[derive(Debug, Clone)]
pub struct GeneratedEvent {
    pub person: usize,
    pub event: RawTouchpoint,
}

fn attrs(v: Value) -> Attributes {
    match v {
        Value::Object(m) => m,
        _ => Attributes::new(),
    }
}

/// Family names, middle names and given names as Vietnamese shops see them.
const FAMILY: [&str; 16] = [
    "Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng", "Bùi", "Đỗ",
    "Hồ", "Ngô", "Dương", "Lý",
];
const MIDDLE: [&str; 10] = [
    "Văn", "Thị", "Minh", "Thanh", "Ngọc", "Đức", "Hữu", "Thu", "Quốc", "Gia",
];
const GIVEN: [&str; 32] = [
    "An", "Anh", "Bình", "Châu", "Dũng", "Giang", "Hà", "Hải", "Hạnh", "Hoa", "Hùng", "Hương",
    "Khánh", "Lan", "Linh", "Long", "Mai", "Minh", "Nam", "Ngọc", "Phúc", "Phương", "Quân",
    "Quang", "Sơn", "Tâm", "Thảo", "Trang", "Tuấn", "Vy", "Yến", "Đức",
];
const MAIL_DOMAINS: [&str; 6] = [
    "gmail.com",
    "yahoo.com",
    "outlook.com",
    "icloud.com",
    "hotmail.com",
    "fpt.vn",
];
/// The two digits after the national `0` of Vietnamese mobile numbers.
const MOBILE_PREFIXES: [&str; 30] = [
    "32", "33", "34", "35", "36", "37", "38", "39", "70", "76", "77", "78", "79", "81", "82", "83",
    "84", "85", "86", "87", "88", "90", "91", "92", "93", "94", "95", "96", "97", "98",
];

fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from.choose(rng).copied().unwrap_or("")
}

impl Person {
    /// A person whose identifiers look like a real shop's: names from the
    /// usual lists, mailboxes at the usual providers, random device, Zalo
    /// and loyalty numbers. Nothing starts with the namespace, so the
    /// identifiers of a batch are spread over every key range as a real
    /// population's are (the namespace and index keep emails unique).
    fn new(rng: &mut StdRng, ns: &str, index: usize) -> Self {
        let (family, middle, given) = (pick(rng, &FAMILY), pick(rng, &MIDDLE), pick(rng, &GIVEN));
        let ascii = |s: &str| crate::search::fold_text(s).replace(' ', "");
        let local = format!("{}.{}{index}.{ns}", ascii(given), ascii(family));
        Person {
            index,
            name: format!("{family} {middle} {given}"),
            email: format!("{}@{}", local.to_lowercase(), pick(rng, &MAIL_DOMAINS)),
            phone_digits: format!(
                "{}{:07}",
                pick(rng, &MOBILE_PREFIXES),
                rng.random_range(0..10_000_000u32)
            ),
            anonymous_id: Uuid::from_u64_pair(rng.random(), rng.random()).to_string(),
            device_id: Uuid::from_u64_pair(rng.random(), rng.random())
                .to_string()
                .to_uppercase(),
            zalo_id: format!(
                "{}",
                rng.random_range(1_000_000_000_000_000u64..9_000_000_000_000_000)
            ),
            loyalty_id: format!("{:013}", rng.random_range(0..10_000_000_000_000u64)),
        }
    }

    /// The phone in one of the forms people type.
    fn phone(&self, rng: &mut StdRng) -> String {
        let d = &self.phone_digits;
        match rng.random_range(0..5) {
            0 => format!("0{d}"),
            1 => format!("+84 {} {} {}", &d[..3], &d[3..6], &d[6..]),
            2 => format!("84{d}"),
            3 => format!("0{} {} {}", &d[..3], &d[3..6], &d[6..]),
            _ => format!("+84-{}-{}-{}", &d[..3], &d[3..6], &d[6..]),
        }
    }

    fn email_form(&self, rng: &mut StdRng) -> String {
        if rng.random_bool(0.3) {
            self.email.to_uppercase()
        } else {
            format!(" {} ", self.email)
        }
    }

    /// Every identifier of the person, so one event links them all.
    pub fn all_identifiers(&self, rng: &mut StdRng) -> Vec<RawIdentifier> {
        vec![
            RawIdentifier::new("email", self.email_form(rng)),
            RawIdentifier::new("phone", self.phone(rng)),
            RawIdentifier::new("anonymous_id", self.anonymous_id.clone()),
            RawIdentifier::new("device_id", self.device_id.clone()),
            RawIdentifier::new("zalo_id", self.zalo_id.clone()),
            RawIdentifier::new("loyalty_id", self.loyalty_id.clone()),
        ]
    }
}

/// Generates journeys for `config.customers` people. Each person's
/// identifiers are connected: an identify event carries all of them.
pub fn generate(seed: u64, config: &JourneyConfig) -> (Vec<Person>, Vec<GeneratedEvent>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let people: Vec<Person> = (0..config.customers)
        .map(|i| Person::new(&mut rng, &config.namespace, i))
        .collect();
    let mut events = Vec::new();
    for person in &people {
        let n = rng.random_range(config.min_events..=config.max_events.max(config.min_events));
        let link_at = rng.random_range(0..n.max(1));
        for k in 0..n {
            let at = config.start + rng.random_range(0..config.span_ms.max(1));
            let event = if k == link_at {
                // The sign-up, sent by the shop's own server (a source trusted
                // to link), not by the browser's public write key.
                RawTouchpoint {
                    event_type: Some("Identify".into()),
                    channel: Some("web".into()),
                    source_id: Some("web-backend".into()),
                    identifiers: person.all_identifiers(&mut rng),
                    traits: attrs(json!({"name": person.name})),
                    ..RawTouchpoint::default()
                }
            } else {
                random_event(&mut rng, person, &config.namespace, k)
            };
            events.push(GeneratedEvent {
                person: person.index,
                event: RawTouchpoint {
                    event_id: Some(Uuid::from_u64_pair(rng.random(), rng.random()).to_string()),
                    occurred_at: Some(at),
                    ..event
                },
            });
        }
    }
    // Interleave customers, as a live stream would.
    use rand::seq::SliceRandom;
    events.shuffle(&mut rng);
    (people, events)
}

fn random_event(rng: &mut StdRng, p: &Person, ns: &str, k: usize) -> RawTouchpoint {
    let products = [
        ("SKU-AO-01", "Áo thun", 250_000),
        ("SKU-QU-02", "Quần jean", 590_000),
        ("SKU-GI-03", "Giày", 1_250_000),
    ];
    let (sku, name, price) = *products.choose(rng).unwrap_or(&products[0]);
    let (event_type, channel, source, ids, props): (&str, &str, &str, Vec<RawIdentifier>, Value) =
        match rng.random_range(0..12) {
            0..=2 => (
                "Product Viewed",
                "web",
                "website",
                vec![RawIdentifier::new("anonymous_id", p.anonymous_id.clone())],
                json!({"product_id": sku, "name": name, "price": price}),
            ),
            3 => (
                "Product Added",
                "app",
                "mobile-app",
                vec![RawIdentifier::new("device_id", p.device_id.clone())],
                json!({"product_id": sku, "name": name, "price": price, "quantity": rng.random_range(1..3)}),
            ),
            4 => (
                "Product Removed",
                "web",
                "website",
                vec![RawIdentifier::new("email", p.email_form(rng))],
                json!({"product_id": sku}),
            ),
            5 => (
                "Order Completed",
                "store",
                "pos-q1",
                vec![RawIdentifier::new("phone", p.phone(rng))],
                json!({"order_id": format!("{ns}-o{}-{k}", p.index), "total": price * 2, "currency": "VND",
                       "store_name": "Q1", "products": [{"product_id": sku, "quantity": 2}]}),
            ),
            6 => (
                "Order Refunded",
                "call_center",
                "hotline",
                vec![RawIdentifier::new("phone", p.phone(rng))],
                json!({"order_id": format!("{ns}-o{}-r", p.index), "total": price, "currency": "VND"}),
            ),
            7 => (
                "Ticket Opened",
                "call_center",
                "hotline",
                vec![RawIdentifier::new("email", p.email_form(rng))],
                json!({"ticket_id": format!("{ns}-t{}", p.index), "subject": "Giao hàng chậm"}),
            ),
            8 => (
                "Message Received",
                "chat",
                "zalo-oa",
                vec![
                    RawIdentifier::new("zalo_id", p.zalo_id.clone()),
                    RawIdentifier::new("phone", p.phone(rng)),
                ],
                json!({"text": "Cho mình hỏi đơn hàng"}),
            ),
            9 => (
                "Points Earned",
                "store",
                "loyalty",
                vec![RawIdentifier::new("loyalty_id", p.loyalty_id.clone())],
                json!({"points": rng.random_range(1..500)}),
            ),
            10 => (
                "Feedback Submitted",
                "email",
                "survey",
                vec![RawIdentifier::new("email", p.email_form(rng))],
                json!({"rating": rng.random_range(1..=5), "comment": "ok"}),
            ),
            _ => (
                "Ticket Resolved",
                "call_center",
                "hotline",
                vec![RawIdentifier::new("email", p.email_form(rng))],
                json!({"ticket_id": format!("{ns}-t{}", p.index)}),
            ),
        };
    RawTouchpoint {
        event_type: Some(event_type.into()),
        channel: Some(channel.into()),
        source_id: Some(source.into()),
        identifiers: ids,
        properties: attrs(props),
        ..RawTouchpoint::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::IdKind;
    use crate::normalize::{EmailPolicy, PhonePolicy, normalize};

    /// Two chunks of a population, as the bench makes them: every person's
    /// identifiers normalise, are their own (ground truth depends on it),
    /// and none starts with the namespace (a real population's identifiers
    /// have no such locality).
    #[test]
    fn identifiers_are_valid_unique_and_spread_like_a_real_populations() {
        let mut seen: HashSet<(String, String)> = HashSet::new();
        for chunk in 0..2u64 {
            let config = JourneyConfig {
                customers: 3_000,
                namespace: format!("b7x{chunk}"),
                ..JourneyConfig::default()
            };
            let mut rng = StdRng::seed_from_u64(99);
            let (people, _) = generate(7 + chunk, &config);
            for p in &people {
                assert!(p.name.split(' ').count() == 3, "{}", p.name);
                for raw in p.all_identifiers(&mut rng) {
                    assert!(
                        !raw.value.trim().starts_with(&config.namespace),
                        "{raw:?} starts with its batch's namespace"
                    );
                    let kind = IdKind::parse(&raw.kind).unwrap_or_else(|e| panic!("{e}"));
                    let id = normalize(
                        &kind,
                        &raw.value,
                        &EmailPolicy::default(),
                        &PhonePolicy::default(),
                    )
                    .unwrap_or_else(|e| panic!("{raw:?} does not normalise: {e}"));
                    if id.kind == IdKind::Phone {
                        // Numbers drawn at random may be shared, as
                        // family phones are; the rest never are.
                        continue;
                    }
                    assert!(
                        seen.insert((id.kind.as_str().to_owned(), id.value.clone())),
                        "{id:?} given to two people"
                    );
                }
            }
        }
    }
}
