//! Identity explanations against a running `cdp dev`: why two identifiers
//! are one customer, with the real cause of each merge.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cdp_e2e::{CdpProcess, id, metrics, mobile, profile_when, touchpoint, unique};
use cdp_proto::v1::dead_letter_service_client::DeadLetterServiceClient;
use cdp_proto::v1::identity_service_client::IdentityServiceClient;
use cdp_proto::v1::{
    DecisionExplanation, ExplainRequest, GetDecisionRequest, Identifier, ListDeadLettersRequest,
    ListMergesRequest, ListQuarantinedRequest, TrackRequest, list_merges_request,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_returns_the_real_cause_of_a_merge() {
    let cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    let tag = unique("");
    let email = format!("explain.{tag}@shop.vn");
    let digits = mobile();
    let phone = format!("0{digits}");
    // Two customers: one known by email on the web, one by phone in the app.
    for t in [
        touchpoint(
            "Product Viewed",
            "web",
            "website",
            vec![id("email", &email)],
            json!({"product_id": "A"}),
        ),
        touchpoint(
            "Product Viewed",
            "app",
            "mobile-app",
            vec![id("phone", &phone)],
            json!({"product_id": "B"}),
        ),
    ] {
        ingest
            .track(TrackRequest {
                touchpoint: Some(t),
            })
            .await
            .unwrap();
    }
    let mut profiles = cdp.profiles().await;
    profile_when(
        &mut profiles,
        id("phone", &phone),
        Duration::from_secs(20),
        |p| metrics(p).events_count == 1,
    )
    .await;
    // The hotline agent records both: this event merges them.
    let link = touchpoint(
        "Ticket Opened",
        "call_center",
        "hotline",
        vec![id("email", &email), id("phone", &phone)],
        json!({"ticket_id": tag}),
    );
    let link_id = link.event_id.clone();
    ingest
        .track(TrackRequest {
            touchpoint: Some(link),
        })
        .await
        .unwrap();
    let merged = profile_when(
        &mut profiles,
        id("email", &email),
        Duration::from_secs(20),
        |p| metrics(p).events_count == 3,
    )
    .await;

    let mut identity = IdentityServiceClient::new(cdp.query_channel().await);
    let typed_phone = format!("+84 {} {} {}", &digits[..3], &digits[3..6], &digits[6..]);
    let r = identity
        .explain(ExplainRequest {
            identifiers: vec![
                id("email", &email.to_uppercase()),
                id("phone", &typed_phone),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.same_customer);
    let by_email = &r.identifiers[0];
    let by_phone = &r.identifiers[1];
    assert_eq!(by_email.customer_id, merged.customer_id);
    // The web customer is older, so it survives; the phone's customer was merged into it.
    assert!(by_email.merges.is_empty());
    assert_eq!(by_phone.merges.len(), 1, "{r:#?}");
    let m = &by_phone.merges[0];
    assert_eq!(m.cause_event_id, link_id);
    assert_eq!(m.cause_identifier.as_ref().unwrap().kind, "phone");
    assert_eq!(
        m.cause_identifier.as_ref().unwrap().value,
        format!("+84{digits}")
    );
    assert!(m.rule.contains("phone may merge"), "{}", m.rule);
    assert_eq!(m.survivor_customer_id, merged.customer_id);
    assert_eq!(m.loser_customer_id, by_phone.first_customer_id);

    let history = identity
        .list_merges(ListMergesRequest {
            lookup: Some(list_merges_request::Lookup::Identifier(id("phone", &phone))),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.customer_id, merged.customer_id);
    assert_eq!(history.merges.len(), 1);
    assert_eq!(history.merges[0].cause_event_id, link_id);

    let apart = identity
        .explain(ExplainRequest {
            identifiers: vec![
                id("email", &email),
                id("email", &format!("nobody.{tag}@shop.vn")),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!apart.same_customer);
    assert!(!apart.identifiers[1].linked);
    let bad = identity
        .explain(ExplainRequest {
            identifiers: vec![id("phone", "12")],
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().contains("identifiers[0].value"),
        "{}",
        bad.message()
    );
}

// ---- identity that never joins strangers (issue #15) ----------------------

/// The customer an identifier leads to once `events` events are folded there.
async fn customer_of(cdp: &CdpProcess, identifier: Identifier, events: u64) -> String {
    let mut profiles = cdp.profiles().await;
    profile_when(&mut profiles, identifier, Duration::from_secs(30), |p| {
        metrics(p).events_count == events
    })
    .await
    .customer_id
}

async fn decision(cdp: &CdpProcess, event_id: &str) -> DecisionExplanation {
    let mut identity = IdentityServiceClient::new(cdp.query_channel().await);
    identity
        .get_decision(GetDecisionRequest {
            event_id: event_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn at_days_ago(t: &mut cdp_proto::v1::Touchpoint, days: i64) {
    t.occurred_at = Some(cdp_proto::convert::millis_to_timestamp(
        cdp_e2e::now_ms() - days * 86_400_000,
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_family_phone_and_a_shared_tablet_never_join_strangers() {
    let cdp = CdpProcess::start();
    let tag = unique("");
    let home = format!("0{}", mobile());
    // Mother and daughter give the store the family's home phone, each with her own card.
    let mother = touchpoint(
        "Order Completed",
        "store",
        "pos-q1",
        vec![id("phone", &home), id("loyalty_id", &format!("LC-M-{tag}"))],
        json!({"order_id": format!("m-{tag}"), "total": 100_000, "currency": "VND"}),
    );
    cdp.track(mother).await;
    let mother_id = customer_of(&cdp, id("loyalty_id", &format!("LC-M-{tag}")), 1).await;
    let daughter = touchpoint(
        "Order Completed",
        "store",
        "pos-q1",
        vec![id("phone", &home), id("loyalty_id", &format!("LC-D-{tag}"))],
        json!({"order_id": format!("d-{tag}"), "total": 200_000, "currency": "VND"}),
    );
    let daughter_event = daughter.event_id.clone();
    cdp.track(daughter).await;
    let daughter_id = customer_of(&cdp, id("loyalty_id", &format!("LC-D-{tag}")), 1).await;
    assert_ne!(
        daughter_id, mother_id,
        "the daughter's order joined her mother"
    );
    // The mother's view is hers alone.
    assert_eq!(customer_of(&cdp, id("phone", &home), 1).await, mother_id);
    let d = decision(&cdp, &daughter_event).await;
    assert!(d.resolved && d.created, "{d:#?}");
    assert_eq!(d.customer_id, daughter_id);
    assert_eq!(d.ignored.len(), 1, "{d:#?}");
    assert_eq!(d.ignored[0].code, "conflicts_with_stronger");
    assert_eq!(d.ignored[0].other_customer_id, mother_id);

    // A shop tablet: a first shopper browses and logs in on it...
    let tablet = format!("tablet-{tag}");
    let anon = format!("anon-{tag}");
    let first_email = format!("first.{tag}@shop.vn");
    cdp.track(touchpoint(
        "Identify",
        "app",
        "kiosk-app",
        vec![
            id("device_id", &tablet),
            id("anonymous_id", &anon),
            id("email", &first_email),
        ],
        json!({}),
    ))
    .await;
    let first_id = customer_of(&cdp, id("email", &first_email), 1).await;
    // ...then a new customer signs up on it with a new card and phone.
    let new_phone = format!("0{}", mobile());
    let signup = touchpoint(
        "Identify",
        "app",
        "kiosk-app",
        vec![
            id("device_id", &tablet),
            id("anonymous_id", &anon),
            id("loyalty_id", &format!("LC-N-{tag}")),
            id("phone", &new_phone),
        ],
        json!({}),
    );
    let signup_event = signup.event_id.clone();
    cdp.track(signup).await;
    let newcomer = customer_of(&cdp, id("loyalty_id", &format!("LC-N-{tag}")), 1).await;
    assert_ne!(
        newcomer, first_id,
        "the sign-up landed on the tablet's first user"
    );
    // Attribution and links agree: the event and both new identifiers are the newcomer's.
    assert_eq!(
        customer_of(&cdp, id("phone", &new_phone), 1).await,
        newcomer
    );
    let d = decision(&cdp, &signup_event).await;
    assert_eq!(d.customer_id, newcomer);
    let mut codes: Vec<&str> = d.ignored.iter().map(|i| i.code.as_str()).collect();
    codes.sort_unstable();
    assert_eq!(
        codes,
        vec!["merge_not_allowed", "merge_not_allowed"],
        "{d:#?}"
    );
    // Browsing on the tablet afterwards does not follow the sign-up.
    cdp.track(touchpoint(
        "Product Viewed",
        "app",
        "kiosk-app",
        vec![id("anonymous_id", &anon)],
        json!({"product_id": "SKU-1"}),
    ))
    .await;
    assert_eq!(
        customer_of(&cdp, id("email", &first_email), 2).await,
        first_id
    );
    assert_eq!(
        customer_of(&cdp, id("loyalty_id", &format!("LC-N-{tag}")), 1).await,
        newcomer
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_seen_with_too_many_people_is_quarantined_listed_and_stops_attributing() {
    let cdp = CdpProcess::start();
    let tag = unique("");
    let device = format!("shared-ipad-{tag}");
    let mut holders = Vec::new();
    for n in 0..4 {
        let email = format!("shopper{n}.{tag}@shop.vn");
        cdp.track(touchpoint(
            "Product Viewed",
            "app",
            "kiosk-app",
            vec![id("device_id", &device), id("email", &email)],
            json!({"product_id": "SKU-1"}),
        ))
        .await;
        holders.push(customer_of(&cdp, id("email", &email), 1).await);
    }
    let distinct: std::collections::BTreeSet<&String> = holders.iter().collect();
    assert_eq!(
        distinct.len(),
        4,
        "shoppers were joined through the shared device"
    );
    let mut identity = IdentityServiceClient::new(cdp.query_channel().await);
    let listed = identity
        .list_quarantined(ListQuarantinedRequest {})
        .await
        .unwrap()
        .into_inner();
    let q = listed
        .identifiers
        .iter()
        .find(|q| q.identifier.as_ref().is_some_and(|i| i.value == device))
        .unwrap_or_else(|| panic!("{device} not quarantined: {listed:#?}"));
    assert_eq!((q.people, q.limit), (4, 3));
    assert_eq!(q.status, "quarantined");
    assert_eq!(q.holder_customer_id, holders[0]);
    assert_eq!(q.sightings.len(), 3);
    let explained = identity
        .explain(ExplainRequest {
            identifiers: vec![id("device_id", &device.to_uppercase())],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(explained.identifiers[0].status, "quarantined");

    // Alone, the quarantined device no longer attributes: a dead letter says why.
    let alone = touchpoint(
        "Product Viewed",
        "app",
        "kiosk-app",
        vec![id("device_id", &device)],
        json!({"product_id": "SKU-2"}),
    );
    let alone_id = alone.event_id.clone();
    cdp.track(alone).await;
    let mut admin = DeadLetterServiceClient::new(cdp.channel().await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let letters = admin
            .list_dead_letters(ListDeadLettersRequest {
                page_size: 1000,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        if let Some(l) = letters.dead_letters.iter().find(|l| l.event_id == alone_id) {
            assert!(l.reason.contains("quarantined"), "{}", l.reason);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dead letter for {alone_id}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        customer_of(&cdp, id("email", &format!("shopper0.{tag}@shop.vn")), 1).await,
        holders[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recycled_number_goes_to_its_new_subscriber() {
    let cdp = CdpProcess::start();
    let tag = unique("");
    let digits = mobile();
    // A year and a half ago the number was someone else's.
    let mut old = touchpoint(
        "Order Completed",
        "store",
        "pos-q1",
        vec![
            id("phone", &format!("0{digits}")),
            id("email", &format!("old.{tag}@shop.vn")),
        ],
        json!({"order_id": format!("old-{tag}"), "total": 100_000, "currency": "VND"}),
    );
    at_days_ago(&mut old, 540);
    cdp.track(old).await;
    let former = customer_of(&cdp, id("email", &format!("old.{tag}@shop.vn")), 1).await;
    // The carrier gave it to a new subscriber, who signs up with it.
    let signup = touchpoint(
        "Identify",
        "web",
        "web-backend",
        vec![
            id("phone", &format!("+84{digits}")),
            id("email", &format!("new.{tag}@shop.vn")),
        ],
        json!({}),
    );
    let signup_id = signup.event_id.clone();
    cdp.track(signup).await;
    let newcomer = customer_of(&cdp, id("email", &format!("new.{tag}@shop.vn")), 1).await;
    assert_ne!(newcomer, former);
    // The number now leads to the new subscriber.
    assert_eq!(
        customer_of(&cdp, id("phone", &format!("0{digits}")), 1).await,
        newcomer
    );
    let d = decision(&cdp, &signup_id).await;
    assert_eq!(d.recycled.len(), 1, "{d:#?}");
    assert_eq!(d.recycled[0].former_customer_id, former);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_phone_is_dropped_with_its_reason_and_the_order_kept() {
    let cdp = CdpProcess::start();
    let tag = unique("");
    let email = format!("till.{tag}@shop.vn");
    let order = touchpoint(
        "Order Completed",
        "store",
        "pos-q1",
        vec![id("email", &email), id("phone", "09123")],
        json!({"order_id": format!("o-{tag}"), "total": 350_000, "currency": "VND"}),
    );
    let order_id = order.event_id.clone();
    let r = cdp.track(order).await;
    assert_eq!(r.warnings.len(), 1, "{r:?}");
    assert!(r.warnings[0].field.contains("phone"), "{r:?}");
    assert!(
        r.warnings[0].reason.contains("not a valid phone number"),
        "{r:?}"
    );
    let mut profiles = cdp.profiles().await;
    let p = profile_when(
        &mut profiles,
        id("email", &email),
        Duration::from_secs(30),
        |p| metrics(p).orders_count == 1,
    )
    .await;
    assert!(p.identifiers.iter().all(|i| i.kind != "phone"));
    let d = decision(&cdp, &order_id).await;
    assert_eq!(d.ignored.len(), 1, "{d:#?}");
    assert_eq!(d.ignored[0].code, "invalid");
    // An event left with no valid identifier is still refused, naming the field.
    let bad = cdp
        .ingest()
        .await
        .track(TrackRequest {
            touchpoint: Some(touchpoint(
                "Order Completed",
                "store",
                "pos-q1",
                vec![id("phone", "09123")],
                json!({"order_id": format!("o2-{tag}"), "total": 1, "currency": "VND"}),
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().contains("identifiers[0].value"),
        "{}",
        bad.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_values_in_the_configuration_match_every_form_of_them() {
    let tag = unique("");
    let tablet = format!("KIOSK-{tag}").to_uppercase();
    let config = format!(
        "{}\n[identity.kinds.device_id]\npriority = 8\nlimit = 10\nblocked = [\"{tablet}\"]\n\
         [identity.kinds.phone]\npriority = 4\nlimit = 2\nmerge = true\nblocked = [\"0900 000 000\"]\n",
        cdp_e2e::DEFAULT_CONFIG
    );
    let cdp = CdpProcess::start_with(&config);
    for (n, ids) in [
        vec![
            id("device_id", &tablet.to_lowercase()),
            id("email", &format!("a.{tag}@shop.vn")),
        ],
        vec![
            id("device_id", &tablet.to_lowercase()),
            id("email", &format!("b.{tag}@shop.vn")),
        ],
        vec![
            id("phone", "+84900000000"),
            id("email", &format!("c.{tag}@shop.vn")),
        ],
        vec![
            id("phone", "0900-000-000"),
            id("email", &format!("d.{tag}@shop.vn")),
        ],
    ]
    .into_iter()
    .enumerate()
    {
        cdp.track(touchpoint(
            "Product Viewed",
            "app",
            "kiosk-app",
            ids,
            json!({"product_id": n.to_string()}),
        ))
        .await;
    }
    let mut customers = std::collections::BTreeSet::new();
    for who in ["a", "b", "c", "d"] {
        customers.insert(customer_of(&cdp, id("email", &format!("{who}.{tag}@shop.vn")), 1).await);
    }
    assert_eq!(customers.len(), 4, "blocked values joined strangers");
    let mut identity = IdentityServiceClient::new(cdp.query_channel().await);
    let r = identity
        .explain(ExplainRequest {
            identifiers: vec![id("device_id", &tablet), id("phone", "0900 000 000")],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.identifiers
            .iter()
            .all(|i| i.status == "blocked" && !i.linked),
        "{r:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_website_cannot_attach_anything_to_a_customer_found_by_a_typed_email() {
    let cdp = CdpProcess::start();
    let tag = unique("");
    let victim_email = format!("victim.{tag}@shop.vn");
    cdp.track(touchpoint(
        "Order Completed",
        "store",
        "pos-q1",
        vec![
            id("email", &victim_email),
            id("phone", &format!("0{}", mobile())),
        ],
        json!({"order_id": format!("v-{tag}"), "total": 100_000, "currency": "VND"}),
    ))
    .await;
    let victim = customer_of(&cdp, id("email", &victim_email), 1).await;
    // Someone types the victim's email into the website's form, with their own phone.
    let intruder_phone = format!("0{}", mobile());
    let form = touchpoint(
        "Identify",
        "web",
        "website",
        vec![
            id("anonymous_id", &format!("anon-{tag}")),
            id("email", &victim_email),
            id("phone", &intruder_phone),
        ],
        json!({}),
    );
    let form_id = form.event_id.clone();
    cdp.track(form).await;
    let d = loop {
        let d = decision(&cdp, &form_id).await;
        if d.resolved {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(d.customer_id, victim);
    assert!(d.linked.is_empty() && d.merges.is_empty(), "{d:#?}");
    assert!(
        d.ignored.iter().all(|i| i.code == "untrusted_source"),
        "{d:#?}"
    );
    let mut identity = IdentityServiceClient::new(cdp.query_channel().await);
    let r = identity
        .explain(ExplainRequest {
            identifiers: vec![
                id("phone", &intruder_phone),
                id("anonymous_id", &format!("anon-{tag}")),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.identifiers.iter().all(|i| !i.linked), "{r:#?}");
}
