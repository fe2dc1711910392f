//! `make bench`: figures for the single customer view on the embedded
//! default. Loads N customers through the real gRPC ingest and pipeline,
//! then measures lookup latency (GetProfile by phone, typed in varied forms)
//! and freshness (event acknowledged to visible in GetProfile). Prints a
//! table and writes `target/bench/view.json`. Bounded: it stops by itself.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use cdp_proto::v1::ingest_service_client::IngestServiceClient;
use cdp_proto::v1::profile_service_client::ProfileServiceClient;
use cdp_proto::v1::{self, GetProfileRequest, TrackBatchRequest, TrackRequest};
use cdp_runtime::PlatformConfig;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "Benchmarks the single customer view on the embedded default")]
struct Args {
    /// Customers to load before measuring.
    #[arg(long, default_value_t = 100_000)]
    profiles: usize,
    /// Lookups to time.
    #[arg(long, default_value_t = 5_000)]
    lookups: usize,
    /// Concurrent lookup clients.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Freshness samples (one event each, acknowledged to visible).
    #[arg(long, default_value_t = 300)]
    freshness: usize,
    /// Where to write the JSON figures.
    #[arg(long, default_value = "target/bench/view.json")]
    out: std::path::PathBuf,
}

fn phone(i: usize) -> String {
    format!("09{:08}", 10_000_000 + i)
}

fn touchpoint(i: usize, event_type: &str, props: serde_json::Value) -> v1::Touchpoint {
    v1::Touchpoint {
        event_id: uuid::Uuid::new_v4().to_string(),
        r#type: event_type.into(),
        channel: "store".into(),
        source_id: "bench-pos".into(),
        occurred_at: None,
        properties: props.as_object().map(cdp_proto::convert::json_to_struct),
        personal: Some(v1::PersonalData {
            identifiers: vec![v1::Identifier {
                kind: "phone".into(),
                value: phone(i),
            }],
            traits: None,
        }),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1000.0
}

fn lookup(i: usize) -> GetProfileRequest {
    let d = phone(i);
    // The forms agents type.
    let value = match i % 3 {
        0 => d.clone(),
        1 => format!("+84 {} {} {}", &d[1..4], &d[4..7], &d[7..]),
        _ => format!("84{}", &d[1..]),
    };
    GetProfileRequest {
        lookup: Some(v1::get_profile_request::Lookup::Identifier(
            v1::Identifier {
                kind: "phone".into(),
                value,
            },
        )),
        timeline_limit: 20,
        as_of: None,
    }
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let mut config = PlatformConfig::load(None)?;
    config.data_dir = dir.path().to_path_buf();
    config.server.grpc_addr = "127.0.0.1:0".parse()?;
    config.http.addr = "127.0.0.1:0".parse()?;
    config.pipeline.poll_interval_ms = 50;
    config.telemetry.filter = "warn".into();
    let _telemetry = cdp_runtime::telemetry::init(&config.telemetry, "cdp-bench");
    let cancel = CancellationToken::new();
    let running = cdp::start(&config, cancel.clone()).await?;
    let url = format!("http://{}", running.grpc_addr);
    let mut ingest = IngestServiceClient::connect(url.clone()).await?;

    // Load: one identify and one order per customer, in batches of 500.
    let started = Instant::now();
    for chunk in (0..args.profiles).collect::<Vec<_>>().chunks(250) {
        let mut batch = Vec::with_capacity(chunk.len() * 2);
        for &i in chunk {
            batch.push(touchpoint(i, "Identify", serde_json::json!({})));
            batch.push(touchpoint(
                i,
                "Order Completed",
                serde_json::json!({"order_id": format!("B{i}"), "total": 250000}),
            ));
        }
        let r = ingest
            .track_batch(TrackBatchRequest { touchpoints: batch })
            .await?
            .into_inner();
        anyhow::ensure!(
            r.rejected == 0,
            "load events rejected: {:?}",
            r.results.iter().find(|x| !x.violations.is_empty())
        );
    }
    let ingest_secs = started.elapsed().as_secs_f64();
    loop {
        let lag = cdp_log::lag(
            running.log.as_ref(),
            cdp_identity::GROUP,
            cdp_log::Topic::Touchpoints,
        )
        .await?
            + cdp_log::lag(
                running.log.as_ref(),
                cdp_profile::GROUP,
                cdp_log::Topic::Resolved,
            )
            .await?;
        if lag == 0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "the pipeline did not catch up in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let load_secs = started.elapsed().as_secs_f64();
    let events = args.profiles * 2;

    // Lookup latency under concurrent load.
    let per_client = args.lookups / args.concurrency.max(1);
    let mut tasks = Vec::new();
    for c in 0..args.concurrency.max(1) {
        let mut client = ProfileServiceClient::connect(url.clone()).await?;
        let n = args.profiles;
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(per_client);
            for k in 0..per_client {
                let i = (k * 7919 + c * 104_729) % n;
                let t = Instant::now();
                let p = client.get_profile(lookup(i)).await?.into_inner();
                samples.push(t.elapsed());
                anyhow::ensure!(
                    p.profile
                        .is_some_and(|p| p.metrics.is_some_and(|m| m.orders_count == 1)),
                    "wrong view for customer {i}"
                );
            }
            Ok::<_, anyhow::Error>(samples)
        }));
    }
    let mut lookups = Vec::new();
    let lookup_started = Instant::now();
    for t in tasks {
        lookups.extend(t.await.context("lookup task")??);
    }
    let lookup_rate = lookups.len() as f64 / lookup_started.elapsed().as_secs_f64();
    lookups.sort();

    // Freshness: acknowledged -> visible in GetProfile.
    let mut profiles = ProfileServiceClient::connect(url.clone()).await?;
    let mut freshness = Vec::with_capacity(args.freshness);
    for k in 0..args.freshness {
        let i = (k * 31) % args.profiles;
        let before = profiles
            .get_profile(lookup(i))
            .await?
            .into_inner()
            .profile
            .and_then(|p| p.metrics)
            .map_or(0, |m| m.events_count);
        ingest
            .track(TrackRequest {
                touchpoint: Some(touchpoint(
                    i,
                    "Points Earned",
                    serde_json::json!({"points": 1}),
                )),
            })
            .await?;
        let acked = Instant::now();
        loop {
            let now = profiles
                .get_profile(lookup(i))
                .await?
                .into_inner()
                .profile
                .and_then(|p| p.metrics)
                .map_or(0, |m| m.events_count);
            if now > before {
                freshness.push(acked.elapsed());
                break;
            }
            anyhow::ensure!(
                acked.elapsed() < Duration::from_secs(30),
                "event for customer {i} never became visible"
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    freshness.sort();

    let data_bytes: u64 = ["log/log.redb", "store/store.redb"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.path().join(f)).ok())
        .map(|m| m.len())
        .sum();
    let figures = serde_json::json!({
        "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "mode": "embedded",
        "profiles": args.profiles,
        "load": {"events": events, "ingest_events_per_s": events as f64 / ingest_secs, "pipeline_events_per_s": events as f64 / load_secs},
        "lookup_ms": {"p50": percentile(&lookups, 0.50), "p99": percentile(&lookups, 0.99), "count": lookups.len(), "concurrency": args.concurrency, "per_s": lookup_rate},
        "freshness_ms": {"p50": percentile(&freshness, 0.50), "p99": percentile(&freshness, 0.99), "count": freshness.len()},
        "peak_rss_mib": rss_mib(),
        "bytes_on_disk": data_bytes,
    });
    println!(
        "single customer view, embedded default, {} customers ({} events)",
        args.profiles, events
    );
    println!(
        "  load: ingest {:>10.0} events/s   pipeline {:>10.0} events/s",
        events as f64 / ingest_secs,
        events as f64 / load_secs
    );
    println!(
        "  lookup (GetProfile by phone, {} clients): p50 {:.3} ms  p99 {:.3} ms  ({:.0}/s)",
        args.concurrency,
        percentile(&lookups, 0.5),
        percentile(&lookups, 0.99),
        lookup_rate
    );
    println!(
        "  freshness (ack -> visible): p50 {:.2} ms  p99 {:.2} ms  ({} samples)",
        percentile(&freshness, 0.5),
        percentile(&freshness, 0.99),
        freshness.len()
    );
    println!(
        "  peak RSS {:.0} MiB, {:.1} MiB on disk",
        rss_mib(),
        data_bytes as f64 / 1048576.0
    );
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_vec_pretty(&figures)?)?;
    println!("  written to {}", args.out.display());
    cancel.cancel();
    running.wait().await;
    Ok(())
}
