//! What every store reads the same way, over the row primitives of the
//! ports: the provided methods of [`IdentityStore`] and [`ProfileStore`]
//! call these, so the embedded and ScyllaDB adapters cannot drift apart.

use std::collections::BTreeSet;

use cdp_domain::profile::{Profile, ProfileSlot};
use cdp_domain::redirect::Walk;
use cdp_domain::{CustomerId, TimelineEntry};
use futures::{StreamExt, TryStreamExt, stream};

use crate::{
    IdentityStore, PendingMerge, ProfileRow, ProfileStore, StoreError, TimelinePage, TimelineQuery,
};

/// Family members (or search candidates) read at once.
const CONCURRENCY: usize = 8;
/// Search terms read per wanted customer: most terms of a prefix belong to
/// customers already found, or merged away.
const SCAN_PER_RESULT: usize = 20;

/// The customer that stands for `customer` in the identity graph now.
pub async fn root<S: IdentityStore + ?Sized>(
    store: &S,
    customer: CustomerId,
) -> Result<CustomerId, StoreError> {
    let mut walk = Walk::new(customer);
    while let Some(next) = store.link(walk.at()).await? {
        walk.hop(next)?;
    }
    Ok(walk.at())
}

/// Completes the pending merges along a redirect chain. `chain` lists the
/// redirects from the first row towards the root, each with its pending
/// merge if any; `root` is the live profile at the end of the chain. The
/// merges are completed nearest to the root first, because the profile a
/// nearer loser keeps may already contain a farther one (then the root
/// lists that one in `merged_from` once the nearer one is absorbed). A
/// merge whose loser the root already lists was completed before and is
/// skipped: that is what makes completing a merge idempotent.
///
/// Returns the root's profile and whether it changed.
pub fn settle_chain(
    chain: &[(CustomerId, Option<&PendingMerge>)],
    root_id: CustomerId,
    root: Option<Profile>,
) -> (Option<Profile>, bool) {
    let mut root = root;
    let mut changed = false;
    for (loser, pending) in chain.iter().rev() {
        let Some(pending) = pending else {
            continue;
        };
        if root.as_ref().is_some_and(|r| r.merged_from.contains(loser)) {
            continue;
        }
        let target = root.get_or_insert_with(|| Profile::new(root_id));
        match &pending.absorbed {
            Some(profile) => target.absorb((**profile).clone()),
            None => {
                target.merged_from.insert(*loser);
            }
        }
        changed = true;
    }
    (root, changed)
}

/// The live profile standing for `customer`: redirects followed, and a
/// merge left pending on the way completed in memory.
pub async fn live_profile<S: ProfileStore + ?Sized>(
    store: &S,
    customer: CustomerId,
) -> Result<Option<Profile>, StoreError> {
    let mut walk = Walk::new(customer);
    let mut chain: Vec<(CustomerId, Option<PendingMerge>)> = Vec::new();
    let root = loop {
        match store.row(walk.at()).await? {
            None => break None,
            Some(ProfileRow {
                slot: ProfileSlot::MergedInto(next),
                pending,
            }) => {
                chain.push((walk.at(), pending));
                walk.hop(next)?;
            }
            Some(ProfileRow {
                slot: ProfileSlot::Live(p),
                ..
            }) => break Some(*p),
        }
    };
    let pending: Vec<(CustomerId, Option<&PendingMerge>)> =
        chain.iter().map(|(c, p)| (*c, p.as_ref())).collect();
    Ok(settle_chain(&pending, walk.at(), root).0)
}

/// One page of the timeline of `customer`'s family (the live customer and
/// every customer merged into it): each member's newest matching entries,
/// merged newest first, one entry per event (a fold retried across a merge
/// may have filed an event under two customers), and the position of the
/// next page when more match.
pub async fn timeline<S: ProfileStore + ?Sized>(
    store: &S,
    customer: CustomerId,
    query: &TimelineQuery,
) -> Result<TimelinePage, StoreError> {
    let family = match store.profile(customer).await? {
        Some(p) => family(&p),
        None => vec![customer],
    };
    family_timeline(store, family, query).await
}

/// The customers whose timelines make a live profile's: its own, and every
/// customer merged into it.
pub fn family(profile: &Profile) -> Vec<CustomerId> {
    std::iter::once(profile.customer_id)
        .chain(profile.merged_from.iter().copied())
        .collect()
}

/// One page of the timeline of `family` (see [`timeline`]).
pub async fn family_timeline<S: ProfileStore + ?Sized>(
    store: &S,
    family: Vec<CustomerId>,
    query: &TimelineQuery,
) -> Result<TimelinePage, StoreError> {
    let limit = query.limit.max(1);
    let (lower, upper) = query.range();
    // One more than a page tells whether another page follows.
    let wanted = TimelineQuery {
        limit: limit + 1,
        ..query.clone()
    };
    let mut found: Vec<TimelineEntry> = if lower < upper {
        stream::iter(family)
            .map(|member| store.timeline_range(member, &wanted))
            .buffer_unordered(CONCURRENCY)
            .try_concat()
            .await?
    } else {
        Vec::new()
    };
    found.retain(|e| query.matches(e));
    found.sort_by_key(|e| std::cmp::Reverse((e.occurred_at, e.event_id)));
    let mut seen = BTreeSet::new();
    found.retain(|e| seen.insert(e.event_id));
    let next = if found.len() > limit {
        found.truncate(limit);
        found.last().map(|e| (e.occurred_at, e.event_id))
    } else {
        None
    };
    Ok(TimelinePage {
        entries: found,
        next,
    })
}

/// Live customers under a search term starting with one of `prefixes`, in
/// the order found, each once, at most `limit`.
pub async fn search<S: ProfileStore + ?Sized>(
    store: &S,
    prefixes: &[String],
    limit: usize,
) -> Result<Vec<CustomerId>, StoreError> {
    let mut found: Vec<CustomerId> = Vec::new();
    if limit == 0 {
        return Ok(found);
    }
    for prefix in prefixes {
        let candidates = store
            .search_range(prefix, limit.saturating_mul(SCAN_PER_RESULT))
            .await?;
        let mut live = stream::iter(candidates)
            .map(|c| store.profile(c))
            .buffered(CONCURRENCY);
        while let Some(profile) = live.try_next().await? {
            // A hashed index finds candidates by a shorter prefix: the
            // profile's own terms say whether it matches.
            if let Some(p) = profile
                && !found.contains(&p.customer_id)
                && p.matches_search(prefix)
            {
                found.push(p.customer_id);
                if found.len() >= limit {
                    return Ok(found);
                }
            }
        }
    }
    Ok(found)
}
