//! The store ports of the platform and their embedded implementation.
//!
//! - [`IdentityStore`]: the identity graph (claims of identifiers,
//!   customers, merges) and the decision taken for each event.
//! - [`ProfileStore`]: folded profiles and the timeline.
//!
//! The rules are in `cdp-domain`; a store only provides atomic access
//! (a redb transaction here, conditional writes on ScyllaDB) and reads and
//! writes rows. What is the same for every store — following merge
//! redirects, completing a merge left pending, paging a customer's family
//! timeline, turning search terms into live customers — is written once,
//! here, as the provided methods of the ports (see [`read`]), over a few
//! row primitives each adapter implements.

use async_trait::async_trait;
use cdp_domain::identity::{Claim, CustomerNode};
use cdp_domain::profile::{FoldOptions, Profile, ProfileSlot};
use cdp_domain::redirect::RedirectError;
use cdp_domain::{
    Channel, CustomerId, EventId, EventType, Identifier, IdentityRules, Resolution,
    ResolvedTouchpoint, TimelineEntry, Touchpoint, UnixMillis,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub mod audience_index;
#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;
pub mod embedded;
pub mod generations;
pub mod keys;
pub mod read;
pub mod sealed;
mod subject_filter;

pub use embedded::EmbeddedStore;
pub use generations::{
    EmbeddedGenerations, FIRST_GENERATION, GenerationInfo, Generations, LiveStores,
    ProjectionStores,
};
pub use keys::{EmbeddedKeyRows, KeyRow, KeyRows, Keyring};
pub use sealed::ViewSeal;

#[derive(Debug, Error)]
pub enum StoreError {
    /// The store cannot be reached now; retrying may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store: {0}")]
    Storage(String),
    /// A stored value cannot be read back.
    #[error("store: corrupt {what}: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error("store: invalid request: {0}")]
    Invalid(String),
}

impl From<RedirectError> for StoreError {
    fn from(e: RedirectError) -> Self {
        StoreError::Corrupt {
            what: "merge redirects",
            reason: e.to_string(),
        }
    }
}

/// The identity graph.
#[async_trait]
pub trait IdentityStore: Send + Sync + 'static {
    /// Resolves each event in order and stores the outcome atomically with
    /// the decision (`cdp_domain::identity::resolve_once`). Resolving an
    /// event again returns the stored decision, so a re-delivered event
    /// gets the same customer and the same merges.
    async fn resolve(
        &self,
        events: &[Touchpoint],
        rules: &IdentityRules,
    ) -> Result<Vec<Resolution>, StoreError>;

    /// A customer node as stored (a merged one has `merged_into` set).
    async fn customer(&self, customer: CustomerId) -> Result<Option<CustomerNode>, StoreError>;

    /// How each identifier was linked.
    async fn claims(&self, ids: &[Identifier]) -> Result<Vec<Option<Claim>>, StoreError>;

    /// The decision stored for `event` when it was resolved (none for an
    /// event not resolved yet, or that no identifier could attribute).
    async fn decision(&self, event: &Touchpoint) -> Result<Option<Resolution>, StoreError>;

    /// What an erasure removes from the graph: the nodes of `customers`,
    /// the claims of `identifiers` and the decisions of `events`. Durable
    /// when it returns; removing what is not there is not an error.
    async fn erase_graph(
        &self,
        customers: &[CustomerId],
        identifiers: &[Identifier],
        events: &[EventId],
    ) -> Result<(), StoreError>;

    /// Where `customer`'s node redirects (none when it is live or absent).
    /// A node redirects in clear, so an adapter reads this without keys.
    async fn link(&self, customer: CustomerId) -> Result<Option<CustomerId>, StoreError> {
        Ok(self.customer(customer).await?.and_then(|n| n.merged_into))
    }

    /// The customer that stands for `customer` now (merges followed).
    async fn root(&self, customer: CustomerId) -> Result<CustomerId, StoreError> {
        read::root(self, customer).await
    }

    /// [`root`](Self::root) of each customer, in order. An adapter that
    /// can read them together overrides it.
    async fn roots(&self, customers: &[CustomerId]) -> Result<Vec<CustomerId>, StoreError> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(customers.iter().copied())
            .map(|c| self.root(c))
            .buffered(32)
            .try_collect()
            .await
    }

    /// The customer that owns `id` now (merges followed).
    async fn owner(&self, id: &Identifier) -> Result<Option<CustomerId>, StoreError> {
        match self.claims(std::slice::from_ref(id)).await?.pop().flatten() {
            Some(claim) => self.root(claim.customer).await.map(Some),
            None => Ok(None),
        }
    }
}

/// A profile's consent statements, by `purpose` or `purpose:channel`.
pub type ConsentMap =
    std::collections::BTreeMap<String, cdp_domain::profile::Sourced<cdp_domain::consent::Grant>>;

/// A merge not completed yet, for stores that cannot write the loser and
/// the survivor in one transaction (ScyllaDB): the loser's row is already a
/// redirect and keeps the profile the survivor must absorb, until the
/// survivor has absorbed it (see [`read::settle_chain`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingMerge {
    /// The loser's live profile when it was merged away (`None`: it had none).
    pub absorbed: Option<Box<Profile>>,
}

/// A profile row as stored under a customer id.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileRow {
    pub slot: ProfileSlot,
    /// Set on the redirect of a merge that is not complete yet.
    pub pending: Option<PendingMerge>,
}

/// Filters and position of a timeline read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TimelineQuery {
    pub channels: Vec<Channel>,
    pub types: Vec<EventType>,
    /// Inclusive lower bound of `occurred_at`.
    pub from: Option<UnixMillis>,
    /// Exclusive upper bound of `occurred_at`.
    pub to: Option<UnixMillis>,
    /// Continue after this entry (the last one of the previous page).
    pub after: Option<(UnixMillis, EventId)>,
    pub limit: usize,
}

impl TimelineQuery {
    /// The instants to read: `occurred_at` in `[lower, upper)`, narrowed by
    /// the page position.
    pub fn range(&self) -> (UnixMillis, UnixMillis) {
        let upper = match (self.to, self.after) {
            (Some(to), Some((at, _))) => to.min(at.saturating_add(1)),
            (Some(to), None) => to,
            (None, Some((at, _))) => at.saturating_add(1),
            (None, None) => i64::MAX,
        };
        (self.from.unwrap_or(i64::MIN), upper)
    }

    pub fn matches(&self, e: &TimelineEntry) -> bool {
        (self.channels.is_empty() || self.channels.contains(&e.channel))
            && (self.types.is_empty() || self.types.contains(&e.event_type))
            && self.from.is_none_or(|f| e.occurred_at >= f)
            && self.to.is_none_or(|t| e.occurred_at < t)
            && self.after.is_none_or(|a| (e.occurred_at, e.event_id) < a)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TimelinePage {
    /// Newest first.
    pub entries: Vec<TimelineEntry>,
    /// Set when more entries match.
    pub next: Option<(UnixMillis, EventId)>,
}

/// What a fold changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// Events that were new (not re-deliveries).
    pub new_events: usize,
    /// The live customers whose view changed.
    pub customers: Vec<CustomerId>,
    /// Segment memberships entered and exited, by customer, in fold order
    /// (none without audience definitions in the fold options; none for
    /// an erased customer).
    pub changes: Vec<(CustomerId, cdp_domain::audience::Change)>,
    /// Of an audience refresh (timers, backfill): customers whose row
    /// could not be read, left out (logged) so the others go on.
    pub failed: usize,
}

/// How long an audience timer whose row could not be read waits before it
/// fires again, in ms (it moves out of the way of the others meanwhile).
pub const AUDIENCE_RETRY_MS: i64 = 60_000;

/// One page of an audience backfill ([`ProfileStore::backfill_audiences`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackfillPage {
    /// The membership changes made, and the customers whose view changed.
    pub applied: Applied,
    /// Profile rows read (live or not).
    pub scanned: usize,
    /// Where the next page starts (opaque to callers); `None` after the
    /// last row.
    pub next: Option<String>,
}

/// One page of a segment's members ([`ProfileStore::members`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MembersPage {
    /// Members, with when their membership began.
    pub members: Vec<(CustomerId, UnixMillis)>,
    /// Where the next page starts (opaque); `None` after the last.
    pub next: Option<String>,
}

/// Profiles and their timeline.
#[async_trait]
pub trait ProfileStore: Send + Sync + 'static {
    /// Folds resolved touchpoints in order (merges first, then the event),
    /// atomically and idempotently, and indexes them for search.
    async fn apply(
        &self,
        batch: &[ResolvedTouchpoint],
        options: &FoldOptions,
    ) -> Result<Applied, StoreError>;

    /// [`apply`](Self::apply), visible to readers at once but durable only
    /// after the next [`sync`](Self::sync): a worker that commits its log
    /// positions only after a sync loses nothing in a crash (the log
    /// delivers the unsynced events again, and folding is idempotent), and
    /// writes each hot page once per sync instead of once per batch. A
    /// store whose writes are always durable keeps this default.
    async fn apply_unsynced(
        &self,
        batch: &[ResolvedTouchpoint],
        options: &FoldOptions,
    ) -> Result<Applied, StoreError> {
        self.apply(batch, options).await
    }

    /// Makes every [`apply_unsynced`](Self::apply_unsynced) so far durable.
    async fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The audience timers due at or before `now`, earliest first, at most
    /// `limit`: `(due, customer)` of each live profile whose
    /// `Audience::due` has come (see [`expire_audiences`](Self::expire_audiences)).
    /// May hold entries that no longer stand for their row (a crash
    /// between writes, an erased row): expiring drops those.
    async fn due_audiences(
        &self,
        now: cdp_domain::UnixMillis,
        limit: usize,
    ) -> Result<Vec<(cdp_domain::UnixMillis, CustomerId)>, StoreError>;

    /// Runs the audience timers `due` (from
    /// [`due_audiences`](Self::due_audiences)): each customer's live row is
    /// re-evaluated at `options.audiences.now` (`profile::expire_audience`:
    /// expired window entries dropped, memberships brought in line), written
    /// when it changed with its timer moved; an entry that no longer
    /// stands for its row is dropped. Returns the membership changes and
    /// the customers whose view changed. Without definitions in `options`
    /// it does nothing. Visible at once; durable after the next
    /// [`sync`](Self::sync) where [`apply_unsynced`](Self::apply_unsynced)
    /// is, so a caller appends the changes before it syncs.
    async fn expire_audiences(
        &self,
        due: &[(cdp_domain::UnixMillis, CustomerId)],
        options: &FoldOptions,
    ) -> Result<Applied, StoreError>;

    /// One page of an audience backfill after definitions changed: at
    /// most `limit` profile rows from `from` (a previous page's `next`;
    /// `None`: the first row), in the store's own order. Each live
    /// profile's audience is brought up to the definitions of `options`
    /// (`profile::backfill_audience`, with the events of its timeline and
    /// of the customers it absorbed when a computed trait does not know
    /// them yet) and written when it changed, with its timer. Idempotent:
    /// a page done again changes nothing. Without definitions it reads
    /// the rows and changes nothing. Visible at once; durable after the
    /// next [`sync`](Self::sync) where [`apply_unsynced`](Self::apply_unsynced) is.
    async fn backfill_audiences(
        &self,
        from: Option<&str>,
        limit: usize,
        options: &FoldOptions,
    ) -> Result<BackfillPage, StoreError>;

    /// The customer ids of the profile rows (live or not), at most `limit`
    /// from `from` (a previous call's cursor; `None`: the first), in the
    /// store's own order, and the cursor of the next ones (`None` after
    /// the last row).
    async fn scan_customers(
        &self,
        from: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<CustomerId>, Option<String>), StoreError>;

    /// The members of `segment`, at most `limit` from `from` (a previous
    /// page's `next`; `None`: the first), in the store's own order, from
    /// an index written with the profile rows. Entries that no longer
    /// stand for a live member (an erased row) are left out. A page may
    /// hold fewer than `limit` and still have a `next`.
    async fn members(
        &self,
        segment: &str,
        from: Option<&str>,
        limit: usize,
    ) -> Result<MembersPage, StoreError>;

    /// The row stored under `customer`, as it is (no redirect followed).
    async fn row(&self, customer: CustomerId) -> Result<Option<ProfileRow>, StoreError>;

    /// Timeline entries filed under exactly `customer` that match `query`
    /// (its instants are [`TimelineQuery::range`]), newest first: at least
    /// `query.limit` of them when there are that many (an adapter may
    /// return more, for example every entry of the last instant it read).
    async fn timeline_range(
        &self,
        customer: CustomerId,
        query: &TimelineQuery,
    ) -> Result<Vec<TimelineEntry>, StoreError>;

    /// What an erasure removes from the views: the profile rows and the
    /// timelines of `customers`, and their search entries under `terms`.
    /// Durable when it returns.
    async fn erase_views(
        &self,
        customers: &[CustomerId],
        terms: &[String],
    ) -> Result<(), StoreError>;

    /// The customers filed under a search term that starts with `prefix`
    /// (see `cdp_domain::search`), in term order, at most `scan` of them;
    /// merged-away customers included.
    async fn search_range(&self, prefix: &str, scan: usize) -> Result<Vec<CustomerId>, StoreError>;

    /// The live profile standing for `customer` (merges followed, a merge
    /// left pending completed in memory).
    async fn profile(&self, customer: CustomerId) -> Result<Option<Profile>, StoreError> {
        read::live_profile(self, customer).await
    }

    /// The consent statements of the live profile standing for `customer`:
    /// what a consent decision needs. An adapter that can read less than
    /// the whole profile overrides it.
    async fn consent(&self, customer: CustomerId) -> Result<Option<ConsentMap>, StoreError> {
        Ok(self.profile(customer).await?.map(|p| p.consent))
    }

    /// [`consent`](Self::consent) of each customer, in order.
    async fn consents(
        &self,
        customers: &[CustomerId],
    ) -> Result<Vec<Option<ConsentMap>>, StoreError> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(customers.iter().copied())
            .map(|c| self.consent(c))
            .buffered(32)
            .try_collect()
            .await
    }

    /// Timeline entries of a customer and of every customer merged into
    /// it, newest first, one per event.
    async fn timeline(
        &self,
        customer: CustomerId,
        query: &TimelineQuery,
    ) -> Result<TimelinePage, StoreError> {
        read::timeline(self, customer, query).await
    }

    /// [`timeline`](Self::timeline) of the customer whose live profile the
    /// caller holds already (no second read of it).
    async fn timeline_of(
        &self,
        profile: &Profile,
        query: &TimelineQuery,
    ) -> Result<TimelinePage, StoreError> {
        read::family_timeline(self, read::family(profile), query).await
    }

    /// Live customers with a search term starting with one of `prefixes`
    /// (see `cdp_domain::search`), at most `limit`, each once.
    async fn search(
        &self,
        prefixes: &[String],
        limit: usize,
    ) -> Result<Vec<CustomerId>, StoreError> {
        read::search(self, prefixes, limit).await
    }
}

/// Announces which customers' views changed, so live views can refresh.
/// In one process the profile worker publishes and the query service
/// listens; a slow listener misses announcements (and refreshes anyway).
#[derive(Clone)]
pub struct ProfileChanges(tokio::sync::broadcast::Sender<CustomerId>);

impl ProfileChanges {
    pub fn new(capacity: usize) -> Self {
        ProfileChanges(tokio::sync::broadcast::channel(capacity.max(16)).0)
    }

    pub fn publish(&self, customers: &[CustomerId]) {
        for c in customers {
            // No listener is fine.
            let _ = self.0.send(*c);
        }
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<CustomerId> {
        self.0.subscribe()
    }
}

impl Default for ProfileChanges {
    fn default() -> Self {
        Self::new(1024)
    }
}
