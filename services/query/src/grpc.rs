//! The gRPC surface of the query side: `ProfileService` (the view, search,
//! the live view, the timeline) and `IdentityService` (why identifiers are
//! one customer).

use std::collections::BTreeSet;

use cdp_proto::convert;
use cdp_proto::v1::identity_service_server::IdentityService;
use cdp_proto::v1::profile_service_server::ProfileService;
use cdp_proto::v1::{
    self, DecisionExplanation, ExplainRequest, ExplainResponse, GetDecisionRequest,
    GetProfileRequest, GetProfileResponse, ListMergesRequest, ListMergesResponse,
    ListQuarantinedRequest, ListQuarantinedResponse, ListTimelineRequest, ListTimelineResponse,
};
use std::sync::Arc;

use cdp_runtime::ServiceError;
use cdp_runtime::auth::{Access, Caller};
use tonic::{Request, Response, Status};

use crate::explain::step;
use crate::view::{Update, profile_request};
use crate::{Lookup, ProfileQuery, Viewer};

/// The gRPC face of [`ProfileQuery`]. Every answer is scoped, masked and
/// audited through the caller's [`Viewer`].
pub struct ProfileGrpc {
    query: ProfileQuery,
    access: Arc<Access>,
}

impl ProfileGrpc {
    pub fn new(query: ProfileQuery, access: Arc<Access>) -> Self {
        ProfileGrpc { query, access }
    }
}

fn viewer<T>(access: &Arc<Access>, request: &Request<T>) -> Result<Viewer, ServiceError> {
    Ok(Viewer::new(access, Caller::of(request)?))
}

#[tonic::async_trait]
impl ProfileService for ProfileGrpc {
    async fn get_profile(
        &self,
        request: Request<GetProfileRequest>,
    ) -> Result<Response<GetProfileResponse>, Status> {
        let viewer = viewer(&self.access, &request)?;
        let r = request.into_inner();
        let as_of = r.as_of.as_ref().map(convert::timestamp_to_millis);
        let (lookup, limit) = profile_request(r);
        let profile = match as_of {
            Some(t) => self.query.profile_as_of(&viewer, lookup, limit, t).await,
            None => self.query.profile(&viewer, lookup, limit).await,
        }
        .map_err(|e| viewer.hide(e))?;
        Ok(Response::new(GetProfileResponse {
            profile: Some(profile),
        }))
    }

    async fn search_customers(
        &self,
        request: Request<v1::SearchCustomersRequest>,
    ) -> Result<Response<v1::SearchCustomersResponse>, Status> {
        let viewer = viewer(&self.access, &request)?;
        let r = request.into_inner();
        let limit = if r.limit == 0 { 10 } else { r.limit as usize };
        let candidates = self.query.search(&viewer, &r.query, limit).await?;
        Ok(Response::new(v1::SearchCustomersResponse { candidates }))
    }

    type WatchProfileStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<GetProfileResponse, Status>> + Send>,
    >;

    /// The view now, then again whenever it changes. When a rebuild
    /// switches the projection generation, the lookup the watch started
    /// with is answered again from the new generation (its customer id may
    /// differ); the stream ends with `NOT_FOUND` if it no longer names a
    /// customer there.
    async fn watch_profile(
        &self,
        request: Request<GetProfileRequest>,
    ) -> Result<Response<Self::WatchProfileStream>, Status> {
        let viewer = viewer(&self.access, &request)?;
        let (lookup, limit) = profile_request(request.into_inner());
        let mut watch = self.query.watch();
        let first = self
            .query
            .profile(&viewer, lookup.clone(), limit)
            .await
            .map_err(|e| viewer.hide(e))?;
        let query = self.query.clone();
        let access = Arc::clone(&self.access);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut current = first;
            // Unmasked, on the server only: to find the view again after a
            // generation switch.
            let mut identifiers = query.identifiers_now(&current.customer_id).await;
            loop {
                let response = GetProfileResponse {
                    profile: Some(current.clone()),
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
                let next = match query.next_update(&mut watch, &current.customer_id).await {
                    Update::Changed => Ok(Lookup::CustomerId(current.customer_id.clone())),
                    // The lookup the watch started with, asked again, else
                    // the customer holding the view's strongest identifier.
                    Update::Switched(_) => {
                        query
                            .refind(lookup.clone(), &current.customer_id, &identifiers)
                            .await
                    }
                    Update::Ended => return,
                };
                // A key revoked or expired since the watch began ends it.
                if let Err(e) = access
                    .registry
                    .by_id(&viewer.caller.principal.credential_id)
                {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
                let view = match next {
                    Ok(lookup) => query.profile(&viewer, Some(lookup), limit).await,
                    Err(e) => Err(e),
                };
                match view {
                    Ok(p) => {
                        current = p;
                        identifiers = query.identifiers_now(&current.customer_id).await;
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
        let viewer = viewer(&self.access, &request)?;
        let r = request.into_inner();
        let lookup = r.lookup.clone().map(Lookup::from);
        Ok(Response::new(
            self.query
                .timeline(&viewer, lookup, &r)
                .await
                .map_err(|e| viewer.hide(e))?,
        ))
    }
}

/// The gRPC face of identity explanations.
pub struct IdentityGrpc {
    query: ProfileQuery,
    access: Arc<Access>,
}

impl IdentityGrpc {
    pub fn new(query: ProfileQuery, access: Arc<Access>) -> Self {
        IdentityGrpc { query, access }
    }

    /// Refuses a customer outside the viewer's scope (as if it did not exist).
    async fn admit(&self, viewer: &Viewer, customer_id: &str) -> Result<(), ServiceError> {
        if !viewer.scoped() || customer_id.is_empty() {
            return Ok(());
        }
        let customer = self
            .query
            .customer(Some(Lookup::CustomerId(customer_id.to_owned())))
            .await?;
        match self.query.stores().profiles.profile(customer).await? {
            Some(p) => viewer.admit(&p),
            None => Err(ServiceError::NotFound("no such customer".into())),
        }
    }
}

#[tonic::async_trait]
impl IdentityService for IdentityGrpc {
    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        let viewer = viewer(&self.access, &request)?;
        let r = request.into_inner();
        if r.identifiers.is_empty() {
            return Err(
                ServiceError::invalid("identifiers", "give at least one identifier").into(),
            );
        }
        let mut out = Vec::with_capacity(r.identifiers.len());
        for (i, raw) in r.identifiers.iter().enumerate() {
            let id = self.query.identifier(raw).map_err(|e| match e {
                ServiceError::InvalidArgument(fields) => ServiceError::InvalidArgument(
                    fields
                        .into_iter()
                        .map(|f| {
                            cdp_domain::FieldError::new(
                                f.field
                                    .replacen("identifier", &format!("identifiers[{i}]"), 1),
                                f.reason,
                            )
                        })
                        .collect(),
                ),
                other => other,
            })?;
            let explained = self.query.explain_one(&id).await?;
            if viewer.scoped() && explained.customer_id.is_empty() {
                // To a scoped caller, an unknown identifier looks like one
                // outside the scope.
                return Err(viewer.hide(ServiceError::NotFound(String::new())).into());
            }
            self.admit(&viewer, &explained.customer_id)
                .await
                .map_err(|e| viewer.hide(e))?;
            out.push(explained);
        }
        let roots: BTreeSet<&str> = out.iter().map(|e| e.customer_id.as_str()).collect();
        let same_customer = out.iter().all(|e| e.linked) && roots.len() == 1;
        let customers: BTreeSet<String> = roots.iter().map(|r| (*r).to_owned()).collect();
        for c in customers {
            viewer.read(&c, &["explain"], "explain").await?;
        }
        out.iter_mut().for_each(|e| viewer.explanation(e));
        Ok(Response::new(ExplainResponse {
            identifiers: out,
            same_customer,
        }))
    }

    async fn list_merges(
        &self,
        request: Request<ListMergesRequest>,
    ) -> Result<Response<ListMergesResponse>, Status> {
        let viewer = viewer(&self.access, &request)?;
        let lookup = request.into_inner().lookup.map(Lookup::from);
        let described = viewer.describe(lookup.as_ref());
        let customer = self
            .query
            .customer(lookup)
            .await
            .map_err(|e| viewer.hide(e))?;
        self.admit(&viewer, &customer.to_string())
            .await
            .map_err(|e| viewer.hide(e))?;
        let merges = self.query.merges(customer).await?;
        viewer
            .read(&customer.to_string(), &["merges"], &described)
            .await?;
        let mut merges: Vec<v1::MergeStep> = merges.iter().map(step).collect();
        merges.iter_mut().for_each(|m| viewer.merge_step(m));
        Ok(Response::new(ListMergesResponse {
            customer_id: customer.to_string(),
            merges,
        }))
    }

    async fn get_decision(
        &self,
        request: Request<GetDecisionRequest>,
    ) -> Result<Response<DecisionExplanation>, Status> {
        let viewer = viewer(&self.access, &request)?;
        let r = request.into_inner();
        let mut decision = self.query.decision(&r.event_id).await?;
        viewer
            .read(
                &decision.customer_id,
                &["decision"],
                &format!("event:{}", r.event_id),
            )
            .await?;
        viewer.decision(&mut decision);
        Ok(Response::new(decision))
    }

    async fn list_quarantined(
        &self,
        request: Request<ListQuarantinedRequest>,
    ) -> Result<Response<ListQuarantinedResponse>, Status> {
        let viewer = viewer(&self.access, &request)?;
        let mut identifiers = self.query.quarantined().await?;
        viewer.read("", &["quarantined"], "").await?;
        identifiers.iter_mut().for_each(|q| viewer.quarantined(q));
        Ok(Response::new(ListQuarantinedResponse { identifiers }))
    }
}
