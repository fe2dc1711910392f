//! API messages <-> domain values.

use cdp_domain::identity::Claim;
use cdp_domain::{Attributes, Identifier, RawIdentifier, RawTouchpoint, TimelineEntry, UnixMillis};
use prost_types::value::Kind;
use serde_json::{Number, Value};

use crate::v1;

/// `google.protobuf.Value` -> JSON. Whole numbers become JSON integers so
/// that ids and amounts read back as they were sent.
pub fn value_to_json(v: &prost_types::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::Number(Number::from(*n as i64))
            } else {
                Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
    }
}

pub fn struct_to_json(s: &prost_types::Struct) -> Attributes {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

pub fn json_to_value(v: &Value) -> prost_types::Value {
    value_within(v, 1)
}

/// What stands in for a value nested deeper than
/// `cdp_domain::validate::MAX_NESTING` (only events accepted before the
/// bound can hold one): a client's decoder would refuse the whole message.
pub const TOO_DEEP: &str = "[nested too deep]";

fn value_within(v: &Value, depth: usize) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(_) | Value::Object(_) if depth >= cdp_domain::validate::MAX_NESTING => {
            Kind::StringValue(TOO_DEEP.into())
        }
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(|i| value_within(i, depth + 1)).collect(),
        }),
        Value::Object(map) => Kind::StructValue(struct_within(map, depth + 1)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn struct_within(map: &Attributes, depth: usize) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), value_within(v, depth)))
            .collect(),
    }
}

/// The API `Struct` of a bag of attributes; containers nested deeper than
/// `MAX_NESTING` become [`TOO_DEEP`].
pub fn json_to_struct(map: &Attributes) -> prost_types::Struct {
    struct_within(map, 1)
}

/// Whether a protobuf `Timestamp` is one: nanos in `0..1e9` and seconds
/// within years 1 to 9999, as the well-known type requires.
pub fn check_timestamp(
    field: &str,
    t: Option<&prost_types::Timestamp>,
) -> Result<(), cdp_domain::FieldError> {
    const MIN_SECONDS: i64 = -62_135_596_800;
    const MAX_SECONDS: i64 = 253_402_300_799;
    let Some(t) = t else { return Ok(()) };
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(cdp_domain::FieldError::new(
            format!("{field}.nanos"),
            format!(
                "is {}; a Timestamp's nanos are from 0 to 999999999 (negative times count seconds down, not nanos)",
                t.nanos
            ),
        ));
    }
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&t.seconds) {
        return Err(cdp_domain::FieldError::new(
            format!("{field}.seconds"),
            format!("is {}; a Timestamp lies in years 1 to 9999", t.seconds),
        ));
    }
    Ok(())
}

pub fn timestamp_to_millis(t: &prost_types::Timestamp) -> UnixMillis {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos) / 1_000_000)
}

pub fn millis_to_timestamp(ms: UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// The API touchpoint as a raw domain touchpoint, ready for validation.
pub fn raw_touchpoint(t: &v1::Touchpoint) -> RawTouchpoint {
    let personal = t.personal.clone().unwrap_or_default();
    RawTouchpoint {
        event_id: Some(t.event_id.clone()).filter(|s| !s.is_empty()),
        event_type: Some(t.r#type.clone()),
        channel: Some(t.channel.clone()),
        source_id: Some(t.source_id.clone()),
        occurred_at: t.occurred_at.as_ref().map(timestamp_to_millis),
        identifiers: personal
            .identifiers
            .iter()
            .map(|i| RawIdentifier::new(i.kind.clone(), i.value.clone()))
            .collect(),
        traits: personal
            .traits
            .as_ref()
            .map(struct_to_json)
            .unwrap_or_default(),
        properties: t
            .properties
            .as_ref()
            .map(struct_to_json)
            .unwrap_or_default(),
    }
}

/// A validated touchpoint as the API shows it (identifiers normalised).
pub fn api_touchpoint(t: &cdp_domain::Touchpoint) -> v1::Touchpoint {
    let e = &t.envelope;
    v1::Touchpoint {
        event_id: e.event_id.to_string(),
        r#type: e.event_type.to_string(),
        channel: e.channel.to_string(),
        source_id: e.source_id.clone(),
        occurred_at: Some(millis_to_timestamp(e.occurred_at)),
        properties: Some(json_to_struct(&e.properties)),
        personal: Some(v1::PersonalData {
            identifiers: t.personal.identifiers.iter().map(identifier).collect(),
            traits: Some(json_to_struct(&t.personal.traits)),
        }),
    }
}

pub fn identifier(id: &Identifier) -> v1::Identifier {
    v1::Identifier {
        kind: id.kind.to_string(),
        value: id.value.clone(),
    }
}

pub fn linked_identifier(id: &Identifier, claim: Option<&Claim>) -> v1::LinkedIdentifier {
    v1::LinkedIdentifier {
        kind: id.kind.to_string(),
        value: id.value.clone(),
        linked_at: claim.map(|c| millis_to_timestamp(c.at)),
        linked_by_event_id: claim.map(|c| c.event_id.to_string()).unwrap_or_default(),
    }
}

pub fn timeline_entry(e: &TimelineEntry) -> v1::TimelineEntry {
    v1::TimelineEntry {
        event_id: e.event_id.to_string(),
        occurred_at: Some(millis_to_timestamp(e.occurred_at)),
        r#type: e.event_type.to_string(),
        channel: e.channel.to_string(),
        source_id: e.source_id.clone(),
        summary: e.summary.clone(),
        properties: Some(json_to_struct(&e.properties)),
    }
}

fn money(m: &cdp_domain::profile::SpendView) -> v1::Money {
    v1::Money {
        currency: m.currency.clone(),
        count: m.orders,
        total: m.total.to_string(),
        average: m.average.to_string(),
    }
}

/// The computed view as API metrics. VND comes first among currencies.
pub fn metrics(view: &cdp_domain::ProfileView) -> v1::ProfileMetrics {
    let mut spend: Vec<v1::Money> = view.spend.iter().map(money).collect();
    spend.sort_by_key(|m| (m.currency != "VND", m.currency.clone()));
    let mut refunds: Vec<v1::Money> = view.refunds.iter().map(money).collect();
    refunds.sort_by_key(|m| (m.currency != "VND", m.currency.clone()));
    v1::ProfileMetrics {
        events_count: view.events_count,
        orders_count: view.orders_count,
        spend,
        refunds,
        first_seen: view.first_seen.map(millis_to_timestamp),
        last_seen: view.last_seen.map(millis_to_timestamp),
        last_seen_by_channel: view
            .last_seen_by_channel
            .iter()
            .map(|(c, at)| v1::ChannelSeen {
                channel: c.to_string(),
                last_seen: Some(millis_to_timestamp(*at)),
            })
            .collect(),
        preferred_channel: view
            .preferred_channel
            .map(|c| c.to_string())
            .unwrap_or_default(),
        first_order_at: view.first_order_at.map(millis_to_timestamp),
        last_order_at: view.last_order_at.map(millis_to_timestamp),
        open_tickets: view.open_tickets,
        tickets: view
            .tickets
            .iter()
            .map(|t| v1::Ticket {
                ticket_id: t.ticket_id.clone(),
                open: t.open,
                subject: t.subject.clone(),
                channel: t.channel.map(|c| c.to_string()).unwrap_or_default(),
                opened_at: t.opened_at.map(millis_to_timestamp),
                resolved_at: t.resolved_at.map(millis_to_timestamp),
                last_message: t.last_message.clone().unwrap_or_default(),
            })
            .collect(),
        loyalty_points: view.loyalty_points,
        cart: view
            .cart
            .iter()
            .map(|c| v1::CartItem {
                product_id: c.product_id.clone(),
                name: c.name.clone().unwrap_or_default(),
                quantity: c.quantity,
                price: c.price.map(|p| p.to_string()).unwrap_or_default(),
                added_at: Some(millis_to_timestamp(c.added_at)),
            })
            .collect(),
        last_feedback_rating: view
            .last_feedback_rating
            .and_then(|r| i32::try_from(r).ok())
            .unwrap_or(0),
        consent: view.consent.clone().into_iter().collect(),
        journey_stage: view.stage.as_str().to_owned(),
        last_message: view.last_message.clone().unwrap_or_default(),
    }
}

/// A kept consent statement, for the API.
pub fn consent_record(r: &cdp_domain::consent::Record) -> v1::ConsentRecord {
    v1::ConsentRecord {
        purpose: r.purpose.clone(),
        channel: r.channel.clone().unwrap_or_default(),
        granted: r.granted,
        notice_version: r.notice_version.clone().unwrap_or_default(),
        at: Some(millis_to_timestamp(r.at)),
        event_id: r.event_id.to_string(),
        source_id: r.source_id.clone(),
        via: r.via.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn structs_round_trip_and_whole_numbers_stay_integers() {
        let original = json!({"total": 1250000, "price": 19.5, "tags": ["a", true, null], "nested": {"x": "y"}});
        let Value::Object(map) = original.clone() else {
            panic!()
        };
        let back = struct_to_json(&json_to_struct(&map));
        assert_eq!(Value::Object(back), original);
    }

    #[test]
    fn timestamps_round_trip_including_before_the_epoch() {
        for ms in [0, 1_760_000_000_123, -1_500] {
            assert_eq!(timestamp_to_millis(&millis_to_timestamp(ms)), ms);
        }
    }
}
