//! `make bench`: how fast and how lean the platform is, measured on the real
//! binaries (started as `make test` starts them) over gRPC and HTTP.
//!
//! For each back end and each population size it loads an omnichannel
//! journey per customer (fixed seed), then measures: durable ingest
//! (TrackBatch and TrackStream, batches of 500, plus the Segment HTTP API),
//! how long the pipeline takes to fold everything (identity decisions/s),
//! lookup latency under concurrent load, freshness (acknowledged to visible
//! in GetProfile) at a fixed offered load, replay and rebuild throughput,
//! peak memory of every process and bytes on disk. A naive design (one
//! durable read-modify-write transaction per event) runs on the same events
//! for comparison. Prints a table per run and writes
//! `target/bench/<backend>-<customers>.json`. Bounded: every phase stops by
//! itself. With `--audiences`, 20 computed traits and 50 segments are
//! defined before the load, membership freshness is measured too, and the
//! run is checked against the targets of issue #19 (`audiences.rs`); it
//! writes `target/bench/<backend>-<customers>-audiences.json`.

mod audiences;
mod identity;
mod naive;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use cdp_domain::journey::{self, JourneyConfig};
use cdp_e2e::Authed;
use cdp_e2e::{Backend, CdpProcess, id, to_api};
use cdp_proto::v1::ingest_service_client::IngestServiceClient;
use cdp_proto::v1::profile_service_client::ProfileServiceClient;
use cdp_proto::v1::projection_service_client::ProjectionServiceClient;
use cdp_proto::v1::rebuild_status::State;
use cdp_proto::v1::replay_service_client::ReplayServiceClient;
use cdp_proto::v1::{
    GetPipelineStatusRequest, GetProfileRequest, GetRebuildRequest, Identifier, ReplayRequest,
    StartRebuildRequest, TrackBatchRequest, TrackRequest, get_profile_request::Lookup,
};
use clap::Parser;
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[derive(Parser)]
#[command(about = "Benchmarks the CDP on the real binaries")]
struct Args {
    /// embedded (one `cdp dev` process) or distributed (the five services
    /// on Kafka and Cassandra, which must be running: `make infra-up`).
    #[arg(long, default_value = "embedded")]
    backend: String,
    /// Population sizes to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    customers: Vec<usize>,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Events per ingest batch.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Concurrent ingest connections (half unary TrackBatch, half TrackStream).
    #[arg(long, default_value_t = 4)]
    ingest_clients: usize,
    /// Lookups to time, and concurrent lookup clients.
    #[arg(long, default_value_t = 5_000)]
    lookups: usize,
    #[arg(long, default_value_t = 4)]
    lookup_clients: usize,
    /// Freshness samples, and the load offered meanwhile (events/s).
    #[arg(long, default_value_t = 200)]
    freshness: usize,
    #[arg(long, default_value_t = 5_000)]
    offered: usize,
    /// Events sent through the Segment HTTP API (in batches of 100).
    #[arg(long, default_value_t = 20_000)]
    http_events: usize,
    /// Events the naive design folds (it is slow: one fsync per event).
    #[arg(long, default_value_t = 5_000)]
    naive_events: usize,
    /// Skip the rebuild (it reads the whole log again).
    #[arg(long)]
    no_rebuild: bool,
    /// Customers erased one after another (`PrivacyService/Erase`), timed
    /// from request to completion.
    #[arg(long, default_value_t = 10)]
    erasures: usize,
    /// Instead of the figures: identity accuracy scored through the running
    /// service on the population of `make bench-identity`, field traps
    /// included (`--customers` people, the first size given).
    #[arg(long)]
    identity: bool,
    /// With --identity: people per field trap, as a share of the customers.
    #[arg(long, default_value_t = 0.03)]
    field_traps: f64,
    /// With --identity: send the whole population at once (a backlog, as an
    /// import of history) instead of as a live stream.
    #[arg(long)]
    backlog: bool,
    /// Define 20 computed traits and 50 segments (and a probe of each)
    /// before the load, wait for their backfill, add the membership
    /// freshness phase (`--freshness` samples on customers of their own),
    /// and check the targets against the run without --audiences at the
    /// same population in --out-dir, if there is one.
    #[arg(long)]
    audiences: bool,
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
}

/// Tuned for throughput, otherwise the defaults users get.
const CONFIG: &str = r#"
[log]
partitions = 4
[pipeline]
identity_workers = 1
profile_workers = 1
batch_size = 2000
poll_interval_ms = 20
# The bench sends its whole population, then times the pipeline catching
# up: at 1M customers (2.5M events) ingest runs millions of events ahead,
# and the default bound (2,000,000) would shed the load part way.
[limits]
shed_lag = 100000000
[[sources]]
id = "website"
channel = "web"
write_key = "bench-web-key"
"#;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1000.0
}

/// Peak resident memory of a process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        // Blocks allocated, not the apparent length: redb grows its files
        // ahead of the data.
        use std::os::unix::fs::MetadataExt as _;
        return meta.blocks() * 512;
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| dir_bytes(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

/// Bytes under `dir` in entries whose name starts with `prefix`.
fn prefixed_bytes(dir: &std::path::Path, prefix: &str) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| dir_bytes(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

struct Population {
    /// One email per customer (the identify event links it to the rest).
    emails: Vec<String>,
    batches: Vec<TrackBatchRequest>,
    events: usize,
    raw_sample: Vec<cdp_domain::RawTouchpoint>,
}

/// A journey per customer: 1 to 4 events (an identify event linking every
/// identifier, and views, carts, orders, tickets, chats, points...), in
/// chunks of 10,000 customers with their own namespace, shuffled within a
/// chunk as a live stream would be.
fn population(customers: usize, seed: u64, batch: usize, naive: usize) -> Population {
    let now = cdp_e2e::now_ms();
    let mut emails = Vec::with_capacity(customers);
    let mut batches = Vec::new();
    let mut events = 0;
    let mut raw_sample = Vec::new();
    let mut chunk = 0u64;
    while emails.len() < customers {
        let n = (customers - emails.len()).min(10_000);
        let config = JourneyConfig {
            customers: n,
            min_events: 1,
            max_events: 4,
            namespace: format!("b{seed}x{chunk}"),
            start: now - 30 * 86_400_000,
            span_ms: 29 * 86_400_000,
        };
        let (people, generated) = journey::generate(seed.wrapping_add(chunk), &config);
        emails.extend(people.iter().map(|p| p.email.clone()));
        events += generated.len();
        for g in generated.chunks(batch) {
            batches.push(TrackBatchRequest {
                touchpoints: g.iter().map(|e| to_api(&e.event)).collect(),
            });
        }
        if raw_sample.len() < naive {
            raw_sample.extend(
                generated
                    .iter()
                    .take(naive - raw_sample.len())
                    .map(|g| g.event.clone()),
            );
        }
        chunk += 1;
    }
    Population {
        emails,
        batches,
        events,
        raw_sample,
    }
}

fn lookup(email: &str) -> GetProfileRequest {
    GetProfileRequest {
        lookup: Some(Lookup::Identifier(id("email", email))),
        timeline_limit: 20,
        as_of: None,
    }
}

async fn events_count(profiles: &mut ProfileServiceClient<Authed>, who: Identifier) -> u64 {
    match profiles
        .get_profile(GetProfileRequest {
            lookup: Some(Lookup::Identifier(who)),
            timeline_limit: 0,
            as_of: None,
        })
        .await
    {
        Ok(r) => r
            .into_inner()
            .profile
            .and_then(|p| p.metrics)
            .map_or(0, |m| m.events_count),
        Err(_) => 0,
    }
}

/// Sends every batch over `clients` connections, half of them unary
/// TrackBatch calls, half one TrackStream each. Returns events/s.
async fn ingest_all(
    cdp: &CdpProcess,
    batches: Vec<TrackBatchRequest>,
    clients: usize,
    events: usize,
) -> anyhow::Result<f64> {
    let queue = Arc::new(Mutex::new(batches.into_iter()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients.max(1) {
        let mut client = cdp.ingest().await;
        let queue = Arc::clone(&queue);
        tasks.push(tokio::spawn(async move {
            if c % 2 == 0 {
                loop {
                    let Some(b) = queue.lock().await.next() else {
                        return Ok::<_, anyhow::Error>(());
                    };
                    let r = client.track_batch(b).await?.into_inner();
                    ensure!(r.rejected == 0, "events rejected: {:?}", r.results.first());
                }
            } else {
                // A stream fed from the queue; a few batches in flight.
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                let feeder = {
                    let queue = Arc::clone(&queue);
                    tokio::spawn(async move {
                        loop {
                            let next = queue.lock().await.next();
                            let Some(b) = next else { return };
                            if tx.send(b).await.is_err() {
                                return;
                            }
                        }
                    })
                };
                let mut responses = client
                    .track_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                while let Some(r) = responses.message().await? {
                    ensure!(r.rejected == 0, "events rejected: {:?}", r.results.first());
                }
                feeder.await?;
                Ok(())
            }
        }));
    }
    for t in tasks {
        t.await.context("ingest task")??;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// Segment-spec `track` calls through `/v1/batch`, 100 per request.
async fn http_ingest(cdp: &CdpProcess, events: usize, seed: u64) -> anyhow::Result<f64> {
    let client = reqwest::Client::new();
    let url = format!("{}/v1/batch", cdp.http_url());
    let started = Instant::now();
    let mut sent = 0;
    while sent < events {
        let n = (events - sent).min(100);
        let batch: Vec<Value> = (sent..sent + n)
            .map(|i| {
                json!({
                    "type": "track",
                    "event": "Product Viewed",
                    "anonymousId": format!("http-{seed}-{}", i % 5_000),
                    "messageId": uuid::Uuid::new_v4().to_string(),
                    "properties": {"product_id": format!("SKU-{}", i % 300), "price": 250000},
                })
            })
            .collect();
        let r = client
            .post(&url)
            .basic_auth("bench-web-key", Some(""))
            .json(&json!({ "batch": batch }))
            .send()
            .await?;
        ensure!(r.status().is_success(), "HTTP batch: {}", r.status());
        sent += n;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// Waits until the pipeline has folded everything; returns the seconds
/// until identity caught up and until profiles did.
async fn drain(
    projections: &mut ProjectionServiceClient<Authed>,
    since: Instant,
    limit: Duration,
) -> anyhow::Result<(f64, f64)> {
    let mut identity_done = None;
    loop {
        let s = projections
            .get_pipeline_status(GetPipelineStatusRequest {})
            .await?
            .into_inner();
        if s.identity_lag == 0 && identity_done.is_none() {
            identity_done = Some(since.elapsed().as_secs_f64());
        }
        if s.identity_lag == 0 && s.profile_lag == 0 {
            let all = since.elapsed().as_secs_f64();
            return Ok((identity_done.unwrap_or(all), all));
        }
        if since.elapsed() > limit {
            bail!("the pipeline did not catch up in {limit:?}: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn lookups(
    cdp: &CdpProcess,
    emails: &Arc<Vec<String>>,
    args: &Args,
) -> anyhow::Result<Value> {
    let per_client = args.lookups / args.lookup_clients.max(1);
    let mut tasks = Vec::new();
    let started = Instant::now();
    for c in 0..args.lookup_clients.max(1) {
        // As an agent: authenticated, scoped, masked and audited, as CSKH reads.
        let mut client = ProfileServiceClient::new(
            CdpProcess::connect_as(cdp.query_addr(), Some(cdp_e2e::AGENT_KEY)).await,
        );
        let emails = Arc::clone(emails);
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(per_client);
            for k in 0..per_client {
                let i = (k * 7919 + c * 104_729) % emails.len();
                let t = Instant::now();
                let p = client.get_profile(lookup(&emails[i])).await?.into_inner();
                samples.push(t.elapsed());
                ensure!(p.profile.is_some(), "no view for customer {i}");
            }
            Ok::<_, anyhow::Error>(samples)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.context("lookup task")??);
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort();
    Ok(json!({
        "clients": args.lookup_clients, "count": all.len(), "per_s": rate,
        "p50_ms": percentile(&all, 0.5), "p99_ms": percentile(&all, 0.99),
    }))
}

/// A background sender offering `offered` events/s (product views, every
/// 20 ms) to the customers after the first `skip`, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<f64>,
}

impl Load {
    async fn start(
        cdp: &CdpProcess,
        emails: &Arc<Vec<String>>,
        skip: usize,
        offered: usize,
    ) -> Load {
        let mut ingest: IngestServiceClient<Authed> = cdp.ingest().await;
        let emails = Arc::clone(emails);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let per_tick = (offered / 50).max(1); // every 20 ms
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut sent = 0usize;
            let started = Instant::now();
            let mut k = 0usize;
            while !stopped.load(Ordering::SeqCst) {
                tick.tick().await;
                let touchpoints = (0..per_tick)
                    .map(|_| {
                        k += 1;
                        let who = skip + (k * 7919) % (emails.len().saturating_sub(skip)).max(1);
                        cdp_e2e::touchpoint(
                            "Product Viewed",
                            "web",
                            "website",
                            vec![id("email", &emails[who % emails.len()])],
                            json!({"product_id": "SKU-AO-01"}),
                        )
                    })
                    .collect();
                if ingest
                    .track_batch(TrackBatchRequest { touchpoints })
                    .await
                    .is_ok()
                {
                    sent += per_tick;
                }
            }
            sent as f64 / started.elapsed().as_secs_f64()
        });
        Load { stop, task }
    }

    /// Stops the sender; returns the events/s it got acknowledged.
    async fn stop(self) -> anyhow::Result<f64> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.context("background load")
    }
}

/// Freshness under a fixed offered load: a background sender offers
/// `offered` events/s to other customers while each sample sends one event
/// and polls GetProfile until it shows.
async fn freshness(
    cdp: &CdpProcess,
    emails: &Arc<Vec<String>>,
    args: &Args,
) -> anyhow::Result<Value> {
    let reserved = args.freshness.min(emails.len() / 2).max(1);
    let load = Load::start(cdp, emails, reserved, args.offered).await;
    let mut ingest = cdp.ingest().await;
    let mut profiles = cdp.profiles().await;
    let mut samples = Vec::with_capacity(reserved);
    let mut missed = 0;
    // Bounded: at most a minute of sampling.
    let phase = Instant::now();
    for who in emails.iter().take(reserved) {
        if phase.elapsed() > Duration::from_secs(60) {
            break;
        }
        let before = events_count(&mut profiles, id("email", who)).await;
        ingest
            .track(TrackRequest {
                touchpoint: Some(cdp_e2e::touchpoint(
                    "Points Earned",
                    "store",
                    "loyalty",
                    vec![id("email", who)],
                    json!({"points": 1}),
                )),
            })
            .await?;
        let acked = Instant::now();
        loop {
            if events_count(&mut profiles, id("email", who)).await > before {
                samples.push(acked.elapsed());
                break;
            }
            if acked.elapsed() > Duration::from_secs(10) {
                missed += 1;
                break;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    let achieved = load.stop().await?;
    samples.sort();
    Ok(json!({
        "offered_per_s": args.offered, "achieved_per_s": achieved, "samples": samples.len(),
        "not_visible_in_10s": missed,
        "p50_ms": percentile(&samples, 0.5), "p95_ms": percentile(&samples, 0.95),
        "p99_ms": percentile(&samples, 0.99),
    }))
}

async fn replay(cdp: &CdpProcess) -> anyhow::Result<Value> {
    let mut client = ReplayServiceClient::new(cdp.projection_channel().await)
        .max_decoding_message_size(16 << 20);
    let started = Instant::now();
    let mut stream = client
        .replay(ReplayRequest {
            purpose: "service".into(),
            ..ReplayRequest::default()
        })
        .await?
        .into_inner();
    let mut n = 0u64;
    while stream.message().await?.is_some() {
        n += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(json!({"events": n, "seconds": secs, "events_per_s": n as f64 / secs}))
}

/// Erases `n` customers one after another, by email, and times each from
/// request to completion (which includes `privacy.key_cache_secs`, the
/// wait for every process to drop the erased keys).
async fn erasures(cdp: &CdpProcess, emails: &[String], n: usize) -> anyhow::Result<Value> {
    use cdp_proto::v1::privacy_service_client::PrivacyServiceClient;
    let mut client = PrivacyServiceClient::new(
        CdpProcess::connect_as(cdp.query_addr(), Some(cdp_e2e::PRIVACY_KEY)).await,
    );
    let mut took = Vec::new();
    let mut work = Vec::new();
    // Spread over the population, away from the lookup and freshness samples.
    let step = (emails.len() / n.max(1)).max(1);
    for email in emails.iter().rev().step_by(step).take(n) {
        let started = Instant::now();
        let done = client
            .erase(cdp_proto::v1::EraseRequest {
                lookup: Some(cdp_proto::v1::erase_request::Lookup::Identifier(id(
                    "email", email,
                ))),
                reason: "bench".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        took.push(started.elapsed());
        ensure!(
            done.state() == cdp_proto::v1::ErasureState::Complete,
            "erasure of {email} ended {done:?}"
        );
        work.push(done);
    }
    took.sort();
    let events: u64 = work.iter().map(|e| u64::from(e.events)).sum();
    Ok(json!({
        "erased": took.len(), "events_made_anonymous": events,
        "p50_ms": percentile(&took, 0.5), "max_ms": percentile(&took, 1.0),
    }))
}

async fn rebuild(projections: &mut ProjectionServiceClient<Authed>) -> anyhow::Result<Value> {
    let started = Instant::now();
    let s = projections
        .start_rebuild(StartRebuildRequest {
            activate: true,
            generation: 0,
        })
        .await?
        .into_inner();
    loop {
        let status = projections
            .get_rebuild(GetRebuildRequest {
                generation: s.generation,
            })
            .await?
            .into_inner();
        match status.state() {
            State::Activated => {
                let secs = started.elapsed().as_secs_f64();
                return Ok(json!({
                    "generation": status.generation, "events": status.records_done,
                    "seconds": secs, "events_per_s": status.records_done as f64 / secs,
                }));
            }
            State::Running => {}
            other => bail!("the rebuild ended {other:?}: {}", status.error),
        }
        ensure!(
            started.elapsed() < Duration::from_secs(3600),
            "the rebuild did not finish in an hour"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn run_one(args: &Args, backend: Backend, customers: usize) -> anyhow::Result<Value> {
    eprintln!("[bench] {backend:?}, {customers} customers: generating events");
    let pop = population(customers, args.seed, args.batch, args.naive_events);
    let events = pop.events;
    let emails = Arc::new(pop.emails);
    let cdp = CdpProcess::start_on(backend, CONFIG);
    let mut projections = ProjectionServiceClient::new(cdp.projection_channel().await);
    let defined = if args.audiences {
        eprintln!("[bench] defining {}", audiences::label());
        Some(audiences::define(&cdp, Duration::from_secs(300)).await?)
    } else {
        None
    };

    eprintln!("[bench] ingesting {events} events");
    let started = Instant::now();
    let ingest_rate = ingest_all(&cdp, pop.batches, args.ingest_clients, events).await?;
    let (identity_secs, pipeline_secs) =
        drain(&mut projections, started, Duration::from_secs(4 * 3600)).await?;
    // On disk once the load is folded (before the other phases add to it).
    let (log_bytes, store_bytes) = match backend {
        Backend::Embedded => (
            dir_bytes(&cdp.data_dir().join("log")),
            dir_bytes(&cdp.data_dir().join("store")),
        ),
        Backend::Distributed => {
            let run = std::env::var("CDP_INFRA_RUN").map_or_else(
                |_| {
                    std::env::var("HOME")
                        .map(|h| PathBuf::from(h).join(".cache/cdp-infra/run"))
                        .unwrap_or_default()
                },
                PathBuf::from,
            );
            (
                prefixed_bytes(&run.join("kafka/data"), &format!("{}.", cdp.namespace)),
                // SSTables flushed so far (memtables are not on disk yet).
                prefixed_bytes(&run.join("cassandra/data/data"), &cdp.namespace),
            )
        }
    };
    let http_rate = http_ingest(&cdp, args.http_events, args.seed).await?;
    drain(&mut projections, Instant::now(), Duration::from_secs(3600)).await?;

    eprintln!("[bench] lookups, freshness, replay");
    let lookup = lookups(&cdp, &emails, args).await?;
    let fresh = freshness(&cdp, &emails, args).await?;
    let membership = if defined.is_some() {
        eprintln!("[bench] membership freshness");
        drain(&mut projections, Instant::now(), Duration::from_secs(3600)).await?;
        // Customers of their own, after those of profile freshness.
        let first = args.freshness.min(emails.len() / 2).max(1);
        let count = args
            .freshness
            .min(emails.len().saturating_sub(first) / 2)
            .max(1);
        Some(audiences::membership_freshness(&cdp, &emails, first, count, args.offered).await?)
    } else {
        None
    };
    drain(&mut projections, Instant::now(), Duration::from_secs(3600)).await?;
    let replayed = replay(&cdp).await?;
    eprintln!("[bench] erasures");
    let erased = erasures(&cdp, &emails, args.erasures).await?;

    let rebuilt = if args.no_rebuild {
        Value::Null
    } else {
        eprintln!("[bench] rebuilding the projections");
        rebuild(&mut projections).await?
    };
    let services: &[&str] = match backend {
        Backend::Embedded => &["cdp"],
        Backend::Distributed => &["cdp-ingest", "cdp-identity", "cdp-profile", "cdp-query"],
    };
    let rss: serde_json::Map<String, Value> = services
        .iter()
        .map(|s| ((*s).to_owned(), json!(peak_rss_mib(cdp.pid(s)))))
        .collect();

    eprintln!(
        "[bench] the naive design on {} events",
        pop.raw_sample.len()
    );
    let naive_dir = tempfile::tempdir()?;
    let naive_rate = naive::run(naive_dir.path(), &pop.raw_sample)?;
    let pipeline_rate = events as f64 / pipeline_secs;

    let mut r = json!({
        "backend": format!("{backend:?}").to_lowercase(),
        "customers": customers,
        "events": events,
        "machine": {
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        },
        "ingest": {
            "grpc_events_per_s": ingest_rate, "batch": args.batch, "clients": args.ingest_clients,
            "http_events_per_s": http_rate,
        },
        "pipeline": {
            "events_per_s": pipeline_rate,
            "identity_decisions_per_s": events as f64 / identity_secs,
            "seconds": pipeline_secs,
        },
        "lookup": lookup,
        "freshness": fresh,
        "replay": replayed,
        "erasure": erased,
        "rebuild": rebuilt,
        "peak_rss_mib": rss,
        "disk": {
            "log_bytes": log_bytes, "store_bytes": store_bytes,
            "log_bytes_per_event": log_bytes as f64 / events as f64,
            "store_bytes_per_profile": store_bytes as f64 / customers as f64,
        },
        "naive": {
            "events_per_s": naive_rate,
            "ingest_ratio": ingest_rate / naive_rate,
            "pipeline_ratio": pipeline_rate / naive_rate,
        },
    });
    if let (Some(mut a), Some(m)) = (defined, membership) {
        a["membership_freshness"] = m;
        r["audiences"] = a;
        let baseline = args
            .out_dir
            .join(format!("{}-{customers}.json", args.backend));
        r["audiences"]["targets"] = audiences::targets(&r, &baseline);
    }
    Ok(r)
}

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_f64().unwrap_or(f64::NAN)
}

fn print(r: &Value) {
    let defined = r["audiences"]["label"]
        .as_str()
        .map_or_else(String::new, |l| format!(", {l}"));
    println!(
        "\n== {} back end, {} customers, {} events{defined} ==",
        r["backend"].as_str().unwrap_or("?"),
        r["customers"],
        r["events"]
    );
    let rows = [
        (
            "durable ingest, gRPC (events/s)",
            f(r, &["ingest", "grpc_events_per_s"]),
        ),
        (
            "durable ingest, HTTP (events/s)",
            f(r, &["ingest", "http_events_per_s"]),
        ),
        (
            "pipeline, ingest to folded (events/s)",
            f(r, &["pipeline", "events_per_s"]),
        ),
        (
            "identity decisions/s",
            f(r, &["pipeline", "identity_decisions_per_s"]),
        ),
        ("lookup p50 (ms)", f(r, &["lookup", "p50_ms"])),
        ("lookup p99 (ms)", f(r, &["lookup", "p99_ms"])),
        ("lookups/s", f(r, &["lookup", "per_s"])),
        ("freshness p50 (ms)", f(r, &["freshness", "p50_ms"])),
        ("freshness p95 (ms)", f(r, &["freshness", "p95_ms"])),
        ("freshness p99 (ms)", f(r, &["freshness", "p99_ms"])),
        (
            "  offered load achieved (events/s)",
            f(r, &["freshness", "achieved_per_s"]),
        ),
        ("replay (events/s)", f(r, &["replay", "events_per_s"])),
        (
            "erasure, request to complete, p50 (ms)",
            f(r, &["erasure", "p50_ms"]),
        ),
        ("erasure, max (ms)", f(r, &["erasure", "max_ms"])),
        ("rebuild (events/s)", f(r, &["rebuild", "events_per_s"])),
        ("rebuild (s)", f(r, &["rebuild", "seconds"])),
        (
            "log bytes per event",
            f(r, &["disk", "log_bytes_per_event"]),
        ),
        (
            "store bytes per profile",
            f(r, &["disk", "store_bytes_per_profile"]),
        ),
        ("naive design (events/s)", f(r, &["naive", "events_per_s"])),
        ("  ingest / naive", f(r, &["naive", "ingest_ratio"])),
        ("  pipeline / naive", f(r, &["naive", "pipeline_ratio"])),
    ];
    for (name, value) in rows {
        println!("  {name:<40} {value:>12.2}");
    }
    if let Some(rss) = r["peak_rss_mib"].as_object() {
        for (process, mib) in rss {
            println!(
                "  {:<40} {:>12.0}",
                format!("peak RSS {process} (MiB)"),
                mib.as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    if r["audiences"].is_object() {
        audiences::print(r);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let backend = match args.backend.as_str() {
        "embedded" => Backend::Embedded,
        "distributed" => Backend::Distributed,
        other => bail!("--backend {other}: use embedded or distributed"),
    };
    std::fs::create_dir_all(&args.out_dir)?;
    ensure!(
        !(args.identity && args.audiences),
        "--identity and --audiences are separate runs"
    );
    if args.identity {
        let customers = args.customers.first().copied().unwrap_or(3_000);
        let r = identity::run(
            backend,
            CONFIG,
            customers,
            args.field_traps,
            args.seed,
            args.backlog,
        )
        .await?;
        identity::print(&r);
        let mode = if args.backlog { "backlog" } else { "live" };
        let path = args
            .out_dir
            .join(format!("identity-{}-{mode}-{customers}.json", args.backend));
        std::fs::write(&path, serde_json::to_vec_pretty(&r)?)?;
        println!("  written to {}", path.display());
        return Ok(());
    }
    let mut all = Vec::new();
    for &customers in &args.customers {
        let r = run_one(&args, backend, customers).await?;
        print(&r);
        let suffix = if args.audiences { "-audiences" } else { "" };
        let path = args
            .out_dir
            .join(format!("{}-{customers}{suffix}.json", args.backend));
        std::fs::write(&path, serde_json::to_vec_pretty(&r)?)?;
        println!("  written to {}", path.display());
        all.push(r);
    }
    if all.len() > 1 {
        let defined = if args.audiences {
            format!(", {}", audiences::label())
        } else {
            String::new()
        };
        println!("\n== scaling, {} back end{defined} ==", args.backend);
        println!(
            "  {:>10} {:>12} {:>12} {:>10} {:>10} {:>10} {:>12}{}",
            "customers",
            "ingest/s",
            "pipeline/s",
            "lookup p99",
            "fresh p99",
            "RSS MiB",
            "B/profile",
            if args.audiences { "  member p99" } else { "" }
        );
        for r in &all {
            let rss: f64 = r["peak_rss_mib"]
                .as_object()
                .map(|m| m.values().filter_map(Value::as_f64).sum())
                .unwrap_or(f64::NAN);
            let member = if args.audiences {
                format!(
                    " {:>11.2}",
                    f(r, &["audiences", "membership_freshness", "p99_ms"])
                )
            } else {
                String::new()
            };
            println!(
                "  {:>10} {:>12.0} {:>12.0} {:>10.2} {:>10.2} {:>10.0} {:>12.0}{member}",
                r["customers"],
                f(r, &["ingest", "grpc_events_per_s"]),
                f(r, &["pipeline", "events_per_s"]),
                f(r, &["lookup", "p99_ms"]),
                f(r, &["freshness", "p99_ms"]),
                rss,
                f(r, &["disk", "store_bytes_per_profile"]),
            );
        }
    }
    Ok(())
}
