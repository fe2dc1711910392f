//! The event log: the source of truth of the platform.
//!
//! [`EventLog`] is the port: partitioned topics, durable appends with
//! offsets, consumer groups whose positions are committed by the consumer
//! after its effects are stored. Two implementations fill it: the embedded
//! [`embedded::EmbeddedLog`] (redb on local disk) and Kafka.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;
pub mod consumer;
pub mod embedded;

pub use embedded::EmbeddedLog;

/// A topic of the log. The log itself is generic: which topics exist and
/// what their records mean is the pipeline's contract (`cdp-pipeline`), and
/// a log is opened with the topics it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(&'static str);

impl Topic {
    pub const fn new(name: &'static str) -> Self {
        Topic(name)
    }

    pub const fn name(self) -> &'static str {
        self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// The error of a call on a topic the log was not opened with.
pub fn unknown_topic(topic: Topic) -> LogError {
    LogError::Invalid(format!("topic {topic} is not one of this log's topics"))
}

#[derive(Debug, Error)]
pub enum LogError {
    /// The log cannot be reached or written now; retrying may succeed.
    #[error("event log unavailable: {0}")]
    Unavailable(String),
    /// The log's storage failed.
    #[error("event log storage: {0}")]
    Storage(String),
    #[error("event log: invalid request: {0}")]
    Invalid(String),
    #[error("event log is closed")]
    Closed,
}

/// A record to append.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Decides the partition: records with one key stay in order.
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Metadata such as trace context.
    pub headers: Vec<(String, Vec<u8>)>,
    /// When set, a second record with the same key is not appended: the
    /// append reports [`Appended::Duplicate`] with the first one's position.
    /// Only logs that say [`EventLog::deduplicates`] honour it.
    pub idempotency_key: Option<Vec<u8>>,
}

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    New { partition: u32, offset: u64 },
    Duplicate { partition: u32, offset: u64 },
}

/// A record read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub topic: Topic,
    pub partition: u32,
    pub offset: u64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Append time, ms since the epoch.
    pub timestamp: i64,
}

impl LogRecord {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// Which share of a topic's partitions a group member consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    pub index: u32,
    pub members: u32,
}

impl Default for Membership {
    fn default() -> Self {
        Membership {
            index: 0,
            members: 1,
        }
    }
}

impl Membership {
    pub fn owns(&self, partition: u32) -> bool {
        self.members <= 1 || partition % self.members == self.index
    }
}

/// The event log port.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends records to `topic`; returns once they are durable, with one
    /// result per record, in order.
    async fn append(&self, topic: Topic, records: Vec<Record>) -> Result<Vec<Appended>, LogError>;

    /// Number of partitions of `topic` (0 for a topic the log was not
    /// opened with).
    fn partitions(&self, topic: Topic) -> u32;

    /// Whether [`Record::idempotency_key`] is honoured at append.
    fn deduplicates(&self) -> bool;

    /// Where the record appended to `topic` with `idempotency_key` is, if
    /// it was and the log deduplicates (`Ok(None)` otherwise): how a record
    /// is found by its event id.
    async fn locate(
        &self,
        topic: Topic,
        idempotency_key: &[u8],
    ) -> Result<Option<(u32, u64)>, LogError>;

    /// [`locate`](Self::locate) for many keys at once.
    async fn locate_many(
        &self,
        topic: Topic,
        idempotency_keys: &[Vec<u8>],
    ) -> Result<Vec<Option<(u32, u64)>>, LogError> {
        let mut out = Vec::with_capacity(idempotency_keys.len());
        for k in idempotency_keys {
            out.push(self.locate(topic, k).await?);
        }
        Ok(out)
    }

    /// Whether a retried append can leave a second copy of a keyed record
    /// in the log (Kafka: the produce and the index write are two steps, and
    /// a process killed between them leaves the retry unrecognised). Readers
    /// that must show each record once skip a keyed record that
    /// [`locate_many`](Self::locate_many) places elsewhere.
    fn holds_duplicates(&self) -> bool {
        false
    }

    /// Joins consumer group `group` on `topic`.
    async fn subscribe(
        &self,
        group: &str,
        topic: Topic,
        membership: Membership,
    ) -> Result<Box<dyn Subscription>, LogError>;

    /// Reads up to `max` records of one partition from `from` on.
    async fn read(
        &self,
        topic: Topic,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<LogRecord>, LogError>;

    /// The next offset of every partition of `topic`.
    async fn end_offsets(&self, topic: Topic) -> Result<Vec<u64>, LogError>;

    /// The committed position of `group` in every partition of `topic`.
    async fn committed(&self, group: &str, topic: Topic) -> Result<Vec<u64>, LogError>;
}

/// A consumer group member's view of a topic.
#[async_trait]
pub trait Subscription: Send {
    /// The next records of the assigned partitions, waiting up to `max_wait`
    /// when there are none. Records of one partition come in offset order.
    async fn poll(&mut self, max: usize, max_wait: Duration) -> Result<Vec<LogRecord>, LogError>;

    /// Commits, per partition, the offset of the next record to process.
    /// Call only after the effects of the records before it are stored.
    async fn commit(&mut self, positions: &[(u32, u64)]) -> Result<(), LogError>;

    /// Rewinds to the committed positions (after a failed batch).
    async fn rewind(&mut self) -> Result<(), LogError>;
}

/// An index of idempotency keys, for logs that cannot deduplicate by
/// themselves (Kafka). Best effort by design: the records carry event ids and
/// every consumer is idempotent per event, so a duplicate that slips past the
/// index (two racing retries) costs a record, never a double count.
#[async_trait]
pub trait DedupeIndex: Send + Sync + 'static {
    /// Where records with these keys were appended, if they were.
    async fn lookup(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<(u32, u64)>>, LogError>;

    /// Remembers where records with these keys landed; returns, for each,
    /// the position the index now holds (this one, or an earlier append's
    /// when the index keeps the first).
    async fn remember(&self, entries: &[(Vec<u8>, u32, u64)]) -> Result<Vec<(u32, u64)>, LogError>;
}

/// An in-memory [`DedupeIndex`] for tests and single-process use.
#[derive(Debug, Default)]
pub struct MemoryDedupe(std::sync::Mutex<std::collections::HashMap<Vec<u8>, (u32, u64)>>);

#[async_trait]
impl DedupeIndex for MemoryDedupe {
    async fn lookup(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<(u32, u64)>>, LogError> {
        let map = self
            .0
            .lock()
            .map_err(|_| LogError::Storage("dedupe index poisoned".into()))?;
        Ok(keys.iter().map(|k| map.get(k).copied()).collect())
    }

    async fn remember(&self, entries: &[(Vec<u8>, u32, u64)]) -> Result<Vec<(u32, u64)>, LogError> {
        let mut map = self
            .0
            .lock()
            .map_err(|_| LogError::Storage("dedupe index poisoned".into()))?;
        Ok(entries
            .iter()
            .map(|(k, p, o)| *map.entry(k.clone()).or_insert((*p, *o)))
            .collect())
    }
}

/// Stable partitioner: FNV-1a of the key, modulo the partition count.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    u32::try_from(hash % u64::from(partitions.max(1))).unwrap_or(0)
}

/// Reads every record `topic` holds now, partition by partition in offset
/// order, `page` records per read, handing each to `each`; stops at the
/// first error `each` returns.
pub async fn scan<E: From<LogError>>(
    log: &dyn EventLog,
    topic: Topic,
    page: usize,
    mut each: impl FnMut(&LogRecord) -> Result<(), E>,
) -> Result<(), E> {
    let ends = log.end_offsets(topic).await?;
    for (partition, end) in (0u32..).zip(ends) {
        let mut from = 0;
        while from < end {
            let records = log.read(topic, partition, from, page).await?;
            let Some(last) = records.last() else { break };
            from = last.offset + 1;
            for r in &records {
                each(r)?;
            }
        }
    }
    Ok(())
}

/// Total records not yet committed by `group` on `topic`.
pub async fn lag(log: &dyn EventLog, group: &str, topic: Topic) -> Result<u64, LogError> {
    let ends = log.end_offsets(topic).await?;
    let committed = log.committed(group, topic).await?;
    Ok(ends
        .iter()
        .zip(committed.iter().chain(std::iter::repeat(&0)))
        .map(|(end, pos)| end.saturating_sub(*pos))
        .sum())
}
