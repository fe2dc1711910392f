//! Live views across processes: when the profile workers run in other
//! processes (the distributed deployment), the query service follows the
//! `profile-changes` topic they announce on and republishes each changed
//! customer on its in-process [`ProfileChanges`], where `WatchProfile` and
//! the console's event stream listen.
//!
//! The follower is a consumer group of its own (one per process, starting at
//! the end of the topic), so every query replica sees every announcement.
//!
//! [`follow_erasures`] drops the past views a replica keeps in memory for
//! time travel when an erasure is recorded by another process.

use std::sync::Arc;
use std::time::Duration;

use cdp_domain::CustomerId;
use cdp_log::consumer::ConsumerOptions;
use cdp_log::{EventLog, Membership};
use cdp_pipeline::{emit, group, topic};
use cdp_store::ProfileChanges;
use tokio_util::sync::CancellationToken;

/// Republishes announced changes until `cancel` fires.
pub async fn follow_changes(
    log: Arc<dyn EventLog>,
    changes: ProfileChanges,
    options: ConsumerOptions,
    cancel: CancellationToken,
) {
    let group = group::changes_follower(uuid::Uuid::new_v4());
    let Some(mut sub) = cdp_log::consumer::subscribe(
        log.as_ref(),
        &group,
        topic::PROFILE_CHANGES,
        Membership::default(),
        &options,
        &cancel,
    )
    .await
    else {
        return;
    };
    // Start at the end: what changed before this process started is in the views already.
    match log.end_offsets(topic::PROFILE_CHANGES).await {
        Ok(ends) => {
            let positions: Vec<(u32, u64)> = (0u32..).zip(ends).collect();
            if let Err(error) = sub.commit(&positions).await {
                tracing::warn!(%error, "cannot skip old announcements");
            }
            if let Err(error) = sub.rewind().await {
                tracing::warn!(%error, "cannot skip old announcements");
            }
        }
        Err(error) => tracing::warn!(%error, "cannot skip old announcements"),
    }
    tracing::info!(group, "following profile changes");
    loop {
        let polled = tokio::select! {
            _ = cancel.cancelled() => return,
            p = sub.poll(1024, options.poll_interval) => p,
        };
        match polled {
            Ok(records) => {
                let customers: Vec<CustomerId> = records
                    .iter()
                    .filter_map(emit::read_profile_change)
                    .collect();
                changes.publish(&customers);
            }
            Err(error) => {
                tracing::debug!(%error, "following profile changes: poll failed");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// How often a query replica looks for new erasure records.
const ERASURES_POLL: Duration = Duration::from_secs(1);

/// Drops the past views kept in memory (time travel) whenever a record is
/// appended to the `erasures` topic, until `cancel` fires: the process that
/// carries out an erasure drops its own at once, and this reaches every
/// other query replica within about a second of the request and again of
/// its completion. Only the topic's end offsets are read.
pub async fn follow_erasures(
    log: Arc<dyn EventLog>,
    forget: impl Fn() + Send + 'static,
    cancel: CancellationToken,
) {
    let mut seen: Option<Vec<u64>> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(ERASURES_POLL) => {}
        }
        match log.end_offsets(topic::ERASURES).await {
            Ok(ends) => {
                if seen.as_ref().is_some_and(|before| *before != ends) {
                    forget();
                    tracing::info!("an erasure was recorded: past views dropped");
                }
                seen = Some(ends);
            }
            Err(error) => tracing::warn!(%error, "cannot read the end of the erasures topic"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use cdp_log::{EmbeddedLog, Record};

    use super::*;

    /// A record on `erasures` makes a replica drop its past views; nothing
    /// else does.
    #[tokio::test]
    async fn an_erasure_recorded_elsewhere_drops_the_past_views() {
        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn EventLog> =
            Arc::new(EmbeddedLog::open(dir.path(), &topic::ALL, 2).unwrap());
        let record = || Record {
            key: b"request".to_vec(),
            value: b"{}".to_vec(),
            headers: Vec::new(),
            idempotency_key: None,
        };
        // Before the follower starts: not its business.
        log.append(topic::ERASURES, vec![record()]).await.unwrap();
        let forgotten = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let counter = Arc::clone(&forgotten);
        let task = tokio::spawn(follow_erasures(
            Arc::clone(&log),
            move || {
                counter.fetch_add(1, Ordering::SeqCst);
            },
            cancel.clone(),
        ));
        tokio::time::sleep(ERASURES_POLL * 2 + Duration::from_millis(200)).await;
        log.append(topic::PROFILE_CHANGES, vec![record()])
            .await
            .unwrap();
        tokio::time::sleep(ERASURES_POLL * 2).await;
        assert_eq!(forgotten.load(Ordering::SeqCst), 0);
        log.append(topic::ERASURES, vec![record()]).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while forgotten.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never dropped");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(forgotten.load(Ordering::SeqCst), 1);
    }
}
