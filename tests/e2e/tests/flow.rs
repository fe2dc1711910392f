//! The end-to-end slice against a running `cdp dev`, over gRPC: a channel
//! adapter sends touchpoints, identity resolution links them, profiles are
//! folded, and an agent reads the single customer view.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use cdp_e2e::{CdpProcess, id, metrics, mobile, profile_when, touchpoint, unique};
use cdp_proto::v1::{
    self, EventStatus, GetProfileRequest, ListTimelineRequest, TrackBatchRequest, TrackRequest,
};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

const PATIENCE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_omnichannel_journey_ends_as_one_customer() {
    let cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    let mut profiles = cdp.profiles().await;

    let anon = uuid::Uuid::new_v4().to_string();
    let email = format!("{}@gmail.com", unique("lan.nguyen"));
    let digits = mobile();
    let device = unique("iphone-");
    let zalo = format!(
        "{}",
        4_000_000_000u64 + (uuid::Uuid::new_v4().as_u128() % 1_000_000) as u64
    );
    let (d1, d2, d3) = (&digits[..3], &digits[3..6], &digits[6..]);

    let journey = vec![
        // Anonymous browsing on the web.
        touchpoint(
            "Product Viewed",
            "web",
            "website",
            vec![id("anonymous_id", &anon)],
            json!({"product_id": "SKU-GI-03", "name": "Giày chạy bộ", "price": 1250000}),
        ),
        // Sign-up on the web.
        touchpoint(
            "Identify",
            "web",
            "website",
            vec![id("anonymous_id", &anon), id("email", &email)],
            json!({}),
        ),
        // The app, with a device id and the phone in international form.
        touchpoint(
            "Product Added",
            "app",
            "mobile-app",
            vec![
                id("device_id", &device),
                id("phone", &format!("+84 {d1} {d2} {d3}")),
            ],
            json!({"product_id": "SKU-AO-01", "name": "Áo thun", "price": 250000, "quantity": 2}),
        ),
        // A purchase at the store POS, the phone in national form.
        touchpoint(
            "Order Completed",
            "store",
            "pos-q1",
            vec![id("phone", &format!("0{digits}"))],
            json!({"order_id": unique("POS-"), "total": 1250000, "currency": "VND", "store_name": "Q1",
                   "products": [{"product_id": "SKU-GI-03", "quantity": 1}, {"product_id": "SKU-AO-01", "quantity": 1}]}),
        ),
        // A Zalo chat with the same phone.
        touchpoint(
            "Message Received",
            "chat",
            "zalo-oa",
            vec![id("zalo_id", &zalo), id("phone", &format!("84{digits}"))],
            json!({"text": "Đơn hàng của tôi đến đâu rồi?"}),
        ),
        // A call-centre ticket: the agent types the email in upper case and the phone.
        touchpoint(
            "Ticket Opened",
            "call_center",
            "hotline",
            vec![
                id("email", &email.to_uppercase()),
                id("phone", &format!("+84-{d1}-{d2}-{d3}")),
            ],
            json!({"ticket_id": unique("T-"), "subject": "Giao hàng chậm"}),
        ),
        // A second order on the web.
        touchpoint(
            "Order Completed",
            "web",
            "website",
            vec![id("email", &email)],
            json!({"order_id": unique("WEB-"), "total": 590000, "currency": "VND"}),
        ),
        // Loyalty points at the store.
        touchpoint(
            "Points Earned",
            "store",
            "loyalty",
            vec![id("phone", &format!("0{digits}"))],
            json!({"points": 120}),
        ),
        // A satisfaction survey by email.
        touchpoint(
            "Feedback Submitted",
            "email",
            "survey",
            vec![id("email", &email)],
            json!({"rating": 5, "comment": "Tốt"}),
        ),
    ];
    for t in &journey {
        let r = ingest
            .track(TrackRequest {
                touchpoint: Some(t.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status(),
            EventStatus::Accepted,
            "event {} not accepted",
            t.r#type
        );
        // One at a time, as channels would send them.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    let lookups = [
        id("anonymous_id", &anon),
        id("email", &email.to_uppercase()),
        id("phone", &format!("0{d1} {d2} {d3}")),
        id("phone", &format!("+84{digits}")),
        id("device_id", &device),
        id("zalo_id", &zalo),
    ];
    let first = profile_when(&mut profiles, lookups[0].clone(), PATIENCE, |p| {
        metrics(p).events_count == journey.len() as u64
    })
    .await;
    for lookup in &lookups {
        let p = profile_when(&mut profiles, lookup.clone(), PATIENCE, |p| {
            metrics(p).events_count == journey.len() as u64
        })
        .await;
        assert_eq!(
            p.customer_id, first.customer_id,
            "lookup by {lookup:?} found another customer"
        );
    }

    let m = metrics(&first);
    assert_eq!(m.orders_count, 2);
    assert_eq!(m.spend.len(), 1);
    assert_eq!(m.spend[0].currency, "VND");
    assert_eq!(m.spend[0].total, "1840000");
    assert_eq!(m.open_tickets, 1);
    assert_eq!(m.loyalty_points, 120);
    // The app cart was cleared by the later store order.
    assert!(
        m.cart.is_empty(),
        "cart should be cleared by the order: {:?}",
        m.cart
    );
    let kinds: BTreeSet<(String, String)> = first
        .identifiers
        .iter()
        .map(|i| (i.kind.clone(), i.value.clone()))
        .collect();
    for expected in [
        ("anonymous_id".to_string(), anon.clone()),
        (
            "email".to_string(),
            email.replace('.', "").replace("@gmailcom", "@gmail.com"),
        ),
        ("phone".to_string(), format!("+84{digits}")),
        ("device_id".to_string(), device.to_lowercase()),
        ("zalo_id".to_string(), zalo.clone()),
    ] {
        assert!(
            kinds.contains(&expected),
            "identifier {expected:?} missing from {kinds:?}"
        );
    }
    let channels: BTreeSet<String> = first
        .recent_timeline
        .iter()
        .map(|e| e.channel.clone())
        .collect();
    assert_eq!(
        channels,
        ["web", "app", "store", "chat", "call_center", "email"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        "timeline should span every channel of the journey"
    );
    let seen: BTreeSet<String> = m
        .last_seen_by_channel
        .iter()
        .map(|c| c.channel.clone())
        .collect();
    assert_eq!(seen.len(), 6);
    assert_eq!(m.last_feedback_rating, 5);
    assert!(
        first
            .recent_timeline
            .iter()
            .any(|e| e.summary == "Ordered 2 items, 1,250,000 VND, at store Q1"),
        "store order summary missing: {:?}",
        first
            .recent_timeline
            .iter()
            .map(|e| &e.summary)
            .collect::<Vec<_>>()
    );

    // The timeline pages newest first and filters by channel.
    let mut page_token = String::new();
    let mut all = Vec::new();
    loop {
        let page = profiles
            .list_timeline(ListTimelineRequest {
                lookup: Some(v1::list_timeline_request::Lookup::CustomerId(
                    first.customer_id.clone(),
                )),
                page_size: 3,
                page_token: page_token.clone(),
                ..ListTimelineRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.entries);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(all.len(), journey.len());
    let times: Vec<i64> = all
        .iter()
        .map(|e| cdp_proto::convert::timestamp_to_millis(e.occurred_at.as_ref().unwrap()))
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "timeline is not newest first"
    );
    let store_only = profiles
        .list_timeline(ListTimelineRequest {
            lookup: Some(v1::list_timeline_request::Lookup::Identifier(id(
                "email", &email,
            ))),
            channels: vec!["store".into()],
            ..ListTimelineRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(store_only.entries.len(), 2);
    assert!(store_only.entries.iter().all(|e| e.channel == "store"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shoppers_at_one_pos_device_stay_two_customers() {
    let cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    let mut profiles = cdp.profiles().await;
    let pos = "POS-Q1-01";
    let (a, b) = (mobile(), mobile());
    for (phone, total) in [(&a, 100_000), (&b, 200_000)] {
        let t = touchpoint(
            "Order Completed",
            "store",
            "pos-q1",
            vec![id("phone", &format!("0{phone}")), id("device_id", pos)],
            json!({"order_id": unique("O-"), "total": total}),
        );
        ingest
            .track(TrackRequest {
                touchpoint: Some(t),
            })
            .await
            .unwrap();
    }
    let pa = profile_when(
        &mut profiles,
        id("phone", &format!("0{a}")),
        PATIENCE,
        |p| metrics(p).orders_count == 1,
    )
    .await;
    let pb = profile_when(
        &mut profiles,
        id("phone", &format!("0{b}")),
        PATIENCE,
        |p| metrics(p).orders_count == 1,
    )
    .await;
    assert_ne!(pa.customer_id, pb.customer_id);
    assert_eq!(metrics(&pa).spend[0].total, "100000");
    assert_eq!(metrics(&pb).spend[0].total, "200000");
    assert!(
        pa.identifiers.iter().all(|i| i.kind != "device_id"),
        "a blocked POS device must not be linked"
    );
    let by_device = profiles
        .get_profile(GetProfileRequest {
            lookup: Some(v1::get_profile_request::Lookup::Identifier(id(
                "device_id",
                pos,
            ))),
            timeline_limit: 0,
            as_of: None,
        })
        .await
        .unwrap_err();
    assert_eq!(by_device.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_id_twice_counts_once() {
    let cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    let mut profiles = cdp.profiles().await;
    let email = format!("{}@shop.vn", unique("dup"));
    let order = touchpoint(
        "Order Completed",
        "web",
        "website",
        vec![id("email", &email)],
        json!({"order_id": unique("O-"), "total": 500000}),
    );
    let first = ingest
        .track(TrackRequest {
            touchpoint: Some(order.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.status(), EventStatus::Accepted);
    let p = profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        metrics(p).orders_count == 1
    })
    .await;

    let again = ingest
        .track(TrackRequest {
            touchpoint: Some(order.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.status(), EventStatus::Duplicate);
    assert_eq!(again.event_id, first.event_id);
    let batch = ingest
        .track_batch(TrackBatchRequest {
            touchpoints: vec![order.clone(), order],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.duplicates, 2);
    // A marker event proves the pipeline has moved past the duplicates.
    let marker = touchpoint(
        "Product Viewed",
        "web",
        "website",
        vec![id("email", &email)],
        json!({"product_id": "X"}),
    );
    ingest
        .track(TrackRequest {
            touchpoint: Some(marker),
        })
        .await
        .unwrap();
    let after = profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        metrics(p).events_count == 2
    })
    .await;
    assert_eq!(metrics(&after).orders_count, 1);
    assert_eq!(metrics(&after).spend[0].total, "500000");
    assert_eq!(after.customer_id, p.customer_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_naming_the_field_and_good_events_still_land() {
    let cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    let mut profiles = cdp.profiles().await;
    let email = format!("{}@shop.vn", unique("bad"));
    let good = || {
        touchpoint(
            "Product Viewed",
            "web",
            "website",
            vec![id("email", &email)],
            json!({"product_id": "A"}),
        )
    };

    let mut missing_type = good();
    missing_type.r#type.clear();
    let mut unknown_channel = good();
    unknown_channel.channel = "fax".into();
    let mut bad_identifier = good();
    bad_identifier.personal = Some(v1::PersonalData {
        identifiers: vec![id("phone", "12345")],
        traits: None,
    });
    let mut future = good();
    future.occurred_at = Some(prost_types::Timestamp {
        seconds: 4_102_444_800,
        nanos: 0,
    });
    let mut oversized = good();
    oversized.properties = cdp_e2e::to_struct(json!({"blob": "x".repeat(40_000)}));

    let cases = [
        (missing_type, "type"),
        (unknown_channel, "channel"),
        (bad_identifier, "identifiers[0].value"),
        (future, "occurred_at"),
        (oversized, "properties"),
    ];
    for (t, field) in &cases {
        let status = ingest
            .track(TrackRequest {
                touchpoint: Some(t.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "for {field}: {status:?}"
        );
        assert!(
            status.message().contains(field),
            "message {:?} does not name {field}",
            status.message()
        );
        let details = status.get_error_details();
        let bad = details.bad_request().expect("a BadRequest detail");
        assert_eq!(bad.field_violations[0].field, *field);
    }

    let mut batch: Vec<v1::Touchpoint> = cases.iter().map(|(t, _)| t.clone()).collect();
    batch.insert(2, good());
    batch.push(good());
    let r = ingest
        .track_batch(TrackBatchRequest { touchpoints: batch })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.accepted, r.rejected), (2, 5));
    assert_eq!(r.results[2].status(), EventStatus::Accepted);
    for (i, (_, field)) in [0usize, 1, 3, 4, 5].iter().zip(&cases) {
        let res = &r.results[*i];
        assert_eq!(res.status(), EventStatus::Rejected);
        assert_eq!(res.error_code, "INVALID_ARGUMENT");
        assert_eq!(res.violations[0].field, *field);
    }
    let p = profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        metrics(p).events_count == 2
    })
    .await;
    assert_eq!(
        metrics(&p).events_count,
        2,
        "only the valid events may land"
    );

    let empty = ingest
        .track(TrackRequest { touchpoint: None })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    let too_many = ingest
        .track_batch(TrackBatchRequest {
            touchpoints: vec![good(); 501],
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert!(too_many.message().contains("touchpoints"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_events_survive_sigkill() {
    let mut cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    let email = format!("{}@shop.vn", unique("kill"));
    let mut acked = 0u64;
    for round in 0..10 {
        let batch: Vec<v1::Touchpoint> = (0..50)
            .map(|i| {
                touchpoint(
                    "Points Earned",
                    "store",
                    "loyalty",
                    vec![id("email", &email)],
                    json!({"points": 1, "n": round * 50 + i}),
                )
            })
            .collect();
        let r = ingest
            .track_batch(TrackBatchRequest { touchpoints: batch })
            .await
            .unwrap()
            .into_inner();
        acked += u64::from(r.accepted);
    }
    assert_eq!(acked, 500);
    // No graceful shutdown: the process dies with whatever it had in flight.
    cdp.kill();
    cdp.restart();
    let mut profiles = cdp.profiles().await;
    let p = profile_when(
        &mut profiles,
        id("email", &email),
        Duration::from_secs(60),
        |p| metrics(p).events_count >= acked,
    )
    .await;
    assert_eq!(
        metrics(&p).events_count,
        acked,
        "an event was lost or counted twice"
    );
    assert_eq!(metrics(&p).loyalty_points, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully() {
    let mut cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    let email = format!("{}@shop.vn", unique("term"));
    let t = touchpoint(
        "Product Viewed",
        "web",
        "website",
        vec![id("email", &email)],
        json!({"product_id": "A"}),
    );
    ingest
        .track(TrackRequest {
            touchpoint: Some(t),
        })
        .await
        .unwrap();
    let status = cdp.terminate();
    assert!(
        status.success(),
        "cdp should exit cleanly on SIGTERM: {status:?}\n{}",
        cdp.log()
    );
    cdp.restart();
    let mut profiles = cdp.profiles().await;
    profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        metrics(p).events_count == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_explain_what_is_wrong() {
    let cdp = CdpProcess::start();
    let mut profiles = cdp.profiles().await;
    let ask = |lookup| GetProfileRequest {
        lookup: Some(lookup),
        timeline_limit: 0,
        as_of: None,
    };
    let cases = [
        (
            v1::get_profile_request::Lookup::CustomerId("nope".into()),
            Code::InvalidArgument,
            "customer_id",
        ),
        (
            v1::get_profile_request::Lookup::Identifier(id("fax", "1")),
            Code::InvalidArgument,
            "identifier.kind",
        ),
        (
            v1::get_profile_request::Lookup::Identifier(id("phone", "abc")),
            Code::InvalidArgument,
            "identifier.value",
        ),
        (
            v1::get_profile_request::Lookup::Identifier(id("email", "nobody@shop.vn")),
            Code::NotFound,
            "nobody@shop.vn",
        ),
    ];
    for (lookup, code, text) in cases {
        let s = profiles.get_profile(ask(lookup)).await.unwrap_err();
        assert_eq!(s.code(), code);
        assert!(
            s.message().contains(text),
            "{:?} should mention {text}",
            s.message()
        );
    }
}

/// `grpcurl` works against the server with no proto files (reflection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs grpcurl: `make test` installs it"]
async fn grpcurl_works_through_reflection() {
    let grpcurl = ["grpcurl"]
        .iter()
        .map(std::path::PathBuf::from)
        .chain(std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join("go/bin/grpcurl")))
        .find(|p| {
            std::process::Command::new(p)
                .arg("-version")
                .output()
                .is_ok()
        });
    let grpcurl = cdp_e2e::tool(grpcurl, "grpcurl");
    let cdp = CdpProcess::start();
    // Ingest, query and projection are one process when embedded, three
    // when distributed.
    let addr = cdp.addr.to_string();
    let query = cdp.query_addr().to_string();
    let projection = cdp.projection_addr().to_string();
    let call = |key: Option<&str>, args: &[&str]| {
        let mut c = std::process::Command::new(&grpcurl);
        c.arg("-plaintext");
        if let Some(key) = key {
            c.args(["-H", &format!("authorization: Bearer {key}")]);
        }
        c.args(args).output().unwrap()
    };
    let run_as = |key: Option<&str>, args: &[&str]| {
        let out = call(key, args);
        assert!(
            out.status.success(),
            "grpcurl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Reflection answers any signed-in role, and nobody without a key.
    let run = |args: &[&str]| run_as(Some(cdp_e2e::OPERATOR_KEY), args);
    let anonymous = call(None, &[&addr, "list"]);
    assert!(!anonymous.status.success());
    assert!(
        String::from_utf8_lossy(&anonymous.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&anonymous.stderr)
    );
    let services = run(&[&addr, "list"]) + &run(&[&query, "list"]) + &run(&[&projection, "list"]);
    for service in [
        "cdp.v1.IngestService",
        "cdp.v1.ProfileService",
        "cdp.v1.IdentityService",
        "cdp.v1.ProjectionService",
        "cdp.v1.ReplayService",
    ] {
        assert!(services.contains(service), "{service} missing: {services}");
    }
    for a in [&addr, &query, &projection] {
        // grpcurl finds the method through reflection, which needs a key;
        // health itself answers without one (see the access matrix test).
        let health = run(&[a, "grpc.health.v1.Health/Check"]);
        assert!(health.contains("SERVING"), "{health}");
    }
    let email = format!("{}@shop.vn", unique("grpcurl"));
    let body =
        json!({"touchpoint": {"type": "Order Completed", "channel": "store", "source_id": "pos-q1",
        "properties": {"total": 1250000, "currency": "VND"},
        "personal": {"identifiers": [{"kind": "email", "value": email}]}}})
        .to_string();
    let tracked = run_as(
        Some(cdp_e2e::INGEST_KEY),
        &["-d", &body, &addr, "cdp.v1.IngestService/Track"],
    );
    assert!(tracked.contains("EVENT_STATUS_ACCEPTED"), "{tracked}");
    let mut profiles = cdp.profiles().await;
    profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        metrics(p).orders_count == 1
    })
    .await;
    let lookup = json!({"identifier": {"kind": "email", "value": email}}).to_string();
    let view = run_as(
        Some(cdp_e2e::AGENT_TOKEN),
        &["-d", &lookup, &query, "cdp.v1.ProfileService/GetProfile"],
    );
    assert!(view.contains("\"ordersCount\": \"1\""), "{view}");
    assert!(
        !view.contains(&email),
        "an agent sees the email in clear: {view}"
    );
}

/// A high-volume adapter keeps one stream open: each batch is answered in
/// order once durable, with per-event results; a malformed batch ends the
/// stream with INVALID_ARGUMENT after the batches before it were taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_batches_is_acknowledged_in_order() {
    let cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    let email = format!("{}@shop.vn", unique("stream"));
    let batch = |n: usize| cdp_proto::v1::TrackBatchRequest {
        touchpoints: (0..n)
            .map(|i| {
                touchpoint(
                    "Product Viewed",
                    "web",
                    "website",
                    vec![id("email", &email)],
                    json!({"i": i}),
                )
            })
            .collect(),
    };
    let mut bad = batch(2);
    bad.touchpoints[1].channel = "carrier-pigeon".into();
    let requests = vec![batch(3), bad, batch(4), batch(0)];
    let mut responses = ingest
        .track_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut answers = Vec::new();
    let end = loop {
        match responses.message().await {
            Ok(Some(r)) => answers.push((r.accepted, r.rejected)),
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    assert_eq!(answers, vec![(3, 0), (1, 1), (4, 0)]);
    let end = end.expect("the empty batch ends the stream with an error");
    assert_eq!(end.code(), Code::InvalidArgument);
    assert!(end.message().contains("touchpoints"), "{}", end.message());
    let mut profiles = cdp.profiles().await;
    profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        metrics(p).events_count == 8
    })
    .await;
}
