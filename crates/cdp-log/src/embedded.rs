//! The embedded event log: redb on local disk.
//!
//! One writer thread takes every pending append, writes them in one
//! transaction and syncs it to disk before anyone is told the append
//! happened (group commit). Readers read concurrently.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    Appended, EventLog, LogError, LogRecord, Membership, Record, Subscription, Topic, partition_for,
};

/// (topic, partition, offset) -> encoded record.
const RECORDS: TableDefinition<(&str, u32, u64), &[u8]> = TableDefinition::new("records");
/// (topic, partition) -> next offset.
const HEADS: TableDefinition<(&str, u32), u64> = TableDefinition::new("heads");
/// (topic, idempotency key) -> (partition, offset).
const SEEN: TableDefinition<(&str, &[u8]), (u32, u64)> = TableDefinition::new("seen");
/// (group, topic, partition) -> next offset to process.
const POSITIONS: TableDefinition<(&str, &str, u32), u64> = TableDefinition::new("positions");

/// A write transaction that saves the allocator state with its commit
/// (redb's quick repair): after a crash the file opens at once instead of
/// being scanned whole.
fn begin_write(db: &Database) -> Result<redb::WriteTransaction, LogError> {
    let mut tx = db.begin_write().map_err(storage)?;
    tx.set_quick_repair(true);
    Ok(tx)
}

fn storage<E: std::fmt::Display>(e: E) -> LogError {
    LogError::Storage(e.to_string())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `[u32 key len][key][u16 header count]([u16 name len][name][u32 len][value])*[i64 ts][value]`
fn encode(record: &Record, timestamp: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(record.key.len() + record.value.len() + 32);
    out.extend_from_slice(&(record.key.len() as u32).to_le_bytes());
    out.extend_from_slice(&record.key);
    out.extend_from_slice(&(record.headers.len() as u16).to_le_bytes());
    for (name, value) in &record.headers {
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
    out.extend_from_slice(&timestamp.to_le_bytes());
    out.extend_from_slice(&record.value);
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LogError> {
        if self.0.len() < n {
            return Err(LogError::Storage("truncated log record".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<usize, LogError> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_le_bytes([b[0], b[1]])))
    }
    fn u32(&mut self) -> Result<usize, LogError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
}

fn decode(topic: Topic, partition: u32, offset: u64, bytes: &[u8]) -> Result<LogRecord, LogError> {
    let mut r = Reader(bytes);
    let key_len = r.u32()?;
    let key = r.take(key_len)?.to_vec();
    let n = r.u16()?;
    let mut headers = Vec::with_capacity(n);
    for _ in 0..n {
        let name_len = r.u16()?;
        let name = String::from_utf8_lossy(r.take(name_len)?).into_owned();
        let len = r.u32()?;
        headers.push((name, r.take(len)?.to_vec()));
    }
    let ts = r.take(8)?;
    let mut ts_bytes = [0u8; 8];
    ts_bytes.copy_from_slice(ts);
    Ok(LogRecord {
        topic,
        partition,
        offset,
        key,
        value: r.0.to_vec(),
        headers,
        timestamp: i64::from_le_bytes(ts_bytes),
    })
}

/// Called by the writer before it commits an append, with the append's
/// transaction: state another component keeps in the log's file (the
/// keyring's new keys) is written and synced with the records. It returns
/// what to call once the transaction committed (`true`) or failed
/// (`false`); an error fails the append.
pub type AppendHook = Box<
    dyn Fn(&redb::WriteTransaction) -> Result<Box<dyn FnOnce(bool) + Send>, String> + Send + Sync,
>;

struct AppendRequest {
    topic: Topic,
    records: Vec<Record>,
    reply: oneshot::Sender<Result<Vec<Appended>, LogError>>,
}

struct Inner {
    db: Arc<Database>,
    partitions: BTreeMap<Topic, u32>,
    writer: Option<mpsc::Sender<AppendRequest>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    hook: Arc<OnceLock<AppendHook>>,
    /// Bumped after every commit, so waiting consumers wake up.
    appended: watch::Receiver<u64>,
}

/// The embedded log. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

impl EmbeddedLog {
    /// Opens (or creates) the log of `topics` in `dir/log.redb`.
    /// `partitions` applies to every topic created now; a topic created with
    /// another count keeps its own.
    pub fn open(dir: &Path, topics: &[Topic], partitions: u32) -> Result<Self, LogError> {
        Self::open_with_cache(dir, topics, partitions, 64 << 20)
    }

    /// [`open`](Self::open) with a page cache of `cache_bytes`.
    pub fn open_with_cache(
        dir: &Path,
        topics: &[Topic],
        partitions: u32,
        cache_bytes: usize,
    ) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir).map_err(storage)?;
        let db = Arc::new(
            redb::Builder::new()
                .set_cache_size(cache_bytes)
                .set_repair_callback(|s| {
                    tracing::warn!(progress = s.progress(), "repairing the log after a crash");
                })
                .create(dir.join("log.redb"))
                .map_err(storage)?,
        );
        let partitions = Self::init_partitions(&db, topics, partitions.max(1))?;
        let (tx, rx) = mpsc::channel::<AppendRequest>(4096);
        let (notify, appended) = watch::channel(0u64);
        let writer_db = Arc::clone(&db);
        let writer_partitions = partitions.clone();
        let hook = Arc::new(OnceLock::<AppendHook>::new());
        let writer_hook = Arc::clone(&hook);
        let writer_thread = std::thread::Builder::new()
            .name("cdp-log-writer".into())
            .spawn(move || writer_loop(&writer_db, &writer_partitions, &writer_hook, rx, &notify))
            .map_err(storage)?;
        Ok(EmbeddedLog {
            inner: Arc::new(Inner {
                db,
                partitions,
                writer: Some(tx),
                writer_thread: Some(writer_thread),
                hook,
                appended,
            }),
        })
    }

    /// The log's redb file, for state that must be durable together with
    /// the appends (the keyring's new keys: see `cdp_store::EmbeddedKeyRows`).
    /// Its write transactions take turns with the log's writer.
    pub fn database(&self) -> Arc<Database> {
        Arc::clone(&self.inner.db)
    }

    /// Installs the [`AppendHook`] every later append calls (once; a
    /// second one is refused).
    pub fn set_append_hook(&self, hook: AppendHook) -> Result<(), LogError> {
        self.inner
            .hook
            .set(hook)
            .map_err(|_| LogError::Storage("the log's append hook is set already".into()))
    }

    /// Every topic's partition count, fixed when the log was created.
    fn init_partitions(
        db: &Database,
        topics: &[Topic],
        wanted: u32,
    ) -> Result<BTreeMap<Topic, u32>, LogError> {
        let tx = begin_write(db)?;
        let mut out = BTreeMap::new();
        {
            let mut heads = tx.open_table(HEADS).map_err(storage)?;
            for &topic in topics {
                let mut existing = 0;
                while heads
                    .get((topic.name(), existing))
                    .map_err(storage)?
                    .is_some()
                {
                    existing += 1;
                }
                if existing == 0 {
                    for p in 0..wanted {
                        heads.insert((topic.name(), p), 0).map_err(storage)?;
                    }
                    existing = wanted;
                } else if existing != wanted {
                    tracing::warn!(topic = %topic, existing, wanted, "log keeps the partition count it was created with");
                }
                out.insert(topic, existing);
            }
            tx.open_table(RECORDS).map_err(storage)?;
            tx.open_table(SEEN).map_err(storage)?;
            tx.open_table(POSITIONS).map_err(storage)?;
        }
        tx.commit().map_err(storage)?;
        Ok(out)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let db = Arc::clone(&self.inner.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| LogError::Storage(format!("log task failed: {e}")))?
    }
}

impl Drop for Inner {
    /// Stops the writer after it has written what it was given, so the file
    /// lock is released when the last handle goes.
    fn drop(&mut self) {
        self.writer.take();
        if let Some(thread) = self.writer_thread.take()
            && thread.join().is_err()
        {
            tracing::error!("log writer thread panicked");
        }
    }
}

fn writer_loop(
    db: &Database,
    partitions: &BTreeMap<Topic, u32>,
    hook: &OnceLock<AppendHook>,
    mut rx: mpsc::Receiver<AppendRequest>,
    notify: &watch::Sender<u64>,
) {
    let mut commits: u64 = 0;
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let count: usize = batch.iter().map(|r| r.records.len()).sum();
        match write_batch(db, partitions, hook.get(), &batch) {
            Ok(results) => {
                commits += 1;
                notify.send_replace(commits);
                for (req, res) in batch.into_iter().zip(results) {
                    let _ = req.reply.send(Ok(res));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, records = count, "log append failed");
                for req in batch {
                    let _ = req.reply.send(Err(LogError::Storage(e.to_string())));
                }
            }
        }
    }
    tracing::debug!("log writer stopped");
}

fn write_batch(
    db: &Database,
    partitions: &BTreeMap<Topic, u32>,
    hook: Option<&AppendHook>,
    batch: &[AppendRequest],
) -> Result<Vec<Vec<Appended>>, LogError> {
    let mut tx = begin_write(db)?;
    tx.set_durability(Durability::Immediate).map_err(storage)?;
    let ts = now_ms();
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut records = tx.open_table(RECORDS).map_err(storage)?;
        let mut heads = tx.open_table(HEADS).map_err(storage)?;
        let mut seen = tx.open_table(SEEN).map_err(storage)?;
        let mut next: BTreeMap<(Topic, u32), u64> = BTreeMap::new();
        for req in batch {
            let n = partitions.get(&req.topic).copied().unwrap_or(1);
            debug_assert!(partitions.contains_key(&req.topic), "checked at append");
            let mut out = Vec::with_capacity(req.records.len());
            for record in &req.records {
                if let Some(key) = &record.idempotency_key
                    && let Some(prior) = seen
                        .get((req.topic.name(), key.as_slice()))
                        .map_err(storage)?
                {
                    let (partition, offset) = prior.value();
                    out.push(Appended::Duplicate { partition, offset });
                    continue;
                }
                let partition = partition_for(&record.key, n);
                let offset = match next.get(&(req.topic, partition)) {
                    Some(o) => *o,
                    None => heads
                        .get((req.topic.name(), partition))
                        .map_err(storage)?
                        .map_or(0, |g| g.value()),
                };
                records
                    .insert(
                        (req.topic.name(), partition, offset),
                        encode(record, ts).as_slice(),
                    )
                    .map_err(storage)?;
                if let Some(key) = &record.idempotency_key {
                    seen.insert((req.topic.name(), key.as_slice()), (partition, offset))
                        .map_err(storage)?;
                }
                next.insert((req.topic, partition), offset + 1);
                out.push(Appended::New { partition, offset });
            }
            results.push(out);
        }
        for ((topic, partition), offset) in next {
            heads
                .insert((topic.name(), partition), offset)
                .map_err(storage)?;
        }
    }
    let after = hook
        .map(|h| h(&tx))
        .transpose()
        .map_err(LogError::Storage)?;
    let committed = tx.commit().map_err(storage);
    if let Some(after) = after {
        after(committed.is_ok());
    }
    committed?;
    Ok(results)
}

fn read_range(
    db: &Database,
    topic: Topic,
    partition: u32,
    from: u64,
    max: usize,
) -> Result<Vec<LogRecord>, LogError> {
    let tx = db.begin_read().map_err(storage)?;
    let table = tx.open_table(RECORDS).map_err(storage)?;
    let mut out = Vec::new();
    for item in table
        .range((topic.name(), partition, from)..=(topic.name(), partition, u64::MAX))
        .map_err(storage)?
        .take(max)
    {
        let (k, v) = item.map_err(storage)?;
        out.push(decode(topic, partition, k.value().2, v.value())?);
    }
    Ok(out)
}

#[async_trait]
impl EventLog for EmbeddedLog {
    async fn append(&self, topic: Topic, records: Vec<Record>) -> Result<Vec<Appended>, LogError> {
        if !self.inner.partitions.contains_key(&topic) {
            return Err(crate::unknown_topic(topic));
        }
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        let writer = self.inner.writer.as_ref().ok_or(LogError::Closed)?;
        writer
            .send(AppendRequest {
                topic,
                records,
                reply,
            })
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    fn partitions(&self, topic: Topic) -> u32 {
        self.inner.partitions.get(&topic).copied().unwrap_or(0)
    }

    fn deduplicates(&self) -> bool {
        true
    }

    async fn subscribe(
        &self,
        group: &str,
        topic: Topic,
        membership: Membership,
    ) -> Result<Box<dyn Subscription>, LogError> {
        if !self.inner.partitions.contains_key(&topic) {
            return Err(crate::unknown_topic(topic));
        }
        if membership.members == 0 || membership.index >= membership.members {
            return Err(LogError::Invalid(format!(
                "member {} of {} does not exist",
                membership.index, membership.members
            )));
        }
        let partitions: Vec<u32> = (0..self.partitions(topic))
            .filter(|p| membership.owns(*p))
            .collect();
        let mut sub = EmbeddedSubscription {
            log: self.clone(),
            group: group.to_owned(),
            topic,
            cursors: partitions.iter().map(|p| (*p, 0)).collect(),
            next_partition: 0,
            appended: self.inner.appended.clone(),
        };
        sub.rewind().await?;
        Ok(Box::new(sub))
    }

    async fn read(
        &self,
        topic: Topic,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<LogRecord>, LogError> {
        if !self.inner.partitions.contains_key(&topic) {
            return Err(crate::unknown_topic(topic));
        }
        if partition >= self.partitions(topic) {
            return Err(LogError::Invalid(format!(
                "topic {topic} has no partition {partition}"
            )));
        }
        self.blocking(move |db| read_range(db, topic, partition, from, max))
            .await
    }

    async fn end_offsets(&self, topic: Topic) -> Result<Vec<u64>, LogError> {
        let n = self.partitions(topic);
        if n == 0 {
            return Err(crate::unknown_topic(topic));
        }
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(storage)?;
            let heads = tx.open_table(HEADS).map_err(storage)?;
            (0..n)
                .map(|p| {
                    Ok(heads
                        .get((topic.name(), p))
                        .map_err(storage)?
                        .map_or(0, |g| g.value()))
                })
                .collect()
        })
        .await
    }

    async fn locate(
        &self,
        topic: Topic,
        idempotency_key: &[u8],
    ) -> Result<Option<(u32, u64)>, LogError> {
        if self.partitions(topic) == 0 {
            return Err(crate::unknown_topic(topic));
        }
        let key = idempotency_key.to_vec();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(storage)?;
            let seen = tx.open_table(SEEN).map_err(storage)?;
            Ok(seen
                .get((topic.name(), key.as_slice()))
                .map_err(storage)?
                .map(|g| g.value()))
        })
        .await
    }

    async fn committed(&self, group: &str, topic: Topic) -> Result<Vec<u64>, LogError> {
        let n = self.partitions(topic);
        if n == 0 {
            return Err(crate::unknown_topic(topic));
        }
        let group = group.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(storage)?;
            let positions = tx.open_table(POSITIONS).map_err(storage)?;
            (0..n)
                .map(|p| {
                    Ok(positions
                        .get((group.as_str(), topic.name(), p))
                        .map_err(storage)?
                        .map_or(0, |g| g.value()))
                })
                .collect()
        })
        .await
    }
}

struct EmbeddedSubscription {
    log: EmbeddedLog,
    group: String,
    topic: Topic,
    /// Assigned partition -> next offset to hand out.
    cursors: Vec<(u32, u64)>,
    next_partition: usize,
    appended: watch::Receiver<u64>,
}

/// Per assigned partition, the next offset to hand out.
type Cursors = Vec<(u32, u64)>;

/// Reads what is available after `cursors`, starting at partition `start`
/// so that no partition starves; returns the records and the new cursors.
fn read_available(
    db: &Database,
    topic: Topic,
    mut cursors: Vec<(u32, u64)>,
    start: usize,
    max: usize,
) -> Result<(Vec<LogRecord>, Cursors), LogError> {
    let mut out = Vec::new();
    let n = cursors.len();
    for i in 0..n {
        if out.len() >= max {
            break;
        }
        let idx = (start + i) % n;
        let (partition, from) = cursors[idx];
        let got = read_range(db, topic, partition, from, max - out.len())?;
        if let Some(last) = got.last() {
            cursors[idx].1 = last.offset + 1;
        }
        out.extend(got);
    }
    Ok((out, cursors))
}

#[async_trait]
impl Subscription for EmbeddedSubscription {
    async fn poll(&mut self, max: usize, max_wait: Duration) -> Result<Vec<LogRecord>, LogError> {
        let deadline = tokio::time::Instant::now() + max_wait;
        loop {
            // Mark the current commit count as seen before reading, so an
            // append that lands during the read wakes the next wait.
            self.appended.borrow_and_update();
            let (topic, cursors, start) = (self.topic, self.cursors.clone(), self.next_partition);
            let (records, cursors) = self
                .log
                .blocking(move |db| read_available(db, topic, cursors, start, max))
                .await?;
            self.cursors = cursors;
            self.next_partition = (self.next_partition + 1) % self.cursors.len().max(1);
            if !records.is_empty() {
                return Ok(records);
            }
            match tokio::time::timeout_at(deadline, self.appended.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(LogError::Closed),
                Err(_) => return Ok(Vec::new()),
            }
        }
    }

    async fn commit(&mut self, positions: &[(u32, u64)]) -> Result<(), LogError> {
        if positions.is_empty() {
            return Ok(());
        }
        let group = self.group.clone();
        let topic = self.topic;
        let positions = positions.to_vec();
        self.log
            .blocking(move |db| {
                let mut tx = begin_write(db)?;
                tx.set_durability(Durability::Immediate).map_err(storage)?;
                {
                    let mut table = tx.open_table(POSITIONS).map_err(storage)?;
                    for (partition, offset) in positions {
                        table
                            .insert((group.as_str(), topic.name(), partition), offset)
                            .map_err(storage)?;
                    }
                }
                tx.commit().map_err(storage)
            })
            .await
    }

    async fn rewind(&mut self) -> Result<(), LogError> {
        let committed = self.log.committed(&self.group, self.topic).await?;
        for (partition, cursor) in &mut self.cursors {
            *cursor = committed.get(*partition as usize).copied().unwrap_or(0);
        }
        Ok(())
    }
}
