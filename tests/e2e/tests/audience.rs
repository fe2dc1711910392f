//! Audiences end to end, on the back end of `CDP_E2E_BACKEND`: an analyst
//! defines computed traits and segments over gRPC, events come in through
//! ingest, and the customer's memberships show in `GetProfile` and in the
//! change records (`ListChanges`): through a store purchase, through a merge
//! of two half-qualifying customers (one `Entered`), when a 7-day window
//! lets a purchase go (no event needed), through the backfill of a trait
//! defined after the purchases, and after a restart and a rebuild (no
//! `Entered` twice).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cdp_e2e::{
    ADMIN_KEY, AGENT_KEY, ANALYST_KEY, CdpProcess, id, mobile, now_ms, profile_when, touchpoint,
    unique,
};
use cdp_proto::v1::audience_service_client::AudienceServiceClient;
use cdp_proto::v1::{self, CustomerProfile};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

const PATIENCE: Duration = Duration::from_secs(30);

async fn audiences(
    cdp: &CdpProcess,
    key: &str,
) -> AudienceServiceClient<cdp_proto::client::Authed> {
    AudienceServiceClient::new(CdpProcess::connect_as(cdp.query_addr(), Some(key)).await)
}

fn orders_7d() -> v1::ComputedTrait {
    v1::ComputedTrait {
        name: "orders_7d".into(),
        aggregate: "count".into(),
        filter: Some(v1::EventFilter {
            types: vec!["Order Completed".into()],
            ..Default::default()
        }),
        window: "7d".into(),
        ..Default::default()
    }
}

fn segment(name: &str, condition: &str) -> v1::Segment {
    v1::Segment {
        name: name.into(),
        condition: condition.into(),
        ..Default::default()
    }
}

fn segments(p: &CustomerProfile) -> Vec<&str> {
    p.segments.iter().map(|s| s.segment.as_str()).collect()
}

/// Every membership change of the active generation, for `customer`
/// (empty: everyone's), paged to the end.
async fn changes(cdp: &CdpProcess, customer: &str) -> Vec<v1::MembershipChange> {
    let mut client = audiences(cdp, ANALYST_KEY).await;
    let mut all = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = client
            .list_changes(v1::ListChangesRequest {
                customer_id: customer.into(),
                cursor: cursor.clone(),
                limit: 50,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.changes);
        if page.at_end {
            return all;
        }
        cursor = page.next_cursor;
    }
}

/// `(segment, kind, cause)` of each change, sorted.
fn summary(changes: &[v1::MembershipChange]) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = changes
        .iter()
        .map(|c| (c.segment.clone(), c.kind.clone(), c.cause.clone()))
        .collect();
    v.sort();
    v
}

fn field_of(status: &tonic::Status) -> String {
    let details = status.get_error_details();
    let bad = details.bad_request().expect("a BadRequest detail");
    bad.field_violations[0].field.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_are_defined_checked_and_entered_through_events_and_merges() {
    let mut cdp = CdpProcess::start();
    let mut analyst = audiences(&cdp, ANALYST_KEY).await;

    // Definitions, with precise refusals.
    let saved = analyst
        .save_computed_trait(v1::SaveComputedTraitRequest {
            definition: Some(orders_7d()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((saved.name.as_str(), saved.version), ("orders_7d", 1));
    let bad_window = analyst
        .save_computed_trait(v1::SaveComputedTraitRequest {
            definition: Some(v1::ComputedTrait {
                window: "7 days".into(),
                ..orders_7d()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_window.code(), Code::InvalidArgument);
    assert_eq!(field_of(&bad_window), "definition.window");
    let text_threshold = analyst
        .save_computed_trait(v1::SaveComputedTraitRequest {
            definition: Some(v1::ComputedTrait {
                filter: Some(v1::EventFilter {
                    conditions: vec![v1::PropertyCondition {
                        property: "total".into(),
                        op: "gt".into(),
                        value_json: "\"lots\"".into(),
                    }],
                    ..Default::default()
                }),
                ..orders_7d()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(
        field_of(&text_threshold),
        "definition.filter.conditions[0].value_json"
    );
    let personal = analyst
        .save_computed_trait(v1::SaveComputedTraitRequest {
            definition: Some(v1::ComputedTrait {
                aggregate: "last".into(),
                property: "shipping_address".into(),
                ..orders_7d()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&personal), "definition.property");
    let unknown_trait = analyst
        .save_segment(v1::SaveSegmentRequest {
            definition: Some(segment(
                "vip",
                "traits.orders_7d >= 1 &&\n traits.spend_90d > 0",
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown_trait.code(), Code::InvalidArgument);
    assert_eq!(field_of(&unknown_trait), "definition.condition");
    assert!(
        unknown_trait.message().contains("line 2, column 2")
            && unknown_trait.message().contains("spend_90d"),
        "{unknown_trait:?}"
    );
    let draft = analyst
        .validate_segment(v1::ValidateSegmentRequest {
            definition: Some(segment("draft", "traits.orders_7d >= ")),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!draft.valid);
    assert!(draft.reason.starts_with("line 1, column"), "{draft:?}");
    let condition = "traits.orders_7d >= 1 && \"store\" in profile.channels";
    for name in ["store_buyers", "omni"] {
        analyst
            .save_segment(v1::SaveSegmentRequest {
                definition: Some(segment(name, condition)),
            })
            .await
            .unwrap();
    }
    let denied = audiences(&cdp, AGENT_KEY)
        .await
        .save_segment(v1::SaveSegmentRequest {
            definition: Some(segment("agents_pick", "true")),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let in_use = analyst
        .delete_definition(v1::DeleteDefinitionRequest {
            kind: "trait".into(),
            name: "orders_7d".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(in_use.code(), Code::FailedPrecondition, "{in_use:?}");
    let listed = audiences(&cdp, ADMIN_KEY)
        .await
        .list_definitions(v1::ListDefinitionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.traits.len(), 1);
    assert_eq!(listed.traits[0].window, "7d");
    let mut names: Vec<_> = listed.segments.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["omni", "store_buyers"]);
    // The profile service reads the definitions again every so often (one
    // process per service on the distributed back end): the events below
    // are to be folded under these, so wait until its backfill of them is
    // done, as a marketer would before expecting entries by events.
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let b = analyst
            .get_backfill(v1::GetBackfillRequest::default())
            .await
            .unwrap()
            .into_inner();
        let listed: Vec<&str> = b.definitions.split(',').collect();
        let known = ["segment/omni@1", "segment/store_buyers@1"]
            .iter()
            .all(|d| listed.contains(d));
        if known && b.state == "done" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the definitions saved were not backfilled in time: {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A store purchase of almost a week ago: its customer enters now, and
    // leaves when the 7-day window lets the purchase go, with no event.
    const WEEK: i64 = 7 * 86_400_000;
    let aged = format!("0{}", mobile());
    let mut aged_order = touchpoint(
        "Order Completed",
        "store",
        "pos-q1",
        vec![id("phone", &aged)],
        json!({"order_id": unique("POS-"), "total": 150000, "currency": "VND"}),
    );
    // The window ends 25 s from now.
    let bought_at = now_ms() - WEEK + 25_000;
    aged_order.occurred_at = Some(cdp_proto::convert::millis_to_timestamp(bought_at));
    cdp.track(aged_order).await;

    // A customer enters through a store purchase.
    let phone = format!("0{}", mobile());
    cdp.track(touchpoint(
        "Product Viewed",
        "web",
        "website",
        vec![id("phone", &phone)],
        json!({"product_id": "SKU-1"}),
    ))
    .await;
    cdp.track(touchpoint(
        "Order Completed",
        "store",
        "pos-q1",
        vec![id("phone", &phone)],
        json!({"order_id": unique("POS-"), "total": 450000, "currency": "VND"}),
    ))
    .await;
    let mut profiles = cdp.profiles().await;
    let p = profile_when(&mut profiles, id("phone", &phone), PATIENCE, |p| {
        segments(p).contains(&"store_buyers")
    })
    .await;
    assert_eq!(segments(&p), ["omni", "store_buyers"]);
    assert_eq!(p.segments[0].version, 1);
    let entered = |segment: &str| (segment.to_owned(), "entered".to_owned(), "event".to_owned());
    assert_eq!(
        summary(&changes(&cdp, &p.customer_id).await),
        [entered("omni"), entered("store_buyers")]
    );

    // Two half-qualifying customers: one ordered on the web, the other
    // visited a store; merged, they make one member.
    let email = format!("{}@gmail.com", unique("mai.tran"));
    let other_phone = format!("0{}", mobile());
    cdp.track(touchpoint(
        "Order Completed",
        "web",
        "website",
        vec![id("email", &email)],
        json!({"order_id": unique("WEB-"), "total": 200000, "currency": "VND"}),
    ))
    .await;
    cdp.track(touchpoint(
        "Page Viewed",
        "store",
        "pos-q1",
        vec![id("phone", &other_phone)],
        json!({}),
    ))
    .await;
    let web = profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        p.metrics.as_ref().is_some_and(|m| m.orders_count == 1)
    })
    .await;
    assert!(segments(&web).is_empty(), "{:?}", web.segments);
    let store = profile_when(&mut profiles, id("phone", &other_phone), PATIENCE, |_| true).await;
    assert!(segments(&store).is_empty());
    cdp.track(touchpoint(
        "Identify",
        "call_center",
        "hotline",
        vec![id("email", &email), id("phone", &other_phone)],
        json!({}),
    ))
    .await;
    let merged = profile_when(&mut profiles, id("phone", &other_phone), PATIENCE, |p| {
        segments(p).contains(&"omni")
    })
    .await;
    assert_eq!(segments(&merged), ["omni", "store_buyers"]);
    // One `Entered` per segment, caused by the merge; the absorbed
    // customer, a member of nothing, exits nothing.
    let merge = |segment: &str| (segment.to_owned(), "entered".to_owned(), "merge".to_owned());
    let survivor = changes(&cdp, &merged.customer_id).await;
    assert_eq!(summary(&survivor), [merge("omni"), merge("store_buyers")]);
    let absorbed = &survivor[0].cause_customer_id;
    assert!([&web.customer_id, &store.customer_id].contains(&absorbed));
    assert!(changes(&cdp, absorbed).await.is_empty());

    // The aged purchase: in, then out when its window ended.
    let aged_profile = profile_when(&mut profiles, id("phone", &aged), PATIENCE, |p| {
        p.metrics.as_ref().is_some_and(|m| m.orders_count == 1)
    })
    .await;
    let gone = profile_when(&mut profiles, id("phone", &aged), PATIENCE, |p| {
        p.segments.is_empty() && now_ms() >= bought_at + WEEK
    })
    .await;
    assert_eq!(gone.customer_id, aged_profile.customer_id);
    // The exits are appended right after the view shows them.
    let deadline = std::time::Instant::now() + PATIENCE;
    let aged_changes = loop {
        let found = changes(&cdp, &gone.customer_id).await;
        if found.len() >= 4 || std::time::Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let expired = |segment: &str| (segment.to_owned(), "exited".to_owned(), "expiry".to_owned());
    let mut want = vec![
        entered("omni"),
        entered("store_buyers"),
        expired("omni"),
        expired("store_buyers"),
    ];
    want.sort();
    assert_eq!(summary(&aged_changes), want);
    for exit in aged_changes.iter().filter(|c| c.kind == "exited") {
        let at = cdp_proto::convert::timestamp_to_millis(exit.at.as_ref().unwrap());
        assert!(
            at >= bought_at + WEEK,
            "exited at {at}, before the window ended"
        );
    }
    // Membership as of an instant: in, while the purchase was in the
    // window; out now.
    let entered_at = aged_changes
        .iter()
        .filter(|c| c.kind == "entered")
        .filter_map(|c| c.at)
        .max_by_key(cdp_proto::convert::timestamp_to_millis);
    let mut agent = audiences(&cdp, AGENT_KEY).await;
    let memberships = |as_of| v1::GetMembershipsRequest {
        lookup: Some(v1::get_memberships_request::Lookup::CustomerId(
            gone.customer_id.clone(),
        )),
        as_of,
    };
    let then = agent
        .get_memberships(memberships(entered_at))
        .await
        .unwrap()
        .into_inner();
    let segments_then: Vec<&str> = then
        .memberships
        .iter()
        .map(|m| m.segment.as_str())
        .collect();
    assert_eq!(segments_then, ["omni", "store_buyers"]);
    let now = agent
        .get_memberships(memberships(None))
        .await
        .unwrap()
        .into_inner();
    assert!(now.memberships.is_empty(), "{now:?}");

    // A computed trait defined now, over every order ever: the customers
    // who bought before it enter through the backfill, with no event of
    // theirs, and nobody enters twice.
    analyst
        .save_computed_trait(v1::SaveComputedTraitRequest {
            definition: Some(v1::ComputedTrait {
                name: "orders_ever".into(),
                window: "all".into(),
                ..orders_7d()
            }),
        })
        .await
        .unwrap();
    analyst
        .save_segment(v1::SaveSegmentRequest {
            definition: Some(segment("ever_bought", "traits.orders_ever >= 1")),
        })
        .await
        .unwrap();
    let backfilled = profile_when(&mut profiles, id("phone", &phone), PATIENCE, |p| {
        segments(p).contains(&"ever_bought")
    })
    .await;
    assert_eq!(
        segments(&backfilled),
        ["ever_bought", "omni", "store_buyers"]
    );
    profile_when(&mut profiles, id("phone", &aged), PATIENCE, |p| {
        segments(p) == ["ever_bought"]
    })
    .await;
    profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        segments(p) == ["ever_bought", "omni", "store_buyers"]
    })
    .await;
    let deadline = std::time::Instant::now() + PATIENCE;
    let progress = loop {
        let b = analyst
            .get_backfill(v1::GetBackfillRequest::default())
            .await
            .unwrap()
            .into_inner();
        if b.state == "done" || std::time::Instant::now() > deadline {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(progress.state, "done", "{progress:?}");
    assert!(
        progress.definitions.contains("trait/orders_ever@1"),
        "{progress:?}"
    );
    assert!(progress.scanned >= 4, "{progress:?}");
    assert!(progress.changes >= 3, "{progress:?}");
    assert!(progress.finished_at.is_some());
    let by_definition = |segment: &str| {
        (
            segment.to_owned(),
            "entered".to_owned(),
            "definition".to_owned(),
        )
    };
    let mut want = vec![
        entered("omni"),
        entered("store_buyers"),
        by_definition("ever_bought"),
    ];
    want.sort();
    assert_eq!(summary(&changes(&cdp, &backfilled.customer_id).await), want);

    // A draft previewed against the stored profiles, not saved.
    let preview = analyst
        .preview_segment(v1::PreviewSegmentRequest {
            definition: Some(segment(
                "two_orders",
                "traits.orders_ever >= 1 && profile.orders_count >= 1",
            )),
            sample: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(preview.complete, "{preview:?}");
    assert_eq!(
        (preview.matched, preview.undetermined),
        (3, 0),
        "{preview:?}"
    );
    assert!(preview.examples.contains(&backfilled.customer_id));
    assert_eq!(preview.evaluated, 3, "live profiles only: {preview:?}");
    let bad_draft = analyst
        .preview_segment(v1::PreviewSegmentRequest {
            definition: Some(segment("bad", "traits.nope > 1")),
            sample: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&bad_draft), "definition.condition");

    // The computed traits show in GetProfile.
    let values: Vec<(&str, &str, bool)> = backfilled
        .computed_traits
        .iter()
        .map(|t| (t.name.as_str(), t.value_json.as_str(), t.complete))
        .collect();
    assert_eq!(
        values,
        [("orders_7d", "1", true), ("orders_ever", "1", true)]
    );

    // The members of a segment, page by page.
    let mut members = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = analyst
            .list_members(v1::ListMembersRequest {
                segment: "store_buyers".into(),
                cursor: cursor.clone(),
                limit: 1,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.members.len() <= 1);
        members.extend(page.members.into_iter().map(|m| m.customer_id));
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    members.sort();
    let mut want = vec![backfilled.customer_id.clone(), merged.customer_id.clone()];
    want.sort();
    assert_eq!(members, want);
    let unknown = analyst
        .list_members(v1::ListMembersRequest {
            segment: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // Why is this customer a store buyer? An agent asks.
    let why = audiences(&cdp, AGENT_KEY)
        .await
        .explain_membership(v1::ExplainMembershipRequest {
            lookup: Some(v1::explain_membership_request::Lookup::Identifier(id(
                "phone", &phone,
            ))),
            segment: "store_buyers".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(why.member, "{why:?}");
    assert_eq!(why.evaluation, "true");
    assert!(!why.waiting_for_backfill);
    assert_eq!(why.condition, condition);
    assert_eq!(why.traits.len(), 1, "{why:?}");
    assert_eq!(
        (
            why.traits[0].name.as_str(),
            why.traits[0].value_json.as_str()
        ),
        ("orders_7d", "1")
    );
    let evidence = &why.traits[0].events;
    assert_eq!(evidence.len(), 1, "{evidence:?}");
    assert_eq!(
        (evidence[0].r#type.as_str(), evidence[0].channel.as_str()),
        ("Order Completed", "store")
    );

    // Memberships are kept with the profile, and the definitions in the
    // log: after a restart both are there, and new events are evaluated.
    cdp.restart();
    let mut profiles = cdp.profiles().await;
    let again = profile_when(&mut profiles, id("phone", &phone), PATIENCE, |_| true).await;
    assert_eq!(segments(&again), ["ever_bought", "omni", "store_buyers"]);
    let late = format!("0{}", mobile());
    cdp.track(touchpoint(
        "Order Completed",
        "store",
        "pos-q1",
        vec![id("phone", &late)],
        json!({"order_id": unique("POS-"), "total": 99000, "currency": "VND"}),
    ))
    .await;
    profile_when(&mut profiles, id("phone", &late), PATIENCE, |p| {
        segments(p) == ["ever_bought", "omni", "store_buyers"]
    })
    .await;
    // Across the restart no change was recorded twice: for every customer
    // and segment, entries and exits alternate, starting with an entry.
    let before_rebuild = changes(&cdp, "").await;
    let mut member: std::collections::BTreeMap<(String, String), bool> = Default::default();
    for c in &before_rebuild {
        let entered = c.kind == "entered";
        let was = member
            .insert((c.customer_id.clone(), c.segment.clone()), entered)
            .unwrap_or(false);
        assert_eq!(was, !entered, "{c:?} twice in {before_rebuild:?}");
    }

    // A rebuild folds the definitions too: the new generation has the
    // same memberships.
    let generation = cdp.rebuild_until(true).await;
    assert!(generation > 1);
    let mut profiles = cdp.profiles().await;
    for (kind, value) in [
        ("phone", &phone),
        ("phone", &other_phone),
        ("email", &email),
        ("phone", &late),
    ] {
        let p = profile_when(&mut profiles, id(kind, value), PATIENCE, |p| {
            !p.segments.is_empty()
        })
        .await;
        assert_eq!(
            segments(&p),
            ["ever_bought", "omni", "store_buyers"],
            "{kind} {value}"
        );
    }
    let p = profile_when(&mut profiles, id("phone", &aged), PATIENCE, |_| true).await;
    assert_eq!(segments(&p), ["ever_bought"]);
    // The new generation's records: one `Entered` per member and segment,
    // none twice; the aged purchase, folded after its window, enters
    // `ever_bought` only.
    let all = changes(&cdp, "").await;
    assert!(all.iter().all(|c| c.generation == generation));
    let mut entries: Vec<(&str, &str)> = all
        .iter()
        .filter(|c| c.kind == "entered")
        .map(|c| (c.customer_id.as_str(), c.segment.as_str()))
        .collect();
    assert_eq!(entries.len(), 10, "{all:?}");
    entries.sort_unstable();
    entries.dedup();
    assert_eq!(entries.len(), 10, "an Entered twice: {all:?}");
}
