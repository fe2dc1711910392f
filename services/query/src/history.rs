//! Time travel: a customer's profile as it was at a past instant, folded
//! from the event log (the `resolved` topic) up to that instant.
//!
//! Only the partitions that hold the customer's family (the customer and
//! every customer merged into it; the contract keys `resolved` by customer,
//! `cdp_pipeline::key::customer`) are read, and only the records of the
//! projection generation being served (after a rebuild with other rules
//! the old generation's records name other customers and merges). An event
//! counts when it had reached the views by the instant: when the log
//! accepted its record ("what the agent could have seen"), or, for the
//! records a rebuild appended long after, when the event arrived
//! (`cdp_pipeline::emit::reached_views_at`).
//!
//! **Snapshots.** Each answer leaves a snapshot: the folded state, the
//! position reached in each partition, and the records already read whose
//! time was after the instant. A later question about the same customer at
//! the same or a later instant starts from the latest such snapshot and
//! reads only what follows, so asking "and a day later?" is not a full
//! scan. A snapshot serves only the family it was folded for (after a new
//! merge the family is read again). Reading a partition stops at a record
//! of the served generation appended by the live pipeline more than
//! [`CLOCK_SKEW_MS`] after the instant (several processes append with their
//! own clocks); the records read past the instant are kept with the
//! snapshot. The records of other generations on the way are read and
//! skipped, and a rebuilt generation's history is read whole (its records
//! are in the order the rebuild read the partitions, not by time).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use cdp_domain::profile::{FoldOptions, ProfileAccess, ProfileSlot, fold_resolved};
use cdp_domain::{CustomerId, Profile, ResolvedTouchpoint, TimelineEntry, UnixMillis};
use cdp_log::EventLog;
use cdp_pipeline::{emit, topic};
use cdp_runtime::ServiceError;

/// How far apart the clocks of two appending processes may be.
pub const CLOCK_SKEW_MS: i64 = 60_000;
/// Snapshots kept per customer family, and families kept.
const SNAPSHOTS_PER_FAMILY: usize = 8;
const FAMILIES: usize = 1024;
const CHUNK: usize = 512;

/// The fold of a family's records up to an instant.
#[derive(Clone)]
struct Snapshot {
    as_of: UnixMillis,
    /// The family it was folded for: records of members merged in later
    /// were skipped, so a bigger family cannot reuse it.
    family: BTreeSet<CustomerId>,
    /// Next offset to read, per partition.
    positions: BTreeMap<u32, u64>,
    /// Records already read but after `as_of`, in read order.
    later: Vec<(UnixMillis, ResolvedTouchpoint)>,
    slots: BTreeMap<CustomerId, ProfileSlot>,
    timeline: Vec<TimelineEntry>,
}

/// What a past view is made of.
pub struct PastView {
    pub profile: Profile,
    /// Newest first.
    pub timeline: Vec<TimelineEntry>,
    /// Records read from the log to answer (0 when a snapshot sufficed).
    pub records_read: usize,
}

pub struct History {
    log: Arc<dyn EventLog>,
    options: FoldOptions,
    keyring: Arc<cdp_store::Keyring>,
    /// (generation, family root) -> snapshots, oldest instant first.
    snapshots: Mutex<HashMap<(u32, CustomerId), Vec<Snapshot>>>,
}

impl History {
    /// The event log the past is read from.
    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    pub fn new(
        log: Arc<dyn EventLog>,
        options: FoldOptions,
        keyring: Arc<cdp_store::Keyring>,
    ) -> Self {
        History {
            log,
            options,
            keyring,
            snapshots: Mutex::new(HashMap::new()),
        }
    }

    /// Drops every snapshot (they hold opened personal data).
    pub fn forget(&self) {
        if let Ok(mut map) = self.snapshots.lock() {
            map.clear();
        }
    }

    fn cached(
        &self,
        root: (u32, CustomerId),
        family: &BTreeSet<CustomerId>,
        as_of: UnixMillis,
    ) -> Option<Snapshot> {
        let map = self.snapshots.lock().ok()?;
        map.get(&root)?
            .iter()
            .rev()
            .find(|s| s.as_of <= as_of && &s.family == family)
            .cloned()
    }

    fn keep(&self, root: (u32, CustomerId), snapshot: Snapshot) {
        let Ok(mut map) = self.snapshots.lock() else {
            return;
        };
        if map.len() >= FAMILIES && !map.contains_key(&root) {
            map.clear();
        }
        let list = map.entry(root).or_default();
        list.retain(|s| s.as_of != snapshot.as_of || s.family != snapshot.family);
        list.push(snapshot);
        list.sort_by_key(|s| s.as_of);
        if list.len() > SNAPSHOTS_PER_FAMILY {
            list.remove(0);
        }
    }

    /// The view of `customer` (a member of the family of `root`, whose
    /// members are `family`) at `as_of`, from the records of projection
    /// `generation`.
    pub async fn view(
        &self,
        generation: u32,
        root: CustomerId,
        family: &BTreeSet<CustomerId>,
        customer: CustomerId,
        as_of: UnixMillis,
    ) -> Result<PastView, ServiceError> {
        let root = (generation, root);
        let partitions = self.log.partitions(topic::RESOLVED);
        let wanted: BTreeSet<u32> = family
            .iter()
            .map(|c| emit::resolved_partition(*c, partitions))
            .collect();
        let mut snap = self
            .cached(root, family, as_of)
            .unwrap_or_else(|| Snapshot {
                as_of,
                family: family.clone(),
                positions: wanted.iter().map(|p| (*p, 0)).collect(),
                later: Vec::new(),
                slots: BTreeMap::new(),
                timeline: Vec::new(),
            });
        let concerns = |r: &ResolvedTouchpoint| {
            family.contains(&r.customer_id)
                || r.merges
                    .iter()
                    .any(|m| family.contains(&m.loser) || family.contains(&m.survivor))
        };
        let fold = |snap: &mut Snapshot, r: &ResolvedTouchpoint| -> Result<(), ServiceError> {
            let entry = fold_resolved(&mut snap.slots, r, &self.options)
                .map_err(|e| ServiceError::Internal(format!("folding the past: {e}")))?;
            snap.timeline.extend(entry.timeline);
            Ok(())
        };
        // Records read earlier that now fall within the instant.
        let later = std::mem::take(&mut snap.later);
        for (at, r) in later {
            if at <= as_of {
                fold(&mut snap, &r)?;
            } else {
                snap.later.push((at, r));
            }
        }
        snap.as_of = as_of;
        let ends = self
            .log
            .end_offsets(topic::RESOLVED)
            .await
            .map_err(ServiceError::from)?;
        let mut read = 0;
        for (p, position) in snap.positions.clone() {
            let end = ends.get(p as usize).copied().unwrap_or(0);
            let mut next = position;
            'partition: while next < end {
                let records = self
                    .log
                    .read(topic::RESOLVED, p, next, CHUNK)
                    .await
                    .map_err(ServiceError::from)?;
                if records.is_empty() {
                    break;
                }
                let keys = emit::keys_for(&self.keyring, &records)
                    .await
                    .map_err(ServiceError::from)?;
                for rec in records {
                    if emit::generation_of(&rec) != Some(generation) {
                        next = rec.offset + 1;
                        read += 1;
                        continue;
                    }
                    // An erased customer's events left no personal part
                    // to fold: they are skipped like the live fold skips them.
                    let Ok(r) = emit::read_resolved(&rec, &keys) else {
                        tracing::warn!(
                            partition = p,
                            offset = rec.offset,
                            "undecodable resolved record skipped"
                        );
                        next = rec.offset + 1;
                        read += 1;
                        continue;
                    };
                    // Appended by the live pipeline well after the instant:
                    // what follows was appended later still. (A rebuild's
                    // records come before its generation's live ones.)
                    if !emit::is_rebuilt(&rec) && rec.timestamp > as_of + CLOCK_SKEW_MS {
                        break 'partition;
                    }
                    next = rec.offset + 1;
                    read += 1;
                    if r.anonymous {
                        continue;
                    }
                    let r = r.value;
                    if !concerns(&r) {
                        continue;
                    }
                    let at = emit::reached_views_at(&rec, &r);
                    if at <= as_of {
                        fold(&mut snap, &r)?;
                    } else {
                        snap.later.push((at, r));
                    }
                }
            }
            snap.positions.insert(p, next);
        }
        let live = snap
            .slots
            .live_root(customer)
            .map_err(|e| ServiceError::Internal(format!("the past's merges: {e}")))?;
        let view = match snap.slots.get(&live) {
            Some(ProfileSlot::Live(p)) => Some((**p).clone()),
            _ => None,
        };
        let mut timeline: Vec<TimelineEntry> = match &view {
            Some(p) => snap
                .timeline
                .iter()
                .filter(|e| {
                    e.customer_id == p.customer_id || p.merged_from.contains(&e.customer_id)
                })
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        timeline.sort_by_key(|e| std::cmp::Reverse((e.occurred_at, e.event_id)));
        self.keep(root, snap);
        let profile = view.ok_or_else(|| {
            ServiceError::NotFound(format!(
                "customer {customer} had no profile at that instant"
            ))
        })?;
        Ok(PastView {
            profile,
            timeline,
            records_read: read,
        })
    }
}
