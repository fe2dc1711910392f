//! What the tests of this crate share.

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use cdp_log::embedded::EmbeddedLog;
use cdp_log::{Appended, EventLog, LogError, LogRecord, Membership, Record, Subscription, Topic};

/// The embedded log, whose appends fail while `down` is set.
pub(crate) struct Flaky {
    pub inner: EmbeddedLog,
    pub down: AtomicBool,
}

#[async_trait]
impl EventLog for Flaky {
    async fn append(&self, topic: Topic, records: Vec<Record>) -> Result<Vec<Appended>, LogError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(LogError::Unavailable("the broker is down".into()));
        }
        self.inner.append(topic, records).await
    }
    fn partitions(&self, topic: Topic) -> u32 {
        self.inner.partitions(topic)
    }
    fn deduplicates(&self) -> bool {
        self.inner.deduplicates()
    }
    async fn locate(&self, topic: Topic, key: &[u8]) -> Result<Option<(u32, u64)>, LogError> {
        self.inner.locate(topic, key).await
    }
    async fn subscribe(
        &self,
        group: &str,
        topic: Topic,
        membership: Membership,
    ) -> Result<Box<dyn Subscription>, LogError> {
        self.inner.subscribe(group, topic, membership).await
    }
    async fn read(
        &self,
        topic: Topic,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<LogRecord>, LogError> {
        self.inner.read(topic, partition, from, max).await
    }
    async fn end_offsets(&self, topic: Topic) -> Result<Vec<u64>, LogError> {
        self.inner.end_offsets(topic).await
    }
    async fn committed(&self, group: &str, topic: Topic) -> Result<Vec<u64>, LogError> {
        self.inner.committed(group, topic).await
    }
}
