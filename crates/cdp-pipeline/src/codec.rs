//! The values of log records: protobuf with a schema version
//! (`proto/cdp/v1/log.proto`), the same bytes in Kafka and in the embedded log.

use cdp_domain::identity::{Merge, MergeCause};
use cdp_domain::{
    Channel, CustomerId, DroppedIdentifier, Envelope, EventId, EventType, IdKind, Identifier,
    Personal, ResolvedTouchpoint, Touchpoint,
};
use prost::Message;
use thiserror::Error;
use uuid::Uuid;

use cdp_proto::v1;
use cdp_seal::KeySet;

use crate::seal::{self, Sealing};

/// The schema version written by this build. Readers accept it and older.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("record is not valid protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("record has schema version {found}; this build reads up to {SCHEMA_VERSION}")]
    UnknownVersion { found: u32 },
    #[error("record field {field} is invalid: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("record's personal part: {0}")]
    Sealed(#[from] cdp_seal::SealError),
}

/// A record read back: `anonymous` when its personal part was left out or
/// cannot be opened any more (a key of its subjects was erased). An
/// anonymous touchpoint has no identifiers, no traits, and its properties
/// keep only numbers, booleans and [`seal::CLEAR_PROPERTIES`].
#[derive(Debug, Clone, PartialEq)]
pub struct Opened<T> {
    pub value: T,
    pub anonymous: bool,
}

fn field(field: &'static str, reason: impl ToString) -> CodecError {
    CodecError::Field {
        field,
        reason: reason.to_string(),
    }
}

fn check_version(v: u32) -> Result<(), CodecError> {
    if v == 0 || v > SCHEMA_VERSION {
        Err(CodecError::UnknownVersion { found: v })
    } else {
        Ok(())
    }
}

fn uuid(name: &'static str, s: &str) -> Result<Uuid, CodecError> {
    Uuid::parse_str(s).map_err(|e| field(name, e))
}

fn json_bytes(map: &cdp_domain::Attributes) -> Vec<u8> {
    serde_json::to_vec(map).unwrap_or_else(|_| b"{}".to_vec())
}

fn json_map(name: &'static str, bytes: &[u8]) -> Result<cdp_domain::Attributes, CodecError> {
    if bytes.is_empty() {
        return Ok(cdp_domain::Attributes::new());
    }
    serde_json::from_slice(bytes).map_err(|e| field(name, e))
}

fn identifier_from(name: &'static str, i: &v1::Identifier) -> Result<Identifier, CodecError> {
    Ok(Identifier::new(
        IdKind::parse(&i.kind).map_err(|e| field(name, e))?,
        i.value.clone(),
    ))
}

fn dropped_from(d: &v1::DroppedIdentifier) -> Result<DroppedIdentifier, CodecError> {
    Ok(DroppedIdentifier {
        kind: IdKind::parse(&d.kind).map_err(|e| field("personal.dropped.kind", e))?,
        value: d.value.clone(),
        reason: d.reason.clone(),
    })
}

/// The subjects a touchpoint is sealed under: its identifiers.
pub fn touchpoint_subjects(t: &Touchpoint, s: &Sealing) -> Vec<cdp_seal::Subject> {
    let mut subjects: Vec<_> = t
        .personal
        .identifiers
        .iter()
        .map(|i| s.subject(i))
        .collect();
    subjects.sort();
    subjects.dedup();
    subjects
}

/// A touchpoint's record: its personal part (with the text of its
/// properties) sealed under the keys of its identifiers. When one of those
/// keys is erased the personal part is left out (`anonymous`); an event
/// without identifiers keeps it in clear (there is no one to erase).
pub fn touchpoint_record(t: &Touchpoint, s: &Sealing) -> Result<v1::TouchpointRecord, CodecError> {
    let mut properties = t.envelope.properties.clone();
    let ids = &t.personal.identifiers;
    let keys: Option<Vec<_>> = ids.iter().map(|i| s.key_of(i)).collect();
    let taken = if ids.is_empty() {
        Vec::new()
    } else {
        seal::split_properties(&mut properties)
    };
    let personal = v1::PersonalRecord {
        identifiers: ids.iter().map(cdp_proto::convert::identifier).collect(),
        traits_json: json_bytes(&t.personal.traits),
        dropped: t
            .personal
            .dropped
            .iter()
            .map(|d| v1::DroppedIdentifier {
                kind: d.kind.to_string(),
                value: d.value.clone(),
                reason: d.reason.clone(),
            })
            .collect(),
        properties_json: if taken.is_empty() {
            Vec::new()
        } else {
            serde_json::to_vec(&taken).unwrap_or_default()
        },
    };
    let e = &t.envelope;
    let event_id = e.event_id.to_string();
    let (personal, sealed, anonymous) = match keys {
        _ if ids.is_empty() => (personal.encode_to_vec(), None, false),
        Some(keys) => {
            let part = cdp_seal::seal(&keys, event_id.as_bytes(), &personal.encode_to_vec())?;
            (Vec::new(), Some(seal::part(part)), false)
        }
        None => (Vec::new(), None, true),
    };
    Ok(v1::TouchpointRecord {
        schema_version: SCHEMA_VERSION,
        envelope: Some(v1::EnvelopeRecord {
            event_id,
            r#type: e.event_type.to_string(),
            channel: e.channel.to_string(),
            source_id: e.source_id.clone(),
            occurred_at_ms: e.occurred_at,
            received_at_ms: e.received_at,
            properties_json: json_bytes(&properties),
        }),
        personal,
        sealed,
        anonymous,
    })
}

/// Reads a touchpoint record, opening its personal part with `keys`.
pub fn touchpoint_from_record(
    r: &v1::TouchpointRecord,
    keys: &KeySet,
) -> Result<Opened<Touchpoint>, CodecError> {
    check_version(r.schema_version)?;
    let e = r
        .envelope
        .as_ref()
        .ok_or_else(|| field("envelope", "missing"))?;
    let (personal, anonymous) = match &r.sealed {
        Some(part) => {
            let sealed = seal::sealed(part)?;
            match cdp_seal::open(&sealed, e.event_id.as_bytes(), |s| keys.get(s))? {
                Some(bytes) => (v1::PersonalRecord::decode(bytes.as_slice())?, false),
                None => (v1::PersonalRecord::default(), true),
            }
        }
        None => {
            let personal = v1::PersonalRecord::decode(r.personal.as_slice())?;
            // Written before sealing: anonymous once one of its
            // identifiers was erased.
            let erased = keys.hasher().is_some_and(|h| {
                personal.identifiers.iter().any(|i| {
                    identifier_from("personal.identifiers", i)
                        .is_ok_and(|id| keys.erased(&cdp_store::keys::subject_of(h, &id)))
                })
            });
            if erased {
                (v1::PersonalRecord::default(), true)
            } else {
                (personal, r.anonymous)
            }
        }
    };
    let mut properties = json_map("envelope.properties_json", &e.properties_json)?;
    if anonymous && r.sealed.is_none() {
        // Its text was never taken out: take it out now.
        seal::split_properties(&mut properties);
    }
    if !personal.properties_json.is_empty() {
        let taken: Vec<(String, serde_json::Value)> =
            serde_json::from_slice(&personal.properties_json)
                .map_err(|e| field("personal.properties_json", e))?;
        seal::restore_properties(&mut properties, taken);
    }
    let touchpoint = Touchpoint {
        envelope: Envelope {
            event_id: EventId(uuid("envelope.event_id", &e.event_id)?),
            event_type: EventType::from(e.r#type.clone()),
            channel: e
                .channel
                .parse::<Channel>()
                .map_err(|m| field("envelope.channel", m))?,
            source_id: e.source_id.clone(),
            occurred_at: e.occurred_at_ms,
            received_at: e.received_at_ms,
            properties,
        },
        personal: Personal {
            identifiers: personal
                .identifiers
                .iter()
                .map(|i| identifier_from("personal.identifiers", i))
                .collect::<Result<_, _>>()?,
            traits: json_map("personal.traits_json", &personal.traits_json)?,
            dropped: personal
                .dropped
                .iter()
                .map(dropped_from)
                .collect::<Result<_, _>>()?,
        },
    };
    Ok(Opened {
        value: touchpoint,
        anonymous,
    })
}

/// The identifiers a record written before sealing carries in clear (a
/// touchpoint's, a resolved record's with its merge causes', a dead
/// letter's); none for a sealed record or another topic.
pub fn clear_identifiers(topic: cdp_log::Topic, bytes: &[u8]) -> Vec<Identifier> {
    let touchpoint = |t: &v1::TouchpointRecord| -> Vec<Identifier> {
        if t.sealed.is_some() {
            return Vec::new();
        }
        v1::PersonalRecord::decode(t.personal.as_slice())
            .map(|p| {
                p.identifiers
                    .iter()
                    .filter_map(|i| identifier_from("personal.identifiers", i).ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    match topic.name() {
        "touchpoints" => v1::TouchpointRecord::decode(bytes)
            .map(|t| touchpoint(&t))
            .unwrap_or_default(),
        "resolved" => v1::ResolvedRecord::decode(bytes)
            .map(|r| {
                let mut ids = r.touchpoint.as_ref().map(touchpoint).unwrap_or_default();
                ids.extend(
                    r.merges
                        .iter()
                        .filter(|m| m.cause_sealed.is_none())
                        .filter_map(|m| {
                            m.cause_identifier
                                .as_ref()
                                .and_then(|i| identifier_from("merge.cause_identifier", i).ok())
                        }),
                );
                ids
            })
            .unwrap_or_default(),
        "dead-letters" => v1::DeadLetterRecord::decode(bytes)
            .ok()
            .and_then(|d| d.touchpoint.as_ref().map(touchpoint))
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The subjects whose keys open a touchpoint record.
pub fn record_subjects(r: &v1::TouchpointRecord) -> Vec<cdp_seal::Subject> {
    r.sealed
        .as_ref()
        .map(|p| seal::subjects_of(p).collect())
        .unwrap_or_default()
}

pub fn encode_touchpoint(t: &Touchpoint, s: &Sealing) -> Result<Vec<u8>, CodecError> {
    Ok(touchpoint_record(t, s)?.encode_to_vec())
}

pub fn decode_touchpoint(bytes: &[u8], keys: &KeySet) -> Result<Opened<Touchpoint>, CodecError> {
    touchpoint_from_record(&v1::TouchpointRecord::decode(bytes)?, keys)
}

/// What the associated data of a sealed identifier is.
const IDENTIFIER_AAD: &[u8] = b"cdp identifier";

/// An identifier for a record other than a touchpoint: its kind in clear,
/// its value sealed under its own key (left out once that key is erased).
pub fn sealed_identifier(
    id: &Identifier,
    s: &Sealing,
) -> Result<(v1::Identifier, Option<v1::SealedPart>), CodecError> {
    let kind_only = v1::Identifier {
        kind: id.kind.to_string(),
        value: String::new(),
    };
    Ok(match s.key_of(id) {
        Some(key) => {
            let part = cdp_seal::seal(&[key], IDENTIFIER_AAD, id.value.as_bytes())?;
            (kind_only, Some(seal::part(part)))
        }
        None => (kind_only, None),
    })
}

/// Reads an identifier written by [`sealed_identifier`] (or in clear by an
/// older build); an erased one has an empty value.
pub fn open_identifier(
    name: &'static str,
    id: Option<&v1::Identifier>,
    sealed: Option<&v1::SealedPart>,
    keys: &KeySet,
) -> Result<Identifier, CodecError> {
    let id = id.ok_or_else(|| field(name, "missing"))?;
    let kind = IdKind::parse(&id.kind).map_err(|e| field(name, e))?;
    let value = match sealed {
        Some(part) => {
            match cdp_seal::open(&seal::sealed(part)?, IDENTIFIER_AAD, |s| keys.get(s))? {
                Some(bytes) => String::from_utf8(bytes).map_err(|e| field(name, e))?,
                None => String::new(),
            }
        }
        None => id.value.clone(),
    };
    Ok(Identifier::new(kind, value))
}

pub fn merge_record(m: &Merge, s: &Sealing) -> Result<v1::MergeRecord, CodecError> {
    let (cause_identifier, cause_sealed) = sealed_identifier(&m.cause.identifier, s)?;
    Ok(v1::MergeRecord {
        loser: m.loser.to_string(),
        survivor: m.survivor.to_string(),
        at_ms: m.at,
        cause_event_id: m.cause.event_id.to_string(),
        cause_identifier: Some(cause_identifier),
        rule: m.cause.rule.clone(),
        cause_sealed,
    })
}

pub fn merge_from_record(r: &v1::MergeRecord, keys: &KeySet) -> Result<Merge, CodecError> {
    let identifier = open_identifier(
        "merge.cause_identifier",
        r.cause_identifier.as_ref(),
        r.cause_sealed.as_ref(),
        keys,
    )?;
    Ok(Merge {
        loser: CustomerId(uuid("merge.loser", &r.loser)?),
        survivor: CustomerId(uuid("merge.survivor", &r.survivor)?),
        at: r.at_ms,
        cause: MergeCause {
            event_id: EventId(uuid("merge.cause_event_id", &r.cause_event_id)?),
            identifier,
            rule: r.rule.clone(),
        },
    })
}

pub fn encode_resolved(r: &ResolvedTouchpoint, s: &Sealing) -> Result<Vec<u8>, CodecError> {
    Ok(v1::ResolvedRecord {
        schema_version: SCHEMA_VERSION,
        customer_id: r.customer_id.to_string(),
        merges: r
            .merges
            .iter()
            .map(|m| merge_record(m, s))
            .collect::<Result<_, _>>()?,
        touchpoint: Some(touchpoint_record(&r.touchpoint, s)?),
    }
    .encode_to_vec())
}

/// The subjects whose keys open a resolved record: its touchpoint's and
/// its merge causes'.
pub fn resolved_subjects(r: &v1::ResolvedRecord) -> Vec<cdp_seal::Subject> {
    let mut out: Vec<_> = r
        .touchpoint
        .as_ref()
        .map(record_subjects)
        .unwrap_or_default();
    for m in &r.merges {
        if let Some(p) = &m.cause_sealed {
            out.extend(seal::subjects_of(p));
        }
    }
    out
}

pub fn decode_resolved(
    bytes: &[u8],
    keys: &KeySet,
) -> Result<Opened<ResolvedTouchpoint>, CodecError> {
    let r = v1::ResolvedRecord::decode(bytes)?;
    check_version(r.schema_version)?;
    let touchpoint = touchpoint_from_record(
        r.touchpoint
            .as_ref()
            .ok_or_else(|| field("touchpoint", "missing"))?,
        keys,
    )?;
    Ok(Opened {
        value: ResolvedTouchpoint {
            customer_id: CustomerId(uuid("customer_id", &r.customer_id)?),
            merges: r
                .merges
                .iter()
                .map(|m| merge_from_record(m, keys))
                .collect::<Result<_, _>>()?,
            touchpoint: touchpoint.value,
        },
        anonymous: touchpoint.anonymous,
    })
}

/// Identity-log records describing one resolution.
pub fn identity_records(d: &cdp_domain::Decision, s: &Sealing) -> Result<Vec<Vec<u8>>, CodecError> {
    use v1::identity_record::Change;
    let mut changes = Vec::new();
    for id in &d.claims {
        let (identifier, identifier_sealed) = sealed_identifier(id, s)?;
        changes.push(Change::Linked(v1::IdentifierLinked {
            identifier: Some(identifier),
            customer_id: d.customer_id.to_string(),
            event_id: d.event_id.to_string(),
            at_ms: d.at,
            identifier_sealed,
        }));
    }
    for m in &d.merges {
        changes.push(Change::Merged(merge_record(m, s)?));
    }
    for (id, former) in &d.recycled {
        let (identifier, identifier_sealed) = sealed_identifier(id, s)?;
        changes.push(Change::Recycled(v1::IdentifierRecycled {
            identifier: Some(identifier),
            former_customer_id: former.to_string(),
            customer_id: d.customer_id.to_string(),
            event_id: d.event_id.to_string(),
            at_ms: d.at,
            identifier_sealed,
        }));
    }
    for (id, why) in &d.ignored {
        let (identifier, identifier_sealed) = sealed_identifier(id, s)?;
        changes.push(Change::Ignored(v1::IdentifierIgnored {
            identifier: Some(identifier),
            event_id: d.event_id.to_string(),
            reason: why.describe(),
            code: why.code().to_owned(),
            other_customer_id: why.other().map(|c| c.to_string()).unwrap_or_default(),
            identifier_sealed,
        }));
    }
    for q in &d.quarantined {
        changes.push(Change::Quarantined(quarantine_record(d, q, s)?));
    }
    Ok(changes
        .into_iter()
        .map(|change| {
            v1::IdentityRecord {
                schema_version: SCHEMA_VERSION,
                change: Some(change),
            }
            .encode_to_vec()
        })
        .collect())
}

pub fn quarantine_record(
    d: &cdp_domain::Decision,
    q: &cdp_domain::identity::Quarantined,
    s: &Sealing,
) -> Result<v1::IdentifierQuarantined, CodecError> {
    let (identifier, identifier_sealed) = sealed_identifier(&q.identifier, s)?;
    Ok(v1::IdentifierQuarantined {
        identifier: Some(identifier),
        holder_customer_id: q.holder.to_string(),
        people: q.people,
        limit: q.limit,
        event_id: d.event_id.to_string(),
        at_ms: d.at,
        identifier_sealed,
    })
}

/// The `alerts` records of a decision: one per identifier it quarantined.
pub fn alert_records(d: &cdp_domain::Decision, s: &Sealing) -> Result<Vec<Vec<u8>>, CodecError> {
    d.quarantined
        .iter()
        .map(|q| {
            Ok(v1::AlertRecord {
                schema_version: SCHEMA_VERSION,
                alert: Some(v1::alert_record::Alert::Quarantined(quarantine_record(
                    d, q, s,
                )?)),
            }
            .encode_to_vec())
        })
        .collect()
}

/// The `alerts` record of a credential that read far more customers than usual.
pub fn unusual_reads_record(
    actor: &str,
    role: &str,
    customers: u32,
    threshold: u32,
    window_start_ms: i64,
    at_ms: i64,
) -> Vec<u8> {
    v1::AlertRecord {
        schema_version: SCHEMA_VERSION,
        alert: Some(v1::alert_record::Alert::UnusualReads(v1::UnusualReads {
            actor: actor.to_owned(),
            role: role.to_owned(),
            customers,
            threshold,
            window_start_ms,
            at_ms,
        })),
    }
    .encode_to_vec()
}

/// Decodes an `alerts` record.
pub fn decode_alert(bytes: &[u8]) -> Result<v1::AlertRecord, CodecError> {
    let r = v1::AlertRecord::decode(bytes)?;
    check_version(r.schema_version)?;
    Ok(r)
}

pub fn encode_dead_letter(
    stage: &str,
    reason: &str,
    t: &Touchpoint,
    failed_at: i64,
    s: &Sealing,
) -> Result<Vec<u8>, CodecError> {
    Ok(v1::DeadLetterRecord {
        schema_version: SCHEMA_VERSION,
        stage: stage.to_owned(),
        reason: reason.to_owned(),
        touchpoint: Some(touchpoint_record(t, s)?),
        failed_at_ms: failed_at,
        raw: Vec::new(),
    }
    .encode_to_vec())
}

/// A dead letter for a record that could not even be decoded.
pub fn encode_raw_dead_letter(stage: &str, reason: &str, raw: &[u8], failed_at: i64) -> Vec<u8> {
    v1::DeadLetterRecord {
        schema_version: SCHEMA_VERSION,
        stage: stage.to_owned(),
        reason: reason.to_owned(),
        touchpoint: None,
        failed_at_ms: failed_at,
        raw: raw.to_vec(),
    }
    .encode_to_vec()
}

pub fn decode_dead_letter(bytes: &[u8]) -> Result<v1::DeadLetterRecord, CodecError> {
    let r = v1::DeadLetterRecord::decode(bytes)?;
    check_version(r.schema_version)?;
    Ok(r)
}

/// A `redrives` record.
pub fn encode_redrive(r: &v1::RedriveRecord) -> Vec<u8> {
    v1::RedriveRecord {
        schema_version: SCHEMA_VERSION,
        ..r.clone()
    }
    .encode_to_vec()
}

/// Decodes a `redrives` record.
pub fn decode_redrive(bytes: &[u8]) -> Result<v1::RedriveRecord, CodecError> {
    let r = v1::RedriveRecord::decode(bytes)?;
    check_version(r.schema_version)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Touchpoint {
        Touchpoint {
            envelope: Envelope {
                event_id: EventId(Uuid::from_u128(42)),
                event_type: EventType::OrderCompleted,
                channel: Channel::Store,
                source_id: "pos-q1".into(),
                occurred_at: 1_760_000_000_000,
                received_at: 1_760_000_000_500,
                properties: json!({"total": 1250000, "currency": "VND"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            },
            personal: Personal {
                identifiers: vec![Identifier::new(IdKind::Phone, "+84912345678")],
                traits: json!({"name": "Nguyễn Văn A"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                ..Personal::default()
            },
        }
    }

    fn sealing_for(t: &Touchpoint) -> Sealing {
        Sealing::fresh(&t.personal.identifiers).unwrap()
    }

    #[test]
    fn touchpoints_round_trip() {
        let t = sample();
        let s = sealing_for(&t);
        let opened = decode_touchpoint(&encode_touchpoint(&t, &s).unwrap(), &s.keys).unwrap();
        assert_eq!(
            opened,
            Opened {
                value: t,
                anonymous: false
            }
        );
    }

    /// Sealed: nothing personal in clear; without a key of its subjects the
    /// event reads as anonymous, its amounts and ids intact.
    #[test]
    fn a_touchpoint_without_its_keys_is_anonymous_and_still_counts() {
        let mut t = sample();
        t.envelope
            .properties
            .insert("note".into(), json!("giao cho Nguyễn Văn A, 0912 345 678"));
        let s = sealing_for(&t);
        let bytes = encode_touchpoint(&t, &s).unwrap();
        for secret in ["84912345678", "Nguy", "0912 345"] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} in clear"
            );
        }
        let erased = decode_touchpoint(&bytes, &KeySet::new()).unwrap();
        assert!(erased.anonymous);
        assert!(erased.value.personal.identifiers.is_empty());
        assert!(erased.value.personal.traits.is_empty());
        let p = &erased.value.envelope.properties;
        assert_eq!(p["total"], 1250000);
        assert_eq!(p["currency"], "VND");
        assert_eq!(p["note"], serde_json::Value::Null);
        // Sealed for another event: refused, not misread.
        let mut rec = touchpoint_record(&t, &s).unwrap();
        if let Some(e) = rec.envelope.as_mut() {
            e.event_id = Uuid::from_u128(43).to_string();
        }
        assert!(matches!(
            touchpoint_from_record(&rec, &s.keys),
            Err(CodecError::Sealed(_))
        ));
    }

    /// A record written before sealing (personal part in clear) reads as it
    /// was, until one of its identifiers is erased: then it is anonymous,
    /// its text properties dropped too.
    #[test]
    fn a_record_from_before_sealing_honours_an_erasure() {
        let mut t = sample();
        t.envelope
            .properties
            .insert("note".into(), json!("gọi Nguyễn Văn A"));
        let mut bare = t.clone();
        bare.personal = Personal::default();
        let mut rec = touchpoint_record(&bare, &sealing_for(&bare)).unwrap();
        rec.personal = v1::PersonalRecord {
            identifiers: t
                .personal
                .identifiers
                .iter()
                .map(cdp_proto::convert::identifier)
                .collect(),
            traits_json: json_bytes(&t.personal.traits),
            ..Default::default()
        }
        .encode_to_vec();
        let bytes = rec.encode_to_vec();
        let hasher = cdp_seal::Hasher::new(&cdp_seal::DataKey::generate().unwrap());
        let ids = clear_identifiers(crate::topic::TOUCHPOINTS, &bytes);
        assert_eq!(ids, t.personal.identifiers);
        let subject = cdp_store::keys::subject_of(&hasher, &ids[0]);
        let mut live = KeySet::new().with_hasher(hasher.clone());
        live.insert(subject, Some(cdp_seal::DataKey::generate().unwrap()));
        assert_eq!(decode_touchpoint(&bytes, &live).unwrap().value, t);
        let mut erased = KeySet::new().with_hasher(hasher);
        erased.insert(subject, None);
        let gone = decode_touchpoint(&bytes, &erased).unwrap();
        assert!(gone.anonymous);
        assert!(gone.value.personal.identifiers.is_empty());
        assert_eq!(
            gone.value.envelope.properties["note"],
            serde_json::Value::Null
        );
        assert_eq!(gone.value.envelope.properties["total"], 1250000);
    }

    #[test]
    fn resolved_records_round_trip_with_merges() {
        let t = sample();
        let r = ResolvedTouchpoint {
            customer_id: CustomerId(Uuid::from_u128(1)),
            merges: vec![Merge {
                loser: CustomerId(Uuid::from_u128(2)),
                survivor: CustomerId(Uuid::from_u128(1)),
                at: 5,
                cause: MergeCause {
                    event_id: t.event_id(),
                    identifier: Identifier::new(IdKind::Phone, "+84912345678"),
                    rule: "phone may merge customers".into(),
                },
            }],
            touchpoint: t,
        };
        let s = sealing_for(&r.touchpoint);
        let bytes = encode_resolved(&r, &s).unwrap();
        assert!(!bytes.windows(11).any(|w| w == b"84912345678"));
        assert_eq!(decode_resolved(&bytes, &s.keys).unwrap().value, r);
        // Erased: the merge stays (ids only), its cause's value is gone.
        let erased = decode_resolved(&bytes, &KeySet::new()).unwrap();
        assert!(erased.anonymous);
        assert_eq!(erased.value.merges[0].loser, r.merges[0].loser);
        assert_eq!(erased.value.merges[0].cause.identifier.value, "");
    }

    #[test]
    fn a_future_schema_version_is_refused_not_misread() {
        let s = sealing_for(&sample());
        let mut rec = touchpoint_record(&sample(), &s).unwrap();
        rec.schema_version = SCHEMA_VERSION + 1;
        let err = decode_touchpoint(&rec.encode_to_vec(), &s.keys).unwrap_err();
        assert!(matches!(err, CodecError::UnknownVersion { .. }));
    }
}
