//! Live views across processes: when the profile workers run in other
//! processes (the distributed deployment), the query service follows the
//! `profile-changes` topic they announce on and republishes each changed
//! customer on its in-process [`ProfileChanges`], where `WatchProfile` and
//! the console's event stream listen.
//!
//! The follower is a consumer group of its own (one per process, starting at
//! the end of the topic), so every query replica sees every announcement.

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
