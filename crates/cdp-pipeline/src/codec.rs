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

pub fn touchpoint_record(t: &Touchpoint) -> v1::TouchpointRecord {
    let personal = v1::PersonalRecord {
        identifiers: t
            .personal
            .identifiers
            .iter()
            .map(cdp_proto::convert::identifier)
            .collect(),
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
    };
    let e = &t.envelope;
    v1::TouchpointRecord {
        schema_version: SCHEMA_VERSION,
        envelope: Some(v1::EnvelopeRecord {
            event_id: e.event_id.to_string(),
            r#type: e.event_type.to_string(),
            channel: e.channel.to_string(),
            source_id: e.source_id.clone(),
            occurred_at_ms: e.occurred_at,
            received_at_ms: e.received_at,
            properties_json: json_bytes(&e.properties),
        }),
        personal: personal.encode_to_vec(),
    }
}

pub fn touchpoint_from_record(r: &v1::TouchpointRecord) -> Result<Touchpoint, CodecError> {
    check_version(r.schema_version)?;
    let e = r
        .envelope
        .as_ref()
        .ok_or_else(|| field("envelope", "missing"))?;
    let personal = v1::PersonalRecord::decode(r.personal.as_slice())?;
    Ok(Touchpoint {
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
            properties: json_map("envelope.properties_json", &e.properties_json)?,
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
    })
}

pub fn encode_touchpoint(t: &Touchpoint) -> Vec<u8> {
    touchpoint_record(t).encode_to_vec()
}

pub fn decode_touchpoint(bytes: &[u8]) -> Result<Touchpoint, CodecError> {
    touchpoint_from_record(&v1::TouchpointRecord::decode(bytes)?)
}

pub fn merge_record(m: &Merge) -> v1::MergeRecord {
    v1::MergeRecord {
        loser: m.loser.to_string(),
        survivor: m.survivor.to_string(),
        at_ms: m.at,
        cause_event_id: m.cause.event_id.to_string(),
        cause_identifier: Some(cdp_proto::convert::identifier(&m.cause.identifier)),
        rule: m.cause.rule.clone(),
    }
}

pub fn merge_from_record(r: &v1::MergeRecord) -> Result<Merge, CodecError> {
    let id = r
        .cause_identifier
        .as_ref()
        .ok_or_else(|| field("merge.cause_identifier", "missing"))?;
    Ok(Merge {
        loser: CustomerId(uuid("merge.loser", &r.loser)?),
        survivor: CustomerId(uuid("merge.survivor", &r.survivor)?),
        at: r.at_ms,
        cause: MergeCause {
            event_id: EventId(uuid("merge.cause_event_id", &r.cause_event_id)?),
            identifier: identifier_from("merge.cause_identifier", id)?,
            rule: r.rule.clone(),
        },
    })
}

pub fn encode_resolved(r: &ResolvedTouchpoint) -> Vec<u8> {
    v1::ResolvedRecord {
        schema_version: SCHEMA_VERSION,
        customer_id: r.customer_id.to_string(),
        merges: r.merges.iter().map(merge_record).collect(),
        touchpoint: Some(touchpoint_record(&r.touchpoint)),
    }
    .encode_to_vec()
}

pub fn decode_resolved(bytes: &[u8]) -> Result<ResolvedTouchpoint, CodecError> {
    let r = v1::ResolvedRecord::decode(bytes)?;
    check_version(r.schema_version)?;
    Ok(ResolvedTouchpoint {
        customer_id: CustomerId(uuid("customer_id", &r.customer_id)?),
        merges: r
            .merges
            .iter()
            .map(merge_from_record)
            .collect::<Result<_, _>>()?,
        touchpoint: touchpoint_from_record(
            r.touchpoint
                .as_ref()
                .ok_or_else(|| field("touchpoint", "missing"))?,
        )?,
    })
}

/// Identity-log records describing one resolution.
pub fn identity_records(d: &cdp_domain::Decision) -> Vec<Vec<u8>> {
    use v1::identity_record::Change;
    let linked = d.claims.iter().map(|id| {
        Change::Linked(v1::IdentifierLinked {
            identifier: Some(cdp_proto::convert::identifier(id)),
            customer_id: d.customer_id.to_string(),
            event_id: d.event_id.to_string(),
            at_ms: d.at,
        })
    });
    let merged = d.merges.iter().map(|m| Change::Merged(merge_record(m)));
    let ignored = d.ignored.iter().map(|(id, why)| {
        Change::Ignored(v1::IdentifierIgnored {
            identifier: Some(cdp_proto::convert::identifier(id)),
            event_id: d.event_id.to_string(),
            reason: why.describe(),
            code: why.code().to_owned(),
            other_customer_id: why.other().map(|c| c.to_string()).unwrap_or_default(),
        })
    });
    let recycled = d.recycled.iter().map(|(id, former)| {
        Change::Recycled(v1::IdentifierRecycled {
            identifier: Some(cdp_proto::convert::identifier(id)),
            former_customer_id: former.to_string(),
            customer_id: d.customer_id.to_string(),
            event_id: d.event_id.to_string(),
            at_ms: d.at,
        })
    });
    let quarantined = d
        .quarantined
        .iter()
        .map(|q| Change::Quarantined(quarantine_record(d, q)));
    linked
        .chain(merged)
        .chain(recycled)
        .chain(ignored)
        .chain(quarantined)
        .map(|change| {
            v1::IdentityRecord {
                schema_version: SCHEMA_VERSION,
                change: Some(change),
            }
            .encode_to_vec()
        })
        .collect()
}

pub fn quarantine_record(
    d: &cdp_domain::Decision,
    q: &cdp_domain::identity::Quarantined,
) -> v1::IdentifierQuarantined {
    v1::IdentifierQuarantined {
        identifier: Some(cdp_proto::convert::identifier(&q.identifier)),
        holder_customer_id: q.holder.to_string(),
        people: q.people,
        limit: q.limit,
        event_id: d.event_id.to_string(),
        at_ms: d.at,
    }
}

/// The `alerts` records of a decision: one per identifier it quarantined.
pub fn alert_records(d: &cdp_domain::Decision) -> Vec<Vec<u8>> {
    d.quarantined
        .iter()
        .map(|q| {
            v1::AlertRecord {
                schema_version: SCHEMA_VERSION,
                alert: Some(v1::alert_record::Alert::Quarantined(quarantine_record(
                    d, q,
                ))),
            }
            .encode_to_vec()
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

pub fn encode_dead_letter(stage: &str, reason: &str, t: &Touchpoint, failed_at: i64) -> Vec<u8> {
    v1::DeadLetterRecord {
        schema_version: SCHEMA_VERSION,
        stage: stage.to_owned(),
        reason: reason.to_owned(),
        touchpoint: Some(touchpoint_record(t)),
        failed_at_ms: failed_at,
        raw: Vec::new(),
    }
    .encode_to_vec()
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

    #[test]
    fn touchpoints_round_trip() {
        let t = sample();
        assert_eq!(decode_touchpoint(&encode_touchpoint(&t)).unwrap(), t);
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
        assert_eq!(decode_resolved(&encode_resolved(&r)).unwrap(), r);
    }

    #[test]
    fn a_future_schema_version_is_refused_not_misread() {
        let mut rec = touchpoint_record(&sample());
        rec.schema_version = SCHEMA_VERSION + 1;
        let err = decode_touchpoint(&rec.encode_to_vec()).unwrap_err();
        assert!(matches!(err, CodecError::UnknownVersion { .. }));
    }
}
