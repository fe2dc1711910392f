//! The Segment spec's HTTP payloads (track, identify, page, screen, group,
//! alias, batch) mapped onto touchpoints, so existing Segment and
//! RudderStack SDKs can send here unchanged.

use cdp_domain::{Attributes, Channel, FieldError, RawIdentifier, RawTouchpoint, UnixMillis};
use chrono::DateTime;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

/// Namespace of event ids derived from non-UUID `messageId`s.
const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x3f6c_9e2a_51b7_4d0e_8a41_c2d9_7b15_e603);

/// One Segment call, as sent alone or inside a batch.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// `track`, `identify`, `page`, `screen`, `group` or `alias`; implied by
    /// the endpoint for single calls, required inside a batch.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub message_id: Option<String>,
    pub user_id: Option<Value>,
    pub anonymous_id: Option<Value>,
    pub previous_id: Option<Value>,
    pub group_id: Option<Value>,
    pub event: Option<String>,
    pub name: Option<String>,
    pub category: Option<String>,
    pub timestamp: Option<String>,
    pub original_timestamp: Option<String>,
    pub sent_at: Option<String>,
    #[serde(default)]
    pub context: Attributes,
    #[serde(default)]
    pub traits: Attributes,
    #[serde(default)]
    pub properties: Attributes,
    #[serde(default)]
    pub integrations: Attributes,
}

/// A Segment message from its JSON, or the field of the wrong type:
/// `field` is its path (`event`, `context.traits.email`; empty for the
/// message itself).
pub fn message_from_json(value: Value) -> Result<Message, FieldError> {
    serde_path_to_error::deserialize::<_, Message>(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        FieldError::new(field, e.into_inner().to_string())
    })
}

/// [`message_from_json`] from the message's JSON text, without building a
/// `Value` first.
pub fn message_from_str(text: &str) -> Result<Message, FieldError> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize::<_, Message>(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        FieldError::new(field, e.into_inner().to_string())
    })
}

/// A `/v1/batch` body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Batch {
    pub batch: Vec<Message>,
    pub sent_at: Option<String>,
    #[serde(default)]
    pub context: Attributes,
    pub write_key: Option<String>,
}

/// Where the messages come from, as configured.
#[derive(Debug, Clone)]
pub struct SourceContext<'a> {
    pub source_id: &'a str,
    pub channel: Channel,
    pub received_at: UnixMillis,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn parse_time(field: &str, s: &str) -> Result<UnixMillis, FieldError> {
    DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|e| FieldError::new(field, format!("{s:?} is not an ISO 8601 timestamp: {e}")))
}

/// The event type a message becomes.
pub fn event_type(kind: &str, m: &Message) -> Result<String, FieldError> {
    match kind {
        "track" => m
            .event
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| FieldError::new("event", "is required for a track call")),
        "identify" => Ok("Identify".into()),
        "page" => Ok("Page Viewed".into()),
        "screen" => Ok("Screen Viewed".into()),
        "group" => Ok("Group Joined".into()),
        "alias" => Ok("Alias".into()),
        other => Err(FieldError::new(
            "type",
            format!(
                "{other:?} is not a Segment call; expected track, identify, page, screen, group or alias"
            ),
        )),
    }
}

/// Maps Segment's `context.channel` (browser, mobile, server) or one of our
/// channel names onto a channel; the source's channel otherwise.
fn channel_of(m: &Message, source: &SourceContext<'_>) -> Channel {
    match m
        .context
        .get("channel")
        .and_then(Value::as_str)
        .map(str::to_ascii_lowercase)
    {
        Some(c) if c == "browser" => Channel::Web,
        Some(c) if c == "mobile" => Channel::App,
        Some(c) => c.parse().unwrap_or(source.channel),
        None => source.channel,
    }
}

/// The event id: the `messageId` when it is a UUID, else a UUID derived
/// from the source and the `messageId`, so retries stay idempotent.
pub fn event_id(source_id: &str, message_id: &str) -> String {
    match Uuid::parse_str(message_id.trim()) {
        Ok(u) => u.to_string(),
        Err(_) => Uuid::new_v5(
            &MESSAGE_ID_NAMESPACE,
            format!("{source_id}\u{0}{message_id}").as_bytes(),
        )
        .to_string(),
    }
}

/// Maps one message onto a raw touchpoint. `kind` is the call type (from the
/// endpoint or the message); `batch_sent_at` is the batch's `sentAt`.
pub fn to_touchpoint(
    kind: &str,
    m: &Message,
    batch_sent_at: Option<&str>,
    source: &SourceContext<'_>,
) -> Result<RawTouchpoint, Vec<FieldError>> {
    let mut errors = Vec::new();
    let event_type = event_type(kind, m).map_err(|e| errors.push(e)).ok();

    // Clock-skew correction: the device clock stamped both `timestamp` and
    // `sentAt`; shift by how far its clock is off ours.
    let occurred_at = match m.timestamp.as_deref().or(m.original_timestamp.as_deref()) {
        None => None,
        Some(ts) => match parse_time("timestamp", ts) {
            Ok(t) => match m.sent_at.as_deref().or(batch_sent_at) {
                Some(sent) => match parse_time("sentAt", sent) {
                    Ok(s) => Some(t + (source.received_at - s)),
                    Err(e) => {
                        errors.push(e);
                        None
                    }
                },
                None => Some(t),
            },
            Err(e) => {
                errors.push(e);
                None
            }
        },
    };

    let mut traits = m
        .context
        .get("traits")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    traits.extend(m.traits.clone());
    let mut identifiers = Vec::new();
    if let Some(u) = m.user_id.as_ref().and_then(text) {
        identifiers.push(RawIdentifier::new("user_id", u));
    }
    if let Some(a) = m.anonymous_id.as_ref().and_then(text) {
        identifiers.push(RawIdentifier::new("anonymous_id", a));
    }
    if kind == "alias"
        && let Some(p) = m.previous_id.as_ref().and_then(text)
    {
        identifiers.push(RawIdentifier::new("anonymous_id", p));
    }
    for (trait_key, kind) in [("email", "email"), ("phone", "phone")] {
        if let Some(v) = traits.get(trait_key).and_then(text) {
            identifiers.push(RawIdentifier::new(kind, v));
        }
    }
    if let Some(device) = m
        .context
        .get("device")
        .and_then(|d| d.get("id"))
        .and_then(text)
    {
        identifiers.push(RawIdentifier::new("device_id", device));
    }
    if identifiers.is_empty() {
        errors.push(FieldError::new(
            "userId",
            "a userId or an anonymousId is required",
        ));
    }

    let mut properties = m.properties.clone();
    if kind == "page" || kind == "screen" {
        if let Some(n) = &m.name {
            properties
                .entry("name")
                .or_insert_with(|| Value::String(n.clone()));
        }
        if let Some(c) = &m.category {
            properties
                .entry("category")
                .or_insert_with(|| Value::String(c.clone()));
        }
    }
    if kind == "group"
        && let Some(g) = m.group_id.as_ref().and_then(text)
    {
        properties.insert("group_id".into(), Value::String(g));
    }
    // Segment's consent object (`context.consent.categoryPreferences`, sent
    // with every event by its consent manager) becomes the platform's
    // consent statement, with errors named as the client sent them.
    if let Some(prefs) = m
        .context
        .get("consent")
        .and_then(|c| c.get("categoryPreferences"))
        .filter(|p| !p.is_null())
        && !properties.contains_key("consent")
    {
        let mut consent = serde_json::Map::new();
        consent.insert("categories".into(), prefs.clone());
        if let Some(v) = m
            .context
            .get("consent")
            .and_then(|c| c.get("noticeVersion"))
            .cloned()
        {
            consent.insert("notice_version".into(), v);
        }
        properties.insert("consent".into(), Value::Object(consent));
        if let Err(e) = cdp_domain::consent::changes_in(
            &cdp_domain::EventType::from("Segment Consent"),
            &properties,
        ) {
            errors.extend(e.into_iter().map(|mut e| {
                e.field = e
                    .field
                    .replace(
                        "properties.consent.categories",
                        "context.consent.categoryPreferences",
                    )
                    .replace(
                        "properties.consent.notice_version",
                        "context.consent.noticeVersion",
                    );
                e
            }));
        }
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(RawTouchpoint {
        event_id: m
            .message_id
            .as_deref()
            .map(|id| event_id(source.source_id, id)),
        event_type,
        channel: Some(channel_of(m, source).to_string()),
        source_id: Some(source.source_id.to_owned()),
        occurred_at,
        identifiers,
        traits,
        properties,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source() -> SourceContext<'static> {
        SourceContext {
            source_id: "website",
            channel: Channel::Web,
            received_at: 1_760_000_010_000,
        }
    }

    fn message(v: Value) -> Message {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn identify_links_user_id_anonymous_id_email_and_phone() {
        let m = message(
            json!({"userId": "u-1", "anonymousId": "a-1", "messageId": "m-1",
            "traits": {"email": "Lan@Shop.vn", "phone": "0912345678", "name": "Lan"}}),
        );
        let t = to_touchpoint("identify", &m, None, &source()).unwrap();
        assert_eq!(t.event_type.as_deref(), Some("Identify"));
        let kinds: Vec<&str> = t.identifiers.iter().map(|i| i.kind.as_str()).collect();
        assert_eq!(kinds, vec!["user_id", "anonymous_id", "email", "phone"]);
        assert_eq!(t.traits["name"], json!("Lan"));
    }

    #[test]
    fn message_ids_become_stable_uuids() {
        let a = event_id("website", "ajs-next-123");
        assert_eq!(a, event_id("website", "ajs-next-123"));
        assert_ne!(a, event_id("app", "ajs-next-123"));
        let u = "0b6b8a39-5b8e-4a7d-9f3e-111111111111";
        assert_eq!(event_id("website", u), u);
    }

    #[test]
    fn sent_at_corrects_the_device_clock() {
        // The device clock is 10 s behind: timestamp and sentAt both read 10 s early.
        let m = message(json!({"anonymousId": "a", "event": "Product Viewed",
            "timestamp": "2025-10-09T08:53:10Z", "sentAt": "2025-10-09T08:53:20Z"}));
        let t = to_touchpoint("track", &m, None, &source()).unwrap();
        // received_at = 2025-10-09T08:53:30Z
        assert_eq!(t.occurred_at, Some(1_760_000_000_000));
    }

    #[test]
    fn segment_consent_preferences_become_consent_statements() {
        let m = message_from_json(json!({"anonymousId": "a", "event": "Product Viewed",
            "context": {"consent": {"categoryPreferences": {"Advertising": false, "Analytics": true}}}}))
        .unwrap();
        let t = to_touchpoint("track", &m, None, &source()).unwrap();
        let changes = cdp_domain::consent::changes_in(
            &cdp_domain::EventType::from("Product Viewed"),
            &t.properties,
        )
        .unwrap();
        assert!(
            changes
                .iter()
                .any(|c| c.purpose == "marketing" && !c.granted)
        );
        assert!(
            changes
                .iter()
                .any(|c| c.purpose == "analytics" && c.granted)
        );

        let m = message_from_json(json!({"anonymousId": "a", "event": "X",
            "context": {"consent": {"categoryPreferences": {"Advertising": "perhaps"}}}}))
        .unwrap();
        let e = to_touchpoint("track", &m, None, &source()).unwrap_err();
        assert_eq!(
            e[0].field,
            "context.consent.categoryPreferences.Advertising"
        );
    }

    #[test]
    fn context_channel_and_device_id_are_used() {
        let m = message(
            json!({"anonymousId": "a", "event": "X", "context": {"channel": "mobile", "device": {"id": "D1"}}}),
        );
        let t = to_touchpoint("track", &m, None, &source()).unwrap();
        assert_eq!(t.channel.as_deref(), Some("app"));
        assert!(
            t.identifiers
                .iter()
                .any(|i| i.kind == "device_id" && i.value == "D1")
        );
    }

    #[test]
    fn bad_messages_name_their_fields() {
        let m = message(json!({"event": "X"}));
        let e = to_touchpoint("track", &m, None, &source()).unwrap_err();
        assert_eq!(e[0].field, "userId");
        let m = message(json!({"userId": "u"}));
        assert_eq!(
            to_touchpoint("track", &m, None, &source()).unwrap_err()[0].field,
            "event"
        );
        let m = message(json!({"userId": "u", "event": "X", "timestamp": "yesterday"}));
        assert_eq!(
            to_touchpoint("track", &m, None, &source()).unwrap_err()[0].field,
            "timestamp"
        );
        assert_eq!(
            to_touchpoint("fly", &m, None, &source()).unwrap_err()[0].field,
            "type"
        );
    }
}
