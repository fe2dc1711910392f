//! The audit writer of a process: entries are sealed into this process's
//! hash chain (`cdp_pipeline::audit`) and appended to the `audit` topic in
//! batches by one task, so concurrent requests share appends and the chain
//! stays in order.
//!
//! How long a request waits is `access.audit_wait`: `queued` (the default)
//! answers once the entry is in the writer's queue, which appends what
//! gathered within 10 ms; once an append fails or takes over a second, every
//! audited request waits for its own record and is refused if that fails
//! too, so no data leaves unrecorded while the log is down. Queued entries
//! of a failed append are written first by the next one; a crash can lose
//! the entries not yet appended (about 10 ms of reads). `durable`
//! answers only once the entry is durable in the log, at the cost of a
//! synced append per request (about a millisecond on the embedded log).

use std::sync::Arc;

use cdp_log::EventLog;
use cdp_pipeline::audit::{self, Chain};
use cdp_pipeline::{AuditEntry, topic};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::ServiceError;

type Ack = Option<oneshot::Sender<Result<(), ServiceError>>>;

/// Hands entries to the writer task.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<(AuditEntry, Ack)>,
    /// Wait until each entry is durable.
    durable: bool,
    /// Why the last append failed, while appends fail.
    failing: Arc<std::sync::RwLock<Option<String>>>,
}

/// Most entries sealed into one append.
const BATCH: usize = 512;

/// How long the writer gathers queued entries before an append.
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);

impl Auditor {
    /// The auditor and its writer (run it as a task).
    pub fn start(
        log: Arc<dyn EventLog>,
        durable: bool,
        cancel: CancellationToken,
    ) -> (Auditor, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::channel(4096);
        let failing = Arc::new(std::sync::RwLock::new(None));
        let writer = write(log, rx, Arc::clone(&failing), cancel);
        (
            Auditor {
                tx,
                durable,
                failing,
            },
            writer,
        )
    }

    /// Records `entry` (see the module docs for when it returns); fails
    /// when it could not be, or while the log refuses audit records.
    pub async fn record(&self, entry: AuditEntry) -> Result<(), ServiceError> {
        self.record_with(entry, self.durable).await
    }

    /// Records `entry` and waits until it is durable, and with it every
    /// entry queued before it (admin changes; reads of the audit itself,
    /// which then see every record written before them).
    pub async fn record_durable(&self, entry: AuditEntry) -> Result<(), ServiceError> {
        self.record_with(entry, true).await
    }

    async fn record_with(&self, entry: AuditEntry, durable: bool) -> Result<(), ServiceError> {
        let stopped = || ServiceError::Unavailable("the audit writer has stopped".into());
        // While appends fail, every request waits for its own record: it is
        // refused if that fails too, and the first success heals the writer.
        let failing = self.failing.read().map_or(true, |f| f.is_some());
        if !durable && !failing {
            return self.tx.send((entry, None)).await.map_err(|_| stopped());
        }
        let (ack, done) = oneshot::channel();
        self.tx
            .send((entry, Some(ack)))
            .await
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())?
    }
}

async fn write(
    log: Arc<dyn EventLog>,
    mut rx: mpsc::Receiver<(AuditEntry, Ack)>,
    failing: Arc<std::sync::RwLock<Option<String>>>,
    cancel: CancellationToken,
) {
    let mut chain = Chain::new(uuid::Uuid::now_v7().to_string());
    tracing::info!(chain = chain.id(), "audit chain started");
    // Queued entries whose append failed: written first by the next append.
    let mut retry: Vec<AuditEntry> = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            got = rx.recv() => got,
            _ = cancel.cancelled() => None,
        };
        let Some(first) = first else { break };
        // Nobody waits on a queued entry: let the next moment's entries
        // gather (without waking this task for each), so a busy process
        // makes one append per many reads.
        if first.1.is_none() && !cancel.is_cancelled() {
            tokio::select! {
                _ = tokio::time::sleep(LINGER) => {}
                _ = cancel.cancelled() => {}
            }
        }
        let mut batch: Vec<(AuditEntry, Ack)> = retry.drain(..).map(|e| (e, None)).collect();
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        retry = flush(log.as_ref(), &mut chain, batch, &failing).await;
    }
    // Whatever was queued before the stop is still written.
    rx.close();
    let mut rest: Vec<(AuditEntry, Ack)> = retry.drain(..).map(|e| (e, None)).collect();
    while let Ok(next) = rx.try_recv() {
        rest.push(next);
    }
    if !rest.is_empty() {
        let lost = flush(log.as_ref(), &mut chain, rest, &failing).await;
        if !lost.is_empty() {
            tracing::error!(
                records = lost.len(),
                "audit records lost at shutdown: the log refused them"
            );
        }
    }
    tracing::info!(chain = chain.id(), "audit writer stopped");
}

/// An append slower than this makes every request wait for its own record
/// until an append succeeds again (a hung log must not let reads go on
/// unrecorded).
const SLOW: std::time::Duration = std::time::Duration::from_secs(1);

/// Most queued entries kept for a retry while the log refuses appends.
const MAX_RETRY: usize = 8 * BATCH;

/// Appends a batch; returns the queued entries to try again (none when it
/// was written).
async fn flush(
    log: &dyn EventLog,
    chain: &mut Chain,
    batch: Vec<(AuditEntry, Ack)>,
    failing: &std::sync::RwLock<Option<String>>,
) -> Vec<AuditEntry> {
    let set_failing = |why: Option<String>| {
        if let Ok(mut f) = failing.write() {
            *f = why;
        }
    };
    let (entries, acks): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    let queued: Vec<bool> = acks.iter().map(Option::is_none).collect();
    let sealed = chain.seal(entries);
    let result = match sealed
        .iter()
        .map(audit::record)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(records) => {
            let append = log.append(topic::AUDIT, records);
            tokio::pin!(append);
            let appended = tokio::select! {
                r = &mut append => r,
                _ = tokio::time::sleep(SLOW) => {
                    set_failing(Some("the audit log is slow".into()));
                    append.await
                }
            };
            appended.map(|_| ()).map_err(|e| {
                ServiceError::Unavailable(format!("the audit log is unavailable: {e}"))
            })
        }
        Err(e) => Err(ServiceError::Internal(format!("audit record: {e}"))),
    };
    let mut retry = Vec::new();
    match &result {
        Ok(()) => {
            chain.commit(&sealed);
            set_failing(None);
        }
        Err(error) => {
            // Requests that waited are refused; queued entries (their reads
            // were answered) are kept and written first by the next append.
            retry = sealed
                .into_iter()
                .zip(&queued)
                .filter(|(_, q)| **q)
                .map(|(s, _)| s.entry)
                .collect();
            if retry.len() > MAX_RETRY {
                let lost = retry.len() - MAX_RETRY;
                retry.drain(..lost);
                tracing::error!(
                    records = lost,
                    "audit records lost: the log refused them too long"
                );
            }
            tracing::error!(%error, kept = retry.len(), "audit records not written yet");
            set_failing(Some(error.to_string()));
        }
    }
    for ack in acks.into_iter().flatten() {
        let _ = ack.send(result.clone());
    }
    retry
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use cdp_log::LogError;
    use cdp_log::embedded::EmbeddedLog;

    use super::*;
    use crate::testing::Flaky;

    fn entry(actor: &str) -> AuditEntry {
        AuditEntry {
            actor: actor.into(),
            outcome: "allowed".into(),
            ..AuditEntry::default()
        }
    }

    async fn stored(log: &dyn EventLog) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        cdp_log::scan::<LogError>(log, topic::AUDIT, 100, |r| {
            out.push(r.value.clone());
            Ok(())
        })
        .await
        .unwrap();
        out
    }

    #[tokio::test]
    async fn queued_entries_reach_the_chain_and_a_down_log_refuses_reads_until_it_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Flaky {
            inner: EmbeddedLog::open(dir.path(), &cdp_pipeline::topic::ALL, 2).unwrap(),
            down: AtomicBool::new(false),
        });
        let cancel = CancellationToken::new();
        let (auditor, writer) = Auditor::start(log.clone(), false, cancel.clone());
        let writer = tokio::spawn(writer);
        for who in ["a", "b", "c"] {
            auditor.record(entry(who)).await.unwrap();
        }
        tokio::time::sleep(LINGER * 5).await;
        let lines = stored(log.as_ref()).await;
        assert_eq!(lines.len(), 3);
        assert!(audit::verify(lines.iter().map(Vec::as_slice)).ok());

        // The log goes down: the queued entry is kept for the next append,
        // and from then on every request waits for its own record and is refused.
        log.down.store(true, Ordering::SeqCst);
        auditor.record(entry("lost")).await.unwrap();
        tokio::time::sleep(LINGER * 5).await;
        let refused = auditor.record(entry("d")).await.unwrap_err();
        assert!(
            refused.to_string().contains("the broker is down"),
            "{refused}"
        );
        // Back up: the next request's own record heals the writer.
        log.down.store(false, Ordering::SeqCst);
        auditor.record(entry("e")).await.unwrap();
        auditor.record(entry("f")).await.unwrap();
        cancel.cancel();
        writer.await.unwrap();
        let lines = stored(log.as_ref()).await;
        let actors: Vec<String> = lines
            .iter()
            .map(|l| audit::decode(l).unwrap().entry().actor.clone())
            .collect();
        assert_eq!(actors, ["a", "b", "c", "lost", "e", "f"]);
        let v = audit::verify(lines.iter().map(Vec::as_slice));
        assert!(v.ok(), "{:?}", v.problems);
    }
}
