//! The records each stage appends, built by pure functions, and the readers
//! of records other stages appended. A stage that builds its records here
//! cannot disagree with the stages that read them.

use cdp_domain::identity::Ignored;
use cdp_domain::{
    CustomerId, Decision, Identifier, IdentityRules, Resolution, ResolvedTouchpoint, Touchpoint,
    UnixMillis,
};
use cdp_log::{LogRecord, Record, Topic};
use cdp_store::FIRST_GENERATION;

use crate::codec::{self, CodecError, Opened};
use crate::seal::Sealing;
use crate::{header, key, topic};
use cdp_seal::{KeySet, Subject};

/// The stage that gave up on an event, as written in its dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Identity,
    Profile,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Identity => "identity",
            Stage::Profile => "profile",
        }
    }
}

// ---- touchpoints ---------------------------------------------------------

/// The `touchpoints` record of an accepted event, with its trace context.
/// The event id is the idempotency key: a retried event is not appended twice.
pub fn touchpoint(
    t: &Touchpoint,
    rules: &IdentityRules,
    traceparent: &str,
    s: &Sealing,
) -> Result<Record, CodecError> {
    let subjects = codec::touchpoint_subjects(t, s);
    Ok(Record {
        key: key::touchpoint(t, rules, &s.hasher),
        value: codec::encode_touchpoint(t, s)?,
        headers: vec![
            (
                header::EVENT_ID.into(),
                t.event_id().to_string().into_bytes(),
            ),
            (
                header::SCHEMA.into(),
                format!("cdp.v1.TouchpointRecord/{}", codec::SCHEMA_VERSION).into_bytes(),
            ),
            (header::TRACEPARENT.into(), traceparent.as_bytes().to_vec()),
            (
                header::SUBJECTS.into(),
                crate::seal::subjects_header(&subjects),
            ),
        ],
        idempotency_key: Some(t.event_id().0.as_bytes().to_vec()),
    })
}

/// The copy of a dead-lettered touchpoint that a re-drive appends to
/// `touchpoints`: the same record, marked with [`header::REDRIVE_OF`], whose
/// idempotency key is the dead letter's position, so re-driving one dead
/// letter twice (two operators at once, a retried call) appends it once.
pub fn redriven_touchpoint(
    t: &Touchpoint,
    rules: &IdentityRules,
    traceparent: &str,
    dead_letter: (u32, u64),
    s: &Sealing,
) -> Result<Record, CodecError> {
    let mut record = touchpoint(t, rules, traceparent, s)?;
    record.headers.push((
        header::REDRIVE_OF.into(),
        format!(
            "{}/{}/{}",
            topic::DEAD_LETTERS,
            dead_letter.0,
            dead_letter.1
        )
        .into_bytes(),
    ));
    let mut idempotency = b"redrive/".to_vec();
    idempotency.extend(key::dead_letter(dead_letter.0, dead_letter.1));
    record.idempotency_key = Some(idempotency);
    Ok(record)
}

/// Whether a `touchpoints` record is a re-driven copy of an event already
/// in the log.
pub fn is_redrive(r: &LogRecord) -> bool {
    r.header(header::REDRIVE_OF).is_some()
}

/// The `redrives` record saying a dead letter was re-driven.
pub fn redrive(r: &cdp_proto::v1::RedriveRecord) -> Record {
    Record {
        key: key::dead_letter(r.dead_letter_partition, r.dead_letter_offset),
        value: codec::encode_redrive(r),
        ..Record::default()
    }
}

/// Decodes a `touchpoints` record, opening its personal part with `keys`
/// (fetched for [`subjects`]).
pub fn read_touchpoint(r: &LogRecord, keys: &KeySet) -> Result<Opened<Touchpoint>, CodecError> {
    codec::decode_touchpoint(&r.value, keys)
}

/// The subjects whose keys a reader needs to open `records`, each once:
/// from their [`header::SUBJECTS`] headers, or, for records written before
/// sealing (their identifiers in clear), from their identifiers, so an
/// erasure reaches them too.
pub fn subjects<'a>(
    records: impl IntoIterator<Item = &'a LogRecord>,
    hasher: &cdp_seal::Hasher,
) -> Vec<Subject> {
    let mut out: Vec<Subject> = Vec::new();
    for r in records {
        match r.header(header::SUBJECTS) {
            Some(h) => out.extend(crate::seal::read_subjects_header(h)),
            None => out.extend(
                codec::clear_identifiers(r.topic, &r.value)
                    .iter()
                    .map(|id| cdp_store::keys::subject_of(hasher, id)),
            ),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The keys that open `records`: those of every subject they name (an
/// erased subject's absent), which every reader of the log fetches first.
pub async fn keys_for<'a>(
    keyring: &cdp_store::Keyring,
    records: impl IntoIterator<Item = &'a LogRecord>,
) -> Result<KeySet, cdp_store::StoreError> {
    keyring.keys(&subjects(records, keyring.hasher())).await
}

/// The trace context a record carries, to pass on to what it causes.
pub fn trace_of(r: &LogRecord) -> Option<&[u8]> {
    r.header(header::TRACEPARENT)
}

// ---- what identity emits ---------------------------------------------------

/// The event with the customer a decision gave it, and the merges the
/// decision caused (the profile fold applies them before the event).
pub fn resolved(touchpoint: Touchpoint, decision: Decision) -> ResolvedTouchpoint {
    ResolvedTouchpoint {
        customer_id: decision.customer_id,
        merges: decision.merges,
        touchpoint,
    }
}

/// Why an event no identifier may attribute goes to the dead letters.
pub fn unresolvable_reason(ignored: &[(Identifier, Ignored)]) -> String {
    let reasons: Vec<String> = ignored
        .iter()
        .map(|(id, why)| format!("{}: {}", id.kind, why.describe()))
        .collect();
    format!(
        "no identifier of the event may link it to a customer ({})",
        reasons.join("; ")
    )
}

/// The records of a batch, per topic.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outputs {
    /// `resolved`: what the profile stage folds.
    pub resolved: Vec<Record>,
    /// `identity`: the graph's changes, naming their generation.
    pub identity: Vec<Record>,
    /// `dead-letters`: what could not be processed, with the reason.
    pub dead_letters: Vec<Record>,
    /// `alerts`: what an operator should look at.
    pub alerts: Vec<Record>,
}

impl Outputs {
    /// Adds what identity emits for `event` resolved as `resolution` into
    /// projection `generation`: the resolved record (carrying the event's
    /// trace context) and the graph's changes, or a dead letter.
    pub fn resolution(
        &mut self,
        event: Touchpoint,
        resolution: Resolution,
        generation: u32,
        trace: Option<&[u8]>,
        now: UnixMillis,
        s: &Sealing,
    ) -> Result<(), CodecError> {
        match resolution {
            Resolution::Resolved(decision) => {
                let customer = key::customer(decision.customer_id);
                let of_generation = (
                    header::GENERATION.to_owned(),
                    generation.to_string().into_bytes(),
                );
                self.identity
                    .extend(
                        codec::identity_records(&decision, s)?
                            .into_iter()
                            .map(|value| Record {
                                key: customer.clone(),
                                value,
                                headers: vec![of_generation.clone()],
                                idempotency_key: None,
                            }),
                    );
                self.alerts.extend(
                    codec::alert_records(&decision, s)?
                        .into_iter()
                        .zip(&decision.quarantined)
                        .map(|(value, q)| Record {
                            key: key::identifier(&q.identifier, &s.hasher),
                            value,
                            headers: vec![of_generation.clone()],
                            idempotency_key: None,
                        }),
                );
                let mut subjects = codec::touchpoint_subjects(&event, s);
                subjects.extend(
                    decision
                        .merges
                        .iter()
                        .map(|m| s.subject(&m.cause.identifier)),
                );
                subjects.sort();
                subjects.dedup();
                let resolved = resolved(event, decision);
                let mut headers = vec![
                    (
                        header::EVENT_ID.into(),
                        resolved.touchpoint.event_id().to_string().into_bytes(),
                    ),
                    (
                        header::GENERATION.into(),
                        generation.to_string().into_bytes(),
                    ),
                    (
                        header::SUBJECTS.into(),
                        crate::seal::subjects_header(&subjects),
                    ),
                ];
                if let Some(t) = trace {
                    headers.push((header::TRACEPARENT.into(), t.to_vec()));
                }
                self.resolved.push(Record {
                    key: customer,
                    value: codec::encode_resolved(&resolved, s)?,
                    headers,
                    idempotency_key: None,
                });
            }
            Resolution::Unresolvable { ignored } => {
                let reason = unresolvable_reason(&ignored);
                self.dead_letter(Stage::Identity, &reason, &event, now, s)?;
                if let Some(letter) = self.dead_letters.last_mut() {
                    letter.headers.push((
                        header::GENERATION.to_owned(),
                        generation.to_string().into_bytes(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Marks the records as a rebuild's (see [`header::REBUILT`]).
    pub fn rebuilt(mut self) -> Self {
        for r in self
            .resolved
            .iter_mut()
            .chain(&mut self.identity)
            .chain(&mut self.dead_letters)
            .chain(&mut self.alerts)
        {
            r.headers.push((header::REBUILT.to_owned(), b"1".to_vec()));
        }
        self
    }

    /// Adds a dead letter for a decoded event.
    pub fn dead_letter(
        &mut self,
        stage: Stage,
        reason: &str,
        event: &Touchpoint,
        now: UnixMillis,
        s: &Sealing,
    ) -> Result<(), CodecError> {
        let subjects = codec::touchpoint_subjects(event, s);
        self.dead_letters.push(Record {
            key: key::event(event.event_id()),
            value: codec::encode_dead_letter(stage.name(), reason, event, now, s)?,
            headers: vec![(
                header::SUBJECTS.into(),
                crate::seal::subjects_header(&subjects),
            )],
            ..Record::default()
        });
        Ok(())
    }

    /// Adds a dead letter for a record that could not be decoded, keeping
    /// its bytes.
    pub fn undecodable(&mut self, stage: Stage, record: &LogRecord, error: &str, now: UnixMillis) {
        self.dead_letters.push(Record {
            key: record.key.clone(),
            value: codec::encode_raw_dead_letter(stage.name(), error, &record.value, now),
            ..Record::default()
        });
    }

    /// The appends, in the order they must happen: the resolved records
    /// first (what profiles need), then the graph's changes, then dead
    /// letters. Empty ones are left out.
    pub fn appends(self) -> Vec<(Topic, Vec<Record>)> {
        [
            (topic::RESOLVED, self.resolved),
            (topic::IDENTITY, self.identity),
            (topic::DEAD_LETTERS, self.dead_letters),
            (topic::ALERTS, self.alerts),
        ]
        .into_iter()
        .filter(|(_, records)| !records.is_empty())
        .collect()
    }
}

// ---- resolved records ------------------------------------------------------

/// The projection generation a `resolved` record belongs to (the first
/// when it names none); `None` when the header is unreadable.
pub fn generation_of(r: &LogRecord) -> Option<u32> {
    match r.header(header::GENERATION) {
        None => Some(FIRST_GENERATION),
        Some(h) => std::str::from_utf8(h).ok()?.parse().ok(),
    }
}

/// Decodes a `resolved` record, opening its personal parts with `keys`.
pub fn read_resolved(
    r: &LogRecord,
    keys: &KeySet,
) -> Result<Opened<ResolvedTouchpoint>, CodecError> {
    codec::decode_resolved(&r.value, keys)
}

/// Whether a rebuild appended the record (see [`header::REBUILT`]).
pub fn is_rebuilt(r: &LogRecord) -> bool {
    r.header(header::REBUILT).is_some()
}

/// When the event of a `resolved` record reached the views of its
/// generation: when the record was appended, for the live pipeline; when
/// the event arrived, for a rebuild, which appends long after.
pub fn reached_views_at(r: &LogRecord, resolved: &ResolvedTouchpoint) -> UnixMillis {
    if is_rebuilt(r) {
        resolved.touchpoint.envelope.received_at
    } else {
        r.timestamp
    }
}

/// Whether a `resolved` record could concern `customer`: it sits in the
/// partition of the customer's key.
pub fn resolved_partition(customer: CustomerId, partitions: u32) -> u32 {
    key::customer_partition(customer, partitions)
}

// ---- profile changes -------------------------------------------------------

/// The announcement that `customer`'s view changed.
pub fn profile_change(customer: CustomerId) -> Record {
    Record {
        key: key::customer(customer),
        value: customer.0.as_bytes().to_vec(),
        ..Record::default()
    }
}

/// The customer a `profile-changes` record announces.
pub fn read_profile_change(r: &LogRecord) -> Option<CustomerId> {
    uuid::Uuid::from_slice(&r.value).ok().map(CustomerId)
}

#[cfg(test)]
mod tests {
    use cdp_domain::identity::{Merge, MergeCause};
    use cdp_domain::rules::BlockReason;
    use cdp_domain::{Channel, Envelope, EventId, EventType, IdKind, Personal};
    use uuid::Uuid;

    use super::*;

    fn event() -> Touchpoint {
        Touchpoint {
            envelope: Envelope {
                event_id: EventId(Uuid::from_u128(7)),
                event_type: EventType::OrderCompleted,
                channel: Channel::Store,
                source_id: "pos".into(),
                occurred_at: 1_000,
                received_at: 1_001,
                properties: Default::default(),
            },
            personal: Personal {
                identifiers: vec![Identifier::new(IdKind::Phone, "+84912345678")],
                traits: Default::default(),
                ..Personal::default()
            },
        }
    }

    fn sealing() -> Sealing {
        Sealing::fresh(&event().personal.identifiers).unwrap()
    }

    fn as_read(topic: Topic, r: &Record) -> LogRecord {
        LogRecord {
            topic,
            partition: 0,
            offset: 0,
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r.headers.clone(),
            timestamp: 0,
        }
    }

    #[test]
    fn a_decision_emits_a_resolved_record_of_its_generation_and_the_graph_changes() {
        let customer = CustomerId(Uuid::from_u128(1));
        let merge = Merge {
            loser: CustomerId(Uuid::from_u128(2)),
            survivor: customer,
            at: 1_000,
            cause: MergeCause {
                event_id: event().event_id(),
                identifier: Identifier::new(IdKind::Phone, "+84912345678"),
                rule: "phone may merge customers".into(),
            },
        };
        let decision = Decision {
            event_id: event().event_id(),
            at: 1_000,
            customer_id: customer,
            created: false,
            claims: vec![Identifier::new(IdKind::Phone, "+84912345678")],
            merges: vec![merge.clone()],
            ignored: Vec::new(),
            recycled: Vec::new(),
            sightings: Vec::new(),
            quarantined: Vec::new(),
            seen: Vec::new(),
        };
        let mut out = Outputs::default();
        let s = sealing();
        out.resolution(
            event(),
            Resolution::Resolved(decision),
            3,
            Some(b"00-trace"),
            5,
            &s,
        )
        .unwrap();
        for r in out.identity.iter().chain(&out.resolved) {
            assert!(
                !r.value.windows(11).any(|w| w == b"84912345678"),
                "a phone in clear"
            );
        }
        assert_eq!(out.identity.len(), 2, "one link and one merge");
        assert!(out.dead_letters.is_empty());
        let [resolved] = out.resolved.as_slice() else {
            panic!("one resolved record, got {:?}", out.resolved)
        };
        assert_eq!(resolved.key, key::customer(customer));
        let read = as_read(topic::RESOLVED, resolved);
        assert_eq!(generation_of(&read), Some(3));
        assert_eq!(trace_of(&read), Some(b"00-trace".as_slice()));
        assert_eq!(subjects([&read], &s.hasher).len(), 1, "the phone's subject");
        let back = read_resolved(&read, &s.keys).unwrap().value;
        assert_eq!(back.customer_id, customer);
        assert_eq!(back.merges, vec![merge]);
        assert_eq!(back.touchpoint, event());
        let topics: Vec<Topic> = out.appends().into_iter().map(|(t, _)| t).collect();
        assert_eq!(topics, vec![topic::RESOLVED, topic::IDENTITY]);
    }

    #[test]
    fn an_unresolvable_event_is_a_dead_letter_naming_every_reason() {
        let id = Identifier::new(IdKind::DeviceId, "kiosk-1");
        let mut out = Outputs::default();
        out.resolution(
            event(),
            Resolution::Unresolvable {
                ignored: vec![(id, Ignored::Blocked(BlockReason::Pattern("kiosk-*".into())))],
            },
            1,
            None,
            9,
            &sealing(),
        )
        .unwrap();
        assert!(out.resolved.is_empty() && out.identity.is_empty());
        let [dead] = out.dead_letters.as_slice() else {
            panic!("one dead letter")
        };
        let letter = codec::decode_dead_letter(&dead.value).unwrap();
        assert_eq!(letter.stage, "identity");
        assert!(letter.reason.contains("kiosk-*"), "{}", letter.reason);
        assert_eq!(letter.failed_at_ms, 9);
    }

    #[test]
    fn rebuilt_records_reached_the_views_when_their_events_arrived() {
        let decision = Decision {
            event_id: event().event_id(),
            at: 1_000,
            customer_id: CustomerId(Uuid::from_u128(1)),
            created: true,
            claims: Vec::new(),
            merges: Vec::new(),
            ignored: Vec::new(),
            recycled: Vec::new(),
            sightings: Vec::new(),
            quarantined: Vec::new(),
            seen: Vec::new(),
        };
        let mut live = Outputs::default();
        let s = sealing();
        live.resolution(event(), Resolution::Resolved(decision), 2, None, 0, &s)
            .unwrap();
        let rebuilt = live.clone().rebuilt();
        let mut read = as_read(topic::RESOLVED, &live.resolved[0]);
        read.timestamp = 90_000;
        let resolved = read_resolved(&read, &s.keys).unwrap().value;
        assert!(!is_rebuilt(&read));
        assert_eq!(reached_views_at(&read, &resolved), 90_000);
        let mut read = as_read(topic::RESOLVED, &rebuilt.resolved[0]);
        read.timestamp = 90_000;
        assert!(is_rebuilt(&read));
        assert_eq!(
            reached_views_at(&read, &resolved),
            event().envelope.received_at
        );
    }

    #[test]
    fn records_without_a_generation_header_belong_to_the_first() {
        let mut r = as_read(topic::RESOLVED, &Record::default());
        assert_eq!(generation_of(&r), Some(FIRST_GENERATION));
        r.headers.push((header::GENERATION.into(), b"x".to_vec()));
        assert_eq!(generation_of(&r), None);
    }

    #[test]
    fn touchpoints_are_keyed_by_their_strongest_identifier_and_deduplicated_by_event_id() {
        let rules = IdentityRules::default();
        let s = sealing();
        let r = touchpoint(&event(), &rules, "00-t", &s).unwrap();
        assert_eq!(r.key, key::touchpoint(&event(), &rules, &s.hasher));
        assert!(
            !r.key.windows(11).any(|w| w == b"84912345678"),
            "the key names the identifier by its subject"
        );
        assert_eq!(
            r.idempotency_key.as_deref(),
            Some(event().event_id().0.as_bytes().as_slice())
        );
        let read = as_read(topic::TOUCHPOINTS, &r);
        assert_eq!(read_touchpoint(&read, &s.keys).unwrap().value, event());
        assert_eq!(
            read.header(header::EVENT_ID),
            Some(event().event_id().to_string().as_bytes())
        );
    }

    #[test]
    fn profile_changes_round_trip() {
        let c = CustomerId(Uuid::from_u128(44));
        let change = profile_change(c);
        assert_eq!(
            read_profile_change(&as_read(topic::PROFILE_CHANGES, &change)),
            Some(c)
        );
    }
}
