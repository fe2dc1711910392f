//! What switching to a shadow generation would change: the `resolved`
//! records of two generations compared event by event, after following the
//! merges each generation recorded, into splits, joins and moved events.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use cdp_domain::{CustomerId, EventId};
use cdp_log::EventLog;
use cdp_pipeline::{emit, topic};
use cdp_proto::v1::{CustomerChange, GenerationComparison};
use cdp_runtime::ServiceError;

/// One generation's attribution: each event's customer, and the merges.
#[derive(Debug, Default)]
pub struct Attribution {
    events: HashMap<EventId, CustomerId>,
    merged_into: HashMap<CustomerId, CustomerId>,
}

impl Attribution {
    pub fn event(&mut self, event: EventId, customer: CustomerId) {
        self.events.insert(event, customer);
    }

    pub fn merge(&mut self, loser: CustomerId, survivor: CustomerId) {
        self.merged_into.insert(loser, survivor);
    }

    /// The customer `c` stands for now (merges followed; a cycle, which a
    /// sound log never holds, stops the walk).
    fn root(&self, c: CustomerId) -> CustomerId {
        let mut at = c;
        let mut seen = BTreeSet::new();
        while let Some(next) = self.merged_into.get(&at) {
            if !seen.insert(at) {
                break;
            }
            at = *next;
        }
        at
    }
}

/// Compares two attributions of the same events (pure).
pub fn compare(
    baseline: &Attribution,
    candidate: &Attribution,
    examples: usize,
) -> GenerationComparison {
    // (baseline customer, candidate customer) -> events.
    let mut cells: BTreeMap<(CustomerId, CustomerId), u64> = BTreeMap::new();
    let mut compared = 0;
    for (event, b) in &baseline.events {
        if let Some(c) = candidate.events.get(event) {
            compared += 1;
            *cells
                .entry((baseline.root(*b), candidate.root(*c)))
                .or_default() += 1;
        }
    }
    let mut by_baseline: BTreeMap<CustomerId, Vec<(CustomerId, u64)>> = BTreeMap::new();
    let mut by_candidate: BTreeMap<CustomerId, Vec<(CustomerId, u64)>> = BTreeMap::new();
    for ((b, c), n) in &cells {
        by_baseline.entry(*b).or_default().push((*c, *n));
        by_candidate.entry(*c).or_default().push((*b, *n));
    }
    let moved: u64 = by_baseline
        .values()
        .map(|cs| {
            let all: u64 = cs.iter().map(|(_, n)| n).sum();
            all - cs.iter().map(|(_, n)| *n).max().unwrap_or(0)
        })
        .sum();
    let change = |one: &CustomerId, many: &[(CustomerId, u64)], one_is_baseline: bool| {
        let others: Vec<String> = many.iter().map(|(c, _)| c.to_string()).collect();
        let events = many.iter().map(|(_, n)| n).sum();
        if one_is_baseline {
            CustomerChange {
                baseline_customer_ids: vec![one.to_string()],
                candidate_customer_ids: others,
                events,
            }
        } else {
            CustomerChange {
                baseline_customer_ids: others,
                candidate_customer_ids: vec![one.to_string()],
                events,
            }
        }
    };
    let splits: Vec<_> = by_baseline.iter().filter(|(_, cs)| cs.len() > 1).collect();
    let joins: Vec<_> = by_candidate.iter().filter(|(_, bs)| bs.len() > 1).collect();
    GenerationComparison {
        events_compared: compared,
        events_moved: moved,
        baseline_customers: by_baseline.len() as u64,
        candidate_customers: by_candidate.len() as u64,
        splits: splits.len() as u64,
        joins: joins.len() as u64,
        split_examples: splits
            .iter()
            .take(examples)
            .map(|(b, cs)| change(b, cs, true))
            .collect(),
        join_examples: joins
            .iter()
            .take(examples)
            .map(|(c, bs)| change(c, bs, false))
            .collect(),
        ..GenerationComparison::default()
    }
}

/// Reads the attribution of two generations from the `resolved` topic.
pub async fn read(
    log: &dyn EventLog,
    baseline: u32,
    candidate: u32,
) -> Result<(Attribution, Attribution), ServiceError> {
    let mut a = Attribution::default();
    let mut b = Attribution::default();
    cdp_log::scan(log, topic::RESOLVED, 1000, |r| {
        let target = match emit::generation_of(r) {
            Some(g) if g == baseline => &mut a,
            Some(g) if g == candidate => &mut b,
            _ => return Ok::<_, ServiceError>(()),
        };
        // Attribution needs no personal data: read without keys.
        let resolved = emit::read_resolved(r, &cdp_seal::KeySet::new())
            .map(|o| o.value)
            .map_err(|e| {
                ServiceError::Internal(format!(
                    "resolved record {}/{} cannot be decoded: {e}",
                    r.partition, r.offset
                ))
            })?;
        for m in &resolved.merges {
            target.merge(m.loser, m.survivor);
        }
        target.event(resolved.touchpoint.event_id(), resolved.customer_id);
        Ok(())
    })
    .await?;
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn c(n: u128) -> CustomerId {
        CustomerId(Uuid::from_u128(n))
    }

    fn e(n: u128) -> EventId {
        EventId(Uuid::from_u128(n))
    }

    #[test]
    fn splits_joins_and_moved_events_are_counted_after_merges() {
        let mut base = Attribution::default();
        // Baseline: events 1-4 one customer (2 merged into 1), 5-6 another.
        for (ev, cu) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3)] {
            base.event(e(ev), c(cu));
        }
        base.merge(c(2), c(1));
        let mut cand = Attribution::default();
        // Candidate: 1-2 stay, 3-4 split off, 5-6 join 10, with 7 (not in baseline).
        for (ev, cu) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 10), (6, 10), (7, 10)] {
            cand.event(e(ev), c(cu));
        }
        let r = compare(&base, &cand, 10);
        assert_eq!(r.events_compared, 6);
        assert_eq!((r.splits, r.joins), (1, 0));
        assert_eq!(r.events_moved, 2);
        assert_eq!(
            r.split_examples[0].baseline_customer_ids,
            vec![c(1).to_string()]
        );
        assert_eq!(r.split_examples[0].candidate_customer_ids.len(), 2);
        // The other way round, the split is a join.
        let back = compare(&cand, &base, 10);
        assert_eq!((back.splits, back.joins), (0, 1));
        // Identical attributions: nothing changes.
        let same = compare(&base, &base, 10);
        assert_eq!((same.splits, same.joins, same.events_moved), (0, 0, 0));
    }
}
