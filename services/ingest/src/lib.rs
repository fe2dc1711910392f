//! The ingest service: validates touchpoints, appends them durably to the
//! touchpoints topic, and answers only after the log has them.

use std::collections::HashMap;
use std::sync::Arc;

use cdp_config::SuppressedEvents;
use cdp_domain::{
    EventId, FieldError, IdentityRules, RawTouchpoint, Touchpoint, ValidationLimits, validate,
};
use cdp_log::{Appended, EventLog, Record};
use cdp_pipeline::seal::Sealing;
use cdp_pipeline::{emit, topic};
use cdp_proto::convert;
use cdp_proto::v1::ingest_service_server::IngestService;
use cdp_proto::v1::{
    EventResult, EventStatus, FieldViolation, TrackBatchRequest, TrackBatchResponse, TrackRequest,
    TrackResponse,
};
use cdp_runtime::ServiceError;
use cdp_runtime::auth::{Access, Caller};
use cdp_store::Keyring;
use tonic::{Request, Response, Status};
use uuid::Uuid;

pub mod dead_letters;
pub mod http;
pub mod segment;
pub mod webhooks;

/// Most touchpoints in one batch.
pub const MAX_BATCH: usize = 500;

/// What happened to one touchpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Appended; identifier values that were not valid for their kind were
    /// dropped from the event, each named here with the reason.
    Accepted(EventId, Vec<FieldError>),
    Duplicate(EventId),
    Rejected(Vec<FieldError>),
    /// It carries an identifier whose owner was erased: not appended.
    Suppressed(EventId),
}

pub use cdp_runtime::now_ms;

/// The identifiers validation dropped from `t`, as warnings.
fn dropped(t: &Touchpoint) -> Vec<FieldError> {
    t.personal
        .dropped
        .iter()
        .map(|d| {
            FieldError::new(
                format!("identifiers[kind={}]", d.kind),
                format!("dropped, the event was kept without it: {}", d.reason),
            )
        })
        .collect()
}

/// Validation plus the durable append. Shared by every front door (gRPC,
/// and later HTTP and webhooks).
#[derive(Clone)]
pub struct Ingestor {
    log: Arc<dyn EventLog>,
    pub(crate) rules: Arc<IdentityRules>,
    limits: Arc<ValidationLimits>,
    pub(crate) keyring: Arc<Keyring>,
    suppressed: SuppressedEvents,
}

impl Ingestor {
    pub fn new(
        log: Arc<dyn EventLog>,
        rules: Arc<IdentityRules>,
        limits: Arc<ValidationLimits>,
        keyring: Arc<Keyring>,
        suppressed: SuppressedEvents,
    ) -> Self {
        Ingestor {
            log,
            rules,
            limits,
            keyring,
            suppressed,
        }
    }

    /// The keys to seal `touchpoints` with: a new identifier gets its key
    /// here (durably, before its first record is appended).
    pub(crate) async fn sealing(
        &self,
        touchpoints: &[Touchpoint],
    ) -> Result<Sealing, ServiceError> {
        let hasher = self.keyring.hasher().clone();
        let mut known: HashMap<cdp_domain::Identifier, cdp_seal::Subject> = HashMap::new();
        for i in touchpoints
            .iter()
            .flat_map(|t| t.personal.identifiers.iter())
        {
            if !known.contains_key(i) {
                known.insert(i.clone(), self.keyring.subject(i));
            }
        }
        let subjects: Vec<_> = known.values().copied().collect();
        let keys = self.keyring.obtain(&subjects).await.map_err(|e| {
            tracing::warn!(error = %e, "the keyring failed");
            ServiceError::from(e)
        })?;
        Ok(Sealing::new(hasher, keys).with_subjects(known))
    }

    /// `t` as it may be kept when some of its identifiers were erased: not
    /// at all (`None`), or, with `privacy.suppressed = "anonymise"`, without
    /// them and without traits.
    fn suppress<'t>(
        &self,
        t: &'t Touchpoint,
        sealing: &Sealing,
    ) -> Option<std::borrow::Cow<'t, Touchpoint>> {
        let erased = |i: &cdp_domain::Identifier| sealing.key_of(i).is_none();
        if !t.personal.identifiers.iter().any(erased) {
            return Some(std::borrow::Cow::Borrowed(t));
        }
        if self.suppressed == SuppressedEvents::Drop {
            return None;
        }
        let mut kept = t.clone();
        kept.personal.identifiers.retain(|i| !erased(i));
        kept.personal.traits.clear();
        kept.personal.dropped.clear();
        (!kept.personal.identifiers.is_empty()).then_some(std::borrow::Cow::Owned(kept))
    }

    /// Validates one raw touchpoint.
    pub fn validate(&self, raw: &RawTouchpoint, now: i64) -> Result<Touchpoint, Vec<FieldError>> {
        let ctx = cdp_domain::Context {
            now,
            fresh_event_id: Uuid::now_v7(),
        };
        validate(raw, &self.rules, &self.limits, ctx).map_err(|r| r.0)
    }

    /// Appends validated touchpoints in one durable append: accepted or
    /// duplicate, per touchpoint. A log failure fails the whole call
    /// (nothing is acknowledged).
    pub async fn append(&self, touchpoints: &[Touchpoint]) -> Result<Vec<Outcome>, ServiceError> {
        if touchpoints.is_empty() {
            return Ok(Vec::new());
        }
        let traceparent = cdp_runtime::trace::current_traceparent();
        let sealing = self.sealing(touchpoints).await?;
        let mut kept: Vec<std::borrow::Cow<'_, Touchpoint>> = Vec::with_capacity(touchpoints.len());
        let mut records: Vec<Record> = Vec::with_capacity(touchpoints.len());
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(touchpoints.len());
        for t in touchpoints {
            match self.suppress(t, &sealing) {
                Some(t) => {
                    records.push(
                        emit::touchpoint(&t, &self.rules, &traceparent, &sealing)
                            .map_err(|e| ServiceError::Internal(e.to_string()))?,
                    );
                    kept.push(t);
                    outcomes.push(None);
                }
                None => {
                    tracing::debug!(event_id = %t.event_id(), "suppressed: carries an erased identifier");
                    outcomes.push(Some(Outcome::Suppressed(t.event_id())));
                }
            }
        }
        let appended = if records.is_empty() {
            Vec::new()
        } else {
            self.log
                .append(topic::TOUCHPOINTS, records)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "append to the event log failed");
                    ServiceError::from(e)
                })?
        };
        let mut appended = kept.iter().zip(appended).map(|(t, a)| match a {
            Appended::New { .. } => Outcome::Accepted(t.event_id(), dropped(t)),
            Appended::Duplicate { .. } => Outcome::Duplicate(t.event_id()),
        });
        Ok(outcomes
            .into_iter()
            .map(|o| {
                o.or_else(|| appended.next()).unwrap_or_else(|| {
                    Outcome::Rejected(vec![FieldError::new("touchpoint", "was not appended")])
                })
            })
            .collect())
    }

    /// Validates every touchpoint and appends the valid ones in one durable
    /// append; invalid ones are reported, valid ones still land.
    #[tracing::instrument(skip_all, fields(events = raws.len()))]
    pub async fn ingest(&self, raws: &[RawTouchpoint]) -> Result<Vec<Outcome>, ServiceError> {
        let now = now_ms();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; raws.len()];
        let mut valid: Vec<usize> = Vec::with_capacity(raws.len());
        let mut touchpoints: Vec<Touchpoint> = Vec::with_capacity(raws.len());
        for (i, raw) in raws.iter().enumerate() {
            match self.validate(raw, now) {
                Ok(t) => {
                    valid.push(i);
                    touchpoints.push(t);
                }
                Err(fields) => {
                    tracing::debug!(index = i, reason = ?fields, "touchpoint rejected");
                    outcomes[i] = Some(Outcome::Rejected(fields));
                }
            }
        }
        for (i, outcome) in valid.into_iter().zip(self.append(&touchpoints).await?) {
            outcomes[i] = Some(outcome);
        }
        Ok(outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Outcome::Rejected(vec![FieldError::new("touchpoint", "was not processed")])
                })
            })
            .collect())
    }
}

/// The gRPC face of the [`Ingestor`]. Every touchpoint is recorded under
/// a source its credential names (see `cdp_domain::access::source_of`).
#[derive(Clone)]
pub struct IngestGrpc {
    ingestor: Ingestor,
    access: Arc<Access>,
}

impl IngestGrpc {
    pub fn new(ingestor: Ingestor, access: Arc<Access>) -> Self {
        IngestGrpc { ingestor, access }
    }
}

/// Binds a touchpoint to its caller's source: the source it names if the
/// credential may send for it, the credential's only source if it names none.
fn bind_source(caller: &Caller, tp: &mut cdp_proto::v1::Touchpoint) -> Result<(), FieldError> {
    let source = cdp_domain::access::source_of(&tp.source_id, &caller.principal.sources)
        .map_err(|reason| FieldError::new("source_id", reason))?;
    tp.source_id = source;
    Ok(())
}

fn violations(fields: &[FieldError]) -> Vec<FieldViolation> {
    fields
        .iter()
        .map(|f| FieldViolation {
            field: f.field.clone(),
            reason: f.reason.clone(),
        })
        .collect()
}

#[tonic::async_trait]
impl IngestService for IngestGrpc {
    async fn track(
        &self,
        request: Request<TrackRequest>,
    ) -> Result<Response<TrackResponse>, Status> {
        let caller = Caller::of(&request)?;
        let mut touchpoint = request
            .into_inner()
            .touchpoint
            .ok_or_else(|| ServiceError::invalid("touchpoint", "is required"))?;
        if let Err(f) = bind_source(&caller, &mut touchpoint) {
            let e = ServiceError::PermissionDenied(format!("{}: {}", f.field, f.reason));
            self.access.denied(caller, &e).await;
            return Err(e.into());
        }
        convert::check_timestamp("occurred_at", touchpoint.occurred_at.as_ref())
            .map_err(|f| ServiceError::InvalidArgument(vec![f]))?;
        let raw = convert::raw_touchpoint(&touchpoint);
        let outcome = self.ingestor.ingest(std::slice::from_ref(&raw)).await?;
        let (event_id, status, warnings) = match outcome.into_iter().next() {
            Some(Outcome::Accepted(id, warnings)) => (id, EventStatus::Accepted, warnings),
            Some(Outcome::Duplicate(id)) => (id, EventStatus::Duplicate, Vec::new()),
            Some(Outcome::Suppressed(id)) => (id, EventStatus::Suppressed, Vec::new()),
            Some(Outcome::Rejected(fields)) => {
                return Err(ServiceError::InvalidArgument(fields).into());
            }
            None => {
                return Err(ServiceError::Internal("no outcome for the touchpoint".into()).into());
            }
        };
        Ok(Response::new(TrackResponse {
            event_id: event_id.to_string(),
            status: status.into(),
            warnings: violations(&warnings),
        }))
    }

    async fn track_batch(
        &self,
        request: Request<TrackBatchRequest>,
    ) -> Result<Response<TrackBatchResponse>, Status> {
        let caller = Caller::of(&request)?;
        let touchpoints = request.into_inner().touchpoints;
        self.batch(&caller, touchpoints).await.map(Response::new)
    }

    type TrackStreamStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<TrackBatchResponse, Status>> + Send>,
    >;

    async fn track_stream(
        &self,
        request: Request<tonic::Streaming<TrackBatchRequest>>,
    ) -> Result<Response<Self::TrackStreamStream>, Status> {
        let caller = Caller::of(&request)?;
        let mut incoming = request.into_inner();
        let this = self.clone();
        // One batch at a time, in order; a few responses may wait for a slow
        // reader, then the stream stops taking batches (flow control).
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let next = match incoming.message().await {
                    Ok(Some(batch)) => this.batch(&caller, batch.touchpoints).await,
                    Ok(None) => break,
                    Err(status) => Err(status),
                };
                let failed = next.is_err();
                if tx.send(next).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

impl IngestGrpc {
    /// Validates and appends one batch (TrackBatch and TrackStream).
    async fn batch(
        &self,
        caller: &Caller,
        mut touchpoints: Vec<cdp_proto::v1::Touchpoint>,
    ) -> Result<TrackBatchResponse, Status> {
        if touchpoints.is_empty() {
            return Err(ServiceError::invalid("touchpoints", "is empty").into());
        }
        if touchpoints.len() > MAX_BATCH {
            return Err(ServiceError::invalid(
                "touchpoints",
                format!(
                    "has {} touchpoints; at most {MAX_BATCH} fit in one batch",
                    touchpoints.len()
                ),
            )
            .into());
        }
        // Touchpoints claiming a source their credential may not send for
        // are refused one by one; the others still land.
        let mut outcomes: Vec<Option<Outcome>> = vec![None; touchpoints.len()];
        let mut bound = Vec::with_capacity(touchpoints.len());
        let mut denied = 0;
        for (i, tp) in touchpoints.iter_mut().enumerate() {
            match bind_source(caller, tp) {
                Ok(()) => match convert::check_timestamp("occurred_at", tp.occurred_at.as_ref()) {
                    Ok(()) => bound.push(i),
                    Err(f) => outcomes[i] = Some(Outcome::Rejected(vec![f])),
                },
                Err(f) => {
                    denied += 1;
                    outcomes[i] = Some(Outcome::Rejected(vec![f]));
                }
            }
        }
        if denied > 0 {
            let e = ServiceError::PermissionDenied(format!(
                "{denied} touchpoints claimed a source this credential may not send for"
            ));
            self.access.denied(caller.clone(), &e).await;
        }
        let raws: Vec<RawTouchpoint> = bound
            .iter()
            .map(|&i| convert::raw_touchpoint(&touchpoints[i]))
            .collect();
        for (&i, outcome) in bound.iter().zip(self.ingestor.ingest(&raws).await?) {
            outcomes[i] = Some(outcome);
        }
        let outcomes = outcomes.into_iter().map(|o| {
            o.unwrap_or_else(|| {
                Outcome::Rejected(vec![FieldError::new("touchpoint", "was not processed")])
            })
        });
        let mut response = TrackBatchResponse::default();
        for (i, (outcome, tp)) in outcomes.into_iter().zip(&touchpoints).enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            let result = match outcome {
                Outcome::Accepted(id, warnings) => {
                    response.accepted += 1;
                    EventResult {
                        index,
                        event_id: id.to_string(),
                        status: EventStatus::Accepted.into(),
                        warnings: violations(&warnings),
                        ..EventResult::default()
                    }
                }
                Outcome::Duplicate(id) => {
                    response.duplicates += 1;
                    EventResult {
                        index,
                        event_id: id.to_string(),
                        status: EventStatus::Duplicate.into(),
                        ..EventResult::default()
                    }
                }
                Outcome::Suppressed(id) => {
                    response.suppressed += 1;
                    EventResult {
                        index,
                        event_id: id.to_string(),
                        status: EventStatus::Suppressed.into(),
                        ..EventResult::default()
                    }
                }
                Outcome::Rejected(fields) => {
                    response.rejected += 1;
                    EventResult {
                        index,
                        event_id: tp.event_id.clone(),
                        status: EventStatus::Rejected.into(),
                        error_code: if fields.iter().any(|f| f.field == "source_id") {
                            "PERMISSION_DENIED".into()
                        } else {
                            "INVALID_ARGUMENT".into()
                        },
                        violations: violations(&fields),
                        warnings: Vec::new(),
                    }
                }
            };
            response.results.push(result);
        }
        Ok(response)
    }
}

/// Installs ingest in a process: `IngestService` and `DeadLetterService`
/// over gRPC, the Segment-compatible HTTP API and the channel webhooks.
pub async fn install(
    ctx: &cdp_runtime::serve::Context,
    parts: &mut cdp_runtime::serve::Parts,
) -> Result<(), cdp_runtime::serve::StartError> {
    use cdp_proto::v1::dead_letter_service_server::DeadLetterServiceServer;
    use cdp_proto::v1::ingest_service_server::IngestServiceServer;

    let config = &ctx.config;
    let ingestor = Ingestor::new(
        Arc::clone(&ctx.backends.log),
        Arc::clone(&ctx.rules),
        Arc::new(config.validation.clone()),
        Arc::clone(&ctx.backends.keyring),
        config.privacy.suppressed,
    );
    let dead_letters = dead_letters::DeadLetters::new(
        Arc::clone(&ctx.backends.log),
        ingestor.clone(),
        Arc::clone(&ctx.access),
    );
    let state = Arc::new(http::HttpState {
        ingestor: ingestor.clone(),
        sources: config
            .sources
            .iter()
            .map(http::Source::from_config)
            .collect::<Result<_, _>>()
            .map_err(|reason| cdp_runtime::serve::StartError::Invalid {
                field: "sources",
                reason,
            })?,
        max_event_bytes: config.validation.max_event_bytes,
        max_batch_bytes: config.http.max_batch_bytes,
        zalo: config.webhooks.zalo.clone(),
        messenger: config.webhooks.messenger.clone(),
    });
    parts.http(http::router(state));
    parts
        .health
        .set_serving::<IngestServiceServer<IngestGrpc>>()
        .await;
    parts
        .health
        .set_serving::<DeadLetterServiceServer<dead_letters::DeadLetters>>()
        .await;
    parts
        .grpc
        .add_service(
            IngestServiceServer::new(IngestGrpc::new(ingestor, Arc::clone(&ctx.access)))
                .max_decoding_message_size(config.server.max_message_bytes),
        )
        .add_service(DeadLetterServiceServer::new(dead_letters));
    Ok(())
}
