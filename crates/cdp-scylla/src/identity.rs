//! [`IdentityStore`] on ScyllaDB: one lease, fenced writes and an intent
//! rolled forward (see the crate docs for why each is needed).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cdp_domain::identity::{self, Claim, CustomerNode, DecisionLog, GraphRead, GraphWrite};
use cdp_domain::redirect::MAX_REDIRECTS;
use cdp_domain::{CustomerId, EventId, Identifier, IdentityRules, Resolution, Touchpoint};
use cdp_seal::Hasher;
use cdp_store::sealed::{claim_key, decision_owner, graph_owners, is_hashed_claim_key, node_link};
use cdp_store::{IdentityStore, StoreError};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt, stream};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::{Fence, Lwt, ScyllaStore, exec_error, from_json, jitter, now_ms, storage, to_json};

/// Reads issued at once.
const READ_CONCURRENCY: usize = 32;
/// Writes issued at once when applying an intent.
const WRITE_CONCURRENCY: usize = 64;
/// How many times a call may lose the lease before it gives up.
const MAX_LEASE_LOSSES: u32 = 5;
/// Rounds of fetching missing rows for one event before giving up (a
/// redirect chain is at most `MAX_REDIRECTS` long, so this is never
/// reached normally).
const MAX_FETCH_ROUNDS: usize = 4 * MAX_REDIRECTS;

/// What one `resolve` call writes, as stored: stored in the lease row as
/// `pending` before any of it is applied, so whoever holds the lease next
/// can finish applying it if this holder dies half-way. Its rows are sealed
/// already (`cdp_store::sealed`): the lease row holds no personal data.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Intent {
    /// Claim key (see `cdp_store::sealed::claim_key`) and claim.
    pub claims: Vec<(String, Claim)>,
    /// Customer id and node, sealed.
    #[serde(with = "sealed_rows")]
    pub nodes: Vec<(Uuid, Vec<u8>)>,
    /// Event id and decision, sealed.
    #[serde(with = "sealed_rows")]
    pub resolutions: Vec<(Uuid, Vec<u8>)>,
}

/// Sealed rows in an intent's JSON: ids and base64.
mod sealed_rows {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};
    use uuid::Uuid;

    pub fn serialize<S: Serializer>(rows: &[(Uuid, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(rows.iter().map(|(id, bytes)| (id, STANDARD.encode(bytes))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(Uuid, Vec<u8>)>, D::Error> {
        let rows: Vec<(Uuid, String)> = Deserialize::deserialize(d)?;
        rows.into_iter()
            .map(|(id, text)| {
                STANDARD
                    .decode(text)
                    .map(|bytes| (id, bytes))
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

/// What one `resolve` call decided to write, before it is sealed.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Decided {
    pub claims: Vec<(String, Claim)>,
    pub nodes: Vec<CustomerNode>,
    pub resolutions: Vec<(EventId, Resolution)>,
}

impl Decided {
    fn is_empty(&self) -> bool {
        self.claims.is_empty() && self.nodes.is_empty() && self.resolutions.is_empty()
    }
}

/// An intent stored by a version that did not seal the graph: rolled
/// forward sealed.
#[derive(Deserialize)]
struct ClearIntent {
    claims: Vec<(Identifier, Claim)>,
    nodes: Vec<CustomerNode>,
    resolutions: Vec<(EventId, Resolution)>,
}

/// The lease row as read with `SERIAL`.
#[derive(Debug)]
pub(crate) struct LeaseRow {
    pub holder: Option<Uuid>,
    pub epoch: i64,
    pub until: i64,
    pub pending: Option<Vec<u8>>,
}

/// The lease held by one call.
#[derive(Debug)]
pub(crate) struct Lease {
    pub holder: Uuid,
    pub epoch: i64,
    /// The intent left by a previous holder, to roll forward first.
    pub pending: Option<Vec<u8>>,
}

/// A row looked up in the overlay.
enum Lookup<T> {
    /// Known: read from the database in this call, or written by it.
    Known(Option<T>),
    /// Not read yet.
    Missing,
}

/// The graph as one `resolve` call sees it: rows read from the database
/// (`None` when there is no row) and the writes of the events decided so
/// far, which later events read.
#[derive(Default)]
struct Overlay {
    claims: HashMap<String, Option<Claim>>,
    nodes: HashMap<CustomerId, Option<CustomerNode>>,
    decisions: HashMap<EventId, Option<Resolution>>,
    new_claims: BTreeMap<String, Claim>,
    new_nodes: BTreeMap<CustomerId, CustomerNode>,
    new_decisions: BTreeMap<EventId, Resolution>,
}

impl Overlay {
    fn claim(&self, key: &str) -> Lookup<Claim> {
        if let Some(claim) = self.new_claims.get(key) {
            return Lookup::Known(Some(claim.clone()));
        }
        match self.claims.get(key) {
            Some(claim) => Lookup::Known(claim.clone()),
            None => Lookup::Missing,
        }
    }

    fn node(&self, customer: CustomerId) -> Lookup<CustomerNode> {
        if let Some(node) = self.new_nodes.get(&customer) {
            return Lookup::Known(Some(node.clone()));
        }
        match self.nodes.get(&customer) {
            Some(node) => Lookup::Known(node.clone()),
            None => Lookup::Missing,
        }
    }

    fn decision(&self, event: EventId) -> Lookup<Resolution> {
        if let Some(r) = self.new_decisions.get(&event) {
            return Lookup::Known(Some(r.clone()));
        }
        match self.decisions.get(&event) {
            Some(r) => Lookup::Known(r.clone()),
            None => Lookup::Missing,
        }
    }

    fn absorb(&mut self, writes: EventWrites) {
        self.new_claims.extend(writes.claims);
        self.new_nodes.extend(writes.nodes);
        self.new_decisions.extend(writes.decisions);
    }

    fn into_decided(self) -> Decided {
        Decided {
            claims: self.new_claims.into_iter().collect(),
            nodes: self.new_nodes.into_values().collect(),
            resolutions: self.new_decisions.into_iter().collect(),
        }
    }
}

/// Rows an attempt needed but the overlay did not have.
#[derive(Debug, Default)]
struct Missing {
    claims: BTreeSet<String>,
    nodes: BTreeSet<CustomerId>,
    decisions: BTreeSet<EventId>,
}

impl Missing {
    fn is_empty(&self) -> bool {
        self.claims.is_empty() && self.nodes.is_empty() && self.decisions.is_empty()
    }
}

/// The writes of one event's resolution.
#[derive(Default)]
struct EventWrites {
    claims: BTreeMap<String, Claim>,
    nodes: BTreeMap<CustomerId, CustomerNode>,
    decisions: BTreeMap<EventId, Resolution>,
}

/// One attempt at resolving one event on the overlay. Its writes stay
/// here until the attempt is known to have read nothing missing; a missing
/// row reads as absent and is recorded, and the attempt is then discarded.
struct EventGraph<'a> {
    base: &'a Overlay,
    /// Names claims (none when the graph is in clear).
    hasher: Option<&'a Hasher>,
    writes: EventWrites,
    missing: RefCell<Missing>,
}

impl<'a> EventGraph<'a> {
    fn new(base: &'a Overlay, hasher: Option<&'a Hasher>) -> Self {
        EventGraph {
            base,
            hasher,
            writes: EventWrites::default(),
            missing: RefCell::new(Missing::default()),
        }
    }

    fn finish(self) -> (EventWrites, Missing) {
        (self.writes, self.missing.into_inner())
    }
}

impl GraphRead for EventGraph<'_> {
    type Error = StoreError;

    fn claim(&self, id: &Identifier) -> Result<Option<Claim>, StoreError> {
        let key = claim_key(self.hasher, id);
        if let Some(claim) = self.writes.claims.get(&key) {
            return Ok(Some(claim.clone()));
        }
        match self.base.claim(&key) {
            Lookup::Known(claim) => Ok(claim),
            Lookup::Missing => {
                self.missing.borrow_mut().claims.insert(key);
                Ok(None)
            }
        }
    }

    fn node(&self, customer: CustomerId) -> Result<Option<CustomerNode>, StoreError> {
        if let Some(node) = self.writes.nodes.get(&customer) {
            return Ok(Some(node.clone()));
        }
        match self.base.node(customer) {
            Lookup::Known(node) => Ok(node),
            Lookup::Missing => {
                self.missing.borrow_mut().nodes.insert(customer);
                Ok(None)
            }
        }
    }
}

impl GraphWrite for EventGraph<'_> {
    fn put_claim(&mut self, id: &Identifier, claim: &Claim) -> Result<(), StoreError> {
        self.writes
            .claims
            .insert(claim_key(self.hasher, id), claim.clone());
        Ok(())
    }

    fn put_node(&mut self, node: &CustomerNode) -> Result<(), StoreError> {
        self.writes.nodes.insert(node.id, node.clone());
        Ok(())
    }
}

impl DecisionLog for EventGraph<'_> {
    fn decision(&self, event: &Touchpoint) -> Result<Option<Resolution>, StoreError> {
        let id = event.event_id();
        if let Some(r) = self.writes.decisions.get(&id) {
            return Ok(Some(r.clone()));
        }
        match self.base.decision(id) {
            Lookup::Known(r) => Ok(r),
            Lookup::Missing => {
                self.missing.borrow_mut().decisions.insert(id);
                Ok(None)
            }
        }
    }

    fn put_decision(
        &mut self,
        event: &Touchpoint,
        resolution: &Resolution,
    ) -> Result<(), StoreError> {
        self.writes
            .decisions
            .insert(event.event_id(), resolution.clone());
        Ok(())
    }
}

impl ScyllaStore {
    // ---- rows ----------------------------------------------------------

    async fn fetch_claim(&self, key: &str) -> Result<Option<Claim>, StoreError> {
        match self.read_blob(&self.st().claim_get, (key,)).await? {
            Some(bytes) => Ok(Some(from_json("claim", &bytes)?)),
            None => Ok(None),
        }
    }

    /// The key `id`'s claim is filed under.
    pub(crate) fn claim_key(&self, id: &Identifier) -> String {
        claim_key(self.seal.hasher(), id)
    }

    /// A customer node, opened (`None` too when its customer is erased).
    async fn fetch_node(&self, customer: CustomerId) -> Result<Option<CustomerNode>, StoreError> {
        let Some(bytes) = self.read_blob(&self.st().node_get, (customer.0,)).await? else {
            return Ok(None);
        };
        let keys = self.seal.keys([customer]).await?;
        keys.read_node(customer, &bytes)?.found(customer)
    }

    /// A stored decision, opened (`None` too when its customer is erased).
    async fn fetch_decision(&self, event: EventId) -> Result<Option<Resolution>, StoreError> {
        let Some(bytes) = self
            .read_blob(&self.st().resolution_get, (event.0,))
            .await?
        else {
            return Ok(None);
        };
        match decision_owner(&bytes)? {
            Some(owner) => {
                let keys = self.seal.keys([owner]).await?;
                keys.read_decision(event, &bytes)?.found(owner)
            }
            // In clear.
            None => Ok(Some(from_json("resolution", &bytes)?)),
        }
    }

    /// The rows of `decided` sealed under the keys of their customers
    /// (created for new customers, and durable before the rows are).
    pub(crate) async fn seal_decided(&self, decided: Decided) -> Result<Intent, StoreError> {
        let decisions = decided.resolutions.iter().map(|(_, r)| r);
        let keys = self
            .seal
            .obtain(graph_owners(&decided.nodes, decisions))
            .await?;
        self.seal.flush().await?;
        let mut intent = Intent {
            claims: decided.claims,
            ..Intent::default()
        };
        // An erased customer is not made again.
        for node in &decided.nodes {
            if let Some(bytes) = keys.write_node(node)? {
                intent.nodes.push((node.id.0, bytes));
            }
        }
        for (event, resolution) in &decided.resolutions {
            if let Some(bytes) = keys.write_decision(*event, resolution)? {
                intent.resolutions.push((event.0, bytes));
            }
        }
        Ok(intent)
    }

    /// An intent as the lease row keeps it; one stored in clear by an
    /// earlier version is sealed first.
    async fn stored_intent(&self, bytes: &[u8]) -> Result<Intent, StoreError> {
        if let Ok(intent) = serde_json::from_slice::<Intent>(bytes) {
            return Ok(intent);
        }
        let clear: ClearIntent = from_json("identity intent", bytes)?;
        let decided = Decided {
            claims: clear
                .claims
                .into_iter()
                .map(|(id, claim)| (self.claim_key(&id), claim))
                .collect(),
            nodes: clear.nodes,
            resolutions: clear.resolutions,
        };
        self.seal_decided(decided).await
    }

    /// Files the claims of a graph written in clear under hashed keys, once
    /// per keyspace when its store seals (recorded in `schema_version`);
    /// nodes and decisions in clear are sealed when next written. Each
    /// moved claim keeps its write time, so fenced writes still order.
    /// Returns how many claims moved.
    pub async fn seal_claims(&self) -> Result<usize, StoreError> {
        const DONE: i32 = 1001;
        let Some(hasher) = self.seal.hasher() else {
            return Ok(0);
        };
        let ks = self.keyspace();
        let session = self.session();
        let done = session
            .query_unpaged(
                format!("SELECT version FROM {ks}.schema_version WHERE version = ?"),
                (DONE,),
            )
            .await
            .map_err(exec_error)?
            .into_rows_result()
            .map_err(storage)?
            .rows_num()
            > 0;
        if done {
            return Ok(0);
        }
        let pager = session
            .query_iter(
                format!("SELECT id, claim, WRITETIME(claim) FROM {ks}.claims"),
                (),
            )
            .await
            .map_err(crate::pager_error)?;
        let mut rows = pager
            .rows_stream::<(String, Option<Vec<u8>>, Option<i64>)>()
            .map_err(storage)?;
        let put = format!("INSERT INTO {ks}.claims (id, claim) VALUES (?, ?) USING TIMESTAMP ?");
        let delete = format!("DELETE FROM {ks}.claims USING TIMESTAMP ? WHERE id = ?");
        let mut moved = 0;
        while let Some((key, claim, at)) = rows.try_next().await.map_err(crate::next_row_error)? {
            if is_hashed_claim_key(&key) {
                continue;
            }
            let (Some(claim), Some(at)) = (claim, at) else {
                continue;
            };
            let hashed = cdp_store::sealed::sealed_claim_key(hasher, &key);
            session
                .query_unpaged(put.as_str(), (hashed, claim, at))
                .await
                .map_err(exec_error)?;
            session
                .query_unpaged(delete.as_str(), (at, key))
                .await
                .map_err(exec_error)?;
            moved += 1;
        }
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {ks}.schema_version (version, name, applied_at) VALUES (?, ?, ?)"
                ),
                (
                    DONE,
                    "data: claims filed under hashed identifiers",
                    now_ms(),
                ),
            )
            .await
            .map_err(exec_error)?;
        info!(keyspace = %ks, claims = moved, "claims filed under hashed identifiers");
        Ok(moved)
    }

    /// Fetches the stored decisions of `events` not in the overlay yet.
    async fn fetch_decisions(
        &self,
        overlay: &mut Overlay,
        events: impl IntoIterator<Item = EventId>,
    ) -> Result<(), StoreError> {
        let wanted: BTreeSet<EventId> = events
            .into_iter()
            .filter(|e| !overlay.decisions.contains_key(e))
            .collect();
        let found: Vec<(EventId, Option<Resolution>)> = stream::iter(wanted)
            .map(|e| async move { Ok::<_, StoreError>((e, self.fetch_decision(e).await?)) })
            .buffer_unordered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        overlay.decisions.extend(found);
        Ok(())
    }

    /// Fetches missing claims and nodes, then the nodes the claims point at
    /// and the redirects of every node fetched, so the next attempt rarely
    /// misses again.
    async fn fetch_rows(&self, overlay: &mut Overlay, missing: Missing) -> Result<(), StoreError> {
        self.fetch_decisions(overlay, missing.decisions).await?;
        let keys: Vec<String> = missing
            .claims
            .into_iter()
            .filter(|k| !overlay.claims.contains_key(k))
            .collect();
        let claims: Vec<(String, Option<Claim>)> = stream::iter(keys)
            .map(|k| async move {
                let claim = self.fetch_claim(&k).await?;
                Ok::<_, StoreError>((k, claim))
            })
            .buffer_unordered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        let mut nodes = missing.nodes;
        nodes.extend(
            claims
                .iter()
                .filter_map(|(_, c)| c.as_ref().map(|c| c.customer)),
        );
        overlay.claims.extend(claims);
        // A redirect chain is at most `MAX_REDIRECTS` long: the walk fails
        // beyond it, so there is nothing more to prefetch.
        for _ in 0..=MAX_REDIRECTS {
            let wanted: Vec<CustomerId> = nodes
                .iter()
                .copied()
                .filter(|c| !overlay.nodes.contains_key(c))
                .collect();
            if wanted.is_empty() {
                break;
            }
            let found: Vec<(CustomerId, Option<CustomerNode>)> = stream::iter(wanted)
                .map(|c| async move { Ok::<_, StoreError>((c, self.fetch_node(c).await?)) })
                .buffer_unordered(READ_CONCURRENCY)
                .try_collect()
                .await?;
            nodes = found
                .iter()
                .filter_map(|(_, n)| n.as_ref().and_then(|n| n.merged_into))
                .collect();
            overlay.nodes.extend(found);
        }
        Ok(())
    }

    /// Reads what the batch will need: stored decisions, the claims of the
    /// identifiers of undecided events, their customers and redirects.
    async fn prefetch(
        &self,
        overlay: &mut Overlay,
        events: &[Touchpoint],
    ) -> Result<(), StoreError> {
        self.fetch_decisions(overlay, events.iter().map(Touchpoint::event_id))
            .await?;
        let mut missing = Missing::default();
        for event in events {
            if matches!(overlay.decision(event.event_id()), Lookup::Known(Some(_))) {
                continue;
            }
            missing.claims.extend(
                event
                    .personal
                    .identifiers
                    .iter()
                    .map(|id| self.claim_key(id)),
            );
        }
        self.fetch_rows(overlay, missing).await
    }

    // ---- the lease -------------------------------------------------------

    /// Creates the lease row when it does not exist.
    pub(crate) async fn init_lease(&self) -> Result<(), StoreError> {
        match self.lwt(&self.st().lease_init, (Uuid::nil(),)).await? {
            Lwt::Applied => debug!("created the identity lease row"),
            Lwt::NotApplied => {}
            // The next read of the row tells.
            Lwt::Unknown(e) => debug!(error = %e, "creating the identity lease row"),
        }
        Ok(())
    }

    /// Drops the pending intent and frees the lease (after a truncate).
    pub(crate) async fn reset_lease(&self) -> Result<(), StoreError> {
        match self.lwt(&self.st().lease_reset, ()).await? {
            Lwt::Applied | Lwt::NotApplied => Ok(()),
            Lwt::Unknown(e) => Err(e),
        }
    }

    /// Reads the lease row linearizably (`SERIAL`).
    pub(crate) async fn read_lease(&self) -> Result<Option<LeaseRow>, StoreError> {
        type Columns = (Option<Uuid>, Option<i64>, Option<i64>, Option<Vec<u8>>);
        let result = self
            .session()
            .execute_unpaged(&self.st().lease_read, ())
            .await
            .map_err(exec_error)?
            .into_rows_result()
            .map_err(storage)?;
        let row: Option<Columns> = result.maybe_first_row().map_err(storage)?;
        Ok(row.map(|(holder, epoch, until, pending)| LeaseRow {
            holder,
            epoch: epoch.unwrap_or(0),
            until: until.unwrap_or(0),
            pending,
        }))
    }

    /// Takes the lease with a new epoch, waiting while another holder's
    /// lease runs; gives up after about twice the lease time.
    pub(crate) async fn acquire_lease(&self) -> Result<Lease, StoreError> {
        let holder = Uuid::new_v4();
        let lease_ms = self.inner.lease_ms;
        let patience = Duration::from_millis(lease_ms.saturating_mul(2));
        let started = Instant::now();
        let mut backoff_ms: u64 = 2;
        loop {
            let Some(row) = self.read_lease().await? else {
                self.init_lease().await?;
                if started.elapsed() > patience {
                    return Err(StoreError::Unavailable(
                        "the identity lease row cannot be created".into(),
                    ));
                }
                continue;
            };
            let now = now_ms();
            if row.until <= now {
                let epoch = row
                    .epoch
                    .checked_add(1)
                    .ok_or_else(|| StoreError::Storage("identity lease epoch overflow".into()))?;
                let until = now.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX));
                let acquired = match self
                    .lwt(
                        &self.st().lease_acquire,
                        (holder, epoch, until, row.epoch, now),
                    )
                    .await?
                {
                    Lwt::Applied => true,
                    Lwt::NotApplied => false,
                    Lwt::Unknown(e) => {
                        debug!(error = %e, "taking the identity lease: outcome unknown, reading it");
                        self.read_lease()
                            .await?
                            .is_some_and(|r| r.holder == Some(holder) && r.epoch == epoch)
                    }
                };
                if acquired {
                    // The previous holder may have stored an intent between
                    // our read and our update: read what we hold now.
                    let current = self.read_lease().await?;
                    match current {
                        Some(r) if r.holder == Some(holder) && r.epoch == epoch => {
                            debug!(
                                epoch,
                                pending = r.pending.is_some(),
                                "took the identity lease"
                            );
                            return Ok(Lease {
                                holder,
                                epoch,
                                pending: r.pending,
                            });
                        }
                        _ => {
                            warn!(epoch, "lost the identity lease right after taking it");
                            continue;
                        }
                    }
                }
            }
            if started.elapsed() > patience {
                return Err(StoreError::Unavailable(format!(
                    "the identity lease is held by {} (epoch {}, until {}); gave up after {} ms",
                    row.holder.map(|h| h.to_string()).unwrap_or_default(),
                    row.epoch,
                    row.until,
                    patience.as_millis()
                )));
            }
            let remaining = u64::try_from(row.until.saturating_sub(now)).unwrap_or(0);
            let wait = if remaining > 0 {
                backoff_ms.min(remaining)
            } else {
                // Lost a race for a free lease: retry soon.
                1
            };
            tokio::time::sleep(Duration::from_millis(wait) + jitter(backoff_ms)).await;
            backoff_ms = (backoff_ms * 2).min(200);
        }
    }

    /// Sets or clears the intent while holding `lease`. False when the lease
    /// was lost.
    pub(crate) async fn set_pending(
        &self,
        lease: &Lease,
        intent: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        for _ in 0..3 {
            let outcome = self
                .lwt(
                    &self.st().lease_set_pending,
                    (intent.as_deref(), lease.holder, lease.epoch),
                )
                .await?;
            match outcome {
                Lwt::Applied => return Ok(true),
                Lwt::NotApplied => return Ok(false),
                Lwt::Unknown(e) => {
                    debug!(error = %e, "storing the identity intent: outcome unknown, reading it");
                    let Some(row) = self.read_lease().await? else {
                        return Ok(false);
                    };
                    if row.holder != Some(lease.holder) || row.epoch != lease.epoch {
                        return Ok(false);
                    }
                    if row.pending == intent {
                        return Ok(true);
                    }
                    // Still ours, not applied: try again.
                }
            }
        }
        Err(StoreError::Unavailable(
            "cannot store the identity intent".into(),
        ))
    }

    /// Clears the intent and frees the lease. Failing here loses nothing:
    /// the next holder re-applies the intent.
    async fn release_lease(&self, lease: &Lease) {
        match self
            .lwt(&self.st().lease_release, (lease.holder, lease.epoch))
            .await
        {
            Ok(Lwt::Applied) => debug!(epoch = lease.epoch, "released the identity lease"),
            Ok(Lwt::NotApplied) => warn!(
                epoch = lease.epoch,
                "the identity lease expired before its release; the next holder re-applies its intent"
            ),
            Ok(Lwt::Unknown(e)) | Err(e) => warn!(
                epoch = lease.epoch,
                error = %e,
                "cannot release the identity lease; it expires on its own"
            ),
        }
    }

    /// Frees the lease after a failure, keeping any intent for the next
    /// holder.
    async fn abandon_lease(&self, lease: &Lease) {
        match self
            .lwt(&self.st().lease_abandon, (lease.holder, lease.epoch))
            .await
        {
            Ok(Lwt::Applied | Lwt::NotApplied) => {}
            Ok(Lwt::Unknown(e)) | Err(e) => warn!(
                epoch = lease.epoch,
                error = %e,
                "cannot free the identity lease; it expires on its own"
            ),
        }
    }

    // ---- resolution ------------------------------------------------------

    /// Writes every row of `intent` with the fencing timestamps of this
    /// call's epoch.
    pub(crate) async fn apply_intent(
        &self,
        intent: &Intent,
        fence: &mut Fence,
    ) -> Result<(), StoreError> {
        let st = self.st();
        let mut writes: Vec<BoxFuture<'_, Result<(), StoreError>>> =
            Vec::with_capacity(intent.claims.len() + intent.nodes.len() + intent.resolutions.len());
        for (key, claim) in &intent.claims {
            let values = (key.as_str(), to_json(claim)?, fence.next()?);
            writes.push(Box::pin(self.write(&st.claim_put, values)));
        }
        for (customer, node) in &intent.nodes {
            let values = (*customer, node.as_slice(), fence.next()?);
            writes.push(Box::pin(self.write(&st.node_put, values)));
        }
        for (event, resolution) in &intent.resolutions {
            let values = (*event, resolution.as_slice(), fence.next()?);
            writes.push(Box::pin(self.write(&st.resolution_put, values)));
        }
        stream::iter(writes)
            .buffer_unordered(WRITE_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Resolves the batch in memory: stored decisions first, then
    /// `identity::resolve` on the overlay, fetching what an event missed and
    /// deciding it again. Returns the outcomes and what to write.
    async fn decide_batch(
        &self,
        events: &[Touchpoint],
        rules: &IdentityRules,
    ) -> Result<(Vec<Resolution>, Decided), StoreError> {
        let mut overlay = Overlay::default();
        self.prefetch(&mut overlay, events).await?;
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            let mut rounds = 0;
            let resolution = loop {
                rounds += 1;
                if rounds > MAX_FETCH_ROUNDS {
                    return Err(StoreError::Storage(format!(
                        "resolving event {} kept missing rows",
                        event.event_id()
                    )));
                }
                let mut graph = EventGraph::new(&overlay, self.seal.hasher());
                let result = identity::resolve_once(&mut graph, rules, event);
                let (writes, missing) = graph.finish();
                if !missing.is_empty() {
                    self.fetch_rows(&mut overlay, missing).await?;
                    continue;
                }
                let resolution = result?;
                overlay.absorb(writes);
                break resolution;
            };
            out.push(resolution);
        }
        Ok((out, overlay.into_decided()))
    }

    /// One attempt under `lease`. `None` when the lease was lost before the
    /// intent was stored (nothing of this attempt counts).
    async fn resolve_holding(
        &self,
        lease: &Lease,
        events: &[Touchpoint],
        rules: &IdentityRules,
    ) -> Result<Option<Vec<Resolution>>, StoreError> {
        let mut fence = Fence::new(lease.epoch)?;
        if let Some(bytes) = &lease.pending {
            let intent = self.stored_intent(bytes).await?;
            info!(
                epoch = lease.epoch,
                claims = intent.claims.len(),
                customers = intent.nodes.len(),
                decisions = intent.resolutions.len(),
                "rolling forward the intent of a previous identity lease holder"
            );
            self.apply_intent(&intent, &mut fence).await?;
            if !self.set_pending(lease, None).await? {
                return Ok(None);
            }
        }
        let (out, decided) = self.decide_batch(events, rules).await?;
        if decided.is_empty() {
            self.release_lease(lease).await;
            return Ok(Some(out));
        }
        let intent = self.seal_decided(decided).await?;
        // The commit point: from here the outcome is durable (whoever holds
        // the lease next rolls it forward).
        if !self.set_pending(lease, Some(to_json(&intent)?)).await? {
            return Ok(None);
        }
        #[cfg(test)]
        self.inner.faults.hit("identity.after_intent");
        self.apply_intent(&intent, &mut fence).await?;
        #[cfg(test)]
        self.inner.faults.hit("identity.after_apply");
        self.release_lease(lease).await;
        debug!(
            epoch = lease.epoch,
            events = events.len(),
            claims = intent.claims.len(),
            customers = intent.nodes.len(),
            "resolved a batch"
        );
        Ok(Some(out))
    }
}

#[async_trait]
impl IdentityStore for ScyllaStore {
    async fn resolve(
        &self,
        events: &[Touchpoint],
        rules: &IdentityRules,
    ) -> Result<Vec<Resolution>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let _gate = self.inner.identity_gate.lock().await;
        let mut losses = 0;
        loop {
            let lease = self.acquire_lease().await?;
            match self.resolve_holding(&lease, events, rules).await {
                Ok(Some(out)) => return Ok(out),
                Ok(None) => {
                    losses += 1;
                    warn!(
                        epoch = lease.epoch,
                        losses, "lost the identity lease while resolving; resolving again"
                    );
                    if losses >= MAX_LEASE_LOSSES {
                        return Err(StoreError::Unavailable(format!(
                            "lost the identity lease {losses} times in a row"
                        )));
                    }
                }
                Err(e) => {
                    // An intent stored before the failure stays for the next
                    // holder; the lease is freed so it need not wait.
                    self.abandon_lease(&lease).await;
                    return Err(e);
                }
            }
        }
    }

    async fn customer(&self, customer: CustomerId) -> Result<Option<CustomerNode>, StoreError> {
        self.fetch_node(customer).await
    }

    async fn link(&self, customer: CustomerId) -> Result<Option<CustomerId>, StoreError> {
        match self.read_blob(&self.st().node_get, (customer.0,)).await? {
            Some(bytes) => node_link(&bytes),
            None => Ok(None),
        }
    }

    async fn claims(&self, ids: &[Identifier]) -> Result<Vec<Option<Claim>>, StoreError> {
        let keys: Vec<String> = ids.iter().map(|id| self.claim_key(id)).collect();
        stream::iter(keys)
            .map(|key| async move { self.fetch_claim(&key).await })
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await
    }

    async fn decision(&self, event: &Touchpoint) -> Result<Option<Resolution>, StoreError> {
        self.fetch_decision(event.event_id()).await
    }

    /// Plain deletes at the present time: they shadow the fenced identity
    /// writes before them (fencing timestamps stay far below the clock's
    /// microseconds), and nothing writes these rows again (an erased
    /// identifier is suppressed, customer and event ids are never reused).
    async fn erase_graph(
        &self,
        customers: &[CustomerId],
        identifiers: &[Identifier],
        events: &[EventId],
    ) -> Result<(), StoreError> {
        let ks = self.keyspace();
        let session = self.session();
        let node = crate::prepare(
            session,
            format!("DELETE FROM {ks}.customers WHERE id = ?"),
            crate::Kind::Write,
        )
        .await?;
        let claim = crate::prepare(
            session,
            format!("DELETE FROM {ks}.claims WHERE id = ?"),
            crate::Kind::Write,
        )
        .await?;
        let decision = crate::prepare(
            session,
            format!("DELETE FROM {ks}.resolutions WHERE event_id = ?"),
            crate::Kind::Write,
        )
        .await?;
        // Only where claims are filed: a delete of the key in clear would
        // write the identifier into a tombstone (a sealing store filed the
        // claims of a keyspace from before sealing under hashed keys when it
        // opened it, see `seal_claims`).
        let claims: Vec<String> = identifiers.iter().map(|id| self.claim_key(id)).collect();
        for chunk in claims.chunks(READ_CONCURRENCY) {
            futures::future::try_join_all(chunk.iter().cloned().map(|k| self.write(&claim, (k,))))
                .await?;
        }
        let events: Vec<Uuid> = events.iter().map(|e| e.0).collect();
        for chunk in events.chunks(READ_CONCURRENCY) {
            futures::future::try_join_all(
                chunk.iter().copied().map(|e| self.write(&decision, (e,))),
            )
            .await?;
        }
        // The nodes last: they list the identifiers an interrupted erasure
        // resumes from.
        let deletes = customers
            .iter()
            .map(|c| self.write(&node, (c.0,)))
            .collect::<Vec<_>>();
        futures::future::try_join_all(deletes).await?;
        Ok(())
    }
}
