//! `make bench-audience`: what audiences cost the profile fold, without the
//! store, the log or identity around it, so the figure does not move with
//! the disk or the other workers. The bench's population
//! (`cdp_domain::journey`, 1 to 4 events per customer over the last 29
//! days), resolved in memory as the identity worker would (fragments of a
//! person merge when an event links them), is folded in batches, as a
//! profile worker folds them: a batch opens each customer's row once (JSON,
//! as the store keeps it before sealing), folds its events with
//! `profile::fold_resolved`, and writes each row it changed once. Three
//! runs: no definitions, the bench's 20 computed traits and 50 segments
//! (with their probes), and the same again (warm). Prints wall-clock
//! microseconds per event (one thread) for the fold, the row's decoding
//! and encoding, and the bytes of a live customer's row, and writes
//! `target/bench/audience-fold.json`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cdp_domain::audience::Definitions;
use cdp_domain::journey;
use cdp_domain::profile::{AudienceOptions, ProfileAccess, ProfileSlot, fold_resolved};
use cdp_domain::{CustomerId, FoldOptions, ResolvedTouchpoint};
use clap::Parser;

#[derive(Parser)]
#[command(about = "The profile fold's cost per event with and without audiences")]
struct Args {
    #[arg(long, default_value_t = 20_000)]
    customers: usize,
    /// Records per fold transaction (the bench's `batch_size`).
    #[arg(long, default_value_t = 2_000)]
    batch: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value = "target/bench/audience-fold.json")]
    out: std::path::PathBuf,
}

/// Rows as JSON bytes, and the slots one batch opened (as the store's
/// transaction keeps them), with the time spent decoding and encoding.
#[derive(Default)]
struct Rows {
    stored: HashMap<CustomerId, Vec<u8>>,
    slots: HashMap<CustomerId, (Option<ProfileSlot>, bool)>,
    decode: Duration,
    encode: Duration,
}

impl Rows {
    /// Writes the slots the batch saved.
    fn write_back(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        for (customer, (slot, dirty)) in self.slots.drain() {
            if let (Some(slot), true) = (slot, dirty) {
                self.stored.insert(customer, serde_json::to_vec(&slot)?);
            }
        }
        self.encode += started.elapsed();
        Ok(())
    }
}

impl ProfileAccess for Rows {
    type Error = anyhow::Error;

    fn load(&mut self, customer: CustomerId) -> anyhow::Result<Option<ProfileSlot>> {
        if let Some((slot, _)) = self.slots.get(&customer) {
            return Ok(slot.clone());
        }
        let started = Instant::now();
        let slot = match self.stored.get(&customer) {
            Some(bytes) => Some(
                serde_json::from_slice::<ProfileSlot>(bytes)
                    .with_context(|| format!("the row of {customer} does not decode"))?,
            ),
            None => None,
        };
        self.decode += started.elapsed();
        self.slots.insert(customer, (slot.clone(), false));
        Ok(slot)
    }

    fn save(&mut self, customer: CustomerId, slot: ProfileSlot) -> anyhow::Result<()> {
        self.slots.insert(customer, (Some(slot), true));
        Ok(())
    }
}

struct Run {
    label: &'static str,
    events: usize,
    total: Duration,
    decode: Duration,
    encode: Duration,
    changes: usize,
    row_bytes: usize,
    rows: usize,
}

impl Run {
    fn micros(&self, d: Duration) -> f64 {
        d.as_secs_f64() * 1e6 / self.events.max(1) as f64
    }

    fn print(&self) {
        let fold = self.total.saturating_sub(self.decode + self.encode);
        println!(
            "  {:<38} {:>7.1} µs/event in all: fold {:>6.1}, decode {:>5.1}, encode {:>5.1} | {:>6} B per live row | {:.2} changes per event",
            self.label,
            self.micros(self.total),
            self.micros(fold),
            self.micros(self.decode),
            self.micros(self.encode),
            self.row_bytes / self.rows.max(1),
            self.changes as f64 / self.events.max(1) as f64,
        );
    }

    fn json(&self) -> serde_json::Value {
        let fold = self.total.saturating_sub(self.decode + self.encode);
        serde_json::json!({
            "label": self.label, "events": self.events,
            "micros_per_event": self.micros(self.total),
            "fold_micros_per_event": self.micros(fold),
            "decode_micros_per_event": self.micros(self.decode),
            "encode_micros_per_event": self.micros(self.encode),
            "row_bytes": self.row_bytes / self.rows.max(1),
            "changes_per_event": self.changes as f64 / self.events.max(1) as f64,
        })
    }
}

fn fold_all(
    label: &'static str,
    batches: &[Vec<ResolvedTouchpoint>],
    definitions: Definitions,
    now: i64,
) -> anyhow::Result<Run> {
    let options = FoldOptions {
        audiences: AudienceOptions::new(Arc::new(definitions), now),
        ..FoldOptions::default()
    };
    let mut rows = Rows::default();
    let mut changes = 0;
    let started = Instant::now();
    for batch in batches {
        for resolved in batch {
            changes += fold_resolved(&mut rows, resolved, &options)?.changes.len();
        }
        rows.write_back()?;
    }
    let live = rows
        .stored
        .values()
        .filter(|b| b.starts_with(br#"{"Live""#));
    Ok(Run {
        label,
        events: batches.iter().map(Vec::len).sum(),
        total: started.elapsed(),
        decode: rows.decode,
        encode: rows.encode,
        changes,
        // Live rows only: the redirects merges leave are a few bytes each.
        row_bytes: live.clone().map(Vec::len).sum(),
        rows: live.count(),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let now = chrono::Utc::now().timestamp_millis();
    let (resolved, merges) =
        journey::audiences::resolved_population(args.seed, args.customers, now)
            .map_err(anyhow::Error::msg)?;
    let batches: Vec<Vec<ResolvedTouchpoint>> = resolved
        .chunks(args.batch.max(1))
        .map(<[_]>::to_vec)
        .collect();
    let shop =
        || journey::audiences::definitions(true).context("the bench's definitions do not check");
    println!(
        "audience fold: {} customers, {} events ({merges} merges), batches of {}",
        args.customers,
        resolved.len(),
        args.batch
    );
    let runs = [
        fold_all("without definitions", &batches, Definitions::default(), now)?,
        fold_all(
            "with 50 segments / 20 traits + probes",
            &batches,
            shop()?,
            now,
        )?,
        fold_all("with them again", &batches, shop()?, now)?,
    ];
    for run in &runs {
        run.print();
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::json!({
        "customers": args.customers, "events": resolved.len(), "batch": args.batch,
        "runs": runs.iter().map(Run::json).collect::<Vec<_>>(),
    });
    std::fs::write(&args.out, serde_json::to_vec_pretty(&json)?)?;
    println!("  wrote {}", args.out.display());
    Ok(())
}
