//! The event log port on Apache Kafka, with `rdkafka` (librdkafka).
//!
//! - **Appends** go through one idempotent producer (`enable.idempotence`,
//!   `acks=all`); [`EventLog::append`] returns only after the broker
//!   acknowledged every record, so ingest never acks an event Kafka does not
//!   hold. When the broker cannot be reached the append fails with
//!   [`LogError::Unavailable`] after `message_timeout_ms`.
//! - **Partitioning** uses [`cdp_log::partition_for`], the same partitioner as
//!   the embedded log, so one key keeps its order on both back ends.
//! - **Topics** (the pipeline's, `<prefix>touchpoints` and so on, named by
//!   `cdp-pipeline`) are created on connect with the configured partition
//!   count and replication factor when they do not exist.
//! - **Consumers** commit their positions to a Kafka consumer group, but their
//!   partitions are assigned statically by [`Membership`] (member `i` of `n`
//!   owns the partitions `p` with `p % n == i`; `pipeline.processes` and
//!   `pipeline.process_index` number the replicas), not by Kafka's group
//!   protocol. Positions are committed only by [`Subscription::commit`],
//!   which workers call after their effects are stored. Static assignment
//!   keeps partition ownership stable across restarts (no rebalance storms
//!   when a worker is SIGKILLed); each replica must get its own index.
//! - **Deduplication** of adapter retries uses an optional [`DedupeIndex`]
//!   (ScyllaDB in production); Kafka itself only deduplicates producer
//!   retries within a session.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cdp_log::{
    Appended, DedupeIndex, EventLog, LogError, LogRecord, Membership, Record, Subscription, Topic,
    partition_for,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

pub use cdp_config::KafkaConfig;

fn unavailable(e: KafkaError) -> LogError {
    LogError::Unavailable(e.to_string())
}

/// Errors a group coordinator returns while it is being elected or loaded.
fn retriable(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::RebalanceInProgress
        )
    )
}

/// Errors of a consumer while brokers are unreachable; librdkafka keeps
/// reconnecting.
fn transient(e: &KafkaError) -> bool {
    match e.rdkafka_error_code() {
        Some(code) => {
            matches!(
                code,
                RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::NetworkException
                    | RDKafkaErrorCode::OperationTimedOut
                    | RDKafkaErrorCode::RequestTimedOut
                    | RDKafkaErrorCode::LeaderNotAvailable
                    | RDKafkaErrorCode::NotLeaderForPartition
                    | RDKafkaErrorCode::Resolve
            ) || retriable(e)
        }
        None => false,
    }
}

fn partition_i32(p: u32) -> Result<i32, LogError> {
    i32::try_from(p).map_err(|_| LogError::Invalid(format!("partition {p} out of range")))
}

fn offset_i64(o: u64) -> Result<i64, LogError> {
    i64::try_from(o).map_err(|_| LogError::Invalid(format!("offset {o} out of range")))
}

/// The Kafka event log. Cheap to clone.
#[derive(Clone)]
pub struct KafkaLog {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    producer: FutureProducer,
    /// For watermarks and metadata (no group).
    meta: Arc<BaseConsumer>,
    partitions: HashMap<Topic, u32>,
    dedupe: Option<Arc<dyn DedupeIndex>>,
    /// Idle consumers of `read` (creating one per call costs a connection).
    readers: std::sync::Mutex<Vec<BaseConsumer>>,
}

impl KafkaLog {
    /// Connects, creates the missing ones of `topics` (with `partitions`
    /// partitions each) and reads their partition counts.
    pub async fn connect(
        config: KafkaConfig,
        topics: &[Topic],
        partitions: u32,
        dedupe: Option<Arc<dyn DedupeIndex>>,
    ) -> Result<Self, LogError> {
        let producer: FutureProducer = client_config(&config, "producer")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("compression.type", "lz4")
            .set("message.timeout.ms", config.message_timeout_ms.to_string())
            .create()
            .map_err(unavailable)?;
        let meta: BaseConsumer = client_config(&config, "meta")
            .create()
            .map_err(unavailable)?;
        let admin: AdminClient<DefaultClientContext> = client_config(&config, "admin")
            .create()
            .map_err(unavailable)?;
        let names: Vec<String> = topics.iter().map(|t| topic_name(&config, *t)).collect();
        let new: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| {
                NewTopic::new(
                    n,
                    i32::try_from(partitions.max(1)).unwrap_or(1),
                    TopicReplication::Fixed(config.replication_factor),
                )
            })
            .collect();
        let timeout = Duration::from_millis(config.request_timeout_ms);
        let results = admin
            .create_topics(&new, &AdminOptions::new().operation_timeout(Some(timeout)))
            .await
            .map_err(unavailable)?;
        for r in results {
            match r {
                Ok(name) => info!(topic = %name, partitions, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(LogError::Unavailable(format!(
                        "cannot create topic {name}: {code}"
                    )));
                }
            }
        }
        let meta = Arc::new(meta);
        let mut counts = HashMap::new();
        for &topic in topics {
            let name = topic_name(&config, topic);
            let count = blocking({
                let meta = Arc::clone(&meta);
                move || {
                    // Metadata can lag just after creation: ask until it answers.
                    let deadline = std::time::Instant::now() + timeout;
                    loop {
                        let md = meta
                            .fetch_metadata(Some(&name), timeout)
                            .map_err(unavailable)?;
                        let n = md
                            .topics()
                            .iter()
                            .find(|t| t.name() == name && t.error().is_none())
                            .map(|t| t.partitions().len())
                            .unwrap_or(0);
                        if n > 0 {
                            return Ok(u32::try_from(n).unwrap_or(u32::MAX));
                        }
                        if std::time::Instant::now() > deadline {
                            return Err(LogError::Unavailable(format!(
                                "topic {name} has no partitions"
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .await?;
            counts.insert(topic, count);
        }
        info!(brokers = %config.brokers, prefix = %config.topic_prefix, "connected to Kafka");
        Ok(KafkaLog {
            inner: Arc::new(Inner {
                config,
                producer,
                meta,
                partitions: counts,
                dedupe,
                readers: std::sync::Mutex::new(Vec::new()),
            }),
        })
    }

    fn name(&self, topic: Topic) -> String {
        topic_name(&self.inner.config, topic)
    }

    /// The Kafka name of `topic`, if the log was opened with it.
    fn known(&self, topic: Topic) -> Result<String, LogError> {
        if self.inner.partitions.contains_key(&topic) {
            Ok(self.name(topic))
        } else {
            Err(cdp_log::unknown_topic(topic))
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.inner.config.request_timeout_ms)
    }

    /// A consumer of `group` (no subscription; partitions are assigned).
    fn consumer<C: rdkafka::config::FromClientConfig>(&self, group: &str) -> Result<C, LogError> {
        client_config(&self.inner.config, group)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(unavailable)
    }

    /// Appends the records to Kafka, in order, and waits for the broker's acks.
    async fn produce(
        &self,
        topic: Topic,
        records: &[&Record],
    ) -> Result<Vec<(u32, u64)>, LogError> {
        let name = self.name(topic);
        let partitions = self.partitions(topic);
        let now = now_ms();
        let mut pending = Vec::with_capacity(records.len());
        for r in records {
            let partition = partition_for(&r.key, partitions);
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            for (k, v) in &r.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let mut record = FutureRecord::to(&name)
                .partition(partition_i32(partition)?)
                .key(&r.key)
                .payload(&r.value)
                .headers(headers)
                .timestamp(now);
            // Enqueueing keeps the order of the batch; the idempotent
            // producer keeps it through retries.
            let delivery = loop {
                match self.inner.producer.send_result(record) {
                    Ok(d) => break d,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(unavailable(e)),
                }
            };
            pending.push(delivery);
        }
        let mut out = Vec::with_capacity(pending.len());
        for d in pending {
            match d.await {
                Ok(Ok(delivery)) => out.push((
                    u32::try_from(delivery.partition).unwrap_or(0),
                    u64::try_from(delivery.offset).unwrap_or(0),
                )),
                Ok(Err((e, _))) => return Err(unavailable(e)),
                Err(_) => return Err(LogError::Closed),
            }
        }
        Ok(out)
    }
}

fn topic_name(config: &KafkaConfig, topic: Topic) -> String {
    format!("{}{}", config.topic_prefix, topic.name())
}

fn client_config(config: &KafkaConfig, role: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("client.id", format!("{}-{role}", config.client_id))
        .set("socket.timeout.ms", config.request_timeout_ms.to_string())
        // 127.0.0.1 brokers must not be reached over ::1.
        .set("broker.address.family", "v4");
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    c
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, LogError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LogError::Storage(format!("kafka task failed: {e}")))?
}

fn to_record<M: Message>(topic: Topic, m: &M) -> LogRecord {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    LogRecord {
        topic,
        partition: u32::try_from(m.partition()).unwrap_or(0),
        offset: u64::try_from(m.offset()).unwrap_or(0),
        key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
        value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
        timestamp: m.timestamp().to_millis().unwrap_or(0),
    }
}

/// Committed offsets of `group` for `partitions` of `name` (0 when none).
fn committed_of(
    consumer: &impl Consumer,
    name: &str,
    partitions: &[u32],
    timeout: Duration,
) -> Result<Vec<u64>, LogError> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(name, partition_i32(*p)?);
    }
    // A new group's coordinator takes a moment to be elected and loaded.
    let deadline = std::time::Instant::now() + timeout;
    let got = loop {
        match consumer.committed_offsets(tpl.clone(), timeout) {
            Ok(got) => break got,
            Err(e) if retriable(&e) && std::time::Instant::now() < deadline => {
                debug!(error = %e, "group coordinator not ready; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(unavailable(e)),
        }
    };
    partitions
        .iter()
        .map(|p| {
            let offset = got
                .find_partition(name, partition_i32(*p)?)
                .map(|e| e.offset())
                .unwrap_or(Offset::Invalid);
            Ok(match offset {
                Offset::Offset(o) => u64::try_from(o).unwrap_or(0),
                _ => 0,
            })
        })
        .collect()
}

#[async_trait]
impl EventLog for KafkaLog {
    async fn append(&self, topic: Topic, records: Vec<Record>) -> Result<Vec<Appended>, LogError> {
        self.known(topic)?;
        let dedupe = self.inner.dedupe.clone();
        let keys: Vec<Option<Vec<u8>>> = match &dedupe {
            Some(_) => records.iter().map(|r| r.idempotency_key.clone()).collect(),
            None => vec![None; records.len()],
        };
        let keyed: Vec<Vec<u8>> = keys.iter().flatten().cloned().collect();
        // Keys seen before this call (a lookup failure only weakens dedupe).
        let mut known: HashMap<Vec<u8>, (u32, u64)> = HashMap::new();
        if let Some(index) = &dedupe
            && !keyed.is_empty()
        {
            match index.lookup(&keyed).await {
                Ok(found) => {
                    for (k, pos) in keyed.iter().zip(found) {
                        if let Some(pos) = pos {
                            known.insert(k.clone(), pos);
                        }
                    }
                }
                Err(e) => warn!(error = %e, "dedupe lookup failed; appending without it"),
            }
        }
        // Which records to write: not known, and first of their key in the batch.
        let mut first_in_batch: HashMap<&[u8], usize> = HashMap::new();
        let mut to_write: Vec<usize> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match key {
                Some(k) if known.contains_key(k) => {}
                Some(k) => {
                    if !first_in_batch.contains_key(k.as_slice()) {
                        first_in_batch.insert(k.as_slice(), i);
                        to_write.push(i);
                    }
                }
                None => to_write.push(i),
            }
        }
        let refs: Vec<&Record> = to_write.iter().map(|i| &records[*i]).collect();
        let written = self.produce(topic, &refs).await?;
        let mut position: HashMap<usize, (u32, u64)> =
            to_write.iter().copied().zip(written).collect();
        // Remember where the keyed records landed; a racing append of the
        // same key may have been first.
        let mut duplicate_of: HashMap<usize, (u32, u64)> = HashMap::new();
        if let Some(index) = &dedupe {
            let entries: Vec<(Vec<u8>, u32, u64)> = to_write
                .iter()
                .filter_map(|i| {
                    let k = keys[*i].clone()?;
                    let (p, o) = position.get(i).copied()?;
                    Some((k, p, o))
                })
                .collect();
            if !entries.is_empty() {
                match index.remember(&entries).await {
                    Ok(firsts) => {
                        for ((k, p, o), first) in entries.iter().zip(firsts) {
                            if first != (*p, *o)
                                && let Some(i) = first_in_batch.get(k.as_slice())
                            {
                                duplicate_of.insert(*i, first);
                                position.insert(*i, first);
                            }
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "dedupe index not updated; the records are durable")
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(records.len());
        for (i, key) in keys.iter().enumerate() {
            let appended = if let Some(&(partition, offset)) = duplicate_of.get(&i) {
                Appended::Duplicate { partition, offset }
            } else if let Some(&(partition, offset)) = key.as_ref().and_then(|k| known.get(k)) {
                Appended::Duplicate { partition, offset }
            } else if let Some(k) = key
                && let Some(first) = first_in_batch.get(k.as_slice())
                && *first != i
            {
                let (partition, offset) = position.get(first).copied().unwrap_or_default();
                Appended::Duplicate { partition, offset }
            } else {
                let (partition, offset) = position.get(&i).copied().ok_or_else(|| {
                    LogError::Storage(format!("record {i} of the batch has no position"))
                })?;
                Appended::New { partition, offset }
            };
            out.push(appended);
        }
        debug!(topic = %topic, records = out.len(), "appended to Kafka");
        Ok(out)
    }

    fn partitions(&self, topic: Topic) -> u32 {
        self.inner.partitions.get(&topic).copied().unwrap_or(0)
    }

    fn deduplicates(&self) -> bool {
        self.inner.dedupe.is_some()
    }

    fn holds_duplicates(&self) -> bool {
        true
    }

    async fn locate_many(
        &self,
        topic: Topic,
        idempotency_keys: &[Vec<u8>],
    ) -> Result<Vec<Option<(u32, u64)>>, LogError> {
        self.known(topic)?;
        match &self.inner.dedupe {
            Some(index) if !idempotency_keys.is_empty() => {
                Ok(index.lookup(idempotency_keys).await?)
            }
            _ => Ok(vec![None; idempotency_keys.len()]),
        }
    }

    async fn subscribe(
        &self,
        group: &str,
        topic: Topic,
        membership: Membership,
    ) -> Result<Box<dyn Subscription>, LogError> {
        let name = self.known(topic)?;
        let owned: Vec<u32> = (0..self.partitions(topic))
            .filter(|p| membership.owns(*p))
            .collect();
        let consumer: Arc<StreamConsumer> = Arc::new(self.consumer(group)?);
        let mut sub = KafkaSubscription {
            topic,
            name,
            consumer,
            owned,
            timeout: self.timeout(),
        };
        sub.rewind().await?;
        info!(group, topic = %topic, partitions = ?sub.owned, "joined consumer group");
        Ok(Box::new(sub))
    }

    async fn read(
        &self,
        topic: Topic,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<LogRecord>, LogError> {
        let name = self.known(topic)?;
        let pooled = self.inner.readers.lock().ok().and_then(|mut r| r.pop());
        let consumer: BaseConsumer = match pooled {
            Some(c) => c,
            // librdkafka wants a group even for assigned partitions; this
            // one never commits.
            None => client_config(&self.inner.config, "reader")
                .set(
                    "group.id",
                    format!("{}reader", self.inner.config.topic_prefix),
                )
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "true")
                // A reused reader must not wait out a fetch the broker holds
                // open for its previous assignment.
                .set("fetch.wait.max.ms", "10")
                .create()
                .map_err(unavailable)?,
        };
        let timeout = self.timeout();
        let (consumer, out) = blocking(move || {
            let (low, high) = consumer
                .fetch_watermarks(&name, partition_i32(partition)?, timeout)
                .map_err(unavailable)?;
            let end = u64::try_from(high).unwrap_or(0);
            // Records before the low watermark are gone (retention).
            let from = from.max(u64::try_from(low).unwrap_or(0));
            let mut out = Vec::new();
            if from >= end || max == 0 {
                return Ok((consumer, out));
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(
                &name,
                partition_i32(partition)?,
                Offset::Offset(offset_i64(from)?),
            )
            .map_err(unavailable)?;
            consumer.assign(&tpl).map_err(unavailable)?;
            let deadline = std::time::Instant::now() + timeout;
            let mut expected = from;
            while out.len() < max && std::time::Instant::now() < deadline {
                match consumer.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => {
                        let r = to_record(topic, &m);
                        // A reused consumer may still hold a message of an
                        // earlier assignment: keep only what follows `from`.
                        if m.topic() != name || r.partition != partition || r.offset < expected {
                            continue;
                        }
                        expected = r.offset + 1;
                        let last = r.offset + 1 >= end;
                        out.push(r);
                        if last {
                            break;
                        }
                    }
                    // The end of this partition (an end event of an earlier
                    // assignment says nothing about this one).
                    Some(Err(KafkaError::PartitionEOF(p)))
                        if u32::try_from(p).ok() == Some(partition) && !out.is_empty() =>
                    {
                        break;
                    }
                    Some(Err(KafkaError::PartitionEOF(_))) => {}
                    Some(Err(e)) if transient(&e) => {}
                    Some(Err(e)) => return Err(unavailable(e)),
                    None => {}
                }
            }
            if out.is_empty() {
                // Records exist (from < end) but none came: never report "nothing".
                return Err(LogError::Unavailable(format!(
                    "no records of {name}/{partition} from {from} arrived in time"
                )));
            }
            Ok((consumer, out))
        })
        .await?;
        if let Ok(mut readers) = self.inner.readers.lock()
            && readers.len() < 4
        {
            readers.push(consumer);
        }
        Ok(out)
    }

    async fn end_offsets(&self, topic: Topic) -> Result<Vec<u64>, LogError> {
        let name = self.known(topic)?;
        let partitions = self.partitions(topic);
        let meta = Arc::clone(&self.inner.meta);
        let timeout = self.timeout();
        blocking(move || {
            (0..partitions)
                .map(|p| {
                    let (_, high) = meta
                        .fetch_watermarks(&name, partition_i32(p)?, timeout)
                        .map_err(unavailable)?;
                    Ok(u64::try_from(high).unwrap_or(0))
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
        self.known(topic)?;
        match &self.inner.dedupe {
            Some(index) => Ok(index
                .lookup(&[idempotency_key.to_vec()])
                .await?
                .pop()
                .flatten()),
            None => Ok(None),
        }
    }

    async fn committed(&self, group: &str, topic: Topic) -> Result<Vec<u64>, LogError> {
        let name = self.known(topic)?;
        let partitions: Vec<u32> = (0..self.partitions(topic)).collect();
        let consumer: BaseConsumer = self.consumer(group)?;
        let timeout = self.timeout();
        blocking(move || committed_of(&consumer, &name, &partitions, timeout)).await
    }
}

/// A group member with statically assigned partitions.
struct KafkaSubscription {
    topic: Topic,
    name: String,
    consumer: Arc<StreamConsumer>,
    owned: Vec<u32>,
    timeout: Duration,
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn poll(&mut self, max: usize, max_wait: Duration) -> Result<Vec<LogRecord>, LogError> {
        let mut out = Vec::new();
        if self.owned.is_empty() || max == 0 {
            tokio::time::sleep(max_wait).await;
            return Ok(out);
        }
        // Wait for the first record, then take what is already fetched.
        // librdkafka reports broker outages as errors in the same queue and
        // reconnects by itself: skip them (a backlog of them must not hold
        // up the records behind), and report one only when nothing came.
        let deadline = tokio::time::Instant::now() + max_wait;
        let mut wait = max_wait;
        let mut last_error = None;
        while out.len() < max {
            match tokio::time::timeout(wait, self.consumer.recv()).await {
                Ok(Ok(m)) => {
                    out.push(to_record(self.topic, &m));
                    wait = Duration::from_millis(1);
                }
                Ok(Err(e)) if transient(&e) => {
                    last_error = Some(e);
                    if out.is_empty() {
                        // Still waiting for the first record.
                        wait = deadline.saturating_duration_since(tokio::time::Instant::now());
                        if wait.is_zero() {
                            break;
                        }
                    }
                }
                Ok(Err(e)) if out.is_empty() => return Err(unavailable(e)),
                // Hand over what was read; the error shows again if it lasts.
                Ok(Err(e)) => {
                    warn!(error = %e, "consumer error after {} records", out.len());
                    break;
                }
                Err(_) => break,
            }
        }
        match last_error {
            Some(e) if out.is_empty() => Err(unavailable(e)),
            _ => Ok(out),
        }
    }

    async fn commit(&mut self, positions: &[(u32, u64)]) -> Result<(), LogError> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in positions {
            tpl.add_partition_offset(
                &self.name,
                partition_i32(*p)?,
                Offset::Offset(offset_i64(*o)?),
            )
            .map_err(unavailable)?;
        }
        let consumer = Arc::clone(&self.consumer);
        let timeout = self.timeout;
        blocking(move || {
            let deadline = std::time::Instant::now() + timeout;
            loop {
                match consumer.commit(&tpl, CommitMode::Sync) {
                    Ok(()) => return Ok(()),
                    Err(e) if retriable(&e) && std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => return Err(unavailable(e)),
                }
            }
        })
        .await?;
        Ok(())
    }

    async fn rewind(&mut self) -> Result<(), LogError> {
        let consumer = Arc::clone(&self.consumer);
        let name = self.name.clone();
        let owned = self.owned.clone();
        let timeout = self.timeout;
        let positions = blocking(move || {
            // The group's committed positions are the truth (another member
            // may have committed before a restart).
            let committed = committed_of(consumer.as_ref(), &name, &owned, timeout)?;
            let mut tpl = TopicPartitionList::new();
            for (p, o) in owned.iter().zip(&committed) {
                tpl.add_partition_offset(
                    &name,
                    partition_i32(*p)?,
                    Offset::Offset(offset_i64(*o)?),
                )
                .map_err(unavailable)?;
            }
            consumer.assign(&tpl).map_err(unavailable)?;
            Ok(committed)
        })
        .await?;
        debug!(topic = %self.topic, partitions = ?self.owned, ?positions, "rewound to committed positions");
        Ok(())
    }
}
