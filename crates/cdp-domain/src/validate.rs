//! Validation and normalisation of incoming touchpoints. Every reject names
//! the field and the reason; a touchpoint is accepted whole or not at all.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{
    Channel, DroppedIdentifier, Envelope, EventId, EventType, IdKind, Identifier, Personal,
    RawTouchpoint, Touchpoint, UnixMillis,
};
use crate::normalize::{MAX_IDENTIFIER_LEN, normalize};
use crate::props;
use crate::rules::{IdentityRules, ValidationLimits};

/// One reason a touchpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// The offending field, in the API's naming (`identifiers[1].value`, `properties.total`).
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// All the reasons one touchpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Rejection(pub Vec<FieldError>);

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

/// What validation needs from the outside world, passed in so that the
/// domain stays free of clocks and randomness.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub now: UnixMillis,
    /// The id given to an event that arrives without one.
    pub fresh_event_id: Uuid,
}

const MAX_NAME_LEN: usize = 128;

/// How deep `properties` and `traits` may nest (the bag itself and every
/// object or array in it is a level; `{"a": 1}` is 1, `{"a": [1]}` is 2). Every level costs a client's protobuf decoder
/// up to three messages (`Struct`, its map entry, `Value`), and protobuf
/// decoders stop at 100 (prost, Python, Go, Java): 20 levels leave room for
/// the responses that carry an event, and real events use 3 or 4.
pub const MAX_NESTING: usize = 20;

/// How many values (keys and array elements, counted through every level)
/// `properties` or `traits` may hold.
pub const MAX_VALUES: usize = 1000;

/// Whether a bag of attributes nests deeper than [`MAX_NESTING`] or holds
/// more than [`MAX_VALUES`] values: the error names the bag (`properties`)
/// and the path to the deepest point.
pub fn check_shape(bag: &str, attributes: &crate::event::Attributes) -> Option<FieldError> {
    use serde_json::Value;
    // Iterative: the input may be as deep as the JSON parser allowed.
    let mut stack: Vec<(&Value, usize, String)> = attributes
        .iter()
        .map(|(k, v)| (v, 1, format!("{bag}.{k}")))
        .collect();
    let mut values = attributes.len();
    while let Some((v, depth, path)) = stack.pop() {
        let children: Vec<(&Value, String)> = match v {
            Value::Object(m) => m.iter().map(|(k, c)| (c, format!("{path}.{k}"))).collect(),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, c)| (c, format!("{path}[{i}]")))
                .collect(),
            _ => continue,
        };
        if depth + 1 > MAX_NESTING {
            let shown: String = path.chars().take(120).collect();
            return Some(FieldError::new(
                bag,
                format!(
                    "nests deeper than {MAX_NESTING} levels (at {shown}{}); flatten it",
                    if shown.len() < path.len() { "…" } else { "" }
                ),
            ));
        }
        values += children.len();
        if values > MAX_VALUES {
            return Some(FieldError::new(
                bag,
                format!(
                    "holds more than {MAX_VALUES} values (keys and array elements, at every level)"
                ),
            ));
        }
        stack.extend(children.into_iter().map(|(c, p)| (c, depth + 1, p)));
    }
    None
}

/// The shape errors of an event's bags, for a record read back from a log
/// that may predate [`MAX_NESTING`]: what a reader must not pass on.
pub fn shape_errors(t: &Touchpoint) -> Vec<FieldError> {
    check_shape("properties", &t.envelope.properties)
        .into_iter()
        .chain(check_shape("traits", &t.personal.traits))
        .collect()
}

fn check_name(field: &str, value: Option<&str>, errors: &mut Vec<FieldError>) -> Option<String> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        errors.push(FieldError::new(field, "is required"));
        return None;
    };
    if value.chars().count() > MAX_NAME_LEN {
        errors.push(FieldError::new(
            field,
            format!("is longer than {MAX_NAME_LEN} characters"),
        ));
        return None;
    }
    if value.chars().any(char::is_control) {
        errors.push(FieldError::new(field, "contains control characters"));
        return None;
    }
    Some(value.to_owned())
}

/// Validates and normalises a raw touchpoint.
pub fn validate(
    raw: &RawTouchpoint,
    rules: &IdentityRules,
    limits: &ValidationLimits,
    ctx: Context,
) -> Result<Touchpoint, Rejection> {
    let mut errors = Vec::new();

    let event_id = match raw
        .event_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        None => Some(EventId(ctx.fresh_event_id)),
        Some(s) => match Uuid::parse_str(s) {
            Ok(u) if !u.is_nil() => Some(EventId(u)),
            Ok(_) => {
                errors.push(FieldError::new("event_id", "must not be the nil UUID"));
                None
            }
            Err(_) => {
                errors.push(FieldError::new("event_id", format!("{s:?} is not a UUID")));
                None
            }
        },
    };

    let event_type =
        check_name("type", raw.event_type.as_deref(), &mut errors).map(EventType::from);

    let channel = match raw
        .channel
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        None => {
            errors.push(FieldError::new("channel", "is required"));
            None
        }
        Some(c) => match c.parse::<Channel>() {
            Ok(ch) => Some(ch),
            Err(reason) => {
                errors.push(FieldError::new("channel", reason));
                None
            }
        },
    };

    let source_id = check_name("source_id", raw.source_id.as_deref(), &mut errors);

    let occurred_at = match raw.occurred_at {
        None => ctx.now,
        Some(t) => {
            // Saturating: the limits come from configuration, unbounded.
            let skew_ms = limits.max_future_skew_secs.saturating_mul(1000);
            let max_age_ms = limits.max_age_days.saturating_mul(86_400_000);
            if t > ctx.now.saturating_add(skew_ms) {
                errors.push(FieldError::new(
                    "occurred_at",
                    format!(
                        "is {} s in the future; at most {} s of clock skew is allowed",
                        t.saturating_sub(ctx.now) / 1000,
                        limits.max_future_skew_secs
                    ),
                ));
            } else if t < ctx.now.saturating_sub(max_age_ms) {
                errors.push(FieldError::new(
                    "occurred_at",
                    format!("is more than {} days in the past", limits.max_age_days),
                ));
            }
            t
        }
    };

    let (identifiers, dropped) = validate_identifiers(raw, rules, limits, &mut errors);

    if let Some(t) = &event_type {
        validate_properties(t, &raw.properties, &mut errors);
    }
    errors.extend(check_shape("properties", &raw.properties));
    errors.extend(check_shape("traits", &raw.traits));

    let size = serde_json::to_vec(raw)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > limits.max_event_bytes {
        let field = if json_len(&raw.traits) > json_len(&raw.properties) {
            "traits"
        } else {
            "properties"
        };
        errors.push(FieldError::new(
            field,
            format!(
                "the event is {size} bytes, over the limit of {} bytes",
                limits.max_event_bytes
            ),
        ));
    }

    match (event_id, event_type, channel, source_id) {
        (Some(event_id), Some(event_type), Some(channel), Some(source_id)) if errors.is_empty() => {
            Ok(Touchpoint {
                envelope: Envelope {
                    event_id,
                    event_type,
                    channel,
                    source_id,
                    occurred_at,
                    received_at: ctx.now,
                    properties: raw.properties.clone(),
                },
                personal: Personal {
                    identifiers,
                    traits: raw.traits.clone(),
                    dropped,
                },
            })
        }
        _ => Err(Rejection(errors)),
    }
}

fn json_len(attrs: &crate::event::Attributes) -> usize {
    serde_json::to_vec(attrs).map(|v| v.len()).unwrap_or(0)
}

fn validate_identifiers(
    raw: &RawTouchpoint,
    rules: &IdentityRules,
    limits: &ValidationLimits,
    errors: &mut Vec<FieldError>,
) -> (Vec<Identifier>, Vec<DroppedIdentifier>) {
    if raw.identifiers.is_empty() {
        errors.push(FieldError::new(
            "identifiers",
            "at least one identifier is required to attribute the event to a customer",
        ));
        return (Vec::new(), Vec::new());
    }
    if raw.identifiers.len() > limits.max_identifiers {
        errors.push(FieldError::new(
            "identifiers",
            format!(
                "has {} entries, at most {} are allowed",
                raw.identifiers.len(),
                limits.max_identifiers
            ),
        ));
        return (Vec::new(), Vec::new());
    }
    let mut out = Vec::with_capacity(raw.identifiers.len());
    let mut invalid = Vec::new();
    for (i, rid) in raw.identifiers.iter().enumerate() {
        let kind = match IdKind::parse(&rid.kind) {
            Ok(k) if rules.is_known(&k) => k,
            Ok(k) => {
                errors.push(FieldError::new(
                    format!("identifiers[{i}].kind"),
                    format!("unknown identifier kind {:?}: not built in and not declared in the identity rules", k.as_str()),
                ));
                continue;
            }
            Err(reason) => {
                errors.push(FieldError::new(format!("identifiers[{i}].kind"), reason));
                continue;
            }
        };
        match normalize(
            &kind,
            &rid.value,
            rules.email_policy(),
            rules.phone_policy(),
        ) {
            Ok(id) => out.push(id),
            Err(e) => {
                let reason = format!("{} {e}", kind.as_str());
                invalid.push((
                    FieldError::new(format!("identifiers[{i}].value"), reason.clone()),
                    DroppedIdentifier {
                        kind,
                        value: rid.value.trim().chars().take(MAX_IDENTIFIER_LEN).collect(),
                        reason,
                    },
                ));
            }
        }
    }
    out.sort();
    out.dedup();
    // A value that is not valid for its kind (a phone mistyped at the till)
    // is dropped with its reason and the event kept, as long as another
    // identifier can attribute it; an event left with none is refused.
    if out.is_empty() {
        errors.extend(invalid.into_iter().map(|(e, _)| e));
        return (out, Vec::new());
    }
    (out, invalid.into_iter().map(|(_, d)| d).collect())
}

fn validate_properties(
    event_type: &EventType,
    props: &crate::event::Attributes,
    errors: &mut Vec<FieldError>,
) {
    let mut push = |key: &str, reason: String| {
        errors.push(FieldError::new(format!("properties.{key}"), reason))
    };
    match event_type {
        EventType::OrderCompleted | EventType::OrderRefunded => {
            match props::order_amount(props) {
                Ok(Some(_)) => {}
                Ok(None) if *event_type == EventType::OrderCompleted => push(
                    "total",
                    "is required for an order (total, revenue or value)".into(),
                ),
                Ok(None) => {}
                Err((key, reason)) => push(key, reason),
            }
            if let Err(reason) = props::currency(props, "currency") {
                push("currency", reason);
            }
            if let Err(reason) = props::id(props, "order_id") {
                push("order_id", reason);
            }
        }
        EventType::ProductAdded | EventType::ProductRemoved => match props::product(props) {
            Ok(Some(_)) => {}
            Ok(None) => push("product_id", "is required (product_id or sku)".into()),
            Err((key, reason)) => push(key, reason),
        },
        EventType::ProductViewed => {
            if let Err((key, reason)) = props::product(props) {
                push(key, reason);
            }
        }
        EventType::TicketOpened | EventType::TicketResolved => {
            match props::id(props, "ticket_id") {
                Ok(Some(_)) => {}
                Ok(None) => push("ticket_id", "is required".into()),
                Err(reason) => push("ticket_id", reason),
            }
        }
        EventType::PointsEarned | EventType::PointsRedeemed => {
            match props::integer(props, "points", 1, 1_000_000_000) {
                Ok(Some(_)) => {}
                Ok(None) => push("points", "is required".into()),
                Err(reason) => push("points", reason),
            }
        }
        EventType::FeedbackSubmitted => match props::integer(props, "rating", 1, 5) {
            Ok(Some(_)) => {}
            Ok(None) => push("rating", "is required (1 to 5)".into()),
            Err(reason) => push("rating", reason),
        },
        _ => {}
    }
    // Consent can ride on any event (see `crate::consent`).
    if let Err(e) = crate::consent::changes_in(event_type, props) {
        errors.extend(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::RawIdentifier;
    use serde_json::json;

    const NOW: UnixMillis = 1_760_000_000_000;

    fn ctx() -> Context {
        Context {
            now: NOW,
            fresh_event_id: Uuid::from_u128(7),
        }
    }

    fn raw() -> RawTouchpoint {
        RawTouchpoint {
            event_id: Some("0b6b8a39-5b8e-4a7d-9f3e-111111111111".into()),
            event_type: Some("Product Viewed".into()),
            channel: Some("web".into()),
            source_id: Some("website".into()),
            occurred_at: Some(NOW - 1000),
            identifiers: vec![RawIdentifier::new("email", " Lan@Shop.VN ")],
            ..RawTouchpoint::default()
        }
    }

    fn check(raw: &RawTouchpoint) -> Result<Touchpoint, Rejection> {
        validate(
            raw,
            &IdentityRules::default(),
            &ValidationLimits::default(),
            ctx(),
        )
    }

    fn fields(r: Result<Touchpoint, Rejection>) -> Vec<String> {
        r.err()
            .map(|e| e.0.into_iter().map(|f| f.field).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_valid_event_is_normalised() {
        let t = check(&raw()).unwrap();
        assert_eq!(t.envelope.channel, Channel::Web);
        assert_eq!(t.envelope.event_type, EventType::ProductViewed);
        assert_eq!(
            t.personal.identifiers,
            vec![Identifier::new(IdKind::Email, "lan@shop.vn")]
        );
    }

    #[test]
    fn a_missing_event_id_is_generated() {
        let mut r = raw();
        r.event_id = None;
        assert_eq!(
            check(&r).unwrap().envelope.event_id,
            EventId(Uuid::from_u128(7))
        );
    }

    #[test]
    fn an_invalid_value_beside_a_valid_one_is_dropped_with_its_reason_and_the_event_kept() {
        let mut r = raw();
        r.identifiers.push(RawIdentifier::new("phone", " 12 "));
        let t = check(&r).unwrap();
        assert_eq!(
            t.personal.identifiers,
            vec![Identifier::new(IdKind::Email, "lan@shop.vn")]
        );
        assert_eq!(t.personal.dropped.len(), 1);
        let d = &t.personal.dropped[0];
        assert_eq!((&d.kind, d.value.as_str()), (&IdKind::Phone, "12"));
        assert!(
            d.reason.starts_with("phone is not a valid phone number"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut r = raw();
        r.event_type = None;
        assert_eq!(fields(check(&r)), vec!["type"]);
        let mut r = raw();
        r.channel = Some("fax".into());
        assert_eq!(fields(check(&r)), vec!["channel"]);
        let mut r = raw();
        r.event_id = Some("not-a-uuid".into());
        assert_eq!(fields(check(&r)), vec!["event_id"]);
        let mut r = raw();
        r.occurred_at = Some(NOW + 3_600_000);
        assert_eq!(fields(check(&r)), vec!["occurred_at"]);
        let mut r = raw();
        r.identifiers = vec![RawIdentifier::new("phone", "12")];
        assert_eq!(fields(check(&r)), vec!["identifiers[0].value"]);
        let mut r = raw();
        r.identifiers = vec![RawIdentifier::new("crm_id", "1")];
        assert_eq!(fields(check(&r)), vec!["identifiers[0].kind"]);
        let mut r = raw();
        r.identifiers.clear();
        assert_eq!(fields(check(&r)), vec!["identifiers"]);
        let mut r = raw();
        r.properties
            .insert("blob".into(), json!("x".repeat(40_000)));
        assert_eq!(fields(check(&r)), vec!["properties"]);
    }

    fn nested(levels: usize) -> serde_json::Value {
        (1..levels).fold(json!({"leaf": 1}), |inner, _| json!({ "a": inner }))
    }

    #[test]
    fn nesting_and_size_are_bounded_with_the_path_named() {
        let mut r = raw();
        r.properties = nested(MAX_NESTING).as_object().unwrap().clone();
        assert!(check(&r).is_ok(), "{MAX_NESTING} levels are fine");
        r.properties = nested(MAX_NESTING + 1).as_object().unwrap().clone();
        let e = check(&r).unwrap_err();
        assert_eq!(fields(Err(e.clone())), vec!["properties"]);
        assert!(
            e.0[0]
                .reason
                .contains("deeper than 20 levels (at properties.a.a."),
            "{e}"
        );
        // Arrays are levels too.
        r.properties = serde_json::Map::new();
        let mut list = json!([1]);
        for _ in 0..MAX_NESTING {
            list = json!([list]);
        }
        r.traits.insert("tags".into(), list);
        assert_eq!(fields(check(&r)), vec!["traits"]);
        r.traits = serde_json::Map::new();
        r.properties
            .insert("many".into(), json!(vec![0; MAX_VALUES]));
        let e = check(&r).unwrap_err();
        assert!(e.0[0].reason.contains("more than 1000 values"), "{e}");
    }

    #[test]
    fn typed_events_check_their_properties() {
        let mut r = raw();
        r.event_type = Some("Order Completed".into());
        assert_eq!(fields(check(&r)), vec!["properties.total"]);
        r.properties.insert("total".into(), json!("12x"));
        assert_eq!(fields(check(&r)), vec!["properties.total"]);
        r.properties.insert("total".into(), json!(1_250_000));
        r.properties.insert("currency".into(), json!("dong"));
        assert_eq!(fields(check(&r)), vec!["properties.currency"]);
        r.properties.insert("currency".into(), json!("vnd"));
        assert!(check(&r).is_ok());

        let mut r = raw();
        r.event_type = Some("Feedback Submitted".into());
        r.properties.insert("rating".into(), json!(9));
        assert_eq!(fields(check(&r)), vec!["properties.rating"]);
    }

    #[test]
    fn several_errors_are_reported_together() {
        let mut r = raw();
        r.event_type = Some(" ".into());
        r.channel = None;
        assert_eq!(fields(check(&r)), vec!["type", "channel"]);
    }
}
