//! The query service: the single customer view (ProfileService) over the
//! identity graph and the profile store.

use std::sync::Arc;

use cdp_domain::normalize::normalize;
use cdp_domain::{Channel, CustomerId, EventId, EventType, IdKind, Identifier, IdentityRules};
use cdp_proto::convert;
use cdp_proto::v1::profile_service_server::ProfileService;
use cdp_proto::v1::{
    self, CustomerProfile, GetProfileRequest, GetProfileResponse, ListTimelineRequest,
    ListTimelineResponse,
};
use cdp_runtime::ServiceError;
use cdp_store::{IdentityStore, ProfileStore, StoreError, TimelineQuery};
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

fn store_error(e: StoreError) -> ServiceError {
    match e {
        StoreError::Unavailable(m) => ServiceError::Unavailable(m),
        StoreError::Invalid(m) => ServiceError::invalid("request", m),
        other => ServiceError::Internal(other.to_string()),
    }
}

/// Reads customer views. Cheap to clone.
#[derive(Clone)]
pub struct ProfileQuery {
    identity: Arc<dyn IdentityStore>,
    profiles: Arc<dyn ProfileStore>,
    rules: Arc<IdentityRules>,
}

impl ProfileQuery {
    pub fn new(
        identity: Arc<dyn IdentityStore>,
        profiles: Arc<dyn ProfileStore>,
        rules: Arc<IdentityRules>,
    ) -> Self {
        ProfileQuery {
            identity,
            profiles,
            rules,
        }
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
        let customer = self.customer(lookup).await?;
        let profile = self
            .profiles
            .profile(customer)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                ServiceError::NotFound(format!("customer {customer} has no profile yet"))
            })?;
        let node = self
            .identity
            .customer(profile.customer_id)
            .await
            .map_err(store_error)?;
        let identifiers: Vec<Identifier> = node
            .map(|n| n.identifiers.into_iter().collect())
            .unwrap_or_default();
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
            .map_err(store_error)?;
        let view = profile.view();
        let traits: cdp_domain::Attributes = view.traits.clone().into_iter().collect();
        Ok(CustomerProfile {
            customer_id: profile.customer_id.to_string(),
            identifiers: identifiers
                .iter()
                .zip(&claims)
                .map(|(id, claim)| convert::linked_identifier(id, claim.as_ref()))
                .collect(),
            traits: Some(convert::json_to_struct(&traits)),
            metrics: Some(convert::metrics(&view)),
            recent_timeline: timeline
                .entries
                .iter()
                .map(convert::timeline_entry)
                .collect(),
            merged_customer_ids: profile
                .merged_from
                .iter()
                .map(ToString::to_string)
                .collect(),
        })
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
        use v1::get_profile_request::Lookup as L;
        let r = request.into_inner();
        let lookup = r.lookup.map(|l| match l {
            L::CustomerId(c) => Lookup::CustomerId(c),
            L::Identifier(i) => Lookup::Identifier(i),
        });
        let limit = match r.timeline_limit {
            0 => DEFAULT_TIMELINE,
            n => n as usize,
        };
        let profile = self.query.profile(lookup, limit).await?;
        Ok(Response::new(GetProfileResponse {
            profile: Some(profile),
        }))
    }

    async fn list_timeline(
        &self,
        request: Request<ListTimelineRequest>,
    ) -> Result<Response<ListTimelineResponse>, Status> {
        use v1::list_timeline_request::Lookup as L;
        let r = request.into_inner();
        let lookup = r.lookup.clone().map(|l| match l {
            L::CustomerId(c) => Lookup::CustomerId(c),
            L::Identifier(i) => Lookup::Identifier(i),
        });
        Ok(Response::new(self.query.timeline(lookup, &r).await?))
    }
}
