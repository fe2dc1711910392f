//! Identity explanations against a running `cdp dev`: why two identifiers
//! are one customer, with the real cause of each merge.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cdp_e2e::{CdpProcess, id, metrics, mobile, profile_when, touchpoint, unique};
use cdp_proto::v1::identity_service_client::IdentityServiceClient;
use cdp_proto::v1::{ExplainRequest, ListMergesRequest, TrackRequest, list_merges_request};
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
