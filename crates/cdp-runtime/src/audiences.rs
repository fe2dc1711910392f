//! The audience definitions as a process knows them: the
//! `audience-definitions` topic folded (`cdp_pipeline::audience`), read
//! again when the topic grows, looked at no more than once per interval;
//! and what every fold with them does around the store: the options it
//! folds with ([`fold_options`]) and the changes it appends
//! ([`ChangeOutbox`]).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdp_domain::audience::{Change, Definitions};
use cdp_domain::profile::AudienceOptions;
use cdp_domain::{CustomerId, FoldOptions, UnixMillis};
use cdp_log::{EventLog, LogError, Record};
use cdp_pipeline::audience::{DefinitionChange, DefinitionSet, MembershipChange};
use cdp_pipeline::topic;

struct Known {
    /// The topic's end offsets when it was last read.
    ends: Option<Vec<u64>>,
    set: DefinitionSet,
    usable: Arc<Definitions>,
    /// When the topic was last read successfully (none before the first
    /// success: until then there are no definitions to give, not an
    /// empty set, which would make every member exit).
    checked: Option<Instant>,
}

/// The definitions of one process, shared by its workers and services.
pub struct AudienceRegistry {
    log: Arc<dyn EventLog>,
    every: Duration,
    known: tokio::sync::Mutex<Known>,
    appends: tokio::sync::RwLock<()>,
    /// The changes of every fold of this process not appended yet, in
    /// the order they were made.
    outbox: Arc<Outbox>,
}

/// Changes queued (held briefly, never across an append) and the one
/// append under way at a time (an append takes the oldest changes queued
/// and removes them only once the log has them, so a cancelled append
/// loses nothing).
#[derive(Default)]
struct Outbox {
    queued: std::sync::Mutex<Queued>,
    appending: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Queued {
    changes: ChangeOutbox,
    /// A task appends in the background (see [`AudienceRegistry::queue`]).
    flushing: bool,
    /// That task, to replace it if it ended without saying so (a panic).
    drain: Option<tokio::task::JoinHandle<()>>,
    /// The last append failed: until one succeeds, a fold waits for its
    /// own (and fails with it, as when the log is down).
    failed: bool,
}

/// Past this many changes queued, a fold waits for their append.
const QUEUED_AT_MOST: usize = 20_000;

impl Outbox {
    fn queued(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends the changes queued when it starts, oldest first. A failure
    /// is remembered until an append succeeds: folds wait for theirs
    /// meanwhile.
    async fn flush(&self, log: &dyn EventLog) -> Result<usize, LogError> {
        let _one = self.appending.lock().await;
        let records = self.queued().changes.pending.clone();
        let count = records.len();
        if count == 0 {
            return Ok(0);
        }
        let appended = log.append(topic::AUDIENCE_CHANGES, records).await;
        let mut queued = self.queued();
        queued.failed = appended.is_err();
        appended?;
        queued.changes.pending.drain(..count);
        Ok(count)
    }

    /// Appends until nothing is queued (or an append fails: the changes
    /// stay queued for the next fold or sync), then says it stopped.
    async fn drain(self: Arc<Self>, log: Arc<dyn EventLog>) {
        loop {
            if let Err(error) = self.flush(log.as_ref()).await {
                tracing::warn!(%error, "membership changes not appended yet; the next fold waits for them");
                self.queued().flushing = false;
                return;
            }
            let mut queued = self.queued();
            if queued.changes.pending.is_empty() {
                queued.flushing = false;
                return;
            }
        }
    }
}

impl AudienceRegistry {
    /// Looks at the topic's end at most once per `every`.
    pub fn new(log: Arc<dyn EventLog>, every: Duration) -> Self {
        AudienceRegistry {
            log,
            every,
            known: tokio::sync::Mutex::new(Known {
                ends: None,
                set: DefinitionSet::default(),
                usable: Arc::new(Definitions::default()),
                checked: None,
            }),
            appends: tokio::sync::RwLock::new(()),
            outbox: Arc::default(),
        }
    }

    /// Queues the changes a fold of generation `generation` made with
    /// `options` (into the process's one outbox, before anything can
    /// fail) and appends every change queued. Returns how many were
    /// appended.
    pub async fn record(
        &self,
        generation: u32,
        changes: Vec<(CustomerId, Change)>,
        options: &FoldOptions,
    ) -> Result<usize, LogError> {
        self.outbox
            .queued()
            .changes
            .queue(generation, changes, options);
        self.outbox.flush(self.log.as_ref()).await
    }

    /// Queues the changes as [`record`](Self::record) does, and appends
    /// them in the background: a profile worker folds its next batch
    /// while the log writes this one's. It first waits for the append
    /// under way, so the changes not in the log yet are at most those of
    /// two batches (one being appended, one queued), as few as when a
    /// fold waited for its own append plus one batch. Nothing is lost by
    /// not waiting longer: the positions of a batch are committed only
    /// after a sync, and a sync first appends what is queued
    /// ([`flush_pending`](Self::flush_pending)), as do the timers and the
    /// backfill before theirs. While appends fail (or past
    /// [`QUEUED_AT_MOST`] queued) it waits for this append, and its error
    /// is the fold's: a worker goes no further while the log is down.
    pub async fn queue(
        &self,
        generation: u32,
        changes: Vec<(CustomerId, Change)>,
        options: &FoldOptions,
    ) -> Result<(), LogError> {
        drop(self.outbox.appending.lock().await);
        let start = {
            let mut queued = self.outbox.queued();
            queued.changes.queue(generation, changes, options);
            if queued.failed || queued.changes.pending.len() >= QUEUED_AT_MOST {
                None
            } else {
                let idle = !queued.flushing
                    || queued
                        .drain
                        .as_ref()
                        .is_some_and(tokio::task::JoinHandle::is_finished);
                let start = idle && !queued.changes.pending.is_empty();
                queued.flushing |= start;
                Some(start)
            }
        };
        match start {
            None => self.outbox.flush(self.log.as_ref()).await.map(drop),
            Some(true) => {
                let drain = tokio::spawn(Arc::clone(&self.outbox).drain(Arc::clone(&self.log)));
                self.outbox.queued().drain = Some(drain);
                Ok(())
            }
            Some(false) => Ok(()),
        }
    }

    /// Appends the changes queued. A sync calls it first (holding
    /// [`appends`](Self::appends) alone, [`hold_for_sync`](Self::hold_for_sync))
    /// and does not run when it fails: no commit is made durable while its
    /// changes are not in the log, whichever task made them.
    pub async fn flush_pending(&self) -> Result<usize, LogError> {
        self.outbox.flush(self.log.as_ref()).await
    }

    /// Holds [`appends`](Self::appends) alone with everything queued
    /// appended: what a durable commit (a profile worker's sync, an
    /// erasure) holds while it makes every fold committed before it
    /// durable. An error when the append failed (the commit must not run).
    pub async fn hold_for_sync(&self) -> Result<tokio::sync::RwLockWriteGuard<'_, ()>, LogError> {
        let alone = self.appends.write().await;
        self.flush_pending().await?;
        Ok(alone)
    }

    /// Orders the store writes of a process's profile workers, audience
    /// timers and backfill with the appends of their changes: a fold
    /// holds it shared from its store commit to the queueing of its
    /// changes, and a sync (which makes every commit before it durable)
    /// holds it alone and appends everything queued first. So no sync
    /// makes a commit durable whose changes are not appended yet (a crash
    /// then would lose them: the redelivered events find themselves
    /// folded), and the changes of one customer are appended in the order
    /// they were made (one queue, appended oldest first).
    pub fn appends(&self) -> &tokio::sync::RwLock<()> {
        &self.appends
    }

    /// The definitions a fold evaluates now; an error until the topic was
    /// read once.
    pub async fn current(&self) -> Result<Arc<Definitions>, LogError> {
        let mut known = self.known.lock().await;
        if known.checked.is_none_or(|at| at.elapsed() >= self.every)
            && let Err(e) = self.read(&mut known).await
        {
            // Read once already: go on with those definitions.
            if known.checked.is_none() {
                return Err(e);
            }
            tracing::warn!(error = %e, "audience definitions not read again; using the last ones");
        }
        Ok(Arc::clone(&known.usable))
    }

    /// The folded set, read again first (a writer checks a change
    /// against it).
    pub async fn latest(&self) -> Result<DefinitionSet, LogError> {
        let mut known = self.known.lock().await;
        self.read(&mut known).await?;
        Ok(known.set.clone())
    }

    /// Appends a change (after the caller checked it against
    /// [`latest`](Self::latest)) and reads the topic again.
    pub async fn append(&self, change: &DefinitionChange) -> Result<(), LogError> {
        let record = cdp_pipeline::audience::definition_record(change)
            .map_err(|e| LogError::Invalid(format!("definition record: {e}")))?;
        self.log
            .append(topic::AUDIENCE_DEFINITIONS, vec![record])
            .await?;
        let mut known = self.known.lock().await;
        self.read(&mut known).await
    }

    async fn read(&self, known: &mut Known) -> Result<(), LogError> {
        let started = Instant::now();
        let ends = self.log.end_offsets(topic::AUDIENCE_DEFINITIONS).await?;
        if known.ends.as_ref() == Some(&ends) {
            known.checked = Some(started);
            return Ok(());
        }
        let mut set = DefinitionSet::default();
        cdp_log::scan::<LogError>(self.log.as_ref(), topic::AUDIENCE_DEFINITIONS, 512, |r| {
            match cdp_pipeline::audience::read_definition(r) {
                Ok(change) => set.apply(change),
                Err(error) => {
                    // Written by a newer build, say: its name is held (its
                    // members stay) rather than taken for deleted.
                    tracing::warn!(
                        partition = r.partition,
                        offset = r.offset,
                        %error,
                        "an unreadable audience definition record"
                    );
                    set.hold_unreadable(&r.key);
                }
            }
            Ok(())
        })
        .await?;
        let (usable, problems) = set.usable();
        for (what, error) in problems {
            tracing::warn!(%what, field = %error.field, "an audience definition set aside");
        }
        tracing::info!(
            traits = usable.traits.len(),
            segments = usable.segments.len(),
            "audience definitions read"
        );
        known.usable = Arc::new(usable);
        known.set = set;
        known.ends = Some(ends);
        known.checked = Some(started);
        Ok(())
    }
}

/// `base` with the definitions `registry` holds now, evaluated at `now`
/// (`base` itself without a registry: the audience state is left alone).
pub async fn fold_options<'a>(
    registry: Option<&AudienceRegistry>,
    base: &'a FoldOptions,
    now: UnixMillis,
) -> Result<Cow<'a, FoldOptions>, LogError> {
    let Some(registry) = registry else {
        return Ok(Cow::Borrowed(base));
    };
    let mut options = base.clone();
    options.audiences = AudienceOptions::new(registry.current().await?, now);
    Ok(Cow::Owned(options))
}

/// Membership changes folded but not appended yet. A fold's changes are
/// queued before anything else can fail, and stay queued while appends
/// fail: a retried batch finds its events folded and reports none again.
#[derive(Debug, Default)]
pub struct ChangeOutbox {
    pending: Vec<Record>,
    /// The short name of the definitions last queued with (their shared
    /// copy, held weakly so its address is not reused): computed once per
    /// set, not per batch.
    named: Option<(std::sync::Weak<Definitions>, String)>,
}

impl ChangeOutbox {
    /// Queues the changes a fold of projection generation `generation`
    /// made with `options`' definitions.
    pub fn queue(
        &mut self,
        generation: u32,
        changes: Vec<(CustomerId, Change)>,
        options: &FoldOptions,
    ) {
        if changes.is_empty() {
            return;
        }
        let definitions = options
            .audiences
            .definitions
            .as_ref()
            .map(|defs| match &self.named {
                Some((known, id)) if std::ptr::eq(known.as_ptr(), Arc::as_ptr(defs)) => id.clone(),
                _ => {
                    let id = cdp_pipeline::audience::fingerprint_id(defs);
                    self.named = Some((Arc::downgrade(defs), id.clone()));
                    id
                }
            });
        for (customer_id, change) in changes {
            let change = MembershipChange {
                customer_id,
                generation,
                definitions: definitions.clone(),
                change,
            };
            match cdp_pipeline::audience::change_record(&change) {
                Ok(record) => self.pending.push(record),
                Err(error) => tracing::error!(%error, "an unencodable membership change"),
            }
        }
    }

    /// Appends what is queued to `audience-changes`; kept for the next
    /// call when the append fails. Returns how many were appended.
    pub async fn flush(&mut self, log: &dyn EventLog) -> Result<usize, LogError> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        let records = std::mem::take(&mut self.pending);
        let count = records.len();
        if let Err(e) = log.append(topic::AUDIENCE_CHANGES, records.clone()).await {
            self.pending = records;
            return Err(e);
        }
        Ok(count)
    }
}

/// The latest backfill progress recorded for `generation` on
/// `audience-backfills`.
pub async fn latest_backfill(
    log: &dyn EventLog,
    generation: u32,
) -> Result<Option<cdp_pipeline::audience::BackfillProgress>, LogError> {
    let mut latest = None;
    cdp_log::scan::<LogError>(log, topic::AUDIENCE_BACKFILLS, 512, |r| {
        match cdp_pipeline::audience::read_backfill(r) {
            Ok(p) if p.generation == generation => latest = Some(p),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(partition = r.partition, offset = r.offset, %error, "an unreadable backfill record");
            }
        }
        Ok(())
    })
    .await?;
    Ok(latest)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use cdp_domain::audience::{Cause, ChangeKind};
    use cdp_domain::{EventId, FoldOptions};
    use cdp_log::embedded::EmbeddedLog;

    use super::*;
    use crate::testing::Flaky;

    fn entered(segment: &str, n: u128) -> (CustomerId, Change) {
        (
            CustomerId(uuid::Uuid::from_u128(n % 3 + 1)),
            Change {
                segment: segment.to_owned(),
                version: 1,
                kind: ChangeKind::Entered,
                cause: Cause::Event {
                    event_id: EventId(uuid::Uuid::from_u128(n)),
                },
                at: 1_000 + n as i64,
                since: None,
            },
        )
    }

    /// The changes on the topic, per customer in the order appended.
    async fn appended(log: &dyn EventLog) -> Vec<(CustomerId, String)> {
        let mut out = Vec::new();
        cdp_log::scan::<LogError>(log, topic::AUDIENCE_CHANGES, 100, |r| {
            let m = cdp_pipeline::audience::read_change(r).expect("a change");
            out.push((m.customer_id, m.change.segment));
            Ok(())
        })
        .await
        .expect("scanned");
        out.sort_by_key(|(c, _)| *c);
        out
    }

    #[tokio::test]
    async fn queued_changes_reach_the_log_in_order_once_and_survive_a_down_log_until_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Flaky {
            inner: EmbeddedLog::open(dir.path(), &topic::ALL, 2).unwrap(),
            down: AtomicBool::new(false),
        });
        let registry = AudienceRegistry::new(log.clone(), Duration::from_secs(60));
        let options = FoldOptions::default();
        let batch = |from: u128| {
            (from..from + 30)
                .map(|n| entered(&format!("s{n}"), n))
                .collect()
        };
        // Appended in the background: waited for here, never timed.
        registry.queue(1, batch(0), &options).await.unwrap();
        registry.queue(1, batch(30), &options).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..1_000 {
            seen = appended(log.as_ref()).await;
            if seen.len() == 60 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let want = |to: u128| {
            let mut all: Vec<_> = (0..to)
                .map(|n| entered(&format!("s{n}"), n))
                .map(|(c, ch)| (c, ch.segment))
                .collect();
            all.sort_by_key(|(c, _)| *c);
            all
        };
        assert_eq!(seen, want(60), "each customer's changes in the order made");

        // The log is down: the changes stay queued, the barrier before a
        // sync fails, and the next flush appends them once.
        log.down.store(true, Ordering::SeqCst);
        // The background append fails, then the next fold waits for its
        // own and fails with it (its batch is then retried).
        registry.queue(1, batch(60), &options).await.unwrap();
        let mut refused = false;
        for _ in 0..1_000 {
            if registry.queue(1, Vec::new(), &options).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "a fold after a failed append is told");
        // And so is every fold after it while the log is down.
        assert!(registry.queue(1, Vec::new(), &options).await.is_err());
        assert!(registry.queue(1, Vec::new(), &options).await.is_err());
        assert!(registry.flush_pending().await.is_err());
        assert_eq!(appended(log.as_ref()).await.len(), 60);
        log.down.store(false, Ordering::SeqCst);
        assert_eq!(registry.flush_pending().await.unwrap(), 30);
        assert_eq!(registry.flush_pending().await.unwrap(), 0);
        assert_eq!(appended(log.as_ref()).await, want(90));
    }
}
