//! The store conformance suites on the embedded store, plus what only the
//! embedded store promises (durability across a reopen, old layouts).

use std::sync::Arc;

use async_trait::async_trait;
use cdp_store::conformance::{self, StoresUnderTest};
use cdp_store::{EmbeddedStore, Generations, IdentityStore, Keyring, ProfileStore, ViewSeal};

/// A fresh embedded store in a temporary directory; its generations in
/// another.
struct Embedded {
    store: EmbeddedStore,
    keyring: Arc<Keyring>,
    dir: tempfile::TempDir,
}

/// A keyring of its own in `dir` (keys cached for no time, so an erasure
/// shows at once).
async fn keyring(dir: &std::path::Path) -> Arc<Keyring> {
    let master = cdp_seal::MasterKeys::generate_file().expect("a master key");
    let master = cdp_seal::MasterKeys::parse(&master).expect("the master key reads");
    let rows = cdp_store::EmbeddedKeyRows::open(dir).expect("the keyring opens");
    Arc::new(
        Keyring::open(Arc::new(rows), master, std::time::Duration::ZERO, 1024)
            .await
            .expect("the keyring"),
    )
}

#[async_trait]
impl StoresUnderTest for Embedded {
    async fn open() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let keyring = keyring(&dir.path().join("keys")).await;
        let store = EmbeddedStore::open(&dir.path().join("store"))
            .expect("the store opens")
            .with_seal(ViewSeal::new(Arc::clone(&keyring)));
        Embedded {
            store,
            keyring,
            dir,
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
        Arc::new(
            cdp_store::EmbeddedGenerations::open(&self.dir.path().join("generations"))
                .expect("the registry opens")
                .with_seal(ViewSeal::new(Arc::clone(&self.keyring))),
        )
    }
}

cdp_store::store_test_suite!(embedded_store, Embedded);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_generations_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let generations = Arc::new(cdp_store::EmbeddedGenerations::open(dir.path()).unwrap());
    conformance::generations_switch_and_drop(generations, "emb").await;
    // The registry is on disk: a restarted process serves generation 2.
    let reopened = cdp_store::EmbeddedGenerations::open(dir.path()).unwrap();
    use cdp_store::Generations as _;
    assert_eq!(reopened.active().await.unwrap(), 2);
    let ids: Vec<u32> = reopened
        .list()
        .await
        .unwrap()
        .iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(ids, vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_unsynced_folds_are_durable_after_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let customer = conformance::unsynced_folds_are_visible_then_synced(&store, "emb").await;
    drop(store);
    let reopened = EmbeddedStore::open(dir.path()).unwrap();
    let profile = reopened.profile(customer).await.unwrap();
    assert!(profile.is_some(), "a synced fold is gone after reopening");
    let page = reopened
        .timeline(
            customer,
            &cdp_store::TimelineQuery {
                limit: 10,
                ..cdp_store::TimelineQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.entries.len(), 2);
}

/// A store written before the graph and the views had a file each keeps
/// its profiles in `store.redb`, and is served from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_from_before_the_views_split_is_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let customer = conformance::unsynced_folds_are_visible_then_synced(&store, "old").await;
    drop(store);
    // The old layout: one file with the profile tables in it.
    std::fs::remove_file(dir.path().join("store.redb")).unwrap();
    std::fs::rename(dir.path().join("views.redb"), dir.path().join("store.redb")).unwrap();
    let old = EmbeddedStore::open(dir.path()).unwrap();
    assert!(old.profile(customer).await.unwrap().is_some());
    assert!(!dir.path().join("views.redb").exists());
    // The identity graph works in the same file.
    conformance::identity_links_merges_and_replays(&old, "old").await;
}

/// The keyring on the embedded log's file: a key created for an append is
/// written by that append's transaction (the hook the wiring installs), so
/// it is there after a restart; a key no append followed is not (nothing
/// was sealed with it).
#[tokio::test]
async fn a_key_on_the_logs_file_is_durable_with_the_next_append() {
    use cdp_log::{EmbeddedLog, EventLog, Record, Topic};
    use cdp_store::{EmbeddedKeyRows, Keyring};
    const TOPIC: Topic = Topic::new("touchpoints");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let master = cdp_seal::MasterKeys::generate_file().expect("a master key");
    let open = || async {
        let log = EmbeddedLog::open(&dir.path().join("log"), &[TOPIC], 1).expect("the log opens");
        let rows = EmbeddedKeyRows::open_on(log.database(), &dir.path().join("keys"))
            .expect("the keyring opens");
        log.set_append_hook(rows.append_hook()).expect("one hook");
        let master = cdp_seal::MasterKeys::parse(&master).expect("the master key reads");
        let ring = Keyring::open(Arc::new(rows), master, std::time::Duration::ZERO, 16)
            .await
            .expect("the keyring");
        (log, ring)
    };
    let id = |v: &str| cdp_domain::Identifier::new(cdp_domain::IdKind::Email, v.to_owned());
    let (log, ring) = open().await;
    let (sealed, lost) = (
        ring.subject(&id("lan@x.vn")),
        ring.subject(&id("minh@x.vn")),
    );
    let key = ring
        .obtain(&[sealed])
        .await
        .expect("a key")
        .get(&sealed)
        .cloned();
    assert!(key.is_some());
    let record = Record {
        key: sealed.as_bytes().to_vec(),
        value: b"sealed with the key".to_vec(),
        headers: Vec::new(),
        idempotency_key: None,
    };
    log.append(TOPIC, vec![record]).await.expect("the append");
    // Created after the last append: pending when the process stops.
    assert!(
        ring.obtain(&[lost])
            .await
            .expect("a key")
            .get(&lost)
            .is_some()
    );
    drop((log, ring));

    let (_log, ring) = open().await;
    let read = ring.keys(&[sealed, lost]).await.expect("the keys read");
    assert_eq!(read.get(&sealed).cloned(), key, "the appended key survives");
    assert!(
        read.get(&lost).is_none(),
        "a key no append followed is not kept"
    );
    assert_eq!(
        ring.erasures(&[lost]).await.expect("the erasures read"),
        vec![None],
        "and it was never erased: it has no row"
    );
}

/// An order of `customer` with a name, an address, a free-text note, an
/// email and a phone.
fn order_with_personal_data(customer: cdp_domain::CustomerId) -> cdp_domain::ResolvedTouchpoint {
    use cdp_domain::{
        Attributes, Channel, Envelope, EventId, EventType, IdKind, Identifier, Personal,
        ResolvedTouchpoint, Touchpoint,
    };
    let mut traits = Attributes::new();
    traits.insert(
        "address".into(),
        serde_json::json!("17 Phố Hàng Bạc, Hà Nội"),
    );
    traits.insert("name".into(), serde_json::json!("Trần Thị Hoa"));
    let mut properties = Attributes::new();
    properties.insert("note".into(), serde_json::json!("giao trước 9 giờ sáng"));
    properties.insert("total".into(), serde_json::json!(250_000));
    ResolvedTouchpoint {
        customer_id: customer,
        merges: Vec::new(),
        touchpoint: Touchpoint {
            envelope: Envelope {
                event_id: EventId(uuid::Uuid::now_v7()),
                event_type: EventType::OrderCompleted,
                channel: Channel::Store,
                source_id: "pos".into(),
                occurred_at: 1_000,
                received_at: 1_000,
                properties,
            },
            personal: Personal {
                identifiers: vec![
                    Identifier::new(IdKind::Email, "hoa.tran@shop.vn"),
                    Identifier::new(IdKind::Phone, "+84912345678"),
                ],
                traits,
                ..Personal::default()
            },
        },
    }
}

fn holds(file: &[u8], text: &str) -> bool {
    file.windows(text.len()).any(|w| w == text.as_bytes())
}

/// The views file never holds a profile, a timeline entry or a search term
/// in clear: a customer's address, free-text note, name, email and phone
/// are not in `views.redb`, yet they read back through the store and the
/// customer is found by the prefixes an agent types. The same fold on a
/// store in clear leaves them in its file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_views_file_holds_no_profile_or_timeline_in_clear() {
    use cdp_domain::CustomerId;
    use cdp_domain::profile::FoldOptions;
    let secrets = [
        "Hàng Bạc",
        "9 giờ sáng",
        "hoa.tran@shop.vn",
        "tran thi hoa",
        "84912345678",
    ];
    let fixture = Embedded::open().await;
    let customer = CustomerId(uuid::Uuid::now_v7());
    let order = order_with_personal_data(customer);
    fixture
        .store
        .apply(std::slice::from_ref(&order), &FoldOptions::default())
        .await
        .expect("folded");
    let profile = fixture
        .store
        .profile(customer)
        .await
        .expect("read")
        .expect("a profile");
    assert_eq!(
        profile.traits.get("address").map(|t| &t.value),
        Some(&serde_json::json!("17 Phố Hàng Bạc, Hà Nội"))
    );
    let page = fixture
        .store
        .timeline(
            customer,
            &cdp_store::TimelineQuery {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .expect("the timeline");
    assert_eq!(
        page.entries[0].properties.get("note"),
        Some(&serde_json::json!("giao trước 9 giờ sáng"))
    );
    for typed in [
        "Trần Thị",
        "tran thi hoa",
        "hoa",
        "hoa.tran@",
        "0912 345",
        "+84912345678",
    ] {
        let found = fixture
            .store
            .search(&cdp_domain::search::query_prefixes(typed), 10)
            .await
            .expect("a search");
        assert_eq!(found, vec![customer], "{typed}");
    }
    for typed in ["Trần Văn", "hoa.tran@shop.vn.x", "0912 346"] {
        let found = fixture
            .store
            .search(&cdp_domain::search::query_prefixes(typed), 10)
            .await
            .expect("a search");
        assert!(found.is_empty(), "{typed} found {found:?}");
    }
    let file =
        std::fs::read(fixture.dir.path().join("store").join("views.redb")).expect("the file");
    for secret in secrets {
        assert!(
            !holds(&file, secret),
            "{secret:?} is in views.redb in clear"
        );
    }

    let clear_dir = tempfile::tempdir().expect("a temporary directory");
    let clear = EmbeddedStore::open(clear_dir.path()).expect("the store opens");
    clear
        .apply(&[order], &FoldOptions::default())
        .await
        .expect("folded in clear");
    let file = std::fs::read(clear_dir.path().join("views.redb")).expect("the file");
    for secret in secrets {
        assert!(holds(&file, secret), "{secret:?} is not in a file in clear");
    }
}

/// The identity graph keeps no identifier in clear: claims are filed under
/// keyed hashes of their identifiers, nodes and decisions are sealed under
/// their customer's key. Read through the store they are whole; once the
/// customer's key is erased they read as gone.
#[tokio::test]
async fn the_graph_file_holds_no_identifier_in_clear() {
    use cdp_domain::{IdKind, Identifier, IdentityRules, Resolution};
    let fixture = Embedded::open().await;
    let rules = IdentityRules::default();
    let first = order_with_personal_data(cdp_domain::CustomerId(uuid::Uuid::nil())).touchpoint;
    let mut second = order_with_personal_data(cdp_domain::CustomerId(uuid::Uuid::nil())).touchpoint;
    second.personal.identifiers = vec![
        Identifier::new(IdKind::Email, "hoa.tran@shop.vn"),
        Identifier::new(IdKind::Phone, "+84987654321"),
    ];
    let decided = fixture
        .store
        .resolve(&[first.clone(), second.clone()], &rules)
        .await
        .expect("resolved");
    let customer = match (&decided[0], &decided[1]) {
        (Resolution::Resolved(a), Resolution::Resolved(b)) => {
            assert_eq!(a.customer_id, b.customer_id);
            a.customer_id
        }
        other => panic!("{other:?}"),
    };
    let work = Identifier::new(IdKind::Phone, "+84987654321");
    assert_eq!(
        fixture.store.owner(&work).await.expect("owner"),
        Some(customer)
    );
    let node = fixture
        .store
        .customer(customer)
        .await
        .expect("read")
        .expect("a node");
    assert!(node.identifiers.contains(&work), "{node:?}");
    assert_eq!(
        fixture.store.decision(&second).await.expect("read"),
        Some(decided[1].clone())
    );
    let file =
        std::fs::read(fixture.dir.path().join("store").join("store.redb")).expect("the file");
    for secret in [
        "hoa.tran@shop.vn",
        "84912345678",
        "84987654321",
        "0987654321",
    ] {
        assert!(
            !holds(&file, secret),
            "{secret:?} is in store.redb in clear"
        );
    }

    // The customer's key erased: its node and decisions are gone.
    let subject = cdp_store::sealed::customer_subject(fixture.keyring.hasher(), customer);
    fixture
        .keyring
        .erase(&[subject], 1, "test")
        .await
        .expect("erased");
    assert_eq!(fixture.store.customer(customer).await.expect("read"), None);
    assert_eq!(fixture.store.decision(&second).await.expect("read"), None);
}

/// A graph written in clear (before sealing) is filed under hashed
/// identifiers when a sealing store opens it: every identifier still finds
/// its customer, and new claims join the same customers.
#[tokio::test]
async fn a_graph_in_clear_is_sealed_when_opened_with_keys() {
    use cdp_domain::{IdKind, Identifier, IdentityRules, Resolution};
    let dir = tempfile::tempdir().expect("a temporary directory");
    let rules = IdentityRules::default();
    let first = order_with_personal_data(cdp_domain::CustomerId(uuid::Uuid::nil())).touchpoint;
    let customer = {
        let clear = EmbeddedStore::open(&dir.path().join("store")).expect("the store opens");
        match &clear.resolve(&[first], &rules).await.expect("resolved")[0] {
            Resolution::Resolved(d) => d.customer_id,
            other => panic!("{other:?}"),
        }
    };
    // In clear, the file names the identifiers (the scan above can fail).
    let file = std::fs::read(dir.path().join("store").join("store.redb")).expect("the file");
    assert!(holds(&file, "hoa.tran@shop.vn"));
    let keyring = keyring(&dir.path().join("keys")).await;
    let sealed = EmbeddedStore::open(&dir.path().join("store"))
        .expect("the store opens")
        .with_seal(ViewSeal::new(Arc::clone(&keyring)));
    assert_eq!(sealed.seal_claims().expect("sealed"), 2);
    assert_eq!(sealed.seal_claims().expect("nothing left"), 0);
    let email = Identifier::new(IdKind::Email, "hoa.tran@shop.vn");
    assert_eq!(sealed.owner(&email).await.expect("owner"), Some(customer));
    let mut second = order_with_personal_data(cdp_domain::CustomerId(uuid::Uuid::nil())).touchpoint;
    second.personal.identifiers = vec![
        Identifier::new(IdKind::Email, "hoa.tran@shop.vn"),
        Identifier::new(IdKind::Phone, "+84987654321"),
    ];
    match &sealed.resolve(&[second], &rules).await.expect("resolved")[0] {
        Resolution::Resolved(d) => assert_eq!(d.customer_id, customer),
        other => panic!("{other:?}"),
    }
    let node = sealed
        .customer(customer)
        .await
        .expect("read")
        .expect("a node");
    assert_eq!(node.identifiers.len(), 3, "{node:?}");
}

/// A store whose members index was keyed by customer (before it was keyed
/// by when each membership began) has its entries moved when it opens, and
/// lists the same members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_members_index_keyed_by_customer_is_moved_on_open() {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    const NEW: TableDefinition<(&str, i64, u128), ()> =
        TableDefinition::new("segment_members_by_since");
    const OLD: TableDefinition<(&str, u128), i64> = TableDefinition::new("segment_members");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = EmbeddedStore::open(dir.path()).expect("the store opens");
    conformance::segment_members_follow_entries_merges_and_erasure(&store, "mig").await;
    let listed = |store: EmbeddedStore| async move {
        let mut all = Vec::new();
        for segment in ["buyers_mig", "flapping_mig"] {
            let page = store.members(segment, None, 100).await.expect("members");
            assert!(page.next.is_none(), "{page:?}");
            all.push(page.members);
        }
        all
    };
    let before = listed(store.clone()).await;
    let a = cdp_domain::CustomerId(uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, b"mig-a"));
    assert_eq!(before, [vec![(a, 10_000)], vec![(a, 40_000)]]);
    drop(store);

    // The old layout: the same entries, keyed by (segment, customer).
    let db = redb::Database::create(dir.path().join("views.redb")).expect("views.redb opens");
    let tx = db.begin_write().expect("a write");
    {
        let new = tx.open_table(NEW).expect("the index");
        let entries: Vec<(String, i64, u128)> = new
            .iter()
            .expect("entries")
            .map(|e| {
                let (k, _) = e.expect("an entry");
                let (segment, since, customer) = k.value();
                (segment.to_owned(), since, customer)
            })
            .collect();
        assert!(entries.len() >= 2, "{entries:?}");
        let mut old = tx.open_table(OLD).expect("the old index");
        for (segment, since, customer) in &entries {
            old.insert((segment.as_str(), *customer), since)
                .expect("an old entry");
        }
    }
    tx.delete_table(NEW).expect("the index dropped");
    tx.commit().expect("committed");
    drop(db);

    let reopened = EmbeddedStore::open(dir.path()).expect("the store opens again");
    assert_eq!(listed(reopened.clone()).await, before);
    drop(reopened);
    let db = redb::Database::create(dir.path().join("views.redb")).expect("views.redb opens");
    let tx = db.begin_read().expect("a read");
    assert!(
        matches!(
            tx.open_table(OLD),
            Err(redb::TableError::TableDoesNotExist(_))
        ),
        "the old index is still there"
    );
}
