//! Analysts replay the stream (issue #7): `ReplayService/Replay` with each
//! filter returns exactly the matching events in log order and resumes
//! from a cursor without gaps or repeats; a reader that stops reading does
//! not make the server's memory grow; `cdp replay` writes JSON Lines and
//! resumes; `GetProfile` as of a past instant equals the reference fold of
//! the events up to it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cdp_e2e::{CdpProcess, id, metrics, mobile, profile_when, touchpoint, unique};
use cdp_proto::v1::replay_service_client::ReplayServiceClient;
use cdp_proto::v1::{
    self, GetProfileRequest, ReplayEvent, ReplayRequest, TrackBatchRequest,
    get_profile_request::Lookup, replay_request,
};
use serde_json::json;

const PATIENCE: Duration = Duration::from_secs(30);

/// What was sent: index, customer email, channel, type, event id.
type Sent = (i64, String, &'static str, &'static str, String);

async fn replay_all(
    client: &mut ReplayServiceClient<cdp_e2e::Authed>,
    request: ReplayRequest,
) -> Vec<ReplayEvent> {
    let mut stream = client.replay(request).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        out.push(e);
    }
    out
}

fn ids_of(events: &[ReplayEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| e.touchpoint.as_ref().unwrap().event_id.clone())
        .collect()
}

/// Within each partition, offsets only go up.
fn assert_log_order(events: &[ReplayEvent]) {
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    for e in events {
        if let Some(prev) = last.insert(e.partition, e.offset) {
            assert!(
                e.offset > prev,
                "partition {} went back: {prev} then {}",
                e.partition,
                e.offset
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_filters_exactly_and_resumes_without_gaps_or_repeats() {
    let cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    let (lan, minh) = (
        format!("{}@shop.vn", unique("replay-lan")),
        format!("{}@shop.vn", unique("replay-minh")),
    );
    let lan_phone = mobile();
    let base = cdp_e2e::now_ms() - 10 * 86_400_000;
    // 40 events: two customers, three channels, three types, one a day apart.
    let mut sent: Vec<Sent> = Vec::new();
    for i in 0..40i64 {
        let (who, channel, kind) = (
            if i % 2 == 0 { &lan } else { &minh },
            ["web", "store", "chat"][(i % 3) as usize],
            ["Product Viewed", "Order Completed", "Message Received"][(i % 3) as usize],
        );
        let mut ids = vec![id("email", who)];
        if who == &lan && i == 10 {
            // Lan's phone joins later: a replay by phone still finds all of Lan.
            ids.push(id("phone", &lan_phone));
        }
        let mut t = touchpoint(
            kind,
            channel,
            "replay-test",
            ids,
            json!({"n": i, "total": 1000, "currency": "VND"}),
        );
        t.occurred_at = Some(cdp_proto::convert::millis_to_timestamp(
            base + i * 3_600_000,
        ));
        sent.push((i, who.clone(), channel, kind, t.event_id.clone()));
        ingest
            .track_batch(TrackBatchRequest {
                touchpoints: vec![t],
            })
            .await
            .unwrap();
    }
    let mut profiles = cdp.profiles().await;
    profile_when(&mut profiles, id("email", &lan), PATIENCE, |p| {
        metrics(p).events_count == 20
    })
    .await;
    let mut replay = ReplayServiceClient::new(cdp.projection_channel().await);
    let ours = |events: &[ReplayEvent]| -> Vec<String> {
        let mine: BTreeSet<String> = sent.iter().map(|s| s.4.clone()).collect();
        ids_of(events)
            .into_iter()
            .filter(|e| mine.contains(e))
            .collect()
    };
    let want = |keep: &dyn Fn(&Sent) -> bool| -> BTreeSet<String> {
        sent.iter()
            .filter(|s| keep(s))
            .map(|s| s.4.clone())
            .collect()
    };

    let all = replay_all(
        &mut replay,
        ReplayRequest {
            purpose: "service".into(),
            ..ReplayRequest::default()
        },
    )
    .await;
    assert_log_order(&all);
    let all_ours = ours(&all);
    assert_eq!(all_ours.len(), 40, "every event once");
    assert_eq!(all_ours.iter().collect::<BTreeSet<_>>().len(), 40);

    let by_channel = replay_all(
        &mut replay,
        ReplayRequest {
            purpose: "service".into(),
            channels: vec!["store".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        ours(&by_channel).into_iter().collect::<BTreeSet<_>>(),
        want(&|s| s.2 == "store")
    );
    assert!(
        by_channel
            .iter()
            .all(|e| e.touchpoint.as_ref().unwrap().channel == "store")
    );

    let by_type = replay_all(
        &mut replay,
        ReplayRequest {
            purpose: "service".into(),
            types: vec!["Order Completed".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        ours(&by_type).into_iter().collect::<BTreeSet<_>>(),
        want(&|s| s.3 == "Order Completed")
    );

    let window = ReplayRequest {
        purpose: "service".into(),
        from: Some(cdp_proto::convert::millis_to_timestamp(
            base + 5 * 3_600_000,
        )),
        to: Some(cdp_proto::convert::millis_to_timestamp(
            base + 15 * 3_600_000,
        )),
        ..Default::default()
    };
    let by_time = replay_all(&mut replay, window).await;
    assert_eq!(
        ours(&by_time).into_iter().collect::<BTreeSet<_>>(),
        want(&|s| (5..15).contains(&s.0))
    );

    let by_phone = replay_all(
        &mut replay,
        ReplayRequest {
            purpose: "service".into(),
            customer: Some(replay_request::Customer::Identifier(id(
                "phone", &lan_phone,
            ))),
            with_customers: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        ids_of(&by_phone).into_iter().collect::<BTreeSet<_>>(),
        want(&|s| s.1 == lan)
    );
    let lan_id = &by_phone[0].customer_id;
    assert!(
        by_phone.iter().all(|e| &e.customer_id == lan_id),
        "one customer now"
    );

    // Resume after the 13th event: the rest, no gap, no repeat.
    let first = &all[12];
    let rest = replay_all(
        &mut replay,
        ReplayRequest {
            purpose: "service".into(),
            cursor: first.cursor.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids_of(&rest), ids_of(&all[13..]));

    // A damaged cursor is refused, naming the field.
    let bad = replay
        .replay(ReplayRequest {
            purpose: "service".into(),
            cursor: "v1:1,2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("cursor"), "{}", bad.message());
    let bad = replay
        .replay(ReplayRequest {
            purpose: "service".into(),
            channels: vec!["fax".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(bad.message().contains("channels[0]"), "{}", bad.message());
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_does_not_grow_the_server() {
    let cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    // About 96 MB of events: 6,000 of 16 KB.
    let padding = "x".repeat(16 * 1024);
    // 60 customers of 100 events each.
    let emails: Vec<String> = (0..60)
        .map(|_| format!("{}@shop.vn", unique("slow")))
        .collect();
    for email in &emails {
        let batch = (0..100)
            .map(|_| {
                touchpoint(
                    "Product Viewed",
                    "web",
                    "website",
                    vec![id("email", email)],
                    json!({"note": padding}),
                )
            })
            .collect();
        ingest
            .track_batch(TrackBatchRequest { touchpoints: batch })
            .await
            .unwrap();
    }
    // Let the pipeline finish first (in one process, its work would count).
    let mut profiles = cdp.profiles().await;
    for email in &emails {
        profile_when(&mut profiles, id("email", email), PATIENCE, |p| {
            metrics(p).events_count == 100
        })
        .await;
    }
    let pid = cdp.pid("cdp-projection");
    let mut replay =
        ReplayServiceClient::new(cdp.projection_channel().await).max_decoding_message_size(1 << 20);
    let mut stream = replay
        .replay(ReplayRequest {
            purpose: "service".into(),
            ..ReplayRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.records_total >= 6000);
    let before = rss_kib(pid);
    // Stop reading: the server must stop too, not buffer the rest.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(pid);
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!("server RSS {before} KiB -> {after} KiB while the reader stalled");
    assert!(
        grown_mib < 32,
        "the server buffered {grown_mib} MiB for a stalled reader"
    );
    // And it resumes where the reader is.
    let mut n = 1u64;
    while let Some(_e) = stream.message().await.unwrap() {
        n += 1;
    }
    assert!(n >= 6000, "only {n} events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_profile_as_of_a_past_instant_is_the_fold_of_the_events_up_to_it() {
    let cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    let mut profiles = cdp.profiles().await;
    let email = format!("{}@shop.vn", unique("asof"));
    let order = |total: u64| {
        touchpoint(
            "Order Completed",
            "store",
            "pos-q1",
            vec![id("email", &email)],
            json!({"total": total, "currency": "VND"}),
        )
    };
    let mut instants = Vec::new();
    for (round, total) in [(1u64, 100_000u64), (2, 250_000), (3, 400_000)] {
        ingest
            .track_batch(TrackBatchRequest {
                touchpoints: vec![order(total)],
            })
            .await
            .unwrap();
        profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
            metrics(p).orders_count == round
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        instants.push(cdp_e2e::now_ms());
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let as_of = |at: i64| GetProfileRequest {
        lookup: Some(Lookup::Identifier(id("email", &email))),
        timeline_limit: 50,
        as_of: Some(cdp_proto::convert::millis_to_timestamp(at)),
    };
    // Ask out of order: later instants reuse the snapshots of earlier ones.
    for (i, at) in [
        (1usize, instants[1]),
        (0, instants[0]),
        (2, instants[2]),
        (0, instants[0]),
    ] {
        let p = profiles
            .get_profile(as_of(at))
            .await
            .unwrap()
            .into_inner()
            .profile
            .unwrap();
        let m = metrics(&p);
        assert_eq!(m.orders_count, i as u64 + 1, "as of instant {i}");
        let spent: u64 = [100_000u64, 250_000, 400_000][..=i].iter().sum();
        let spend: Vec<(String, String)> = m
            .spend
            .iter()
            .map(|s| (s.currency.clone(), s.total.clone()))
            .collect();
        assert_eq!(
            spend,
            vec![("VND".to_string(), spent.to_string())],
            "as of instant {i}"
        );
        assert_eq!(p.recent_timeline.len(), i + 1);
    }
    let before = profiles
        .get_profile(as_of(instants[0] - 60_000))
        .await
        .unwrap_err();
    assert_eq!(before.code(), tonic::Code::NotFound, "{before}");
}

/// Sends `n` product views (properties `{"n": i}`) of one new customer and
/// waits until they are folded (the customer filter needs the customer
/// resolved); returns the customer's email.
async fn one_customer_viewing(cdp: &CdpProcess, prefix: &str, n: u64) -> String {
    let mut ingest = cdp.ingest().await;
    let email = format!("{}@shop.vn", unique(prefix));
    let batch: Vec<v1::Touchpoint> = (0..n)
        .map(|i| {
            touchpoint(
                "Product Viewed",
                "web",
                "website",
                vec![id("email", &email)],
                json!({"n": i}),
            )
        })
        .collect();
    ingest
        .track_batch(TrackBatchRequest { touchpoints: batch })
        .await
        .unwrap();
    let mut profiles = cdp.profiles().await;
    profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        metrics(p).events_count == n
    })
    .await;
    email
}

/// `cdp replay` writes every matching event once as a JSON line, and after
/// an interruption `--resume` cuts what was written after the last
/// checkpoint and continues from its cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_cli_writes_json_lines_and_resumes() {
    let cdp = CdpProcess::start();
    let email = one_customer_viewing(&cdp, "cli", 30).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    let endpoint = format!("http://{}", cdp.projection_addr());
    let run = |extra: &[&str]| {
        let status = std::process::Command::new(cdp_e2e::cdp_binary())
            .env("CDP_TOKEN", cdp_e2e::ADMIN_KEY)
            .args([
                "replay",
                "--purpose",
                "service",
                "--endpoint",
                &endpoint,
                "--out",
            ])
            .arg(&out)
            .args([
                "--identifier",
                &format!("email={email}"),
                "--checkpoint-every",
                "10",
            ])
            .args(extra)
            .status()
            .unwrap();
        assert!(status.success(), "cdp replay {extra:?} failed");
    };
    run(&[]);
    let full = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<serde_json::Value> = full
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 30);
    let ns: BTreeSet<i64> = lines
        .iter()
        .map(|l| l["properties"]["n"].as_f64().unwrap() as i64)
        .collect();
    assert_eq!(ns, (0..30).collect());
    // An interruption after the second checkpoint, with half a line written since.
    let twenty: usize = full.lines().take(20).map(|l| l.len() + 1).sum();
    let cursor_of_20th = {
        let mut replay = ReplayServiceClient::new(cdp.projection_channel().await);
        let events = replay_all(
            &mut replay,
            ReplayRequest {
                purpose: "service".into(),
                customer: Some(replay_request::Customer::Identifier(id("email", &email))),
                ..Default::default()
            },
        )
        .await;
        events[19].cursor.clone()
    };
    std::fs::write(&out, format!("{}{{\"event_id\": \"half", &full[..twenty])).unwrap();
    let checkpoint = json!({"cursor": cursor_of_20th, "bytes": twenty, "events": 20});
    std::fs::write(
        dir.path().join("events.jsonl.cursor"),
        checkpoint.to_string(),
    )
    .unwrap();
    run(&["--resume"]);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        full,
        "resume wrote a different file"
    );
}

/// `cdp replay --format parquet` writes a dataset of Parquet parts that a
/// Parquet reader reads back as exactly the replayed events, with typed
/// columns; `--resume` after an interruption adds no gap and no repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_cli_writes_parquet_and_resumes() {
    use arrow_array::{Array as _, StringArray, TimestampMillisecondArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let cdp = CdpProcess::start();
    let email = one_customer_viewing(&cdp, "pq", 25).await;
    let expected = {
        let mut replay = ReplayServiceClient::new(cdp.projection_channel().await);
        replay_all(
            &mut replay,
            ReplayRequest {
                purpose: "service".into(),
                customer: Some(replay_request::Customer::Identifier(id("email", &email))),
                ..Default::default()
            },
        )
        .await
    };
    assert_eq!(expected.len(), 25);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events");
    let endpoint = format!("http://{}", cdp.projection_addr());
    let run = |extra: &[&str]| {
        let status = std::process::Command::new(cdp_e2e::cdp_binary())
            .env("CDP_TOKEN", cdp_e2e::ADMIN_KEY)
            .args([
                "replay",
                "--purpose",
                "service",
                "--endpoint",
                &endpoint,
                "--format",
                "parquet",
                "--out",
            ])
            .arg(&out)
            .args([
                "--identifier",
                &format!("email={email}"),
                "--part-rows",
                "10",
            ])
            .args(extra)
            .status()
            .unwrap();
        assert!(status.success(), "cdp replay {extra:?} failed");
    };
    let read = || {
        let mut parts: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        parts.sort();
        let mut rows = Vec::new();
        for part in parts {
            let reader =
                ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&part).unwrap())
                    .unwrap()
                    .build()
                    .unwrap();
            for b in reader {
                let b = b.unwrap();
                let col = |name: &str| b.column(b.schema().index_of(name).unwrap()).clone();
                let ids = col("event_id");
                let ids = ids.as_any().downcast_ref::<StringArray>().unwrap();
                let at = col("occurred_at");
                let at = at
                    .as_any()
                    .downcast_ref::<TimestampMillisecondArray>()
                    .unwrap();
                let props = col("properties");
                let props = props.as_any().downcast_ref::<StringArray>().unwrap();
                for i in 0..b.num_rows() {
                    assert!(!at.is_null(i));
                    rows.push((
                        ids.value(i).to_owned(),
                        at.value(i),
                        serde_json::from_str::<serde_json::Value>(props.value(i)).unwrap(),
                    ));
                }
            }
        }
        rows
    };
    run(&[]);
    let rows = read();
    let want: Vec<(String, i64)> = expected
        .iter()
        .map(|e| {
            let t = e.touchpoint.as_ref().unwrap();
            (
                t.event_id.clone(),
                cdp_proto::convert::timestamp_to_millis(t.occurred_at.as_ref().unwrap()),
            )
        })
        .collect();
    let got: Vec<(String, i64)> = rows.iter().map(|r| (r.0.clone(), r.1)).collect();
    assert_eq!(got, want, "the dataset holds the replay, in order");
    let ns: BTreeSet<i64> = rows
        .iter()
        .map(|r| r.2["n"].as_f64().unwrap() as i64)
        .collect();
    assert_eq!(ns, (0..25).collect());
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        3,
        "parts of 10, 10 and 5"
    );

    // Interrupted after the first part: the second is half written.
    std::fs::remove_file(out.join("part-00002.parquet")).unwrap();
    std::fs::write(out.join("part-00001.parquet"), b"half a part").unwrap();
    let checkpoint = json!({"cursor": expected[9].cursor, "parts": 1, "events": 10});
    std::fs::write(dir.path().join("events.cursor"), checkpoint.to_string()).unwrap();
    run(&["--resume"]);
    let again: Vec<(String, i64)> = read().iter().map(|r| (r.0.clone(), r.1)).collect();
    assert_eq!(again, want, "resume left a gap or a repeat");
}
