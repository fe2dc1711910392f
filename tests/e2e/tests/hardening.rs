//! What a careless or hostile client tries, against a running platform:
//! repeated admin calls, requests built to cost more than their size,
//! events nested too deep, a half-built generation, idle connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cdp_e2e::{CdpProcess, id, metrics, profile_when, touchpoint, unique};
use cdp_proto::v1::dead_letter_service_client::DeadLetterServiceClient;
use cdp_proto::v1::replay_service_client::ReplayServiceClient;
use cdp_proto::v1::{
    DeadLetter, ListDeadLettersRequest, RedriveRequest, ReplayRequest, TrackRequest,
};
use serde_json::json;

const PATIENCE: Duration = Duration::from_secs(30);

/// The dead letters of `event_id`, once there are at least `count`.
async fn letters_of(
    admin: &mut DeadLetterServiceClient<cdp_e2e::Authed>,
    event_id: &str,
    count: usize,
) -> Vec<DeadLetter> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut found = Vec::new();
        let mut token = String::new();
        loop {
            let page = admin
                .list_dead_letters(ListDeadLettersRequest {
                    page_size: 1000,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            found.extend(
                page.dead_letters
                    .into_iter()
                    .filter(|l| l.event_id == event_id),
            );
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        if found.len() >= count {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{event_id} has {} dead letters, expected {count}",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `n` product views on the web, each of its own shopper (`<prefix>-<i>@example.vn`).
fn views(prefix: &str, n: usize) -> Vec<cdp_proto::v1::Touchpoint> {
    (0..n)
        .map(|i| {
            touchpoint(
                "Product Viewed",
                "web",
                "web",
                vec![id("email", &format!("{prefix}-{i}@example.vn"))],
                json!({"product_id": "A"}),
            )
        })
        .collect()
}

async fn replayed(cdp: &CdpProcess, event_id: &str) -> usize {
    let mut replay = ReplayServiceClient::new(cdp.projection_channel().await);
    let mut stream = replay
        .replay(ReplayRequest {
            purpose: "service".into(),
            ..ReplayRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(e) = stream.message().await.unwrap() {
        if e.touchpoint.as_ref().map(|t| t.event_id.as_str()) == Some(event_id) {
            n += 1;
        }
    }
    n
}

/// Re-driving is safe to repeat: one dead letter is re-driven once, however
/// often and however concurrently it is asked; an event still unresolvable
/// comes back as one new dead letter per re-drive (never doubling), and
/// replay and the profile count the event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_is_safe_to_repeat_and_never_duplicates_a_touchpoint() {
    let mut cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    let kiosk = unique("pos-kiosk-");
    // Accepted, but its only identifier is a blocked shared device.
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
    let first = letters_of(&mut admin, &event_id, 1).await;
    let first_ref = first[0].r#ref.unwrap();
    assert!(first[0].redriven_at.is_none());

    // Four operators press "re-drive all" at once, nothing changed yet.
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let mut admin = admin.clone();
            tokio::spawn(async move {
                admin
                    .redrive(RedriveRequest {
                        refs: vec![],
                        all: true,
                    })
                    .await
                    .unwrap()
                    .into_inner()
            })
        })
        .collect();
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap());
    }
    // Each call re-drives what waits when it runs: the first dead letter,
    // or (when the copy has already failed again) the newer one; never one
    // dead letter twice.
    let redriven: usize = answers.iter().map(|a| a.redriven as usize).sum();
    assert!((1..=4).contains(&redriven), "{answers:?}");
    for a in &answers {
        assert!(a.redriven <= 1, "{a:?}");
        for s in &a.skipped {
            assert!(s.reason.contains("already re-driven"), "{s:?}");
        }
    }
    // Asking for the first by name again changes nothing, and says why.
    let again = admin
        .redrive(RedriveRequest {
            refs: vec![first_ref],
            all: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.redriven, 0);
    assert_eq!(again.skipped[0].event_id, event_id);
    assert!(again.skipped[0].reason.contains("already re-driven"));

    // Still blocked: each copy failed again, as exactly one new dead letter
    // (a doubling would make more).
    let mut letters = letters_of(&mut admin, &event_id, 1 + redriven).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for round in 0..2 {
        let waiting = letters_of(&mut admin, &event_id, letters.len()).await;
        assert_eq!(waiting.len(), letters.len(), "round {round}: {waiting:?}");
        let (marked, unmarked): (Vec<_>, Vec<_>) =
            waiting.iter().partition(|l| l.redriven_at.is_some());
        assert_eq!(unmarked.len(), 1, "only the newest waits: {waiting:?}");
        assert_eq!(marked.len(), waiting.len() - 1);
        // "All" re-drives only what waits: one copy per call.
        let r = admin
            .redrive(RedriveRequest {
                refs: vec![],
                all: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.redriven, 1, "round {round}: {r:?}");
        assert_eq!(r.skipped.len(), marked.len(), "round {round}: {r:?}");
        letters = letters_of(&mut admin, &event_id, waiting.len() + 1).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(replayed(&cdp, &event_id).await, 1, "replay shows it once");

    // The operator unblocks kiosks and re-drives: the event is folded once.
    let config = format!(
        "{}\n[identity.kinds.device_id]\nblocked_patterns = []\n",
        cdp_e2e::DEFAULT_CONFIG
    );
    cdp.restart_with(&config);
    let mut admin = DeadLetterServiceClient::new(cdp.channel().await);
    let letters = letters_of(&mut admin, &event_id, letters.len()).await;
    let r = admin
        .redrive(RedriveRequest {
            refs: vec![],
            all: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.event_ids, vec![event_id.clone()], "{r:?}");
    assert_eq!(r.skipped.len(), letters.len() - 1, "{r:?}");
    let mut profiles = cdp.profiles().await;
    let p = profile_when(&mut profiles, id("device_id", &kiosk), PATIENCE, |p| {
        metrics(p).events_count >= 1
    })
    .await;
    assert_eq!(metrics(&p).events_count, 1);
    // Re-driving everything once more adds nothing.
    let r = admin
        .redrive(RedriveRequest {
            refs: vec![],
            all: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.redriven, 0, "{r:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let p = profile_when(&mut profiles, id("device_id", &kiosk), PATIENCE, |_| true).await;
    assert_eq!(metrics(&p).events_count, 1);
    assert_eq!(p.recent_timeline.len(), 1);
    assert_eq!(replayed(&cdp, &event_id).await, 1);
}

/// A generation whose rebuild was cancelled early is not served unless the
/// operator forces it; the generation a switch retired is kept for a grace
/// period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_generation_is_not_activated_without_force() {
    use cdp_proto::v1::projection_service_client::ProjectionServiceClient;
    use cdp_proto::v1::{
        ActivateGenerationRequest, DropGenerationRequest, GetRebuildRequest, StartRebuildRequest,
        TrackBatchRequest,
    };
    let cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    for b in 0..8 {
        let touchpoints = views(&format!("shopper{b}"), 500);
        let r = ingest
            .track_batch(TrackBatchRequest { touchpoints })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.accepted, 500);
    }
    let mut projections = ProjectionServiceClient::new(cdp.projection_channel().await);
    let started = projections
        .start_rebuild(StartRebuildRequest {
            activate: false,
            generation: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let generation = started.generation;
    projections
        .cancel_rebuild(GetRebuildRequest { generation })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let status = projections
            .get_rebuild(GetRebuildRequest { generation })
            .await
            .unwrap()
            .into_inner();
        if status.state() != cdp_proto::v1::rebuild_status::State::Running {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rebuild never stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Whatever the rebuild read before it stopped, 1,500 more arrive after.
    for b in 0..3 {
        let touchpoints = views(&format!("late{b}"), 500);
        ingest
            .track_batch(TrackBatchRequest { touchpoints })
            .await
            .unwrap();
    }
    let err = projections
        .activate_generation(ActivateGenerationRequest {
            generation,
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("has not caught up"),
        "{}",
        err.message()
    );
    // Forced, it switches (and says so in the audit).
    let listed = projections
        .activate_generation(ActivateGenerationRequest {
            generation,
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.active, generation);
    // The generation it retired stays for the grace period.
    let err = projections
        .drop_generation(DropGenerationRequest {
            generation: 1,
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("drop_grace_secs"),
        "{}",
        err.message()
    );
}

/// A gRPC client that sends bytes as they are: what a hostile client can
/// put on the wire, which a generated client never would.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf as _;
        let n = buf.remaining();
        Ok(Some(buf.copy_to_bytes(n).to_vec()))
    }
}

async fn raw_call(
    channel: cdp_e2e::Authed,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        Raw,
    )
    .await
    .map(tonic::Response::into_inner)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 4 MB of empty touchpoints (2,000,000 of them) is refused before it is
/// decoded, naming the field, and costs the process about its size; bytes
/// that are not valid protobuf are an invalid argument, not an internal
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_built_to_decode_into_much_more_than_their_size_are_refused() {
    const TRACK_BATCH: &str = "/cdp.v1.IngestService/TrackBatch";
    const TRACK: &str = "/cdp.v1.IngestService/Track";
    let cdp = CdpProcess::start();
    let channel = cdp.ingest_channel().await;
    let bomb: Vec<u8> = [0x0a_u8, 0x00].repeat(2_000_000);
    // Warm up, then measure the process around 8 bombs at once.
    let err = raw_call(channel.clone(), TRACK_BATCH, bomb.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("field touchpoints holds"),
        "{}",
        err.message()
    );
    let pid = cdp.pid("cdp-ingest");
    let before = rss_kib(pid);
    let calls: Vec<_> = (0..8)
        .map(|_| tokio::spawn(raw_call(channel.clone(), TRACK_BATCH, bomb.clone())))
        .collect();
    for c in calls {
        let err = c.await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    }
    let after = rss_kib(pid);
    eprintln!(
        "8 parallel 4 MB bombs: RSS {} -> {} MiB",
        before / 1024,
        after / 1024
    );
    // Before the guard one such request took 700 MiB; now each costs about
    // its buffer.
    assert!(
        after.saturating_sub(before) < 256 * 1024,
        "RSS grew from {before} to {after} KiB"
    );

    // A touchpoint whose event id is not UTF-8.
    let not_utf8 = vec![0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe];
    let err = raw_call(channel.clone(), TRACK, not_utf8)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("UTF-8"), "{}", err.message());
    // A length that runs past the end.
    let err = raw_call(channel, TRACK, vec![0x0a, 0x7f, 0x0a])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}

fn nested(levels: usize) -> serde_json::Value {
    (1..levels).fold(json!({"leaf": 1}), |inner, _| json!({ "a": inner }))
}

/// Nesting is bounded on every surface with the path named, an event at
/// the bound is read back whole by a client (whose decoder stops at 100
/// protobuf levels), and replay keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_nested_too_deep_are_refused_everywhere_and_the_deepest_allowed_reads_back() {
    let cdp = CdpProcess::start();
    let http = reqwest::Client::new();
    let email = format!("{}@example.vn", unique("deep-"));
    // Over HTTP, 100 levels (serde_json would take 127).
    let body = json!({
        "userId": unique("u-"), "event": "Product Viewed",
        "properties": nested(100),
    });
    let resp = http
        .post(format!("{}/v1/track", cdp.http_url()))
        .basic_auth(cdp_e2e::WEB_KEY, Some(""))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("properties") && text.contains("deeper than 20 levels"),
        "{text}"
    );
    // Over gRPC, 21 levels.
    let mut ingest = cdp.ingest().await;
    let too_deep = touchpoint(
        "Product Viewed",
        "web",
        "web",
        vec![id("email", &email)],
        nested(21),
    );
    let r = ingest
        .track(TrackRequest {
            touchpoint: Some(too_deep),
        })
        .await;
    let err = match r {
        Err(e) => e.message().to_owned(),
        Ok(r) => format!("{:?}", r.into_inner()),
    };
    assert!(err.contains("deeper than 20 levels"), "{err}");
    // At the bound: accepted, and read back whole.
    let deepest = touchpoint(
        "Product Viewed",
        "web",
        "web",
        vec![id("email", &email)],
        nested(20),
    );
    let event_id = deepest.event_id.clone();
    ingest
        .track(TrackRequest {
            touchpoint: Some(deepest),
        })
        .await
        .unwrap();
    let mut profiles = cdp.profiles().await;
    let p = profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        metrics(p).events_count == 1
    })
    .await;
    let props =
        cdp_proto::convert::struct_to_json(p.recent_timeline[0].properties.as_ref().unwrap());
    assert_eq!(serde_json::Value::Object(props), nested(20));
    assert_eq!(replayed(&cdp, &event_id).await, 1);
}

/// The smaller holes: a batch too long, a body looked at before its key,
/// a timestamp that is not one, data others can read, reflection for old
/// clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smaller_holes_are_closed() {
    let cdp = CdpProcess::start();
    let http = reqwest::Client::new();
    let base = cdp.http_url();

    // /v1/batch takes at most 500 events.
    let batch: Vec<serde_json::Value> = (0..501)
        .map(|i| json!({"type": "track", "userId": format!("u{i}"), "event": "X"}))
        .collect();
    let resp = http
        .post(format!("{base}/v1/batch"))
        .basic_auth(cdp_e2e::WEB_KEY, Some(""))
        .json(&json!({ "batch": batch }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let text = resp.text().await.unwrap();
    assert!(text.contains("at most 500"), "{text}");

    // A wrong key in the header is refused before the body is looked at
    // (here, not gzip at all).
    let resp = http
        .post(format!("{base}/v1/batch"))
        .basic_auth("not-a-key", Some(""))
        .header("content-encoding", "gzip")
        .body(vec![0u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);

    // A field of the wrong type is named.
    let resp = http
        .post(format!("{base}/v1/track"))
        .basic_auth(cdp_e2e::WEB_KEY, Some(""))
        .json(&json!({"userId": "u", "event": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let text = resp.text().await.unwrap();
    assert!(text.contains("\"event\""), "{text}");

    // Negative nanos are not a Timestamp.
    let mut ingest = cdp.ingest().await;
    let mut t = touchpoint(
        "Product Viewed",
        "web",
        "web",
        vec![id("email", &format!("{}@example.vn", unique("nanos-")))],
        json!({}),
    );
    t.occurred_at = Some(prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: -5,
    });
    let err = ingest
        .track(TrackRequest {
            touchpoint: Some(t),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("occurred_at.nanos"),
        "{}",
        err.message()
    );

    // The data directory is private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mut pending = vec![cdp.data_dir().to_path_buf()];
        let mut files = 0;
        while let Some(dir) = pending.pop() {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", dir.display());
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let meta = e.metadata().unwrap();
                if meta.is_dir() {
                    pending.push(e.path());
                } else {
                    files += 1;
                    let mode = meta.permissions().mode();
                    assert_eq!(mode & 0o077, 0, "{} is {mode:o}", e.path().display());
                }
            }
        }
        assert!(files > 0);
    }

    // Reflection answers clients that speak only v1alpha.
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(cdp.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("{answer:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"cdp.v1.IngestService".to_owned()),
        "{names:?}"
    );
}

/// Half-open connections are closed within the header timeout, at most
/// `max_connections` are held at once, and a real client still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_are_closed_and_the_door_stays_open() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let config = format!(
        "{}\n[limits]\nmax_connections = 16\nheader_timeout_secs = 2\n",
        cdp_e2e::DEFAULT_CONFIG
    );
    let cdp = CdpProcess::start_with(&config);
    let http_addr = cdp.http_url().trim_start_matches("http://").to_owned();
    let started = tokio::time::Instant::now();
    let mut open = Vec::new();
    for i in 0..40 {
        let mut c = tokio::net::TcpStream::connect(&http_addr).await.unwrap();
        // Half of them a partial request, half nothing at all.
        if i % 2 == 0 {
            c.write_all(b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-")
                .await
                .unwrap();
        }
        open.push(c);
    }
    // And a gRPC connection that never says a word.
    let grpc_addr = cdp.url().trim_start_matches("http://").to_owned();
    open.push(tokio::net::TcpStream::connect(&grpc_addr).await.unwrap());
    for mut c in open {
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    // A 408 or an error page, then the close.
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a half-open connection was kept open");
    }
    eprintln!(
        "41 half-open connections closed within {:?}",
        started.elapsed()
    );
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/track", cdp.http_url()))
        .basic_auth(cdp_e2e::WEB_KEY, Some(""))
        .json(&json!({"userId": unique("u-"), "event": "Product Viewed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

/// Over its memory bound a process refuses everything but health, with a
/// reason and a retry hint, instead of growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_its_memory_bound_a_process_sheds_load_with_a_retry_hint() {
    let config = format!(
        "{}\n[limits]\nshed_memory_mib = 1\n",
        cdp_e2e::DEFAULT_CONFIG
    );
    let cdp = CdpProcess::start_with(&config);
    // The monitor measures once a second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/track", cdp.http_url()))
        .basic_auth(cdp_e2e::WEB_KEY, Some(""))
        .json(&json!({"userId": unique("u-"), "event": "Product Viewed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let text = resp.text().await.unwrap();
    assert!(text.contains("limits.shed_memory_mib"), "{text}");
    let mut profiles = cdp.profiles().await;
    let err = profiles
        .get_profile(cdp_proto::v1::GetProfileRequest {
            lookup: Some(cdp_proto::v1::get_profile_request::Lookup::Identifier(id(
                "email",
                "nobody@example.vn",
            ))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.metadata().get("grpc-retry-pushback-ms").is_some(),
        "{err:?}"
    );
    // Health still answers, for the orchestrator and the load balancer.
    let healthz = reqwest::get(format!("{}/healthz", cdp.http_url()))
        .await
        .unwrap();
    assert_eq!(healthz.status().as_u16(), 200);
    let mut health = tonic_health::pb::health_client::HealthClient::new(cdp.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
}
