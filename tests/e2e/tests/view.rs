//! The single customer view an agent works from: search, live updates over
//! gRPC, and the web console in headless Chromium with its audit log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use cdp_e2e::{AGENT_TOKEN, CdpProcess, id, metrics, mobile, profile_when, touchpoint, unique};
use cdp_proto::v1::{self, GetProfileRequest, SearchCustomersRequest};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(20);

fn with_traits(mut t: v1::Touchpoint, traits: Value) -> v1::Touchpoint {
    if let Some(p) = t.personal.as_mut() {
        p.traits = cdp_e2e::to_struct(traits);
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_finds_customers_by_phone_forms_and_names_with_or_without_diacritics() {
    let cdp = CdpProcess::start();
    let tag = unique("");
    let digits = mobile();
    let name = format!("Nguyễn Thị Hồng{tag}");
    let t = touchpoint(
        "Identify",
        "call_center",
        "crm",
        vec![
            id("phone", &format!("0{digits}")),
            id("email", &format!("hong.{tag}@shop.vn")),
        ],
        json!({}),
    );
    cdp.track(with_traits(t, json!({"name": name}))).await;
    let mut profiles = cdp.profiles().await;
    let p = profile_when(
        &mut profiles,
        id("phone", &format!("+84{digits}")),
        PATIENCE,
        |p| metrics(p).events_count == 1,
    )
    .await;
    let search = |query: String| {
        let mut profiles = profiles.clone();
        async move {
            profiles
                .search_customers(SearchCustomersRequest { query, limit: 10 })
                .await
                .unwrap()
                .into_inner()
                .candidates
        }
    };
    let d = &digits;
    for query in [
        format!("0{}", &d[..5]),
        format!("+84 {} {}", &d[..3], &d[3..6]),
        format!("84{d}"),
        format!("hồng{tag}"),
        format!("hong{tag}"),
        format!("HONG{}", tag.to_uppercase()),
        format!("hong.{tag}@"),
    ] {
        let found = search(query.clone()).await;
        assert!(
            found
                .iter()
                .any(|c| c.customer_id == p.customer_id && c.name == name),
            "search {query:?} did not find {name}: {found:?}"
        );
        assert!(found[0].phones.contains(&format!("+84{digits}")));
    }
    assert!(search(format!("nobody{tag}")).await.is_empty());
    let short = profiles
        .search_customers(SearchCustomersRequest {
            query: "a".into(),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(short.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_profile_delivers_the_update_after_an_event() {
    let cdp = CdpProcess::start();
    let email = format!("watch.{}@shop.vn", unique(""));
    cdp.track(touchpoint(
        "Product Viewed",
        "web",
        "website",
        vec![id("email", &email)],
        json!({"product_id": "A"}),
    ))
    .await;
    let mut profiles = cdp.profiles().await;
    profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        metrics(p).events_count == 1
    })
    .await;
    let mut stream = profiles
        .watch_profile(GetProfileRequest {
            lookup: Some(v1::get_profile_request::Lookup::Identifier(id(
                "email", &email,
            ))),
            timeline_limit: 5,
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap().profile.unwrap();
    assert_eq!(metrics(&first).orders_count, 0);
    cdp.track(touchpoint(
        "Order Completed",
        "store",
        "pos-q1",
        vec![id("email", &email)],
        json!({"order_id": unique(""), "total": 700000}),
    ))
    .await;
    let next = tokio::time::timeout(PATIENCE, async {
        loop {
            let p = stream.message().await.unwrap().unwrap().profile.unwrap();
            if metrics(&p).orders_count == 1 {
                return p;
            }
        }
    })
    .await
    .expect("no update arrived after the order");
    assert_eq!(next.customer_id, first.customer_id);
    assert_eq!(metrics(&next).spend[0].total, "700000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trait_sources_and_the_rfm_segment_are_in_the_view() {
    let cdp = CdpProcess::start();
    let email = format!("trust.{}@shop.vn", unique(""));
    let crm = touchpoint(
        "Identify",
        "call_center",
        "crm",
        vec![id("email", &email)],
        json!({}),
    );
    cdp.track(with_traits(crm, json!({"name": "Phạm Minh Tuấn"})))
        .await;
    let web = touchpoint(
        "Identify",
        "web",
        "website",
        vec![id("email", &email)],
        json!({}),
    );
    cdp.track(with_traits(web, json!({"name": "tuan99"}))).await;
    cdp.track(touchpoint(
        "Order Completed",
        "web",
        "website",
        vec![id("email", &email)],
        json!({"order_id": unique(""), "total": 300000}),
    ))
    .await;
    let mut profiles = cdp.profiles().await;
    let p = profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        metrics(p).events_count == 3
    })
    .await;
    let name = p.traits.as_ref().unwrap().fields["name"].clone();
    assert_eq!(
        cdp_proto::convert::value_to_json(&name),
        json!("Phạm Minh Tuấn"),
        "the CRM is trusted more than the website"
    );
    let source = p.trait_sources.iter().find(|t| t.key == "name").unwrap();
    assert_eq!((source.source_id.as_str(), source.trust), ("crm", 10));
    let rfm = p.rfm.unwrap();
    assert_eq!(
        (rfm.recency_days, rfm.frequency, rfm.segment.as_str()),
        (0, 1, "new")
    );
}

/// Runs the console script in headless Chromium; sends a third order when it
/// says WAITING, so the page must update live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs playwright-core and Chromium: `make test` installs them"]
async fn an_agent_finds_a_customer_in_the_console_and_the_view_is_audited() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let found = std::env::var_os("CDP_SDK_NODE_MODULES")
        .filter(|m| std::path::Path::new(m).join("playwright-core").exists())
        .filter(|_| std::path::Path::new(&chromium).exists());
    let modules = cdp_e2e::tool(found, "playwright-core with Chromium");
    let cdp = CdpProcess::start();
    let digits = mobile();
    let phone = format!("0{digits}");
    let who = vec![id("phone", &phone)];
    for total in [450_000, 1_250_000] {
        cdp.track(touchpoint(
            "Order Completed",
            "store",
            "pos-q1",
            who.clone(),
            json!({"order_id": unique(""), "total": total}),
        ))
        .await;
    }
    cdp.track(touchpoint(
        "Ticket Opened",
        "call_center",
        "hotline",
        who.clone(),
        json!({"ticket_id": unique(""), "subject": "Giao hàng chậm"}),
    ))
    .await;
    cdp.track(touchpoint(
        "Consent Updated",
        "social",
        "zalo-oa",
        who.clone(),
        json!({"purpose": "marketing", "channel": "zalo", "granted": true, "notice_version": "v3"}),
    ))
    .await;
    // An analyst's computed trait and segment: the agent sees them.
    let mut analyst = cdp_proto::v1::audience_service_client::AudienceServiceClient::new(
        CdpProcess::connect_as(cdp.query_addr(), Some(cdp_e2e::ANALYST_KEY)).await,
    );
    analyst
        .save_computed_trait(v1::SaveComputedTraitRequest {
            definition: Some(v1::ComputedTrait {
                name: "store_orders".into(),
                aggregate: "count".into(),
                filter: Some(v1::EventFilter {
                    types: vec!["Order Completed".into()],
                    channels: vec!["store".into()],
                    ..Default::default()
                }),
                window: "all".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    analyst
        .save_segment(v1::SaveSegmentRequest {
            definition: Some(v1::Segment {
                name: "store_regulars".into(),
                condition: "traits.store_orders >= 2".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let mut profiles = cdp.profiles().await;
    let p = profile_when(&mut profiles, who[0].clone(), PATIENCE, |p| {
        metrics(p).events_count == 4 && !p.segments.is_empty()
    })
    .await;

    // Without a token the API refuses.
    let http = reqwest::Client::new();
    let refused = http
        .get(format!(
            "{}/api/profile?kind=phone&value={phone}",
            cdp.console_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);

    let shot = std::env::temp_dir().join(format!("console-{}.png", unique("")));
    let mut child = Command::new("node")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/console/agent.js"))
        .env("NODE_PATH", &modules)
        .env("CHROMIUM", &chromium)
        .env("CDP_HTTP", cdp.console_url())
        .env("CDP_AGENT_TOKEN", AGENT_TOKEN)
        .env("CDP_SUPERVISOR_TOKEN", cdp_e2e::SUPERVISOR_KEY)
        .env("CDP_OPERATOR_TOKEN", cdp_e2e::OPERATOR_KEY)
        .env(
            "CDP_PHONE",
            format!("+84 {} {} {}", &digits[..3], &digits[3..6], &digits[6..]),
        )
        .env("CDP_PHONE_E164", format!("+84{digits}"))
        .env("CDP_SCREENSHOT", &shot)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = rx.recv().await {
            seen.push(line.clone());
            if line == "WAITING" {
                return true;
            }
        }
        false
    })
    .await;
    if waited != Ok(true) {
        let out = child.wait_with_output().unwrap();
        panic!(
            "the console script failed before the live check: {seen:?}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    cdp.track(touchpoint(
        "Order Completed",
        "web",
        "website",
        who.clone(),
        json!({"order_id": unique(""), "total": 99_000}),
    ))
    .await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    while let Ok(line) = rx.try_recv() {
        seen.push(line);
    }
    assert!(
        out.status.success(),
        "console script failed: {seen:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in ["DENIED OK", "LIVE OK", "REVEAL OK"] {
        assert!(seen.iter().any(|l| l == step), "{step} missing: {seen:?}");
    }
    assert!(shot.exists(), "no screenshot at {}", shot.display());

    // Agents may not read the audit; their supervisor reads the team's.
    let agent = cdp.console_session(AGENT_TOKEN).await;
    let refused = http
        .get(format!("{}/api/audit", cdp.console_url()))
        .bearer_auth(&agent)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    let supervisor = cdp.console_session(cdp_e2e::SUPERVISOR_KEY).await;
    let audit: Value = http
        .get(format!(
            "{}/api/audit?customer_id={}",
            cdp.console_url(),
            p.customer_id
        ))
        .bearer_auth(&supervisor)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = audit["entries"].as_array().unwrap();
    assert!(
        entries.iter().any(|e| e["actor"] == "agent.lan"
            && e["customer_id"] == p.customer_id.as_str()
            && e["lookup"].as_str().unwrap().starts_with("phone:")
            && !e["lookup"].as_str().unwrap().contains(&digits)),
        "the view is not in the audit log (or its lookup is in clear): {audit}"
    );
    assert!(
        entries.iter().any(|e| e["actor"] == "test-supervisor"
            && e["fields"] == json!(["phone"])
            && e["reason"] == "ticket 42: customer called back"),
        "the reveal is not in the audit log: {audit}"
    );
}
