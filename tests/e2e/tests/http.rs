//! The Segment-compatible HTTP API, the webhooks and the dead letters,
//! against a running `cdp dev`: what arrives over HTTP is read back over gRPC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use cdp_e2e::{
    CdpProcess, MESSENGER_SECRET, MESSENGER_VERIFY, POS_KEY, WEB_KEY, ZALO_SECRET, id, metrics,
    profile_when, touchpoint, unique,
};
use cdp_proto::v1::dead_letter_service_client::DeadLetterServiceClient;
use cdp_proto::v1::{
    ListDeadLettersRequest, ListTimelineRequest, RedriveRequest, TrackRequest,
    list_timeline_request,
};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const PATIENCE: Duration = Duration::from_secs(20);

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

struct Http {
    client: reqwest::Client,
    base: String,
}

impl Http {
    fn new(cdp: &CdpProcess) -> Self {
        Http {
            client: reqwest::Client::new(),
            base: cdp.http_url(),
        }
    }

    async fn post(&self, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
        let mut req = self.client.post(format!("{}{path}", self.base)).json(body);
        if let Some(k) = key {
            req = req.basic_auth(k, Some(""));
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn post_raw(
        &self,
        path: &str,
        key: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .basic_auth(key, Some(""))
            .body(body);
        req = req.header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

/// The SDK runtime installed by `make test` at `$var`; a test that needs it
/// fails without it.
fn sdk(var: &str) -> PathBuf {
    let found = std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| p.exists());
    cdp_e2e::tool(found, &format!("the Segment SDK at ${var}"))
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("sdk")
        .join(name)
}

async fn check_sdk_customer(cdp: &CdpProcess, user: &str, email: &str, total: &str) {
    let mut profiles = cdp.profiles().await;
    // identify + order + page + 20 product views
    let p = profile_when(&mut profiles, id("user_id", user), PATIENCE, |p| {
        metrics(p).events_count == 23
    })
    .await;
    let m = metrics(&p);
    assert_eq!(m.orders_count, 1);
    assert_eq!(m.spend[0].total, total);
    assert!(
        p.identifiers
            .iter()
            .any(|i| i.kind == "email" && i.value == email),
        "{:?}",
        p.identifiers
    );
    let by_email = profile_when(&mut profiles, id("email", email), PATIENCE, |_| true).await;
    assert_eq!(by_email.customer_id, p.customer_id);
    let types: Vec<&str> = p
        .recent_timeline
        .iter()
        .map(|e| e.r#type.as_str())
        .collect();
    for t in [
        "Identify",
        "Order Completed",
        "Page Viewed",
        "Product Viewed",
    ] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    assert!(p.recent_timeline.iter().all(|e| e.source_id == "website"));
}

/// Runs an SDK script against a fresh platform and checks the customer it made.
async fn sdk_run(mut command: Command, name: &str, total: &str) {
    let cdp = CdpProcess::start();
    let (user, email) = (
        unique(&format!("{name}-")),
        format!("{}@shop.vn", unique(name)),
    );
    let out = command
        .env("CDP_HTTP", cdp.http_url())
        .env("CDP_WRITE_KEY", WEB_KEY)
        .env("CDP_USER_ID", &user)
        .env("CDP_EMAIL", &email)
        .env("CDP_ORDER_ID", unique(&format!("{name}-O-")))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name} SDK failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    check_sdk_customer(&cdp, &user, &email, total).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs segment-analytics-python: `make test` installs it"]
async fn the_real_segment_python_sdk_feeds_the_platform() {
    let python = sdk("CDP_SDK_PYTHON");
    let mut command = Command::new(python);
    command.arg(script("send_python.py"));
    sdk_run(command, "python", "450000").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs @segment/analytics-node: `make test` installs it"]
async fn the_real_segment_node_sdk_feeds_the_platform() {
    let modules = sdk("CDP_SDK_NODE_MODULES");
    let mut command = Command::new("node");
    command
        .arg(script("send_node.js"))
        .env("NODE_PATH", modules);
    sdk_run(command, "node", "990000").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_message_counts_once_and_a_gzip_batch_of_500_lands() {
    let cdp = CdpProcess::start();
    let http = Http::new(&cdp);
    let user = unique("retry-");
    let order = json!({"userId": user, "messageId": "ajs-next-retry-1", "event": "Order Completed",
        "properties": {"order_id": unique("O-"), "total": 300000}});
    for _ in 0..3 {
        let (status, body) = http.post("/v1/track", Some(WEB_KEY), &order).await;
        assert_eq!(status, 200, "{body}");
    }
    let batch: Vec<Value> = (0..500)
        .map(|i| {
            json!({"type": "track", "userId": user, "messageId": format!("m-{user}-{i}"),
            "event": "Product Viewed", "properties": {"product_id": format!("SKU-{i}")}})
        })
        .collect();
    let body = serde_json::to_vec(&json!({"batch": batch, "sentAt": chrono_now()})).unwrap();
    let (status, resp) = http
        .post_raw(
            "/v1/batch",
            WEB_KEY,
            gzip(&body),
            &[("content-encoding", "gzip")],
        )
        .await;
    assert_eq!(status, 200, "{resp}");
    let mut profiles = cdp.profiles().await;
    let p = profile_when(&mut profiles, id("user_id", &user), PATIENCE, |p| {
        metrics(p).events_count >= 501
    })
    .await;
    assert_eq!(
        metrics(&p).events_count,
        501,
        "the retried order must count once"
    );
    assert_eq!(metrics(&p).orders_count, 1);
    assert_eq!(metrics(&p).spend[0].total, "300000");
}

fn chrono_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let ts = prost_types::Timestamp {
        seconds: now.as_secs() as i64,
        nanos: 0,
    };
    ts.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_auth_answer_with_the_documented_status_and_message() {
    let cdp = CdpProcess::start();
    let http = Http::new(&cdp);
    let user = unique("lim-");
    let good =
        json!({"userId": user, "event": "Product Viewed", "properties": {"product_id": "A"}});

    let (s, b) = http.post("/v1/track", None, &good).await;
    assert_eq!(s, 401);
    assert!(
        b["error"].as_str().unwrap().contains("missing write key"),
        "{b}"
    );
    let (s, b) = http.post("/v1/track", Some("not-a-key"), &good).await;
    assert_eq!(s, 401);
    assert!(
        b["error"].as_str().unwrap().contains("unknown write key"),
        "{b}"
    );
    assert_eq!(b["code"], "UNAUTHENTICATED", "{b}");

    let (s, b) = http.post("/v1/track", Some(POS_KEY), &good).await;
    assert_eq!(s, 400);
    assert_eq!(b["violations"][0]["field"], "event");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("\"Product Viewed\" is not allowed for source pos"),
        "{b}"
    );

    let big = json!({"userId": user, "event": "X", "properties": {"blob": "x".repeat(33 * 1024)}});
    let (s, b) = http.post("/v1/track", Some(WEB_KEY), &big).await;
    assert_eq!(s, 413, "{b}");
    assert!(
        b["error"].as_str().unwrap().contains("at most 32768 bytes"),
        "{b}"
    );

    let (s, b) = http
        .post(
            "/v1/batch",
            Some(WEB_KEY),
            &json!({"batch": [{"type": "track", "userId": user, "event": "X",
            "properties": {"blob": "x".repeat(33 * 1024)}}]}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["violations"][0]["field"], "batch[0]");

    let many: Vec<Value> = (0..20)
        .map(|_| json!({"type": "track", "userId": user, "event": "X", "properties": {"blob": "y".repeat(30_000)}}))
        .collect();
    let (s, b) = http
        .post("/v1/batch", Some(WEB_KEY), &json!({"batch": many}))
        .await;
    assert_eq!(s, 413, "{b}");
    assert!(b["error"].as_str().unwrap().contains("the batch is"), "{b}");

    let future = json!({"userId": user, "event": "X", "timestamp": "2099-01-01T00:00:00Z"});
    let (s, b) = http.post("/v1/track", Some(WEB_KEY), &future).await;
    assert_eq!(
        (s, b["violations"][0]["field"].as_str()),
        (400, Some("timestamp")),
        "{b}"
    );

    let (s, b) = http
        .post("/v1/track", Some(WEB_KEY), &json!({"event": "X"}))
        .await;
    assert_eq!(
        (s, b["violations"][0]["field"].as_str()),
        (400, Some("userId")),
        "{b}"
    );

    // A mistyped email beside a user id: dropped with the reason, the call kept.
    let bad_email = json!({"userId": user, "traits": {"email": "lan.at.shop.vn"}});
    let (s, b) = http.post("/v1/identify", Some(WEB_KEY), &bad_email).await;
    assert_eq!(
        (s, b["warnings"][0]["field"].as_str()),
        (200, Some("traits.email")),
        "{b}"
    );
    // Alone, it leaves nothing to attribute the call to: refused, naming the field.
    let only_bad_email = json!({"traits": {"email": "lan.at.shop.vn"}, "anonymousId": ""});
    let (s, b) = http
        .post("/v1/identify", Some(WEB_KEY), &only_bad_email)
        .await;
    assert_eq!(
        (s, b["violations"][0]["field"].as_str()),
        (400, Some("traits.email")),
        "{b}"
    );
    assert!(b["error"].as_str().unwrap().contains("missing '@'"), "{b}");

    let (s, _) = http
        .post_raw("/v1/track", WEB_KEY, b"{not json".to_vec(), &[])
        .await;
    assert_eq!(s, 400);
    let (s, _) = http
        .post_raw(
            "/v1/track",
            WEB_KEY,
            b"{}".to_vec(),
            &[("content-encoding", "br")],
        )
        .await;
    assert_eq!(s, 415);

    // All or nothing: one bad event refuses the whole batch.
    let mixed = json!({"batch": [
        {"type": "track", "userId": user, "event": "Order Completed", "properties": {"order_id": "1", "total": 5}},
        {"type": "track", "userId": user, "event": "Order Completed", "properties": {"total": "lots"}}]});
    let (s, b) = http.post("/v1/batch", Some(WEB_KEY), &mixed).await;
    assert_eq!(s, 400);
    assert_eq!(
        b["violations"][0]["field"], "batch[1].properties.total",
        "{b}"
    );
    let (s, _) = http.post("/v1/track", Some(WEB_KEY), &good).await;
    assert_eq!(s, 200);
    // A marker from the same user lands after anything sent before it (one
    // routing key, one partition): once the profile holds it, it holds the
    // refused batch too if that had landed. The marker is a trait, so the
    // same read of the profile row shows it and the event count (the
    // timeline is read apart from the row).
    let marker = json!({"userId": user, "traits": {"marker": "sent"}});
    let (s, _) = http.post("/v1/identify", Some(WEB_KEY), &marker).await;
    assert_eq!(s, 200);
    let mut profiles = cdp.profiles().await;
    let p = profile_when(&mut profiles, id("user_id", &user), PATIENCE, |p| {
        p.traits
            .as_ref()
            .is_some_and(|t| t.fields.contains_key("marker"))
    })
    .await;
    let seen: Vec<&str> = p
        .recent_timeline
        .iter()
        .map(|e| e.r#type.as_str())
        .collect();
    // The identify kept without its mistyped email, the good track, the marker.
    assert_eq!(
        metrics(&p).events_count,
        3,
        "nothing of the refused batch may land: {seen:?}"
    );
    assert_eq!(metrics(&p).orders_count, 0);
}

fn zalo_signature(body: &[u8], app_id: &str, timestamp: &str) -> String {
    let mut h = Sha256::new();
    h.update(app_id.as_bytes());
    h.update(body);
    h.update(timestamp.as_bytes());
    h.update(ZALO_SECRET.as_bytes());
    format!("mac={}", hex::encode(h.finalize()))
}

fn messenger_signature(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(MESSENGER_SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zalo_and_messenger_webhooks_land_on_the_right_timeline() {
    let cdp = CdpProcess::start();
    let http = Http::new(&cdp);
    let mut ingest = cdp.ingest().await;
    let email = format!("{}@shop.vn", unique("hook"));
    let zalo_user = format!(
        "{}",
        2_000_000_000_000u64 + (uuid::Uuid::new_v4().as_u128() % 1_000_000_000) as u64
    );
    let psid = format!(
        "{}",
        7_000_000_000_000u64 + (uuid::Uuid::new_v4().as_u128() % 1_000_000_000) as u64
    );
    // The CRM knows this customer's Zalo and Facebook ids.
    let link = touchpoint(
        "Identify",
        "call_center",
        "crm",
        vec![
            id("email", &email),
            id("zalo_id", &zalo_user),
            id("facebook_psid", &psid),
        ],
        json!({}),
    );
    ingest
        .track(TrackRequest {
            touchpoint: Some(link),
        })
        .await
        .unwrap();

    let now = chrono_ms();
    // Zalo OA "user_send_text", as documented by Zalo.
    let zalo = serde_json::to_vec(
        &json!({"app_id": "360846524940903967", "user_id_by_app": "552177279717587730",
        "event_name": "user_send_text", "timestamp": now.to_string(),
        "sender": {"id": zalo_user}, "recipient": {"id": "579745863508352884"},
        "message": {"msg_id": unique("zmsg"), "text": "Cho mình đổi size áo"}}),
    )
    .unwrap();
    let sig = zalo_signature(&zalo, "360846524940903967", &now.to_string());
    let (s, b) = http
        .post_raw(
            "/webhooks/zalo",
            "",
            zalo.clone(),
            &[("x-zevent-signature", &sig)],
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, _) = http
        .post_raw(
            "/webhooks/zalo",
            "",
            zalo,
            &[("x-zevent-signature", "mac=00")],
        )
        .await;
    assert_eq!(s, 401, "a bad Zalo signature must be refused");
    // A correctly signed event from 2020, sent again today: a replay.
    let stale_at = "1577836800000";
    let stale = serde_json::to_vec(
        &json!({"app_id": "360846524940903967", "event_name": "user_send_text",
        "timestamp": stale_at, "sender": {"id": zalo_user}, "recipient": {"id": "579745863508352884"},
        "message": {"msg_id": unique("zmsg"), "text": "old"}}),
    )
    .unwrap();
    let sig = zalo_signature(&stale, "360846524940903967", stale_at);
    let (s, b) = http
        .post_raw("/webhooks/zalo", "", stale, &[("x-zevent-signature", &sig)])
        .await;
    assert_eq!(s, 401, "a stale Zalo event must be refused: {b}");
    assert!(b.to_string().contains("refused"), "{b}");

    // A Messenger page message, as documented by Meta.
    let fb = serde_json::to_vec(&json!({"object": "page", "entry": [{"id": "106123456789", "time": now,
        "messaging": [{"sender": {"id": psid}, "recipient": {"id": "106123456789"}, "timestamp": now,
            "message": {"mid": unique("m_"), "text": "Shop còn hàng không?"}}]}]}))
    .unwrap();
    let (s, b) = http
        .post_raw(
            "/webhooks/messenger",
            "",
            fb.clone(),
            &[("x-hub-signature-256", &messenger_signature(&fb))],
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, _) = http
        .post_raw(
            "/webhooks/messenger",
            "",
            fb,
            &[("x-hub-signature-256", "sha256=00")],
        )
        .await;
    assert_eq!(s, 401);
    let verify = reqwest::get(format!(
        "{}/webhooks/messenger?hub.mode=subscribe&hub.verify_token={MESSENGER_VERIFY}&hub.challenge=42",
        cdp.http_url()
    ))
    .await
    .unwrap();
    assert_eq!(verify.text().await.unwrap(), "42");

    let mut profiles = cdp.profiles().await;
    let p = profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        metrics(p).events_count == 3
    })
    .await;
    let page = profiles
        .list_timeline(ListTimelineRequest {
            lookup: Some(list_timeline_request::Lookup::CustomerId(
                p.customer_id.clone(),
            )),
            types: vec!["Message Received".into()],
            ..ListTimelineRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let sources: Vec<&str> = page.entries.iter().map(|e| e.source_id.as_str()).collect();
    assert_eq!(page.entries.len(), 2, "{sources:?}");
    assert!(sources.contains(&"zalo-oa") && sources.contains(&"facebook-page"));
    assert!(
        page.entries
            .iter()
            .any(|e| e.summary.contains("Cho mình đổi size áo"))
    );
}

fn chrono_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_with_their_reason_and_can_be_redriven() {
    let mut cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    let kiosk = unique("pos-kiosk-");
    // Accepted (well-formed), but its only identifier is a blocked shared device.
    let t = touchpoint(
        "Product Viewed",
        "store",
        "kiosk",
        vec![id("device_id", &kiosk)],
        json!({"product_id": "A"}),
    );
    let event_id = t.event_id.clone();
    ingest
        .track(TrackRequest {
            touchpoint: Some(t),
        })
        .await
        .unwrap();

    let mut admin = DeadLetterServiceClient::new(cdp.channel().await);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let letter = loop {
        let list = admin
            .list_dead_letters(ListDeadLettersRequest::default())
            .await
            .unwrap()
            .into_inner();
        if let Some(l) = list
            .dead_letters
            .into_iter()
            .find(|l| l.event_id == event_id)
        {
            break l;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the event never reached the dead letters"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(letter.stage, "identity");
    assert!(
        letter.reason.contains("blocked by pattern \"pos-*\""),
        "{}",
        letter.reason
    );

    // The operator stops blocking kiosks' device ids, restarts and re-drives.
    let config = format!(
        "{}\n[identity.kinds.device_id]\nblocked_patterns = []\n",
        cdp_e2e::DEFAULT_CONFIG
    );
    cdp.restart_with(&config);
    let mut admin = DeadLetterServiceClient::new(cdp.channel().await);
    let r = admin
        .redrive(RedriveRequest {
            refs: vec![letter.r#ref.unwrap()],
            all: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.event_ids, vec![event_id]);
    let mut profiles = cdp.profiles().await;
    let p = profile_when(&mut profiles, id("device_id", &kiosk), PATIENCE, |p| {
        metrics(p).events_count == 1
    })
    .await;
    assert_eq!(p.recent_timeline[0].source_id, "kiosk");
}
