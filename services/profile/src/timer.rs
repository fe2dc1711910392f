//! The audience timers: a windowed computed trait lets its events go on
//! time, not at the customer's next event. The profile store indexes every
//! live profile by the instant its audience state is next due
//! (`Audience::due`, written with the row); the timer reads the entries
//! that have come, re-evaluates those customers
//! (`ProfileStore::expire_audiences`), appends the `Entered`/`Exited`
//! records to `audience-changes`, and only then makes the store durable.
//!
//! Crash-safe on the embedded store: a crash before the sync forgets the
//! expiry, so the entry is found and fired again, and the changes it makes
//! again carry the same idempotency keys (an expiry is named by the instant
//! it was due at). Restarts and rebuilds lose nothing: the entries are
//! rows of the store, and a rebuild writes them with the profiles it folds.

use std::sync::Arc;
use std::time::Duration;

use cdp_domain::FoldOptions;
use cdp_log::EventLog;
use cdp_pipeline::{emit, topic};
use cdp_runtime::Clock;
use cdp_runtime::audiences::AudienceRegistry;
use cdp_store::{LiveStores, ProfileChanges};
use tokio_util::sync::CancellationToken;

/// Timers fired in one round at most (a round that fires this many goes
/// on at once).
const ROUND: usize = 512;

pub struct AudienceTimer {
    log: Arc<dyn EventLog>,
    live: Arc<LiveStores>,
    options: FoldOptions,
    registry: Arc<AudienceRegistry>,
    changes: ProfileChanges,
    announce_on_log: bool,
    clock: Clock,
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Timer entries read (due now).
    pub due: usize,
    /// Membership changes appended.
    pub appended: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TimerError {
    #[error("audience definitions: {0}")]
    Definitions(cdp_log::LogError),
    #[error("profile store: {0}")]
    Store(#[from] cdp_store::StoreError),
    #[error("append to audience-changes: {0}")]
    Append(cdp_log::LogError),
}

impl AudienceTimer {
    pub fn new(
        log: Arc<dyn EventLog>,
        live: Arc<LiveStores>,
        options: FoldOptions,
        registry: Arc<AudienceRegistry>,
        changes: ProfileChanges,
    ) -> Self {
        AudienceTimer {
            log,
            live,
            options,
            registry,
            changes,
            announce_on_log: false,
            clock: cdp_runtime::system_clock(),
        }
    }

    /// Reads the time from `clock` instead of the system clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Announces changed customers on the log too (distributed deployments).
    pub fn announce_on_log(mut self, on: bool) -> Self {
        self.announce_on_log = on;
        self
    }

    /// Fires the timers due now in the active generation, at most
    /// [`ROUND`] of them.
    pub async fn round(&mut self) -> Result<Round, TimerError> {
        let now = (self.clock)();
        let stores = self.live.current();
        let options =
            cdp_runtime::audiences::fold_options(Some(&self.registry), &self.options, now)
                .await
                .map_err(TimerError::Definitions)?;
        let due = stores.profiles.due_audiences(now, ROUND).await?;
        // Its commit, append and sync together (see
        // `AudienceRegistry::appends`).
        let _alone = self.registry.appends().write().await;
        let applied = stores.profiles.expire_audiences(&due, &options).await?;
        // Appended before the expiry is durable: a crash in between fires
        // the timer again rather than losing its changes.
        let appended = self
            .registry
            .record(stores.generation, applied.changes, &options)
            .await
            .map_err(TimerError::Append)?;
        if !due.is_empty() || appended > 0 {
            stores.profiles.sync().await?;
        }
        self.changes.publish(&applied.customers);
        if self.announce_on_log && !applied.customers.is_empty() {
            let records = applied
                .customers
                .iter()
                .map(|c| emit::profile_change(*c))
                .collect();
            if let Err(error) = self.log.append(topic::PROFILE_CHANGES, records).await {
                tracing::warn!(%error, "could not announce changed customers");
            }
        }
        if applied.failed > 0 {
            tracing::warn!(
                failed = applied.failed,
                "audience timers of some customers not run (their rows could not be read)"
            );
        }
        if !due.is_empty() {
            tracing::debug!(
                due = due.len(),
                changes = appended,
                generation = stores.generation,
                "audience timers fired"
            );
        }
        Ok(Round {
            due: due.len(),
            appended,
        })
    }

    /// Runs rounds every `every` until `cancel`, at once again after a
    /// full round.
    pub async fn run(mut self, every: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            loop {
                match self.round().await {
                    Ok(round) if round.due >= ROUND && !cancel.is_cancelled() => continue,
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(%error, "audience timers not run; trying again");
                        break;
                    }
                }
            }
        }
        tracing::debug!("audience timers stopped");
    }
}
