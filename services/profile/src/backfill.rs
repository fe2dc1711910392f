//! The audience backfill: after the definitions change (a computed trait
//! or a segment created, updated or deleted), every profile of the active
//! generation is brought up to them, page by page
//! (`ProfileStore::backfill_audiences`): a computed trait a customer's
//! state does not know yet is folded from the customer's timeline (and
//! the timelines of the customers it absorbed), and every segment is
//! evaluated again (cause `definition`). Until then a segment over such a
//! trait leaves its memberships as they are, so nobody enters or leaves on
//! half the data.
//!
//! Progress goes to `audience-backfills` (at most once a second, and when
//! done): `AudienceService/GetBackfill` reads it, and a restarted process
//! goes on from its cursor. One process runs it (`pipeline.process_index`
//! 0); a page done twice changes nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cdp_domain::FoldOptions;
use cdp_log::EventLog;
use cdp_pipeline::audience::{BackfillProgress, BackfillState, fingerprint};
use cdp_pipeline::{emit, topic};
use cdp_runtime::Clock;
use cdp_runtime::audiences::AudienceRegistry;
use cdp_store::{LiveStores, ProfileChanges};
use tokio_util::sync::CancellationToken;

/// Profile rows per page.
const PAGE: usize = 256;
/// How often progress is recorded while a backfill runs.
const RECORD_EVERY: Duration = Duration::from_secs(1);
/// Times a page with customers whose rows could not be read is done
/// again (the others change nothing the second time) before the backfill
/// moves on and counts them as failed.
const PAGE_RETRIES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("audience definitions: {0}")]
    Definitions(cdp_log::LogError),
    #[error("profile store: {0}")]
    Store(#[from] cdp_store::StoreError),
    #[error("append to {topic}: {source}")]
    Append {
        topic: &'static str,
        source: cdp_log::LogError,
    },
    #[error("read audience-backfills: {0}")]
    Progress(cdp_log::LogError),
}

pub struct AudienceBackfill {
    log: Arc<dyn EventLog>,
    live: Arc<LiveStores>,
    options: FoldOptions,
    registry: Arc<AudienceRegistry>,
    changes: ProfileChanges,
    announce_on_log: bool,
    clock: Clock,
    /// The progress of the active generation, as last recorded or made.
    progress: Option<BackfillProgress>,
    recorded: Option<Instant>,
    /// Times the current page was done again.
    retries: u32,
}

impl AudienceBackfill {
    pub fn new(
        log: Arc<dyn EventLog>,
        live: Arc<LiveStores>,
        options: FoldOptions,
        registry: Arc<AudienceRegistry>,
        changes: ProfileChanges,
    ) -> Self {
        AudienceBackfill {
            log,
            live,
            options,
            registry,
            changes,
            announce_on_log: false,
            clock: cdp_runtime::system_clock(),
            progress: None,
            recorded: None,
            retries: 0,
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

    /// Does one page of the backfill the definitions need now, if any.
    /// Returns the progress after it (`None`: nothing was to do).
    pub async fn step(&mut self) -> Result<Option<BackfillProgress>, BackfillError> {
        let now = (self.clock)();
        let stores = self.live.current();
        let options =
            cdp_runtime::audiences::fold_options(Some(&self.registry), &self.options, now)
                .await
                .map_err(BackfillError::Definitions)?;
        let Some(defs) = options.audiences.definitions.as_deref() else {
            return Ok(None);
        };
        let wanted = fingerprint(defs);
        if self
            .progress
            .as_ref()
            .is_none_or(|p| p.generation != stores.generation)
        {
            self.progress =
                cdp_runtime::audiences::latest_backfill(self.log.as_ref(), stores.generation)
                    .await
                    .map_err(BackfillError::Progress)?;
        }
        let mut progress = match self.progress.take() {
            Some(p) if p.definitions == wanted && p.state == BackfillState::Done => {
                self.progress = Some(p);
                return Ok(None);
            }
            Some(p) if p.definitions == wanted => p,
            earlier => {
                if let Some(p) = &earlier {
                    tracing::info!(
                        generation = stores.generation,
                        before = %p.definitions,
                        "audience definitions changed; backfilling every profile"
                    );
                }
                BackfillProgress {
                    generation: stores.generation,
                    definitions: wanted,
                    state: BackfillState::Running,
                    scanned: 0,
                    customers_changed: 0,
                    changes: 0,
                    failed: 0,
                    cursor: None,
                    started_at: now,
                    updated_at: now,
                    finished_at: None,
                }
            }
        };
        // Its commit, append and sync together (see
        // `AudienceRegistry::appends`).
        let _alone = self.registry.appends().write().await;
        let page = match stores
            .profiles
            .backfill_audiences(progress.cursor.as_deref(), PAGE, &options)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                self.progress = Some(progress);
                return Err(e.into());
            }
        };
        let customers = page.applied.customers.len() as u64;
        let changed = page.applied.changes.len() as u64;
        let failed = page.applied.failed as u64;
        if let Err(source) = self
            .registry
            .record(stores.generation, page.applied.changes, &options)
            .await
        {
            // The page is done again next time (it changes nothing then,
            // and the outbox keeps its changes).
            self.progress = Some(progress);
            return Err(BackfillError::Append {
                topic: "audience-changes",
                source,
            });
        }
        stores.profiles.sync().await?;
        self.changes.publish(&page.applied.customers);
        if self.announce_on_log && !page.applied.customers.is_empty() {
            let records = page
                .applied
                .customers
                .iter()
                .map(|c| emit::profile_change(*c))
                .collect();
            if let Err(error) = self.log.append(topic::PROFILE_CHANGES, records).await {
                tracing::warn!(%error, "could not announce changed customers");
            }
        }
        progress.customers_changed += customers;
        progress.changes += changed;
        progress.updated_at = now;
        if failed > 0 && self.retries < PAGE_RETRIES {
            // Done again: the customers refreshed change nothing the second
            // time.
            self.retries += 1;
            tracing::warn!(
                failed,
                retry = self.retries,
                "some customers of a backfill page were not refreshed; doing the page again"
            );
            self.progress = Some(progress.clone());
            return Ok(Some(progress));
        }
        self.retries = 0;
        progress.scanned += page.scanned as u64;
        progress.failed += failed;
        progress.cursor = page.next;
        if progress.cursor.is_none() {
            progress.state = BackfillState::Done;
            progress.finished_at = Some(now);
            tracing::info!(
                generation = progress.generation,
                scanned = progress.scanned,
                customers_changed = progress.customers_changed,
                changes = progress.changes,
                failed = progress.failed,
                "audience backfill done"
            );
        }
        let due = self.recorded.is_none_or(|at| at.elapsed() >= RECORD_EVERY);
        if progress.state == BackfillState::Done || due {
            let record = cdp_pipeline::audience::backfill_record(&progress).map_err(|e| {
                BackfillError::Append {
                    topic: "audience-backfills",
                    source: cdp_log::LogError::Invalid(e.to_string()),
                }
            })?;
            let appended = self
                .log
                .append(topic::AUDIENCE_BACKFILLS, vec![record])
                .await;
            if let Err(source) = appended {
                self.progress = Some(progress);
                return Err(BackfillError::Append {
                    topic: "audience-backfills",
                    source,
                });
            }
            self.recorded = Some(Instant::now());
        }
        self.progress = Some(progress.clone());
        Ok(Some(progress))
    }

    /// Looks for work every `every` until `cancel`; a backfill runs page
    /// after page.
    pub async fn run(mut self, every: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            while !cancel.is_cancelled() {
                match self.step().await {
                    Ok(Some(p)) if p.state == BackfillState::Running => continue,
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(%error, "audience backfill paused; trying again");
                        break;
                    }
                }
            }
        }
        tracing::debug!("audience backfill stopped");
    }
}
