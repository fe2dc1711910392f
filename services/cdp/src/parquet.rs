//! Parquet output of `cdp replay`: a directory of parts, each a complete
//! Parquet file (Snappy) of up to `part_rows` events, written under a
//! temporary name and renamed when complete, so a part on disk is always
//! readable. Columns: `event_id`, `type`, `channel`, `source_id`,
//! `occurred_at` and `appended_at` (timestamps, ms, UTC), `customer_id`,
//! `partition`, `offset`, and `identifiers`, `properties`, `traits` as JSON
//! text (open-ended by nature; query engines read them with their JSON
//! functions), `withheld` (the customer had not consented to the
//! replay's purpose: the personal columns are empty) and `erased` (the
//! customer was erased: the event is anonymous, its amounts still count).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use arrow_array::{
    ArrayRef, RecordBatch, StringArray, TimestampMillisecondArray, UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use cdp_proto::convert;
use cdp_proto::v1::ReplayEvent;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::json;

use crate::replay::Sink;

/// Rows per record batch inside a part.
const BATCH_ROWS: usize = 8_192;

struct Row {
    event_id: String,
    event_type: String,
    channel: String,
    source_id: String,
    occurred_at: Option<i64>,
    appended_at: Option<i64>,
    customer_id: Option<String>,
    partition: u32,
    offset: u64,
    identifiers: String,
    properties: String,
    traits: String,
    withheld: bool,
    erased: bool,
}

impl Row {
    fn of(e: &ReplayEvent) -> Row {
        let t = e.touchpoint.clone().unwrap_or_default();
        let personal = t.personal.unwrap_or_default();
        let ids: Vec<_> = personal
            .identifiers
            .iter()
            .map(|i| json!({"kind": i.kind, "value": i.value}))
            .collect();
        Row {
            event_id: t.event_id,
            event_type: t.r#type,
            channel: t.channel,
            source_id: t.source_id,
            occurred_at: t.occurred_at.as_ref().map(convert::timestamp_to_millis),
            appended_at: e.appended_at.as_ref().map(convert::timestamp_to_millis),
            customer_id: (!e.customer_id.is_empty()).then(|| e.customer_id.clone()),
            partition: e.partition,
            offset: e.offset,
            identifiers: serde_json::Value::Array(ids).to_string(),
            withheld: e.withheld,
            erased: e.erased,
            properties: t
                .properties
                .as_ref()
                .map(convert::struct_to_json)
                .map_or_else(
                    || "{}".to_owned(),
                    |v| serde_json::Value::Object(v).to_string(),
                ),
            traits: personal
                .traits
                .as_ref()
                .map(convert::struct_to_json)
                .map_or_else(
                    || "{}".to_owned(),
                    |v| serde_json::Value::Object(v).to_string(),
                ),
        }
    }
}

/// The schema of every part.
pub fn schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("type", DataType::Utf8, false),
        Field::new("channel", DataType::Utf8, false),
        Field::new("source_id", DataType::Utf8, false),
        Field::new("occurred_at", ts.clone(), true),
        Field::new("appended_at", ts, true),
        Field::new("customer_id", DataType::Utf8, true),
        Field::new("partition", DataType::UInt32, false),
        Field::new("offset", DataType::UInt64, false),
        Field::new("identifiers", DataType::Utf8, false),
        Field::new("properties", DataType::Utf8, false),
        Field::new("traits", DataType::Utf8, false),
        Field::new("withheld", DataType::Boolean, false),
        Field::new("erased", DataType::Boolean, false),
    ]))
}

fn batch(schema: &SchemaRef, rows: &[Row]) -> anyhow::Result<RecordBatch> {
    let text = |f: fn(&Row) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let columns: Vec<ArrayRef> = vec![
        text(|r| &r.event_id),
        text(|r| &r.event_type),
        text(|r| &r.channel),
        text(|r| &r.source_id),
        Arc::new(
            TimestampMillisecondArray::from(rows.iter().map(|r| r.occurred_at).collect::<Vec<_>>())
                .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMillisecondArray::from(rows.iter().map(|r| r.appended_at).collect::<Vec<_>>())
                .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from(
            rows.iter()
                .map(|r| r.customer_id.as_deref())
                .collect::<Vec<_>>(),
        )),
        Arc::new(UInt32Array::from_iter_values(
            rows.iter().map(|r| r.partition),
        )),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.offset))),
        text(|r| &r.identifiers),
        text(|r| &r.properties),
        text(|r| &r.traits),
        Arc::new(arrow_array::BooleanArray::from(
            rows.iter().map(|r| r.withheld).collect::<Vec<_>>(),
        )),
        Arc::new(arrow_array::BooleanArray::from(
            rows.iter().map(|r| r.erased).collect::<Vec<_>>(),
        )),
    ];
    RecordBatch::try_new(Arc::clone(schema), columns).context("building a record batch")
}

/// Writes the parts of one dataset directory.
pub struct PartWriter {
    dir: PathBuf,
    schema: SchemaRef,
    part_rows: usize,
    /// Complete parts on disk.
    parts: u64,
    rows: Vec<Row>,
}

fn part_name(n: u64) -> String {
    format!("part-{n:05}.parquet")
}

impl PartWriter {
    /// A new dataset in `dir` (created; must hold no parts yet).
    pub fn create(dir: &Path, part_rows: usize) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let existing = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(".parquet"));
        anyhow::ensure!(
            !existing,
            "{} already holds Parquet parts: use --resume, or another directory",
            dir.display()
        );
        Ok(Self::new(dir, part_rows, 0))
    }

    /// Continues a dataset after `parts` complete parts, deleting any part
    /// written after that checkpoint.
    pub fn resume(dir: &Path, parts: u64, part_rows: usize) -> anyhow::Result<Self> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("opening {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = name.ends_with(".tmp")
                || name
                    .strip_prefix("part-")
                    .and_then(|n| n.strip_suffix(".parquet"))
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| n >= parts);
            if stale {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(Self::new(dir, part_rows, parts))
    }

    fn new(dir: &Path, part_rows: usize, parts: u64) -> Self {
        PartWriter {
            dir: dir.to_path_buf(),
            schema: schema(),
            part_rows: part_rows.max(1),
            parts,
            rows: Vec::new(),
        }
    }

    fn write_part(&mut self) -> anyhow::Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let name = part_name(self.parts);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let mut writer = ArrowWriter::try_new(file, Arc::clone(&self.schema), Some(props))?;
        for chunk in self.rows.chunks(BATCH_ROWS) {
            writer.write(&batch(&self.schema, chunk)?)?;
        }
        let file = writer.into_inner()?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(&name))?;
        self.parts += 1;
        self.rows.clear();
        Ok(())
    }
}

impl Sink for PartWriter {
    fn write(&mut self, event: &ReplayEvent) -> anyhow::Result<()> {
        self.rows.push(Row::of(event));
        Ok(())
    }

    fn part_full(&self) -> bool {
        self.rows.len() >= self.part_rows
    }

    fn flush(&mut self) -> anyhow::Result<(u64, u64)> {
        self.write_part()?;
        Ok((0, self.parts))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use arrow_array::Array as _;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn event(n: u64) -> ReplayEvent {
        ReplayEvent {
            touchpoint: Some(cdp_proto::v1::Touchpoint {
                event_id: format!("00000000-0000-4000-8000-{n:012}"),
                r#type: "Product Viewed".into(),
                channel: "web".into(),
                source_id: "site".into(),
                occurred_at: Some(convert::millis_to_timestamp(1_700_000_000_000 + n as i64)),
                properties: None,
                personal: Some(cdp_proto::v1::PersonalData {
                    identifiers: vec![cdp_proto::v1::Identifier {
                        kind: "email".into(),
                        value: format!("c{n}@shop.vn"),
                    }],
                    traits: None,
                }),
            }),
            customer_id: String::new(),
            withheld: false,
            // Every third event belongs to an erased customer.
            erased: n.is_multiple_of(3),
            partition: (n % 4) as u32,
            offset: n,
            appended_at: None,
            cursor: String::new(),
            records_scanned: 0,
            records_total: 0,
        }
    }

    fn read_all(dir: &Path) -> Vec<(String, Option<i64>, String, bool)> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        let mut out = Vec::new();
        for path in names {
            let reader =
                ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
                    .unwrap()
                    .build()
                    .unwrap();
            for b in reader {
                let b = b.unwrap();
                let ids = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
                let at = b
                    .column(4)
                    .as_any()
                    .downcast_ref::<TimestampMillisecondArray>()
                    .unwrap();
                let idents = b.column(9).as_any().downcast_ref::<StringArray>().unwrap();
                let erased = b
                    .column_by_name("erased")
                    .unwrap()
                    .as_any()
                    .downcast_ref::<arrow_array::BooleanArray>()
                    .unwrap();
                for i in 0..b.num_rows() {
                    out.push((
                        ids.value(i).to_owned(),
                        (!at.is_null(i)).then(|| at.value(i)),
                        idents.value(i).to_owned(),
                        erased.value(i),
                    ));
                }
            }
        }
        out
    }

    #[test]
    fn parts_hold_every_event_once_across_a_resume() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PartWriter::create(dir.path(), 3).unwrap();
        for n in 0..7 {
            w.write(&event(n)).unwrap();
            if w.part_full() {
                w.flush().unwrap();
            }
        }
        // Interrupted: 2 parts are complete (6 events), the 7th is buffered.
        assert_eq!(w.parts, 2);
        drop(w);
        // A part written after the checkpoint (a crash before saving it).
        std::fs::write(dir.path().join(part_name(2)), b"partial").unwrap();
        std::fs::write(dir.path().join("part-00003.parquet.tmp"), b"partial").unwrap();
        assert!(
            PartWriter::create(dir.path(), 3).is_err(),
            "create refuses a used directory"
        );
        let mut w = PartWriter::resume(dir.path(), 2, 3).unwrap();
        for n in 6..10 {
            w.write(&event(n)).unwrap();
            if w.part_full() {
                w.flush().unwrap();
            }
        }
        assert_eq!(w.flush().unwrap(), (0, 4));
        let rows = read_all(dir.path());
        let ids: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        let want: Vec<String> = (0..10)
            .map(|n| format!("00000000-0000-4000-8000-{n:012}"))
            .collect();
        assert_eq!(ids, want);
        assert_eq!(rows[3].1, Some(1_700_000_000_003));
        assert_eq!(rows[3].2, r#"[{"kind":"email","value":"c3@shop.vn"}]"#);
        let erased: Vec<bool> = rows.iter().map(|r| r.3).collect();
        assert_eq!(
            erased,
            (0..10u64).map(|n| n.is_multiple_of(3)).collect::<Vec<_>>()
        );
    }
}
