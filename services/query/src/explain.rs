//! "Why are these identifiers one customer?": the links and merges, with
//! their causes, behind a customer view.

use std::collections::BTreeSet;

use cdp_domain::identity::Merge;
use cdp_domain::redirect::Walk;
use cdp_domain::{CustomerId, Identifier};
use cdp_proto::convert;
use cdp_proto::v1::{IdentifierExplanation, MergeStep};
use cdp_runtime::ServiceError;

use crate::ProfileQuery;

pub(crate) fn step(m: &Merge) -> MergeStep {
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
        let stores = self.stores();
        let claim = stores
            .identity
            .claims(std::slice::from_ref(id))
            .await?
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
        let mut walk = Walk::new(first);
        while let Some(next) = stores
            .identity
            .customer(walk.at())
            .await?
            .and_then(|n| n.merged_into)
        {
            let loser = walk.at();
            walk.hop(next)
                .map_err(|e| ServiceError::from(cdp_store::StoreError::from(e)))?;
            let survivor = stores.identity.customer(next).await?;
            if let Some(m) = survivor.and_then(|s| s.merges.into_iter().find(|m| m.loser == loser))
            {
                merges.push(step(&m));
            }
        }
        let current = walk.at();
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
        let stores = self.stores();
        let mut out = Vec::new();
        let mut queue = vec![customer];
        let mut seen = BTreeSet::new();
        while let Some(c) = queue.pop() {
            if !seen.insert(c) {
                continue;
            }
            if let Some(node) = stores.identity.customer(c).await? {
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
