//! "Why are these identifiers one customer?": the links and merges, with
//! their causes, behind a customer view.

use std::collections::BTreeSet;

use cdp_domain::identity::{Claim, Ignored, Merge};
use cdp_domain::redirect::Walk;
use cdp_domain::{CustomerId, EventId, Identifier, Resolution};
use cdp_pipeline::{codec, emit, topic};
use cdp_proto::convert;
use cdp_proto::v1::{
    DecisionExplanation, IdentifierExplanation, IgnoredIdentifier, MergeStep,
    QuarantinedIdentifier, RecycledIdentifier, Sighting, alert_record,
};
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

fn ignored(id: &Identifier, why: &Ignored) -> IgnoredIdentifier {
    IgnoredIdentifier {
        identifier: Some(convert::identifier(id)),
        code: why.code().into(),
        reason: why.describe(),
        other_customer_id: why.other().map(|c| c.to_string()).unwrap_or_default(),
    }
}

fn sightings(claim: &Claim) -> Vec<Sighting> {
    claim
        .sightings
        .iter()
        .map(|s| Sighting {
            customer_id: s.customer.to_string(),
            event_id: s.event_id.to_string(),
            at: Some(convert::millis_to_timestamp(s.at)),
        })
        .collect()
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
        let blocked = self
            .rules()
            .blocked(id)
            .map(|reason| Ignored::Blocked(reason).describe());
        let Some(claim) = claim else {
            let (status, reason) = match blocked {
                Some(reason) => ("blocked", reason),
                None => ("unknown", "no event has linked it".to_owned()),
            };
            return Ok(IdentifierExplanation {
                identifier: Some(convert::identifier(id)),
                linked: false,
                status: status.into(),
                reason,
                ..IdentifierExplanation::default()
            });
        };
        let (status, reason) = match (&blocked, &claim.quarantined) {
            (Some(reason), _) => ("blocked", reason.clone()),
            (None, Some(q)) if !self.rules().released(id) => (
                "quarantined",
                format!(
                    "seen with {} different people, more than the {} its kind allows: it no \
                     longer links or attributes",
                    q.people, q.limit
                ),
            ),
            _ => ("linked", String::new()),
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
            status: status.into(),
            reason,
            last_seen: Some(convert::millis_to_timestamp(claim.last_seen())),
            sightings: sightings(&claim),
        })
    }

    /// The decision recorded for one event.
    pub async fn decision(&self, event_id: &str) -> Result<DecisionExplanation, ServiceError> {
        let id = uuid::Uuid::parse_str(event_id.trim())
            .map(EventId)
            .map_err(|e| ServiceError::invalid("event_id", format!("is not a UUID: {e}")))?;
        let log = self.event_log()?;
        let Some((partition, offset)) = log.locate(topic::TOUCHPOINTS, id.0.as_bytes()).await?
        else {
            return Err(ServiceError::NotFound(format!(
                "no event {id} in the log (or this log cannot find events by id)"
            )));
        };
        let record = log
            .read(topic::TOUCHPOINTS, partition, offset, 1)
            .await?
            .pop()
            .ok_or_else(|| ServiceError::NotFound(format!("event {id} is no longer in the log")))?;
        let keys = emit::keys_for(self.keyring(), [&record]).await?;
        let opened = emit::read_touchpoint(&record, &keys)
            .map_err(|e| ServiceError::Internal(format!("event {id} cannot be decoded: {e}")))?;
        if opened.anonymous {
            return Err(ServiceError::NotFound(format!(
                "event {id} belongs to an erased customer"
            )));
        }
        let event = opened.value;
        let mut out = DecisionExplanation {
            event_id: id.to_string(),
            occurred_at: Some(convert::millis_to_timestamp(event.envelope.occurred_at)),
            source_id: event.envelope.source_id.clone(),
            ..DecisionExplanation::default()
        };
        match self.stores().identity.decision(&event).await? {
            Some(Resolution::Resolved(d)) => {
                out.resolved = true;
                out.customer_id = d.customer_id.to_string();
                out.created = d.created;
                out.linked = d.claims.iter().map(convert::identifier).collect();
                out.merges = d.merges.iter().map(step).collect();
                out.ignored = d.ignored.iter().map(|(i, why)| ignored(i, why)).collect();
                out.recycled = d
                    .recycled
                    .iter()
                    .map(|(i, former)| RecycledIdentifier {
                        identifier: Some(convert::identifier(i)),
                        former_customer_id: former.to_string(),
                    })
                    .collect();
                out.quarantined = d
                    .quarantined
                    .iter()
                    .map(|q| convert::identifier(&q.identifier))
                    .collect();
            }
            Some(Resolution::Unresolvable { ignored: why }) => {
                out.ignored = why.iter().map(|(i, w)| ignored(i, w)).collect();
            }
            None => {
                // Not resolved (yet), or no identifier could attribute it: the
                // dead letters say which. What validation dropped is known.
                out.ignored = event
                    .personal
                    .dropped
                    .iter()
                    .map(|d| {
                        ignored(
                            &Identifier::new(d.kind.clone(), d.value.clone()),
                            &Ignored::Invalid {
                                reason: d.reason.clone(),
                            },
                        )
                    })
                    .collect();
            }
        }
        Ok(out)
    }

    /// Identifiers quarantined as shared in the generation that serves, from
    /// the `alerts` topic, with their state now.
    pub async fn quarantined(&self) -> Result<Vec<QuarantinedIdentifier>, ServiceError> {
        let log = self.event_log()?;
        let stores = self.stores();
        let mut alerts: Vec<cdp_proto::v1::IdentifierQuarantined> = Vec::new();
        cdp_log::scan(log.as_ref(), topic::ALERTS, 500, |r| {
            if emit::generation_of(r) != Some(stores.generation) {
                return Ok::<_, ServiceError>(());
            }
            let Ok(alert) = codec::decode_alert(&r.value) else {
                tracing::warn!(
                    partition = r.partition,
                    offset = r.offset,
                    "an undecodable alert is skipped"
                );
                return Ok(());
            };
            if let Some(alert_record::Alert::Quarantined(q)) = alert.alert {
                alerts.push(q);
            }
            Ok(())
        })
        .await?;
        // Their values are sealed under their own keys (left out once erased).
        let subjects: Vec<_> = alerts
            .iter()
            .filter_map(|q| q.identifier_sealed.as_ref())
            .flat_map(cdp_pipeline::seal::subjects_of)
            .collect();
        let keys = self.keyring().keys(&subjects).await?;
        let mut found: Vec<(Identifier, cdp_proto::v1::IdentifierQuarantined)> = Vec::new();
        for q in alerts {
            let Ok(opened) = codec::open_identifier(
                "identifier",
                q.identifier.as_ref(),
                q.identifier_sealed.as_ref(),
                &keys,
            ) else {
                continue;
            };
            if opened.value.is_empty() {
                continue;
            }
            let raw = cdp_proto::convert::identifier(&opened);
            if let Ok(id) = self.identifier(&raw)
                && !found.iter().any(|(known, _)| known == &id)
            {
                found.push((id, q));
            }
        }
        let mut out = Vec::with_capacity(found.len());
        for (id, q) in found {
            let claim = stores
                .identity
                .claims(std::slice::from_ref(&id))
                .await?
                .pop()
                .flatten();
            let status = if self.rules().blocked(&id).is_some() {
                "blocked"
            } else if self.rules().released(&id) {
                "released"
            } else {
                "quarantined"
            };
            let mut merges = Vec::new();
            if let Some(c) = &claim {
                let holder = stores.identity.root(c.customer).await?;
                merges = self
                    .merges(holder)
                    .await?
                    .iter()
                    .filter(|m| m.cause.identifier == id)
                    .map(step)
                    .collect();
            }
            out.push(QuarantinedIdentifier {
                identifier: Some(convert::identifier(&id)),
                holder_customer_id: q.holder_customer_id,
                people: q.people,
                limit: q.limit,
                event_id: q.event_id,
                at: Some(convert::millis_to_timestamp(q.at_ms)),
                status: status.into(),
                sightings: claim.as_ref().map(sightings).unwrap_or_default(),
                merges,
            });
        }
        Ok(out)
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
