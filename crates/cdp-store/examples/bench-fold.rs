//! `make bench-audience` (second part): what audiences cost the embedded
//! store's fold, without the log or identity around it. The bench's
//! population, resolved in memory (`cdp_domain::journey::audiences`), is
//! folded into a fresh `EmbeddedStore` (rows sealed under customer keys, as
//! `cdp dev` keeps them) in batches, with a durable sync every few batches
//! (the third argument), as a profile worker does: once without
//! definitions, once with the bench's 20 computed traits and 50 segments
//! and their probes. Prints, per event, the process's CPU time (all its
//! threads), the wall time and the bytes written to disk (`write_bytes`
//! of `/proc/self/io`: 0 when the temporary directory is in memory), and
//! the store's size; writes `target/bench/store-fold.json`.
//!
//! `cargo run --release -p cdp-store --example bench-fold -- [customers]
//! [batch] [sync-every] [with|without]` (20000, 2000, 2, both).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cdp_domain::audience::Definitions;
use cdp_domain::journey::audiences::{definitions, resolved_population};
use cdp_domain::profile::AudienceOptions;
use cdp_domain::{FoldOptions, ResolvedTouchpoint};
use cdp_store::{EmbeddedStore, Keyring, ProfileStore, ViewSeal};

type Error = Box<dyn std::error::Error>;

/// This process's user and system CPU time so far.
fn cpu() -> Duration {
    let read = || -> Option<Duration> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The fields after the command's closing parenthesis: utime is the
        // 12th of them, stime the 13th, in clock ticks (100 per second).
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(Duration::from_millis(ticks * 10))
    };
    read().unwrap_or_default()
}

/// Bytes this process caused to be written to storage so far.
fn written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes: ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

struct Figures {
    label: &'static str,
    events: usize,
    cpu: Duration,
    wall: Duration,
    written: u64,
    store: u64,
    changes: usize,
}

impl Figures {
    fn per_event(&self, d: Duration) -> f64 {
        d.as_secs_f64() * 1e6 / self.events.max(1) as f64
    }

    fn print(&self) {
        println!(
            "  {:<38} CPU {:>6.1} µs/event, wall {:>6.1} µs/event ({:>6.0} events/s), written {:>6.1} KB/event, store {:>6.1} MB, {:.2} changes/event",
            self.label,
            self.per_event(self.cpu),
            self.per_event(self.wall),
            self.events as f64 / self.wall.as_secs_f64().max(1e-9),
            self.written as f64 / 1024.0 / self.events.max(1) as f64,
            self.store as f64 / 1e6,
            self.changes as f64 / self.events.max(1) as f64,
        );
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "label": self.label, "events": self.events,
            "cpu_micros_per_event": self.per_event(self.cpu),
            "wall_micros_per_event": self.per_event(self.wall),
            "written_bytes_per_event": self.written as f64 / self.events.max(1) as f64,
            "store_bytes": self.store,
            "changes_per_event": self.changes as f64 / self.events.max(1) as f64,
        })
    }
}

async fn run(
    label: &'static str,
    batches: &[Vec<ResolvedTouchpoint>],
    defs: Definitions,
    now: i64,
    sync_every: usize,
) -> Result<Figures, Error> {
    let dir = tempfile::tempdir()?;
    let master = cdp_seal::MasterKeys::parse(&cdp_seal::MasterKeys::generate_file()?)?;
    let keyring = Arc::new(
        Keyring::embedded(&dir.path().join("keys"), master)
            .await?
            .exclusive(),
    );
    let store = EmbeddedStore::open(&dir.path().join("store"))?.with_seal(ViewSeal::new(keyring));
    let options = FoldOptions {
        audiences: AudienceOptions::new(Arc::new(defs), now),
        ..FoldOptions::default()
    };
    let (cpu0, written0, started) = (cpu(), written(), Instant::now());
    let mut changes = 0;
    for (i, batch) in batches.iter().enumerate() {
        changes += store.apply_unsynced(batch, &options).await?.changes.len();
        if (i + 1) % sync_every.max(1) == 0 {
            store.sync().await?;
        }
    }
    store.sync().await?;
    let figures = Figures {
        label,
        events: batches.iter().map(Vec::len).sum(),
        cpu: cpu().saturating_sub(cpu0),
        wall: started.elapsed(),
        written: written().saturating_sub(written0),
        store: dir_bytes(&dir.path().join("store")),
        changes,
    };
    drop(store);
    Ok(figures)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let arg = |i: usize, default: usize| -> Result<usize, Error> {
        std::env::args()
            .nth(i)
            .map_or(Ok(default), |a| a.parse().map_err(Error::from))
    };
    let (customers, batch, sync_every) = (arg(1, 20_000)?, arg(2, 2_000)?, arg(3, 2)?);
    let now = chrono_now();
    let (resolved, merges) = resolved_population(42, customers, now)?;
    let batches: Vec<Vec<ResolvedTouchpoint>> =
        resolved.chunks(batch.max(1)).map(<[_]>::to_vec).collect();
    println!(
        "store fold: {customers} customers, {} events ({merges} merges), batches of {batch}, a durable sync every {sync_every}",
        resolved.len()
    );
    // A fourth argument, `with` or `without`, runs only that one (to
    // profile it).
    let only = std::env::args().nth(4).unwrap_or_default();
    let mut runs = Vec::new();
    if only != "with" {
        runs.push(
            run(
                "without definitions",
                &batches,
                Definitions::default(),
                now,
                sync_every,
            )
            .await?,
        );
    }
    if only != "without" {
        runs.push(
            run(
                "with 50 segments / 20 traits + probes",
                &batches,
                definitions(true)?,
                now,
                sync_every,
            )
            .await?,
        );
    }
    for r in &runs {
        r.print();
    }
    std::fs::create_dir_all("target/bench")?;
    let json = serde_json::json!({
        "customers": customers, "events": resolved.len(), "batch": batch, "sync_every": sync_every,
        "runs": runs.iter().map(Figures::json).collect::<Vec<_>>(),
    });
    std::fs::write(
        "target/bench/store-fold.json",
        serde_json::to_vec_pretty(&json)?,
    )?;
    Ok(())
}

/// Now, in milliseconds since the epoch.
fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
