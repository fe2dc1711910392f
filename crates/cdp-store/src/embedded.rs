//! The embedded stores: redb on local disk. Each call is one serializable
//! write transaction, synced before it returns, so two workers can never
//! interleave inside a resolution or a fold.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use cdp_domain::identity::{self, Claim, CustomerNode, DecisionLog, GraphRead, GraphWrite};
use cdp_domain::profile::{
    FoldOptions, ProfileAccess, ProfileSlot, Refresh, fold_resolved, refresh_audience,
};
use cdp_domain::redirect;
use cdp_domain::{
    CustomerId, EventId, Identifier, IdentityRules, Resolution, ResolvedTouchpoint, TimelineEntry,
    Touchpoint,
};
use cdp_seal::Hasher;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::audience_index::{AudienceIndex, IndexMoves};
use crate::sealed::{
    Read, RowKind, ToWrite, ViewKeys, ViewSeal, batch_customers, claim_key, decision_owner,
    graph_owners, node_link,
};
use crate::{
    Applied, BackfillPage, IdentityStore, MembersPage, ProfileRow, ProfileStore, StoreError,
    TimelineQuery,
};

/// How many times a fold fetches keys it met but had not fetched (each
/// round follows the redirects found in the one before).
const KEY_ROUNDS: usize = 8;

/// claim key (`#` and the hex of the identifier's keyring subject when
/// sealing, else `kind \0 value`) -> Claim (JSON; names no identifier).
const CLAIMS: TableDefinition<&str, &[u8]> = TableDefinition::new("claims");
/// customer id -> CustomerNode (sealed under the customer's key behind
/// where it redirects, see [`crate::sealed::node_link`]).
const CUSTOMERS: TableDefinition<u128, &[u8]> = TableDefinition::new("customers");
/// (received_at, event id) -> Resolution (sealed under the key of the
/// customer it attributes the event to): what identity decided for
/// the event. Keyed by arrival first so each batch's decisions land at the
/// end of the tree instead of on a random page each; a re-delivered event
/// carries the same arrival time, so it finds its decision.
const DECISIONS: TableDefinition<(i64, u128), &[u8]> = TableDefinition::new("decisions");
/// customer id -> ProfileSlot (JSON; a live profile sealed under the
/// customer's key, see [`crate::sealed`]).
const PROFILES: TableDefinition<u128, &[u8]> = TableDefinition::new("profiles");
/// (search entry, customer id) -> (): keyed hashes of each term and of its
/// prefixes when the views are sealed, else the terms (see
/// `cdp_domain::search` and [`crate::sealed::index_entries`]).
const SEARCH: TableDefinition<(&str, u128), ()> = TableDefinition::new("search");
/// (customer id, occurred_at, event id) -> TimelineEntry (JSON, sealed
/// under the customer's key).
const TIMELINE: TableDefinition<(u128, i64, u128), &[u8]> = TableDefinition::new("timeline");
/// (due, customer id) -> (): the audience timers, one per live profile
/// whose state is due (`Audience::due`), written with the profile row. An
/// entry that no longer stands for its row (the row erased, say) is
/// dropped by the timer that finds it.
const AUDIENCE_DUE: TableDefinition<(i64, u128), ()> = TableDefinition::new("audience_due");
/// (segment, since, customer id) -> (): the members of each segment, in
/// the order they entered, written with the profile row. Keyed by the
/// instant the membership began (the fold's clock) before the customer, so
/// a batch's entries land at the end of each segment's range instead of on
/// a random page each. An erased row's entries stay until a read finds the
/// row gone (`ProfileStore::members` leaves them out).
const SEGMENT_MEMBERS: TableDefinition<(&str, i64, u128), ()> =
    TableDefinition::new("segment_members_by_since");
/// The members index as stores before `segment_members_by_since` kept it:
/// (segment, customer id) -> since. Moved into the new table when a store
/// is opened ([`move_members_index`]).
const SEGMENT_MEMBERS_V1: TableDefinition<(&str, u128), i64> =
    TableDefinition::new("segment_members");

/// A write transaction that saves the allocator state with its commit
/// (redb's quick repair): after a crash the file opens at once instead of
/// being scanned whole.
fn begin_write(db: &Database) -> Result<redb::WriteTransaction, StoreError> {
    let mut tx = db.begin_write().map_err(storage)?;
    tx.set_quick_repair(true);
    Ok(tx)
}

fn storage<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Storage(e.to_string())
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(storage)
}

fn from_json<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what,
        reason: e.to_string(),
    })
}

fn key(c: CustomerId) -> u128 {
    c.0.as_u128()
}

/// The files of one embedded store: the identity graph, and the views
/// (profiles, timeline, search). Two files are two redb writers, so the
/// identity and profile workers commit side by side instead of taking
/// turns on one write lock.
pub const FILES: [&str; 2] = ["store.redb", "views.redb"];

/// The embedded identity and profile stores, in `dir/store.redb` (the
/// identity graph) and `dir/views.redb` (profiles, timeline and search). A
/// store written before the split keeps its views in `store.redb`, and goes
/// on using it. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    graph: Arc<Database>,
    views: Arc<Database>,
    /// The customer keys the views are sealed under.
    seal: ViewSeal,
}

fn create_tables(db: &Database, graph: bool, views: bool) -> Result<(), StoreError> {
    let tx = begin_write(db)?;
    if graph {
        tx.open_table(CLAIMS).map_err(storage)?;
        tx.open_table(CUSTOMERS).map_err(storage)?;
        tx.open_table(DECISIONS).map_err(storage)?;
    }
    if views {
        tx.open_table(PROFILES).map_err(storage)?;
        tx.open_table(TIMELINE).map_err(storage)?;
        tx.open_table(SEARCH).map_err(storage)?;
        tx.open_table(AUDIENCE_DUE).map_err(storage)?;
        tx.open_table(SEGMENT_MEMBERS).map_err(storage)?;
        move_members_index(&tx)?;
    }
    tx.commit().map_err(storage)
}

/// Moves the entries of a members index keyed by customer
/// ([`SEGMENT_MEMBERS_V1`]) into the one keyed by entry
/// ([`SEGMENT_MEMBERS`]), then drops it.
fn move_members_index(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let old = match tx.open_table(SEGMENT_MEMBERS_V1) {
        Ok(old) => old,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(storage(e)),
    };
    let mut moved = 0u64;
    {
        // Streamed, not collected: at a million customers the old index
        // holds millions of entries.
        let mut index = tx.open_table(SEGMENT_MEMBERS).map_err(storage)?;
        for entry in old.iter().map_err(storage)? {
            let (k, since) = entry.map_err(storage)?;
            let (segment, customer) = k.value();
            index
                .insert((segment, since.value(), customer), ())
                .map_err(storage)?;
            moved += 1;
        }
    }
    drop(old);
    tx.delete_table(SEGMENT_MEMBERS_V1).map_err(storage)?;
    tracing::info!(
        entries = moved,
        "segment members index moved to entry order"
    );
    Ok(())
}

/// Whether `db` holds profiles: a store from before the split.
fn holds_views(db: &Database) -> Result<bool, StoreError> {
    let tx = db.begin_read().map_err(storage)?;
    match tx.open_table(PROFILES) {
        Ok(table) => Ok(!table.is_empty().map_err(storage)?),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
        Err(e) => Err(storage(e)),
    }
}

impl EmbeddedStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, 256 << 20)
    }

    /// [`open`](Self::open) with page caches of `cache_bytes` in all.
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(storage)?;
        let (graph_file, views_file) = (dir.join(FILES[0]), dir.join(FILES[1]));
        if graph_file.exists() && !views_file.exists() {
            let db = redb::Builder::new()
                .set_cache_size(cache_bytes)
                .set_repair_callback(|s| {
                    tracing::warn!(progress = s.progress(), "repairing the store after a crash");
                })
                .create(&graph_file)
                .map_err(storage)?;
            if holds_views(&db)? {
                tracing::info!(dir = %dir.display(), "store from before the views split: one file");
                create_tables(&db, true, true)?;
                let db = Arc::new(db);
                return Ok(EmbeddedStore {
                    graph: Arc::clone(&db),
                    views: db,
                    seal: ViewSeal::clear(),
                });
            }
            drop(db);
        }
        let open = |path: &Path| {
            redb::Builder::new()
                .set_cache_size(cache_bytes / 2)
                .set_repair_callback(|s| {
                    tracing::warn!(progress = s.progress(), "repairing the store after a crash");
                })
                .create(path)
                .map_err(storage)
        };
        let graph = open(&graph_file)?;
        create_tables(&graph, true, false)?;
        let views = open(&views_file)?;
        create_tables(&views, false, true)?;
        Ok(EmbeddedStore {
            graph: Arc::new(graph),
            views: Arc::new(views),
            seal: ViewSeal::clear(),
        })
    }

    /// This store, sealing the views it writes under customer keys from
    /// `seal` (see [`crate::sealed`]).
    pub fn with_seal(mut self, seal: ViewSeal) -> Self {
        self.seal = seal;
        self
    }

    async fn blocking<T: Send + 'static>(
        db: &Arc<Database>,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = Arc::clone(db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Storage(format!("store task failed: {e}")))?
    }

    /// Runs `f` on the identity graph's database.
    async fn on_graph<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        Self::blocking(&self.graph, f).await
    }

    /// Runs `f` on the views' database.
    async fn on_views<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        Self::blocking(&self.views, f).await
    }

    /// Files the claims of a graph written in clear under hashed keys, when
    /// this store seals (see [`crate::sealed::claim_key`]); the nodes and
    /// decisions in clear are sealed when next written. Returns how many
    /// claims moved. Blocking, like [`open`](Self::open), after which it
    /// runs.
    pub fn seal_claims(&self) -> Result<usize, StoreError> {
        let Some(hasher) = self.seal.hasher() else {
            return Ok(0);
        };
        let db = &self.graph;
        // Keys in clear start with their kind's letters, after `#` (hashed
        // keys) and `$`.
        {
            let tx = db.begin_read().map_err(storage)?;
            let table = tx.open_table(CLAIMS).map_err(storage)?;
            if table.range("$"..).map_err(storage)?.next().is_none() {
                return Ok(0);
            }
        }
        let mut tx = begin_write(db)?;
        tx.set_durability(Durability::Immediate).map_err(storage)?;
        let moved = {
            let mut table = tx.open_table(CLAIMS).map_err(storage)?;
            let clear: Vec<(String, Vec<u8>)> = table
                .range("$"..)
                .map_err(storage)?
                .map(|row| {
                    row.map(|(k, v)| (k.value().to_string(), v.value().to_vec()))
                        .map_err(storage)
                })
                .collect::<Result<_, _>>()?;
            for (k, v) in &clear {
                let hashed = crate::sealed::sealed_claim_key(hasher, k);
                table
                    .insert(hashed.as_str(), v.as_slice())
                    .map_err(storage)?;
                table.remove(k.as_str()).map_err(storage)?;
            }
            clear.len()
        };
        tx.commit().map_err(storage)?;
        tracing::info!(claims = moved, "claims filed under hashed identifiers");
        Ok(moved)
    }

    /// Customer keys for work on the graph's blocking thread.
    fn graph_keys(&self) -> Result<BlockingKeys, StoreError> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| StoreError::Storage(format!("the graph needs a runtime: {e}")))?;
        Ok(BlockingKeys {
            keys: RefCell::new(self.seal.no_keys()),
            seal: self.seal.clone(),
            handle,
        })
    }
}

/// The customer keys of work on a blocking thread, fetched from the
/// keyring (on the runtime that started the work) as rows need them: the
/// graph finds the customers an event is about only inside its
/// transaction.
struct BlockingKeys {
    seal: ViewSeal,
    handle: tokio::runtime::Handle,
    keys: RefCell<ViewKeys>,
}

impl BlockingKeys {
    /// Fetches the keys of `customers` not fetched yet, creating them when
    /// `create` (for rows to write).
    fn ensure(
        &self,
        customers: impl IntoIterator<Item = CustomerId>,
        create: bool,
    ) -> Result<(), StoreError> {
        let wanted: Vec<CustomerId> = {
            let keys = self.keys.borrow();
            customers.into_iter().filter(|c| !keys.has(*c)).collect()
        };
        if wanted.is_empty() {
            return Ok(());
        }
        let mut keys = std::mem::take(&mut *self.keys.borrow_mut());
        let fetched = self
            .handle
            .block_on(self.seal.add_missing(&mut keys, wanted, create));
        *self.keys.borrow_mut() = keys;
        fetched
    }

    /// Makes the keys created so far durable (before rows sealed with them).
    fn flush(&self) -> Result<(), StoreError> {
        if self.keys.borrow().sealing() {
            self.handle.block_on(self.seal.flush())?;
        }
        Ok(())
    }

    fn hasher(&self) -> Option<Hasher> {
        self.keys.borrow().hasher().cloned()
    }

    /// A stored row of `owner` opened with `read`, its key fetched when
    /// missing (`None`: the customer is erased).
    fn open<T>(
        &self,
        owner: CustomerId,
        read: impl Fn(&ViewKeys) -> Result<Read<T>, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let first = read(&self.keys.borrow())?;
        if !matches!(first, Read::Missing) {
            return first.found(owner);
        }
        self.ensure([owner], false)?;
        read(&self.keys.borrow())?.found(owner)
    }

    /// A stored node opened (`None`: its customer is erased).
    fn node(&self, customer: CustomerId, bytes: &[u8]) -> Result<Option<CustomerNode>, StoreError> {
        self.open(customer, |keys| keys.read_node(customer, bytes))
    }

    /// A stored decision opened (`None`: its customer is erased).
    fn decision(&self, event: EventId, bytes: &[u8]) -> Result<Option<Resolution>, StoreError> {
        match decision_owner(bytes)? {
            Some(owner) => self.open(owner, |keys| keys.read_decision(event, bytes)),
            // In clear.
            None => Ok(Some(from_json("resolution", bytes)?)),
        }
    }
}

/// Where `customer`'s stored node redirects, read without opening it.
fn stored_link(
    customers: &impl ReadableTable<u128, &'static [u8]>,
    customer: CustomerId,
) -> Result<Option<CustomerId>, StoreError> {
    match customers.get(key(customer)).map_err(storage)? {
        Some(v) => node_link(v.value()),
        None => Ok(None),
    }
}

/// The identity graph and the decisions over the tables of one write
/// transaction. Nodes and decisions are sealed and written when it
/// [`finish`](Self::finish)es, each once, with keys fetched together.
struct TxGraph<'t, 'k> {
    claims: Table<'t, &'static str, &'static [u8]>,
    customers: Table<'t, u128, &'static [u8]>,
    decisions: Table<'t, (i64, u128), &'static [u8]>,
    keys: &'k BlockingKeys,
    hasher: Option<Hasher>,
    /// Nodes read or written in this transaction (`true`: written).
    nodes: RefCell<HashMap<CustomerId, (Option<CustomerNode>, bool)>>,
    /// Decisions taken in this transaction.
    new_decisions: HashMap<(i64, u128), (EventId, Resolution)>,
}

/// Where an event's decision is filed: by arrival first, so each batch's
/// decisions land at the end of the tree (see [`DECISIONS`]).
fn decision_key(event: &Touchpoint) -> (i64, u128) {
    (event.envelope.received_at, event.event_id().0.as_u128())
}

impl<'t, 'k> TxGraph<'t, 'k> {
    fn open(tx: &'t redb::WriteTransaction, keys: &'k BlockingKeys) -> Result<Self, StoreError> {
        Ok(TxGraph {
            claims: tx.open_table(CLAIMS).map_err(storage)?,
            customers: tx.open_table(CUSTOMERS).map_err(storage)?,
            decisions: tx.open_table(DECISIONS).map_err(storage)?,
            hasher: keys.hasher(),
            keys,
            nodes: RefCell::new(HashMap::new()),
            new_decisions: HashMap::new(),
        })
    }

    /// Seals and writes the nodes and decisions of this transaction, with
    /// the keys of new customers created (and durable) first.
    fn finish(mut self) -> Result<(), StoreError> {
        let nodes: Vec<CustomerNode> = self
            .nodes
            .into_inner()
            .into_values()
            .filter_map(|(node, written)| node.filter(|_| written))
            .collect();
        let decisions = self.new_decisions.values().map(|(_, r)| r);
        self.keys.ensure(graph_owners(&nodes, decisions), true)?;
        self.keys.flush()?;
        let keys = self.keys.keys.borrow();
        for node in &nodes {
            // An erased customer is not made again.
            if let Some(bytes) = keys.write_node(node)? {
                self.customers
                    .insert(key(node.id), bytes.as_slice())
                    .map_err(storage)?;
            }
        }
        for (at, (event, resolution)) in &self.new_decisions {
            if let Some(bytes) = keys.write_decision(*event, resolution)? {
                self.decisions
                    .insert(*at, bytes.as_slice())
                    .map_err(storage)?;
            }
        }
        Ok(())
    }
}

impl GraphRead for TxGraph<'_, '_> {
    type Error = StoreError;

    fn claim(&self, id: &Identifier) -> Result<Option<Claim>, StoreError> {
        let k = claim_key(self.hasher.as_ref(), id);
        match self.claims.get(k.as_str()).map_err(storage)? {
            Some(v) => Ok(Some(from_json("claim", v.value())?)),
            None => Ok(None),
        }
    }

    fn node(&self, customer: CustomerId) -> Result<Option<CustomerNode>, StoreError> {
        if let Some((node, _)) = self.nodes.borrow().get(&customer) {
            return Ok(node.clone());
        }
        let node = match self.customers.get(key(customer)).map_err(storage)? {
            Some(v) => self.keys.node(customer, v.value())?,
            None => None,
        };
        self.nodes
            .borrow_mut()
            .insert(customer, (node.clone(), false));
        Ok(node)
    }

    /// Follows redirects without opening nodes (they redirect in clear).
    fn root(&self, customer: CustomerId) -> Result<CustomerId, StoreError> {
        redirect::follow(customer, |c| {
            if let Some((node, _)) = self.nodes.borrow().get(&c) {
                return Ok(node.as_ref().and_then(|n| n.merged_into));
            }
            stored_link(&self.customers, c)
        })
    }
}

impl GraphWrite for TxGraph<'_, '_> {
    fn put_claim(&mut self, id: &Identifier, claim: &Claim) -> Result<(), StoreError> {
        let k = claim_key(self.hasher.as_ref(), id);
        self.claims
            .insert(k.as_str(), to_json(claim)?.as_slice())
            .map_err(storage)?;
        Ok(())
    }

    fn put_node(&mut self, node: &CustomerNode) -> Result<(), StoreError> {
        self.nodes
            .get_mut()
            .insert(node.id, (Some(node.clone()), true));
        Ok(())
    }
}

impl DecisionLog for TxGraph<'_, '_> {
    fn decision(&self, event: &Touchpoint) -> Result<Option<Resolution>, StoreError> {
        let at = decision_key(event);
        if let Some((_, r)) = self.new_decisions.get(&at) {
            return Ok(Some(r.clone()));
        }
        match self.decisions.get(at).map_err(storage)? {
            Some(v) => self.keys.decision(event.event_id(), v.value()),
            None => Ok(None),
        }
    }

    fn put_decision(
        &mut self,
        event: &Touchpoint,
        resolution: &Resolution,
    ) -> Result<(), StoreError> {
        self.new_decisions
            .insert(decision_key(event), (event.event_id(), resolution.clone()));
        Ok(())
    }
}

/// A read-only graph over committed data.
struct ReadGraph<'a> {
    db: &'a Database,
    keys: &'a BlockingKeys,
}

impl GraphRead for ReadGraph<'_> {
    type Error = StoreError;

    fn claim(&self, id: &Identifier) -> Result<Option<Claim>, StoreError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let table = tx.open_table(CLAIMS).map_err(storage)?;
        let k = claim_key(self.keys.hasher().as_ref(), id);
        match table.get(k.as_str()).map_err(storage)? {
            Some(v) => Ok(Some(from_json("claim", v.value())?)),
            None => Ok(None),
        }
    }

    fn node(&self, customer: CustomerId) -> Result<Option<CustomerNode>, StoreError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let table = tx.open_table(CUSTOMERS).map_err(storage)?;
        match table.get(key(customer)).map_err(storage)? {
            Some(v) => self.keys.node(customer, v.value()),
            None => Ok(None),
        }
    }

    /// Follows redirects without opening nodes, in one read transaction.
    fn root(&self, customer: CustomerId) -> Result<CustomerId, StoreError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let table = tx.open_table(CUSTOMERS).map_err(storage)?;
        redirect::follow(customer, |c| stored_link(&table, c))
    }
}

#[async_trait]
impl IdentityStore for EmbeddedStore {
    async fn resolve(
        &self,
        events: &[Touchpoint],
        rules: &IdentityRules,
    ) -> Result<Vec<Resolution>, StoreError> {
        let events = events.to_vec();
        let rules = rules.clone();
        let keys = self.graph_keys()?;
        self.on_graph(move |db| {
            let mut tx = begin_write(db)?;
            tx.set_durability(Durability::Immediate).map_err(storage)?;
            let mut out = Vec::with_capacity(events.len());
            {
                let mut graph = TxGraph::open(&tx, &keys)?;
                for event in &events {
                    out.push(identity::resolve_once(&mut graph, &rules, event)?);
                }
                graph.finish()?;
            }
            tx.commit().map_err(storage)?;
            Ok(out)
        })
        .await
    }

    /// The domain's walk over one blocking read (the provided method would
    /// hop between threads once per redirect).
    async fn owner(&self, id: &Identifier) -> Result<Option<CustomerId>, StoreError> {
        let id = id.clone();
        let keys = self.graph_keys()?;
        self.on_graph(move |db| ReadGraph { db, keys: &keys }.owner(&id))
            .await
    }

    async fn root(&self, customer: CustomerId) -> Result<CustomerId, StoreError> {
        let keys = self.graph_keys()?;
        self.on_graph(move |db| ReadGraph { db, keys: &keys }.root(customer))
            .await
    }

    async fn customer(&self, customer: CustomerId) -> Result<Option<CustomerNode>, StoreError> {
        let keys = self.graph_keys()?;
        self.on_graph(move |db| ReadGraph { db, keys: &keys }.node(customer))
            .await
    }

    /// Every walk in one read transaction, reading only where each node
    /// points.
    async fn roots(&self, customers: &[CustomerId]) -> Result<Vec<CustomerId>, StoreError> {
        let customers = customers.to_vec();
        self.on_graph(move |db| {
            let tx = db.begin_read().map_err(storage)?;
            let table = tx.open_table(CUSTOMERS).map_err(storage)?;
            customers
                .into_iter()
                .map(|customer| redirect::follow(customer, |c| stored_link(&table, c)))
                .collect()
        })
        .await
    }

    async fn claims(&self, ids: &[Identifier]) -> Result<Vec<Option<Claim>>, StoreError> {
        let ids = ids.to_vec();
        let keys = self.graph_keys()?;
        self.on_graph(move |db| {
            let graph = ReadGraph { db, keys: &keys };
            ids.iter().map(|id| graph.claim(id)).collect()
        })
        .await
    }

    async fn erase_graph(
        &self,
        customers: &[CustomerId],
        identifiers: &[Identifier],
        events: &[EventId],
    ) -> Result<(), StoreError> {
        let customers: Vec<u128> = customers.iter().map(|c| key(*c)).collect();
        // Filed hashed, or in clear by a store from before sealing.
        let hasher = self.seal.hasher();
        let claims: Vec<String> = identifiers
            .iter()
            .flat_map(|id| [id.key(), claim_key(hasher, id)])
            .collect();
        let events: std::collections::HashSet<u128> =
            events.iter().map(|e| e.0.as_u128()).collect();
        self.on_graph(move |db| {
            let mut tx = begin_write(db)?;
            tx.set_durability(Durability::Immediate).map_err(storage)?;
            {
                let mut table = tx.open_table(CUSTOMERS).map_err(storage)?;
                for c in &customers {
                    table.remove(*c).map_err(storage)?;
                }
                let mut table = tx.open_table(CLAIMS).map_err(storage)?;
                for id in &claims {
                    table.remove(id.as_str()).map_err(storage)?;
                }
                // Decisions are filed by arrival: found by a scan (erasures
                // are rare; the scan reads keys only).
                if !events.is_empty() {
                    let mut table = tx.open_table(DECISIONS).map_err(storage)?;
                    table
                        .retain(|(_, event), _| !events.contains(&event))
                        .map_err(storage)?;
                }
            }
            tx.commit().map_err(storage)
        })
        .await
    }

    async fn decision(&self, event: &Touchpoint) -> Result<Option<Resolution>, StoreError> {
        let at = decision_key(event);
        let id = event.event_id();
        let keys = self.graph_keys()?;
        self.on_graph(move |db| {
            let tx = db.begin_read().map_err(storage)?;
            let table = tx.open_table(DECISIONS).map_err(storage)?;
            match table.get(at).map_err(storage)? {
                Some(v) => keys.decision(id, v.value()),
                None => Ok(None),
            }
        })
        .await
    }
}

/// Profiles over the table of one write transaction, opened and sealed
/// with the keys fetched for it; rows whose key was not fetched are read
/// as absent and recorded in `missing` (the transaction is then dropped
/// and run again with them).
struct TxProfiles<'t, 'k> {
    profiles: Table<'t, u128, &'static [u8]>,
    /// The audience timers and segment members, moved with the rows
    /// written.
    due: Table<'t, (i64, u128), ()>,
    members: Table<'t, (&'static str, i64, u128), ()>,
    /// Each row's audience index as first read in this transaction.
    indexed: std::collections::HashMap<CustomerId, AudienceIndex>,
    keys: &'k ViewKeys,
    missing: std::collections::BTreeSet<CustomerId>,
    /// The search terms of each live profile as the current event's fold
    /// first loaded it: the event indexes only terms new to its customer.
    terms_before: std::collections::HashMap<CustomerId, std::collections::BTreeSet<String>>,
    /// Slots read or saved in this transaction (`true`: saved, to write):
    /// a profile is opened once per batch, and sealed and written once
    /// ([`write_back`](Self::write_back)), however many of its events the
    /// batch folds.
    slots: std::collections::HashMap<CustomerId, (Option<ProfileSlot>, bool)>,
}

impl<'t> TxProfiles<'t, '_> {
    fn open(
        tx: &'t redb::WriteTransaction,
        keys: &'t ViewKeys,
    ) -> Result<TxProfiles<'t, 't>, StoreError> {
        Ok(TxProfiles {
            profiles: tx.open_table(PROFILES).map_err(storage)?,
            due: tx.open_table(AUDIENCE_DUE).map_err(storage)?,
            members: tx.open_table(SEGMENT_MEMBERS).map_err(storage)?,
            indexed: std::collections::HashMap::new(),
            keys,
            missing: Unfetched::new(),
            terms_before: std::collections::HashMap::new(),
            slots: std::collections::HashMap::new(),
        })
    }

    /// The audience timer of `customer`'s row as this transaction has it
    /// (`None` for a row it did not read).
    fn due_now(&self, customer: CustomerId) -> Option<i64> {
        self.slots
            .get(&customer)
            .and_then(|(slot, _)| AudienceIndex::of(slot.as_ref()).due)
    }

    /// Opens the rows of `customers` this transaction has not read yet,
    /// on up to four cores (the fold then finds them open): a batch's rows
    /// are read first, their decoding and opening being most of a read's
    /// cost. A row whose key was not fetched is left unread and recorded
    /// in `missing`, as `load` does. The rows are those of
    /// [`batch_customers`], some of which a fold may not open (a merge
    /// whose sides already share a root): a row there that cannot be
    /// opened fails the transaction as it would when folded.
    fn prefetch(
        &mut self,
        customers: &std::collections::BTreeSet<CustomerId>,
    ) -> Result<(), StoreError> {
        let mut stored = Vec::new();
        for customer in customers {
            if self.slots.contains_key(customer) {
                continue;
            }
            let row = self.profiles.get(key(*customer)).map_err(storage)?;
            match row.map(|v| v.value().to_vec()) {
                Some(bytes) => stored.push((*customer, bytes)),
                None => {
                    self.keep(*customer, None);
                }
            }
        }
        let keys = self.keys;
        let opened = parallel_map(&stored, |(customer, bytes)| {
            keys.read_slot(*customer, bytes)
        });
        for ((customer, _), read) in stored.iter().zip(opened) {
            self.keep(*customer, Some(read?));
        }
        Ok(())
    }

    /// Keeps what reading `customer`'s row gave (`None`: there is no row)
    /// as this transaction's slot, with the row's audience index as first
    /// read, and returns the slot; a row whose key was not fetched is
    /// recorded in `missing` and not kept (`None`).
    fn keep(
        &mut self,
        customer: CustomerId,
        read: Option<Read<ProfileSlot>>,
    ) -> Option<&Option<ProfileSlot>> {
        let slot = match read {
            None | Some(Read::Erased) => None,
            Some(Read::Value(slot)) => Some(slot),
            Some(Read::Missing) => {
                self.missing.insert(customer);
                return None;
            }
        };
        self.indexed
            .insert(customer, AudienceIndex::of(slot.as_ref()));
        Some(
            &self
                .slots
                .entry(customer)
                .insert_entry((slot, false))
                .into_mut()
                .0,
        )
    }

    /// Writes every slot saved in this transaction, and moves the audience
    /// timers of the rows written.
    fn write_back(&mut self) -> Result<(), StoreError> {
        // Sealed on up to four cores (JSON, compression and sealing are
        // most of a row's cost), written in order after.
        let dirty: Vec<(CustomerId, &ProfileSlot)> = self
            .slots
            .iter()
            .filter_map(|(customer, (slot, dirty))| match (slot, dirty) {
                (Some(slot), true) => Some((*customer, slot)),
                _ => None,
            })
            .collect();
        let keys = self.keys;
        let sealed = parallel_map(&dirty, |(customer, slot)| keys.write_slot(*customer, slot));
        for ((customer, slot), written) in dirty.iter().zip(sealed) {
            match written? {
                ToWrite::Bytes(bytes) => {
                    self.profiles
                        .insert(key(*customer), bytes.as_slice())
                        .map_err(storage)?;
                    let before = self.indexed.get(customer).cloned().unwrap_or_default();
                    let moves = IndexMoves::between(&before, &AudienceIndex::of(Some(slot)));
                    let k = key(*customer);
                    if let Some(at) = moves.due_removed {
                        self.due.remove((at, k)).map_err(storage)?;
                    }
                    if let Some(at) = moves.due_added {
                        self.due.insert((at, k), ()).map_err(storage)?;
                    }
                    // An entry is keyed by when its membership began: a
                    // membership ended, or begun again, loses the entry of
                    // its old beginning.
                    let began = |segment: &str| before.members.get(segment).copied();
                    let moved = moves.members_added.iter().map(|(segment, _)| segment);
                    for segment in moves.members_removed.iter().chain(moved) {
                        if let Some(since) = began(segment) {
                            self.members
                                .remove((segment.as_str(), since, k))
                                .map_err(storage)?;
                        }
                    }
                    for (segment, since) in &moves.members_added {
                        self.members
                            .insert((segment.as_str(), *since, k), ())
                            .map_err(storage)?;
                    }
                }
                // An erased customer's views are not made again.
                ToWrite::Erased => {}
                ToWrite::Missing => {
                    self.missing.insert(*customer);
                }
            }
        }
        Ok(())
    }
}

impl ProfileAccess for TxProfiles<'_, '_> {
    type Error = StoreError;

    fn load(&mut self, customer: CustomerId) -> Result<Option<ProfileSlot>, StoreError> {
        let slot = match self.slots.get(&customer) {
            Some((slot, _)) => slot.clone(),
            None => {
                let read = match self.profiles.get(key(customer)).map_err(storage)? {
                    None => None,
                    Some(v) => Some(self.keys.read_slot(customer, v.value())?),
                };
                match self.keep(customer, read) {
                    Some(slot) => slot.clone(),
                    None => return Ok(None),
                }
            }
        };
        if let Some(ProfileSlot::Live(p)) = &slot {
            self.terms_before
                .entry(customer)
                .or_insert_with(|| p.search_terms.clone());
        }
        Ok(slot)
    }

    fn save(&mut self, customer: CustomerId, slot: ProfileSlot) -> Result<(), StoreError> {
        self.slots.insert(customer, (Some(slot), true));
        Ok(())
    }

    /// Follows redirects without opening a live profile: redirects are in
    /// clear and a sealed row is always live.
    fn live_root(&mut self, customer: CustomerId) -> Result<CustomerId, StoreError> {
        #[derive(serde::Deserialize)]
        enum Slot {
            Live(serde::de::IgnoredAny),
            MergedInto(CustomerId),
        }
        cdp_domain::redirect::follow(customer, |c| {
            if let Some((slot, _)) = self.slots.get(&c) {
                return Ok(match slot {
                    Some(ProfileSlot::MergedInto(next)) => Some(*next),
                    _ => None,
                });
            }
            let Some(v) = self.profiles.get(key(c)).map_err(storage)? else {
                return Ok(None);
            };
            if crate::sealed::is_sealed(v.value()) {
                return Ok(None);
            }
            Ok(match from_json::<Slot>("profile", v.value())? {
                Slot::Live(_) => None,
                Slot::MergedInto(next) => Some(next),
            })
        })
    }
}

/// A fold that met customers whose keys it had not fetched.
type Unfetched = std::collections::BTreeSet<CustomerId>;

/// `f` over `items`, in order, split over the machine's cores (at most
/// four, one of them the caller's) when there are enough items to be worth
/// a thread: the CPU-heavy steps of a fold transaction (opening and
/// sealing rows) while the transaction itself stays on one thread.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    /// Fewer items than this per thread are done on the caller's.
    const PER_THREAD: usize = 16;
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, 4)
    });
    let threads = cores.min(items.len() / PER_THREAD);
    if threads <= 1 {
        return items.iter().map(&f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let mut chunks = items.chunks(chunk);
        let first = chunks.next().unwrap_or_default();
        let others: Vec<_> = chunks
            .map(|c| scope.spawn(move || c.iter().map(f).collect::<Vec<R>>()))
            .collect();
        let mut out: Vec<R> = first.iter().map(f).collect();
        for other in others {
            match other.join() {
                Ok(part) => out.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

/// The events of `profile`'s timeline and of the customers it absorbed,
/// opened with `keys`; a customer whose key was not fetched goes into
/// `missing` (the caller runs again with it).
fn family_events(
    timeline: &Table<'_, (u128, i64, u128), &'static [u8]>,
    keys: &ViewKeys,
    profile: &cdp_domain::Profile,
    missing: &mut Unfetched,
) -> Result<Vec<Touchpoint>, StoreError> {
    let mut events = Vec::new();
    let family = std::iter::once(profile.customer_id).chain(profile.merged_from.iter().copied());
    for member in family {
        let k = key(member);
        for row in timeline
            .range((k, i64::MIN, 0u128)..=(k, i64::MAX, u128::MAX))
            .map_err(storage)?
        {
            let (at, bytes) = row.map_err(storage)?;
            let kind = RowKind::Timeline(at.value().2);
            match keys.read_json::<TimelineEntry>(member, kind, "timeline entry", bytes.value())? {
                Read::Value(entry) => events.push(entry.touchpoint()),
                Read::Erased => {}
                Read::Missing => {
                    missing.insert(member);
                    break;
                }
            }
        }
    }
    Ok(events)
}

impl EmbeddedStore {
    /// One fold transaction; `durable` false leaves its pages in redb's
    /// write buffer until a durable commit (see `ProfileStore::sync`).
    async fn fold(
        &self,
        batch: &[ResolvedTouchpoint],
        options: &FoldOptions,
        durable: bool,
    ) -> Result<Applied, StoreError> {
        let batch = Arc::new(batch.to_vec());
        let options = Arc::new(options.clone());
        let customers = batch_customers(&batch);
        self.with_keys(customers, durable, move |db, keys| {
            Self::fold_tx(db, &batch, &options, keys, durable)
        })
        .await
    }

    /// Runs `tx` with the keys of `customers`, and again with the keys of
    /// the customers it met but had not fetched.
    async fn with_keys(
        &self,
        customers: std::collections::BTreeSet<CustomerId>,
        durable: bool,
        tx: impl Fn(&Database, &ViewKeys) -> Result<Result<Applied, Unfetched>, StoreError>
        + Send
        + Sync
        + 'static,
    ) -> Result<Applied, StoreError> {
        let tx = Arc::new(tx);
        let mut keys = self.seal.obtain(customers).await?;
        for _ in 0..KEY_ROUNDS {
            if durable {
                // The keys before the rows sealed with them.
                self.seal.flush().await?;
            }
            let (run, k) = (Arc::clone(&tx), keys.clone());
            let outcome = self.on_views(move |db| run(db, &k)).await?;
            match outcome {
                Ok(applied) => return Ok(applied),
                Err(unfetched) => self.seal.obtain_missing(&mut keys, unfetched).await?,
            }
        }
        Err(StoreError::Storage(format!(
            "a fold kept meeting customers whose keys it had not fetched, after {KEY_ROUNDS} rounds"
        )))
    }

    /// One transaction of audience refreshes: the timers `due` (each with
    /// the instant its entry was filed under) or the rows of a backfill
    /// page (see [`ProfileStore::expire_audiences`] and
    /// [`ProfileStore::backfill_audiences`]). A customer whose row cannot
    /// be read is logged and left out; the others go on.
    fn refresh_tx(
        db: &Database,
        due: &[(Option<i64>, CustomerId)],
        why: Refresh,
        options: &FoldOptions,
        keys: &ViewKeys,
    ) -> Result<Result<Applied, Unfetched>, StoreError> {
        let mut tx = begin_write(db)?;
        tx.set_durability(Durability::None).map_err(storage)?;
        let mut applied = Applied::default();
        {
            let mut access = TxProfiles::open(&tx, keys)?;
            let timeline = tx.open_table(TIMELINE).map_err(storage)?;
            let mut failed = std::collections::BTreeSet::new();
            for (_, customer) in due {
                let mut missing = Unfetched::new();
                let outcome = access.load(*customer).and_then(|slot| {
                    let Some(ProfileSlot::Live(mut profile)) = slot else {
                        return Ok(None);
                    };
                    let (changed, changes) = refresh_audience(&mut profile, options, why, |p| {
                        family_events(&timeline, keys, p, &mut missing)
                    })?;
                    Ok(Some((profile, changed, changes)))
                });
                match outcome {
                    Err(error) => {
                        tracing::warn!(%customer, %error, "an audience not refreshed");
                        applied.failed += 1;
                        failed.insert(*customer);
                    }
                    // Done again with the keys it met.
                    Ok(_) if !missing.is_empty() => access.missing.extend(missing),
                    Ok(None) => {}
                    Ok(Some((profile, changed, changes))) => {
                        if changed {
                            access.save(*customer, ProfileSlot::Live(profile))?;
                        }
                        if !changes.is_empty() && !keys.erased(*customer) {
                            applied.customers.push(*customer);
                            applied
                                .changes
                                .extend(changes.into_iter().map(|c| (*customer, c)));
                        }
                    }
                }
            }
            access.write_back()?;
            if !access.missing.is_empty() {
                return Ok(Err(access.missing));
            }
            // The timer entries read: one whose row could not be read waits
            // a while (out of the others' way); otherwise the row's own
            // timer is what stays filed.
            let retry = options
                .audiences
                .now
                .saturating_add(crate::AUDIENCE_RETRY_MS);
            for (at, customer) in due {
                let Some(at) = at else { continue };
                let k = key(*customer);
                let keep = if failed.contains(customer) {
                    Some(retry)
                } else {
                    access.due_now(*customer)
                };
                if keep != Some(*at) {
                    access.due.remove((*at, k)).map_err(storage)?;
                    if let Some(when) = keep {
                        access.due.insert((when, k), ()).map_err(storage)?;
                    }
                }
            }
        }
        tx.commit().map_err(storage)?;
        applied.customers.sort();
        applied.customers.dedup();
        Ok(Ok(applied))
    }

    fn fold_tx(
        db: &Database,
        batch: &[ResolvedTouchpoint],
        options: &FoldOptions,
        keys: &ViewKeys,
        durable: bool,
    ) -> Result<Result<Applied, Unfetched>, StoreError> {
        let mut tx = begin_write(db)?;
        tx.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(storage)?;
        let mut applied = Applied::default();
        {
            let mut access = TxProfiles::open(&tx, keys)?;
            access.prefetch(&batch_customers(batch))?;
            let mut timeline = tx.open_table(TIMELINE).map_err(storage)?;
            let mut search = tx.open_table(SEARCH).map_err(storage)?;
            // Search entries of the terms new to their customer.
            let mut index: Vec<(String, u128)> = Vec::new();
            for resolved in batch {
                access.terms_before.clear();
                let folded = fold_resolved(&mut access, resolved, options)?;
                applied
                    .changes
                    .extend(folded.changes.into_iter().filter(|(c, _)| !keys.erased(*c)));
                if let Some(entry) = folded.timeline {
                    let customer = key(entry.customer_id);
                    let event = entry.event_id.0.as_u128();
                    match keys.write_json(entry.customer_id, RowKind::Timeline(event), &entry)? {
                        ToWrite::Bytes(bytes) => {
                            timeline
                                .insert((customer, entry.occurred_at, event), bytes.as_slice())
                                .map_err(storage)?;
                            let known = access.terms_before.get(&entry.customer_id);
                            for term in cdp_domain::search::terms(&resolved.touchpoint) {
                                if !known.is_some_and(|k| k.contains(&term)) {
                                    for e in crate::sealed::index_entries(keys.hasher(), &term) {
                                        index.push((e, customer));
                                    }
                                }
                            }
                            applied.new_events += 1;
                            applied.customers.push(entry.customer_id);
                        }
                        // An erased customer's views are not made again.
                        ToWrite::Erased => {}
                        ToWrite::Missing => {
                            access.missing.insert(entry.customer_id);
                        }
                    }
                }
                for merge in &resolved.merges {
                    applied.customers.push(access.live_root(merge.survivor)?);
                }
            }
            access.write_back()?;
            if !access.missing.is_empty() {
                // Dropped uncommitted: nothing of this attempt is kept.
                return Ok(Err(access.missing));
            }
            // In key order: entries that share a page are written together.
            index.sort_unstable();
            index.dedup();
            for (entry, customer) in &index {
                search
                    .insert((entry.as_str(), *customer), ())
                    .map_err(storage)?;
            }
        }
        tx.commit().map_err(storage)?;
        applied.customers.sort();
        applied.customers.dedup();
        Ok(Ok(applied))
    }
}

#[async_trait]
impl ProfileStore for EmbeddedStore {
    async fn apply(
        &self,
        batch: &[ResolvedTouchpoint],
        options: &FoldOptions,
    ) -> Result<Applied, StoreError> {
        self.fold(batch, options, true).await
    }

    async fn apply_unsynced(
        &self,
        batch: &[ResolvedTouchpoint],
        options: &FoldOptions,
    ) -> Result<Applied, StoreError> {
        self.fold(batch, options, false).await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        // The keys before the rows sealed with them.
        self.seal.flush().await?;
        // A durable commit persists every non-durable one before it.
        self.on_views(|db| {
            let mut tx = begin_write(db)?;
            tx.set_durability(Durability::Immediate).map_err(storage)?;
            tx.commit().map_err(storage)
        })
        .await
    }

    async fn due_audiences(
        &self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<(i64, CustomerId)>, StoreError> {
        self.on_views(move |db| {
            let tx = db.begin_read().map_err(storage)?;
            let table = tx.open_table(AUDIENCE_DUE).map_err(storage)?;
            let mut out = Vec::new();
            for entry in table.range(..=(now, u128::MAX)).map_err(storage)? {
                if out.len() >= limit {
                    break;
                }
                let (k, _) = entry.map_err(storage)?;
                let (at, customer) = k.value();
                out.push((at, CustomerId(uuid::Uuid::from_u128(customer))));
            }
            Ok(out)
        })
        .await
    }

    async fn expire_audiences(
        &self,
        due: &[(i64, CustomerId)],
        options: &FoldOptions,
    ) -> Result<Applied, StoreError> {
        if due.is_empty() || options.audiences.definitions.is_none() {
            return Ok(Applied::default());
        }
        let customers = due.iter().map(|(_, c)| *c).collect();
        let due: Arc<Vec<(Option<i64>, CustomerId)>> =
            Arc::new(due.iter().map(|(at, c)| (Some(*at), *c)).collect());
        let options = Arc::new(options.clone());
        self.with_keys(customers, false, move |db, keys| {
            Self::refresh_tx(db, &due, Refresh::Timer, &options, keys)
        })
        .await
    }

    async fn scan_customers(
        &self,
        from: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<CustomerId>, Option<String>), StoreError> {
        let start = match from {
            None => 0u128,
            Some(cursor) => match cursor
                .parse::<uuid::Uuid>()
                .map_err(|e| StoreError::Invalid(format!("profile cursor {cursor:?}: {e}")))?
                .as_u128()
                .checked_add(1)
            {
                Some(start) => start,
                None => return Ok((Vec::new(), None)),
            },
        };
        let rows: Vec<u128> = self
            .on_views(move |db| {
                let tx = db.begin_read().map_err(storage)?;
                let table = tx.open_table(PROFILES).map_err(storage)?;
                let mut rows = Vec::new();
                for row in table.range(start..).map_err(storage)? {
                    if rows.len() >= limit {
                        break;
                    }
                    rows.push(row.map_err(storage)?.0.value());
                }
                Ok(rows)
            })
            .await?;
        let next = (rows.len() >= limit.max(1))
            .then(|| rows.last().map(|k| uuid::Uuid::from_u128(*k).to_string()))
            .flatten();
        let customers = rows
            .into_iter()
            .map(|k| CustomerId(uuid::Uuid::from_u128(k)))
            .collect();
        Ok((customers, next))
    }

    async fn backfill_audiences(
        &self,
        from: Option<&str>,
        limit: usize,
        options: &FoldOptions,
    ) -> Result<BackfillPage, StoreError> {
        let (customers, next) = self.scan_customers(from, limit).await?;
        let scanned = customers.len();
        let applied = if customers.is_empty() || options.audiences.definitions.is_none() {
            Applied::default()
        } else {
            let wanted = customers.iter().copied().collect();
            let rows: Arc<Vec<(Option<i64>, CustomerId)>> =
                Arc::new(customers.into_iter().map(|c| (None, c)).collect());
            let options = Arc::new(options.clone());
            self.with_keys(wanted, false, move |db, keys| {
                Self::refresh_tx(db, &rows, Refresh::Backfill, &options, keys)
            })
            .await?
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
        // The cursor: `<since>/<customer>` of the last entry read.
        let start = match from {
            None => (i64::MIN, 0u128),
            Some(cursor) => {
                let bad =
                    |why: String| StoreError::Invalid(format!("members cursor {cursor:?}: {why}"));
                let (since, customer) = cursor
                    .split_once('/')
                    .ok_or_else(|| bad("no `/` between instant and customer".into()))?;
                let since: i64 = since.parse().map_err(|e| bad(format!("{e}")))?;
                let customer = customer
                    .parse::<uuid::Uuid>()
                    .map_err(|e| bad(format!("{e}")))?
                    .as_u128();
                match customer.checked_add(1) {
                    Some(next) => (since, next),
                    None => match since.checked_add(1) {
                        Some(next) => (next, 0),
                        None => return Ok(MembersPage::default()),
                    },
                }
            }
        };
        let segment = segment.to_owned();
        // Stale entries are skipped, but not without end: a page reads at
        // most this many.
        let scan = limit.saturating_mul(4).max(64);
        self.on_views(move |db| {
            let tx = db.begin_read().map_err(storage)?;
            let index = tx.open_table(SEGMENT_MEMBERS).map_err(storage)?;
            let profiles = tx.open_table(PROFILES).map_err(storage)?;
            let mut page = MembersPage::default();
            let (mut read, mut last) = (0usize, None);
            let name = segment.as_str();
            let range = (name, start.0, start.1)..=(name, i64::MAX, u128::MAX);
            for entry in index.range(range).map_err(storage)? {
                if page.members.len() >= limit || read >= scan {
                    page.next = last.map(|(since, customer)| {
                        format!("{since}/{}", uuid::Uuid::from_u128(customer))
                    });
                    break;
                }
                let (k, _) = entry.map_err(storage)?;
                let (_, since, customer) = k.value();
                read += 1;
                last = Some((since, customer));
                // The row is gone (erased): not a member any more.
                if profiles.get(customer).map_err(storage)?.is_some() {
                    page.members
                        .push((CustomerId(uuid::Uuid::from_u128(customer)), since));
                }
            }
            Ok(page)
        })
        .await
    }

    async fn erase_views(
        &self,
        customers: &[CustomerId],
        terms: &[String],
    ) -> Result<(), StoreError> {
        let customers: Vec<u128> = customers.iter().map(|c| key(*c)).collect();
        let terms = crate::sealed::erased_entries(self.seal.hasher(), terms);
        self.on_views(move |db| {
            let mut tx = begin_write(db)?;
            tx.set_durability(Durability::Immediate).map_err(storage)?;
            {
                let mut profiles = tx.open_table(PROFILES).map_err(storage)?;
                let mut timeline = tx.open_table(TIMELINE).map_err(storage)?;
                let mut search = tx.open_table(SEARCH).map_err(storage)?;
                for c in &customers {
                    profiles.remove(*c).map_err(storage)?;
                    timeline
                        .retain_in((*c, i64::MIN, 0u128)..=(*c, i64::MAX, u128::MAX), |_, _| {
                            false
                        })
                        .map_err(storage)?;
                    for term in &terms {
                        search.remove((term.as_str(), *c)).map_err(storage)?;
                    }
                }
            }
            tx.commit().map_err(storage)
        })
        .await
    }

    async fn row(&self, customer: CustomerId) -> Result<Option<ProfileRow>, StoreError> {
        let bytes = self
            .on_views(move |db| {
                let tx = db.begin_read().map_err(storage)?;
                let table = tx.open_table(PROFILES).map_err(storage)?;
                Ok(table
                    .get(key(customer))
                    .map_err(storage)?
                    .map(|v| v.value().to_vec()))
            })
            .await?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let keys = if crate::sealed::is_sealed(&bytes) {
            self.seal.keys([customer]).await?
        } else {
            ViewKeys::clear()
        };
        match keys.read_slot(customer, &bytes)? {
            Read::Value(slot) => Ok(Some(ProfileRow {
                slot,
                // One transaction per fold: a merge is never left half done.
                pending: None,
            })),
            Read::Erased => Ok(None),
            Read::Missing => Err(crate::sealed::unfetched(customer)),
        }
    }

    /// Reads only the consent of the profile rows on the way (the rest of
    /// the JSON is skipped, not built), for every customer in one read
    /// transaction: a replay decides consent per customer. One transaction
    /// per fold, so no merge is left pending here.
    async fn consents(
        &self,
        customers: &[CustomerId],
    ) -> Result<Vec<Option<crate::ConsentMap>>, StoreError> {
        #[derive(serde::Deserialize)]
        struct Consent {
            #[serde(default)]
            consent: crate::ConsentMap,
        }
        #[derive(serde::Deserialize)]
        enum Slot {
            Live(Consent),
            MergedInto(CustomerId),
        }
        /// Where a walk ended: a consent read in clear, or a sealed live
        /// profile to open.
        enum Found {
            Clear(crate::ConsentMap),
            Sealed(CustomerId, Vec<u8>),
        }
        let customers = customers.to_vec();
        let found = self
            .on_views(move |db| {
                let tx = db.begin_read().map_err(storage)?;
                let table = tx.open_table(PROFILES).map_err(storage)?;
                let mut out = Vec::with_capacity(customers.len());
                for customer in customers {
                    let mut walk = cdp_domain::redirect::Walk::new(customer);
                    let found = loop {
                        let Some(v) = table.get(key(walk.at())).map_err(storage)? else {
                            break None;
                        };
                        // Redirects are in clear: a sealed row is live.
                        if crate::sealed::is_sealed(v.value()) {
                            break Some(Found::Sealed(walk.at(), v.value().to_vec()));
                        }
                        match from_json::<Slot>("profile", v.value())? {
                            Slot::Live(c) => break Some(Found::Clear(c.consent)),
                            Slot::MergedInto(next) => walk.hop(next)?,
                        }
                    };
                    out.push(found);
                }
                Ok(out)
            })
            .await?;
        let sealed = found.iter().filter_map(|f| match f {
            Some(Found::Sealed(c, _)) => Some(*c),
            _ => None,
        });
        let keys = self.seal.keys(sealed).await?;
        found
            .into_iter()
            .map(|f| match f {
                None => Ok(None),
                Some(Found::Clear(c)) => Ok(Some(c)),
                Some(Found::Sealed(customer, bytes)) => {
                    match keys.read_json::<Slot>(customer, RowKind::Profile, "profile", &bytes)? {
                        Read::Value(Slot::Live(c)) => Ok(Some(c.consent)),
                        Read::Value(Slot::MergedInto(_)) | Read::Erased | Read::Missing => Ok(None),
                    }
                }
            })
            .collect()
    }

    async fn consent(&self, customer: CustomerId) -> Result<Option<crate::ConsentMap>, StoreError> {
        Ok(self.consents(&[customer]).await?.pop().flatten())
    }

    async fn timeline_range(
        &self,
        customer: CustomerId,
        query: &TimelineQuery,
    ) -> Result<Vec<TimelineEntry>, StoreError> {
        let query = query.clone();
        let keys = self.seal.keys([customer]).await?;
        self.on_views(move |db| {
            let tx = db.begin_read().map_err(storage)?;
            let table = tx.open_table(TIMELINE).map_err(storage)?;
            let (c, (lower, upper)) = (key(customer), query.range());
            let mut found = Vec::new();
            for item in table
                .range((c, lower, 0u128)..(c, upper, 0u128))
                .map_err(storage)?
                .rev()
            {
                let (k, v) = item.map_err(storage)?;
                let (_, _, event) = k.value();
                let entry: TimelineEntry = match keys.read_json(
                    customer,
                    RowKind::Timeline(event),
                    "timeline entry",
                    v.value(),
                )? {
                    Read::Value(entry) => entry,
                    // An erased customer has no timeline.
                    Read::Erased | Read::Missing => return Ok(Vec::new()),
                };
                if query.matches(&entry) {
                    found.push(entry);
                    if found.len() >= query.limit {
                        break;
                    }
                }
            }
            Ok(found)
        })
        .await
    }

    async fn search_range(&self, prefix: &str, scan: usize) -> Result<Vec<CustomerId>, StoreError> {
        let entries = self.seal.query_entries(prefix);
        self.on_views(move |db| {
            let tx = db.begin_read().map_err(storage)?;
            let table = tx.open_table(SEARCH).map_err(storage)?;
            let mut found = Vec::new();
            for prefix in &entries {
                for item in table
                    .range((prefix.as_str(), 0u128)..)
                    .map_err(storage)?
                    .take(scan)
                {
                    let (k, _) = item.map_err(storage)?;
                    let (term, customer) = k.value();
                    if !term.starts_with(prefix.as_str()) {
                        break;
                    }
                    let customer = CustomerId(uuid::Uuid::from_u128(customer));
                    if !found.contains(&customer) {
                        found.push(customer);
                    }
                }
            }
            Ok(found)
        })
        .await
    }
}
