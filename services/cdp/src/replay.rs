//! `cdp replay`: streams `ReplayService/Replay` into a JSON Lines file or a
//! Parquet dataset, with a progress bar (rate, ETA) on a terminal,
//! resumable after an interruption.
//!
//! Next to the output, `<out>.cursor` records the cursor of the last event
//! made durable and how much output holds it: the JSON Lines file's length
//! (saved after every flush), or the number of complete Parquet parts
//! (`<out>/part-00000.parquet`, ...; a part is written to a temporary name
//! and renamed when complete). On `--resume` the output is cut back to that
//! point and the replay continues from that cursor: each event ends up in
//! the output exactly once.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use cdp_proto::convert;
use cdp_proto::v1::replay_service_client::ReplayServiceClient;
use cdp_proto::v1::{Identifier, ReplayEvent, ReplayRequest, replay_request};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The projection service's gRPC endpoint (`cdp dev` serves it too).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub endpoint: String,
    /// An analyst's or admin's key.
    #[arg(long, env = "CDP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Output: a file (JSON Lines) or a directory of parts (Parquet).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    pub format: Format,
    /// Events per Parquet part (one file each).
    #[arg(long, default_value_t = 100_000)]
    pub part_rows: usize,
    /// Events that happened at or after this instant (RFC 3339).
    #[arg(long)]
    pub from: Option<String>,
    /// Events that happened before this instant (RFC 3339).
    #[arg(long)]
    pub to: Option<String>,
    /// Only this channel (repeatable).
    #[arg(long = "channel")]
    pub channels: Vec<String>,
    /// Only this event type (repeatable).
    #[arg(long = "type")]
    pub types: Vec<String>,
    /// Only this customer (and everyone merged into it).
    #[arg(long, conflicts_with = "identifier")]
    pub customer_id: Option<String>,
    /// Only the customer with this identifier, as kind=value (phone=0912345678).
    #[arg(long)]
    pub identifier: Option<String>,
    /// Add the customer each event belongs to now.
    #[arg(long)]
    pub with_customers: bool,
    /// What the events are for: analytics, marketing, personalisation,
    /// service, or the shop's own purpose. Events of customers who have not
    /// consented to it come without their personal data.
    #[arg(long)]
    pub purpose: String,
    /// Continue an interrupted replay into the same file.
    #[arg(long)]
    pub resume: bool,
    /// Flush and save the cursor every this many events.
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_every: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// Apache Parquet (Snappy), one file per `--part-rows` events.
    Parquet,
}

#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    cursor: String,
    /// JSON Lines: bytes of the file that hold the events so far.
    #[serde(default)]
    bytes: u64,
    /// Parquet: complete parts.
    #[serde(default)]
    parts: u64,
    events: u64,
}

fn checkpoint_path(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".cursor");
    PathBuf::from(p)
}

fn save_checkpoint(out: &Path, c: &Checkpoint) -> anyhow::Result<()> {
    let path = checkpoint_path(out);
    let tmp = path.with_extension("cursor.tmp");
    std::fs::write(&tmp, serde_json::to_vec(c)?)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("saving {}", path.display()))?;
    Ok(())
}

fn millis(rfc3339: &str, flag: &str) -> anyhow::Result<prost_types::Timestamp> {
    let t = chrono::DateTime::parse_from_rfc3339(rfc3339)
        .with_context(|| format!("--{flag} {rfc3339:?} is not an RFC 3339 instant"))?;
    Ok(convert::millis_to_timestamp(t.timestamp_millis()))
}

/// One event as a JSON line.
fn to_json(e: &ReplayEvent) -> Value {
    let t = e.touchpoint.clone().unwrap_or_default();
    let personal = t.personal.unwrap_or_default();
    json!({
        "event_id": t.event_id,
        "type": t.r#type,
        "channel": t.channel,
        "source_id": t.source_id,
        "occurred_at": t.occurred_at.as_ref().map(convert::timestamp_to_millis),
        "properties": t.properties.as_ref().map(convert::struct_to_json).unwrap_or_default(),
        "identifiers": personal.identifiers.iter().map(|i| json!({"kind": i.kind, "value": i.value})).collect::<Vec<_>>(),
        "traits": personal.traits.as_ref().map(convert::struct_to_json).unwrap_or_default(),
        "customer_id": (!e.customer_id.is_empty()).then_some(&e.customer_id),
        "withheld": e.withheld,
        "erased": e.erased,
        "partition": e.partition,
        "offset": e.offset,
        "appended_at": e.appended_at.as_ref().map(convert::timestamp_to_millis),
    })
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let mut request = ReplayRequest {
        from: args
            .from
            .as_deref()
            .map(|f| millis(f, "from"))
            .transpose()?,
        to: args.to.as_deref().map(|t| millis(t, "to")).transpose()?,
        channels: args.channels.clone(),
        types: args.types.clone(),
        with_customers: args.with_customers,
        purpose: args.purpose.clone(),
        ..ReplayRequest::default()
    };
    if let Some(c) = &args.customer_id {
        request.customer = Some(replay_request::Customer::CustomerId(c.clone()));
    } else if let Some(i) = &args.identifier {
        let Some((kind, value)) = i.split_once('=') else {
            bail!("--identifier {i:?}: write it as kind=value, for example phone=0912345678");
        };
        request.customer = Some(replay_request::Customer::Identifier(Identifier {
            kind: kind.trim().to_owned(),
            value: value.trim().to_owned(),
        }));
    }
    let mut events: u64 = 0;
    let mut sink: Box<dyn Sink> = if args.resume {
        let path = checkpoint_path(&args.out);
        let saved: Checkpoint = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("--resume needs {}", path.display()))?,
        )
        .with_context(|| format!("{} is damaged", path.display()))?;
        request.cursor = saved.cursor.clone();
        events = saved.events;
        eprintln!("resuming after {events} events");
        match args.format {
            Format::Jsonl => Box::new(JsonLines::resume(&args.out, saved.bytes)?),
            Format::Parquet => Box::new(crate::parquet::PartWriter::resume(
                &args.out,
                saved.parts,
                args.part_rows,
            )?),
        }
    } else {
        match args.format {
            Format::Jsonl => Box::new(JsonLines::create(&args.out)?),
            Format::Parquet => Box::new(crate::parquet::PartWriter::create(
                &args.out,
                args.part_rows,
            )?),
        }
    };

    let channel = cdp_proto::client::connect(&args.endpoint, args.token.as_deref())
        .await
        .map_err(anyhow::Error::msg)?;
    let mut client = ReplayServiceClient::new(channel).max_decoding_message_size(16 * 1024 * 1024);
    let mut stream = client
        .replay(request)
        .await
        .map_err(|s| anyhow::anyhow!("replay refused: {}", s.message()))?
        .into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} records scanned ({per_sec}, ETA {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut last_cursor = None;
    let mut since_checkpoint = 0;
    let checkpoint = |sink: &mut dyn Sink, cursor: &str, events: u64| -> anyhow::Result<()> {
        let (bytes, parts) = sink.flush()?;
        save_checkpoint(
            &args.out,
            &Checkpoint {
                cursor: cursor.to_owned(),
                bytes,
                parts,
                events,
            },
        )
    };
    while let Some(event) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("replay failed: {}", s.message()))?
    {
        sink.write(&event)?;
        events += 1;
        bar.set_length(event.records_total);
        bar.set_position(event.records_scanned);
        bar.set_message(format!("{events} events written"));
        last_cursor = Some(event.cursor);
        since_checkpoint += 1;
        let due = match args.format {
            Format::Jsonl => since_checkpoint >= args.checkpoint_every.max(1),
            Format::Parquet => sink.part_full(),
        };
        if due && let Some(cursor) = &last_cursor {
            checkpoint(sink.as_mut(), cursor, events)?;
            since_checkpoint = 0;
        }
    }
    if let Some(cursor) = &last_cursor {
        checkpoint(sink.as_mut(), cursor, events)?;
    }
    bar.finish_with_message(format!("{events} events written"));
    eprintln!("{events} events in {}", args.out.display());
    Ok(())
}

/// Where replayed events go.
pub(crate) trait Sink {
    fn write(&mut self, event: &ReplayEvent) -> anyhow::Result<()>;
    /// Whether the current Parquet part is complete.
    fn part_full(&self) -> bool {
        false
    }
    /// Makes what was written durable; returns (file bytes, complete parts).
    fn flush(&mut self) -> anyhow::Result<(u64, u64)>;
}

struct JsonLines {
    out: BufWriter<std::fs::File>,
    written: u64,
}

impl JsonLines {
    fn create(path: &Path) -> anyhow::Result<Self> {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(JsonLines {
            out: BufWriter::new(file),
            written: 0,
        })
    }

    /// Cuts the file back to `bytes` (what the checkpoint covers).
    fn resume(path: &Path, bytes: u64) -> anyhow::Result<Self> {
        use std::io::Seek as _;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.set_len(bytes)?;
        let mut out = BufWriter::new(file);
        out.seek(std::io::SeekFrom::Start(bytes))?;
        Ok(JsonLines {
            out,
            written: bytes,
        })
    }
}

impl Sink for JsonLines {
    fn write(&mut self, event: &ReplayEvent) -> anyhow::Result<()> {
        let line = serde_json::to_vec(&to_json(event))?;
        self.out.write_all(&line)?;
        self.out.write_all(b"\n")?;
        self.written += line.len() as u64 + 1;
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<(u64, u64)> {
        self.out.flush()?;
        Ok((self.written, 0))
    }
}
