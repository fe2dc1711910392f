//! The consumption loop every worker shares: poll a batch, hand it to the
//! handler, and commit positions only once the handler has stored its
//! effects. Failures are retried with exponential back-off; shutdown lets
//! the batch in hand finish and commit.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::{LogRecord, Subscription};

/// A failure worth retrying (the store or the log is down). Records that
/// can never succeed are the handler's to dead-letter, not an error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Retry(pub String);

#[async_trait]
pub trait BatchHandler: Send {
    /// Processes records (in offset order per partition) and stores the
    /// effects durably before returning Ok.
    async fn handle(&mut self, records: &[LogRecord]) -> Result<(), Retry>;
}

#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// For logs and metrics: "identity", "profile".
    pub name: String,
    pub batch_size: usize,
    pub poll_interval: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
}

struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    fn reset(&mut self) {
        self.current = self.min;
    }

    /// Sleeps for the current delay (or until cancelled) and doubles it.
    /// Returns false when cancelled.
    async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.current;
        self.current = (self.current * 2).min(self.max);
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// The positions to commit after `records`: per partition, the offset after the last one.
pub fn next_positions(records: &[LogRecord]) -> Vec<(u32, u64)> {
    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
    for r in records {
        let e = next.entry(r.partition).or_insert(0);
        *e = (*e).max(r.offset + 1);
    }
    next.into_iter().collect()
}

/// Joins `group` on `topic`, retrying with back-off while the log cannot
/// be reached (a new cluster's group coordinator may take a while). None
/// when cancelled first.
pub async fn subscribe(
    log: &dyn crate::EventLog,
    group: &str,
    topic: crate::Topic,
    membership: crate::Membership,
    options: &ConsumerOptions,
    cancel: &CancellationToken,
) -> Option<Box<dyn Subscription>> {
    let mut backoff = Backoff::new(options.retry_min, options.retry_max);
    loop {
        match log.subscribe(group, topic, membership).await {
            Ok(sub) => return Some(sub),
            Err(error) => {
                tracing::warn!(consumer = options.name.as_str(), %error, "cannot join the consumer group; retrying");
                if !backoff.wait(cancel).await {
                    return None;
                }
            }
        }
    }
}

/// Joins `group` on `topic` (retrying) and runs `handler` until `cancel`
/// fires: the whole life of a worker.
pub async fn join_and_run(
    log: &dyn crate::EventLog,
    group: &str,
    topic: crate::Topic,
    membership: crate::Membership,
    handler: &mut dyn BatchHandler,
    options: &ConsumerOptions,
    cancel: CancellationToken,
) {
    if let Some(sub) = subscribe(log, group, topic, membership, options, &cancel).await {
        run(sub, handler, options, cancel).await;
    }
}

/// Runs until `cancel` fires; returns after the batch in hand is committed.
pub async fn run(
    mut sub: Box<dyn Subscription>,
    handler: &mut dyn BatchHandler,
    options: &ConsumerOptions,
    cancel: CancellationToken,
) {
    let name = options.name.as_str();
    let mut backoff = Backoff::new(options.retry_min, options.retry_max);
    tracing::info!(consumer = name, "consumer started");
    'outer: while !cancel.is_cancelled() {
        let polled = tokio::select! {
            _ = cancel.cancelled() => break,
            polled = sub.poll(options.batch_size, options.poll_interval) => polled,
        };
        let records = match polled {
            Ok(r) if r.is_empty() => continue,
            Ok(r) => r,
            Err(error) => {
                tracing::warn!(consumer = name, %error, "poll failed; backing off");
                if !backoff.wait(&cancel).await {
                    break;
                }
                // Whatever the failed poll had read is not handled: read it again.
                if let Err(error) = sub.rewind().await {
                    tracing::warn!(consumer = name, %error, "rewind failed");
                }
                continue;
            }
        };
        while let Err(error) = handler.handle(&records).await {
            tracing::warn!(consumer = name, %error, records = records.len(), "batch failed; retrying");
            if !backoff.wait(&cancel).await {
                // Not committed: the batch is delivered again after a restart.
                break 'outer;
            }
        }
        let positions = next_positions(&records);
        while let Err(error) = sub.commit(&positions).await {
            tracing::warn!(consumer = name, %error, "commit failed; retrying");
            if !backoff.wait(&cancel).await {
                break 'outer;
            }
        }
        backoff.reset();
        tracing::debug!(consumer = name, records = records.len(), "batch committed");
    }
    tracing::info!(consumer = name, "consumer stopped");
}
