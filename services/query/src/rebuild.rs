//! Projection rebuild: the identity graph, the profiles and the timeline
//! folded again from the log into a new generation while the active one
//! keeps serving, then switched to in one write (see
//! `cdp_store::generations` and `cdp_runtime::generation`).
//!
//! The rebuild reads `touchpoints` from the start under the new
//! generation's identity consumer group, resolves each batch against the
//! new graph and folds the resolved events straight into the new profiles
//! (no `resolved` records: the live pipeline's consumers never see them).
//! It commits after each batch, so a stopped rebuild resumes where it was.
//! Once it has caught up (fewer than a batch behind the log's end) it stops
//! and, when asked, activates the generation: the identity workers then
//! carry on under that group from where the rebuild stopped, so every event
//! lands in the new generation exactly as it would have live.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cdp_domain::{FoldOptions, IdentityRules, Resolution, ResolvedTouchpoint, Touchpoint};
use cdp_log::consumer::next_positions;
use cdp_log::{EventLog, LogError, Membership, Topic};
use cdp_proto::v1::projection_service_server::ProjectionService;
use cdp_proto::v1::rebuild_status::State;
use cdp_proto::v1::{
    ActivateGenerationRequest, DropGenerationRequest, GetPipelineStatusRequest, GetRebuildRequest,
    ListGenerationsRequest, ListGenerationsResponse, PipelineStatus, RebuildStatus,
    StartRebuildRequest,
};
use cdp_proto::{convert, record};
use cdp_runtime::generation::identity_group;
use cdp_store::{Generations, StoreError};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Touchpoints resolved and folded per batch.
const BATCH: usize = 1_000;

/// The progress of one rebuild.
#[derive(Debug, Clone)]
pub struct Progress {
    pub generation: u32,
    pub state: State,
    pub records_done: u64,
    pub records_total: u64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub error: Option<String>,
    started: Instant,
    /// Records done when this run started (a resumed rebuild).
    resumed_at: u64,
}

impl Progress {
    fn to_proto(&self) -> RebuildStatus {
        let secs = self.started.elapsed().as_secs_f64();
        RebuildStatus {
            generation: self.generation,
            state: self.state as i32,
            records_done: self.records_done,
            records_total: self.records_total,
            records_per_second: if secs > 0.0 {
                (self.records_done - self.resumed_at) as f64 / secs
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
}

/// Rebuilds generations; one at a time per process.
#[derive(Clone)]
pub struct Rebuilder {
    log: Arc<dyn EventLog>,
    generations: Arc<dyn Generations>,
    rules: Arc<IdentityRules>,
    options: FoldOptions,
    shutdown: CancellationToken,
    current: Arc<Mutex<Option<(Progress, CancellationToken)>>>,
    /// Held while a rebuild starts, so two requests cannot both start one.
    starting: Arc<tokio::sync::Mutex<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Rebuilder {
    pub fn new(
        log: Arc<dyn EventLog>,
        generations: Arc<dyn Generations>,
        rules: Arc<IdentityRules>,
        options: FoldOptions,
        shutdown: CancellationToken,
    ) -> Self {
        Rebuilder {
            log,
            generations,
            rules,
            options,
            shutdown,
            current: Arc::new(Mutex::new(None)),
            starting: Arc::new(tokio::sync::Mutex::new(())),
        }
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
        let newest = list.iter().map(|g| g.id).max().unwrap_or(active);
        let generation = if requested == 0 {
            newest.max(active) + 1
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
        let group = identity_group(generation);
        let partitions = self.log.partitions(Topic::Touchpoints);
        let mut sub = self
            .log
            .subscribe(&group, Topic::Touchpoints, Membership::default())
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
            .committed(&group, Topic::Touchpoints)
            .await?
            .iter()
            .sum();
        let total: u64 = self.log.end_offsets(Topic::Touchpoints).await?.iter().sum();
        let progress = Progress {
            generation,
            state: State::Running,
            records_done: done,
            records_total: total,
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
            total,
            activate,
            "projection rebuild started"
        );
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = this
                .run(sub, generation, stores, activate, cancel.clone())
                .await;
            let mut current = lock(&this.current);
            if let Some((p, _)) = current.as_mut() {
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
            }
        });
        Ok(progress)
    }

    /// Stops the running rebuild (resumable).
    pub fn cancel(&self) {
        if let Some((_, c)) = lock(&self.current).as_ref() {
            c.cancel();
        }
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        if let Some((p, _)) = lock(&self.current).as_mut() {
            f(p);
        }
    }

    async fn run(
        &self,
        mut sub: Box<dyn cdp_log::Subscription>,
        generation: u32,
        stores: cdp_store::ProjectionStores,
        activate: bool,
        cancel: CancellationToken,
    ) -> Result<State, RebuildError> {
        let group = identity_group(generation);
        // Caught up: everything the log held at the start is read, and less
        // than a batch of what arrived since is left.
        let target: Vec<u64> = self.log.end_offsets(Topic::Touchpoints).await?;
        let mut failures = 0u32;
        loop {
            if cancel.is_cancelled() {
                return Ok(State::Cancelled);
            }
            let step = async {
                let records = sub.poll(BATCH, Duration::from_millis(100)).await?;
                if !records.is_empty() {
                    let mut events: Vec<Touchpoint> = Vec::with_capacity(records.len());
                    for r in &records {
                        // Undecodable records were dead-lettered live.
                        if let Ok(t) = record::decode_touchpoint(&r.value) {
                            events.push(t);
                        }
                    }
                    let resolutions = stores.identity.resolve(&events, &self.rules).await?;
                    let resolved: Vec<ResolvedTouchpoint> = events
                        .into_iter()
                        .zip(resolutions)
                        .filter_map(|(touchpoint, r)| match r {
                            Resolution::Resolved(d) => Some(ResolvedTouchpoint {
                                customer_id: d.customer_id,
                                merges: d.merges,
                                touchpoint,
                            }),
                            Resolution::Unresolvable { .. } => None,
                        })
                        .collect();
                    stores.profiles.apply(&resolved, &self.options).await?;
                    sub.commit(&next_positions(&records)).await?;
                }
                let committed = self.log.committed(&group, Topic::Touchpoints).await?;
                let total: u64 = self.log.end_offsets(Topic::Touchpoints).await?.iter().sum();
                Ok::<_, RebuildError>((records.len(), committed, total))
            };
            match step.await {
                Ok((read, committed, total)) => {
                    failures = 0;
                    let done: u64 = committed.iter().sum();
                    self.update(|p| {
                        p.records_done = done;
                        p.records_total = total;
                    });
                    let reached = target
                        .iter()
                        .enumerate()
                        .all(|(p, end)| committed.get(p).copied().unwrap_or(0) >= *end);
                    if reached && read < BATCH && total.saturating_sub(done) < BATCH as u64 {
                        break;
                    }
                }
                Err(e) => {
                    failures += 1;
                    if failures > 20 {
                        return Err(e);
                    }
                    tracing::warn!(generation, error = %e, "rebuild batch failed; retrying");
                    let wait = Duration::from_millis(100 * u64::from(failures.min(30)));
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(State::Cancelled),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    sub.rewind().await?;
                }
            }
        }
        // Stop reading before the live workers take the group over.
        drop(sub);
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

/// `cdp.v1.ProjectionService`.
pub struct ProjectionGrpc {
    rebuilder: Rebuilder,
}

impl ProjectionGrpc {
    pub fn new(rebuilder: Rebuilder) -> Self {
        ProjectionGrpc { rebuilder }
    }

    async fn listing(&self) -> Result<ListGenerationsResponse, Status> {
        let g = &self.rebuilder.generations;
        let list = g.list().await.map_err(store_status)?;
        Ok(ListGenerationsResponse {
            active: list.iter().find(|g| g.active).map_or(0, |g| g.id),
            generations: list
                .into_iter()
                .map(|g| cdp_proto::v1::Generation {
                    id: g.id,
                    active: g.active,
                    created_at: Some(convert::millis_to_timestamp(g.created_at)),
                })
                .collect(),
        })
    }

    /// FAILED_PRECONDITION while `generation` is being rebuilt here.
    fn refuse_while_rebuilding(&self, generation: u32, advice: &str) -> Result<(), Status> {
        match self.rebuilder.progress() {
            Some(p) if p.generation == generation && p.state == State::Running => {
                Err(Status::failed_precondition(format!(
                    "generation {generation} is being rebuilt: {advice}"
                )))
            }
            _ => Ok(()),
        }
    }

    fn status_of(&self, generation: u32) -> Result<RebuildStatus, Status> {
        match self.rebuilder.progress() {
            Some(p) if generation == 0 || p.generation == generation => Ok(p.to_proto()),
            _ => Err(Status::not_found(format!(
                "no rebuild of generation {generation} was started in this process"
            ))),
        }
    }
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Invalid(m) => cdp_runtime::ServiceError::invalid("generation", m).into(),
        other => crate::store_error(other).into(),
    }
}

#[tonic::async_trait]
impl ProjectionService for ProjectionGrpc {
    async fn start_rebuild(
        &self,
        request: Request<StartRebuildRequest>,
    ) -> Result<Response<RebuildStatus>, Status> {
        let r = request.into_inner();
        match self.rebuilder.start(r.generation, r.activate).await {
            Ok(p) => Ok(Response::new(p.to_proto())),
            Err(e @ RebuildError::AlreadyRunning(_)) => {
                Err(Status::failed_precondition(e.to_string()))
            }
            Err(RebuildError::Generation(g, m)) => Err(cdp_runtime::ServiceError::invalid(
                "generation",
                format!("generation {g} {m}"),
            )
            .into()),
            Err(RebuildError::Store(e)) => Err(store_status(e)),
            Err(RebuildError::Log(e)) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn get_rebuild(
        &self,
        request: Request<GetRebuildRequest>,
    ) -> Result<Response<RebuildStatus>, Status> {
        self.status_of(request.into_inner().generation)
            .map(Response::new)
    }

    async fn cancel_rebuild(
        &self,
        request: Request<GetRebuildRequest>,
    ) -> Result<Response<RebuildStatus>, Status> {
        let generation = request.into_inner().generation;
        self.status_of(generation)?;
        self.rebuilder.cancel();
        self.status_of(generation).map(Response::new)
    }

    async fn list_generations(
        &self,
        _request: Request<ListGenerationsRequest>,
    ) -> Result<Response<ListGenerationsResponse>, Status> {
        self.listing().await.map(Response::new)
    }

    async fn activate_generation(
        &self,
        request: Request<ActivateGenerationRequest>,
    ) -> Result<Response<ListGenerationsResponse>, Status> {
        let generation = request.into_inner().generation;
        self.refuse_while_rebuilding(generation, "activate it when the rebuild has caught up")?;
        self.rebuilder
            .generations
            .activate(generation)
            .await
            .map_err(store_status)?;
        self.listing().await.map(Response::new)
    }

    async fn get_pipeline_status(
        &self,
        _request: Request<GetPipelineStatusRequest>,
    ) -> Result<Response<PipelineStatus>, Status> {
        let r = &self.rebuilder;
        let log_status = |e: LogError| Status::unavailable(e.to_string());
        let generation = r.generations.active().await.map_err(store_status)?;
        let touchpoints: u64 = r
            .log
            .end_offsets(Topic::Touchpoints)
            .await
            .map_err(log_status)?
            .iter()
            .sum();
        let identity_lag = cdp_log::lag(
            r.log.as_ref(),
            &identity_group(generation),
            Topic::Touchpoints,
        )
        .await
        .map_err(log_status)?;
        let profile_lag = cdp_log::lag(
            r.log.as_ref(),
            cdp_runtime::generation::PROFILE_GROUP,
            Topic::Resolved,
        )
        .await
        .map_err(log_status)?;
        Ok(Response::new(PipelineStatus {
            generation,
            touchpoints,
            identity_lag,
            profile_lag,
        }))
    }

    async fn drop_generation(
        &self,
        request: Request<DropGenerationRequest>,
    ) -> Result<Response<ListGenerationsResponse>, Status> {
        let generation = request.into_inner().generation;
        self.refuse_while_rebuilding(generation, "cancel the rebuild first")?;
        self.rebuilder
            .generations
            .drop_generation(generation)
            .await
            .map_err(store_status)?;
        self.listing().await.map(Response::new)
    }
}
