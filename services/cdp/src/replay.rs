//! `cdp replay`: streams `ReplayService/Replay` into a JSON Lines file, with
//! a progress bar (rate, ETA) on a terminal, resumable after an interruption.
//!
//! Next to the output, `<out>.cursor` records the cursor of the last event
//! written and the file's length at that point, saved after every flush. On
//! `--resume` the file is cut back to that length and the replay continues
//! from that cursor: each event ends up in the file exactly once.

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
    /// The query service's gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub endpoint: String,
    /// Output file (JSON Lines).
    #[arg(long, short)]
    pub out: PathBuf,
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
    /// Continue an interrupted replay into the same file.
    #[arg(long)]
    pub resume: bool,
    /// Flush and save the cursor every this many events.
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_every: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    cursor: String,
    bytes: u64,
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
    let mut written: u64 = 0;
    let mut events: u64 = 0;
    let file = if args.resume {
        let path = checkpoint_path(&args.out);
        let saved: Checkpoint = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("--resume needs {}", path.display()))?,
        )
        .with_context(|| format!("{} is damaged", path.display()))?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&args.out)
            .with_context(|| format!("opening {}", args.out.display()))?;
        // Drop whatever was written after the last checkpoint.
        file.set_len(saved.bytes)?;
        request.cursor = saved.cursor;
        written = saved.bytes;
        events = saved.events;
        eprintln!("resuming after {events} events");
        file
    } else {
        std::fs::File::create(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?
    };
    let mut out = BufWriter::new(file);
    use std::io::Seek as _;
    out.seek(std::io::SeekFrom::Start(written))?;

    let mut client = ReplayServiceClient::connect(args.endpoint.clone())
        .await
        .with_context(|| format!("connecting to {}", args.endpoint))?
        .max_decoding_message_size(16 * 1024 * 1024);
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
    while let Some(event) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("replay failed: {}", s.message()))?
    {
        let line = serde_json::to_vec(&to_json(&event))?;
        out.write_all(&line)?;
        out.write_all(b"\n")?;
        written += line.len() as u64 + 1;
        events += 1;
        bar.set_length(event.records_total);
        bar.set_position(event.records_scanned);
        bar.set_message(format!("{events} events written"));
        last_cursor = Some(event.cursor);
        since_checkpoint += 1;
        if since_checkpoint >= args.checkpoint_every.max(1)
            && let Some(cursor) = &last_cursor
        {
            out.flush()?;
            save_checkpoint(
                &args.out,
                &Checkpoint {
                    cursor: cursor.clone(),
                    bytes: written,
                    events,
                },
            )?;
            since_checkpoint = 0;
        }
    }
    out.flush()?;
    if let Some(cursor) = last_cursor {
        save_checkpoint(
            &args.out,
            &Checkpoint {
                cursor,
                bytes: written,
                events,
            },
        )?;
    }
    bar.finish_with_message(format!("{events} events written"));
    eprintln!("{events} events in {}", args.out.display());
    Ok(())
}
