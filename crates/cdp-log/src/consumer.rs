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
    /// effects, visible at once; durable now or by the next
    /// [`sync`](Self::sync).
    async fn handle(&mut self, records: &[LogRecord]) -> Result<(), Retry>;

    /// Makes the effects of every handled batch durable. The loop calls it
    /// before it commits positions, so positions never run ahead of what
    /// is stored.
    async fn sync(&mut self) -> Result<(), Retry> {
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// For logs and metrics: "identity", "profile".
    pub name: String,
    pub batch_size: usize,
    pub poll_interval: Duration,
    /// Longest time handled batches wait for their positions to be synced
    /// and committed while records keep coming (an idle consumer commits at
    /// once). Longer means fewer syncs, and more records delivered again
    /// after a crash.
    pub commit_interval: Duration,
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

/// Runs until `cancel` fires; returns after the batches in hand are synced
/// and committed.
pub async fn run(
    mut sub: Box<dyn Subscription>,
    handler: &mut dyn BatchHandler,
    options: &ConsumerOptions,
    cancel: CancellationToken,
) {
    let name = options.name.as_str();
    let mut backoff = Backoff::new(options.retry_min, options.retry_max);
    // Positions of handled batches not committed yet, and since when.
    let mut pending: BTreeMap<u32, u64> = BTreeMap::new();
    let mut pending_since = tokio::time::Instant::now();
    tracing::info!(consumer = name, "consumer started");
    'outer: while !cancel.is_cancelled() {
        let polled = tokio::select! {
            _ = cancel.cancelled() => break,
            polled = sub.poll(options.batch_size, options.poll_interval) => polled,
        };
        let records = match polled {
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
        if !records.is_empty() {
            while let Err(error) = handler.handle(&records).await {
                tracing::warn!(consumer = name, %error, records = records.len(), "batch failed; retrying");
                if !backoff.wait(&cancel).await {
                    // Not committed: the batch is delivered again after a restart.
                    break 'outer;
                }
            }
            if pending.is_empty() {
                pending_since = tokio::time::Instant::now();
            }
            for (partition, next) in next_positions(&records) {
                let e = pending.entry(partition).or_insert(next);
                *e = (*e).max(next);
            }
            backoff.reset();
            tracing::debug!(consumer = name, records = records.len(), "batch handled");
        }
        // Commit once the interval is up, or when idle: nothing is gained
        // by waiting longer then.
        let due = records.is_empty() || pending_since.elapsed() >= options.commit_interval;
        if due
            && !commit(
                sub.as_mut(),
                handler,
                &mut pending,
                &mut backoff,
                &cancel,
                name,
            )
            .await
        {
            break;
        }
    }
    // Shutdown or a generation switch: what was handled is committed, if
    // the store and the log answer within a few retries.
    if !pending.is_empty() {
        let not_cancelled = CancellationToken::new();
        let last_try = commit(
            sub.as_mut(),
            handler,
            &mut pending,
            &mut backoff,
            &not_cancelled,
            name,
        );
        if tokio::time::timeout(FINAL_COMMIT, last_try).await.is_err() {
            tracing::warn!(
                consumer = name,
                "positions not committed at stop; their records will be delivered again"
            );
        }
    }
    tracing::info!(consumer = name, "consumer stopped");
}

/// How long a stopping consumer tries to commit what it handled.
const FINAL_COMMIT: Duration = Duration::from_secs(5);

/// Syncs the handler and commits `pending`, retrying with back-off. False
/// when cancelled before it succeeded (positions stay uncommitted, and
/// their records are delivered again after a restart).
async fn commit(
    sub: &mut dyn Subscription,
    handler: &mut dyn BatchHandler,
    pending: &mut BTreeMap<u32, u64>,
    backoff: &mut Backoff,
    cancel: &CancellationToken,
    name: &str,
) -> bool {
    if pending.is_empty() {
        return true;
    }
    while let Err(error) = handler.sync().await {
        tracing::warn!(consumer = name, %error, "sync failed; retrying");
        if !backoff.wait(cancel).await {
            return false;
        }
    }
    let positions: Vec<(u32, u64)> = pending.iter().map(|(p, o)| (*p, *o)).collect();
    while let Err(error) = sub.commit(&positions).await {
        tracing::warn!(consumer = name, %error, "commit failed; retrying");
        if !backoff.wait(cancel).await {
            return false;
        }
    }
    pending.clear();
    backoff.reset();
    tracing::debug!(consumer = name, "positions committed");
    true
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::embedded::EmbeddedLog;
    use crate::{EventLog, Membership, Record, Topic};

    const TOPIC: Topic = Topic::new("test");

    /// Records how many records it handled, and how many of them were
    /// handled when positions could last have been committed (its syncs).
    #[derive(Default)]
    struct Counting {
        handled: usize,
        synced: Arc<Mutex<Vec<usize>>>,
    }

    #[async_trait]
    impl BatchHandler for Counting {
        async fn handle(&mut self, records: &[LogRecord]) -> Result<(), Retry> {
            self.handled += records.len();
            Ok(())
        }
        async fn sync(&mut self) -> Result<(), Retry> {
            self.synced
                .lock()
                .map_err(|e| Retry(e.to_string()))?
                .push(self.handled);
            Ok(())
        }
    }

    fn options(commit_interval: Duration) -> ConsumerOptions {
        ConsumerOptions {
            name: "test".into(),
            batch_size: 4,
            poll_interval: Duration::from_millis(20),
            commit_interval,
            retry_min: Duration::from_millis(5),
            retry_max: Duration::from_millis(50),
        }
    }

    async fn append(log: &EmbeddedLog, n: usize) {
        let records = (0..n)
            .map(|i| Record {
                key: format!("k{i}").into_bytes(),
                value: vec![1, 2, 3],
                ..Record::default()
            })
            .collect();
        log.append(TOPIC, records).await.unwrap();
    }

    async fn committed(log: &EmbeddedLog) -> u64 {
        log.committed("g", TOPIC).await.unwrap().iter().sum()
    }

    /// A consumer of `n` records with `commit_interval`, run until every
    /// position is committed and then stopped: the handled count at each
    /// sync, and the records handled in all.
    async fn consume(n: usize, commit_interval: Duration) -> (Vec<usize>, usize) {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), &[TOPIC], 1).unwrap();
        append(&log, n).await;
        let synced = Arc::new(Mutex::new(Vec::new()));
        let mut handler = Counting {
            handled: 0,
            synced: Arc::clone(&synced),
        };
        let sub = log
            .subscribe("g", TOPIC, Membership::default())
            .await
            .unwrap();
        let cancel = CancellationToken::new();
        let opts = options(commit_interval);
        let run = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                run(sub, &mut handler, &opts, cancel).await;
                handler.handled
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while committed(&log).await < n as u64 {
            assert!(tokio::time::Instant::now() < deadline, "never committed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Positions never run ahead of a sync.
        let at_commit = synced.lock().unwrap().clone();
        cancel.cancel();
        let handled = run.await.unwrap();
        (at_commit, handled)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn positions_are_committed_after_a_sync_and_at_stop() {
        // An interval longer than the test: three batches of up to 4 are
        // handled, then the idle poll syncs once and commits.
        let (synced, handled) = consume(10, Duration::from_secs(3600)).await;
        assert_eq!(synced, vec![10]);
        assert_eq!(handled, 10);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_consumer_commits_every_interval() {
        // A zero interval: every batch is synced and committed as it is handled.
        let (synced, handled) = consume(40, Duration::ZERO).await;
        assert_eq!(synced, vec![4, 8, 12, 16, 20, 24, 28, 32, 36, 40]);
        assert_eq!(handled, 40);
    }
}
