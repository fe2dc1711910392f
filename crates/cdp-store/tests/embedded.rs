//! The store conformance suites on the embedded store, plus what only the
//! embedded store promises (durability across a reopen, old layouts).

use std::sync::Arc;

use async_trait::async_trait;
use cdp_store::conformance::{self, StoresUnderTest};
use cdp_store::{EmbeddedStore, Generations, IdentityStore, ProfileStore};

/// A fresh embedded store in a temporary directory; its generations in
/// another.
struct Embedded {
    store: EmbeddedStore,
    dir: tempfile::TempDir,
}

#[async_trait]
impl StoresUnderTest for Embedded {
    async fn open() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = EmbeddedStore::open(&dir.path().join("store")).expect("the store opens");
        Embedded { store, dir }
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
                .expect("the registry opens"),
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
