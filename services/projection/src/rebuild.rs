//! Projection rebuild: the identity graph, the profiles and the timeline
//! folded again from the log into a new generation while the active one
//! keeps serving, then switched to in one write (see
//! `cdp_store::generations` and `cdp_pipeline::group`).
//!
//! The rebuild is an identity worker of the new generation that also folds:
//! it consumes `touchpoints` from the start under the new generation's
//! identity group, with the one consumer loop every worker runs
//! (`cdp_log::consumer`), resolves each batch against the new graph,
//! appends what the contract says identity emits for the new generation
//! (`cdp_pipeline::Outputs`, marked rebuilt: resolved records, graph
//! changes and dead letters, so time travel in the new generation reads its
//! own records), and folds the resolved events straight into the new
//! profiles. Profile workers skip the
//! new generation's records until it is active. Positions are committed
//! after the new stores are synced, so a stopped rebuild resumes where it
//! was. Once it has caught up (fewer than a batch behind the log's end) it
//! stops and, when asked, activates the generation: the identity workers
//! then carry on under that group from where the rebuild stopped.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cdp_domain::{FoldOptions, IdentityRules, Resolution, ResolvedTouchpoint, Touchpoint};
use cdp_log::consumer::{BatchHandler, ConsumerOptions, Retry};
use cdp_log::{EventLog, LogError, LogRecord, Membership};
use cdp_pipeline::seal::Sealing;
use cdp_pipeline::{Outputs, emit, group, topic};
use cdp_proto::convert;
use cdp_proto::v1::RebuildStatus;
use cdp_proto::v1::rebuild_status::State;
use cdp_store::{Generations, Keyring, ProjectionStores, StoreError};
use tokio_util::sync::CancellationToken;

/// Touchpoints resolved and folded per batch.
const BATCH: usize = 1_000;
/// Failures of one batch in a row after which a rebuild gives up (with the
/// consumer loop's back-off, about a minute and a half): a store that stays
/// down, or data it cannot fold. It resumes from its last commit.
const GIVE_UP_AFTER: u32 = 20;
/// How often a running rebuild reads its progress from the log.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// The progress of one rebuild.
#[derive(Debug, Clone)]
pub struct Progress {
    pub generation: u32,
    pub state: State,
    pub records_done: u64,
    pub records_total: u64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// The failure that ended it, or the last one it is retrying.
    pub error: Option<String>,
    started: Instant,
    /// Records done when this run started (a resumed rebuild).
    resumed_at: u64,
}

impl Progress {
    pub fn to_proto(&self) -> RebuildStatus {
        let secs = self.started.elapsed().as_secs_f64();
        RebuildStatus {
            generation: self.generation,
            state: self.state as i32,
            records_done: self.records_done,
            records_total: self.records_total,
            records_per_second: if secs > 0.0 {
                self.records_done.saturating_sub(self.resumed_at) as f64 / secs
            } else {
                0.0
            },
            started_at: Some(convert::millis_to_timestamp(self.started_at)),
            finished_at: self.finished_at.map(convert::millis_to_timestamp),
            error: self.error.clone().unwrap_or_default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("event log: {0}")]
    Log(#[from] LogError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("generation {0}: {1}")]
    Generation(u32, String),
    #[error("generation {0} is being rebuilt in this process; one rebuild at a time")]
    AlreadyRunning(u32),
    #[error("gave up after {GIVE_UP_AFTER} failures of one batch in a row: {0}")]
    GaveUp(String),
}

type Current = Arc<Mutex<Option<(Progress, CancellationToken)>>>;

/// Rebuilds generations; one at a time per process.
#[derive(Clone)]
pub struct Rebuilder {
    log: Arc<dyn EventLog>,
    generations: Arc<dyn Generations>,
    rules: Arc<IdentityRules>,
    fold: FoldOptions,
    keyring: Arc<Keyring>,
    consumer: ConsumerOptions,
    shutdown: CancellationToken,
    current: Current,
    /// Held while a rebuild starts, so two requests cannot both start one.
    starting: Arc<tokio::sync::Mutex<()>>,
    /// The audience definitions the rebuild folds with (none: the new
    /// generation's profiles hold no memberships).
    audiences: Option<Arc<cdp_runtime::audiences::AudienceRegistry>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn update(current: &Current, f: impl FnOnce(&mut Progress)) {
    if let Some((p, _)) = lock(current).as_mut() {
        f(p);
    }
}

impl Rebuilder {
    /// `consumer` is how the pipeline's workers consume (the rebuild takes
    /// batches of [`BATCH`] whatever its batch size).
    pub fn new(
        log: Arc<dyn EventLog>,
        generations: Arc<dyn Generations>,
        rules: Arc<IdentityRules>,
        fold: FoldOptions,
        consumer: ConsumerOptions,
        shutdown: CancellationToken,
        keyring: Arc<Keyring>,
    ) -> Self {
        Rebuilder {
            log,
            generations,
            rules,
            fold,
            keyring,
            consumer: ConsumerOptions {
                name: "rebuild".into(),
                batch_size: BATCH,
                poll_interval: consumer.poll_interval.min(Duration::from_millis(100)),
                ..consumer
            },
            shutdown,
            current: Arc::new(Mutex::new(None)),
            starting: Arc::new(tokio::sync::Mutex::new(())),
            audiences: None,
        }
    }

    /// Folds the audiences too, with these definitions: the new generation
    /// has memberships as of the rebuild, and their changes are appended
    /// to `audience-changes` under its number.
    pub fn with_audiences(
        mut self,
        registry: Arc<cdp_runtime::audiences::AudienceRegistry>,
    ) -> Self {
        self.audiences = Some(registry);
        self
    }

    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    pub fn generations(&self) -> &Arc<dyn Generations> {
        &self.generations
    }

    /// The progress of the latest rebuild started here.
    pub fn progress(&self) -> Option<Progress> {
        lock(&self.current).as_ref().map(|(p, _)| p.clone())
    }

    /// Checks the request, prepares the generation and starts the rebuild
    /// in the background.
    pub async fn start(&self, requested: u32, activate: bool) -> Result<Progress, RebuildError> {
        let _starting = self.starting.lock().await;
        if let Some((p, _)) = lock(&self.current).as_ref()
            && p.state == State::Running
        {
            return Err(RebuildError::AlreadyRunning(p.generation));
        }
        let active = self.generations.active().await?;
        let list = self.generations.list().await?;
        // Never a number used before: its records may still be in the log.
        let highest = self.generations.highest().await?;
        let generation = if requested == 0 {
            highest.max(active) + 1
        } else {
            requested
        };
        if generation <= active {
            return Err(RebuildError::Generation(
                generation,
                format!("is not newer than the active generation {active}"),
            ));
        }
        let existed = list.iter().any(|g| g.id == generation);
        if requested != 0 && !existed {
            return Err(RebuildError::Generation(
                generation,
                "does not exist: start a new rebuild with generation 0".into(),
            ));
        }
        let stores = self.generations.open(generation).await?;
        let group = group::identity(generation);
        let partitions = self.log.partitions(topic::TOUCHPOINTS);
        let mut sub = self
            .log
            .subscribe(&group, topic::TOUCHPOINTS, Membership::default())
            .await?;
        if !existed {
            // A new generation starts at the beginning, whatever an earlier
            // generation of the same number left in the group.
            let zero: Vec<(u32, u64)> = (0..partitions).map(|p| (p, 0)).collect();
            sub.commit(&zero).await?;
            sub.rewind().await?;
        }
        let done: u64 = self
            .log
            .committed(&group, topic::TOUCHPOINTS)
            .await?
            .iter()
            .sum();
        // Caught up: everything the log holds now is read, and less than a
        // batch of what arrived since is left.
        let target: Vec<u64> = self.log.end_offsets(topic::TOUCHPOINTS).await?;
        let progress = Progress {
            generation,
            state: State::Running,
            records_done: done,
            records_total: target.iter().sum(),
            started_at: cdp_runtime::now_ms(),
            finished_at: None,
            error: None,
            started: Instant::now(),
            resumed_at: done,
        };
        let cancel = self.shutdown.child_token();
        *lock(&self.current) = Some((progress.clone(), cancel.clone()));
        tracing::info!(
            generation,
            resumed_at = done,
            total = progress.records_total,
            activate,
            "projection rebuild started"
        );
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = this
                .run(sub, stores, target, activate, cancel.clone())
                .await;
            update(&this.current, |p| {
                p.finished_at = Some(cdp_runtime::now_ms());
                match outcome {
                    Ok(state) => p.state = state,
                    Err(e) => {
                        tracing::error!(generation, error = %e, "projection rebuild failed");
                        p.state = State::Failed;
                        p.error = Some(e.to_string());
                    }
                }
                tracing::info!(generation, state = ?p.state, records = p.records_done, "projection rebuild ended");
            });
        });
        Ok(progress)
    }

    /// Stops the running rebuild (resumable).
    pub fn cancel(&self) {
        if let Some((_, c)) = lock(&self.current).as_ref() {
            c.cancel();
        }
    }

    async fn run(
        &self,
        sub: Box<dyn cdp_log::Subscription>,
        stores: ProjectionStores,
        target: Vec<u64>,
        activate: bool,
        cancel: CancellationToken,
    ) -> Result<State, RebuildError> {
        let generation = stores.generation;
        // The loop runs until the watcher sees it caught up, the handler
        // gives up, or `cancel`.
        let caught_up = cancel.child_token();
        let mut handler = RebuildHandler {
            log: Arc::clone(&self.log),
            rules: Arc::clone(&self.rules),
            keyring: Arc::clone(&self.keyring),
            fold: self.fold.clone(),
            audiences: self.audiences.clone(),
            outbox: Default::default(),
            stores,
            current: Arc::clone(&self.current),
            appended: None,
            failures: 0,
            gave_up: None,
            stop: caught_up.clone(),
        };
        let watcher = tokio::spawn(watch_progress(
            Arc::clone(&self.log),
            group::identity(generation),
            target.clone(),
            Arc::clone(&self.current),
            caught_up.clone(),
        ));
        cdp_log::consumer::run(sub, &mut handler, &self.consumer, caught_up.clone()).await;
        caught_up.cancel();
        if let Err(error) = watcher.await {
            tracing::warn!(%error, "rebuild progress watcher failed");
        }
        if let Some(error) = handler.gave_up {
            return Err(RebuildError::GaveUp(error));
        }
        if cancel.is_cancelled() {
            return Ok(State::Cancelled);
        }
        // The loop committed what it handled before it returned: check it
        // reached the target (a failed final commit resumes next time).
        let committed = self
            .log
            .committed(&group::identity(generation), topic::TOUCHPOINTS)
            .await?;
        update(&self.current, |p| p.records_done = committed.iter().sum());
        if !reached(&target, &committed) {
            return Err(RebuildError::Generation(
                generation,
                "stopped before its positions were committed; resume it".into(),
            ));
        }
        if !activate {
            return Ok(State::CaughtUp);
        }
        self.generations.activate(generation).await?;
        tracing::info!(
            generation,
            "rebuilt generation activated: processes switch within their refresh interval"
        );
        Ok(State::Activated)
    }
}

/// Whether every partition's committed position reached the target.
fn reached(target: &[u64], committed: &[u64]) -> bool {
    target
        .iter()
        .enumerate()
        .all(|(p, end)| committed.get(p).copied().unwrap_or(0) >= *end)
}

/// Follows the rebuild's committed positions: updates the progress and
/// fires `caught_up` once the target is reached and less than a batch of
/// newer touchpoints is left.
async fn watch_progress(
    log: Arc<dyn EventLog>,
    group: String,
    target: Vec<u64>,
    current: Current,
    caught_up: CancellationToken,
) {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = caught_up.cancelled() => return,
            _ = tick.tick() => {}
        }
        let read = async {
            let committed = log.committed(&group, topic::TOUCHPOINTS).await?;
            let total: u64 = log.end_offsets(topic::TOUCHPOINTS).await?.iter().sum();
            Ok::<_, LogError>((committed, total))
        };
        match read.await {
            Ok((committed, total)) => {
                let done: u64 = committed.iter().sum();
                update(&current, |p| {
                    p.records_done = done;
                    p.records_total = total;
                });
                if reached(&target, &committed) && total.saturating_sub(done) < BATCH as u64 {
                    caught_up.cancel();
                    return;
                }
            }
            Err(error) => tracing::debug!(%error, "rebuild progress: the log did not answer"),
        }
    }
}

/// What a rebuild does with a batch of touchpoints: what the identity
/// worker of its generation would (resolve, append the contract's records)
/// and what the profile worker would (fold).
struct RebuildHandler {
    log: Arc<dyn EventLog>,
    rules: Arc<IdentityRules>,
    keyring: Arc<Keyring>,
    fold: FoldOptions,
    audiences: Option<Arc<cdp_runtime::audiences::AudienceRegistry>>,
    /// Membership changes folded but not appended yet.
    outbox: cdp_runtime::audiences::ChangeOutbox,
    stores: ProjectionStores,
    current: Current,
    /// The batch (its next positions) whose records are appended already,
    /// so a retry after a failed fold does not append them again.
    appended: Option<Vec<(u32, u64)>>,
    /// Failures of the batch in hand in a row, and the last one once the
    /// rebuild gave up.
    failures: u32,
    gave_up: Option<String>,
    /// Stops the consumer loop when the rebuild gives up.
    stop: CancellationToken,
}

impl RebuildHandler {
    async fn rebuild(&mut self, records: &[LogRecord]) -> Result<(), String> {
        let now = cdp_runtime::now_ms();
        let mut events: Vec<Touchpoint> = Vec::with_capacity(records.len());
        let mut sources: Vec<&LogRecord> = Vec::with_capacity(records.len());
        let keys = emit::keys_for(&self.keyring, records)
            .await
            .map_err(|e| format!("keyring: {e}"))?;
        let sealing = Sealing::new(self.keyring.hasher().clone(), keys);
        for r in records {
            // Undecodable records, and those beyond the shape limits, were
            // dead-lettered by the live pass; an erased customer's are
            // anonymous and attributed to no one.
            if let Ok(opened) = emit::read_touchpoint(r, &sealing.keys)
                && !opened.anonymous
                && cdp_domain::validate::shape_errors(&opened.value).is_empty()
            {
                let t = opened.value;
                events.push(t);
                sources.push(r);
            }
        }
        let resolutions = self
            .stores
            .identity
            .resolve(&events, &self.rules)
            .await
            .map_err(|e| format!("identity store: {e}"))?;
        let mut out = Outputs::default();
        let mut folded: Vec<ResolvedTouchpoint> = Vec::with_capacity(events.len());
        for ((event, resolution), source) in events.into_iter().zip(resolutions).zip(sources) {
            if let Resolution::Resolved(d) = &resolution {
                folded.push(emit::resolved(event.clone(), d.clone()));
            }
            out.resolution(
                event,
                resolution,
                self.stores.generation,
                emit::trace_of(source),
                now,
                &sealing,
            )
            .map_err(|e| format!("sealing: {e}"))?;
        }
        // The dead letters too: events the new rules cannot attribute may
        // have had a customer under the old ones.
        let out = out.rebuilt();
        let batch = cdp_log::consumer::next_positions(records);
        let already = self.appended.as_ref() == Some(&batch);
        let append = async {
            if !already {
                for (topic, records) in out.appends() {
                    self.log
                        .append(topic, records)
                        .await
                        .map_err(|e| format!("append to {topic}: {e}"))?;
                }
            }
            Ok::<_, String>(())
        };
        let options =
            cdp_runtime::audiences::fold_options(self.audiences.as_deref(), &self.fold, now)
                .await
                .map_err(|e| format!("audience definitions: {e}"))?;
        let fold = async {
            self.stores
                .profiles
                .apply_unsynced(&folded, &options)
                .await
                .map_err(|e| format!("profile store: {e}"))
        };
        let (appended, folded) = tokio::join!(append, fold);
        if appended.is_ok() {
            self.appended = Some(batch);
        }
        // The changes of a fold that happened are kept before anything can
        // fail: a retried batch finds its events folded and reports none.
        let folded = folded.map(|applied| {
            self.outbox
                .queue(self.stores.generation, applied.changes, &options)
        });
        appended?;
        folded?;
        self.outbox
            .flush(self.log.as_ref())
            .await
            .map_err(|e| format!("append to audience-changes: {e}"))?;
        Ok(())
    }
}

#[async_trait]
impl BatchHandler for RebuildHandler {
    #[tracing::instrument(name = "rebuild_batch", skip_all, fields(generation = self.stores.generation, records = records.len()))]
    async fn handle(&mut self, records: &[LogRecord]) -> Result<(), Retry> {
        match self.rebuild(records).await {
            Ok(()) => {
                self.failures = 0;
                update(&self.current, |p| p.error = None);
                Ok(())
            }
            Err(e) => {
                self.failures += 1;
                if self.failures >= GIVE_UP_AFTER {
                    self.gave_up = Some(e.clone());
                    self.stop.cancel();
                }
                let shown = format!("retrying (failure {}): {e}", self.failures);
                update(&self.current, |p| p.error = Some(shown));
                Err(Retry(e))
            }
        }
    }

    async fn sync(&mut self) -> Result<(), Retry> {
        self.stores
            .profiles
            .sync()
            .await
            .map_err(|e| Retry(format!("profile store sync: {e}")))
    }
}
