//! The audit writer of a process: entries are sealed into this process's
//! hash chain (`cdp_pipeline::audit`) and appended to the `audit` topic in
//! batches by one task, so concurrent requests share appends and the chain
//! stays in order. A request waits until its entry is in the log.

use std::sync::Arc;

use cdp_log::EventLog;
use cdp_pipeline::audit::{self, Chain};
use cdp_pipeline::{AuditEntry, topic};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::ServiceError;

type Ack = oneshot::Sender<Result<(), ServiceError>>;

/// Hands entries to the writer task.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<(AuditEntry, Ack)>,
}

/// Most entries sealed into one append.
const BATCH: usize = 512;

impl Auditor {
    /// The auditor and its writer (run it as a task).
    pub fn start(
        log: Arc<dyn EventLog>,
        cancel: CancellationToken,
    ) -> (Auditor, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::channel(4096);
        (Auditor { tx }, write(log, rx, cancel))
    }

    /// Records `entry`; fails when it could not be written.
    pub async fn record(&self, entry: AuditEntry) -> Result<(), ServiceError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send((entry, ack))
            .await
            .map_err(|_| ServiceError::Unavailable("the audit writer has stopped".into()))?;
        done.await
            .map_err(|_| ServiceError::Unavailable("the audit writer has stopped".into()))?
    }
}

async fn write(
    log: Arc<dyn EventLog>,
    mut rx: mpsc::Receiver<(AuditEntry, Ack)>,
    cancel: CancellationToken,
) {
    let mut chain = Chain::new(uuid::Uuid::now_v7().to_string());
    tracing::info!(chain = chain.id(), "audit chain started");
    loop {
        let first = tokio::select! {
            biased;
            got = rx.recv() => got,
            _ = cancel.cancelled() => None,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        flush(log.as_ref(), &mut chain, batch).await;
    }
    // Whatever was queued before the stop is still written.
    rx.close();
    let mut rest = Vec::new();
    while let Ok(next) = rx.try_recv() {
        rest.push(next);
    }
    if !rest.is_empty() {
        flush(log.as_ref(), &mut chain, rest).await;
    }
    tracing::info!(chain = chain.id(), "audit writer stopped");
}

async fn flush(log: &dyn EventLog, chain: &mut Chain, batch: Vec<(AuditEntry, Ack)>) {
    let (entries, acks): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    let sealed = chain.seal(entries);
    let result = match sealed
        .iter()
        .map(audit::record)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(records) => log
            .append(topic::AUDIT, records)
            .await
            .map(|_| ())
            .map_err(|e| ServiceError::Unavailable(format!("the audit log is unavailable: {e}"))),
        Err(e) => Err(ServiceError::Internal(format!("audit record: {e}"))),
    };
    match &result {
        Ok(()) => chain.commit(&sealed),
        Err(error) => tracing::error!(%error, "audit records not written"),
    }
    for ack in acks {
        let _ = ack.send(result.clone());
    }
}
