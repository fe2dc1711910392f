//! `ProjectionService` over gRPC: start, follow and cancel rebuilds, list,
//! activate and drop generations, and the pipeline's lag.

use cdp_pipeline::{group, topic};
use cdp_proto::convert;
use cdp_proto::v1::projection_service_server::ProjectionService;
use cdp_proto::v1::rebuild_status::State;
use cdp_proto::v1::{
    ActivateGenerationRequest, CompareGenerationsRequest, DropGenerationRequest,
    GenerationComparison, GetPipelineStatusRequest, GetRebuildRequest, ListGenerationsRequest,
    ListGenerationsResponse, PipelineStatus, RebuildStatus, StartRebuildRequest,
};
use std::sync::Arc;

use cdp_runtime::ServiceError;
use cdp_runtime::auth::{Access, Caller};
use cdp_store::StoreError;
use tonic::{Request, Response, Status};

use crate::rebuild::{RebuildError, Rebuilder};

/// `cdp.v1.ProjectionService`: rebuilds, generations, and the pipeline's lag.
pub struct ProjectionGrpc {
    rebuilder: Rebuilder,
    access: Arc<Access>,
    guards: SwitchGuards,
    /// When this process last switched generations, and which one it retired.
    last_switch: std::sync::Mutex<Option<(std::time::Instant, u32)>>,
}

/// What keeps an operator from serving a half-built generation or dropping
/// the one to go back to.
#[derive(Debug, Clone, Copy)]
pub struct SwitchGuards {
    /// Touchpoints a generation may be behind the log when activated.
    pub max_lag: u64,
    /// How long the generation a switch retired is kept.
    pub drop_grace: std::time::Duration,
}

impl ProjectionGrpc {
    pub fn new(rebuilder: Rebuilder, access: Arc<Access>, guards: SwitchGuards) -> Self {
        ProjectionGrpc {
            rebuilder,
            access,
            guards,
            last_switch: std::sync::Mutex::new(None),
        }
    }

    /// FAILED_PRECONDITION when `generation` is further behind the log than
    /// the guard allows.
    async fn refuse_behind(&self, generation: u32) -> Result<(), ServiceError> {
        let log = self.rebuilder.log().as_ref();
        let ends = log
            .end_offsets(topic::TOUCHPOINTS)
            .await
            .map_err(ServiceError::from)?;
        let total: u64 = ends.iter().sum();
        let lag = cdp_log::lag(log, &group::identity(generation), topic::TOUCHPOINTS)
            .await
            .map_err(ServiceError::from)?;
        if lag > self.guards.max_lag {
            return Err(ServiceError::FailedPrecondition(format!(
                "generation {generation} has not caught up with the log: it has read {} of {total} \
                 touchpoints ({lag} behind, more than pipeline.activation_max_lag = {}); resume its \
                 rebuild (`cdp rebuild --generation {generation}`) and activate it when it has \
                 caught up, or set force to serve a partial view",
                total.saturating_sub(lag),
                self.guards.max_lag
            )));
        }
        Ok(())
    }

    /// FAILED_PRECONDITION when `generation` may be the one a switch
    /// retired less than the grace period ago: the one this process's last
    /// switch retired, within the period; or, when this process did not see
    /// a switch (it restarted), any generation older than the active one,
    /// since the registry does not say when the switch was.
    async fn refuse_in_grace(&self, generation: u32) -> Result<(), ServiceError> {
        let grace = self.guards.drop_grace;
        let seen = self.last_switch.lock().ok().and_then(|s| *s);
        match seen {
            Some((at, retired)) => {
                if retired == generation && at.elapsed() < grace {
                    return Err(ServiceError::FailedPrecondition(format!(
                        "generation {generation} was retired by a switch {}s ago; it is kept for \
                         pipeline.drop_grace_secs = {}s so the switch can be looked into or undone \
                         by a rebuild from it: drop it later, or set force",
                        at.elapsed().as_secs(),
                        grace.as_secs()
                    )));
                }
                Ok(())
            }
            None => {
                let active = self
                    .rebuilder
                    .generations()
                    .active()
                    .await
                    .map_err(store_status)?;
                if generation < active {
                    return Err(ServiceError::FailedPrecondition(format!(
                        "generation {generation} is older than the active generation {active}, and \
                         this process has not seen when the switch was (it is kept \
                         pipeline.drop_grace_secs = {}s after a switch): set force if the switch \
                         is older than that",
                        grace.as_secs()
                    )));
                }
                Ok(())
            }
        }
    }

    /// Audits an operator's change before it is made.
    async fn changing(&self, caller: &Caller, what: String) -> Result<(), ServiceError> {
        let mut entry = caller.entry("allowed");
        entry.fields = vec![what];
        self.access.audit_durable(entry).await
    }

    async fn listing(&self) -> Result<ListGenerationsResponse, Status> {
        let list = self
            .rebuilder
            .generations()
            .list()
            .await
            .map_err(store_status)?;
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
    fn refuse_while_rebuilding(&self, generation: u32, advice: &str) -> Result<(), ServiceError> {
        match self.rebuilder.progress() {
            Some(p) if p.generation == generation && p.state == State::Running => {
                Err(ServiceError::FailedPrecondition(format!(
                    "generation {generation} is being rebuilt: {advice}"
                )))
            }
            _ => Ok(()),
        }
    }

    fn status_of(&self, generation: u32) -> Result<RebuildStatus, ServiceError> {
        match self.rebuilder.progress() {
            Some(p) if generation == 0 || p.generation == generation => Ok(p.to_proto()),
            _ => Err(ServiceError::NotFound(format!(
                "no rebuild of generation {generation} was started in this process"
            ))),
        }
    }
}

/// A refused generation request names the generation field.
fn store_status(e: StoreError) -> ServiceError {
    match e {
        StoreError::Invalid(m) => ServiceError::invalid("generation", m),
        other => other.into(),
    }
}

impl From<RebuildError> for ServiceError {
    fn from(e: RebuildError) -> Self {
        match e {
            RebuildError::AlreadyRunning(_) | RebuildError::GaveUp(_) => {
                ServiceError::FailedPrecondition(e.to_string())
            }
            RebuildError::Generation(g, m) => {
                ServiceError::invalid("generation", format!("generation {g} {m}"))
            }
            RebuildError::Store(e) => store_status(e),
            RebuildError::Log(e) => e.into(),
        }
    }
}

#[tonic::async_trait]
impl ProjectionService for ProjectionGrpc {
    async fn start_rebuild(
        &self,
        request: Request<StartRebuildRequest>,
    ) -> Result<Response<RebuildStatus>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        self.changing(
            &caller,
            format!(
                "rebuild:{}{}",
                r.generation,
                if r.activate { ":activate" } else { "" }
            ),
        )
        .await?;
        let started = self
            .rebuilder
            .start(r.generation, r.activate)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(started.to_proto()))
    }

    async fn get_rebuild(
        &self,
        request: Request<GetRebuildRequest>,
    ) -> Result<Response<RebuildStatus>, Status> {
        Ok(Response::new(
            self.status_of(request.into_inner().generation)?,
        ))
    }

    async fn cancel_rebuild(
        &self,
        request: Request<GetRebuildRequest>,
    ) -> Result<Response<RebuildStatus>, Status> {
        let caller = Caller::of(&request)?;
        let generation = request.into_inner().generation;
        self.status_of(generation)?;
        self.changing(&caller, format!("rebuild:{generation}:cancel"))
            .await?;
        self.rebuilder.cancel();
        Ok(Response::new(self.status_of(generation)?))
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
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let generation = r.generation;
        self.refuse_while_rebuilding(generation, "activate it when the rebuild has caught up")?;
        if !r.force {
            self.refuse_behind(generation).await?;
        }
        let retired = self
            .rebuilder
            .generations()
            .active()
            .await
            .map_err(store_status)?;
        self.changing(
            &caller,
            format!(
                "generation:{generation}:activate{}",
                if r.force { ":forced" } else { "" }
            ),
        )
        .await?;
        self.rebuilder
            .generations()
            .activate(generation)
            .await
            .map_err(store_status)?;
        if let Ok(mut s) = self.last_switch.lock() {
            *s = Some((std::time::Instant::now(), retired));
        }
        self.listing().await.map(Response::new)
    }

    async fn get_pipeline_status(
        &self,
        _request: Request<GetPipelineStatusRequest>,
    ) -> Result<Response<PipelineStatus>, Status> {
        let log = self.rebuilder.log().as_ref();
        let generation = self
            .rebuilder
            .generations()
            .active()
            .await
            .map_err(store_status)?;
        let touchpoints: u64 = log
            .end_offsets(topic::TOUCHPOINTS)
            .await
            .map_err(ServiceError::from)?
            .iter()
            .sum();
        let identity_lag = cdp_log::lag(log, &group::identity(generation), topic::TOUCHPOINTS)
            .await
            .map_err(ServiceError::from)?;
        let profile_lag = cdp_log::lag(log, group::PROFILE, topic::RESOLVED)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(PipelineStatus {
            generation,
            touchpoints,
            identity_lag,
            profile_lag,
        }))
    }

    async fn compare_generations(
        &self,
        request: Request<CompareGenerationsRequest>,
    ) -> Result<Response<GenerationComparison>, Status> {
        let r = request.into_inner();
        let generations = self.rebuilder.generations();
        let baseline = match r.baseline {
            0 => generations.active().await.map_err(store_status)?,
            g => g,
        };
        if r.candidate == 0 || r.candidate == baseline {
            return Err(ServiceError::invalid(
                "candidate",
                format!("name a generation other than the baseline ({baseline})"),
            )
            .into());
        }
        let known: Vec<u32> = generations
            .list()
            .await
            .map_err(store_status)?
            .iter()
            .map(|g| g.id)
            .collect();
        for (field, g) in [("candidate", r.candidate), ("baseline", baseline)] {
            if !known.contains(&g) {
                return Err(ServiceError::invalid(field, format!("no generation {g}")).into());
            }
        }
        let examples = match r.examples {
            0 => 20,
            n => n.min(1000),
        } as usize;
        let (a, b) =
            crate::compare::read(self.rebuilder.log().as_ref(), baseline, r.candidate).await?;
        let mut out = crate::compare::compare(&a, &b, examples);
        out.baseline = baseline;
        out.candidate = r.candidate;
        tracing::info!(
            baseline,
            candidate = r.candidate,
            compared = out.events_compared,
            moved = out.events_moved,
            splits = out.splits,
            joins = out.joins,
            "generations compared"
        );
        Ok(Response::new(out))
    }

    async fn drop_generation(
        &self,
        request: Request<DropGenerationRequest>,
    ) -> Result<Response<ListGenerationsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let generation = r.generation;
        self.refuse_while_rebuilding(generation, "cancel the rebuild first")?;
        if !r.force {
            self.refuse_in_grace(generation).await?;
        }
        self.changing(
            &caller,
            format!(
                "generation:{generation}:drop{}",
                if r.force { ":forced" } else { "" }
            ),
        )
        .await?;
        self.rebuilder
            .generations()
            .drop_generation(generation)
            .await
            .map_err(store_status)?;
        self.listing().await.map(Response::new)
    }
}
