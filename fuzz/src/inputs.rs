//! Structured inputs built from random bytes (`arbitrary`), one generator
//! per target: valid-looking payloads and records that byte mutation alone
//! would rarely reach (a whole encoded touchpoint, a nested Segment call).

use arbitrary::{Result, Unstructured};
use cdp_domain::identity::{Merge, MergeCause};
use cdp_domain::{
    Attributes, Channel, CustomerId, DroppedIdentifier, Envelope, EventId, EventType, IdKind,
    Identifier, Personal, ResolvedTouchpoint, Touchpoint,
};
use cdp_pipeline::codec;
use cdp_pipeline::seal::Sealing;
use cdp_proto::v1;
use prost::Message;
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// Strings the decoders give meaning to, mixed with arbitrary ones.
const WORDS: &[&str] = &[
    "",
    " ",
    "u-1",
    "a-1",
    "Lan@Shop.vn",
    "lan.nguyen+shop@gmail.com",
    "0912 345 678",
    "+84 912 345 678",
    "0162 345 6789",
    "84912345678",
    "246845883529197922",
    "6000001",
    "PAGE",
    "Order Completed",
    "Product Viewed",
    "Points Earned",
    "Ticket Opened",
    "web",
    "mobile",
    "browser",
    "store",
    "2025-10-09T08:53:10Z",
    "2025-10-09T08:53:20.123+07:00",
    "yesterday",
    "1700000000000",
    "0b6b8a39-5b8e-4a7d-9f3e-111111111111",
    "00000000-0000-0000-0000-000000000000",
    "VND",
    "vnd",
    "Xin chào",
    "Nguyễn Văn A",
    "pos-q1-01",
    "LOY-0001",
];

fn word(u: &mut Unstructured<'_>) -> Result<String> {
    if u.ratio(2, 3)? {
        Ok((*u.choose(WORDS)?).to_owned())
    } else {
        let s: String = u.arbitrary()?;
        Ok(s.chars().take(64).collect())
    }
}

fn number(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=4)? {
        0 => json!(u.arbitrary::<i64>()?),
        1 => json!(u.int_in_range(0..=2_000_000_000_000i64)?),
        2 => json!(u.arbitrary::<u64>()?),
        3 => serde_json::Number::from_f64(u.arbitrary::<f64>()?).map_or(Value::Null, Value::Number),
        _ => json!(u.int_in_range(-10..=10)?),
    })
}

/// A JSON value whose object keys come from `keys`.
pub fn json_value(u: &mut Unstructured<'_>, keys: &[&str], depth: u32) -> Result<Value> {
    let pick = if depth == 0 {
        u.int_in_range(0..=3)?
    } else {
        u.int_in_range(0..=5)?
    };
    Ok(match pick {
        0 => Value::String(word(u)?),
        1 => number(u)?,
        2 => Value::Bool(u.arbitrary()?),
        3 => Value::Null,
        4 => {
            let n = u.int_in_range(0..=3)?;
            Value::Array(
                (0..n)
                    .map(|_| json_value(u, keys, depth - 1))
                    .collect::<Result<_>>()?,
            )
        }
        _ => Value::Object(json_object(u, keys, depth - 1)?),
    })
}

pub fn json_object(
    u: &mut Unstructured<'_>,
    keys: &[&str],
    depth: u32,
) -> Result<Map<String, Value>> {
    let n = u.int_in_range(0..=6)?;
    let mut map = Map::new();
    for _ in 0..n {
        let key = if u.ratio(4, 5)? {
            (*u.choose(keys)?).to_owned()
        } else {
            word(u)?
        };
        map.insert(key, json_value(u, keys, depth)?);
    }
    Ok(map)
}

const SEGMENT_KEYS: &[&str] = &[
    "type",
    "messageId",
    "userId",
    "anonymousId",
    "previousId",
    "groupId",
    "event",
    "name",
    "category",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "context",
    "traits",
    "properties",
    "integrations",
    "email",
    "phone",
    "channel",
    "device",
    "id",
    "total",
    "currency",
    "order_id",
    "product_id",
    "writeKey",
];

fn segment_message(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut m = json_object(u, SEGMENT_KEYS, 2)?;
    if u.ratio(2, 3)? {
        m.insert("userId".into(), Value::String(word(u)?));
    }
    if u.ratio(1, 2)? {
        let kind = *u.choose(&[
            "track", "identify", "page", "screen", "group", "alias", "fly",
        ])?;
        m.insert("type".into(), json!(kind));
        m.insert("event".into(), Value::String(word(u)?));
    }
    Ok(Value::Object(m))
}

/// A Segment call, or a batch of them.
pub fn segment(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let body = if u.ratio(1, 3)? {
        let n = u.int_in_range(0..=4)?;
        let items = (0..n)
            .map(|_| segment_message(u))
            .collect::<Result<Vec<_>>>()?;
        json!({"batch": items, "sentAt": "2025-10-09T08:53:20Z", "context": {"channel": "mobile"}})
    } else {
        segment_message(u)?
    };
    Ok(serde_json::to_vec(&body).unwrap_or_default())
}

const ZALO_EVENTS: &[&str] = &[
    "user_send_text",
    "user_send_image",
    "user_send_sticker",
    "follow",
    "unfollow",
    "oa_send_text",
    "user_received_message",
];

/// A Zalo OA event.
pub fn zalo(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let keys = &[
        "app_id",
        "event_name",
        "timestamp",
        "sender",
        "recipient",
        "follower",
        "message",
        "text",
        "msg_id",
        "id",
        "oa_id",
        "user_id_by_app",
    ];
    let mut m = json_object(u, keys, 2)?;
    m.insert("event_name".into(), json!(*u.choose(ZALO_EVENTS)?));
    if u.ratio(2, 3)? {
        m.insert("sender".into(), json!({"id": word(u)?}));
        m.insert("follower".into(), json!({"id": word(u)?}));
    }
    if u.ratio(1, 2)? {
        m.insert(
            "message".into(),
            json!({"text": word(u)?, "msg_id": word(u)?}),
        );
    }
    if u.ratio(1, 2)? {
        m.insert("timestamp".into(), number(u)?);
    }
    Ok(serde_json::to_vec(&Value::Object(m)).unwrap_or_default())
}

/// A Messenger webhook call.
pub fn messenger(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let keys = &[
        "object",
        "entry",
        "id",
        "time",
        "messaging",
        "sender",
        "recipient",
        "timestamp",
        "message",
        "mid",
        "text",
        "is_echo",
    ];
    let n = u.int_in_range(0..=3)?;
    let mut entries = Vec::new();
    for _ in 0..n {
        let k = u.int_in_range(0..=3)?;
        let mut messaging = Vec::new();
        for _ in 0..k {
            let mut m = json_object(u, keys, 1)?;
            m.insert("sender".into(), json!({"id": word(u)?}));
            m.insert(
                "message".into(),
                json!({"mid": word(u)?, "text": word(u)?, "is_echo": u.arbitrary::<bool>()?}),
            );
            m.insert("timestamp".into(), number(u)?);
            messaging.push(Value::Object(m));
        }
        entries.push(json!({"id": word(u)?, "time": 1, "messaging": messaging}));
    }
    let object = if u.ratio(9, 10)? { "page" } else { "user" };
    Ok(serde_json::to_vec(&json!({"object": object, "entry": entries})).unwrap_or_default())
}

fn kind(u: &mut Unstructured<'_>) -> Result<IdKind> {
    Ok(if u.ratio(9, 10)? {
        u.choose(&IdKind::BUILT_IN)?.clone()
    } else {
        IdKind::Custom((*u.choose(&["member_no", "crm_id", "x"])?).to_owned())
    })
}

fn attributes(u: &mut Unstructured<'_>) -> Result<Attributes> {
    json_object(
        u,
        &[
            "total", "currency", "order_id", "name", "products", "sku", "price",
        ],
        2,
    )
}

fn uuid(u: &mut Unstructured<'_>) -> Result<Uuid> {
    Ok(Uuid::from_u128(u.arbitrary()?))
}

/// A domain touchpoint (not necessarily one validation would accept).
pub fn touchpoint(u: &mut Unstructured<'_>) -> Result<Touchpoint> {
    let n = u.int_in_range(0..=4)?;
    let identifiers = (0..n)
        .map(|_| Ok(Identifier::new(kind(u)?, word(u)?)))
        .collect::<Result<Vec<_>>>()?;
    let dropped = if u.ratio(1, 4)? {
        vec![DroppedIdentifier {
            kind: kind(u)?,
            value: word(u)?,
            reason: word(u)?,
        }]
    } else {
        Vec::new()
    };
    Ok(Touchpoint {
        envelope: Envelope {
            event_id: EventId(uuid(u)?),
            event_type: EventType::from(word(u)?),
            channel: *u.choose(&Channel::ALL)?,
            source_id: word(u)?,
            occurred_at: u.arbitrary()?,
            received_at: u.arbitrary()?,
            properties: attributes(u)?,
        },
        personal: Personal {
            identifiers,
            traits: attributes(u)?,
            dropped,
        },
    })
}

/// A log record as one of the codec's own encoders writes it (or an
/// `audit` / `credentials` record, which are JSON).
pub fn record(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let t = touchpoint(u)?;
    let sealing =
        Sealing::fresh(&t.personal.identifiers).map_err(|_| arbitrary::Error::NotEnoughData)?;
    let sealed =
        |r: Result<Vec<u8>, codec::CodecError>| r.map_err(|_| arbitrary::Error::IncorrectFormat);
    Ok(match u.int_in_range(0..=7)? {
        0 => sealed(codec::encode_touchpoint(&t, &sealing))?,
        1 => {
            let n = u.int_in_range(0..=2)?;
            let merges = (0..n)
                .map(|_| {
                    Ok(Merge {
                        loser: CustomerId(uuid(u)?),
                        survivor: CustomerId(uuid(u)?),
                        at: u.arbitrary()?,
                        cause: MergeCause {
                            event_id: t.event_id(),
                            identifier: Identifier::new(kind(u)?, word(u)?),
                            rule: word(u)?,
                        },
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            sealed(codec::encode_resolved(
                &ResolvedTouchpoint {
                    customer_id: CustomerId(uuid(u)?),
                    merges,
                    touchpoint: t,
                },
                &sealing,
            ))?
        }
        2 => sealed(codec::encode_dead_letter(
            &word(u)?,
            &word(u)?,
            &t,
            u.arbitrary()?,
            &sealing,
        ))?,
        3 => {
            let raw = sealed(codec::encode_touchpoint(&t, &sealing))?;
            codec::encode_raw_dead_letter("identity", &word(u)?, &raw, u.arbitrary()?)
        }
        4 => codec::unusual_reads_record(
            &word(u)?,
            &word(u)?,
            u.arbitrary()?,
            u.arbitrary()?,
            u.arbitrary()?,
            u.arbitrary()?,
        ),
        5 => codec::encode_redrive(&v1::RedriveRecord {
            schema_version: 0,
            dead_letter_partition: u.arbitrary()?,
            dead_letter_offset: u.arbitrary()?,
            event_id: t.event_id().to_string(),
            at_ms: u.arbitrary()?,
            actor: word(u)?,
            appended: u.arbitrary()?,
            touchpoint_partition: u.arbitrary()?,
            touchpoint_offset: u.arbitrary()?,
        }),
        6 => serde_json::to_vec(&json!({
            "chain": word(u)?, "seq": u.arbitrary::<u64>()?, "prev": word(u)?, "hash": word(u)?,
            "entry": {"at": u.arbitrary::<i64>()?, "actor": word(u)?, "action": word(u)?,
                      "fields": [word(u)?], "outcome": "allowed"}
        }))
        .unwrap_or_default(),
        _ => serde_json::to_vec(&json!({
            "change": *u.choose(&["issued", "revoked", "other"])?, "id": word(u)?, "name": word(u)?,
            "role": *u.choose(&["agent", "admin", "ingest"])?, "key_sha256": word(u)?,
            "created_at": u.arbitrary::<i64>()?, "expires_at": Value::Null, "issued_by": word(u)?,
            "at": u.arbitrary::<i64>()?, "by": word(u)?
        }))
        .unwrap_or_default(),
    })
}

/// `kind:value`, the identifier target's input.
pub fn identifier(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let kind = kind(u)?;
    let region = if u.ratio(1, 8)? {
        format!("@{}", u.choose(&["US", "GB", "vn", "XX", ""])?)
    } else {
        String::new()
    };
    let n = u.int_in_range(1..=6)?;
    let pieces = [
        "0",
        "9",
        "1",
        "84",
        "+84",
        "0162",
        " ",
        "-",
        "(",
        ")",
        ".",
        "@",
        "+",
        "gmail.com",
        "googlemail.com",
        "example.vn",
        "lan",
        "Lan.Nguyen",
        "İ",
        "ß",
        "ﬃ",
        "\u{200b}",
        "\u{7}",
        "-abc-",
        "xn--",
        "..",
    ];
    let mut value = String::new();
    for _ in 0..n {
        if u.ratio(3, 4)? {
            value.push_str(u.choose(&pieces)?);
        } else {
            value.push_str(&word(u)?);
        }
    }
    if u.ratio(1, 10)? {
        let times = u.int_in_range(50..=300)?;
        value = value.repeat(times);
    }
    Ok(format!("{kind}{region}:{value}").into_bytes())
}

/// A gRPC `TrackRequest`, encoded.
pub fn track(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let n = u.int_in_range(0..=4)?;
    let identifiers = (0..n)
        .map(|_| {
            Ok(v1::Identifier {
                kind: if u.ratio(9, 10)? {
                    kind(u)?.to_string()
                } else {
                    word(u)?
                },
                value: word(u)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let occurred_at = if u.ratio(1, 2)? {
        Some(timestamp(u)?)
    } else {
        None
    };
    let properties = cdp_proto::convert::json_to_struct(&attributes(u)?);
    let traits = cdp_proto::convert::json_to_struct(&attributes(u)?);
    let t = v1::Touchpoint {
        event_id: if u.ratio(1, 2)? {
            uuid(u)?.to_string()
        } else {
            word(u)?
        },
        r#type: word(u)?,
        channel: u.choose(&Channel::ALL)?.to_string(),
        source_id: word(u)?,
        occurred_at,
        properties: Some(properties),
        personal: Some(v1::PersonalData {
            identifiers,
            traits: Some(traits),
        }),
    };
    Ok(v1::TrackRequest {
        touchpoint: Some(t),
    }
    .encode_to_vec())
}

fn timestamp(u: &mut Unstructured<'_>) -> Result<prost_types::Timestamp> {
    Ok(if u.ratio(3, 4)? {
        cdp_proto::convert::millis_to_timestamp(
            u.int_in_range(1_000_000_000_000..=1_760_000_600_000)?,
        )
    } else {
        prost_types::Timestamp {
            seconds: u.arbitrary()?,
            nanos: u.arbitrary()?,
        }
    })
}

const TOML_SECTIONS: &[&str] = &[
    "",
    "[server]",
    "[http]",
    "[log]",
    "[store]",
    "[pipeline]",
    "[validation]",
    "[identity]",
    "[identity.kinds.phone]",
    "[identity.kinds.email]",
    "[identity.kinds.member_no]",
    "[identity.kinds.\"Bad Kind\"]",
    "[identity.email]",
    "[identity.phone]",
    "[[sources]]",
    "[webhooks.zalo]",
    "[webhooks.messenger]",
    "[[agents]]",
    "[[credentials]]",
    "[access]",
    "[telemetry]",
    "[profile.source_trust]",
];

const TOML_KEYS: &[&str] = &[
    "data_dir",
    "grpc_addr",
    "addr",
    "max_message_bytes",
    "max_batch_bytes",
    "partitions",
    "backend",
    "embedded_cache_mib",
    "batch_size",
    "processes",
    "process_index",
    "generation_refresh_ms",
    "max_event_bytes",
    "max_future_skew_secs",
    "max_age_days",
    "max_identifiers",
    "default_currency",
    "shared_window_days",
    "untrusted_sources",
    "contact_kinds",
    "priority",
    "limit",
    "merge",
    "blocked",
    "blocked_patterns",
    "shared_by_at_most",
    "released",
    "recycle_after_days",
    "strip_plus_tag_domains",
    "ignore_dots_domains",
    "domain_aliases",
    "default_region",
    "vn_2018_renumbering",
    "id",
    "channel",
    "write_key",
    "allowed_types",
    "trusted_to_link",
    "source_id",
    "oa_secret_key",
    "app_secret",
    "verify_token",
    "name",
    "token",
    "role",
    "team",
    "scopes",
    "key",
    "key_sha256",
    "sources",
    "secret",
    "allow_demo_credentials",
    "filter",
    "format",
    "website",
];

const TOML_VALUES: &[&str] = &[
    "1",
    "0",
    "-1",
    "4",
    "300",
    "9223372036854775807",
    "-9223372036854775808",
    "1e9",
    "nan",
    "true",
    "false",
    "\"\"",
    "\"VN\"",
    "\"US\"",
    "\"web\"",
    "\"kafka\"",
    "\"0.0.0.0:8080\"",
    "\"127.0.0.1:6001\"",
    "\"0999 999 999\"",
    "\"pos-*\"",
    "\"[\"",
    "\"{a,b\"",
    "\"*@test.invalid\"",
    "[\"email\", \"phone\"]",
    "[\"nope kind\"]",
    "[]",
    "[[\"googlemail.com\", \"gmail.com\"]]",
    "{ a = 1 }",
    "\"dev-key\"",
    "\"0123456789abcdef0123\"",
    "1979-05-27T07:32:00Z",
];

/// A TOML configuration made of the platform's own sections and keys.
pub fn toml(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let mut out = String::new();
    let sections = u.int_in_range(1..=4)?;
    for _ in 0..sections {
        out.push_str(u.choose(TOML_SECTIONS)?);
        out.push('\n');
        let keys = u.int_in_range(0..=5)?;
        for _ in 0..keys {
            out.push_str(u.choose(TOML_KEYS)?);
            out.push_str(" = ");
            out.push_str(u.choose(TOML_VALUES)?);
            out.push('\n');
        }
    }
    Ok(out.into_bytes())
}
