//! Consent per purpose and per contact channel (Decree 13/2023/ND-CP:
//! explicit, per purpose, provable, withdrawable at any time).
//!
//! Consent arrives as touchpoints, so the log proves it and every view can
//! be rebuilt with it:
//! - a `Consent Updated` event with `purpose` and `granted` (and optionally
//!   `channel` and `notice_version`);
//! - any event carrying a `consent` property, the shape the Segment API maps
//!   `context.consent` onto: `{"categories": {"marketing": true, ...},
//!   "channel": "email", "notice_version": "2026-01"}` and/or
//!   `{"grants": [{"purpose": "marketing", "channel": "sms", "granted": false}]}`.
//!
//! The profile keeps the latest statement per `purpose` and per
//! `purpose:channel` (event time decides, not arrival). [`permits`] is the
//! one decision every place where data leaves the platform asks: absent
//! means not granted, except for `service` (what the customer asked the shop
//! to do), which holds until it is withdrawn.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::{Attributes, EventType, Touchpoint, UnixMillis};
use crate::validate::FieldError;

/// The purposes every shop has. Others (a shop's own, or a Segment
/// category) are accepted as lowercase names.
pub const PURPOSES: [&str; 4] = ["service", "marketing", "analytics", "personalisation"];

/// The channels a consent can be limited to.
pub const CHANNELS: [&str; 6] = ["email", "sms", "zalo", "push", "phone_call", "messenger"];

/// The purpose that holds unless withdrawn.
pub const SERVICE: &str = "service";

/// Longest purpose name.
pub const MAX_PURPOSE_LEN: usize = 64;
/// Longest notice version.
pub const MAX_NOTICE_LEN: usize = 128;

/// A purpose name as the platform keeps it, from what a client sent:
/// lowercase, words joined by `_`, US spelling and Segment's category names
/// mapped onto the built-in purposes.
pub fn purpose(raw: &str) -> Result<String, String> {
    let mut name = String::new();
    let mut gap = false;
    let mut after_lower = false;
    for c in raw.trim().chars() {
        if c.is_ascii_alphanumeric() {
            // camelCase words (Segment's `StrictlyNecessary`) split too.
            if (gap || (c.is_ascii_uppercase() && after_lower)) && !name.is_empty() {
                name.push('_');
            }
            gap = false;
            after_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
            name.push(c.to_ascii_lowercase());
        } else if matches!(c, '_' | '-' | ' ' | '.') {
            gap = true;
            after_lower = false;
        } else {
            return Err(format!(
                "{raw:?} is not a purpose name: use letters, digits and '_' (for example {})",
                PURPOSES.join(", ")
            ));
        }
    }
    if name.is_empty() {
        return Err(format!(
            "is empty: name a purpose ({})",
            PURPOSES.join(", ")
        ));
    }
    if name.len() > MAX_PURPOSE_LEN {
        return Err(format!("is longer than {MAX_PURPOSE_LEN} characters"));
    }
    let mapped = match name.as_str() {
        "personalization" | "functional" | "personalisation" => "personalisation",
        "advertising" | "marketing" | "targeting" => "marketing",
        "necessary" | "strictly_necessary" | "essential" | "service" => SERVICE,
        "analytics" | "performance" | "statistics" => "analytics",
        _ => return Ok(name),
    };
    Ok(mapped.to_owned())
}

/// A contact channel name as the platform keeps it.
pub fn channel(raw: &str) -> Result<String, String> {
    let c = raw.trim().to_ascii_lowercase().replace(['-', ' '], "_");
    let c = match c.as_str() {
        "phone" | "call" | "voice" | "phonecall" => "phone_call",
        "text" | "sms" => "sms",
        "zalo" | "zalo_oa" => "zalo",
        "facebook" | "messenger" | "fb" => "messenger",
        "push" | "app_push" | "notification" => "push",
        "email" | "e_mail" | "mail" => "email",
        _ => {
            return Err(format!(
                "{raw:?} is not a contact channel: use one of {}",
                CHANNELS.join(", ")
            ));
        }
    };
    Ok(c.to_owned())
}

/// The register key of a purpose, limited to a channel or not.
pub fn key(purpose: &str, channel: Option<&str>) -> String {
    match channel {
        Some(c) => format!("{purpose}:{c}"),
        None => purpose.to_owned(),
    }
}

/// One statement a touchpoint makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub purpose: String,
    pub channel: Option<String>,
    pub granted: bool,
    pub notice_version: Option<String>,
}

impl Change {
    pub fn key(&self) -> String {
        key(&self.purpose, self.channel.as_deref())
    }
}

/// What is kept per purpose (and channel): granted or withdrawn, and the
/// version of the notice the customer was shown. Reads the plain booleans
/// of profiles folded before notices were kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub granted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice_version: Option<String>,
}

impl<'de> Deserialize<'de> for Grant {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Plain(bool),
            Full {
                granted: bool,
                #[serde(default)]
                notice_version: Option<String>,
            },
        }
        Ok(match Stored::deserialize(d)? {
            Stored::Plain(granted) => Grant {
                granted,
                notice_version: None,
            },
            Stored::Full {
                granted,
                notice_version,
            } => Grant {
                granted,
                notice_version,
            },
        })
    }
}

/// The statements `t` makes about consent, or every reason it cannot be
/// read (each naming its field under `properties`).
pub fn changes(t: &Touchpoint) -> Result<Vec<Change>, Vec<FieldError>> {
    changes_in(&t.envelope.event_type, &t.envelope.properties)
}

/// [`changes`] on an event's type and properties.
pub fn changes_in(
    event_type: &EventType,
    props: &Attributes,
) -> Result<Vec<Change>, Vec<FieldError>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut err = |field: String, reason: String| {
        errors.push(FieldError::new(format!("properties.{field}"), reason))
    };
    // `notice_version` of `map`, named `field` in errors.
    let notice_of = |map: &Attributes, field: &str, err: &mut dyn FnMut(String, String)| {
        let n = crate::props::text(map, "notice_version");
        if n.as_ref().is_some_and(|n| n.len() > MAX_NOTICE_LEN) {
            err(
                field.to_owned(),
                format!("is longer than {MAX_NOTICE_LEN} characters"),
            );
            return None;
        }
        n
    };
    let channel_of = |v: Option<&Value>, field: &str, err: &mut dyn FnMut(String, String)| match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => channel(s).map(Some).map_err(|e| err(field.to_owned(), e)),
        Some(_) => {
            err(field.to_owned(), "must be a string".into());
            Err(())
        }
    };
    let mut single = false;
    if *event_type == EventType::ConsentUpdated && props.contains_key("purpose") {
        single = true;
        let p = match props.get("purpose") {
            Some(Value::String(s)) => purpose(s).map_err(|e| err("purpose".into(), e)).ok(),
            _ => {
                err("purpose".into(), "must be a string".into());
                None
            }
        };
        let g = match props.get("granted") {
            None | Some(Value::Null) => {
                err("granted".into(), "is required".into());
                None
            }
            Some(v) => crate::props::boolean_value(v)
                .map_err(|e| err("granted".into(), e))
                .ok(),
        };
        let c = channel_of(props.get("channel"), "channel", &mut err);
        let n = notice_of(props, "notice_version", &mut err);
        if let (Some(purpose), Some(granted), Ok(channel)) = (p, g, c) {
            out.push(Change {
                purpose,
                channel,
                granted,
                notice_version: n,
            });
        }
    }
    match props.get("consent") {
        None | Some(Value::Null) => {}
        Some(Value::Object(c)) => {
            let notice = notice_of(c, "consent.notice_version", &mut err);
            let ch = channel_of(c.get("channel"), "consent.channel", &mut err).unwrap_or(None);
            match c.get("categories").or_else(|| c.get("categoryPreferences")) {
                None | Some(Value::Null) => {}
                Some(Value::Object(cats)) => {
                    for (name, v) in cats {
                        let field = format!("consent.categories.{name}");
                        match (purpose(name), crate::props::boolean_value(v)) {
                            (Ok(purpose), Ok(granted)) => out.push(Change {
                                purpose,
                                channel: ch.clone(),
                                granted,
                                notice_version: notice.clone(),
                            }),
                            (Err(e), _) | (_, Err(e)) => err(field, e),
                        }
                    }
                }
                Some(_) => err(
                    "consent.categories".into(),
                    "must be an object of purpose: true or false".into(),
                ),
            }
            match c.get("grants") {
                None | Some(Value::Null) => {}
                Some(Value::Array(grants)) => {
                    for (i, g) in grants.iter().enumerate() {
                        let field = format!("consent.grants[{i}]");
                        let Value::Object(g) = g else {
                            err(field, "must be an object".into());
                            continue;
                        };
                        let p = match g.get("purpose") {
                            Some(Value::String(s)) => purpose(s)
                                .map_err(|e| err(format!("{field}.purpose"), e))
                                .ok(),
                            _ => {
                                err(format!("{field}.purpose"), "is required".into());
                                None
                            }
                        };
                        let granted = match g.get("granted") {
                            None | Some(Value::Null) => {
                                err(format!("{field}.granted"), "is required".into());
                                None
                            }
                            Some(v) => crate::props::boolean_value(v)
                                .map_err(|e| err(format!("{field}.granted"), e))
                                .ok(),
                        };
                        let gc =
                            channel_of(g.get("channel"), &format!("{field}.channel"), &mut err);
                        let gn = notice_of(g, &format!("{field}.notice_version"), &mut err)
                            .or_else(|| notice.clone());
                        if let (Some(purpose), Some(granted), Ok(gc)) = (p, granted, gc) {
                            out.push(Change {
                                purpose,
                                channel: gc.or_else(|| ch.clone()),
                                granted,
                                notice_version: gn,
                            });
                        }
                    }
                }
                Some(_) => err("consent.grants".into(), "must be an array".into()),
            }
        }
        // A shop's own `consent` property that is not an object (`true`
        // on a sign-up) is an ordinary property, except on the event whose
        // whole point is consent.
        Some(_) if *event_type == EventType::ConsentUpdated => err(
            "consent".into(),
            "must be an object with categories or grants".into(),
        ),
        Some(_) => {}
    }
    if *event_type == EventType::ConsentUpdated && !single && out.is_empty() && errors.is_empty() {
        errors.push(FieldError::new(
            "properties.purpose",
            "is required (with granted), or give consent.categories or consent.grants",
        ));
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// One kept statement, with its evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub purpose: String,
    pub channel: Option<String>,
    pub granted: bool,
    pub notice_version: Option<String>,
    pub at: UnixMillis,
    /// The event that made it: the evidence.
    pub event_id: crate::EventId,
    pub source_id: String,
    /// The channel the statement was made on (web, store, call_center...).
    pub via: crate::Channel,
}

/// Why a use of personal data was allowed or refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Basis {
    /// The latest statement that covers the use.
    Recorded(Record),
    /// `service` with nothing recorded: it holds until withdrawn.
    ServiceDefault,
    /// Nothing recorded: silence is not consent.
    Absent,
}

/// The answer of [`permits`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    pub allowed: bool,
    pub basis: Basis,
}

impl Permit {
    /// One line for a person or an audit record.
    pub fn reason(&self, purpose: &str, channel: Option<&str>) -> String {
        let what = match channel {
            Some(c) => format!("{purpose} by {c}"),
            None => purpose.to_owned(),
        };
        match &self.basis {
            Basis::Recorded(r) if r.granted => {
                format!("{what}: granted by event {} at {}", r.event_id, r.at)
            }
            Basis::Recorded(r) => {
                format!("{what}: withdrawn by event {} at {}", r.event_id, r.at)
            }
            Basis::ServiceDefault => format!("{what}: the service the customer asked for"),
            Basis::Absent => format!("{what}: never granted"),
        }
    }
}

impl fmt::Display for Basis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Basis::Recorded(r) if r.granted => write!(f, "granted"),
            Basis::Recorded(_) => write!(f, "withdrawn"),
            Basis::ServiceDefault => write!(f, "service_default"),
            Basis::Absent => write!(f, "absent"),
        }
    }
}

/// Whether `records` (a customer's kept statements) allow using their data
/// for `purpose`, on `channel` when the use contacts them. The latest
/// statement covering it decides: one for the purpose on that channel, or
/// one for the purpose as a whole (event time, then event id, orders them).
pub fn permits(records: &[Record], purpose: &str, channel: Option<&str>) -> Permit {
    let latest = records
        .iter()
        .filter(|r| r.purpose == purpose)
        .filter(|r| r.channel.is_none() || (channel.is_some() && r.channel.as_deref() == channel))
        .max_by_key(|r| (r.at, r.event_id));
    match latest {
        Some(r) => Permit {
            allowed: r.granted,
            basis: Basis::Recorded(r.clone()),
        },
        None if purpose == SERVICE => Permit {
            allowed: true,
            basis: Basis::ServiceDefault,
        },
        None => Permit {
            allowed: false,
            basis: Basis::Absent,
        },
    }
}

/// The records of a map kept by the profile fold.
pub fn records(map: &BTreeMap<String, crate::profile::Sourced<Grant>>) -> Vec<Record> {
    map.iter()
        .map(|(k, s)| {
            let (purpose, channel) = match k.split_once(':') {
                Some((p, c)) => (p.to_owned(), Some(c.to_owned())),
                None => (k.clone(), None),
            };
            Record {
                purpose,
                channel,
                granted: s.value.granted,
                notice_version: s.value.notice_version.clone(),
                at: s.at,
                event_id: s.event_id,
                source_id: s.source_id.clone(),
                via: s.channel,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventId;
    use serde_json::json;

    fn props(v: Value) -> Attributes {
        v.as_object().cloned().unwrap_or_default()
    }

    fn record(purpose: &str, channel: Option<&str>, granted: bool, at: i64) -> Record {
        Record {
            purpose: purpose.into(),
            channel: channel.map(str::to_owned),
            granted,
            notice_version: None,
            at,
            event_id: EventId(uuid::Uuid::from_u128(at as u128)),
            source_id: "s".into(),
            via: crate::Channel::Web,
        }
    }

    #[test]
    fn names_are_normalised_and_segment_categories_map_onto_purposes() {
        assert_eq!(purpose("Marketing").unwrap(), "marketing");
        assert_eq!(purpose("Advertising").unwrap(), "marketing");
        assert_eq!(purpose("StrictlyNecessary").unwrap(), "service");
        assert_eq!(purpose("personalization").unwrap(), "personalisation");
        assert_eq!(purpose("data sharing").unwrap(), "data_sharing");
        assert!(purpose("").unwrap_err().contains("empty"));
        assert!(purpose("mark<eting").unwrap_err().contains("not a purpose"));
        assert_eq!(channel("Phone").unwrap(), "phone_call");
        assert_eq!(channel("Zalo").unwrap(), "zalo");
        assert!(channel("pigeon").unwrap_err().contains("email, sms"));
    }

    #[test]
    fn every_shape_reads_and_bad_ones_name_their_field() {
        let c = changes_in(
            &EventType::ConsentUpdated,
            &props(json!({"purpose": "marketing", "channel": "email", "granted": "yes", "notice_version": "v3"})),
        )
        .unwrap();
        assert_eq!(
            c,
            vec![Change {
                purpose: "marketing".into(),
                channel: Some("email".into()),
                granted: true,
                notice_version: Some("v3".into())
            }]
        );
        let c = changes_in(
            &EventType::from("Page Viewed"),
            &props(json!({"consent": {"categories": {"Advertising": false, "Analytics": true}}})),
        )
        .unwrap();
        assert_eq!(c.len(), 2);
        assert!(c.iter().any(|c| c.purpose == "marketing" && !c.granted));
        let c = changes_in(
            &EventType::ConsentUpdated,
            &props(json!({"consent": {"grants": [{"purpose": "marketing", "channel": "sms", "granted": false}], "notice_version": "n1"}})),
        )
        .unwrap();
        assert_eq!(c[0].key(), "marketing:sms");
        assert_eq!(c[0].notice_version.as_deref(), Some("n1"));

        let e = changes_in(&EventType::ConsentUpdated, &props(json!({}))).unwrap_err();
        assert_eq!(e[0].field, "properties.purpose");
        let e = changes_in(
            &EventType::ConsentUpdated,
            &props(json!({"purpose": "marketing", "granted": "maybe", "channel": "pigeon"})),
        )
        .unwrap_err();
        let fields: Vec<_> = e.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"properties.granted"), "{fields:?}");
        assert!(fields.contains(&"properties.channel"), "{fields:?}");
        let e = changes_in(
            &EventType::from("Order Completed"),
            &props(json!({"consent": {"grants": [{"purpose": "marketing"}]}})),
        )
        .unwrap_err();
        assert_eq!(e[0].field, "properties.consent.grants[0].granted");
        // A shop's own non-object `consent` property on an ordinary event
        // is not a statement (and not an error); on Consent Updated it is.
        assert!(
            changes_in(
                &EventType::from("Signed Up"),
                &props(json!({"consent": true}))
            )
            .unwrap()
            .is_empty()
        );
        let e = changes_in(
            &EventType::ConsentUpdated,
            &props(json!({"consent": "yes"})),
        )
        .unwrap_err();
        assert_eq!(e[0].field, "properties.consent");
        // No consent at all on an ordinary event: nothing to say.
        assert!(
            changes_in(
                &EventType::from("Order Completed"),
                &props(json!({"total": 1}))
            )
            .unwrap()
            .is_empty()
        );
    }

    #[test]
    fn silence_is_not_consent_except_for_the_service() {
        assert!(!permits(&[], "marketing", Some("email")).allowed);
        assert_eq!(permits(&[], "marketing", None).basis, Basis::Absent);
        assert!(permits(&[], "service", Some("sms")).allowed);
        let withdrawn = [record("service", None, false, 5)];
        assert!(!permits(&withdrawn, "service", Some("sms")).allowed);
    }

    #[test]
    fn the_latest_statement_covering_the_use_decides() {
        // Granted for email, then marketing withdrawn as a whole.
        let r = [
            record("marketing", Some("email"), true, 1),
            record("marketing", None, false, 2),
        ];
        assert!(!permits(&r, "marketing", Some("email")).allowed);
        // Granted as a whole, then withdrawn for sms only.
        let r = [
            record("marketing", None, true, 1),
            record("marketing", Some("sms"), false, 2),
        ];
        assert!(permits(&r, "marketing", Some("email")).allowed);
        assert!(!permits(&r, "marketing", Some("sms")).allowed);
        // A use that contacts nobody: a channel-only grant does not cover it.
        let r = [record("marketing", Some("email"), true, 1)];
        assert!(!permits(&r, "marketing", None).allowed);
        // Other purposes are untouched.
        assert!(!permits(&r, "analytics", Some("email")).allowed);
    }

    #[test]
    fn grants_read_plain_booleans_from_older_profiles() {
        let g: Grant = serde_json::from_value(json!(true)).unwrap();
        assert!(g.granted && g.notice_version.is_none());
        let g: Grant =
            serde_json::from_value(json!({"granted": false, "notice_version": "v2"})).unwrap();
        assert_eq!(g.notice_version.as_deref(), Some("v2"));
        let back: Grant = serde_json::from_value(serde_json::to_value(&g).unwrap()).unwrap();
        assert_eq!(back, g);
    }
}
