//! Webhook adapters for Zalo Official Account and Facebook Messenger, from
//! their public payload formats, with their request signatures verified.

use cdp_domain::{Attributes, FieldError, RawIdentifier, RawTouchpoint};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

const WEBHOOK_NAMESPACE: Uuid = Uuid::from_u128(0x9d2e_41c0_7a35_4b8f_b1e6_2c7d_05a9_f318);

fn stable_id(parts: &[&str]) -> String {
    Uuid::new_v5(&WEBHOOK_NAMESPACE, parts.join("\u{0}").as_bytes()).to_string()
}

fn attrs(v: Value) -> Attributes {
    match v {
        Value::Object(m) => m,
        _ => Attributes::new(),
    }
}

/// Constant-time comparison of two hex digests.
fn same_digest(expected: &[u8], given_hex: &str) -> bool {
    match hex::decode(given_hex.trim()) {
        Ok(given) => {
            given.len() == expected.len()
                && given
                    .iter()
                    .zip(expected)
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        }
        Err(_) => false,
    }
}

/// Facebook signs the raw body with the app secret:
/// `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(app_secret, body)>`.
pub fn messenger_signature_ok(app_secret: &str, body: &[u8], header: Option<&str>) -> bool {
    let Some(given) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    same_digest(&mac.finalize().into_bytes(), given)
}

/// Zalo OA signs each event: `X-ZEvent-Signature: mac=<hex sha256(app_id +
/// body + timestamp + oa_secret_key)>`, with the event's own `app_id` and
/// `timestamp`.
pub fn zalo_signature_ok(oa_secret_key: &str, body: &[u8], header: Option<&str>) -> bool {
    let Some(given) = header.map(|h| h.trim().strip_prefix("mac=").unwrap_or(h.trim())) else {
        return false;
    };
    let Ok(event) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let app_id = event.get("app_id").map(value_text).unwrap_or_default();
    let timestamp = event.get("timestamp").map(value_text).unwrap_or_default();
    let mut hasher = Sha256::new();
    hasher.update(app_id.as_bytes());
    hasher.update(body);
    hasher.update(timestamp.as_bytes());
    hasher.update(oa_secret_key.as_bytes());
    same_digest(&hasher.finalize(), given)
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

fn millis(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A Zalo OA event as a touchpoint: messages from a user become
/// `Message Received` on the chat channel; follow and unfollow become
/// `OA Followed` / `OA Unfollowed` on the social channel (an unfollow also
/// withdraws marketing on Zalo). Other events are acknowledged and ignored
/// (`Ok(None)`).
pub fn zalo_event(body: &Value, source_id: &str) -> Result<Option<RawTouchpoint>, FieldError> {
    let name = body
        .get("event_name")
        .and_then(Value::as_str)
        .ok_or_else(|| FieldError::new("event_name", "is required"))?;
    let at = millis(body.get("timestamp"));
    let (event_type, channel, user, user_field, properties) = match name {
        n if n.starts_with("user_send_") => {
            let sender = body
                .pointer("/sender/id")
                .map(value_text)
                .unwrap_or_default();
            let message = body.get("message").cloned().unwrap_or(Value::Null);
            let text = message.get("text").map(value_text).unwrap_or_default();
            let msg_id = message.get("msg_id").map(value_text).unwrap_or_default();
            (
                "Message Received",
                "chat",
                sender,
                "sender.id",
                json!({"text": text, "msg_id": msg_id, "zalo_event": n}),
            )
        }
        "follow" | "unfollow" => {
            let follower = body
                .pointer("/follower/id")
                .map(value_text)
                .unwrap_or_default();
            let t = if name == "follow" {
                "OA Followed"
            } else {
                "OA Unfollowed"
            };
            let mut props = json!({"oa_id": body.get("oa_id").map(value_text).unwrap_or_default()});
            // Unfollowing the OA withdraws what it may send on Zalo. A
            // follow is not taken as consent to marketing (Decree 13 wants
            // it per purpose): that needs an explicit statement.
            if name == "unfollow" {
                props["consent"] = json!({"grants": [
                    {"purpose": "marketing", "channel": "zalo", "granted": false}
                ]});
            }
            (t, "social", follower, "follower.id", props)
        }
        _ => return Ok(None),
    };
    if user.is_empty() {
        return Err(FieldError::new(user_field, "the Zalo user id is missing"));
    }
    let key_part = properties
        .get("msg_id")
        .map(value_text)
        .filter(|s| !s.is_empty());
    let at_text = at.map(|a| a.to_string()).unwrap_or_default();
    let event_id = match key_part {
        Some(msg) => stable_id(&["zalo", &msg]),
        None => stable_id(&["zalo", name, &user, &at_text]),
    };
    let mut properties = attrs(properties);
    // The app-scoped id of the same user: kept on the event for reference.
    if let Some(by_app) = body
        .get("user_id_by_app")
        .map(value_text)
        .filter(|s| !s.is_empty())
    {
        properties.insert("user_id_by_app".into(), Value::String(by_app));
    }
    Ok(Some(RawTouchpoint {
        event_id: Some(event_id),
        event_type: Some(event_type.into()),
        channel: Some(channel.into()),
        source_id: Some(source_id.into()),
        occurred_at: at,
        identifiers: vec![RawIdentifier::new("zalo_id", user)],
        traits: Attributes::new(),
        properties,
    }))
}

/// Whether a Zalo event's signed timestamp is within `max_age_secs` of
/// `now` (either way): the signature covers the timestamp, so a request
/// captured and sent again later is refused, saying why.
pub fn zalo_fresh(body: &Value, now: i64, max_age_secs: u64) -> Result<(), String> {
    let Some(at) = millis(body.get("timestamp")) else {
        return Err("timestamp: is required (it is signed, and bounds a replay)".into());
    };
    let window = i64::try_from(max_age_secs)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    let age = now.saturating_sub(at);
    if age > window || age < -window {
        return Err(format!(
            "timestamp: the event is {}s {} now; events more than {max_age_secs}s away are refused \
             (a replayed request?)",
            age.unsigned_abs() / 1000,
            if age > 0 { "before" } else { "after" }
        ));
    }
    Ok(())
}

/// The messages of a Messenger webhook call (`object: page`), one touchpoint
/// per message, keyed by the page-scoped id of the sender.
pub fn messenger_events(body: &Value, source_id: &str) -> Result<Vec<RawTouchpoint>, FieldError> {
    if body.get("object").and_then(Value::as_str) != Some("page") {
        return Err(FieldError::new(
            "object",
            "must be \"page\" for Messenger webhooks",
        ));
    }
    let entries = body
        .get("entry")
        .and_then(Value::as_array)
        .ok_or_else(|| FieldError::new("entry", "is required"))?;
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let page = entry.get("id").map(value_text).unwrap_or_default();
        for (j, m) in entry
            .get("messaging")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let Some(message) = m.get("message") else {
                continue;
            };
            if message.get("is_echo").and_then(Value::as_bool) == Some(true) {
                continue;
            }
            let psid = m.pointer("/sender/id").map(value_text).unwrap_or_default();
            if psid.is_empty() {
                return Err(FieldError::new(
                    format!("entry[{i}].messaging[{j}].sender.id"),
                    "is required",
                ));
            }
            let mid = message.get("mid").map(value_text).unwrap_or_default();
            let text = message.get("text").map(value_text).unwrap_or_default();
            let at = millis(m.get("timestamp"));
            // The message id makes a redelivery the same event; without
            // one, the whole message does (two different messages never
            // collapse into one).
            let event_id = if mid.is_empty() {
                stable_id(&["messenger-without-mid", &psid, &m.to_string()])
            } else {
                stable_id(&["messenger", &mid, &psid])
            };
            out.push(RawTouchpoint {
                event_id: Some(event_id),
                event_type: Some("Message Received".into()),
                channel: Some("chat".into()),
                source_id: Some(source_id.into()),
                occurred_at: at,
                identifiers: vec![RawIdentifier::new("facebook_psid", psid)],
                traits: Attributes::new(),
                properties: attrs(json!({"text": text, "mid": mid, "page_id": page})),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messenger_signatures_are_checked() {
        let body = br#"{"object":"page"}"#;
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(body);
        let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert!(messenger_signature_ok("s3cret", body, Some(&sig)));
        assert!(!messenger_signature_ok("other", body, Some(&sig)));
        assert!(!messenger_signature_ok("s3cret", b"{}", Some(&sig)));
        assert!(!messenger_signature_ok("s3cret", body, None));
    }

    #[test]
    fn zalo_signatures_are_checked() {
        let body = br#"{"app_id":"123","event_name":"follow","timestamp":"1700000000000","follower":{"id":"84"}}"#;
        let mut h = Sha256::new();
        h.update(b"123");
        h.update(body);
        h.update(b"1700000000000");
        h.update(b"key");
        let sig = format!("mac={}", hex::encode(h.finalize()));
        assert!(zalo_signature_ok("key", body, Some(&sig)));
        assert!(!zalo_signature_ok("nope", body, Some(&sig)));
    }

    #[test]
    fn unfollowing_the_oa_withdraws_marketing_on_zalo() {
        let at = |name: &str| json!({"event_name": name, "timestamp": "1700000000000", "oa_id": "9", "follower": {"id": "84"}});
        let t = zalo_event(&at("unfollow"), "zalo-oa").unwrap().unwrap();
        let changes = cdp_domain::consent::changes_in(
            &cdp_domain::EventType::from("OA Unfollowed"),
            &t.properties,
        )
        .unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].key(), "marketing:zalo");
        assert!(!changes[0].granted);
        let t = zalo_event(&at("follow"), "zalo-oa").unwrap().unwrap();
        assert!(
            t.properties.get("consent").is_none(),
            "a follow grants nothing"
        );
    }

    #[test]
    fn a_zalo_text_message_is_a_chat_touchpoint() {
        let body = json!({"app_id": "1", "user_id_by_app": "552", "event_name": "user_send_text",
            "timestamp": "1700000000000", "sender": {"id": "246845883529197922"}, "recipient": {"id": "388613280878808645"},
            "message": {"text": "Xin chào", "msg_id": "abc"}});
        let t = zalo_event(&body, "zalo-oa").unwrap().unwrap();
        assert_eq!(t.event_type.as_deref(), Some("Message Received"));
        assert_eq!(t.identifiers[0].kind, "zalo_id");
        assert_eq!(t.identifiers[0].value, "246845883529197922");
        assert_eq!(t.occurred_at, Some(1_700_000_000_000));
        assert_eq!(t.properties["text"], json!("Xin chào"));
        let again = zalo_event(&body, "zalo-oa").unwrap().unwrap();
        assert_eq!(
            t.event_id, again.event_id,
            "a retried webhook keeps its event id"
        );
    }

    #[test]
    fn zalo_events_outside_the_window_are_refused() {
        let now = 1_700_000_000_000;
        let at = |t: i64| json!({"event_name": "follow", "timestamp": t.to_string()});
        assert!(zalo_fresh(&at(now - 60_000), now, 900).is_ok());
        let old = zalo_fresh(&at(1_577_836_800_000), now, 900).unwrap_err();
        assert!(old.contains("before now") && old.contains("900s"), "{old}");
        assert!(zalo_fresh(&at(now + 3_600_000), now, 900).is_err());
        assert!(zalo_fresh(&json!({"event_name": "follow"}), now, 900).is_err());
    }

    #[test]
    fn messenger_messages_without_mid_stay_apart_and_redeliveries_collapse() {
        let body = json!({"object": "page", "entry": [{"id": "PAGE", "messaging": [
            {"sender": {"id": "6000001"}, "recipient": {"id": "PAGE"}, "timestamp": 1700000000000i64,
             "message": {"text": "first"}},
            {"sender": {"id": "6000001"}, "recipient": {"id": "PAGE"}, "timestamp": 1700000000000i64,
             "message": {"text": "second"}}]}]});
        let events = messenger_events(&body, "facebook-page").unwrap();
        assert_eq!(events.len(), 2);
        assert_ne!(events[0].event_id, events[1].event_id);
        let again = messenger_events(&body, "facebook-page").unwrap();
        assert_eq!(events[0].event_id, again[0].event_id);
    }

    #[test]
    fn messenger_messages_become_touchpoints_and_echoes_are_skipped() {
        let body = json!({"object": "page", "entry": [{"id": "PAGE", "time": 1, "messaging": [
            {"sender": {"id": "6000001"}, "recipient": {"id": "PAGE"}, "timestamp": 1700000000000i64,
             "message": {"mid": "m1", "text": "hello"}},
            {"sender": {"id": "PAGE"}, "recipient": {"id": "6000001"}, "timestamp": 1700000000001i64,
             "message": {"mid": "m2", "text": "hi", "is_echo": true}}]}]});
        let events = messenger_events(&body, "fb-page").unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].identifiers[0].kind, "facebook_psid");
        assert_eq!(events[0].identifiers[0].value, "6000001");
    }
}
