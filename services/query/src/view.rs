//! The single customer view: a customer found by any identifier in any
//! common form, their profile, identifiers and timeline, as domain values
//! and as the API's messages. Every call reads one projection generation
//! (the one active when it starts), never two.

use std::sync::Arc;

use cdp_domain::FoldOptions;
use cdp_domain::normalize::normalize;
use cdp_domain::{Channel, CustomerId, EventId, EventType, IdKind, Identifier, IdentityRules};
use cdp_proto::convert;
use cdp_proto::v1::{
    self, CustomerProfile, GetProfileRequest, ListTimelineRequest, ListTimelineResponse,
};
use cdp_runtime::ServiceError;
use cdp_store::{LiveStores, ProfileChanges, ProjectionStores, TimelineQuery};
use uuid::Uuid;

use crate::history;
use crate::viewer::Viewer;

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
    v1::reveal_field_request::Lookup,
    v1::replay_request::Customer,
    v1::record_consent_request::Lookup,
    v1::get_consent_request::Lookup,
    v1::check_consent_request::Lookup,
    v1::export_request::Lookup,
    v1::erase_request::Lookup
);

/// The lookup and timeline length a `GetProfileRequest` asks for.
pub(crate) fn profile_request(r: GetProfileRequest) -> (Option<Lookup>, usize) {
    let limit = match r.timeline_limit {
        0 => DEFAULT_TIMELINE,
        n => n as usize,
    };
    (r.lookup.map(Lookup::from), limit)
}

/// What a live view follows (see [`ProfileQuery::watch`]).
pub struct Watch {
    changes: tokio::sync::broadcast::Receiver<CustomerId>,
    switches: tokio::sync::watch::Receiver<u32>,
}

/// What a live view waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// The view changed: read it again.
    Changed,
    /// The projection generation switched (to this one): the customer id
    /// may stand for another customer now; look the customer up again.
    Switched(u32),
    /// The process is shutting down.
    Ended,
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
    live: Arc<LiveStores>,
    rules: Arc<IdentityRules>,
    options: FoldOptions,
    changes: ProfileChanges,
    /// The data keys that open the log's personal parts.
    keyring: Arc<cdp_store::Keyring>,
    /// Past views from the event log (time travel), when wired.
    history: Option<Arc<history::History>>,
    /// Fires when the process shuts down: live streams end.
    shutdown: tokio_util::sync::CancellationToken,
    /// The audience definitions, for the computed traits' values.
    audiences: Option<Arc<cdp_runtime::audiences::AudienceRegistry>>,
}

impl ProfileQuery {
    /// The stores of the generation active now: take them once per request.
    pub fn stores(&self) -> ProjectionStores {
        self.live.current()
    }

    /// The projection generations this query follows.
    pub fn live(&self) -> &Arc<LiveStores> {
        &self.live
    }

    /// The identity rules (how identifiers are normalised and ranked).
    pub fn rules(&self) -> &IdentityRules {
        &self.rules
    }

    pub fn new(
        live: Arc<LiveStores>,
        rules: Arc<IdentityRules>,
        options: FoldOptions,
        changes: ProfileChanges,
        keyring: Arc<cdp_store::Keyring>,
    ) -> Self {
        ProfileQuery {
            live,
            rules,
            options,
            changes,
            keyring,
            history: None,
            shutdown: tokio_util::sync::CancellationToken::new(),
            audiences: None,
        }
    }

    /// Shows the computed traits these definitions hold.
    pub fn with_audiences(
        mut self,
        registry: Arc<cdp_runtime::audiences::AudienceRegistry>,
    ) -> Self {
        self.audiences = Some(registry);
        self
    }

    /// The computed traits' values of `profile` at `now` under the
    /// definitions held now (none without a registry; none, with a
    /// warning, while the definitions cannot be read).
    pub async fn trait_values(
        &self,
        viewer: &Viewer,
        profile: &cdp_domain::Profile,
        now: cdp_domain::UnixMillis,
    ) -> Vec<cdp_domain::audience::TraitValue> {
        let Some(registry) = &self.audiences else {
            return Vec::new();
        };
        match registry.current().await {
            Ok(defs) => {
                let mut values = profile.audience.trait_values(&defs, now);
                for (v, def) in values.iter_mut().zip(&defs.traits) {
                    v.mask(def, &viewer.masker);
                }
                values
            }
            Err(error) => {
                tracing::warn!(%error, "audience definitions not read; computed traits left out");
                Vec::new()
            }
        }
    }

    /// Ends live streams (`WatchProfile`, the console's events) when
    /// `shutdown` fires, so a graceful shutdown does not wait for watchers.
    pub fn with_shutdown(mut self, shutdown: tokio_util::sync::CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Starts following live updates (before the first read of the view,
    /// so no update slips between them).
    pub fn watch(&self) -> Watch {
        let mut switches = self.live.switches();
        switches.borrow_and_update();
        Watch {
            changes: self.changes.subscribe(),
            switches,
        }
    }

    /// Waits for the next update that concerns the view of `watched` (a
    /// customer id): a change of that customer or of the survivor it was
    /// merged into, a missed change (a slow listener reads again), or a
    /// switch to another projection generation.
    pub async fn next_update(&self, watch: &mut Watch, watched: &str) -> Update {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Update::Ended,
                change = watch.changes.recv() => match change {
                    Ok(c) if self.concerns(watched, c).await => return Update::Changed,
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => return Update::Changed,
                    Err(RecvError::Closed) => return Update::Ended,
                },
                switched = watch.switches.changed() => {
                    if switched.is_err() {
                        return Update::Ended;
                    }
                    let generation = *watch.switches.borrow_and_update();
                    tracing::debug!(generation, "a watched view follows a generation switch");
                    return Update::Switched(generation);
                }
            }
        }
    }

    /// Finds again, after a switch to another projection generation, the
    /// customer a live view showed: the same customer id if it still names
    /// a profile (ids depend on the order events were resolved in, so a
    /// rebuild may mint others), else the customer that now holds the
    /// strongest of the identifiers the view had.
    pub async fn relocate(
        &self,
        customer_id: &str,
        identifiers: &[Identifier],
    ) -> Result<CustomerId, ServiceError> {
        let stores = self.stores();
        if let Ok(id) = Uuid::parse_str(customer_id.trim()).map(CustomerId)
            && let Some(p) = stores.profiles.profile(id).await?
        {
            return Ok(p.customer_id);
        }
        for id in self.rules.strongest_first(identifiers) {
            if let Some(owner) = stores.identity.owner(id).await? {
                return Ok(owner);
            }
        }
        Err(ServiceError::NotFound(format!(
            "neither customer {customer_id} nor any of its identifiers is in projection generation {}",
            stores.generation
        )))
    }

    /// The lookup of a live view, asked again after a generation switch:
    /// a lookup by identifier as it was, unless it names nobody now (the
    /// new rules may block it); then, and for a lookup by customer id,
    /// [`relocate`](Self::relocate) from the view last shown.
    pub async fn refind(
        &self,
        lookup: Option<Lookup>,
        customer_id: &str,
        identifiers: &[Identifier],
    ) -> Result<Lookup, ServiceError> {
        if let Some(l @ Lookup::Identifier(_)) = &lookup
            && self.customer(Some(l.clone())).await.is_ok()
        {
            return Ok(l.clone());
        }
        let found = self.relocate(customer_id, identifiers).await?;
        Ok(Lookup::CustomerId(found.to_string()))
    }

    /// A customer's identifiers now, unmasked (kept on the server by live
    /// views, to find the customer again after a generation switch).
    pub async fn identifiers_now(&self, customer_id: &str) -> Vec<Identifier> {
        let Ok(id) = customer_id.parse::<CustomerId>() else {
            return Vec::new();
        };
        identifiers_of(&self.stores(), id).await.unwrap_or_default()
    }

    /// Answers views as of a past instant from `log` (time travel).
    pub fn with_history(mut self, log: Arc<dyn cdp_log::EventLog>) -> Self {
        self.history = Some(Arc::new(history::History::new(
            log,
            self.options.clone(),
            Arc::clone(&self.keyring),
        )));
        self
    }

    /// The keyring that opens the log's personal parts.
    pub fn keyring(&self) -> &Arc<cdp_store::Keyring> {
        &self.keyring
    }

    /// The process's audience registry, when wired.
    pub fn audiences(&self) -> Option<&Arc<cdp_runtime::audiences::AudienceRegistry>> {
        self.audiences.as_ref()
    }

    /// Drops every past view kept in memory (after an erasure).
    pub fn forget_history(&self) {
        if let Some(h) = &self.history {
            h.forget();
        }
    }

    /// Fires when the process shuts down.
    pub fn shutdown(&self) -> &tokio_util::sync::CancellationToken {
        &self.shutdown
    }

    /// Everything the view is made of, as domain values.
    pub async fn load(
        &self,
        lookup: Option<Lookup>,
        timeline_limit: usize,
    ) -> Result<Loaded, ServiceError> {
        let stores = self.stores();
        let customer = self.customer_in(&stores, lookup).await?;
        let profile = stores.profiles.profile(customer).await?.ok_or_else(|| {
            ServiceError::NotFound(format!("customer {customer} has no profile yet"))
        })?;
        let identifiers = identifiers_of(&stores, profile.customer_id).await?;
        let claims = stores.identity.claims(&identifiers).await?;
        let query = TimelineQuery {
            limit: timeline_limit.clamp(1, MAX_TIMELINE),
            ..TimelineQuery::default()
        };
        let timeline = stores.profiles.timeline_of(&profile, &query).await?.entries;
        Ok(Loaded {
            profile,
            identifiers,
            claims,
            timeline,
        })
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

    /// Candidates for what an agent typed, within the viewer's scope,
    /// masked, each audited.
    #[tracing::instrument(skip_all, fields(limit))]
    pub async fn search(
        &self,
        viewer: &Viewer,
        query: &str,
        limit: usize,
    ) -> Result<Vec<v1::CustomerCandidate>, ServiceError> {
        if query.trim().chars().count() < 2 {
            return Err(ServiceError::invalid("query", "type at least 2 characters"));
        }
        let prefixes = cdp_domain::search::query_prefixes(query);
        let stores = self.stores();
        let found = stores
            .profiles
            .search(&prefixes, limit.clamp(1, 50))
            .await?;
        let mut out = Vec::with_capacity(found.len());
        for customer in found {
            let Some(profile) = stores.profiles.profile(customer).await? else {
                continue;
            };
            if viewer.admit(&profile).is_err() {
                continue;
            }
            let ids = identifiers_of(&stores, profile.customer_id).await?;
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
        let typed = format!("search:{}", cdp_domain::access::mask_token(query.trim()));
        if out.is_empty() {
            viewer.read("", &["search"], &typed).await?;
        }
        for c in &mut out {
            viewer.candidate(c);
            viewer.read(&c.customer_id, &["search"], &typed).await?;
        }
        Ok(out)
    }

    /// The customer that stands for `customer_id` now, if it parses.
    pub async fn identity_root(&self, customer_id: &str) -> Option<String> {
        let id = Uuid::parse_str(customer_id).ok()?;
        self.stores()
            .identity
            .root(CustomerId(id))
            .await
            .ok()
            .map(|c| c.to_string())
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
        self.customer_in(&self.stores(), lookup).await
    }

    /// The customer a lookup names in one generation's stores.
    pub async fn customer_in(
        &self,
        stores: &ProjectionStores,
        lookup: Option<Lookup>,
    ) -> Result<CustomerId, ServiceError> {
        match lookup {
            None => Err(ServiceError::invalid(
                "lookup",
                "give a customer_id or an identifier",
            )),
            Some(Lookup::CustomerId(s)) => {
                let id = Uuid::parse_str(s.trim()).map(CustomerId).map_err(|_| {
                    ServiceError::invalid("customer_id", format!("{s:?} is not a UUID"))
                })?;
                Ok(stores.identity.root(id).await?)
            }
            Some(Lookup::Identifier(raw)) => {
                let id = self.identifier(&raw)?;
                stores
                    .identity
                    .owner(&id)
                    .await?
                    .ok_or_else(|| ServiceError::NotFound(format!("no customer has {id}")))
            }
        }
    }

    /// The view as `viewer` may see it: refused outside their scope,
    /// masked, and audited (`fields` name what was read) before it is
    /// returned.
    pub async fn load_for(
        &self,
        viewer: &Viewer,
        lookup: Option<Lookup>,
        timeline_limit: usize,
        fields: &[&str],
    ) -> Result<Loaded, ServiceError> {
        let described = viewer.describe(lookup.as_ref());
        let mut loaded = self
            .load(lookup, timeline_limit)
            .await
            .map_err(|e| viewer.hide(e))?;
        viewer.admit(&loaded.profile)?;
        viewer.mask(&mut loaded);
        viewer
            .read(&loaded.profile.customer_id.to_string(), fields, &described)
            .await?;
        Ok(loaded)
    }

    /// The full customer view, as `viewer` may see it.
    #[tracing::instrument(skip_all, fields(timeline_limit))]
    pub async fn profile(
        &self,
        viewer: &Viewer,
        lookup: Option<Lookup>,
        timeline_limit: usize,
    ) -> Result<CustomerProfile, ServiceError> {
        let loaded = self
            .load_for(viewer, lookup, timeline_limit, &["profile"])
            .await?;
        let now = cdp_runtime::now_ms();
        let values = self.trait_values(viewer, &loaded.profile, now).await;
        let mut profile = self.render(loaded, now);
        profile.computed_traits = values
            .into_iter()
            .map(|t| v1::ComputedTraitValue {
                name: t.name,
                version: t.version,
                value_json: t.value.to_string(),
                complete: t.complete,
            })
            .collect();
        Ok(profile)
    }

    /// The view as it was at `as_of`, folded from the event log.
    /// The event log, when this query service was wired with one.
    pub fn event_log(&self) -> Result<&Arc<dyn cdp_log::EventLog>, ServiceError> {
        self.history
            .as_ref()
            .map(|h| h.log())
            .ok_or_else(|| ServiceError::Unavailable("this query service has no event log".into()))
    }

    #[tracing::instrument(skip_all, fields(as_of))]
    pub async fn profile_as_of(
        &self,
        viewer: &Viewer,
        lookup: Option<Lookup>,
        timeline_limit: usize,
        as_of: cdp_domain::UnixMillis,
    ) -> Result<CustomerProfile, ServiceError> {
        let history = self.history.as_ref().ok_or_else(|| {
            ServiceError::Unavailable("this query service has no event log for time travel".into())
        })?;
        let stores = self.stores();
        let described = viewer.describe(lookup.as_ref());
        // Who the lookup named then: an identifier's first customer, or the id given.
        let then = match lookup {
            Some(Lookup::Identifier(raw)) => {
                let id = self.identifier(&raw)?;
                let claims = stores.identity.claims(std::slice::from_ref(&id)).await?;
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
        let root = stores.identity.root(then).await?;
        let mut family = std::collections::BTreeSet::from([root, then]);
        if let Some(now) = stores.profiles.profile(root).await? {
            family.extend(now.merged_from);
        }
        let past = history
            .view(stores.generation, root, &family, then, as_of)
            .await?;
        // The identifiers it had then: those linked by an event folded by then.
        let mut identifiers = Vec::new();
        for member in &family {
            identifiers.extend(identifiers_of(&stores, *member).await?);
        }
        identifiers.sort();
        identifiers.dedup();
        let claims = stores.identity.claims(&identifiers).await?;
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
        let mut loaded = Loaded {
            profile: past.profile,
            identifiers,
            claims,
            timeline,
        };
        viewer.admit(&loaded.profile)?;
        viewer.mask(&mut loaded);
        viewer
            .read(
                &loaded.profile.customer_id.to_string(),
                &["profile", "as_of"],
                &described,
            )
            .await?;
        Ok(self.render(loaded, as_of))
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
            consents: view.consents.iter().map(convert::consent_record).collect(),
            segments: profile
                .audience
                .members
                .iter()
                .map(|(segment, m)| v1::SegmentMembership {
                    segment: segment.clone(),
                    version: m.version,
                    since: Some(convert::millis_to_timestamp(m.since)),
                })
                .collect(),
            computed_traits: Vec::new(),
        }
    }

    /// One page of the timeline, as `viewer` may see it.
    #[tracing::instrument(skip_all)]
    pub async fn timeline(
        &self,
        viewer: &Viewer,
        lookup: Option<Lookup>,
        request: &ListTimelineRequest,
    ) -> Result<ListTimelineResponse, ServiceError> {
        let described = viewer.describe(lookup.as_ref());
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
        let stores = self.stores();
        let customer = self.customer_in(&stores, lookup).await?;
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
        if viewer.scoped() {
            let profile = stores
                .profiles
                .profile(customer)
                .await?
                .ok_or_else(|| ServiceError::NotFound("no such customer".into()))?;
            viewer.admit(&profile)?;
        }
        let mut page = stores.profiles.timeline(customer, &query).await?;
        page.entries
            .iter_mut()
            .for_each(|e| viewer.masker.timeline_entry(e));
        viewer
            .read(&customer.to_string(), &["timeline"], &described)
            .await?;
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

/// The identifiers linked to a customer.
pub(crate) async fn identifiers_of(
    stores: &ProjectionStores,
    customer: CustomerId,
) -> Result<Vec<Identifier>, ServiceError> {
    let node = stores.identity.customer(customer).await?;
    Ok(node
        .map(|n| n.identifiers.into_iter().collect())
        .unwrap_or_default())
}
