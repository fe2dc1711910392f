//! The targets: each hands its bytes to the real decoder, the way the
//! service does, and checks what comes back.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::LazyLock;

use arbitrary::Unstructured;
use cdp_config::{ConfigError, PlatformConfig};
use cdp_domain::normalize::{EmailPolicy, MAX_IDENTIFIER_LEN, PhonePolicy, normalize};
use cdp_domain::{
    Channel, Context, IdKind, Identifier, IdentityRules, RawIdentifier, RawTouchpoint, Touchpoint,
    ValidationLimits, validate,
};
use cdp_ingest::segment::{self, Message, SourceContext};
use cdp_ingest::webhooks;
use cdp_log::LogRecord;
use cdp_pipeline::{CodecError, audit, codec, credentials, emit, header, topic};
use cdp_proto::v1;
use prost::Message as _;
use serde_json::Value;
use uuid::Uuid;

use crate::check::{
    CONFIG_BYTES_PER_INPUT_BYTE, Violation, ensure, field_error, field_errors, json_syntax_error,
    measured, measured_with, names_a_field_or_position, non_empty,
};
use crate::{Outcome, inputs};

/// One fuzz target.
pub struct Target {
    /// Also the name of its folders: `corpus/<name>/`, `artifacts/<name>/`.
    pub name: &'static str,
    /// The decoder it drives.
    pub about: &'static str,
    pub run: fn(&[u8]) -> Result<Outcome, Violation>,
    /// A structured input from random bytes.
    pub generate: fn(&mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>>,
    /// Tokens the mutator inserts.
    pub dictionary: &'static [&'static str],
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "segment",
        about: "Segment HTTP API body (/v1/<call>, /v1/batch) -> segment::to_touchpoint -> validate",
        run: segment,
        generate: inputs::segment,
        dictionary: &[
            "\"userId\":",
            "\"anonymousId\":",
            "\"type\":",
            "\"event\":",
            "\"batch\":[",
            "\"timestamp\":",
            "\"sentAt\":",
            "\"context\":{",
            "\"traits\":{",
            "\"email\":",
            "\"phone\":",
            "\"messageId\":",
            "\"channel\":",
            "\"device\":{\"id\":",
            "\"properties\":{",
            "\"previousId\":",
            "\"groupId\":",
            "\"track\"",
            "\"alias\"",
            "\"page\"",
            "null",
            "true",
            "[]",
            "{}",
            "\"2025-10-09T08:53:10Z\"",
            "\"+99999-01-01T00:00:00Z\"",
            "\"Order Completed\"",
            "\"total\":",
            "\"currency\":",
            "\\u0000",
            "1e999",
        ],
    },
    Target {
        name: "zalo",
        about: "Zalo OA webhook body -> webhooks::zalo_event -> validate",
        run: zalo,
        generate: inputs::zalo,
        dictionary: &[
            "\"event_name\":",
            "\"user_send_text\"",
            "\"follow\"",
            "\"unfollow\"",
            "\"sender\":{",
            "\"follower\":{",
            "\"id\":",
            "\"message\":{",
            "\"msg_id\":",
            "\"text\":",
            "\"timestamp\":",
            "\"user_id_by_app\":",
            "\"oa_id\":",
            "\"app_id\":",
            "null",
            "[]",
            "{}",
            "\"1700000000000\"",
            "9223372036854775807",
        ],
    },
    Target {
        name: "messenger",
        about: "Messenger webhook body -> webhooks::messenger_events -> validate",
        run: messenger,
        generate: inputs::messenger,
        dictionary: &[
            "\"object\":",
            "\"page\"",
            "\"entry\":[",
            "\"messaging\":[",
            "\"sender\":{",
            "\"id\":",
            "\"message\":{",
            "\"mid\":",
            "\"text\":",
            "\"is_echo\":",
            "true",
            "\"timestamp\":",
            "null",
            "[]",
            "{}",
        ],
    },
    Target {
        name: "codec",
        about: "log record values: codec::decode_* (touchpoint, resolved, alert, dead letter, redrive), \
                touchpoint_from_record, audit::decode, credentials::read, emit readers",
        run: records,
        generate: inputs::record,
        dictionary: &[
            "\x08\x01",
            "\x08\x02",
            "\x08\x00",
            "\x12\x00",
            "\x1a\x00",
            "\x0a\x24",
            "\x22\x00",
            "\x12\x24",
            "\x7b\x7d",
            "{\"chain\":",
            "\"seq\":",
            "\"change\":\"issued\"",
            "\"change\":\"revoked\"",
            "\"entry\":{",
            "\"at\":",
        ],
    },
    Target {
        name: "identifier",
        about: "`kind[@region]:value` -> IdKind::parse -> normalize::normalize",
        run: identifier,
        generate: inputs::identifier,
        dictionary: &[
            "email:",
            "phone:",
            "phone@US:",
            "zalo_id:",
            "loyalty_id:",
            "device_id:",
            "user_id:",
            "custom_kind:",
            "@",
            "+",
            ".",
            "+84",
            "0162",
            "gmail.com",
            "googlemail.com",
            "İ",
            "ß",
            "ﬃ",
            "\u{200b}",
            "\u{0}",
        ],
    },
    Target {
        name: "validate",
        about: "gRPC IngestService/Track body (TrackRequest) -> convert::raw_touchpoint -> validate",
        run: track,
        generate: inputs::track,
        dictionary: &[
            "\x0a", "\x12", "\x1a", "\x22", "\x2a", "\x32", "\x3a", "\x0a\x00", "\x08\x01",
        ],
    },
    Target {
        name: "rules",
        about: "[identity] TOML -> PlatformConfig::load -> IdentityRules (blocked, released, patterns)",
        run: rules,
        generate: inputs::toml,
        dictionary: TOML_DICTIONARY,
    },
    Target {
        name: "config",
        about: "whole TOML configuration -> PlatformConfig::load and what the processes derive from it",
        run: config,
        generate: inputs::toml,
        dictionary: TOML_DICTIONARY,
    },
];

const TOML_DICTIONARY: &[&str] = &[
    "[identity]\n",
    "[identity.kinds.phone]\n",
    "[identity.kinds.x]\n",
    "[validation]\n",
    "[[sources]]\n",
    "[log]\n",
    "[pipeline]\n",
    "[access]\n",
    "priority = ",
    "limit = ",
    "blocked = [\"",
    "blocked_patterns = [\"",
    "released = [\"",
    "shared_by_at_most = ",
    "recycle_after_days = ",
    "max_future_skew_secs = ",
    "max_age_days = ",
    "max_identifiers = ",
    "max_event_bytes = ",
    "partitions = ",
    "processes = ",
    "process_index = ",
    "default_region = ",
    "domain_aliases = [[",
    "grpc_addr = \"0.0.0.0:1\"",
    "\"",
    "[",
    "]",
    "{",
    "}",
    "=",
    "\n",
    "'''",
    "\"\"\"",
    "9223372036854775807",
    "-1",
    "inf",
    "1979-05-27",
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

// ---- shared ---------------------------------------------------------------

/// The clock of every validation (the unit tests' "now").
pub const NOW: i64 = 1_760_000_010_000;

fn context() -> Context {
    Context {
        now: NOW,
        fresh_event_id: Uuid::from_u128(0x5eed),
    }
}

static RULES: LazyLock<IdentityRules> = LazyLock::new(IdentityRules::default);
static LIMITS: LazyLock<ValidationLimits> = LazyLock::new(ValidationLimits::default);

fn source() -> SourceContext<'static> {
    SourceContext {
        source_id: "website",
        channel: Channel::Web,
        received_at: NOW,
    }
}

/// Parses a body as the HTTP handlers do (`json_body`): a refusal must
/// carry serde_json's position.
fn json_body(what: &str, bytes: &[u8]) -> Result<Result<Value, String>, Violation> {
    match measured(what, bytes.len(), || serde_json::from_slice::<Value>(bytes))? {
        Ok(v) => Ok(Ok(v)),
        Err(e) => Ok(Err(format!(
            "body: is not valid JSON: {}",
            json_syntax_error(what, &e)?
        ))),
    }
}

fn is_uuid(s: Option<&str>) -> bool {
    s.is_some_and(|s| Uuid::parse_str(s).is_ok())
}

/// Validates `raw` as the ingestor does; an accepted touchpoint must be
/// normalised for good (normalising its identifiers again changes nothing)
/// and must come back from the log codec unchanged.
fn validated(
    what: &str,
    raw: &RawTouchpoint,
    rules: &IdentityRules,
    limits: &ValidationLimits,
    len: usize,
) -> Result<Outcome, Violation> {
    let result = measured(what, len, || validate(raw, rules, limits, context()))?;
    match result {
        Err(rejection) => Ok(Outcome::Rejected(field_errors(what, &rejection.0)?)),
        Ok(t) => {
            accepted_touchpoint(what, &t, rules)?;
            Ok(Outcome::Accepted(format!(
                "valid {} with {} identifiers, {} dropped",
                t.envelope.event_type,
                t.personal.identifiers.len(),
                t.personal.dropped.len()
            )))
        }
    }
}

fn accepted_touchpoint(what: &str, t: &Touchpoint, rules: &IdentityRules) -> Result<(), Violation> {
    ensure(!t.personal.identifiers.is_empty(), || {
        format!("{what}: accepted without an identifier: {t:?}")
    })?;
    ensure(!t.envelope.event_id.0.is_nil(), || {
        format!("{what}: accepted with the nil event id")
    })?;
    for id in &t.personal.identifiers {
        let again = normalize(
            &id.kind,
            &id.value,
            rules.email_policy(),
            rules.phone_policy(),
        );
        ensure(again.as_ref() == Ok(id), || {
            format!(
                "{what}: identifier {id:?} was accepted, but normalising its value again gives {again:?}"
            )
        })?;
    }
    let back = round_trip(t);
    same_touchpoint(what, t, back.as_ref())
}

/// `t` sealed under fresh keys for its identifiers, and opened again.
fn round_trip(t: &Touchpoint) -> Option<Touchpoint> {
    let s = cdp_pipeline::seal::Sealing::fresh(&t.personal.identifiers).ok()?;
    let bytes = codec::encode_touchpoint(t, &s).ok()?;
    codec::decode_touchpoint(&bytes, &s.keys)
        .ok()
        .map(|o| o.value)
}

/// `back` must be `t`, floats included (serde_json's `float_roundtrip`).
fn same_touchpoint(what: &str, t: &Touchpoint, back: Option<&Touchpoint>) -> Result<(), Violation> {
    let Some(back) = back else {
        return Err(Violation::new(format!(
            "{what}: touchpoint {t:?} does not come back from the log codec"
        )));
    };
    if back == t {
        return Ok(());
    }
    Err(Violation::new(format!(
        "{what}: touchpoint {t:?} comes back from the log codec as {back:?}"
    )))
}

// ---- Segment ----------------------------------------------------------------

const CALLS: [&str; 6] = ["track", "identify", "page", "screen", "group", "alias"];

/// The body of `/v1/<call>` or `/v1/batch`, as `services/ingest/src/http.rs`
/// reads it: JSON, then each message as a [`Message`], then the mapping,
/// then validation.
pub fn segment(bytes: &[u8]) -> Result<Outcome, Violation> {
    let value = match json_body("segment: JSON", bytes)? {
        Ok(v) => v,
        Err(e) => return Ok(Outcome::Rejected(e)),
    };
    if value.get("batch").is_some() {
        segment_batch(&value, bytes.len())
    } else {
        segment_single(&value, bytes.len())
    }
}

/// A message as the handlers deserialise it (from the parsed value), with
/// the field the handler names on failure.
fn message(field: &str, item: &Value, len: usize) -> Result<Result<Message, String>, Violation> {
    match measured("segment: Message", len, || {
        segment::message_from_json(item.clone())
    })? {
        Ok(m) => Ok(Ok(m)),
        Err(e) => {
            non_empty("segment: Message", &e.reason)?;
            let reported = format!("{field}.{}: {}", e.field, e.reason);
            // A wrong type inside the message names its path; only a
            // message that is not an object at all has none.
            if e.field.is_empty() && item.is_object() {
                return Err(Violation::new(format!(
                    "segment: {reported:?} names neither the field nor a position"
                )));
            }
            Ok(Err(reported))
        }
    }
}

fn mapped(
    kind: &str,
    m: &Message,
    sent_at: Option<&str>,
    len: usize,
    errors: &mut Vec<String>,
) -> Result<bool, Violation> {
    let ctx = source();
    let result = measured("segment: to_touchpoint", len, || {
        segment::to_touchpoint(kind, m, sent_at, &ctx)
    })?;
    let raw = match result {
        Err(errs) => {
            errors.push(field_errors("segment: to_touchpoint", &errs)?);
            return Ok(false);
        }
        Ok(raw) => raw,
    };
    ensure(!raw.identifiers.is_empty(), || {
        format!("segment: a {kind} call mapped without an identifier: {raw:?}")
    })?;
    ensure(
        raw.event_id.is_none() || is_uuid(raw.event_id.as_deref()),
        || format!("segment: event id {:?} is not a UUID", raw.event_id),
    )?;
    ensure(
        raw.channel
            .as_deref()
            .is_some_and(|c| c.parse::<Channel>().is_ok()),
        || format!("segment: channel {:?} is not a channel", raw.channel),
    )?;
    let again = segment::to_touchpoint(kind, m, sent_at, &ctx);
    ensure(again.as_ref() == Ok(&raw), || {
        format!("segment: mapping the same {kind} call twice differs: {raw:?} then {again:?}")
    })?;
    match validated("segment: validate", &raw, &RULES, &LIMITS, len)? {
        Outcome::Accepted(_) => Ok(true),
        Outcome::Rejected(e) => {
            errors.push(e);
            Ok(false)
        }
    }
}

fn segment_single(value: &Value, len: usize) -> Result<Outcome, Violation> {
    let m = match message("body", value, len)? {
        Ok(m) => m,
        Err(e) => return Ok(Outcome::Rejected(e)),
    };
    let mut errors = Vec::new();
    let mut accepted = 0;
    for kind in CALLS {
        if mapped(kind, &m, None, len, &mut errors)? {
            accepted += 1;
        }
    }
    // A call type that is not Segment's is refused, naming `type`.
    let other = segment::to_touchpoint("fly", &m, None, &source());
    ensure(
        other
            .as_ref()
            .is_err_and(|errs| errs.iter().any(|e| e.field == "type")),
        || format!("segment: an unknown call type was not refused by `type`: {other:?}"),
    )?;
    Ok(if accepted > 0 {
        Outcome::Accepted(format!("{accepted} of 6 calls"))
    } else {
        Outcome::Rejected(errors.join(" | "))
    })
}

fn segment_batch(value: &Value, len: usize) -> Result<Outcome, Violation> {
    let Some(items) = value.get("batch").and_then(Value::as_array) else {
        return Ok(Outcome::Rejected(
            "batch: is required and must be a list".into(),
        ));
    };
    if items.is_empty() {
        return Ok(Outcome::Rejected("batch: is empty".into()));
    }
    let sent_at = value.get("sentAt").and_then(Value::as_str);
    let batch_context = value
        .get("context")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut errors = Vec::new();
    let mut accepted = 0;
    for (i, item) in items.iter().enumerate() {
        let mut m = match message(&format!("batch[{i}]"), item, len)? {
            Ok(m) => m,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        for (k, v) in &batch_context {
            m.context.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let Some(kind) = m.kind.clone() else {
            errors.push(format!("batch[{i}].type: is required in a batch"));
            continue;
        };
        if mapped(&kind, &m, sent_at, len, &mut errors)? {
            accepted += 1;
        }
    }
    Ok(if errors.is_empty() {
        Outcome::Accepted(format!("batch of {accepted}"))
    } else {
        Outcome::Rejected(errors.join(" | "))
    })
}

// ---- webhooks ---------------------------------------------------------------

/// A Zalo OA event body, as the `/webhooks/zalo` handler reads it once the
/// signature matched.
pub fn zalo(bytes: &[u8]) -> Result<Outcome, Violation> {
    let len = bytes.len();
    // The signature check parses the body too; a made-up mac never matches.
    let signed = measured("zalo: signature", len, || {
        webhooks::zalo_signature_ok("oa-secret", bytes, Some("mac=00"))
    })?;
    ensure(!signed, || "zalo: a zero mac matched".into())?;
    let value = match json_body("zalo: JSON", bytes)? {
        Ok(v) => v,
        Err(e) => return Ok(Outcome::Rejected(e)),
    };
    let result = measured("zalo: zalo_event", len, || {
        webhooks::zalo_event(&value, "zalo-oa")
    })?;
    let name = value.get("event_name").and_then(Value::as_str);
    let follow = matches!(name, Some("follow" | "unfollow"));
    match result {
        Err(e) => {
            let text = field_error("zalo: zalo_event", &e)?;
            if follow {
                ensure(e.field != "sender.id", || {
                    format!(
                        "zalo: a {name:?} event without a follower is refused as {text:?}, naming the sender"
                    )
                })?;
            }
            Ok(Outcome::Rejected(text))
        }
        Ok(None) => {
            ensure(
                name.is_some_and(|n| !n.starts_with("user_send_") && !follow),
                || format!("zalo: event {name:?} was ignored"),
            )?;
            Ok(Outcome::Accepted("ignored".into()))
        }
        Ok(Some(raw)) => {
            let [id] = raw.identifiers.as_slice() else {
                return Err(Violation::new(format!(
                    "zalo: a touchpoint without exactly one identifier: {raw:?}"
                )));
            };
            ensure(id.kind == "zalo_id" && !id.value.is_empty(), || {
                format!("zalo: identifier {id:?}")
            })?;
            ensure(is_uuid(raw.event_id.as_deref()), || {
                format!("zalo: event id {:?}", raw.event_id)
            })?;
            let again = webhooks::zalo_event(&value, "zalo-oa");
            ensure(again.as_ref().ok() == Some(&Some(raw.clone())), || {
                "zalo: a retried event maps differently".into()
            })?;
            validated("zalo: validate", &raw, &RULES, &LIMITS, len)
        }
    }
}

/// A Messenger webhook body, as `/webhooks/messenger` reads it once the
/// signature matched.
pub fn messenger(bytes: &[u8]) -> Result<Outcome, Violation> {
    let len = bytes.len();
    let signed = measured("messenger: signature", len, || {
        webhooks::messenger_signature_ok("app-secret", bytes, Some("sha256=00"))
    })?;
    ensure(!signed, || "messenger: a zero signature matched".into())?;
    let value = match json_body("messenger: JSON", bytes)? {
        Ok(v) => v,
        Err(e) => return Ok(Outcome::Rejected(e)),
    };
    let result = measured("messenger: messenger_events", len, || {
        webhooks::messenger_events(&value, "fb-page")
    })?;
    let raws = match result {
        Err(e) => return Ok(Outcome::Rejected(field_error("messenger", &e)?)),
        Ok(raws) => raws,
    };
    let messages: usize = value
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("messaging").and_then(Value::as_array))
        .map(Vec::len)
        .sum();
    ensure(raws.len() <= messages, || {
        format!(
            "messenger: {} touchpoints from {messages} messages",
            raws.len()
        )
    })?;
    let again = webhooks::messenger_events(&value, "fb-page");
    ensure(again.as_ref().ok() == Some(&raws), || {
        "messenger: a retried call maps differently".into()
    })?;
    let mut outcomes = Vec::new();
    for raw in &raws {
        ensure(
            matches!(raw.identifiers.as_slice(), [RawIdentifier { kind, value }] if kind == "facebook_psid" && !value.is_empty()),
            || format!("messenger: identifiers {:?}", raw.identifiers),
        )?;
        ensure(is_uuid(raw.event_id.as_deref()), || {
            format!("messenger: event id {:?}", raw.event_id)
        })?;
        outcomes.push(validated("messenger: validate", raw, &RULES, &LIMITS, len)?);
    }
    let valid = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Accepted(_)))
        .count();
    Ok(Outcome::Accepted(format!(
        "{} messages, {valid} valid",
        raws.len()
    )))
}

// ---- log records ------------------------------------------------------------

/// prost's errors start with this, then say where and why.
const PROST_PREFIX: &str = "failed to decode Protobuf message: ";

fn says_why_protobuf_failed(text: &str) -> bool {
    match text.split_once(PROST_PREFIX) {
        Some((_, why)) => !why.trim().is_empty(),
        None => !text.trim().is_empty(),
    }
}

fn codec_error(what: &str, e: &CodecError) -> Result<String, Violation> {
    let text = e.to_string();
    non_empty(what, &text)?;
    match e {
        CodecError::Field { field, reason } => {
            ensure(!field.is_empty() && !reason.trim().is_empty(), || {
                format!("{what}: a field error without a field or reason: {text:?}")
            })?;
        }
        CodecError::Decode(d) => {
            ensure(says_why_protobuf_failed(&text), || {
                format!("{what}: a protobuf error that says nothing: {text:?} ({d:?})")
            })?;
        }
        CodecError::UnknownVersion { .. } | CodecError::Sealed(_) => {}
    }
    Ok(text)
}

/// One record value through every decoder of the log's records: each
/// either refuses it precisely or decodes something that encodes back to
/// the same value.
pub fn records(bytes: &[u8]) -> Result<Outcome, Violation> {
    let len = bytes.len();
    let mut accepted = Vec::new();
    let mut errors = Vec::new();

    // Without keys: a sealed part stays shut (the record reads as anonymous).
    let no_keys = cdp_seal::KeySet::new();
    match measured("codec: decode_touchpoint", len, || {
        codec::decode_touchpoint(bytes, &no_keys).map(|o| o.value)
    })? {
        Ok(t) => {
            let back = round_trip(&t);
            same_touchpoint("codec: touchpoint", &t, back.as_ref())?;
            accepted.push("touchpoint");
        }
        Err(e) => errors.push(codec_error("codec: decode_touchpoint", &e)?),
    }

    match measured("codec: decode_resolved", len, || {
        codec::decode_resolved(bytes, &no_keys).map(|o| o.value)
    })? {
        Ok(r) => {
            let ids = r
                .touchpoint
                .personal
                .identifiers
                .iter()
                .chain(r.merges.iter().map(|m| &m.cause.identifier));
            let back = cdp_pipeline::seal::Sealing::fresh(ids)
                .ok()
                .and_then(|s| {
                    let bytes = codec::encode_resolved(&r, &s).ok()?;
                    Some(codec::decode_resolved(&bytes, &s.keys).map(|o| o.value))
                })
                .unwrap_or_else(|| {
                    Err(CodecError::Field {
                        field: "sealing",
                        reason: "could not seal".into(),
                    })
                });
            ensure(
                back.as_ref()
                    .is_ok_and(|b| b.customer_id == r.customer_id && b.merges == r.merges),
                || format!("codec: resolved {r:?} re-encoded decodes as {back:?}"),
            )?;
            same_touchpoint(
                "codec: resolved",
                &r.touchpoint,
                back.as_ref().ok().map(|b| &b.touchpoint),
            )?;
            accepted.push("resolved");
        }
        Err(e) => errors.push(codec_error("codec: decode_resolved", &e)?),
    }

    match measured("codec: decode_alert", len, || codec::decode_alert(bytes))? {
        Ok(a) => {
            let back = codec::decode_alert(&a.encode_to_vec());
            ensure(back.as_ref().ok() == Some(&a), || {
                format!("codec: alert {a:?} re-encoded decodes as {back:?}")
            })?;
            accepted.push("alert");
        }
        Err(e) => errors.push(codec_error("codec: decode_alert", &e)?),
    }

    match measured("codec: decode_dead_letter", len, || {
        codec::decode_dead_letter(bytes)
    })? {
        Ok(d) => {
            let back = codec::decode_dead_letter(&d.encode_to_vec());
            ensure(back.as_ref().ok() == Some(&d), || {
                format!("codec: dead letter {d:?} re-encoded decodes as {back:?}")
            })?;
            // A re-drive reads the touchpoint the dead letter carries.
            if let Some(record) = &d.touchpoint {
                match measured("codec: touchpoint_from_record", len, || {
                    codec::touchpoint_from_record(record, &no_keys).map(|o| o.value)
                })? {
                    Ok(t) => {
                        let again = round_trip(&t);
                        same_touchpoint("codec: dead letter", &t, again.as_ref())?;
                    }
                    Err(e) => errors.push(codec_error("codec: touchpoint_from_record", &e)?),
                }
            }
            accepted.push("dead letter");
        }
        Err(e) => errors.push(codec_error("codec: decode_dead_letter", &e)?),
    }

    match measured("codec: decode_redrive", len, || {
        codec::decode_redrive(bytes)
    })? {
        Ok(r) => {
            let back = codec::decode_redrive(&codec::encode_redrive(&r));
            ensure(back.as_ref().ok() == Some(&r), || {
                format!("codec: redrive {r:?} re-encoded decodes as {back:?}")
            })?;
            accepted.push("redrive");
        }
        Err(e) => errors.push(codec_error("codec: decode_redrive", &e)?),
    }

    match measured("audit: decode", len, || audit::decode(bytes))? {
        Ok(stored) => {
            let json = match &stored {
                audit::Stored::Sealed(s) => serde_json::to_vec(s),
                audit::Stored::Legacy(e) => serde_json::to_vec(e),
            }
            .map_err(|e| Violation::new(format!("audit: a decoded record does not encode: {e}")))?;
            let back = audit::decode(&json);
            ensure(back.as_ref().ok() == Some(&stored), || {
                format!("audit: {stored:?} re-encoded decodes as {back:?}")
            })?;
            accepted.push("audit");
        }
        Err(e) => errors.push(json_syntax_error("audit: decode", &e)?),
    }

    let read = LogRecord {
        topic: topic::CREDENTIALS,
        partition: 0,
        offset: 0,
        key: Vec::new(),
        value: bytes.to_vec(),
        headers: headers_from(bytes),
        timestamp: 0,
    };
    match measured("credentials: read", len, || credentials::read(&read))? {
        Ok(c) => {
            let record = credentials::record(&c).map_err(|e| {
                Violation::new(format!(
                    "credentials: a decoded change does not encode: {e}"
                ))
            })?;
            let back = credentials::read(&LogRecord {
                value: record.value,
                ..read.clone()
            });
            ensure(back.as_ref().ok() == Some(&c), || {
                format!("credentials: {c:?} re-encoded reads as {back:?}")
            })?;
            accepted.push("credential");
        }
        Err(e) => {
            let text = e.to_string();
            non_empty("credentials: read", &text)?;
            if e.line() == 0 && !names_a_field_or_position(&text) {
                return Err(Violation::known(
                    "credentials-untyped-field",
                    format!("credentials: read: {text:?} names neither a field nor a position"),
                ));
            }
            errors.push(text);
        }
    }

    // The readers of headers and of the profile-changes topic.
    let generation = measured("emit: generation_of", len, || emit::generation_of(&read))?;
    if let (Some(g), Some(h)) = (generation, read.header(header::GENERATION)) {
        ensure(
            std::str::from_utf8(h).ok().and_then(|s| s.parse().ok()) == Some(g),
            || format!("emit: generation {g} read from header {h:?}"),
        )?;
    }
    let _ = emit::trace_of(&read);
    let _ = emit::is_redrive(&read);
    let _ = emit::is_rebuilt(&read);
    let changed = measured("emit: read_profile_change", len, || {
        emit::read_profile_change(&read)
    })?;
    ensure(changed.is_some() == (bytes.len() == 16), || {
        format!(
            "emit: a profile change of {} bytes read as {changed:?}",
            bytes.len()
        )
    })?;

    Ok(if accepted.is_empty() {
        Outcome::Rejected(errors.join(" | "))
    } else {
        Outcome::Accepted(accepted.join(", "))
    })
}

/// Headers made of the input's first bytes, so that header readers see
/// arbitrary values too.
fn headers_from(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let head = |n: usize| bytes[..bytes.len().min(n)].to_vec();
    vec![
        (header::GENERATION.to_owned(), head(4)),
        (header::TRACEPARENT.to_owned(), head(55)),
        (header::REDRIVE_OF.to_owned(), head(24)),
    ]
}

// ---- identifiers ------------------------------------------------------------

/// `kind[@region]:value` (no colon: an email), normalised as validation
/// does; an accepted value is canonical: trimmed, without control
/// characters, within the length limit, and normalising it again gives it
/// back.
pub fn identifier(bytes: &[u8]) -> Result<Outcome, Violation> {
    let len = bytes.len();
    let text = String::from_utf8_lossy(bytes);
    let (kind_part, value) = text.split_once(':').unwrap_or(("email", &text));
    let (kind_name, region) = match kind_part.split_once('@') {
        Some((k, r)) => (k, Some(r)),
        None => (kind_part, None),
    };
    let kind = match measured("identifier: IdKind::parse", len, || {
        IdKind::parse(kind_name)
    })? {
        Ok(k) => k,
        Err(e) => {
            non_empty("identifier: IdKind::parse", &e)?;
            return Ok(Outcome::Rejected(e));
        }
    };
    let email = EmailPolicy::default();
    let phone = PhonePolicy {
        default_region: region.unwrap_or("VN").to_owned(),
        ..PhonePolicy::default()
    };
    let result = measured("identifier: normalize", len, || {
        normalize(&kind, value, &email, &phone)
    })?;
    let id = match result {
        Err(e) => {
            let text = e.to_string();
            non_empty("identifier: normalize", &text)?;
            return Ok(Outcome::Rejected(format!("{kind}: {text}")));
        }
        Ok(id) => id,
    };
    canonical(&kind, value, &id, &email, &phone)?;
    let _ = RULES.blocked(&id);
    Ok(Outcome::Accepted(format!("{kind}")))
}

fn canonical(
    kind: &IdKind,
    raw: &str,
    id: &Identifier,
    email: &EmailPolicy,
    phone: &PhonePolicy,
) -> Result<(), Violation> {
    let v = &id.value;
    let what = || format!("identifier: {kind} {raw:?} normalised to {v:?}");
    ensure(&id.kind == kind, || format!("{}: kind {}", what(), id.kind))?;
    ensure(!v.is_empty() && v.trim() == v, || {
        format!("{}: empty or untrimmed", what())
    })?;
    ensure(!v.chars().any(char::is_control), || {
        format!("{}: control characters", what())
    })?;
    ensure(v.chars().count() <= MAX_IDENTIFIER_LEN, || {
        format!(
            "{}: {} characters, over the limit of {MAX_IDENTIFIER_LEN} that validation enforces on input",
            what(),
            v.chars().count()
        )
    })?;
    match kind {
        IdKind::Phone => ensure(
            v.strip_prefix('+')
                .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit())),
            || format!("{}: not E.164", what()),
        )?,
        IdKind::Email => ensure(
            v.matches('@').count() == 1 && v.to_lowercase() == *v,
            || format!("{}: not one lower-case address", what()),
        )?,
        IdKind::ZaloId | IdKind::FacebookPsid | IdKind::ShopeeBuyerId => {
            ensure(v.chars().all(|c| c.is_ascii_digit()), || {
                format!("{}: not digits", what())
            })?
        }
        _ => {}
    }
    let again = normalize(kind, v, email, phone);
    ensure(again.as_ref() == Ok(id), || {
        format!("{}: normalising it again gives {again:?}", what())
    })
}

// ---- gRPC Track -------------------------------------------------------------

/// A `TrackRequest` as `IngestService/Track` receives it: protobuf, then
/// the conversion to a raw touchpoint, then validation.
pub fn track(bytes: &[u8]) -> Result<Outcome, Violation> {
    let len = bytes.len();
    let request = match measured("validate: TrackRequest", len, || {
        v1::TrackRequest::decode(bytes)
    })? {
        Ok(r) => r,
        Err(e) => {
            let text = e.to_string();
            ensure(says_why_protobuf_failed(&text), || {
                format!("validate: a protobuf error that says nothing: {text:?}")
            })?;
            return Ok(Outcome::Rejected(text));
        }
    };
    let Some(t) = request.touchpoint else {
        return Ok(Outcome::Rejected("touchpoint: is required".into()));
    };
    let raw = measured("validate: raw_touchpoint", len, || {
        cdp_proto::convert::raw_touchpoint(&t)
    })?;
    validated("validate", &raw, &RULES, &LIMITS, len)
}

// ---- configuration ----------------------------------------------------------

thread_local! {
    /// One file per thread: the loader reads a path, and tests run in threads.
    static FILE: RefCell<Option<tempfile::NamedTempFile>> = const { RefCell::new(None) };
}

/// Loads `text` as the configuration file, with the real loader (defaults,
/// the file, `CDP__*` variables, the checks).
fn load(bytes: &[u8]) -> Result<Result<PlatformConfig, ConfigError>, Violation> {
    FILE.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            let file = tempfile::Builder::new()
                .prefix("cdp-fuzz-")
                .suffix(".toml")
                .tempfile()
                .map_err(|e| Violation::new(format!("config: no temporary file: {e}")))?;
            *cell = Some(file);
        }
        let Some(file) = cell.as_mut() else {
            return Err(Violation::new("config: no temporary file"));
        };
        let written = file.as_file().set_len(0).and_then(|()| {
            let mut f = file.as_file();
            std::io::Seek::rewind(&mut f)?;
            f.write_all(bytes)?;
            f.flush()
        });
        written.map_err(|e| Violation::new(format!("config: cannot write the file: {e}")))?;
        let path = file.path().to_owned();
        measured_with(
            CONFIG_BYTES_PER_INPUT_BYTE,
            "config: PlatformConfig::load",
            bytes.len(),
            || PlatformConfig::load(Some(&path)),
        )
    })
}

/// `text` with the temporary file's path (random, and relative to the
/// working directory) written as `cdp.toml`, so that the errors, and the
/// inputs kept for them, are the same on every run and every machine.
fn without_temp_path(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("cdp-fuzz-") {
        let start = rest[..at]
            .rfind(|c: char| c.is_whitespace())
            .map_or(0, |i| i + 1);
        let Some(end) = rest[at..].find(".toml").map(|i| at + i + ".toml".len()) else {
            break;
        };
        out.push_str(&rest[..start]);
        out.push_str("cdp.toml");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn config_error(what: &str, e: &ConfigError) -> Result<String, Violation> {
    let text = without_temp_path(&e.to_string());
    non_empty(what, &text)?;
    let precise = match e {
        ConfigError::Invalid { field, reason } => !field.is_empty() && !reason.trim().is_empty(),
        ConfigError::Rules(_) => text.contains("kind"),
        ConfigError::Load(_) => names_a_field_or_position(&text),
        ConfigError::File {
            line,
            column,
            reason,
            ..
        } => *line > 0 && *column > 0 && !reason.trim().is_empty(),
    };
    if !precise && (text.contains("to fit in target type") || text.contains("number overflowed")) {
        return Err(Violation::known(
            "config-number-without-key",
            format!("{what}: {text:?} names neither a field nor a position"),
        ));
    }
    ensure(precise, || {
        format!("{what}: {text:?} names neither a field nor a position")
    })?;
    Ok(text)
}

fn sample_event() -> RawTouchpoint {
    RawTouchpoint {
        event_id: None,
        event_type: Some("Page Viewed".into()),
        channel: Some("web".into()),
        source_id: Some("website".into()),
        occurred_at: Some(NOW - 60_000),
        identifiers: vec![
            RawIdentifier::new("email", "Lan@Shop.vn"),
            RawIdentifier::new("phone", "0912 345 678"),
            RawIdentifier::new("device_id", "pos-q1-01"),
        ],
        ..RawTouchpoint::default()
    }
}

/// The `[identity]` rules: a configuration that loads gives rules that
/// block what it lists as blocked, release what it lists as released, and
/// survive being written out and loaded again.
pub fn rules(bytes: &[u8]) -> Result<Outcome, Violation> {
    let c = match load(bytes)? {
        Ok(c) => c,
        Err(e) => return Ok(Outcome::Rejected(config_error("rules", &e)?)),
    };
    let rules = c
        .identity_rules()
        .map_err(|e| Violation::new(format!("rules: loaded, but the rules do not build: {e}")))?;
    for (name, rule) in &c.identity.kinds {
        let kind = IdKind::parse(name).map_err(|e| {
            Violation::new(format!(
                "rules: kind {name:?} loaded but does not parse: {e}"
            ))
        })?;
        ensure(
            rules.is_known(&kind) && rules.limit(&kind) == rule.limit,
            || format!("rules: kind {name} is not as configured"),
        )?;
        for (field, values) in [("blocked", &rule.blocked), ("released", &rule.released)] {
            for v in values {
                let id = normalize(&kind, v, rules.email_policy(), rules.phone_policy()).map_err(
                    |e| {
                        Violation::new(format!(
                            "rules: {field} {v:?} of {name} loaded but does not normalise: {e}"
                        ))
                    },
                )?;
                let holds = if field == "blocked" {
                    rules.blocked(&id).is_some()
                } else {
                    rules.released(&id)
                };
                ensure(holds, || {
                    format!("rules: {field} value {v:?} of {name} ({id:?}) is not {field}")
                })?;
            }
        }
    }
    let outcome = validated(
        "rules: validate",
        &sample_event(),
        &rules,
        &c.validation,
        bytes.len(),
    )?;
    // Written out and loaded again, the rules are the same.
    let mut only = BTreeMap::new();
    only.insert("identity", &c.identity);
    let text = toml::to_string(&only).map_err(|e| {
        Violation::new(format!("rules: loaded rules do not write out as TOML: {e}"))
    })?;
    match load(text.as_bytes())? {
        Ok(again) => ensure(again.identity == c.identity, || {
            format!(
                "rules: written out as {text:?}, the rules load as {:?}, not {:?}",
                again.identity, c.identity
            )
        })?,
        Err(e) => {
            return Err(Violation::new(format!(
                "rules: written out as {text:?}, the rules no longer load: {e}"
            )));
        }
    }
    Ok(Outcome::Accepted(format!(
        "{} kinds; sample event: {}",
        c.identity.kinds.len(),
        match outcome {
            Outcome::Accepted(_) => "valid",
            Outcome::Rejected(_) => "refused",
        }
    )))
}

/// The whole configuration: a file that loads gives what every process
/// derives from it (rules, credentials, sources, validation limits that
/// validate an event without overflowing), and survives being written out
/// and loaded again.
pub fn config(bytes: &[u8]) -> Result<Outcome, Violation> {
    let c = match load(bytes)? {
        Ok(c) => c,
        Err(e) => return Ok(Outcome::Rejected(config_error("config", &e)?)),
    };
    ensure(c.check_exposure().is_ok(), || {
        "config: loaded, but check_exposure refuses it".into()
    })?;
    let rules = c
        .identity_rules()
        .map_err(|e| Violation::new(format!("config: loaded, but the rules do not build: {e}")))?;
    let _ = c.all_credentials();
    let _ = c.fold_options();
    for s in &c.sources {
        cdp_ingest::http::Source::from_config(s).map_err(|e| {
            Violation::new(format!(
                "config: source {} loaded but is refused by ingest: {e}",
                s.id
            ))
        })?;
    }
    let outcome = validated(
        "config: validate",
        &sample_event(),
        &rules,
        &c.validation,
        bytes.len(),
    )?;
    let text = toml::to_string(&c).map_err(|e| {
        Violation::new(format!(
            "config: a loaded configuration does not write out as TOML: {e}"
        ))
    })?;
    match load(text.as_bytes())? {
        Ok(again) => ensure(again == c, || {
            format!("config: written out as {text:?}, the configuration loads differently")
        })?,
        Err(e) => {
            return Err(Violation::new(format!(
                "config: written out as {text:?}, the configuration no longer loads: {e}"
            )));
        }
    }
    Ok(Outcome::Accepted(format!(
        "{} sources, {} credentials; sample event: {}",
        c.sources.len(),
        c.all_credentials().len(),
        match outcome {
            Outcome::Accepted(_) => "valid",
            Outcome::Rejected(_) => "refused",
        }
    )))
}
