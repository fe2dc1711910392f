//! Personal data protection against a running platform, on both back ends:
//! consent recorded as events (gRPC, the Segment `context.consent` shape,
//! `PrivacyService/RecordConsent`), folded by event time, decided at the
//! moment data leaves (a send, a replay), refusals audited; and the right
//! of access (`PrivacyService/Export`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cdp_e2e::{CdpProcess, id, profile_when, touchpoint, unique};
use cdp_proto::convert;
use cdp_proto::v1::access_service_client::AccessServiceClient;
use cdp_proto::v1::privacy_service_client::PrivacyServiceClient;
use cdp_proto::v1::replay_service_client::ReplayServiceClient;
use cdp_proto::v1::{
    self, CheckConsentRequest, ConsentGrant, ExportRequest, GetConsentRequest, Identifier,
    RecordConsentRequest, ReplayRequest, check_consent_request, export_request,
    get_consent_request, record_consent_request,
};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(30);

async fn privacy(cdp: &CdpProcess, key: &str) -> PrivacyServiceClient<cdp_e2e::Authed> {
    PrivacyServiceClient::new(CdpProcess::connect_as(cdp.query_addr(), Some(key)).await)
}

fn consents_of(p: &v1::CustomerProfile) -> &[v1::ConsentRecord] {
    &p.consents
}

fn find<'a>(
    p: &'a v1::CustomerProfile,
    purpose: &str,
    channel: &str,
) -> Option<&'a v1::ConsentRecord> {
    consents_of(p)
        .iter()
        .find(|c| c.purpose == purpose && c.channel == channel)
}

async fn check(
    client: &mut PrivacyServiceClient<cdp_e2e::Authed>,
    who: &Identifier,
    purpose: &str,
    channel: &str,
    action: &str,
) -> v1::CheckConsentResponse {
    client
        .check_consent(CheckConsentRequest {
            lookup: Some(check_consent_request::Lookup::Identifier(who.clone())),
            purpose: purpose.into(),
            channel: channel.into(),
            action: action.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn at(ms: i64) -> Option<prost_types::Timestamp> {
    Some(convert::millis_to_timestamp(ms))
}

/// A `RecordConsent` of one grant for `who`.
fn one_grant(
    who: &Identifier,
    purpose: &str,
    channel: &str,
    granted: bool,
) -> RecordConsentRequest {
    RecordConsentRequest {
        lookup: Some(record_consent_request::Lookup::Identifier(who.clone())),
        grants: vec![ConsentGrant {
            purpose: purpose.into(),
            channel: channel.into(),
            granted,
        }],
        ..Default::default()
    }
}

/// The audit records about a customer, as the test admin reads them.
async fn audit_of(cdp: &CdpProcess, customer_id: &str) -> Vec<v1::AuditEntry> {
    let mut audit = AccessServiceClient::new(cdp.query_channel().await);
    audit
        .list_audit(v1::ListAuditRequest {
            customer_id: customer_id.to_owned(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

/// The field names of an `INVALID_ARGUMENT`.
fn fields_of(s: &tonic::Status) -> String {
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    s.message().to_owned()
}

/// Consent arrives as events on every surface, the latest statement by
/// event time wins, silence is not consent, and a withdrawal stops a send
/// that was planned before it (the check runs at send time and its refusal
/// is in the audit log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_is_kept_per_purpose_and_channel_and_checked_when_data_leaves() {
    let cdp = CdpProcess::start();
    let user = unique("u-consent-");
    let email = format!("{user}@example.vn");
    let who = id("user_id", &user);
    let now = cdp_e2e::now_ms();
    // A customer known by user id and email, who never said anything.
    let mut first = touchpoint(
        "Order Completed",
        "web",
        "web",
        vec![who.clone(), id("email", &email)],
        json!({"order_id": unique("o-"), "total": 250000, "currency": "VND"}),
    );
    first.occurred_at = at(now - 60_000);
    cdp.track(first).await;
    let mut profiles = cdp.profiles().await;
    profile_when(&mut profiles, who.clone(), PATIENCE, |p| {
        cdp_e2e::metrics(p).orders_count == 1
    })
    .await;
    let mut dpo = privacy(&cdp, cdp_e2e::PRIVACY_KEY).await;
    let silent = dpo
        .get_consent(GetConsentRequest {
            lookup: Some(get_consent_request::Lookup::Identifier(who.clone())),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(silent.records.is_empty());
    let decision = |r: &v1::GetConsentResponse, purpose: &str, channel: &str| {
        r.decisions
            .iter()
            .find(|d| d.purpose == purpose && d.channel == channel)
            .cloned()
            .unwrap()
    };
    let m = decision(&silent, "marketing", "email");
    assert!(!m.allowed && m.basis == "absent", "{m:?}");
    let s = decision(&silent, "service", "sms");
    assert!(s.allowed && s.basis == "service_default", "{s:?}");

    // The website's consent manager (Segment's shape) grants advertising,
    // refuses analytics.
    let http = reqwest::Client::new();
    let granted_at = now - 30_000;
    let message_id = uuid::Uuid::new_v4().to_string();
    let resp = http
        .post(format!("{}/v1/track", cdp.http_url()))
        .basic_auth(cdp_e2e::WEB_KEY, Some(""))
        .json(&json!({
            "userId": user, "event": "Segment Consent Preference Updated", "messageId": message_id,
            "timestamp": chrono_iso(granted_at),
            "context": {"consent": {"categoryPreferences": {"Advertising": true, "Analytics": false}}}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.text().await);
    // A mistyped preference is refused, naming the field as sent.
    let resp = http
        .post(format!("{}/v1/track", cdp.http_url()))
        .basic_auth(cdp_e2e::WEB_KEY, Some(""))
        .json(&json!({
            "userId": user, "event": "X",
            "context": {"consent": {"categoryPreferences": {"Advertising": "perhaps"}}}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body.to_string()
            .contains("context.consent.categoryPreferences.Advertising"),
        "{body}"
    );
    let p = profile_when(&mut profiles, who.clone(), PATIENCE, |p| {
        find(p, "marketing", "").is_some()
    })
    .await;
    let marketing = find(&p, "marketing", "").unwrap();
    assert!(marketing.granted);
    assert_eq!(marketing.via, "web");
    assert!(!find(&p, "analytics", "").unwrap().granted);

    // At the hotline: no SMS marketing, notice v2, with the evidence.
    let recorded = dpo
        .record_consent(RecordConsentRequest {
            notice_version: "2026-v2".into(),
            evidence: "call 8812, recorded".into(),
            occurred_at: at(now - 20_000),
            channel: "call_center".into(),
            ..one_grant(&who, "marketing", "sms", false)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(recorded.appended);
    let p = profile_when(&mut profiles, who.clone(), PATIENCE, |p| {
        find(p, "marketing", "sms").is_some()
    })
    .await;
    let sms = find(&p, "marketing", "sms").unwrap();
    assert!(!sms.granted);
    assert_eq!(sms.notice_version, "2026-v2");
    assert_eq!(sms.event_id, recorded.event_id, "the evidence is the event");
    assert_eq!(sms.via, "call_center");
    assert_eq!(p.customer_id, recorded.customer_id);

    // An older statement arriving late does not override a newer one.
    let mut late = touchpoint(
        "Consent Updated",
        "store",
        "pos",
        vec![who.clone()],
        json!({"purpose": "marketing", "granted": false}),
    );
    late.occurred_at = at(now - 50_000);
    let late_id = late.event_id.clone();
    cdp.track(late).await;
    let p = profile_when(&mut profiles, who.clone(), PATIENCE, |p| {
        p.recent_timeline.iter().any(|e| e.event_id == late_id)
    })
    .await;
    assert!(
        find(&p, "marketing", "").unwrap().granted,
        "a statement older than the grant must not withdraw it"
    );

    // A reminder planned now may go by email, not by SMS.
    let planned = check(
        &mut dpo,
        &who,
        "marketing",
        "email",
        "abandoned-cart reminder",
    )
    .await;
    assert!(planned.allowed, "{planned:?}");
    assert_eq!(planned.basis, "granted");
    let sms = check(
        &mut dpo,
        &who,
        "marketing",
        "sms",
        "abandoned-cart reminder",
    )
    .await;
    assert!(!sms.allowed && sms.basis == "withdrawn", "{sms:?}");

    // The customer withdraws marketing altogether before the send.
    dpo.record_consent(RecordConsentRequest {
        lookup: Some(record_consent_request::Lookup::CustomerId(
            p.customer_id.clone(),
        )),
        grants: vec![ConsentGrant {
            purpose: "Marketing".into(),
            channel: String::new(),
            granted: false,
        }],
        evidence: "unsubscribe link".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // At send time the check refuses it.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let refused = loop {
        let r = check(
            &mut dpo,
            &who,
            "marketing",
            "email",
            "abandoned-cart reminder",
        )
        .await;
        if !r.allowed {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still allowed: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(refused.basis, "withdrawn");
    assert!(refused.reason.contains("withdrawn"), "{refused:?}");
    let entries = audit_of(&cdp, &p.customer_id).await;
    assert!(
        entries.iter().any(|e| e.outcome == "refused"
            && e.reason.contains("abandoned-cart reminder")
            && e.fields.iter().any(|f| f == "consent:marketing:email")),
        "the refusal is audited: {entries:#?}"
    );

    // Bad input names its field; nothing is recorded.
    let bad = dpo
        .record_consent(one_grant(&who, "mark<eting", "pigeon", true))
        .await
        .unwrap_err();
    let f = fields_of(&bad);
    assert!(
        f.contains("grants[0].purpose") && f.contains("grants[0].channel"),
        "{f}"
    );
    let empty = dpo
        .record_consent(RecordConsentRequest {
            lookup: Some(record_consent_request::Lookup::Identifier(who.clone())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(fields_of(&empty).contains("grants"));
    let bad = dpo
        .check_consent(CheckConsentRequest {
            lookup: Some(check_consent_request::Lookup::Identifier(who.clone())),
            purpose: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(fields_of(&bad).contains("purpose"));
    let unknown = dpo
        .get_consent(GetConsentRequest {
            lookup: Some(get_consent_request::Lookup::Identifier(id(
                "email",
                &format!("{}@example.vn", unique("nobody-")),
            ))),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // Who may do what: agents take consent, only the privacy officer (and
    // admins) export; analysts do neither.
    let mut agent = privacy(&cdp, cdp_e2e::AGENT_KEY).await;
    agent
        .record_consent(one_grant(&who, "service", "zalo", true))
        .await
        .unwrap();
    let denied = agent
        .export(ExportRequest {
            lookup: Some(export_request::Lookup::Identifier(who.clone())),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let mut analyst = privacy(&cdp, cdp_e2e::ANALYST_KEY).await;
    let denied = analyst
        .check_consent(CheckConsentRequest {
            lookup: Some(check_consent_request::Lookup::Identifier(who.clone())),
            purpose: "marketing".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
}

fn chrono_iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Every replay names its purpose; customers who did not consent to it are
/// replayed without their personal part and without a customer id, the
/// others in full, and the number refused is in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_withholds_the_personal_data_of_customers_without_consent() {
    let cdp = CdpProcess::start();
    let yes = format!("{}@example.vn", unique("yes-"));
    let no = format!("{}@example.vn", unique("no-"));
    let mut consent = touchpoint(
        "Consent Updated",
        "web",
        "web",
        vec![id("email", &yes)],
        json!({"purpose": "analytics", "granted": true}),
    );
    consent.occurred_at = at(cdp_e2e::now_ms() - 10_000);
    cdp.track(consent).await;
    let mut orders = Vec::new();
    for email in [&yes, &no] {
        let t = touchpoint(
            "Order Completed",
            "web",
            "web",
            vec![id("email", email)],
            json!({"order_id": unique("o-"), "total": 100000, "currency": "VND",
                   "shipping_address": format!("12 Lê Lợi, {email}")}),
        );
        orders.push(t.event_id.clone());
        cdp.track(t).await;
    }
    let mut profiles = cdp.profiles().await;
    for email in [&yes, &no] {
        profile_when(&mut profiles, id("email", email), PATIENCE, |p| {
            cdp_e2e::metrics(p).orders_count == 1
        })
        .await;
    }
    let mut replay = ReplayServiceClient::new(cdp.projection_channel().await);
    let missing = replay
        .replay(ReplayRequest::default())
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(fields_of(&missing).contains("purpose"), "{missing:?}");

    let mut stream = replay
        .replay(ReplayRequest {
            purpose: "analytics".into(),
            with_customers: true,
            types: vec!["Order Completed".into()],
            ..ReplayRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = std::collections::HashMap::new();
    while let Some(e) = stream.message().await.unwrap() {
        let t = e.touchpoint.clone().unwrap();
        seen.insert(t.event_id.clone(), e);
    }
    let allowed = &seen[&orders[0]];
    assert!(!allowed.withheld);
    assert!(!allowed.customer_id.is_empty());
    let ids = &allowed
        .touchpoint
        .as_ref()
        .unwrap()
        .personal
        .as_ref()
        .unwrap()
        .identifiers;
    assert_eq!(ids[0].value, yes);
    let refused = &seen[&orders[1]];
    assert!(refused.withheld);
    assert!(refused.customer_id.is_empty());
    let t = refused.touchpoint.as_ref().unwrap();
    let text = format!("{t:?}");
    assert!(!text.contains(&no), "no trace of the customer: {text}");
    // What is not personal still adds up.
    let props = convert::struct_to_json(t.properties.as_ref().unwrap());
    assert_eq!(props["total"], json!(100000));
    assert!(props.get("shipping_address").is_none());

    let mut audit = AccessServiceClient::new(cdp.query_channel().await);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let entries = audit
            .list_audit(v1::ListAuditRequest {
                actor: "test-admin".into(),
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        if entries
            .iter()
            .any(|e| e.outcome == "refused" && e.fields.iter().any(|f| f == "replay:analytics"))
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{entries:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The right of access: one JSON document with everything the platform
/// holds about the customer, in clear, including who looked at them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_returns_everything_held_about_a_customer_and_who_read_it() {
    let cdp = CdpProcess::start();
    let email = format!("{}@example.vn", unique("export-"));
    let phone = cdp_e2e::mobile();
    let mut identify = touchpoint(
        "Identify",
        "store",
        "pos",
        vec![id("email", &email), id("phone", &phone)],
        json!({}),
    );
    identify.personal.as_mut().unwrap().traits =
        cdp_e2e::to_struct(json!({"name": "Trần Thị Mai"}));
    cdp.track(identify).await;
    cdp.track(touchpoint(
        "Order Completed",
        "store",
        "pos",
        vec![id("email", &email)],
        json!({"order_id": unique("o-"), "total": 1250000, "currency": "VND"}),
    ))
    .await;
    cdp.track(touchpoint(
        "Consent Updated",
        "store",
        "pos",
        vec![id("email", &email)],
        json!({"purpose": "marketing", "channel": "zalo", "granted": true, "notice_version": "v1"}),
    ))
    .await;
    let mut profiles = cdp.profiles().await;
    let p = profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        cdp_e2e::metrics(p).events_count == 3
    })
    .await;
    // An agent looks the customer up.
    let mut agent = cdp_proto::v1::profile_service_client::ProfileServiceClient::new(
        CdpProcess::connect_as(cdp.query_addr(), Some(cdp_e2e::AGENT_KEY)).await,
    );
    agent
        .get_profile(v1::GetProfileRequest {
            lookup: Some(v1::get_profile_request::Lookup::Identifier(id(
                "email", &email,
            ))),
            ..Default::default()
        })
        .await
        .unwrap();

    let mut dpo = privacy(&cdp, cdp_e2e::PRIVACY_KEY).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let doc = loop {
        let export = dpo
            .export(ExportRequest {
                lookup: Some(export_request::Lookup::Identifier(id("phone", &phone))),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(export.customer_id, p.customer_id);
        let doc: Value = serde_json::from_str(&export.json).unwrap();
        let read = doc["access_log"].as_array().unwrap().iter().any(|e| {
            e["actor"] == "test-agent" && e["action"].as_str().unwrap_or("").contains("GetProfile")
        });
        if read {
            break doc;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent's read is missing: {doc:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let text = doc.to_string();
    assert!(
        text.contains(&email) && text.contains("Trần Thị Mai"),
        "in clear: {doc:#}"
    );
    assert_eq!(doc["customer_id"], json!(p.customer_id));
    let kinds: Vec<&str> = doc["identifiers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"email") && kinds.contains(&"phone"),
        "{kinds:?}"
    );
    assert_eq!(doc["timeline"].as_array().unwrap().len(), 3);
    let consent = &doc["consents"][0];
    assert_eq!(consent["purpose"], "marketing");
    assert_eq!(consent["channel"], "zalo");
    assert_eq!(consent["notice_version"], "v1");
    assert_eq!(doc["profile"]["orders_count"], json!(1));
    // The export itself is recorded.
    let entries = audit_of(&cdp, &p.customer_id).await;
    assert!(
        entries
            .iter()
            .any(|e| e.actor == "test-privacy" && e.fields.iter().any(|f| f == "export")),
        "{entries:#?}"
    );
}

/// How many times each form of a customer's personal data appears in `files`.
/// (`memmem` rather than a byte-by-byte window: Kafka preallocates its
/// index files and Cassandra its commit log, so a run scans gigabytes.)
fn occurrences(files: &[std::path::PathBuf], forms: &[String]) -> Vec<(String, usize)> {
    let finders: Vec<memchr::memmem::Finder<'_>> = forms
        .iter()
        .map(|f| memchr::memmem::Finder::new(f.as_bytes()))
        .collect();
    let mut found: Vec<(String, usize)> = forms.iter().map(|f| (f.clone(), 0)).collect();
    for f in files {
        let Ok(bytes) = std::fs::read(f) else {
            continue;
        };
        for ((_, n), finder) in found.iter_mut().zip(&finders) {
            *n += finder.find_iter(&bytes).count();
        }
    }
    found
}

/// Every record of the log seals its personal part under the keys of its
/// identifiers and names them by HMAC in its key: the log's files (the
/// embedded log, or Kafka's segments of every topic of the run) never hold
/// the customer's phone, email or name in any form, though the view shows
/// them. (Erasing the keys then erases them from every copy at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_holds_no_personal_data_in_clear() {
    let cdp = CdpProcess::start();
    let local = cdp_e2e::mobile();
    let name_token = unique("Mận").replace('-', "");
    let name = format!("Trịnh Thị {name_token}");
    let email = format!("{}@example.vn", unique("sealed."));
    // From sources trusted to link, and both carrying the email, so they
    // share a partition and are resolved in order.
    let mut identify = touchpoint(
        "Identify",
        "store",
        "crm",
        vec![
            id("email", &email.to_uppercase()),
            id("phone", &format!("0{local}")),
        ],
        json!({"note": format!("gọi {name} trước khi giao, 0{local}")}),
    );
    identify.personal.as_mut().unwrap().traits = cdp_e2e::to_struct(json!({"name": name}));
    cdp.track(identify).await;
    cdp.track(touchpoint(
        "Order Completed",
        "store",
        "erp",
        vec![id("email", &email), id("phone", &format!("+84{local}"))],
        json!({
            "order_id": unique("o-"), "total": 1250000, "currency": "VND",
            "shipping_address": format!("{name}, 12 Lý Thái Tổ, Hà Nội")
        }),
    ))
    .await;
    let mut profiles = cdp.profiles().await;
    let p = profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        cdp_e2e::metrics(p).events_count == 2
    })
    .await;
    assert!(
        format!("{p:?}").contains(&name_token),
        "the view shows the name: the test would prove nothing otherwise"
    );
    let files = cdp.log_files();
    assert!(!files.is_empty(), "no log files found");
    let forms = vec![
        format!("+84{local}"),
        format!("84{local}"),
        format!("0{local}"),
        local.clone(),
        email.clone(),
        email.to_uppercase(),
        name_token.clone(),
        name_token.trim_start_matches("Mận").to_owned(),
    ];
    let found = occurrences(&files, &forms);
    assert!(
        found.iter().all(|(_, n)| *n == 0),
        "personal data in clear in the log ({} files): {found:?}",
        files.len()
    );
}

/// The right to erasure, end to end: a customer found by a phone typed
/// the national way, and the customer merged into it, are erased; their
/// views, search entries and exports are gone, the log's records of them
/// are anonymous (still counted), a re-sent phone is suppressed over gRPC
/// and HTTP, a rebuild brings back everyone else exactly and not them, and
/// the request is on record with its deadline. Another customer never
/// changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_shreds_the_log_removes_the_views_and_suppresses_the_identifiers() {
    let cdp = CdpProcess::start_with(&format!(
        "{}\n[privacy]\nkey_cache_secs = 1\n",
        cdp_e2e::DEFAULT_CONFIG
    ));
    let local = cdp_e2e::mobile();
    let email = format!("{}@example.vn", unique("erase."));
    let kept = format!("{}@example.vn", unique("kept."));
    let name_token = unique("Hằng").replace('-', "");
    // From the shop's CRM and its order system: trusted to link.
    let mut identify = touchpoint(
        "Identify",
        "store",
        "crm",
        vec![id("email", &email)],
        json!({}),
    );
    identify.personal.as_mut().unwrap().traits =
        cdp_e2e::to_struct(json!({"name": format!("Đỗ Thị {name_token}")}));
    identify.occurred_at = at(cdp_e2e::now_ms() - 60_000);
    cdp.track(identify).await;
    // A second customer by the phone alone, merged into the first when an
    // order carries both.
    let mut called = touchpoint(
        "Ticket Opened",
        "call_center",
        "hotline",
        vec![id("phone", &format!("+84{local}"))],
        json!({"ticket_id": unique("t-"), "subject": format!("giao hàng cho {name_token}")}),
    );
    called.occurred_at = at(cdp_e2e::now_ms() - 30_000);
    cdp.track(called).await;
    // Both exist before the order joins them (the log's partitions are
    // resolved side by side: otherwise the order could come first).
    let mut profiles = cdp.profiles().await;
    let first = profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        cdp_e2e::metrics(p).events_count == 1
    })
    .await;
    let second = profile_when(
        &mut profiles,
        id("phone", &format!("0{local}")),
        PATIENCE,
        |p| cdp_e2e::metrics(p).events_count == 1,
    )
    .await;
    assert_ne!(first.customer_id, second.customer_id);
    let order = touchpoint(
        "Order Completed",
        "store",
        "erp",
        vec![id("email", &email), id("phone", &format!("0{local}"))],
        json!({"order_id": unique("o-"), "total": 750000, "currency": "VND",
               "shipping_address": format!("{name_token}, 3 Hàng Bài")}),
    );
    let order_id = order.event_id.clone();
    cdp.track(order).await;
    let kept_order = touchpoint(
        "Order Completed",
        "store",
        "pos",
        vec![id("email", &kept)],
        json!({"order_id": unique("o-"), "total": 200000, "currency": "VND"}),
    );
    cdp.track(kept_order).await;
    let before = profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        cdp_e2e::metrics(p).events_count == 3
    })
    .await;
    let kept_before = profile_when(&mut profiles, id("email", &kept), PATIENCE, |p| {
        cdp_e2e::metrics(p).orders_count == 1
    })
    .await;

    // Only the privacy officer (and admins) may erase.
    let mut agent = privacy(&cdp, cdp_e2e::AGENT_KEY).await;
    let refused = agent
        .erase(v1::EraseRequest {
            lookup: Some(v1::erase_request::Lookup::Identifier(id(
                "phone",
                &format!("0{local}"),
            ))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    let mut officer = privacy(&cdp, cdp_e2e::PRIVACY_KEY).await;
    // The reason and the request id stay on the log after the customer is
    // gone: personal data in them is refused, and nothing is erased.
    for (request_id, reason, field) in [
        (unique("dsr-"), format!("asked by {email}"), "reason"),
        (unique("dsr-"), format!("called from 0{local}"), "reason"),
        (
            format!("dsr-{email}"),
            "data subject request".to_owned(),
            "request_id",
        ),
    ] {
        let refused = officer
            .erase(v1::EraseRequest {
                lookup: Some(v1::erase_request::Lookup::Identifier(id(
                    "phone",
                    &format!("0{local}"),
                ))),
                request_id,
                reason,
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().contains(field) && refused.message().contains("ticket"),
            "{refused:?}"
        );
    }
    let request = v1::EraseRequest {
        lookup: Some(v1::erase_request::Lookup::Identifier(id(
            "phone",
            &format!("0{local}"),
        ))),
        request_id: unique("dsr-"),
        reason: "data subject request".into(),
    };
    let done = officer.erase(request.clone()).await.unwrap().into_inner();
    assert_eq!(done.state(), v1::ErasureState::Complete, "{done:?}");
    assert!(done.customer_ids.contains(&before.customer_id), "{done:?}");
    assert_eq!(
        done.customer_ids.len(),
        2,
        "the customer and the one merged into it: {done:?}"
    );
    assert_eq!(done.identifiers, 2, "{done:?}");
    assert_eq!(done.events, 3, "{done:?}");
    let deadline = convert::timestamp_to_millis(done.deadline.as_ref().unwrap());
    let requested = convert::timestamp_to_millis(done.requested_at.as_ref().unwrap());
    assert_eq!(deadline - requested, 3 * 86_400_000, "72 hours by default");
    assert!(
        done.completed_at.is_some() && done.steps.len() >= 3,
        "{done:?}"
    );
    // On record, and a retried request answers the same.
    let status = officer
        .get_erasure(v1::GetErasureRequest {
            request_id: request.request_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status, done);
    assert_eq!(
        officer.erase(request.clone()).await.unwrap().into_inner(),
        done
    );

    // The views are gone, by every identifier; search and export too.
    for who in [
        id("email", &email),
        id("phone", &format!("0{local}")),
        id("phone", &format!("+84{local}")),
    ] {
        let gone = profiles
            .get_profile(v1::GetProfileRequest {
                lookup: Some(v1::get_profile_request::Lookup::Identifier(who.clone())),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(gone.code(), tonic::Code::NotFound, "{who:?}: {gone:?}");
    }
    let by_id = profiles
        .get_profile(v1::GetProfileRequest {
            lookup: Some(v1::get_profile_request::Lookup::CustomerId(
                before.customer_id.clone(),
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(by_id.code(), tonic::Code::NotFound, "{by_id:?}");
    let found = profiles
        .search_customers(v1::SearchCustomersRequest {
            query: name_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        format!("{found:?}").find(&name_token).is_none(),
        "{found:?}"
    );
    let export = officer
        .export(ExportRequest {
            lookup: Some(export_request::Lookup::Identifier(id("email", &email))),
        })
        .await
        .unwrap_err();
    assert_eq!(export.code(), tonic::Code::NotFound);

    // A new event carrying the phone is not kept: gRPC says so, HTTP
    // answers as Segment does; nothing comes back.
    let resent = cdp
        .track(touchpoint(
            "Product Viewed",
            "store",
            "pos",
            vec![id("phone", &format!("0{local}"))],
            json!({}),
        ))
        .await;
    assert_eq!(resent.status(), v1::EventStatus::Suppressed, "{resent:?}");
    let http = reqwest::Client::new()
        .post(format!("{}/v1/identify", cdp.http_url()))
        .basic_auth(cdp_e2e::WEB_KEY, Some(""))
        .json(&json!({"userId": unique("u-"), "traits": {"phone": format!("+84{local}"), "email": email}}))
        .send()
        .await
        .unwrap();
    assert_eq!(http.status().as_u16(), 200);
    // A later event of the other customer is folded: the pipeline has
    // passed anything the re-sent ones could have caused.
    cdp.track(touchpoint(
        "Product Viewed",
        "web",
        "web",
        vec![id("email", &kept)],
        json!({}),
    ))
    .await;
    profile_when(&mut profiles, id("email", &kept), PATIENCE, |p| {
        cdp_e2e::metrics(p).events_count == 2
    })
    .await;
    for who in [id("phone", &format!("0{local}")), id("email", &email)] {
        let gone = profiles
            .get_profile(v1::GetProfileRequest {
                lookup: Some(v1::get_profile_request::Lookup::Identifier(who.clone())),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(gone.code(), tonic::Code::NotFound, "recreated by {who:?}");
    }

    // Replay: the erased customer's events are still there, anonymous.
    let mut replay = ReplayServiceClient::new(cdp.projection_channel().await);
    let mut stream = replay
        .replay(ReplayRequest {
            purpose: "service".into(),
            with_customers: true,
            ..ReplayRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut erased = 0;
    while let Some(e) = stream.message().await.unwrap() {
        let text = format!("{e:?}");
        assert!(
            !text.contains(&local) && !text.contains(&name_token) && !text.contains(&email),
            "personal data replayed: {text}"
        );
        if e.erased {
            erased += 1;
            assert!(e.customer_id.is_empty());
            let t = e.touchpoint.unwrap();
            if t.event_id == order_id {
                let props = convert::struct_to_json(t.properties.as_ref().unwrap());
                assert_eq!(props["total"], json!(750000), "the order still counts");
            }
        }
    }
    assert_eq!(erased, 3);
    // `cdp replay` to JSON Lines says the same.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    let status = std::process::Command::new(cdp_e2e::cdp_binary())
        .env("CDP_TOKEN", cdp_e2e::ADMIN_KEY)
        .args(["replay", "--purpose", "service", "--with-customers"])
        .args(["--endpoint", &format!("http://{}", cdp.projection_addr())])
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "cdp replay failed");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        !text.contains(&local) && !text.contains(&name_token) && !text.contains(&email),
        "personal data in the replay file"
    );
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.iter().filter(|l| l["erased"] == json!(true)).count(),
        3,
        "{text}"
    );

    // A rebuild from the log honours the erasure: the same view for the
    // other customer, none for the erased one.
    cdp.rebuild_until(true).await;
    let kept_after = profile_when(&mut profiles, id("email", &kept), PATIENCE, |p| {
        cdp_e2e::metrics(p).events_count == 2
    })
    .await;
    assert_eq!(kept_after.customer_id, kept_before.customer_id);
    assert_eq!(
        cdp_e2e::metrics(&kept_after).orders_count,
        cdp_e2e::metrics(&kept_before).orders_count
    );
    let gone = profiles
        .get_profile(v1::GetProfileRequest {
            lookup: Some(v1::get_profile_request::Lookup::Identifier(id(
                "phone",
                &format!("0{local}"),
            ))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");

    // Not a trace in any file of the platform: the log, the identity
    // graph, the views, the keyring (the embedded data directory whole; on
    // the distributed back end Kafka's segments, and Cassandra's SSTables
    // and commit log once flushed).
    let files = cdp.stored_files();
    assert!(!files.is_empty(), "no files found");
    let found = occurrences(
        &files,
        &[
            format!("84{local}"),
            format!("0{local}"),
            email.clone(),
            name_token.trim_start_matches("Hằng").to_owned(),
        ],
    );
    assert!(found.iter().all(|(_, n)| *n == 0), "{found:?}");
}

/// The master key is rotated while the platform serves: a version added to
/// the master key file wraps new keys in every process, `RotateMasterKey`
/// (operators only) rewraps every existing key under it, and once a second
/// call finds nothing left, the old version can leave the file: after a
/// restart without it, the pipeline opens new events of an old customer
/// and a rebuild opens every record of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_key_rotates_without_downtime() {
    let mut cdp = CdpProcess::start();
    let name_token = unique("Quân").replace('-', "");
    let email = format!("{}@example.vn", unique("rotate."));
    let mut identify = touchpoint(
        "Identify",
        "store",
        "crm",
        vec![id("email", &email)],
        json!({}),
    );
    identify.personal.as_mut().unwrap().traits =
        cdp_e2e::to_struct(json!({"name": format!("Lê {name_token}")}));
    cdp.track(identify).await;
    let mut profiles = cdp.profiles().await;
    profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        cdp_e2e::metrics(p).events_count == 1
    })
    .await;

    let file = cdp.data_dir().join("master.keys");
    let v1 = std::fs::read_to_string(&file).unwrap();
    let v2 = cdp_seal::MasterKeys::generate_line(2).unwrap();
    std::fs::write(&file, format!("{v1}{v2}\n")).unwrap();

    let refused = privacy(&cdp, cdp_e2e::AGENT_KEY)
        .await
        .rotate_master_key(v1::RotateMasterKeyRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    let mut operator = privacy(&cdp, cdp_e2e::OPERATOR_KEY).await;
    let first = operator
        .rotate_master_key(v1::RotateMasterKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.master_version, 2, "{first:?}");
    assert_eq!(first.versions_added, vec![2], "{first:?}");
    assert_eq!(first.unknown, 0, "{first:?}");
    assert!(
        first.rewrapped >= 2,
        "the hash secret and the customer's key: {first:?}"
    );
    // A customer met after the rotation gets a key wrapped by version 2
    // in whichever process creates it (the file is looked at again).
    let other = format!("{}@example.vn", unique("after."));
    cdp.track(touchpoint(
        "Identify",
        "store",
        "crm",
        vec![id("email", &other)],
        json!({}),
    ))
    .await;
    profile_when(&mut profiles, id("email", &other), PATIENCE, |p| {
        cdp_e2e::metrics(p).events_count == 1
    })
    .await;
    let second = operator
        .rotate_master_key(v1::RotateMasterKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (second.master_version, second.rewrapped, second.unknown),
        (2, 0, 0),
        "nothing is left under version 1: {second:?}"
    );
    assert!(second.scanned > first.scanned, "{first:?} {second:?}");
    let audit = audit_of(&cdp, "").await;
    assert!(
        audit
            .iter()
            .any(|e| e.action.ends_with("RotateMasterKey") && e.actor == "test-operator"),
        "the rotation is audited"
    );

    // Version 1 leaves the file; every process starts again without it.
    std::fs::write(&file, format!("{v2}\n")).unwrap();
    cdp.restart();
    cdp.track(touchpoint(
        "Order Completed",
        "store",
        "erp",
        vec![id("email", &email)],
        json!({"order_id": unique("o-"), "total": 250000, "currency": "VND"}),
    ))
    .await;
    let mut profiles = cdp.profiles().await;
    profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        cdp_e2e::metrics(p).events_count == 2
    })
    .await;
    cdp.rebuild_until(true).await;
    let p = profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        cdp_e2e::metrics(p).events_count == 2
    })
    .await;
    assert!(
        format!("{p:?}").contains(&name_token),
        "the rebuilt view has the name from the sealed log: {p:?}"
    );
}
