//! The binary seeds, made by the encoders themselves from the values the
//! unit tests use (`cdp-fuzz --write-seeds` writes them into the corpus).
//! Text seeds (JSON, TOML, identifiers) are plain files in the corpus.

use cdp_domain::identity::{Merge, MergeCause};
use cdp_domain::{
    Channel, CustomerId, Envelope, EventId, EventType, IdKind, Identifier, Personal,
    ResolvedTouchpoint, Touchpoint,
};
use cdp_pipeline::codec;
use cdp_proto::v1;
use prost::Message;
use serde_json::json;
use uuid::Uuid;

use crate::targets::NOW;

fn attributes(v: serde_json::Value) -> cdp_domain::Attributes {
    v.as_object().cloned().unwrap_or_default()
}

/// The codec unit tests' touchpoint.
fn sample() -> Touchpoint {
    Touchpoint {
        envelope: Envelope {
            event_id: EventId(Uuid::from_u128(42)),
            event_type: EventType::OrderCompleted,
            channel: Channel::Store,
            source_id: "pos-q1".into(),
            occurred_at: 1_760_000_000_000,
            received_at: 1_760_000_000_500,
            properties: attributes(json!({"total": 1250000, "currency": "VND"})),
        },
        personal: Personal {
            identifiers: vec![Identifier::new(IdKind::Phone, "+84912345678")],
            traits: attributes(json!({"name": "Nguyễn Văn A"})),
            ..Personal::default()
        },
    }
}

fn track(
    event_type: &str,
    channel: &str,
    identifiers: &[(&str, &str)],
    properties: serde_json::Value,
) -> Vec<u8> {
    v1::TrackRequest {
        touchpoint: Some(v1::Touchpoint {
            event_id: "0b6b8a39-5b8e-4a7d-9f3e-111111111111".into(),
            r#type: event_type.into(),
            channel: channel.into(),
            source_id: "pos-q1".into(),
            occurred_at: Some(cdp_proto::convert::millis_to_timestamp(NOW - 10_000)),
            properties: Some(cdp_proto::convert::json_to_struct(&attributes(properties))),
            personal: Some(v1::PersonalData {
                identifiers: identifiers
                    .iter()
                    .map(|(kind, value)| v1::Identifier {
                        kind: (*kind).into(),
                        value: (*value).into(),
                    })
                    .collect(),
                traits: Some(cdp_proto::convert::json_to_struct(&attributes(
                    json!({"name": "Lan"}),
                ))),
            }),
        }),
    }
    .encode_to_vec()
}

/// `(target, file name, bytes)` of every encoded seed.
pub fn encoded() -> Vec<(&'static str, String, Vec<u8>)> {
    let t = sample();
    let merge = Merge {
        loser: CustomerId(Uuid::from_u128(2)),
        survivor: CustomerId(Uuid::from_u128(1)),
        at: 5,
        cause: MergeCause {
            event_id: t.event_id(),
            identifier: Identifier::new(IdKind::Phone, "+84912345678"),
            rule: "phone may merge customers".into(),
        },
    };
    let resolved = ResolvedTouchpoint {
        customer_id: CustomerId(Uuid::from_u128(1)),
        merges: vec![merge],
        touchpoint: t.clone(),
    };
    // Seeds are sealed like the live log's records (and, with no keys to
    // open them, read back as anonymous).
    let sealing = cdp_pipeline::seal::Sealing::fresh(
        t.personal
            .identifiers
            .iter()
            .chain(std::iter::once(&resolved.merges[0].cause.identifier)),
    )
    .expect("random keys");
    let mut future = codec::touchpoint_record(&t, &sealing).expect("sealed");
    future.schema_version = codec::SCHEMA_VERSION + 1;
    let encoded_touchpoint = codec::encode_touchpoint(&t, &sealing).expect("sealed");
    let mut bad_channel = codec::touchpoint_record(&t, &sealing).expect("sealed");
    if let Some(e) = bad_channel.envelope.as_mut() {
        e.channel = "carrier pigeon".into();
    }
    let codec_seeds = vec![
        ("ok-touchpoint.bin", encoded_touchpoint.clone()),
        (
            "ok-resolved-with-merge.bin",
            codec::encode_resolved(&resolved, &sealing).expect("sealed"),
        ),
        (
            "ok-dead-letter.bin",
            codec::encode_dead_letter(
                "identity",
                "no identifier of the event may link it to a customer (device_id: kiosk-*)",
                &t,
                9,
                &sealing,
            )
            .expect("sealed"),
        ),
        (
            "ok-raw-dead-letter.bin",
            codec::encode_raw_dead_letter(
                "profile",
                "record is not valid protobuf",
                b"\xff\x00",
                9,
            ),
        ),
        (
            "ok-alert-unusual-reads.bin",
            codec::unusual_reads_record("agent-lan", "agent", 500, 200, 1_000, 2_000),
        ),
        (
            "ok-redrive.bin",
            codec::encode_redrive(&v1::RedriveRecord {
                dead_letter_partition: 1,
                dead_letter_offset: 7,
                event_id: t.event_id().to_string(),
                at_ms: NOW,
                actor: "admin".into(),
                appended: true,
                touchpoint_partition: 2,
                touchpoint_offset: 40,
                ..v1::RedriveRecord::default()
            }),
        ),
        ("err-future-version.bin", future.encode_to_vec()),
        ("err-bad-channel.bin", bad_channel.encode_to_vec()),
        (
            "err-truncated-touchpoint.bin",
            encoded_touchpoint[..encoded_touchpoint.len() / 2].to_vec(),
        ),
        (
            "profile-change.bin",
            Uuid::from_u128(44).as_bytes().to_vec(),
        ),
    ];
    let validate_seeds = vec![
        (
            "ok-order-by-phone.bin",
            track(
                "Order Completed",
                "store",
                &[("phone", "0912 345 678")],
                json!({"total": 1250000, "currency": "VND", "order_id": "HD-1"}),
            ),
        ),
        (
            "ok-page-by-email-and-device.bin",
            track(
                "Page Viewed",
                "web",
                &[
                    ("email", "Lan.Nguyen+shop@gmail.com"),
                    ("device_id", "ABC-1"),
                ],
                json!({"url": "https://shop.vn/"}),
            ),
        ),
        (
            "ok-points-with-a-dropped-phone.bin",
            track(
                "Points Earned",
                "store",
                &[("loyalty_id", "loy-0001"), ("phone", "0912abc678")],
                json!({"points": 120}),
            ),
        ),
        (
            "err-order-without-total.bin",
            track(
                "Order Completed",
                "store",
                &[("phone", "0912345678")],
                json!({}),
            ),
        ),
        (
            "err-no-identifier.bin",
            track("Page Viewed", "web", &[], json!({})),
        ),
        (
            "err-bad-channel.bin",
            track(
                "Page Viewed",
                "carrier pigeon",
                &[("user_id", "u-1")],
                json!({}),
            ),
        ),
        (
            // A property that came back from the log one ULP off before
            // serde_json's float_roundtrip.
            "ok-json-float-roundtrip.bin",
            track(
                "Page Viewed",
                "app",
                &[("user_id", "u-1")],
                json!({"sku": 9.510_611_522_829_519e18}),
            ),
        ),
        (
            "err-unknown-kind.bin",
            track("Page Viewed", "web", &[("passport", "B1234567")], json!({})),
        ),
    ];
    codec_seeds
        .into_iter()
        .map(|(n, b)| ("codec", n.to_owned(), b))
        .chain(
            validate_seeds
                .into_iter()
                .map(|(n, b)| ("validate", n.to_owned(), b)),
        )
        .collect()
}
