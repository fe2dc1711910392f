//! "Why are these identifiers one customer?": the links and merges, with
//! their causes, behind a customer view.

use std::collections::BTreeSet;

use cdp_domain::identity::Merge;
use cdp_domain::{CustomerId, Identifier};
use cdp_proto::convert;
use cdp_proto::v1::identity_service_server::IdentityService;
use cdp_proto::v1::{
    ExplainRequest, ExplainResponse, IdentifierExplanation, ListMergesRequest, ListMergesResponse,
    MergeStep,
};
use cdp_runtime::ServiceError;
use tonic::{Request, Response, Status};

use crate::{Lookup, ProfileQuery, store_error};

fn step(m: &Merge) -> MergeStep {
    MergeStep {
        loser_customer_id: m.loser.to_string(),
        survivor_customer_id: m.survivor.to_string(),
        at: Some(convert::millis_to_timestamp(m.at)),
        cause_event_id: m.cause.event_id.to_string(),
        cause_identifier: Some(convert::identifier(&m.cause.identifier)),
        rule: m.cause.rule.clone(),
    }
}

impl ProfileQuery {
    /// The path of one identifier: its link, then each merge to the customer
    /// that holds it now.
    pub async fn explain_one(
        &self,
        id: &Identifier,
    ) -> Result<IdentifierExplanation, ServiceError> {
        let claim = self
            .identity
            .claims(std::slice::from_ref(id))
            .await
            .map_err(store_error)?
            .pop()
            .flatten();
        let Some(claim) = claim else {
            return Ok(IdentifierExplanation {
                identifier: Some(convert::identifier(id)),
                linked: false,
                ..IdentifierExplanation::default()
            });
        };
        let mut merges = Vec::new();
        let first = claim.linked_to();
        let mut current = first;
        for _ in 0..64 {
            let node = self.identity.customer(current).await.map_err(store_error)?;
            let Some(next) = node.and_then(|n| n.merged_into) else {
                break;
            };
            let survivor = self.identity.customer(next).await.map_err(store_error)?;
            if let Some(m) =
                survivor.and_then(|s| s.merges.into_iter().find(|m| m.loser == current))
            {
                merges.push(step(&m));
            }
            current = next;
        }
        Ok(IdentifierExplanation {
            identifier: Some(convert::identifier(id)),
            linked: true,
            linked_by_event_id: claim.event_id.to_string(),
            linked_at: Some(convert::millis_to_timestamp(claim.at)),
            first_customer_id: first.to_string(),
            merges,
            customer_id: current.to_string(),
        })
    }

    /// Every merge into `customer` and, recursively, into the customers it absorbed.
    pub async fn merges(&self, customer: CustomerId) -> Result<Vec<Merge>, ServiceError> {
        let mut out = Vec::new();
        let mut queue = vec![customer];
        let mut seen = BTreeSet::new();
        while let Some(c) = queue.pop() {
            if !seen.insert(c) {
                continue;
            }
            if let Some(node) = self.identity.customer(c).await.map_err(store_error)? {
                for m in node.merges {
                    queue.push(m.loser);
                    out.push(m);
                }
            }
        }
        out.sort_by_key(|m| (m.at, m.cause.event_id));
        Ok(out)
    }
}

/// The gRPC face of identity explanations.
pub struct IdentityGrpc {
    query: ProfileQuery,
}

impl IdentityGrpc {
    pub fn new(query: ProfileQuery) -> Self {
        IdentityGrpc { query }
    }
}

#[tonic::async_trait]
impl IdentityService for IdentityGrpc {
    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
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
            out.push(self.query.explain_one(&id).await?);
        }
        let roots: BTreeSet<&str> = out.iter().map(|e| e.customer_id.as_str()).collect();
        let same_customer = out.iter().all(|e| e.linked) && roots.len() == 1;
        Ok(Response::new(ExplainResponse {
            identifiers: out,
            same_customer,
        }))
    }

    async fn list_merges(
        &self,
        request: Request<ListMergesRequest>,
    ) -> Result<Response<ListMergesResponse>, Status> {
        let lookup = request.into_inner().lookup.map(Lookup::from);
        let customer = self.query.customer(lookup).await?;
        let merges = self.query.merges(customer).await?;
        Ok(Response::new(ListMergesResponse {
            customer_id: customer.to_string(),
            merges: merges.iter().map(step).collect(),
        }))
    }
}
