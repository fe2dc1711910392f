//! [`ProfileStore`] on ScyllaDB: optimistic concurrency per profile row, and
//! merges committed in three phases (freeze the loser, absorb, settle) so a
//! merge is absorbed exactly once (see the crate docs).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use cdp_domain::profile::{
    FoldOptions, ProfileAccess, ProfileSlot, Refresh, fold_resolved, refresh_audience,
};
use cdp_domain::redirect::{MAX_REDIRECTS, Walk};
use cdp_domain::{CustomerId, EventId, ResolvedTouchpoint, TimelineEntry};
pub(crate) use cdp_store::PendingMerge;
use cdp_store::audience_index::{AudienceIndex, IndexMoves};
pub(crate) use cdp_store::read::settle_chain;
use cdp_store::sealed::{Read, RowKind, ToWrite, ViewKeys, is_sealed};
use cdp_store::{
    Applied, BackfillPage, MembersPage, ProfileRow, ProfileStore, StoreError, TimelineQuery,
};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt, stream};
use tracing::{debug, warn};

use crate::{Lwt, ScyllaStore, exec_error, jitter, next_row_error, pager_error, storage};

/// Reads issued at once.
const READ_CONCURRENCY: usize = 32;
/// Writes issued at once.
const WRITE_CONCURRENCY: usize = 64;
/// Folds of one batch before `apply` gives up on conflicting writers.
const MAX_ATTEMPTS: u32 = 100;
/// Rounds of fetching missing rows for one event.
const MAX_FETCH_ROUNDS: usize = 4 * MAX_REDIRECTS;

/// Partitions of the audience timers: a timer scan reads each one from
/// its start (the earliest due first).
pub(crate) const DUE_SHARDS: u128 = 16;

/// The partition of `customer`'s audience timer.
pub(crate) fn due_shard(customer: CustomerId) -> i32 {
    // Below 16: fits.
    (customer.0.as_u128() % DUE_SHARDS) as i32
}

/// A customer's refresh: the timer entry it came from, and what it did.
type Refreshed = (
    Option<i64>,
    CustomerId,
    Result<Vec<cdp_domain::audience::Change>, StoreError>,
);

/// Buckets of each segment's members (a segment's partition is
/// `(segment, bucket)`, so a large segment spreads over 16).
pub(crate) const MEMBER_BUCKETS: i32 = 16;

/// The bucket of `customer` in a segment's members.
pub(crate) fn member_bucket(customer: CustomerId) -> i32 {
    // Below 16: fits.
    (customer.0.as_u128() % MEMBER_BUCKETS as u128) as i32
}

/// What a profile row holds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub slot: ProfileSlot,
    pub pending: Option<PendingMerge>,
    /// In an overlay: the pending merge was made by this fold, whose
    /// survivor has absorbed it already (so it needs no completing).
    pub fresh: bool,
}

/// A profile row as read, with its version.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub version: i64,
    pub entry: Entry,
}

/// Profile rows read by one `apply` call (`None`: no row). Kept across the
/// attempts of the call and updated with what it commits.
type Rows = HashMap<CustomerId, Option<Stored>>;

/// The partition of a search term: the term's kind (`name:`, `email:`,
/// `tel:`) and its first characters (2, or 4 digits of a phone), or the
/// whole term when it is shorter. A prefix that is at least that long has
/// the bucket of every term it matches, so a prefix search is one range
/// read in one partition; a shorter prefix only finds the term equal to it.
pub(crate) fn search_bucket(term: &str) -> String {
    // A hashed entry is looked up whole: it is a partition of its own.
    if term.starts_with(cdp_store::sealed::HASHED_ENTRY) {
        return term.to_owned();
    }
    let (kind, rest) = match term.find(':') {
        Some(i) => term.split_at(i + 1),
        None => ("", term),
    };
    let width = if kind == "tel:" { 4 } else { 2 };
    let head: String = rest.chars().take(width).collect();
    format!("{kind}{head}")
}

/// The smallest string greater than every string starting with `prefix`
/// (UTF-8 order is code point order).
pub(crate) fn prefix_upper_bound(prefix: &str) -> String {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last {
            '\u{D7FF}' => Some('\u{E000}'),
            c => char::from_u32(u32::from(c) + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return chars.into_iter().collect();
        }
    }
    // Every character is the largest one: nothing is greater but this.
    format!("{prefix}{}", char::MAX)
}

enum Lookup<T> {
    Known(Option<T>),
    Missing,
}

/// The profiles as one event's fold sees them: its own writes, over the
/// writes of the batch so far, over the rows read. Missing rows read as
/// absent and are recorded; the attempt is then discarded and run again.
pub(crate) struct EventAccess<'a> {
    rows: &'a Rows,
    batch: &'a HashMap<CustomerId, Entry>,
    pub(crate) writes: HashMap<CustomerId, Entry>,
    pub(crate) missing: BTreeSet<CustomerId>,
    /// The search terms of each live profile as this event's fold first
    /// loaded it: the event indexes only terms new to its customer.
    pub(crate) terms_before: HashMap<CustomerId, BTreeSet<String>>,
}

impl<'a> EventAccess<'a> {
    pub(crate) fn new(rows: &'a Rows, batch: &'a HashMap<CustomerId, Entry>) -> Self {
        EventAccess {
            rows,
            batch,
            writes: HashMap::new(),
            missing: BTreeSet::new(),
            terms_before: HashMap::new(),
        }
    }

    fn get(&self, customer: CustomerId) -> Lookup<Entry> {
        if let Some(e) = self
            .writes
            .get(&customer)
            .or_else(|| self.batch.get(&customer))
        {
            return Lookup::Known(Some(e.clone()));
        }
        match self.rows.get(&customer) {
            Some(row) => Lookup::Known(row.as_ref().map(|s| s.entry.clone())),
            None => Lookup::Missing,
        }
    }

    /// Completes the pending merge of `customer` (and any on its way to the
    /// live root). False when a row was missing.
    fn settle(&mut self, customer: CustomerId, entry: &Entry) -> Result<bool, StoreError> {
        let mut chain: Vec<(CustomerId, Entry)> = vec![(customer, entry.clone())];
        let ProfileSlot::MergedInto(next) = entry.slot else {
            return Err(StoreError::Corrupt {
                what: "profile",
                reason: format!("live profile {customer} has a pending merge"),
            });
        };
        let mut walk = Walk::new(customer);
        walk.hop(next)?;
        let root = loop {
            match self.get(walk.at()) {
                Lookup::Missing => {
                    self.missing.insert(walk.at());
                    return Ok(false);
                }
                Lookup::Known(None) => break None,
                Lookup::Known(Some(e)) => match e.slot {
                    ProfileSlot::MergedInto(next) => {
                        chain.push((walk.at(), e));
                        walk.hop(next)?;
                    }
                    ProfileSlot::Live(p) => break Some(*p),
                },
            }
        };
        let current = walk.at();
        let pending: Vec<(CustomerId, Option<&PendingMerge>)> = chain
            .iter()
            .map(|(c, e)| (*c, e.pending.as_ref().filter(|_| !e.fresh)))
            .collect();
        let (root_profile, changed) = settle_chain(&pending, current, root);
        if changed && let Some(p) = root_profile {
            debug!(loser = %customer, survivor = %current, "completing a pending merge");
            self.writes.insert(
                current,
                Entry {
                    slot: ProfileSlot::Live(Box::new(p)),
                    pending: None,
                    fresh: false,
                },
            );
        }
        for (c, e) in chain {
            if e.pending.is_some() && !e.fresh {
                self.writes.insert(
                    c,
                    Entry {
                        slot: e.slot,
                        pending: None,
                        fresh: false,
                    },
                );
            }
        }
        Ok(true)
    }
}

impl ProfileAccess for EventAccess<'_> {
    type Error = StoreError;

    fn load(&mut self, customer: CustomerId) -> Result<Option<ProfileSlot>, StoreError> {
        let entry = match self.get(customer) {
            Lookup::Missing => {
                self.missing.insert(customer);
                return Ok(None);
            }
            Lookup::Known(None) => return Ok(None),
            Lookup::Known(Some(e)) => e,
        };
        if entry.pending.is_some() && !entry.fresh && !self.settle(customer, &entry)? {
            return Ok(None);
        }
        if let ProfileSlot::Live(p) = &entry.slot {
            self.terms_before
                .entry(customer)
                .or_insert_with(|| p.search_terms.clone());
        }
        Ok(Some(entry.slot))
    }

    fn save(&mut self, customer: CustomerId, slot: ProfileSlot) -> Result<(), StoreError> {
        let entry = match slot {
            ProfileSlot::Live(_) => Entry {
                slot,
                pending: None,
                fresh: false,
            },
            // The loser of a merge: keep what the survivor absorbs with the
            // redirect, until the survivor is stored.
            ProfileSlot::MergedInto(_) => {
                let (pending, fresh) = match self.get(customer) {
                    Lookup::Known(Some(Entry {
                        slot: ProfileSlot::Live(p),
                        ..
                    })) => (Some(PendingMerge { absorbed: Some(p) }), true),
                    Lookup::Known(Some(Entry { pending, fresh, .. })) => (pending, fresh),
                    Lookup::Known(None) => (Some(PendingMerge { absorbed: None }), true),
                    Lookup::Missing => {
                        self.missing.insert(customer);
                        (None, false)
                    }
                };
                Entry {
                    slot,
                    pending,
                    fresh,
                }
            }
        };
        self.writes.insert(customer, entry);
        Ok(())
    }
}

/// What one fold of the batch produced.
#[derive(Default)]
struct Folded {
    /// Rows to write.
    writes: HashMap<CustomerId, Entry>,
    /// Events new to this fold, with their timeline entry and search terms.
    new_events: Vec<(TimelineEntry, Vec<String>)>,
    /// The live survivors of the batch's merges.
    survivors: Vec<CustomerId>,
    /// Segment memberships entered and exited, by customer.
    changes: Vec<(CustomerId, cdp_domain::audience::Change)>,
}

/// The three commit phases, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Losers of merges made by this fold: redirect + what to absorb.
    Freeze,
    /// Live profiles.
    Live,
    /// Redirects whose pending merge is complete: drop what was kept.
    Settle,
}

fn contains_event(entry: &Entry, event: EventId) -> bool {
    let live = match &entry.slot {
        ProfileSlot::Live(p) => p.applied.contains(&event),
        ProfileSlot::MergedInto(_) => false,
    };
    live || entry
        .pending
        .as_ref()
        .and_then(|m| m.absorbed.as_ref())
        .is_some_and(|p| p.applied.contains(&event))
}

impl ScyllaStore {
    /// Refreshes one customer's audience (see
    /// [`ProfileStore::expire_audiences`] and
    /// [`ProfileStore::backfill_audiences`]): the changes it made. `at`:
    /// the timer entry it came from, dropped once it no longer stands for
    /// the row.
    async fn refresh_one(
        &self,
        at: Option<i64>,
        customer: CustomerId,
        why: Refresh,
        options: &FoldOptions,
    ) -> Result<Vec<cdp_domain::audience::Change>, StoreError> {
        let drop_entry = |at: i64| async move {
            // Best effort: an entry left behind fires once more.
            if let Err(error) = self
                .write(&self.st().due_delete, (due_shard(customer), at, customer.0))
                .await
            {
                warn!(%customer, %error, "an audience timer entry was not removed");
            }
        };
        for _ in 0..MAX_ATTEMPTS {
            let Some(stored) = self.fetch_profile(customer).await? else {
                if let Some(at) = at {
                    drop_entry(at).await;
                }
                return Ok(Vec::new());
            };
            let ProfileSlot::Live(profile) = &stored.entry.slot else {
                if let Some(at) = at {
                    drop_entry(at).await;
                }
                return Ok(Vec::new());
            };
            let mut profile = profile.as_ref().clone();
            // The family's timelines are read before the profile is
            // written back under its version: an event folded meanwhile
            // fails the write, and the refresh starts over.
            let mut events = None;
            if let Some(defs) = options.audiences.definitions.as_deref()
                && !profile.audience.unknown(defs).is_empty()
            {
                events = Some(self.family_events(&profile).await?);
            }
            let (changed, changes) = refresh_audience(&mut profile, options, why, |_| {
                Ok::<_, StoreError>(events.take().unwrap_or_default())
            })?;
            let due = profile.audience.due;
            if changed {
                let entry = Entry {
                    slot: ProfileSlot::Live(Box::new(profile)),
                    pending: stored.entry.pending.clone(),
                    fresh: false,
                };
                if self
                    .put_profile(customer, &entry, Some(&stored))
                    .await?
                    .is_none()
                {
                    // Written meanwhile: read again.
                    tokio::time::sleep(Duration::from_millis(1) + jitter(20)).await;
                    continue;
                }
            }
            if let Some(at) = at.filter(|at| due != Some(*at)) {
                // The row's own timer stays filed (written with the row when
                // it changed; filed again here when it did not).
                if let Some(when) = due.filter(|_| !changed) {
                    self.write(&self.st().due_put, (due_shard(customer), when, customer.0))
                        .await?;
                }
                drop_entry(at).await;
            }
            return Ok(changes);
        }
        Err(StoreError::Storage(format!(
            "the audience of {customer} kept conflicting with other writers"
        )))
    }

    /// The events of `profile`'s timeline and of the customers it absorbed.
    async fn family_events(
        &self,
        profile: &cdp_domain::Profile,
    ) -> Result<Vec<cdp_domain::Touchpoint>, StoreError> {
        let everything = TimelineQuery {
            limit: usize::MAX,
            ..TimelineQuery::default()
        };
        let mut events = Vec::new();
        let family =
            std::iter::once(profile.customer_id).chain(profile.merged_from.iter().copied());
        for member in family {
            let entries = self.timeline_range(member, &everything).await?;
            events.extend(entries.iter().map(TimelineEntry::touchpoint));
        }
        Ok(events)
    }

    /// Refreshes `customers` side by side; one that fails is logged and
    /// counted, the others go on.
    async fn refresh_many(
        &self,
        customers: Vec<(Option<i64>, CustomerId)>,
        why: Refresh,
        options: &FoldOptions,
    ) -> Applied {
        let done: Vec<Refreshed> = stream::iter(customers)
            .map(|(at, c)| async move { (at, c, self.refresh_one(at, c, why, options).await) })
            .buffered(WRITE_CONCURRENCY)
            .collect()
            .await;
        let mut applied = Applied::default();
        let mut failures: Vec<(i64, CustomerId)> = Vec::new();
        for (at, c, outcome) in done {
            if outcome.is_err()
                && let Some(at) = at
            {
                failures.push((at, c));
            }
            match outcome {
                Ok(changes) if changes.is_empty() => {}
                Ok(changes) => {
                    applied.customers.push(c);
                    applied
                        .changes
                        .extend(changes.into_iter().map(|ch| (c, ch)));
                }
                Err(error) => {
                    warn!(customer = %c, %error, "an audience not refreshed");
                    applied.failed += 1;
                }
            }
        }
        // A timer whose row could not be read waits a while, out of the
        // others' way (best effort: left as it is, it fires again at once).
        let retry = options
            .audiences
            .now
            .saturating_add(cdp_store::AUDIENCE_RETRY_MS);
        for (at, c) in &failures {
            let moved = async {
                self.write(&self.st().due_put, (due_shard(*c), retry, c.0))
                    .await?;
                self.write(&self.st().due_delete, (due_shard(*c), *at, c.0))
                    .await
            };
            if let Err(error) = moved.await {
                warn!(customer = %c, %error, "a failed audience timer not moved");
            }
        }
        applied.customers.sort();
        applied.customers.dedup();
        applied
    }

    pub(crate) async fn fetch_profile(
        &self,
        customer: CustomerId,
    ) -> Result<Option<Stored>, StoreError> {
        type Columns = (Option<i64>, Option<Vec<u8>>, Option<Vec<u8>>);
        let result = self
            .session()
            .execute_unpaged(&self.st().profile_get, (customer.0,))
            .await
            .map_err(exec_error)?
            .into_rows_result()
            .map_err(storage)?;
        let Some((version, slot, pending)): Option<Columns> =
            result.maybe_first_row().map_err(storage)?
        else {
            return Ok(None);
        };
        let (Some(version), Some(slot)) = (version, slot) else {
            return Err(StoreError::Corrupt {
                what: "profile",
                reason: format!("row of {customer} has no version or slot"),
            });
        };
        let keys = if is_sealed(&slot) || pending.as_deref().is_some_and(is_sealed) {
            self.seal.keys([customer]).await?
        } else {
            ViewKeys::clear()
        };
        let unfetched = || cdp_store::sealed::unfetched(customer);
        let slot = match keys.read_slot(customer, &slot)? {
            Read::Value(slot) => slot,
            // An erased customer's row reads as none (erasure removes it).
            Read::Erased => return Ok(None),
            Read::Missing => return Err(unfetched()),
        };
        let pending = match pending {
            None => None,
            Some(p) => {
                match keys.read_json(customer, RowKind::PendingMerge, "pending merge", &p)? {
                    Read::Value(p) => Some(p),
                    Read::Erased => return Ok(None),
                    Read::Missing => return Err(unfetched()),
                }
            }
        };
        Ok(Some(Stored {
            version,
            entry: Entry {
                slot,
                pending,
                fresh: false,
            },
        }))
    }

    /// Reads the rows of `customers` not read yet, and the rows their
    /// redirects point at.
    async fn fetch_profiles(
        &self,
        rows: &mut Rows,
        customers: impl IntoIterator<Item = CustomerId>,
    ) -> Result<(), StoreError> {
        let mut wanted: BTreeSet<CustomerId> = customers.into_iter().collect();
        // A redirect chain is at most `MAX_REDIRECTS` long: the walk fails
        // beyond it, so there is nothing more to prefetch.
        for _ in 0..=MAX_REDIRECTS {
            wanted.retain(|c| !rows.contains_key(c));
            if wanted.is_empty() {
                break;
            }
            let found: Vec<(CustomerId, Option<Stored>)> =
                stream::iter(std::mem::take(&mut wanted))
                    .map(|c| async move { Ok::<_, StoreError>((c, self.fetch_profile(c).await?)) })
                    .buffer_unordered(READ_CONCURRENCY)
                    .try_collect()
                    .await?;
            for (_, row) in &found {
                if let Some(Stored {
                    entry:
                        Entry {
                            slot: ProfileSlot::MergedInto(next),
                            ..
                        },
                    ..
                }) = row
                {
                    wanted.insert(*next);
                }
            }
            rows.extend(found);
        }
        Ok(())
    }

    /// Folds the batch in memory over `rows`, fetching what an event
    /// missed and folding it again.
    async fn fold_batch(
        &self,
        rows: &mut Rows,
        batch: &[ResolvedTouchpoint],
        options: &FoldOptions,
    ) -> Result<Folded, StoreError> {
        let mut folded = Folded::default();
        for resolved in batch {
            let mut rounds = 0;
            loop {
                rounds += 1;
                if rounds > MAX_FETCH_ROUNDS {
                    return Err(StoreError::Storage(format!(
                        "folding event {} kept missing rows",
                        resolved.touchpoint.event_id()
                    )));
                }
                let mut access = EventAccess::new(rows, &folded.writes);
                let entry = fold_resolved(&mut access, resolved, options);
                let survivors: Vec<Result<CustomerId, StoreError>> = resolved
                    .merges
                    .iter()
                    .map(|m| access.live_root(m.survivor))
                    .collect();
                let EventAccess {
                    writes,
                    missing,
                    terms_before,
                    ..
                } = access;
                if !missing.is_empty() {
                    self.fetch_profiles(rows, missing).await?;
                    continue;
                }
                let outcome = entry?;
                let survivors = survivors.into_iter().collect::<Result<Vec<_>, _>>()?;
                folded.writes.extend(writes);
                folded.changes.extend(outcome.changes);
                if let Some(entry) = outcome.timeline {
                    let known = terms_before.get(&entry.customer_id);
                    let mut terms = cdp_domain::search::terms(&resolved.touchpoint);
                    terms.retain(|t| !known.is_some_and(|k| k.contains(t)));
                    folded.new_events.push((entry, terms));
                }
                folded.survivors.extend(survivors);
                break;
            }
        }
        Ok(folded)
    }

    /// Writes the timeline entries and search terms of new events (plain,
    /// idempotent inserts).
    async fn index(
        &self,
        new_events: &[(TimelineEntry, Vec<String>)],
        done: &mut HashSet<(CustomerId, EventId)>,
    ) -> Result<(), StoreError> {
        let st = self.st();
        let keys = self
            .seal
            .obtain(new_events.iter().map(|(e, _)| e.customer_id))
            .await?;
        let mut writes: Vec<BoxFuture<'_, Result<(), StoreError>>> = Vec::new();
        for (entry, terms) in new_events {
            if !done.insert((entry.customer_id, entry.event_id)) {
                continue;
            }
            let customer = entry.customer_id.0;
            let kind = RowKind::Timeline(entry.event_id.0.as_u128());
            let bytes = match keys.write_json(entry.customer_id, kind, entry)? {
                ToWrite::Bytes(b) => b,
                // An erased customer's views are not made again.
                ToWrite::Erased => continue,
                ToWrite::Missing => return Err(cdp_store::sealed::unfetched(entry.customer_id)),
            };
            let values = (customer, entry.occurred_at, entry.event_id.0, bytes);
            writes.push(Box::pin(self.write(&st.timeline_put, values)));
            for term in terms {
                for e in cdp_store::sealed::index_entries(keys.hasher(), term) {
                    let values = (search_bucket(&e), e, customer);
                    writes.push(Box::pin(self.write(&st.search_put, values)));
                }
            }
        }
        stream::iter(writes)
            .buffer_unordered(WRITE_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Writes `entry` if the row is still as read (`stored`). The row as
    /// written, or `None` when it changed meanwhile (or the outcome is
    /// unknown: the caller reads it again either way).
    async fn put_profile(
        &self,
        customer: CustomerId,
        entry: &Entry,
        stored: Option<&Stored>,
    ) -> Result<Option<Stored>, StoreError> {
        let keys = self.seal.obtain([customer]).await?;
        if keys.erased(customer) {
            // An erased customer's views are not made again: nothing is
            // written, and the fold goes on as if it were.
            return Ok(Some(Stored {
                version: stored.map_or(0, |s| s.version),
                entry: entry.clone(),
            }));
        }
        let sealed = |w: ToWrite| match w {
            ToWrite::Bytes(b) => Ok(b),
            ToWrite::Erased | ToWrite::Missing => Err(cdp_store::sealed::unfetched(customer)),
        };
        let slot = sealed(keys.write_slot(customer, &entry.slot)?)?;
        let pending = match &entry.pending {
            Some(p) => Some(sealed(keys.write_json(
                customer,
                RowKind::PendingMerge,
                p,
            )?)?),
            None => None,
        };
        // The row's new index entries (its timer, the segments it
        // enters) are filed before the row, so a row never waits on a
        // missing entry; the old ones are removed once the row moved on
        // (a timer left by a failed write fires once, finds nothing due,
        // and is dropped; a member left so is skipped by `members`).
        let moves = IndexMoves::between(
            &AudienceIndex::of(stored.map(|s| &s.entry.slot)),
            &AudienceIndex::of(Some(&entry.slot)),
        );
        if let Some(at) = moves.due_added {
            self.write(&self.st().due_put, (due_shard(customer), at, customer.0))
                .await?;
        }
        for (segment, since) in &moves.members_added {
            let values = (
                segment.as_str(),
                member_bucket(customer),
                customer.0,
                *since,
            );
            self.write(&self.st().member_put, values).await?;
        }
        let (outcome, version) = match stored {
            None => (
                self.lwt(&self.st().profile_insert, (customer.0, slot, pending))
                    .await?,
                1,
            ),
            Some(s) => {
                let version = s.version + 1;
                let values = (version, slot, pending, customer.0, s.version);
                (self.lwt(&self.st().profile_update, values).await?, version)
            }
        };
        if matches!(outcome, Lwt::Applied) {
            // Best effort: the row is written, and an entry left behind is
            // harmless (a timer fires once and is dropped, a member is
            // checked against its row); failing here would make the caller
            // fold again and report the row's changes as already made.
            if let Some(at) = moves.due_removed
                && let Err(error) = self
                    .write(&self.st().due_delete, (due_shard(customer), at, customer.0))
                    .await
            {
                warn!(%customer, %error, "an old audience timer entry was not removed");
            }
            for segment in &moves.members_removed {
                let values = (segment.as_str(), member_bucket(customer), customer.0);
                if let Err(error) = self.write(&self.st().member_delete, values).await {
                    warn!(%customer, %segment, %error, "an old segment member entry was not removed");
                }
            }
        }
        match outcome {
            Lwt::Applied => Ok(Some(Stored {
                version,
                entry: Entry {
                    slot: entry.slot.clone(),
                    pending: entry.pending.clone(),
                    fresh: false,
                },
            })),
            Lwt::NotApplied => Ok(None),
            Lwt::Unknown(e) => {
                debug!(%customer, error = %e, "profile write with an unknown outcome; reading it again");
                Ok(None)
            }
        }
    }

    /// Writes one phase's rows concurrently. Returns the customers written
    /// and whether every write applied; a row that changed meanwhile is
    /// dropped from `rows` so the next attempt reads it again.
    async fn commit_phase(
        &self,
        rows: &mut Rows,
        phase: Vec<(CustomerId, Entry)>,
    ) -> Result<(Vec<CustomerId>, bool), StoreError> {
        let snapshot: &Rows = rows;
        let results: Vec<(CustomerId, Option<Stored>)> = stream::iter(phase)
            .map(|(c, entry)| async move {
                let stored = snapshot.get(&c).and_then(Option::as_ref);
                let written = self.put_profile(c, &entry, stored).await?;
                Ok::<_, StoreError>((c, written))
            })
            .buffer_unordered(WRITE_CONCURRENCY)
            .try_collect()
            .await?;
        let mut written = Vec::new();
        let mut complete = true;
        for (c, row) in results {
            match row {
                Some(row) => {
                    rows.insert(c, Some(row));
                    written.push(c);
                }
                None => {
                    rows.remove(&c);
                    complete = false;
                }
            }
        }
        Ok((written, complete))
    }

    /// Commits a fold: frozen losers, then live profiles, then settled
    /// redirects. Returns the customers written and whether all were.
    async fn commit(
        &self,
        rows: &mut Rows,
        writes: &HashMap<CustomerId, Entry>,
    ) -> Result<(Vec<CustomerId>, bool), StoreError> {
        let mut phases: BTreeMap<Phase, Vec<(CustomerId, Entry)>> = BTreeMap::new();
        for (c, entry) in writes {
            let stored_pending = rows
                .get(c)
                .and_then(Option::as_ref)
                .is_some_and(|s| s.entry.pending.is_some());
            let phase = match (&entry.slot, &entry.pending) {
                (ProfileSlot::MergedInto(_), Some(_)) => Phase::Freeze,
                (ProfileSlot::MergedInto(_), None) if stored_pending => Phase::Settle,
                _ => Phase::Live,
            };
            if phase == Phase::Freeze {
                // Once the survivor is stored, drop what the loser kept.
                let settled = Entry {
                    slot: entry.slot.clone(),
                    pending: None,
                    fresh: false,
                };
                phases.entry(Phase::Settle).or_default().push((*c, settled));
            }
            phases.entry(phase).or_default().push((*c, entry.clone()));
        }
        let mut written = Vec::new();
        for (phase, entries) in phases {
            let (done, complete) = self.commit_phase(rows, entries).await?;
            written.extend(done);
            // Settling only saves space: a row left pending is settled by
            // the next fold that reads it.
            if !complete && phase != Phase::Settle {
                return Ok((written, false));
            }
            #[cfg(test)]
            self.inner.faults.hit(match phase {
                Phase::Freeze => "profile.after_freeze",
                Phase::Live => "profile.after_live",
                Phase::Settle => "profile.after_settle",
            });
        }
        Ok((written, true))
    }

    /// See [`ProfileStore::timeline_range`].
    async fn timeline_of(
        &self,
        customer: CustomerId,
        query: &TimelineQuery,
        lower: i64,
        upper: i64,
        want: usize,
    ) -> Result<Vec<TimelineEntry>, StoreError> {
        // Pages about the size of what is wanted; more follow when filters
        // skip entries.
        let mut statement = self.st().timeline_range.clone();
        statement
            .set_page_size(i32::try_from(want.saturating_mul(2).clamp(16, 1000)).unwrap_or(1000));
        let pager = self
            .session()
            .execute_iter(statement, (customer.0, lower, upper))
            .await
            .map_err(pager_error)?;
        let mut rows = pager
            .rows_stream::<(i64, uuid::Uuid, Option<Vec<u8>>)>()
            .map_err(storage)?;
        let keys = self.seal.keys([customer]).await?;
        let mut found = Vec::new();
        // Once `want` match, finish the entries at the same instant (the
        // server orders event ids differently from us) and stop.
        let mut cut: Option<i64> = None;
        while let Some((at, event, bytes)) = rows.try_next().await.map_err(next_row_error)? {
            if cut.is_some_and(|c| at < c) {
                break;
            }
            let Some(bytes) = bytes else { continue };
            let kind = RowKind::Timeline(event.as_u128());
            let entry: TimelineEntry =
                match keys.read_json(customer, kind, "timeline entry", &bytes)? {
                    Read::Value(entry) => entry,
                    // An erased customer has no timeline.
                    Read::Erased | Read::Missing => return Ok(Vec::new()),
                };
            if query.matches(&entry) {
                found.push(entry);
                if found.len() >= want && cut.is_none() {
                    cut = Some(at);
                }
            }
        }
        Ok(found)
    }
}

#[async_trait]
impl ProfileStore for ScyllaStore {
    async fn apply(
        &self,
        batch: &[ResolvedTouchpoint],
        options: &FoldOptions,
    ) -> Result<Applied, StoreError> {
        if batch.is_empty() {
            return Ok(Applied::default());
        }
        let mut rows: Rows = HashMap::new();
        let mut indexed: HashSet<(CustomerId, EventId)> = HashSet::new();
        // Events this call folded in, with the customer of their entry.
        let mut committed: BTreeMap<EventId, CustomerId> = BTreeMap::new();
        // Membership changes of rows this call stored: a row written by an
        // attempt that then folds again keeps its events as applied, so
        // the next attempt does not report them a second time.
        let mut changes: Vec<(CustomerId, cdp_domain::audience::Change)> = Vec::new();
        let mut wanted: Vec<CustomerId> = Vec::new();
        for r in batch {
            wanted.push(r.customer_id);
            for m in &r.merges {
                wanted.extend([m.survivor, m.loser]);
            }
        }
        for attempt in 1..=MAX_ATTEMPTS {
            self.fetch_profiles(&mut rows, wanted.iter().copied())
                .await?;
            let folded = self.fold_batch(&mut rows, batch, options).await?;
            // Before the profiles: once they are stored, a re-delivery no
            // longer sees these events as new and would not index them.
            self.index(&folded.new_events, &mut indexed).await?;
            let (written, complete) = self.commit(&mut rows, &folded.writes).await?;
            if !folded.changes.is_empty() {
                // An erased customer's rows are not written: nor are its changes.
                let keys = self
                    .seal
                    .obtain(folded.changes.iter().map(|(c, _)| *c))
                    .await?;
                changes.extend(
                    folded
                        .changes
                        .into_iter()
                        .filter(|(c, _)| written.contains(c) && !keys.erased(*c)),
                );
            }
            for (entry, _) in &folded.new_events {
                let event = entry.event_id;
                let stored = written.iter().any(|c| {
                    folded
                        .writes
                        .get(c)
                        .is_some_and(|e| contains_event(e, event))
                });
                if stored {
                    committed.entry(event).or_insert(entry.customer_id);
                }
            }
            if complete {
                let mut customers: Vec<CustomerId> = committed.values().copied().collect();
                customers.extend(folded.survivors);
                customers.sort();
                customers.dedup();
                debug!(
                    events = batch.len(),
                    new = committed.len(),
                    attempt,
                    "folded a batch"
                );
                return Ok(Applied {
                    new_events: committed.len(),
                    customers,
                    changes,
                    failed: 0,
                });
            }
            debug!(
                attempt,
                "profile rows changed under the fold; folding again"
            );
            let cap = 1u64 << attempt.min(6);
            tokio::time::sleep(Duration::from_millis(1) + jitter(cap)).await;
        }
        warn!(
            events = batch.len(),
            "profile rows kept changing under the fold; giving up"
        );
        Err(StoreError::Unavailable(format!(
            "profile rows kept changing; gave up after {MAX_ATTEMPTS} attempts"
        )))
    }

    /// The profile row with a conditional delete (its writes are
    /// conditional), the timeline as one partition, each search entry.
    async fn due_audiences(
        &self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<(i64, CustomerId)>, StoreError> {
        let per_shard = i32::try_from(limit).unwrap_or(i32::MAX);
        let shards: Vec<Vec<(i64, CustomerId)>> = stream::iter(0..DUE_SHARDS as i32)
            .map(|shard| async move {
                let rows = self
                    .session()
                    .execute_unpaged(&self.st().due_range, (shard, now, per_shard))
                    .await
                    .map_err(exec_error)?
                    .into_rows_result()
                    .map_err(storage)?;
                rows.rows::<(i64, uuid::Uuid)>()
                    .map_err(storage)?
                    .map(|r| r.map(|(at, c)| (at, CustomerId(c))).map_err(storage))
                    .collect::<Result<Vec<_>, StoreError>>()
            })
            .buffer_unordered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        let mut due: Vec<(i64, CustomerId)> = shards.into_iter().flatten().collect();
        due.sort_unstable();
        due.truncate(limit);
        Ok(due)
    }

    async fn expire_audiences(
        &self,
        due: &[(i64, CustomerId)],
        options: &FoldOptions,
    ) -> Result<Applied, StoreError> {
        if options.audiences.definitions.is_none() {
            return Ok(Applied::default());
        }
        let due = due.iter().map(|(at, c)| (Some(*at), *c)).collect();
        Ok(self.refresh_many(due, Refresh::Timer, options).await)
    }

    async fn scan_customers(
        &self,
        from: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<CustomerId>, Option<String>), StoreError> {
        let after = match from {
            None => i64::MIN,
            Some(cursor) => cursor
                .parse::<i64>()
                .map_err(|e| StoreError::Invalid(format!("profile cursor {cursor:?}: {e}")))?,
        };
        let rows = self
            .session()
            .execute_unpaged(
                &self.st().profile_scan,
                (after, i32::try_from(limit).unwrap_or(i32::MAX)),
            )
            .await
            .map_err(exec_error)?
            .into_rows_result()
            .map_err(storage)?;
        let rows: Vec<(i64, uuid::Uuid)> = rows
            .rows::<(i64, uuid::Uuid)>()
            .map_err(storage)?
            .collect::<Result<_, _>>()
            .map_err(storage)?;
        let next = (rows.len() >= limit.max(1))
            .then(|| rows.last().map(|(token, _)| token.to_string()))
            .flatten();
        Ok((rows.into_iter().map(|(_, c)| CustomerId(c)).collect(), next))
    }

    async fn backfill_audiences(
        &self,
        from: Option<&str>,
        limit: usize,
        options: &FoldOptions,
    ) -> Result<BackfillPage, StoreError> {
        let (customers, next) = self.scan_customers(from, limit).await?;
        let scanned = customers.len();
        let applied = if options.audiences.definitions.is_none() {
            Applied::default()
        } else {
            let customers = customers.into_iter().map(|c| (None, c)).collect();
            self.refresh_many(customers, Refresh::Backfill, options)
                .await
        };
        Ok(BackfillPage {
            applied,
            scanned,
            next,
        })
    }

    async fn members(
        &self,
        segment: &str,
        from: Option<&str>,
        limit: usize,
    ) -> Result<MembersPage, StoreError> {
        // The cursor: `<bucket>/<last customer read in it>` (none read yet:
        // `<bucket>/`).
        let (mut bucket, mut after) = match from {
            None => (0, None),
            Some(cursor) => {
                let bad =
                    |why: String| StoreError::Invalid(format!("members cursor {cursor:?}: {why}"));
                let (b, c) = cursor
                    .split_once('/')
                    .ok_or_else(|| bad("no bucket".into()))?;
                let b: i32 = b.parse().map_err(|e| bad(format!("{e}")))?;
                let c = match c {
                    "" => None,
                    c => Some(c.parse::<uuid::Uuid>().map_err(|e| bad(format!("{e}")))?),
                };
                (b, c)
            }
        };
        let mut page = MembersPage::default();
        while bucket < MEMBER_BUCKETS && page.members.len() < limit.max(1) {
            let want = i32::try_from(limit.max(1) - page.members.len()).unwrap_or(i32::MAX);
            // The nil id (version 0) sorts before every customer id.
            let rows = self
                .session()
                .execute_unpaged(
                    &self.st().member_range,
                    (segment, bucket, after.unwrap_or(uuid::Uuid::nil()), want),
                )
                .await
                .map_err(exec_error)?
                .into_rows_result()
                .map_err(storage)?;
            let rows: Vec<(uuid::Uuid, i64)> = rows
                .rows::<(uuid::Uuid, i64)>()
                .map_err(storage)?
                .collect::<Result<_, _>>()
                .map_err(storage)?;
            if let Some((last, _)) = rows.last() {
                after = Some(*last);
            }
            let exhausted = rows.len() < usize::try_from(want).unwrap_or(usize::MAX);
            // Each entry checked against its row: an entry left by a write
            // that did not apply, or by an erased row, is skipped.
            let checked: Vec<Option<(CustomerId, i64)>> = stream::iter(rows)
                .map(|(c, since)| async move {
                    let customer = CustomerId(c);
                    let live = self.fetch_profile(customer).await?;
                    let member = live.is_some_and(|s| match &s.entry.slot {
                        ProfileSlot::Live(p) => p.audience.members.contains_key(segment),
                        ProfileSlot::MergedInto(_) => false,
                    });
                    Ok::<_, StoreError>(member.then_some((customer, since)))
                })
                .buffered(READ_CONCURRENCY)
                .try_collect()
                .await?;
            page.members.extend(checked.into_iter().flatten());
            if exhausted {
                bucket += 1;
                after = None;
            } else {
                // One query per call and bucket: a page may end short.
                break;
            }
        }
        if bucket < MEMBER_BUCKETS {
            page.next = Some(format!(
                "{bucket}/{}",
                after.map(|c| c.to_string()).unwrap_or_default()
            ));
        }
        Ok(page)
    }

    async fn erase_views(
        &self,
        customers: &[CustomerId],
        terms: &[String],
    ) -> Result<(), StoreError> {
        let ks = self.keyspace();
        let session = self.session();
        let profile = crate::prepare(
            session,
            format!("DELETE FROM {ks}.profiles WHERE customer = ? IF EXISTS"),
            crate::Kind::Lwt,
        )
        .await?;
        let timeline = crate::prepare(
            session,
            format!("DELETE FROM {ks}.timeline WHERE customer = ?"),
            crate::Kind::Write,
        )
        .await?;
        let search = crate::prepare(
            session,
            format!("DELETE FROM {ks}.search WHERE bucket = ? AND term = ? AND customer = ?"),
            crate::Kind::Write,
        )
        .await?;
        let present = crate::prepare(
            session,
            format!(
                "SELECT customer FROM {ks}.search WHERE bucket = ? AND term = ? AND customer = ?"
            ),
            crate::Kind::Read,
        )
        .await?;
        let erased = cdp_store::sealed::erased_entries(self.seal.hasher(), terms);
        for c in customers {
            match self.lwt(&profile, (c.0,)).await? {
                crate::Lwt::Applied | crate::Lwt::NotApplied => {}
                crate::Lwt::Unknown(e) => return Err(e),
            }
            self.write(&timeline, (c.0,)).await?;
            let mut entries: Vec<(String, String, uuid::Uuid)> = Vec::with_capacity(erased.len());
            for t in &erased {
                let row = (search_bucket(t), t.clone(), c.0);
                // A term in clear (indexed before sealing) is deleted only
                // where it is: the tombstone names what it deletes, and
                // would otherwise write a term never stored in clear.
                let in_clear =
                    self.seal.hasher().is_some() && !t.starts_with(cdp_store::sealed::HASHED_ENTRY);
                let stored = !in_clear
                    || self
                        .session()
                        .execute_unpaged(&present, row.clone())
                        .await
                        .map_err(crate::exec_error)?
                        .into_rows_result()
                        .map_err(crate::storage)?
                        .rows_num()
                        > 0;
                if stored {
                    entries.push(row);
                }
            }
            for chunk in entries.chunks(16) {
                futures::future::try_join_all(
                    chunk.iter().cloned().map(|row| self.write(&search, row)),
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn row(&self, customer: CustomerId) -> Result<Option<ProfileRow>, StoreError> {
        Ok(self
            .fetch_profile(customer)
            .await?
            .map(|stored| ProfileRow {
                slot: stored.entry.slot,
                pending: stored.entry.pending,
            }))
    }

    async fn timeline_range(
        &self,
        customer: CustomerId,
        query: &TimelineQuery,
    ) -> Result<Vec<TimelineEntry>, StoreError> {
        let (lower, upper) = query.range();
        self.timeline_of(customer, query, lower, upper, query.limit)
            .await
    }

    async fn search_range(&self, prefix: &str, scan: usize) -> Result<Vec<CustomerId>, StoreError> {
        let mut found = Vec::new();
        for prefix in self.seal.query_entries(prefix) {
            let values = (
                search_bucket(&prefix),
                prefix.as_str(),
                prefix_upper_bound(&prefix),
                i32::try_from(scan).unwrap_or(i32::MAX),
            );
            let result = self
                .session()
                .execute_unpaged(&self.st().search_range, values)
                .await
                .map_err(exec_error)?
                .into_rows_result()
                .map_err(storage)?;
            for row in result.rows::<(String, uuid::Uuid)>().map_err(storage)? {
                let (term, customer) = row.map_err(storage)?;
                if !term.starts_with(prefix.as_str()) {
                    break;
                }
                let customer = CustomerId(customer);
                if !found.contains(&customer) {
                    found.push(customer);
                }
            }
        }
        Ok(found)
    }
}
