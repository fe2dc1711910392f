//! The store conformance suites, and races between several clients, against
//! a real CQL server (Apache Cassandra standing in for ScyllaDB) at
//! `CDP_CQL_ADDR` (default `127.0.0.1:9042`). Each test works in a fresh
//! keyspace and drops it at the end. These tests need the server, so they
//! are ignored by a plain `cargo test`; `make test` starts Cassandra and runs
//! them with `--include-ignored`, and an unreachable server fails them.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use cdp_domain::identity::{Claim, CustomerNode, Merge, MergeCause};
use cdp_domain::profile::FoldOptions;
use cdp_domain::{
    Attributes, Channel, CustomerId, Envelope, EventId, EventType, IdKind, Identifier,
    IdentityRules, IdentityRulesConfig, Personal, Resolution, ResolvedTouchpoint, TimelineEntry,
    Touchpoint,
};
use cdp_scylla::{ScyllaConfig, ScyllaGenerations, ScyllaStore};
use cdp_store::conformance::StoresUnderTest;
use cdp_store::{
    Applied, Generations, IdentityStore, Keyring, ProfileRow, ProfileStore, StoreError,
    TimelineQuery, ViewSeal,
};
use serde_json::json;
use uuid::Uuid;

const NEEDS_CASSANDRA: &str = "needs a CQL server on 127.0.0.1:9042: `make test` starts Cassandra";

fn cql_addr() -> String {
    std::env::var("CDP_CQL_ADDR").unwrap_or_else(|_| "127.0.0.1:9042".into())
}

fn test_config() -> ScyllaConfig {
    let suffix = Uuid::new_v4().simple().to_string();
    ScyllaConfig {
        nodes: vec![cql_addr()],
        keyspace: format!("cdp_test_{}", &suffix[..16]),
        ..ScyllaConfig::default()
    }
}

/// `clients` stores (separate sessions, as separate processes would have)
/// on a fresh keyspace; fails when the server cannot be reached.
async fn connect(config: &ScyllaConfig, clients: usize) -> Vec<ScyllaStore> {
    let mut stores = Vec::with_capacity(clients);
    for _ in 0..clients {
        stores.push(ScyllaStore::connect(config).await.unwrap_or_else(|e| {
            panic!(
                "cannot connect to a CQL server at {} ({e}); {NEEDS_CASSANDRA}",
                cql_addr()
            )
        }));
    }
    stores
}

/// Runs `body` with `clients` stores on a fresh keyspace, and drops the
/// keyspace afterwards even when the body panics.
async fn with_keyspace<F, Fut>(clients: usize, body: F)
where
    F: FnOnce(Vec<ScyllaStore>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let stores = connect(&test_config(), clients).await;
    let first = stores[0].clone();
    let outcome = tokio::spawn(body(stores)).await;
    first
        .drop_keyspace()
        .await
        .expect("the test keyspace is dropped");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// The keyspace the conformance cases of one fixture share in this test
/// process: creating and dropping a keyspace takes seconds on Cassandra,
/// and the cases keep their data apart (every key carries the case's name).
/// It is named after the process and lives until the server's data is
/// cleared (`make infra-down`). Cases that switch generations (which
/// truncates the base keyspace) get a keyspace of their own.
async fn shared_keyspace(
    cell: &'static tokio::sync::OnceCell<ScyllaConfig>,
    tag: &str,
) -> ScyllaConfig {
    cell.get_or_init(|| async {
        let config = ScyllaConfig {
            keyspace: format!("cdp_test_shared_{tag}_{}", std::process::id()),
            ..test_config()
        };
        // Created (schema applied) once, by a session that goes with this
        // case's runtime; every case connects its own.
        connect(&config, 1).await;
        config
    })
    .await
    .clone()
}

/// The generations of one case, in a keyspace of their own (dropped by
/// `close`).
async fn own_generations(own: &std::sync::Mutex<Option<ScyllaConfig>>) -> Arc<dyn Generations> {
    let config = test_config();
    let base = connect(&config, 1).await.remove(0);
    if let Ok(mut own) = own.lock() {
        *own = Some(config.clone());
    }
    Arc::new(
        ScyllaGenerations::with_base(&config, base)
            .await
            .expect("generations on the test keyspace"),
    )
}

async fn drop_own_generations(own: &std::sync::Mutex<Option<ScyllaConfig>>) {
    let config = own.lock().ok().and_then(|mut c| c.take());
    if let Some(config) = config {
        drop_generations(&config).await;
        if let Ok(store) = ScyllaStore::connect(&config).await {
            store
                .drop_keyspace()
                .await
                .expect("the test keyspace is dropped");
        }
    }
}

/// The master key of this test process: the shared keyspaces' hash secret
/// is wrapped by it once and read by every case.
static MASTER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `store` sealing its views under keys from a keyring on its keyspace (as
/// a process of its own would: keys cached for no time).
async fn sealed(store: ScyllaStore) -> (ScyllaStore, Arc<Keyring>) {
    let text = MASTER.get_or_init(|| cdp_seal::MasterKeys::generate_file().expect("a master key"));
    let master = cdp_seal::MasterKeys::parse(text).expect("the master key reads");
    let rows = cdp_scylla::ScyllaKeyRows::new(&store)
        .await
        .expect("the keyring's tables");
    let keyring = Arc::new(
        Keyring::open(Arc::new(rows), master, std::time::Duration::ZERO, 1024)
            .await
            .expect("the keyring"),
    );
    (
        store.with_seal(ViewSeal::new(Arc::clone(&keyring))),
        keyring,
    )
}

static ONE_CLIENT: tokio::sync::OnceCell<ScyllaConfig> = tokio::sync::OnceCell::const_new();
static THREE_CLIENTS: tokio::sync::OnceCell<ScyllaConfig> = tokio::sync::OnceCell::const_new();

/// One client, as the conformance suites run it.
struct OneClient {
    store: ScyllaStore,
    keyring: Arc<Keyring>,
    generations: std::sync::Mutex<Option<ScyllaConfig>>,
}

#[async_trait]
impl StoresUnderTest for OneClient {
    async fn open() -> Self {
        let config = shared_keyspace(&ONE_CLIENT, "one").await;
        let (store, keyring) = sealed(connect(&config, 1).await.remove(0)).await;
        OneClient {
            store,
            keyring,
            generations: std::sync::Mutex::new(None),
        }
    }

    fn keyring(&self) -> Arc<Keyring> {
        Arc::clone(&self.keyring)
    }

    fn identity(&self) -> Arc<dyn IdentityStore> {
        Arc::new(self.store.clone())
    }

    fn profiles(&self) -> Arc<dyn ProfileStore> {
        Arc::new(self.store.clone())
    }

    async fn generations(&self) -> Arc<dyn Generations> {
        own_generations(&self.generations).await
    }

    async fn close(&self) {
        drop_own_generations(&self.generations).await;
    }
}

/// Drops the keyspaces of generations a case opened beside `config`'s.
async fn drop_generations(config: &ScyllaConfig) {
    for n in 2..4 {
        let keyspace = format!("{}_g{n}", config.keyspace);
        if let Ok(store) = ScyllaStore::connect(&ScyllaConfig {
            keyspace,
            ..config.clone()
        })
        .await
        {
            let _ = store.drop_keyspace().await;
        }
    }
}

cdp_store::store_test_suite!(cassandra_one_client, OneClient, #[ignore = "needs a CQL server on 127.0.0.1:9042: `make test` starts Cassandra"]);

/// Three clients on one keyspace, calls spread over them, so the suites'
/// races run across separate sessions (and separate identity gates).
struct ThreeClients {
    stores: Arc<RoundRobin>,
    keyring: Arc<Keyring>,
    generations: std::sync::Mutex<Option<ScyllaConfig>>,
}

#[async_trait]
impl StoresUnderTest for ThreeClients {
    async fn open() -> Self {
        let config = shared_keyspace(&THREE_CLIENTS, "three").await;
        let mut stores = Vec::new();
        let mut keyrings = Vec::new();
        for store in connect(&config, 3).await {
            let (store, keyring) = sealed(store).await;
            stores.push(store);
            keyrings.push(keyring);
        }
        ThreeClients {
            stores: Arc::new(RoundRobin::new(stores)),
            keyring: keyrings.remove(0),
            generations: std::sync::Mutex::new(None),
        }
    }

    fn keyring(&self) -> Arc<Keyring> {
        Arc::clone(&self.keyring)
    }

    fn identity(&self) -> Arc<dyn IdentityStore> {
        self.stores.clone()
    }

    fn profiles(&self) -> Arc<dyn ProfileStore> {
        self.stores.clone()
    }

    async fn generations(&self) -> Arc<dyn Generations> {
        own_generations(&self.generations).await
    }

    async fn close(&self) {
        drop_own_generations(&self.generations).await;
    }
}

cdp_store::store_test_suite!(cassandra_three_clients, ThreeClients, #[ignore = "needs a CQL server on 127.0.0.1:9042: `make test` starts Cassandra"]);

/// Spreads calls over several clients.
struct RoundRobin {
    stores: Vec<ScyllaStore>,
    next: AtomicUsize,
}

impl RoundRobin {
    fn new(stores: Vec<ScyllaStore>) -> Self {
        RoundRobin {
            stores,
            next: AtomicUsize::new(0),
        }
    }

    fn pick(&self) -> &ScyllaStore {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        &self.stores[n % self.stores.len()]
    }
}

#[async_trait]
impl IdentityStore for RoundRobin {
    async fn resolve(
        &self,
        events: &[Touchpoint],
        rules: &IdentityRules,
    ) -> Result<Vec<Resolution>, StoreError> {
        self.pick().resolve(events, rules).await
    }

    async fn customer(&self, customer: CustomerId) -> Result<Option<CustomerNode>, StoreError> {
        self.pick().customer(customer).await
    }

    async fn link(&self, customer: CustomerId) -> Result<Option<CustomerId>, StoreError> {
        self.pick().link(customer).await
    }

    async fn claims(&self, ids: &[Identifier]) -> Result<Vec<Option<Claim>>, StoreError> {
        self.pick().claims(ids).await
    }

    async fn decision(&self, event: &Touchpoint) -> Result<Option<Resolution>, StoreError> {
        self.pick().decision(event).await
    }

    async fn erase_graph(
        &self,
        customers: &[CustomerId],
        identifiers: &[Identifier],
        events: &[cdp_domain::EventId],
    ) -> Result<(), StoreError> {
        self.pick()
            .erase_graph(customers, identifiers, events)
            .await
    }
}

#[async_trait]
impl ProfileStore for RoundRobin {
    async fn apply(
        &self,
        batch: &[ResolvedTouchpoint],
        options: &FoldOptions,
    ) -> Result<Applied, StoreError> {
        self.pick().apply(batch, options).await
    }

    async fn apply_unsynced(
        &self,
        batch: &[ResolvedTouchpoint],
        options: &FoldOptions,
    ) -> Result<Applied, StoreError> {
        self.pick().apply_unsynced(batch, options).await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        // Every client's writes, as a sync after folds spread over them.
        for store in &self.stores {
            store.sync().await?;
        }
        Ok(())
    }

    async fn due_audiences(
        &self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<(i64, CustomerId)>, StoreError> {
        self.pick().due_audiences(now, limit).await
    }

    async fn expire_audiences(
        &self,
        due: &[(i64, CustomerId)],
        options: &FoldOptions,
    ) -> Result<Applied, StoreError> {
        self.pick().expire_audiences(due, options).await
    }

    async fn backfill_audiences(
        &self,
        from: Option<&str>,
        limit: usize,
        options: &FoldOptions,
    ) -> Result<cdp_store::BackfillPage, StoreError> {
        self.pick().backfill_audiences(from, limit, options).await
    }

    async fn scan_customers(
        &self,
        from: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<CustomerId>, Option<String>), StoreError> {
        self.pick().scan_customers(from, limit).await
    }

    async fn members(
        &self,
        segment: &str,
        from: Option<&str>,
        limit: usize,
    ) -> Result<cdp_store::MembersPage, StoreError> {
        self.pick().members(segment, from, limit).await
    }

    async fn row(&self, customer: CustomerId) -> Result<Option<ProfileRow>, StoreError> {
        self.pick().row(customer).await
    }

    async fn erase_views(
        &self,
        customers: &[CustomerId],
        terms: &[String],
    ) -> Result<(), StoreError> {
        self.pick().erase_views(customers, terms).await
    }

    async fn timeline_range(
        &self,
        customer: CustomerId,
        query: &TimelineQuery,
    ) -> Result<Vec<TimelineEntry>, StoreError> {
        self.pick().timeline_range(customer, query).await
    }

    async fn search_range(&self, prefix: &str, scan: usize) -> Result<Vec<CustomerId>, StoreError> {
        self.pick().search_range(prefix, scan).await
    }
}

fn event(
    name: &str,
    at: i64,
    event_type: EventType,
    ids: &[Identifier],
    props: serde_json::Value,
) -> Touchpoint {
    let mut identifiers = ids.to_vec();
    identifiers.sort();
    identifiers.dedup();
    Touchpoint {
        envelope: Envelope {
            event_id: EventId(Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())),
            event_type,
            channel: Channel::Web,
            source_id: "cassandra-test".into(),
            occurred_at: at,
            received_at: at,
            properties: props.as_object().cloned().unwrap_or_default(),
        },
        personal: Personal {
            identifiers,
            traits: Attributes::new(),
            ..Personal::default()
        },
    }
}

fn decided(r: &Resolution) -> &cdp_domain::Decision {
    match r {
        Resolution::Resolved(d) => d,
        other => panic!("expected a decision, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a CQL server on 127.0.0.1:9042: `make test` starts Cassandra"]
async fn cassandra_idempotency_index_conforms() {
    with_keyspace(1, |stores| async move {
        cdp_log::conformance::dedupe_index_remembers(&stores[0], "cas").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a CQL server on 127.0.0.1:9042: `make test` starts Cassandra"]
async fn cassandra_keyring_conforms() {
    with_keyspace(1, |stores| async move {
        let rows = cdp_scylla::ScyllaKeyRows::new(&stores[0]).await.unwrap();
        cdp_store::keys::conformance::keyring_creates_erases_and_rotates(std::sync::Arc::new(rows))
            .await;
    })
    .await;
}

/// Several clients resolve overlapping identifiers at once; afterwards the
/// graph is one consistent partition of the identifiers, every claim
/// points (through redirects) at the customer that lists it, and
/// re-resolving any event returns its first decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a CQL server on 127.0.0.1:9042: `make test` starts Cassandra"]
async fn cassandra_identity_graph_stays_consistent_under_races() {
    with_keyspace(3, |stores| async move {
        // Limits high enough that every identifier links and merges happen.
        let mut config = IdentityRulesConfig::default();
        for kind in ["email", "phone"] {
            config.kinds.get_mut(kind).unwrap().limit = 50;
        }
        let rules = IdentityRules::new(config).unwrap();
        let pool: Vec<Identifier> = (0..6)
            .flat_map(|i| {
                [
                    Identifier::new(IdKind::Email, format!("u{i}@race.vn")),
                    Identifier::new(IdKind::Phone, format!("+8491000000{i}")),
                ]
            })
            .collect();
        // Round 0: every worker claims single identifiers (racing for
        // the same ones); round 1: every worker links pairs, which
        // merges customers created by different workers.
        let mut all = Vec::new();
        for round in 0..2usize {
            let mut tasks = Vec::new();
            for (w, store) in stores.iter().enumerate() {
                let store = store.clone();
                let pool = pool.clone();
                let rules = rules.clone();
                tasks.push(tokio::spawn(async move {
                    let mut decided_events = Vec::new();
                    for i in 0..6usize {
                        // Round 0 covers the whole pool; in round 1
                        // the two identifiers differ, so the first link
                        // merges two customers whatever the interleaving.
                        let ids = if round == 0 {
                            vec![pool[(w * 4 + i) % pool.len()].clone()]
                        } else {
                            let a = (w * 5 + i * 7) % pool.len();
                            vec![pool[a].clone(), pool[(a + 1 + w) % pool.len()].clone()]
                        };
                        let e = event(
                            &format!("race-{round}-{w}-{i}"),
                            (10 + round * 1000 + w * 100 + i) as i64,
                            EventType::Identify,
                            &ids,
                            json!({}),
                        );
                        let out = store
                            .resolve(std::slice::from_ref(&e), &rules)
                            .await
                            .unwrap();
                        decided_events.push((e, out[0].clone()));
                    }
                    decided_events
                }));
            }
            for t in tasks {
                all.extend(t.await.unwrap());
            }
        }
        let used: BTreeSet<Identifier> = all
            .iter()
            .flat_map(|(e, _)| e.personal.identifiers.iter().cloned())
            .collect();
        assert!(
            all.iter().any(|(_, r)| !decided(r).merges.is_empty()),
            "no merge happened"
        );
        let store = &stores[0];
        // Live customers own disjoint identifier sets covering the pool.
        let mut owner_of: BTreeMap<Identifier, CustomerId> = BTreeMap::new();
        for id in &used {
            let owner = store
                .owner(id)
                .await
                .unwrap()
                .expect("every identifier is claimed");
            let node = store
                .customer(owner)
                .await
                .unwrap()
                .expect("owner has a node");
            assert!(node.merged_into.is_none(), "owner {owner} is merged away");
            assert!(
                node.identifiers.contains(id),
                "owner {owner} does not list {id}"
            );
            owner_of.insert(id.clone(), owner);
        }
        let roots: BTreeSet<CustomerId> = owner_of.values().copied().collect();
        let mut listed = BTreeSet::new();
        for root in &roots {
            let node = store.customer(*root).await.unwrap().unwrap();
            for id in &node.identifiers {
                assert!(listed.insert(id.clone()), "{id} listed by two customers");
                assert_eq!(owner_of.get(id), Some(root));
            }
        }
        // Every decision's customer now leads to the owner of its claims, and
        // a re-delivery returns the same decision.
        for (e, first) in &all {
            let d = decided(first);
            let root = store.root(d.customer_id).await.unwrap();
            for id in &d.claims {
                assert_eq!(owner_of.get(id), Some(&root));
            }
            let again = stores[1]
                .resolve(std::slice::from_ref(e), &rules)
                .await
                .unwrap();
            assert_eq!(
                &again[0], first,
                "a re-delivered event changed its decision"
            );
        }
    })
    .await;
}

fn points(customer: CustomerId, name: &str, at: i64) -> ResolvedTouchpoint {
    ResolvedTouchpoint {
        customer_id: customer,
        merges: Vec::new(),
        touchpoint: event(
            name,
            at,
            EventType::PointsEarned,
            &[Identifier::new(IdKind::Email, format!("{name}@pts.vn"))],
            json!({"points": 1}),
        ),
    }
}

fn merge(loser: CustomerId, survivor: CustomerId, name: &str, at: i64) -> ResolvedTouchpoint {
    let mut r = points(survivor, name, at);
    r.merges.push(Merge {
        loser,
        survivor,
        at,
        cause: MergeCause {
            event_id: r.touchpoint.event_id(),
            identifier: Identifier::new(IdKind::Email, format!("{name}@pts.vn")),
            rule: "email may merge customers".into(),
        },
    });
    r
}

async fn all_timeline(store: &dyn ProfileStore, customer: CustomerId) -> Vec<EventId> {
    let mut query = TimelineQuery {
        limit: 7,
        ..TimelineQuery::default()
    };
    let mut seen = Vec::new();
    loop {
        let page = store
            .timeline(customer, &query)
            .await
            .expect("a timeline page");
        seen.extend(page.entries.iter().map(|e| e.event_id));
        match page.next {
            Some(next) => query.after = Some(next),
            None => return seen,
        }
    }
}

/// Folds into four customers race with merges of three of them into the
/// fourth, on three clients. Every event is counted exactly once on the
/// survivor, its timeline holds every event once, and replaying every batch
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a CQL server on 127.0.0.1:9042: `make test` starts Cassandra"]
async fn cassandra_profiles_merge_under_concurrent_folds() {
    with_keyspace(3, |stores| async move {
        let c: Vec<CustomerId> = (0..4)
            .map(|i| {
                CustomerId(Uuid::new_v5(
                    &Uuid::NAMESPACE_OID,
                    format!("mc-{i}").as_bytes(),
                ))
            })
            .collect();
        let options = FoldOptions::default();
        let mut batches: Vec<Vec<Vec<ResolvedTouchpoint>>> = Vec::new();
        for w in 0..2usize {
            let mut mine = Vec::new();
            for i in 0..12usize {
                let customer = c[(w + i) % 4];
                let name = format!("fold-{w}-{i}");
                let mut batch = vec![points(customer, &name, (1000 + w * 100 + i) as i64)];
                if i % 3 == 0 {
                    batch.push(points(
                        c[(w + i + 1) % 4],
                        &format!("{name}b"),
                        (2000 + w * 100 + i) as i64,
                    ));
                }
                mine.push(batch);
            }
            batches.push(mine);
        }
        // The merging worker: c1, c2, c3 into c0, interleaved with folds.
        let mut merging = Vec::new();
        for (k, loser) in [c[1], c[2], c[3]].into_iter().enumerate() {
            merging.push(vec![merge(
                loser,
                c[0],
                &format!("merge-{k}"),
                3000 + k as i64,
            )]);
            merging.push(vec![points(loser, &format!("late-{k}"), 4000 + k as i64)]);
        }
        batches.push(merging);
        let total: usize = batches.iter().flatten().map(Vec::len).sum();

        let mut tasks = Vec::new();
        for (w, mine) in batches.iter().cloned().enumerate() {
            let store = stores[w % stores.len()].clone();
            let options = options.clone();
            tasks.push(tokio::spawn(async move {
                let mut new = 0;
                for batch in mine {
                    new += store.apply(&batch, &options).await.unwrap().new_events;
                }
                new
            }));
        }
        let mut new_events = 0;
        for t in tasks {
            new_events += t.await.unwrap();
        }
        assert_eq!(new_events, total, "each event is new exactly once");

        for store in &stores {
            for customer in &c {
                let p = store.profile(*customer).await.unwrap().expect("a profile");
                assert_eq!(p.customer_id, c[0], "every customer leads to the survivor");
                let view = p.view();
                assert_eq!(
                    view.loyalty_points, total as i64,
                    "points lost or counted twice"
                );
                assert_eq!(view.events_count, total as u64);
                assert_eq!(p.merged_from, [c[1], c[2], c[3]].into_iter().collect());
            }
        }
        let timeline = all_timeline(&stores[1], c[2]).await;
        let distinct: BTreeSet<EventId> = timeline.iter().copied().collect();
        assert_eq!(timeline.len(), total, "timeline: {timeline:?}");
        assert_eq!(distinct.len(), total);

        for batch in batches.iter().flatten() {
            let again = stores[2].apply(batch, &options).await.unwrap();
            assert_eq!(again.new_events, 0, "a replay folded an event again");
        }
        let view = stores[0].profile(c[0]).await.unwrap().unwrap().view();
        assert_eq!(view.loyalty_points, total as i64);
    })
    .await;
}

/// `truncate` empties the stores and both work afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a CQL server on 127.0.0.1:9042: `make test` starts Cassandra"]
async fn cassandra_truncate_empties_the_stores() {
    with_keyspace(1, |stores| async move {
        let store = &stores[0];
        let rules = IdentityRules::default();
        let id = Identifier::new(IdKind::Email, "t@trunc.vn");
        let e = event(
            "trunc-1",
            10,
            EventType::Identify,
            std::slice::from_ref(&id),
            json!({}),
        );
        let first = decided(
            &store
                .resolve(std::slice::from_ref(&e), &rules)
                .await
                .unwrap()[0],
        )
        .clone();
        store
            .apply(
                &[points(first.customer_id, "trunc-p", 10)],
                &FoldOptions::default(),
            )
            .await
            .unwrap();
        store.truncate().await.unwrap();
        assert_eq!(store.owner(&id).await.unwrap(), None);
        assert_eq!(store.profile(first.customer_id).await.unwrap(), None);
        assert!(
            store
                .search(&cdp_domain::search::query_prefixes("trunc-p@pts"), 10)
                .await
                .unwrap()
                .is_empty()
        );
        // Rebuilding gives the same decision, visible again.
        let again = decided(
            &store
                .resolve(std::slice::from_ref(&e), &rules)
                .await
                .unwrap()[0],
        )
        .clone();
        assert_eq!(again, first);
        assert_eq!(store.owner(&id).await.unwrap(), Some(first.customer_id));
        let applied = store
            .apply(
                &[points(first.customer_id, "trunc-p", 10)],
                &FoldOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(applied.new_events, 1);
    })
    .await;
}

/// A second client (another process) sees a switch made by the first, and
/// a generation's keyspace goes with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a CQL server on 127.0.0.1:9042: `make test` starts Cassandra"]
async fn cassandra_generations_are_shared_by_every_client() {
    with_keyspace(1, |stores| async move {
        let base = stores[0].clone();
        let config = ScyllaConfig {
            nodes: vec![cql_addr()],
            keyspace: base.keyspace().to_owned(),
            ..ScyllaConfig::default()
        };
        let generations = ScyllaGenerations::with_base(&config, base).await.unwrap();
        generations.open(2).await.unwrap();
        generations.activate(2).await.unwrap();
        let other = ScyllaGenerations::connect(&config).await.unwrap();
        assert_eq!(other.active().await.unwrap(), 2);
        generations.open(3).await.unwrap();
        generations.activate(3).await.unwrap();
        generations.drop_generation(2).await.unwrap();
        generations.drop_generation(1).await.unwrap();
        let ids: Vec<u32> = other.list().await.unwrap().iter().map(|g| g.id).collect();
        assert_eq!(ids, vec![3]);
        let g3 = ScyllaStore::connect(&ScyllaConfig {
            keyspace: format!("{}_g3", config.keyspace),
            ..config.clone()
        })
        .await
        .unwrap();
        g3.drop_keyspace().await.unwrap();
    })
    .await;
}
