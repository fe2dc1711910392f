//! The query service: the single customer view (ProfileService) over the
//! identity graph and the profile store.

use std::sync::Arc;

use cdp_domain::FoldOptions;
use cdp_domain::normalize::normalize;
use cdp_domain::{Channel, CustomerId, EventId, EventType, IdKind, Identifier, IdentityRules};
use cdp_proto::convert;
use cdp_proto::v1::profile_service_server::ProfileService;
use cdp_proto::v1::{
    self, CustomerProfile, GetProfileRequest, GetProfileResponse, ListTimelineRequest,
    ListTimelineResponse,
};
use cdp_runtime::ServiceError;

pub mod console;
pub mod explain;
pub mod follow;
pub mod history;
pub mod rebuild;
pub mod replay;
use cdp_store::{IdentityStore, ProfileChanges, ProfileStore, StoreError, TimelineQuery};
use tonic::{Request, Response, Status};
use uuid::Uuid;

const DEFAULT_TIMELINE: usize = 20;
const MAX_TIMELINE: usize = 200;
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 500;

/// How a request names its customer.
#[derive(Debug, Clone)]
pub enum Lookup {
    CustomerId(String),
    Identifier(v1::Identifier),
}

/// The requests' `lookup` oneofs are one choice; they map to [`Lookup`] alike.
macro_rules! lookup_from {
    ($($oneof:path),+) => {$(
        impl From<$oneof> for Lookup {
            fn from(l: $oneof) -> Self {
                use $oneof as L;
                match l {
                    L::CustomerId(c) => Lookup::CustomerId(c),
                    L::Identifier(i) => Lookup::Identifier(i),
                }
            }
        }
    )+};
}

lookup_from!(
    v1::get_profile_request::Lookup,
    v1::list_timeline_request::Lookup,
    v1::list_merges_request::Lookup,
    v1::replay_request::Customer
);

/// The lookup and timeline length a `GetProfileRequest` asks for.
fn profile_request(r: GetProfileRequest) -> (Option<Lookup>, usize) {
    let limit = match r.timeline_limit {
        0 => DEFAULT_TIMELINE,
        n => n as usize,
    };
    (r.lookup.map(Lookup::from), limit)
}

pub(crate) fn store_error(e: StoreError) -> ServiceError {
    match e {
        StoreError::Unavailable(m) => ServiceError::Unavailable(m),
        StoreError::Invalid(m) => ServiceError::invalid("request", m),
        other => ServiceError::Internal(other.to_string()),
    }
}

/// The parts of a customer view.
pub struct Loaded {
    pub profile: cdp_domain::Profile,
    pub identifiers: Vec<Identifier>,
    pub claims: Vec<Option<cdp_domain::identity::Claim>>,
    pub timeline: Vec<cdp_domain::TimelineEntry>,
}

/// Reads customer views. Cheap to clone.
#[derive(Clone)]
pub struct ProfileQuery {
    identity: Arc<dyn IdentityStore>,
    profiles: Arc<dyn ProfileStore>,
    rules: Arc<IdentityRules>,
    options: FoldOptions,
    changes: ProfileChanges,
    /// Past views from the event log (time travel), when wired.
    history: Option<Arc<history::History>>,
    /// Fires when the process shuts down: live streams end.
    shutdown: tokio_util::sync::CancellationToken,
}

impl ProfileQuery {
    /// The identity graph this query reads.
    pub fn identity(&self) -> &Arc<dyn IdentityStore> {
        &self.identity
    }

    /// The identity rules (how identifiers are normalised and ranked).
    pub fn rules(&self) -> &IdentityRules {
        &self.rules
    }

    pub fn new(
        identity: Arc<dyn IdentityStore>,
        profiles: Arc<dyn ProfileStore>,
        rules: Arc<IdentityRules>,
        options: FoldOptions,
        changes: ProfileChanges,
    ) -> Self {
        ProfileQuery {
            identity,
            profiles,
            rules,
            options,
            changes,
            history: None,
            shutdown: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Ends live streams (`WatchProfile`, the console's events) when
    /// `shutdown` fires, so a graceful shutdown does not wait for watchers.
    pub fn with_shutdown(mut self, shutdown: tokio_util::sync::CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// The next announced change; None once the process shuts down.
    pub async fn next_change(
        &self,
        changes: &mut tokio::sync::broadcast::Receiver<CustomerId>,
    ) -> Option<Result<CustomerId, tokio::sync::broadcast::error::RecvError>> {
        tokio::select! {
            _ = self.shutdown.cancelled() => None,
            r = changes.recv() => Some(r),
        }
    }

    /// Answers views as of a past instant from `log` (time travel).
    pub fn with_history(mut self, log: Arc<dyn cdp_log::EventLog>) -> Self {
        self.history = Some(Arc::new(history::History::new(log, self.options.clone())));
        self
    }

    /// Everything the view is made of, as domain values.
    pub async fn load(
        &self,
        lookup: Option<Lookup>,
        timeline_limit: usize,
    ) -> Result<Loaded, ServiceError> {
        let customer = self.customer(lookup).await?;
        let profile = self
            .profiles
            .profile(customer)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                ServiceError::NotFound(format!("customer {customer} has no profile yet"))
            })?;
        let identifiers = self.identifiers_of(profile.customer_id).await?;
        let claims = self
            .identity
            .claims(&identifiers)
            .await
            .map_err(store_error)?;
        let query = TimelineQuery {
            limit: timeline_limit.clamp(1, MAX_TIMELINE),
            ..TimelineQuery::default()
        };
        let timeline = self
            .profiles
            .timeline(profile.customer_id, &query)
            .await
            .map_err(store_error)?
            .entries;
        Ok(Loaded {
            profile,
            identifiers,
            claims,
            timeline,
        })
    }

    /// The identifiers linked to a customer.
    async fn identifiers_of(&self, customer: CustomerId) -> Result<Vec<Identifier>, ServiceError> {
        let node = self
            .identity
            .customer(customer)
            .await
            .map_err(store_error)?;
        Ok(node
            .map(|n| n.identifiers.into_iter().collect())
            .unwrap_or_default())
    }

    /// Whether a change announced for `changed` concerns the view of
    /// `watched`: the same customer, or the survivor it was merged into.
    pub async fn concerns(&self, watched: &str, changed: CustomerId) -> bool {
        let changed = changed.to_string();
        changed == watched
            || self
                .identity_root(watched)
                .await
                .is_some_and(|root| root == changed)
    }

    /// The default currency (for RFM).
    pub fn currency(&self) -> &str {
        &self.options.default_currency
    }

    /// Candidates for what an agent typed.
    #[tracing::instrument(skip(self))]
    pub async fn search(
        &self,
        query: &str,
        limit: usize,
    ) -> Result<Vec<v1::CustomerCandidate>, ServiceError> {
        if query.trim().chars().count() < 2 {
            return Err(ServiceError::invalid("query", "type at least 2 characters"));
        }
        let prefixes = cdp_domain::search::query_prefixes(query);
        let found = self
            .profiles
            .search(&prefixes, limit.clamp(1, 50))
            .await
            .map_err(store_error)?;
        let mut out = Vec::with_capacity(found.len());
        for customer in found {
            let Some(profile) = self.profiles.profile(customer).await.map_err(store_error)? else {
                continue;
            };
            let ids = self.identifiers_of(profile.customer_id).await?;
            let of = |k: IdKind| {
                ids.iter()
                    .filter(|i| i.kind == k)
                    .map(|i| i.value.clone())
                    .collect()
            };
            out.push(v1::CustomerCandidate {
                customer_id: profile.customer_id.to_string(),
                name: profile
                    .traits
                    .get("name")
                    .and_then(|t| t.value.as_str())
                    .unwrap_or_default()
                    .to_owned(),
                emails: of(IdKind::Email),
                phones: of(IdKind::Phone),
                last_seen: profile.last_seen.map(convert::millis_to_timestamp),
            });
        }
        Ok(out)
    }

    /// The customer that stands for `customer_id` now, if it parses.
    pub async fn identity_root(&self, customer_id: &str) -> Option<String> {
        let id = Uuid::parse_str(customer_id).ok()?;
        self.identity
            .root(CustomerId(id))
            .await
            .ok()
            .map(|c| c.to_string())
    }

    /// Announcements of changed customers, for live views.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<CustomerId> {
        self.changes.subscribe()
    }

    /// Normalises an identifier typed by a person or a system.
    pub fn identifier(&self, id: &v1::Identifier) -> Result<Identifier, ServiceError> {
        let kind = IdKind::parse(&id.kind)
            .ok()
            .filter(|k| self.rules.is_known(k))
            .ok_or_else(|| {
                ServiceError::invalid(
                    "identifier.kind",
                    format!("unknown identifier kind {:?}", id.kind),
                )
            })?;
        normalize(
            &kind,
            &id.value,
            self.rules.email_policy(),
            self.rules.phone_policy(),
        )
        .map_err(|e| ServiceError::invalid("identifier.value", format!("{kind} {e}")))
    }

    /// The customer a lookup names, merges followed.
    pub async fn customer(&self, lookup: Option<Lookup>) -> Result<CustomerId, ServiceError> {
        match lookup {
            None => Err(ServiceError::invalid(
                "lookup",
                "give a customer_id or an identifier",
            )),
            Some(Lookup::CustomerId(s)) => {
                let id = Uuid::parse_str(s.trim()).map(CustomerId).map_err(|_| {
                    ServiceError::invalid("customer_id", format!("{s:?} is not a UUID"))
                })?;
                self.identity.root(id).await.map_err(store_error)
            }
            Some(Lookup::Identifier(raw)) => {
                let id = self.identifier(&raw)?;
                self.identity
                    .owner(&id)
                    .await
                    .map_err(store_error)?
                    .ok_or_else(|| ServiceError::NotFound(format!("no customer has {id}")))
            }
        }
    }

    /// The full customer view.
    #[tracing::instrument(skip(self))]
    pub async fn profile(
        &self,
        lookup: Option<Lookup>,
        timeline_limit: usize,
    ) -> Result<CustomerProfile, ServiceError> {
        let loaded = self.load(lookup, timeline_limit).await?;
        Ok(self.render(loaded, cdp_runtime::now_ms()))
    }

    /// The view as it was at `as_of`, folded from the event log.
    #[tracing::instrument(skip(self))]
    pub async fn profile_as_of(
        &self,
        lookup: Option<Lookup>,
        timeline_limit: usize,
        as_of: cdp_domain::UnixMillis,
    ) -> Result<CustomerProfile, ServiceError> {
        let history = self.history.as_ref().ok_or_else(|| {
            ServiceError::Unavailable("this query service has no event log for time travel".into())
        })?;
        // Who the lookup named then: an identifier's first customer, or the id given.
        let then = match lookup {
            Some(Lookup::Identifier(raw)) => {
                let id = self.identifier(&raw)?;
                let claims = self
                    .identity
                    .claims(std::slice::from_ref(&id))
                    .await
                    .map_err(store_error)?;
                claims
                    .into_iter()
                    .flatten()
                    .next()
                    .map(|c| c.linked_to())
                    .ok_or_else(|| ServiceError::NotFound(format!("no customer has {id}")))?
            }
            Some(Lookup::CustomerId(s)) => {
                Uuid::parse_str(s.trim()).map(CustomerId).map_err(|_| {
                    ServiceError::invalid("customer_id", format!("{s:?} is not a UUID"))
                })?
            }
            None => {
                return Err(ServiceError::invalid(
                    "lookup",
                    "give a customer_id or an identifier",
                ));
            }
        };
        let root = self.identity.root(then).await.map_err(store_error)?;
        let mut family = std::collections::BTreeSet::from([root, then]);
        if let Some(now) = self.profiles.profile(root).await.map_err(store_error)? {
            family.extend(now.merged_from);
        }
        let past = history.view(root, &family, then, as_of).await?;
        // The identifiers it had then: those linked by an event folded by then.
        let mut identifiers = Vec::new();
        for member in &family {
            identifiers.extend(self.identifiers_of(*member).await?);
        }
        identifiers.sort();
        identifiers.dedup();
        let claims = self
            .identity
            .claims(&identifiers)
            .await
            .map_err(store_error)?;
        let (identifiers, claims): (Vec<_>, Vec<_>) = identifiers
            .into_iter()
            .zip(claims)
            .filter(|(_, c)| {
                c.as_ref()
                    .is_some_and(|c| past.profile.applied.contains(&c.event_id))
            })
            .unzip();
        let mut timeline = past.timeline;
        timeline.truncate(timeline_limit.clamp(1, MAX_TIMELINE));
        tracing::debug!(records_read = past.records_read, "past view folded");
        Ok(self.render(
            Loaded {
                profile: past.profile,
                identifiers,
                claims,
                timeline,
            },
            as_of,
        ))
    }

    /// The API view of what was loaded; RFM as of `now`.
    fn render(&self, loaded: Loaded, now: cdp_domain::UnixMillis) -> CustomerProfile {
        let Loaded {
            profile,
            identifiers,
            claims,
            timeline,
        } = loaded;
        let view = profile.view();
        let traits: cdp_domain::Attributes = view.traits.clone().into_iter().collect();
        CustomerProfile {
            customer_id: profile.customer_id.to_string(),
            identifiers: identifiers
                .iter()
                .zip(&claims)
                .map(|(id, claim)| convert::linked_identifier(id, claim.as_ref()))
                .collect(),
            traits: Some(convert::json_to_struct(&traits)),
            metrics: Some(convert::metrics(&view)),
            recent_timeline: timeline.iter().map(convert::timeline_entry).collect(),
            merged_customer_ids: profile
                .merged_from
                .iter()
                .map(ToString::to_string)
                .collect(),
            trait_sources: profile
                .traits
                .iter()
                .map(|(key, t)| v1::TraitSource {
                    key: key.clone(),
                    source_id: t.source_id.clone(),
                    channel: t.channel.to_string(),
                    at: Some(convert::millis_to_timestamp(t.at)),
                    trust: t.trust,
                })
                .collect(),
            rfm: profile
                .rfm(now, &self.options.default_currency)
                .map(|r| v1::Rfm {
                    recency_days: r.recency_days,
                    frequency: r.frequency,
                    monetary: r.monetary.to_string(),
                    recency_score: r.recency_score.into(),
                    frequency_score: r.frequency_score.into(),
                    monetary_score: r.monetary_score.into(),
                    segment: r.segment.to_owned(),
                }),
        }
    }

    /// One page of the timeline.
    #[tracing::instrument(skip(self))]
    pub async fn timeline(
        &self,
        lookup: Option<Lookup>,
        request: &ListTimelineRequest,
    ) -> Result<ListTimelineResponse, ServiceError> {
        let mut errors = Vec::new();
        let channels: Vec<Channel> = request
            .channels
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.parse::<Channel>()
                    .map_err(|reason| {
                        errors.push(cdp_domain::FieldError::new(
                            format!("channels[{i}]"),
                            reason,
                        ))
                    })
                    .ok()
            })
            .collect();
        let after = match request.page_token.as_str() {
            "" => None,
            token => match parse_token(token) {
                Some(t) => Some(t),
                None => {
                    errors.push(cdp_domain::FieldError::new(
                        "page_token",
                        "is not a token from a previous response",
                    ));
                    None
                }
            },
        };
        let from = request.from.as_ref().map(convert::timestamp_to_millis);
        let to = request.to.as_ref().map(convert::timestamp_to_millis);
        if let (Some(f), Some(t)) = (from, to)
            && f >= t
        {
            errors.push(cdp_domain::FieldError::new("to", "must be after from"));
        }
        if !errors.is_empty() {
            return Err(ServiceError::InvalidArgument(errors));
        }
        let customer = self.customer(lookup).await?;
        let size = match request.page_size {
            0 => DEFAULT_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let query = TimelineQuery {
            channels,
            types: request
                .types
                .iter()
                .map(|t| EventType::from(t.as_str()))
                .collect(),
            from,
            to,
            after,
            limit: size,
        };
        let page = self
            .profiles
            .timeline(customer, &query)
            .await
            .map_err(store_error)?;
        Ok(ListTimelineResponse {
            customer_id: customer.to_string(),
            entries: page.entries.iter().map(convert::timeline_entry).collect(),
            next_page_token: page
                .next
                .map(|(at, id)| format!("{at}_{id}"))
                .unwrap_or_default(),
        })
    }
}

fn parse_token(token: &str) -> Option<(i64, EventId)> {
    let (at, id) = token.split_once('_')?;
    Some((at.parse().ok()?, EventId(Uuid::parse_str(id).ok()?)))
}

/// The gRPC face of [`ProfileQuery`].
pub struct ProfileGrpc {
    query: ProfileQuery,
}

impl ProfileGrpc {
    pub fn new(query: ProfileQuery) -> Self {
        ProfileGrpc { query }
    }
}

#[tonic::async_trait]
impl ProfileService for ProfileGrpc {
    async fn get_profile(
        &self,
        request: Request<GetProfileRequest>,
    ) -> Result<Response<GetProfileResponse>, Status> {
        let r = request.into_inner();
        let as_of = r.as_of.as_ref().map(convert::timestamp_to_millis);
        let (lookup, limit) = profile_request(r);
        let profile = match as_of {
            Some(t) => self.query.profile_as_of(lookup, limit, t).await?,
            None => self.query.profile(lookup, limit).await?,
        };
        Ok(Response::new(GetProfileResponse {
            profile: Some(profile),
        }))
    }

    async fn search_customers(
        &self,
        request: Request<v1::SearchCustomersRequest>,
    ) -> Result<Response<v1::SearchCustomersResponse>, Status> {
        let r = request.into_inner();
        let limit = if r.limit == 0 { 10 } else { r.limit as usize };
        let candidates = self.query.search(&r.query, limit).await?;
        Ok(Response::new(v1::SearchCustomersResponse { candidates }))
    }

    type WatchProfileStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<GetProfileResponse, Status>> + Send>,
    >;

    async fn watch_profile(
        &self,
        request: Request<GetProfileRequest>,
    ) -> Result<Response<Self::WatchProfileStream>, Status> {
        let (lookup, limit) = profile_request(request.into_inner());
        // Subscribe before the first read so no change slips between them.
        let mut changes = self.query.changes();
        let first = self.query.profile(lookup, limit).await?;
        let query = self.query.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut current = first;
            if tx
                .send(Ok(GetProfileResponse {
                    profile: Some(current.clone()),
                }))
                .await
                .is_err()
            {
                return;
            }
            loop {
                let relevant = match query.next_change(&mut changes).await {
                    Some(Ok(c)) => query.concerns(&current.customer_id, c).await,
                    Some(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => true,
                    Some(Err(tokio::sync::broadcast::error::RecvError::Closed)) | None => return,
                };
                if !relevant {
                    continue;
                }
                match query
                    .profile(Some(Lookup::CustomerId(current.customer_id.clone())), limit)
                    .await
                {
                    Ok(p) => {
                        current = p;
                        if tx
                            .send(Ok(GetProfileResponse {
                                profile: Some(current.clone()),
                            }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_timeline(
        &self,
        request: Request<ListTimelineRequest>,
    ) -> Result<Response<ListTimelineResponse>, Status> {
        let r = request.into_inner();
        let lookup = r.lookup.clone().map(Lookup::from);
        Ok(Response::new(self.query.timeline(lookup, &r).await?))
    }
}

/// Installs the query side in a process: `ProfileService` and
/// `IdentityService` over gRPC and the agent console over HTTP.
pub async fn install(
    ctx: &cdp_runtime::serve::Context,
    parts: &mut cdp_runtime::serve::Parts,
) -> Result<(), cdp_runtime::serve::StartError> {
    use cdp_proto::v1::identity_service_server::IdentityServiceServer;
    use cdp_proto::v1::profile_service_server::ProfileServiceServer;
    use cdp_proto::v1::projection_service_server::ProjectionServiceServer;
    use cdp_proto::v1::replay_service_server::ReplayServiceServer;

    let query = ProfileQuery::new(
        Arc::clone(&ctx.backends.identity),
        Arc::clone(&ctx.backends.profiles),
        Arc::clone(&ctx.rules),
        ctx.config.fold_options(),
        ctx.changes.clone(),
    )
    .with_history(Arc::clone(&ctx.backends.log))
    .with_shutdown(ctx.cancel.clone());
    let console = Arc::new(console::ConsoleState {
        query: query.clone(),
        agents: ctx
            .config
            .agents
            .iter()
            .map(|a| console::Agent {
                name: a.name.clone(),
                token: a.token.expose().to_owned(),
            })
            .collect(),
        log: Arc::clone(&ctx.backends.log),
    });
    parts.http(console::router(console));
    if ctx.config.log.backend == cdp_runtime::config::LogBackend::Kafka {
        // Profile workers may run elsewhere: follow what they announce.
        parts.tasks.spawn(follow::follow_changes(
            Arc::clone(&ctx.backends.log),
            ctx.changes.clone(),
            ctx.consumer_options("query-changes"),
            ctx.cancel.clone(),
        ));
    }
    parts
        .health
        .set_serving::<ProfileServiceServer<ProfileGrpc>>()
        .await;
    parts
        .health
        .set_serving::<IdentityServiceServer<explain::IdentityGrpc>>()
        .await;
    parts
        .health
        .set_serving::<ReplayServiceServer<replay::ReplayGrpc>>()
        .await;
    parts
        .health
        .set_serving::<ProjectionServiceServer<rebuild::ProjectionGrpc>>()
        .await;
    let rebuilder = rebuild::Rebuilder::new(
        Arc::clone(&ctx.backends.log),
        Arc::clone(ctx.backends.live.generations()),
        Arc::clone(&ctx.rules),
        ctx.config.fold_options(),
        ctx.cancel.clone(),
    );
    parts
        .grpc
        .add_service(ProjectionServiceServer::new(rebuild::ProjectionGrpc::new(
            rebuilder,
        )))
        .add_service(ReplayServiceServer::new(replay::ReplayGrpc::new(
            Arc::clone(&ctx.backends.log),
            query.clone(),
        )))
        .add_service(ProfileServiceServer::new(ProfileGrpc::new(query.clone())))
        .add_service(IdentityServiceServer::new(explain::IdentityGrpc::new(
            query,
        )));
    Ok(())
}
