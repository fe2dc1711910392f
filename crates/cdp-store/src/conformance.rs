//! The conformance suites of the store ports. Every implementation runs
//! them (the embedded store in this crate's tests, ScyllaDB/Cassandra
//! against a real server). `prefix` keeps runs on a shared server apart.
//!
//! [`store_test_suite!`](crate::store_test_suite) turns the suites into one
//! test per case for a [`StoresUnderTest`], so the first failure does not
//! hide the others (the shape of Quickwit's `metastore_test_suite!`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use cdp_domain::identity::Resolution;
use cdp_domain::{
    Attributes, Channel, CustomerId, Envelope, EventId, EventType, IdKind, Identifier,
    IdentityRules, Personal, ResolvedTouchpoint, Touchpoint,
};
use serde_json::json;
use uuid::Uuid;

use crate::{Generations, IdentityStore, ProfileStore, TimelineQuery};

/// The audience cases of one process: a backfill brings every row of the
/// store up to its definitions (the other cases' rows too, where fixtures
/// share a store), so it runs alone (`write`) and the cases whose rows
/// hold audience state wait for it (`read`).
static AUDIENCE_CASES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
use cdp_domain::profile::FoldOptions;

/// An implementation of the ports as the suites run it: fresh, empty stores
/// for every case.
#[async_trait]
pub trait StoresUnderTest: Send + Sync + Sized + 'static {
    /// Opens fresh, empty stores.
    async fn open() -> Self;
    fn identity(&self) -> Arc<dyn IdentityStore>;
    fn profiles(&self) -> Arc<dyn ProfileStore>;
    /// A registry of generations on data of its own.
    async fn generations(&self) -> Arc<dyn Generations>;
    /// The keyring the profile store seals its views with.
    fn keyring(&self) -> Arc<crate::Keyring>;
    /// Releases what the stores hold on a shared server (a keyspace); runs
    /// after the case, whether it passed or not.
    async fn close(&self) {}
}

/// One test per conformance case for a [`StoresUnderTest`]:
/// `store_test_suite!(module_name, Fixture)`, optionally followed by
/// attributes for every test (`#[ignore = "needs a CQL server"]`). The
/// calling crate needs `tokio` with its test macros.
#[macro_export]
macro_rules! store_test_suite {
    ($module:ident, $fixture:ty $(, #[$attr:meta])*) => {
        $crate::store_test_suite!(@cases $module, $fixture, [$(#[$attr])*];
            identity_links_merges_and_replays(identity_ref),
            identity_races_end_in_one_graph(identity),
            identity_quarantines_shared_values_and_recycles_numbers(identity_ref),
            profiles_fold_merge_and_page(profiles_ref),
            profiles_page_ties_and_families_without_loss(profiles_ref),
            profiles_lose_no_concurrent_update(profiles),
            profiles_are_searchable(profiles_ref),
            profiles_erase_removes_views_and_search(profiles_ref),
            profiles_are_sealed_under_customer_keys(sealed),
            identity_erase_forgets_claims_nodes_and_decisions(identity_ref),
            identity_is_sealed_under_customer_keys(sealed_graph),
            unsynced_folds_are_visible_then_synced(profiles_ref),
            profiles_fold_audiences(profiles_ref),
            profiles_fold_a_large_batch_as_the_domain_does(profiles_ref),
            audience_timers_fire_on_time_and_once(profiles_ref),
            audience_backfill_folds_past_events_once(profiles_ref),
            segment_members_follow_entries_merges_and_erasure(profiles_ref),
            generations_switch_and_drop(generations));
    };
    (@arg identity_ref, $f:expr) => { &*$f.identity() };
    (@arg identity, $f:expr) => { $f.identity() };
    (@arg profiles_ref, $f:expr) => { &*$f.profiles() };
    (@arg profiles, $f:expr) => { $f.profiles() };
    (@arg generations, $f:expr) => { $f.generations().await };
    (@arg sealed, $f:expr) => { (&*$f.profiles(), $f.keyring()) };
    (@arg sealed_graph, $f:expr) => { (&*$f.identity(), $f.keyring()) };
    (@cases $module:ident, $fixture:ty, $attrs:tt; $($case:ident($arg:ident)),+) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $($crate::store_test_suite!(@case $fixture, $attrs, $case, $arg);)+
        }
    };
    (@case $fixture:ty, [$($attr:tt)*], $case:ident, $arg:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $($attr)*
        async fn $case() {
            let fixture = std::sync::Arc::new(
                <$fixture as $crate::conformance::StoresUnderTest>::open().await,
            );
            let running = {
                let fixture = std::sync::Arc::clone(&fixture);
                tokio::spawn(async move {
                    use $crate::conformance::StoresUnderTest as _;
                    let _ = $crate::conformance::$case(
                        $crate::store_test_suite!(@arg $arg, fixture),
                        stringify!($case),
                    )
                    .await;
                })
            };
            let outcome = running.await;
            $crate::conformance::StoresUnderTest::close(&*fixture).await;
            if let Err(e) = outcome {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    };
}

fn event(
    prefix: &str,
    n: u64,
    at: i64,
    event_type: EventType,
    ids: &[(IdKind, String)],
    props: serde_json::Value,
) -> Touchpoint {
    let mut identifiers: Vec<Identifier> = ids
        .iter()
        .map(|(k, v)| Identifier::new(k.clone(), v.clone()))
        .collect();
    identifiers.sort();
    Touchpoint {
        envelope: Envelope {
            event_id: EventId(Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                format!("{prefix}-{n}").as_bytes(),
            )),
            event_type,
            channel: Channel::Web,
            source_id: "conformance".into(),
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

fn email(prefix: &str, who: &str) -> (IdKind, String) {
    (IdKind::Email, format!("{who}.{prefix}@shop.vn"))
}

fn decided(r: &Resolution) -> &cdp_domain::Decision {
    match r {
        Resolution::Resolved(d) => d,
        other => panic!("expected a decision, got {other:?}"),
    }
}

/// Links, merges with a redirect, and idempotent re-resolution.
pub async fn identity_links_merges_and_replays(store: &dyn IdentityStore, prefix: &str) {
    let rules = IdentityRules::default();
    let phone = (
        IdKind::Phone,
        format!(
            "+8491{:07}",
            Uuid::new_v5(&Uuid::NAMESPACE_OID, prefix.as_bytes()).as_u128() % 10_000_000
        ),
    );
    let a = event(
        prefix,
        1,
        1000,
        EventType::ProductViewed,
        &[email(prefix, "a")],
        json!({}),
    );
    let b = event(
        prefix,
        2,
        2000,
        EventType::ProductViewed,
        std::slice::from_ref(&phone),
        json!({}),
    );
    let link = event(
        prefix,
        3,
        3000,
        EventType::Identify,
        &[email(prefix, "a"), phone.clone()],
        json!({}),
    );
    let out = store
        .resolve(&[a.clone(), b.clone(), link.clone()], &rules)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (ca, cb, cl) = (decided(&out[0]), decided(&out[1]), decided(&out[2]));
    assert!(ca.created && cb.created);
    assert_eq!(
        cl.customer_id, ca.customer_id,
        "the older customer survives"
    );
    assert_eq!(cl.merges.len(), 1);
    assert_eq!(cl.merges[0].loser, cb.customer_id);
    assert_eq!(cl.merges[0].cause.event_id, link.event_id());
    let phone_id = Identifier::new(phone.0.clone(), phone.1.clone());
    assert_eq!(
        store
            .owner(&phone_id)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Some(ca.customer_id)
    );
    assert_eq!(
        store
            .root(cb.customer_id)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        ca.customer_id
    );
    let nobody = CustomerId(Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("{prefix}-nobody").as_bytes(),
    ));
    assert_eq!(
        store
            .roots(&[cb.customer_id, ca.customer_id, nobody])
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        vec![ca.customer_id, ca.customer_id, nobody],
        "roots in one call, as root one by one"
    );
    let node = store
        .customer(ca.customer_id)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no node"));
    assert!(node.identifiers.contains(&phone_id));
    assert_eq!(node.merges.len(), 1);
    let claims = store
        .claims(std::slice::from_ref(&phone_id))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(claims[0].as_ref().map(|c| c.event_id), Some(b.event_id()));

    // The decision is kept and found by its event.
    assert_eq!(
        store
            .decision(&link)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Some(out[2].clone())
    );

    // Re-delivery: the same decisions, merges included.
    let again = store
        .resolve(&[link], &rules)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(decided(&again[0]), cl);
}

/// A value shared by too many people is quarantined and stops
/// attributing; a recycled number passes to its new owner. Both are state
/// the store keeps between batches.
pub async fn identity_quarantines_shared_values_and_recycles_numbers(
    store: &dyn IdentityStore,
    prefix: &str,
) {
    const DAY: i64 = 86_400_000;
    let rules = IdentityRules::default(); // device_id: 3 people; phone: 180 days
    let tablet = (IdKind::DeviceId, format!("tablet-{prefix}"));
    let mut batch = Vec::new();
    for n in 0..4u64 {
        batch.push(event(
            prefix,
            10 + n,
            1000 + i64::try_from(n).unwrap_or(0),
            EventType::Identify,
            &[tablet.clone(), email(prefix, &format!("shopper{n}"))],
            json!({}),
        ));
    }
    let phone = (
        IdKind::Phone,
        format!(
            "+8498{:07}",
            Uuid::new_v5(&Uuid::NAMESPACE_OID, prefix.as_bytes()).as_u128() % 10_000_000
        ),
    );
    let old = event(
        prefix,
        20,
        2000,
        EventType::OrderCompleted,
        std::slice::from_ref(&phone),
        json!({}),
    );
    // Two batches: the sightings and the first owner must be kept in between.
    let first = store
        .resolve(&[batch[0].clone(), batch[1].clone(), old.clone()], &rules)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let later = store
        .resolve(&batch[2..], &rules)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let holder = decided(&first[0]).customer_id;
    assert!(later.iter().all(|r| decided(r).customer_id != holder));
    let last = decided(&later[1]);
    assert_eq!(last.quarantined.len(), 1, "{last:?}");
    let tablet_id = Identifier::new(tablet.0.clone(), tablet.1.clone());
    let claim = store
        .claims(std::slice::from_ref(&tablet_id))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .pop()
        .flatten()
        .unwrap_or_else(|| panic!("no claim of the tablet"));
    assert_eq!(claim.sightings.len(), 3);
    assert!(claim.quarantined.is_some());
    let alone = event(
        prefix,
        30,
        3000,
        EventType::ProductViewed,
        std::slice::from_ref(&tablet),
        json!({}),
    );
    let r = store
        .resolve(&[alone], &rules)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(r[0], Resolution::Unresolvable { .. }), "{r:?}");

    // A year later the number comes back with someone else's email.
    let reborn = event(
        prefix,
        40,
        2000 + 365 * DAY,
        EventType::Identify,
        &[phone.clone(), email(prefix, "new-subscriber")],
        json!({}),
    );
    let r = store
        .resolve(&[reborn], &rules)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let former = decided(&first[2]).customer_id;
    let new = decided(&r[0]);
    assert_ne!(new.customer_id, former);
    let phone_id = Identifier::new(phone.0.clone(), phone.1.clone());
    assert_eq!(new.recycled, vec![(phone_id.clone(), former)]);
    assert_eq!(
        store
            .owner(&phone_id)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Some(new.customer_id)
    );
    let node = store
        .customer(former)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no former holder"));
    assert!(!node.identifiers.contains(&phone_id));
}

/// Two workers racing to claim one new identifier end with one owner.
pub async fn identity_races_end_in_one_graph(
    store: std::sync::Arc<dyn IdentityStore>,
    prefix: &str,
) {
    let rules = IdentityRules::default();
    let shared = email(prefix, "race");
    let mut tasks = Vec::new();
    for worker in 0..4u64 {
        let store = std::sync::Arc::clone(&store);
        let rules = rules.clone();
        let e = event(
            prefix,
            100 + worker,
            1000 + worker as i64,
            EventType::ProductViewed,
            std::slice::from_ref(&shared),
            json!({}),
        );
        tasks.push(tokio::spawn(
            async move { store.resolve(&[e], &rules).await },
        ));
    }
    let mut customers = Vec::new();
    for t in tasks {
        let r = t
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        customers.push(decided(&r[0]).customer_id);
    }
    customers.dedup();
    assert_eq!(
        customers.len(),
        1,
        "racing workers created several customers: {customers:?}"
    );
    let owner = store
        .owner(&Identifier::new(shared.0, shared.1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(owner, Some(customers[0]));
}

fn resolved(customer: CustomerId, t: Touchpoint) -> ResolvedTouchpoint {
    ResolvedTouchpoint {
        customer_id: customer,
        merges: Vec::new(),
        touchpoint: t,
    }
}

/// Fold options at instant 10,000 with two computed traits (orders and
/// product views in the last 7 days) and two segments: `omni` (both) and
/// `second` (`(name, condition)`).
fn weekly_counts(second: (&str, &str)) -> FoldOptions {
    use cdp_domain::audience::{Aggregate, Definitions, EventFilter, SegmentDef, TraitDef};
    use cdp_domain::profile::AudienceOptions;
    let count = |name: &str, ty: &str| TraitDef {
        name: name.into(),
        version: 1,
        aggregate: Aggregate::Count,
        property: None,
        filter: EventFilter {
            types: vec![ty.into()],
            ..EventFilter::default()
        },
        window: "7d".parse().unwrap_or_default(),
    };
    let segment = |name: &str, condition: &str| SegmentDef {
        name: name.into(),
        version: 1,
        condition: condition.into(),
        description: String::new(),
    };
    let defs = Definitions::new(
        vec![
            count("orders_7d", "order_completed"),
            count("views_7d", "product_viewed"),
        ],
        vec![
            segment("omni", "traits.orders_7d >= 1 && traits.views_7d >= 1"),
            segment(second.0, second.1),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    FoldOptions {
        audiences: AudienceOptions::new(Arc::new(defs), 10_000),
        ..FoldOptions::default()
    }
}

/// Batches of many customers fold exactly as the domain's fold does, one
/// record at a time in memory: the same profiles (audience states
/// included) and the same membership changes in the same order, merges
/// included. The first batch writes 120 new rows, the second opens them
/// all again (the embedded store opens and seals a batch's rows on several
/// threads once there are a few dozen).
pub async fn profiles_fold_a_large_batch_as_the_domain_does(
    store: &dyn ProfileStore,
    prefix: &str,
) {
    let _alone = AUDIENCE_CASES.read().await;
    use cdp_domain::identity::{Merge, MergeCause};
    use cdp_domain::profile::{ProfileSlot, fold_resolved};

    let options = weekly_counts(("viewers", "traits.views_7d >= 1"));
    let customer = |k: u64| {
        CustomerId(Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("{prefix}-batch-{k}").as_bytes(),
        ))
    };
    // 120 customers view a product; each odd one then orders and absorbs
    // the even one before it.
    let mut views = Vec::new();
    for k in 0..120u64 {
        let ids = [email(prefix, &format!("b{k}"))];
        let view = event(
            prefix,
            10_000 + k,
            1_000 + k as i64,
            EventType::ProductViewed,
            &ids,
            json!({"product_id": "SKU-1"}),
        );
        views.push(resolved(customer(k), view));
    }
    let mut orders = Vec::new();
    for k in (1..120u64).step_by(2) {
        let ids = [email(prefix, &format!("b{k}"))];
        let order = event(
            prefix,
            20_000 + k,
            2_000 + k as i64,
            EventType::OrderCompleted,
            &ids,
            json!({"order_id": format!("B-{k}"), "revenue": 100_000, "currency": "VND"}),
        );
        let cause = MergeCause {
            event_id: order.envelope.event_id,
            identifier: Identifier::new(IdKind::Email, ids[0].1.clone()),
            rule: "email".into(),
        };
        orders.push(ResolvedTouchpoint {
            customer_id: customer(k),
            merges: vec![Merge {
                loser: customer(k - 1),
                survivor: customer(k),
                at: 2_000 + k as i64,
                cause,
            }],
            touchpoint: order,
        });
    }
    let mut memory: std::collections::BTreeMap<CustomerId, ProfileSlot> = Default::default();
    for batch in [&views, &orders] {
        let applied = store
            .apply(batch, &options)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut changes = Vec::new();
        for r in batch.iter() {
            let folded = fold_resolved(&mut memory, r, &options).unwrap_or_else(|e| panic!("{e}"));
            changes.extend(folded.changes);
        }
        assert_eq!(applied.new_events, batch.len());
        assert_eq!(applied.changes, changes, "the batch's membership changes");
    }
    for k in (1..120u64).step_by(2) {
        let Some(ProfileSlot::Live(want)) = memory.get(&customer(k)) else {
            panic!("customer {k} is not live in memory");
        };
        // The absorbed customer reads as its survivor.
        for who in [k, k - 1] {
            let stored = store
                .profile(customer(who))
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("customer {who} is not stored"));
            assert_eq!(&stored, want.as_ref(), "customer {who}");
        }
        assert_eq!(
            want.audience.members.len(),
            2,
            "customer {k}: omni and viewers"
        );
    }
}

/// Audiences fold with the profile, in its row: a membership entered
/// through an event, nothing again on re-delivery, the absorbed customer's
/// exits and the survivor's entry on a merge, the state read back with the
/// profile, and a fold without definitions leaving it alone.
pub async fn profiles_fold_audiences(store: &dyn ProfileStore, prefix: &str) {
    let _alone = AUDIENCE_CASES.read().await;
    use cdp_domain::audience::{Cause, ChangeKind};
    use cdp_domain::identity::{Merge, MergeCause};

    let options = weekly_counts(("buyers", "traits.orders_7d >= 1"));
    let customer = |who: &str| {
        CustomerId(Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("{prefix}-{who}").as_bytes(),
        ))
    };
    let (c1, c2) = (customer("c1"), customer("c2"));
    let (ids1, ids2) = ([email(prefix, "a1")], [email(prefix, "a2")]);
    let seen = event(
        prefix,
        1,
        1_000,
        EventType::ProductViewed,
        &ids1,
        json!({"product_id": "p1"}),
    );
    let bought = event(
        prefix,
        2,
        2_000,
        EventType::OrderCompleted,
        &ids2,
        json!({"order_id": format!("{prefix}-o2"), "total": 300_000}),
    );
    let first = vec![resolved(c1, seen), resolved(c2, bought)];
    let applied = store
        .apply(&first, &options)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let summary = |a: &crate::Applied| -> Vec<(CustomerId, String, ChangeKind)> {
        let mut v: Vec<_> = a
            .changes
            .iter()
            .map(|(c, ch)| (*c, ch.segment.clone(), ch.kind))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        summary(&applied),
        [(c2, "buyers".to_owned(), ChangeKind::Entered)]
    );
    let again = store
        .apply(&first, &options)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(again.changes.is_empty(), "{:?}", again.changes);

    let carrier = event(prefix, 3, 3_000, EventType::PageViewed, &ids1, json!({}));
    let merge = ResolvedTouchpoint {
        customer_id: c1,
        merges: vec![Merge {
            loser: c2,
            survivor: c1,
            at: 3_000,
            cause: MergeCause {
                event_id: carrier.envelope.event_id,
                identifier: Identifier::new(IdKind::Email, ids1[0].1.clone()),
                rule: "email".into(),
            },
        }],
        touchpoint: carrier,
    };
    let merged = store
        .apply(&[merge], &options)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut want = vec![
        (c2, "buyers".to_owned(), ChangeKind::Exited),
        (c1, "omni".to_owned(), ChangeKind::Entered),
        (c1, "buyers".to_owned(), ChangeKind::Entered),
    ];
    want.sort();
    assert_eq!(summary(&merged), want);
    assert!(merged.changes.iter().all(|(c, ch)| match ch.kind {
        ChangeKind::Exited => *c == c2 && ch.cause == Cause::MergedInto { survivor: c1 },
        ChangeKind::Entered => *c == c1 && ch.cause == Cause::Merge { absorbed: c2 },
    }));

    for c in [c1, c2] {
        let profile = store
            .profile(c)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no profile for {c}"));
        assert_eq!(profile.customer_id, c1);
        let members: Vec<&str> = profile
            .audience
            .members
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(members, ["buyers", "omni"]);
    }

    // A fold that does not evaluate audiences keeps the state as it is.
    let later = event(prefix, 4, 4_000, EventType::PageViewed, &ids1, json!({}));
    let blind = store
        .apply(&[resolved(c1, later)], &FoldOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(blind.new_events, 1);
    assert!(blind.changes.is_empty());
    let profile = store
        .profile(c1)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no profile for {c1}"));
    assert_eq!(profile.audience.members.len(), 2);
}

/// Audience timers: a row is due when its window lets an event go, found
/// by `due_audiences` then and not before, expired once; its timer moves
/// with merges, and an entry left by an erased row is dropped.
pub async fn audience_timers_fire_on_time_and_once(store: &dyn ProfileStore, prefix: &str) {
    let _alone = AUDIENCE_CASES.read().await;
    use cdp_domain::audience::{
        Aggregate, Cause, ChangeKind, Definitions, EventFilter, SegmentDef, TraitDef,
    };
    use cdp_domain::identity::{Merge, MergeCause};
    use cdp_domain::profile::AudienceOptions;

    const DAY: i64 = 86_400_000;
    // Far from the instants of the other cases (a shared table may hold
    // their timers): only this case's customers are looked at.
    const T: i64 = 4_000_000_000_000;
    let defs = Arc::new(
        Definitions::new(
            vec![TraitDef {
                name: "orders_7d".into(),
                version: 1,
                aggregate: Aggregate::Count,
                property: None,
                filter: EventFilter {
                    types: vec!["order_completed".into()],
                    ..EventFilter::default()
                },
                window: "7d".parse().unwrap_or_default(),
            }],
            vec![SegmentDef {
                name: "buyers".into(),
                version: 1,
                condition: "traits.orders_7d >= 1".into(),
                description: String::new(),
            }],
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let at = |now: i64| FoldOptions {
        audiences: AudienceOptions::new(Arc::clone(&defs), now),
        ..FoldOptions::default()
    };
    let customer = |who: &str| {
        CustomerId(Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("{prefix}-{who}").as_bytes(),
        ))
    };
    let [buyer, erased, loser, survivor] = ["buyer", "erased", "loser", "survivor"].map(customer);
    let ours = [buyer, erased, loser, survivor];
    let due = |now: i64| async move {
        let mut mine: Vec<(i64, CustomerId)> = store
            .due_audiences(now, 100_000)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .filter(|(_, c)| ours.contains(c))
            .collect();
        mine.sort();
        mine
    };
    let order = |n: u64, when: i64, who: &str| {
        event(
            prefix,
            n,
            when,
            EventType::OrderCompleted,
            &[email(prefix, who)],
            json!({"order_id": format!("{prefix}-o{n}"), "total": 100_000}),
        )
    };
    let batch = vec![
        resolved(buyer, order(1, T, "buyer")),
        resolved(erased, order(2, T, "erased")),
        resolved(loser, order(3, T + DAY, "loser")),
    ];
    let applied = store
        .apply(&batch, &at(T + 1_000))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(applied.changes.len(), 3, "{:?}", applied.changes);
    assert_eq!(due(T + 7 * DAY - 1).await, []);
    let mut want = vec![(T + 7 * DAY, buyer), (T + 7 * DAY, erased)];
    want.sort();
    assert_eq!(due(T + 7 * DAY).await, want);

    // A merge moves the loser's timer to the survivor.
    let carrier = event(
        prefix,
        4,
        T + 2 * DAY,
        EventType::PageViewed,
        &[email(prefix, "survivor")],
        json!({}),
    );
    let merge = ResolvedTouchpoint {
        customer_id: survivor,
        merges: vec![Merge {
            loser,
            survivor,
            at: T + 2 * DAY,
            cause: MergeCause {
                event_id: carrier.envelope.event_id,
                identifier: Identifier::new(IdKind::Email, email(prefix, "survivor").1),
                rule: "email".into(),
            },
        }],
        touchpoint: carrier,
    };
    store
        .apply(&[merge], &at(T + 2 * DAY))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // An erased row leaves its entry behind.
    store
        .erase_views(&[erased], &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let mut want = vec![
        (T + 7 * DAY, buyer),
        (T + 7 * DAY, erased),
        (T + 8 * DAY, survivor),
    ];
    want.sort();
    assert_eq!(due(T + 30 * DAY).await, want);

    // Without definitions a timer does nothing, and keeps its entries.
    let blind = store
        .expire_audiences(&want, &FoldOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(blind, crate::Applied::default());
    assert_eq!(due(T + 30 * DAY).await, want);

    // Fires what is due at `now` like a timer does: an entry whose row
    // could not be read (a timeout of a loaded server) is moved a minute
    // on, and fired again; a few rounds at most.
    let fire = |now: i64| async move {
        let mut all = crate::Applied::default();
        let mut read_until = now;
        for _ in 0..5 {
            let round = store
                .expire_audiences(&due(read_until).await, &at(now))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            all.changes.extend(round.changes);
            all.customers.extend(round.customers);
            all.failed = round.failed;
            if round.failed == 0 {
                break;
            }
            read_until = now + crate::AUDIENCE_RETRY_MS;
        }
        assert_eq!(all.failed, 0, "timers kept failing");
        all
    };

    // On time: the buyer exits, named by the instant it was due at; the
    // erased row's entry is dropped; the survivor is not due yet.
    let now = T + 7 * DAY;
    let fired = fire(now).await;
    let changes: Vec<_> = fired
        .changes
        .iter()
        .map(|(c, ch)| (*c, ch.segment.as_str(), ch.kind, ch.cause.clone()))
        .collect();
    assert_eq!(
        changes,
        [(
            buyer,
            "buyers",
            ChangeKind::Exited,
            Cause::Expiry { due: T + 7 * DAY }
        )]
    );
    assert_eq!(fired.customers, [buyer]);
    assert_eq!(due(T + 30 * DAY).await, [(T + 8 * DAY, survivor)]);
    let profile = store
        .profile(buyer)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no profile for {buyer}"));
    assert!(profile.audience.members.is_empty());
    assert_eq!(profile.audience.due, None);

    // A timer run again (a crash before its changes were appended, say)
    // finds nothing more to do.
    let again = store
        .expire_audiences(&[(T + 7 * DAY, buyer)], &at(now + 1_000))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(again.changes.is_empty(), "{:?}", again.changes);

    let fired = fire(T + 8 * DAY).await;
    assert_eq!(fired.customers, [survivor]);
    assert_eq!(due(T + 365 * DAY).await, []);
    store.sync().await.unwrap_or_else(|e| panic!("{e}"));
}

/// A computed trait defined after customers had events: segments over it
/// wait, then a backfill folds the past events (the absorbed customer's
/// too) page by page, and enters the member once.
pub async fn audience_backfill_folds_past_events_once(store: &dyn ProfileStore, prefix: &str) {
    let _alone = AUDIENCE_CASES.write().await;
    use cdp_domain::audience::{
        Aggregate, Cause, ChangeKind, Definitions, EventFilter, SegmentDef, TraitDef,
    };
    use cdp_domain::identity::{Merge, MergeCause};
    use cdp_domain::profile::AudienceOptions;

    let customer = |who: &str| {
        CustomerId(Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("{prefix}-{who}").as_bytes(),
        ))
    };
    let (kept, absorbed) = (customer("kept"), customer("absorbed"));
    let ours = [kept, absorbed];
    let order = |n: u64, at: i64, who: &str| {
        event(
            prefix,
            n,
            at,
            EventType::OrderCompleted,
            &[email(prefix, who)],
            json!({"order_id": format!("{prefix}-o{n}"), "total": 100_000}),
        )
    };
    let nothing = FoldOptions {
        audiences: AudienceOptions::new(Arc::new(Definitions::default()), 10_000),
        ..FoldOptions::default()
    };
    store
        .apply(
            &[
                resolved(kept, order(1, 1_000, "kept")),
                resolved(absorbed, order(2, 2_000, "absorbed")),
            ],
            &nothing,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let carrier = event(
        prefix,
        3,
        3_000,
        EventType::PageViewed,
        &[email(prefix, "kept")],
        json!({}),
    );
    let merge = ResolvedTouchpoint {
        customer_id: kept,
        merges: vec![Merge {
            loser: absorbed,
            survivor: kept,
            at: 3_000,
            cause: MergeCause {
                event_id: carrier.envelope.event_id,
                identifier: Identifier::new(IdKind::Email, email(prefix, "kept").1),
                rule: "email".into(),
            },
        }],
        touchpoint: carrier,
    };
    store
        .apply(&[merge], &nothing)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let defs = Definitions::new(
        vec![TraitDef {
            name: "orders_ever".into(),
            version: 1,
            aggregate: Aggregate::Count,
            property: None,
            filter: EventFilter {
                types: vec!["order_completed".into()],
                ..EventFilter::default()
            },
            window: "all".parse().unwrap_or_default(),
        }],
        vec![SegmentDef {
            name: "repeat".into(),
            version: 1,
            condition: "traits.orders_ever >= 2".into(),
            description: String::new(),
        }],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let options = FoldOptions {
        audiences: AudienceOptions::new(Arc::new(defs), 20_000),
        ..FoldOptions::default()
    };
    // An event after the definitions: the segment waits for the backfill
    // rather than judging on this event alone.
    let later = event(
        prefix,
        4,
        4_000,
        EventType::PageViewed,
        &[email(prefix, "kept")],
        json!({}),
    );
    let waited = store
        .apply(&[resolved(kept, later)], &options)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(waited.changes.is_empty(), "{:?}", waited.changes);

    let options = &options;
    let backfill = |limit: usize| async move {
        let (mut changes, mut scanned, mut from) = (Vec::new(), 0, None::<String>);
        let mut retries = 0;
        loop {
            let page = store
                .backfill_audiences(from.as_deref(), limit, options)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(page.scanned <= limit);
            // Like the backfill: a page with a row that could not be read
            // (a timeout of a loaded server) is done again.
            if page.applied.failed > 0 {
                retries += 1;
                assert!(retries < 5, "a backfill page kept failing");
                changes.extend(
                    page.applied
                        .changes
                        .into_iter()
                        .filter(|(c, _)| ours.contains(c)),
                );
                continue;
            }
            scanned += page.scanned;
            changes.extend(
                page.applied
                    .changes
                    .into_iter()
                    .filter(|(c, _)| ours.contains(c)),
            );
            match page.next {
                Some(next) => from = Some(next),
                None => return (changes, scanned),
            }
        }
    };
    let (changes, scanned) = backfill(1).await;
    assert!(scanned >= 2, "every row read, one per page: {scanned}");
    let summary: Vec<_> = changes
        .iter()
        .map(|(c, ch)| (*c, ch.segment.as_str(), ch.kind, ch.cause.clone()))
        .collect();
    assert_eq!(
        summary,
        [(
            kept,
            "repeat",
            ChangeKind::Entered,
            Cause::Definition { events: 4 }
        )]
    );
    let profile = store
        .profile(kept)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no profile for {kept}"));
    assert_eq!(profile.audience.known.get("orders_ever"), Some(&1));
    assert!(profile.audience.members.contains_key("repeat"));

    // Done again: nothing changes.
    let (again, _) = backfill(100).await;
    assert!(again.is_empty(), "{again:?}");
    store.sync().await.unwrap_or_else(|e| panic!("{e}"));
}

/// A segment's members, page by page: those who entered, without the
/// customer merged away (it exits) or the one erased.
pub async fn segment_members_follow_entries_merges_and_erasure(
    store: &dyn ProfileStore,
    prefix: &str,
) {
    let _alone = AUDIENCE_CASES.read().await;
    use cdp_domain::audience::{Aggregate, Definitions, EventFilter, SegmentDef, TraitDef};
    use cdp_domain::identity::{Merge, MergeCause};
    use cdp_domain::profile::AudienceOptions;

    let defs = Definitions::new(
        vec![TraitDef {
            name: "orders".into(),
            version: 1,
            aggregate: Aggregate::Count,
            property: None,
            filter: EventFilter {
                types: vec!["order_completed".into()],
                ..EventFilter::default()
            },
            window: "all".parse().unwrap_or_default(),
        }],
        vec![
            SegmentDef {
                name: format!("buyers_{prefix}"),
                version: 1,
                condition: "traits.orders >= 1".into(),
                description: String::new(),
            },
            // Left at the second and the fourth order, entered again after.
            SegmentDef {
                name: format!("flapping_{prefix}"),
                version: 1,
                condition: "traits.orders != 2 && traits.orders != 4".into(),
                description: String::new(),
            },
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let defs = Arc::new(defs);
    let segment = defs.segments[0].def.name.clone();
    let flapping = defs.segments[1].def.name.clone();
    let at = |now: i64| FoldOptions {
        audiences: AudienceOptions::new(Arc::clone(&defs), now),
        ..FoldOptions::default()
    };
    let options = at(10_000);
    let customer = |who: &str| {
        CustomerId(Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("{prefix}-{who}").as_bytes(),
        ))
    };
    let [a, b, c] = ["a", "b", "c"].map(customer);
    let order = |n: u64, who: &str| {
        event(
            prefix,
            n,
            1_000 + n as i64,
            EventType::OrderCompleted,
            &[email(prefix, who)],
            json!({"order_id": format!("{prefix}-o{n}"), "total": 100_000}),
        )
    };
    store
        .apply(
            &[
                resolved(a, order(1, "a")),
                resolved(b, order(2, "b")),
                resolved(c, order(3, "c")),
            ],
            &options,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let members = |name: String| async move {
        let (mut all, mut from) = (Vec::new(), None::<String>);
        for _ in 0..1_000 {
            let page = store
                .members(&name, from.as_deref(), 2)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(page.members.len() <= 2, "{page:?}");
            all.extend(page.members);
            match page.next {
                Some(next) => from = Some(next),
                None => {
                    all.sort();
                    return all;
                }
            }
        }
        panic!("the members of {name} never ended");
    };
    let mut want = vec![(a, 10_000), (b, 10_000), (c, 10_000)];
    want.sort();
    assert_eq!(members(segment.clone()).await, want);
    assert!(members("nobody".into()).await.is_empty());

    // b merged into a: b exits everything.
    let carrier = event(
        prefix,
        4,
        2_000,
        EventType::PageViewed,
        &[email(prefix, "a")],
        json!({}),
    );
    let merge = ResolvedTouchpoint {
        customer_id: a,
        merges: vec![Merge {
            loser: b,
            survivor: a,
            at: 2_000,
            cause: MergeCause {
                event_id: carrier.envelope.event_id,
                identifier: Identifier::new(IdKind::Email, email(prefix, "a").1),
                rule: "email".into(),
            },
        }],
        touchpoint: carrier,
    };
    store
        .apply(&[merge], &options)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut want = vec![(a, 10_000), (c, 10_000)];
    want.sort();
    assert_eq!(members(segment.clone()).await, want);

    // c erased: gone from the members.
    store
        .erase_views(&[c], &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(members(segment).await, [(a, 10_000)]);

    // a left `flapping` at the merge (two orders); it enters again at its
    // third order, then leaves and enters again within one write (its
    // fourth and fifth): one entry, from the last beginning.
    assert!(members(flapping.clone()).await.is_empty());
    store
        .apply(&[resolved(a, order(5, "a"))], &at(30_000))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(members(flapping.clone()).await, [(a, 30_000)]);
    store
        .apply(
            &[resolved(a, order(6, "a")), resolved(a, order(7, "a"))],
            &at(40_000),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(members(flapping).await, [(a, 40_000)]);
}

/// Folding, idempotent re-delivery, merges with redirects, and the timeline.
pub async fn profiles_fold_merge_and_page(store: &dyn ProfileStore, prefix: &str) {
    let c1 = CustomerId(Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("{prefix}-c1").as_bytes(),
    ));
    let c2 = CustomerId(Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("{prefix}-c2").as_bytes(),
    ));
    let ids = [email(prefix, "p")];
    let order = |n, at, total| {
        event(
            prefix,
            n,
            at,
            EventType::OrderCompleted,
            &ids,
            json!({"order_id": format!("{prefix}-o{n}"), "total": total}),
        )
    };
    let batch = vec![
        resolved(c1, order(10, 1000, 100_000)),
        resolved(
            c1,
            event(
                prefix,
                11,
                2000,
                EventType::ProductViewed,
                &ids,
                json!({"product_id": "p1"}),
            ),
        ),
        resolved(c2, order(12, 3000, 250_000)),
        resolved(
            c2,
            event(
                prefix,
                15,
                3500,
                EventType::ConsentUpdated,
                &ids,
                json!({"purpose": "marketing", "channel": "email", "granted": false}),
            ),
        ),
    ];
    assert_eq!(
        store
            .apply(&batch, &FoldOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .new_events,
        4
    );
    assert_eq!(
        store
            .apply(&batch, &FoldOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .new_events,
        0,
        "re-delivery must be a no-op"
    );

    let merge = cdp_domain::Merge {
        loser: c2,
        survivor: c1,
        at: 4000,
        cause: cdp_domain::identity::MergeCause {
            event_id: EventId(Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                format!("{prefix}-m").as_bytes(),
            )),
            identifier: Identifier::new(ids[0].0.clone(), ids[0].1.clone()),
            rule: "email may merge customers".into(),
        },
    };
    let merging = ResolvedTouchpoint {
        customer_id: c1,
        merges: vec![merge],
        touchpoint: event(
            prefix,
            13,
            4000,
            EventType::ProductViewed,
            &ids,
            json!({"product_id": "p2"}),
        ),
    };
    store
        .apply(std::slice::from_ref(&merging), &FoldOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // A late event of the merged-away customer lands on the survivor.
    store
        .apply(
            &[resolved(c2, order(14, 5000, 50_000))],
            &FoldOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .apply(&[merging], &FoldOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let p = store
        .profile(c2)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no profile"));
    assert_eq!(
        p.customer_id, c1,
        "a lookup by the loser lands on the survivor"
    );
    let view = p.view();
    assert_eq!(view.orders_count, 3);
    assert_eq!(view.spend[0].total, rust_decimal_total(400_000));
    assert_eq!(view.events_count, 6);
    // Consent read alone equals the profile's, through the redirect too.
    assert_eq!(view.consent.get("marketing:email"), Some(&false));
    let nobody = CustomerId(Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("{prefix}-nobody").as_bytes(),
    ));
    assert_eq!(
        store
            .consents(&[c2, c1, nobody])
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        vec![Some(p.consent.clone()), Some(p.consent.clone()), None]
    );

    let mut query = TimelineQuery {
        limit: 2,
        ..TimelineQuery::default()
    };
    let mut seen = Vec::new();
    loop {
        let page = store
            .timeline(c1, &query)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        seen.extend(page.entries.iter().map(|e| e.occurred_at));
        match page.next {
            Some(next) => query.after = Some(next),
            None => break,
        }
    }
    assert_eq!(
        seen,
        vec![5000, 4000, 3500, 3000, 2000, 1000],
        "newest first, every entry once across pages"
    );
    let orders_only = TimelineQuery {
        types: vec![EventType::OrderCompleted],
        from: Some(2000),
        limit: 10,
        ..TimelineQuery::default()
    };
    let page = store
        .timeline(c1, &orders_only)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        page.entries
            .iter()
            .map(|e| e.occurred_at)
            .collect::<Vec<_>>(),
        vec![5000, 3000]
    );
}

/// The timeline of a customer and of the customer merged into it pages
/// through entries at one instant and across both, each once, in order.
pub async fn profiles_page_ties_and_families_without_loss(store: &dyn ProfileStore, prefix: &str) {
    let survivor = CustomerId(Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("{prefix}-tie-s").as_bytes(),
    ));
    let loser = CustomerId(Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("{prefix}-tie-l").as_bytes(),
    ));
    let ids = [email(prefix, "tie")];
    let at = |n: u64, at: i64| {
        event(
            prefix,
            n,
            at,
            EventType::ProductViewed,
            &ids,
            json!({"product_id": format!("p{n}")}),
        )
    };
    // Three events at one instant on each customer, and one apart.
    let mut batch = Vec::new();
    for n in 0..3 {
        batch.push(resolved(survivor, at(700 + n, 5_000)));
        batch.push(resolved(loser, at(710 + n, 5_000)));
    }
    batch.push(resolved(loser, at(720, 4_000)));
    batch.push(resolved(survivor, at(721, 6_000)));
    store
        .apply(&batch, &FoldOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let merge = cdp_domain::Merge {
        loser,
        survivor,
        at: 7_000,
        cause: cdp_domain::identity::MergeCause {
            event_id: EventId(Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                format!("{prefix}-tie-m").as_bytes(),
            )),
            identifier: Identifier::new(ids[0].0.clone(), ids[0].1.clone()),
            rule: "email may merge customers".into(),
        },
    };
    store
        .apply(
            &[ResolvedTouchpoint {
                customer_id: survivor,
                merges: vec![merge],
                touchpoint: at(730, 7_000),
            }],
            &FoldOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut expected: Vec<(i64, EventId)> = batch
        .iter()
        .map(|r| (r.touchpoint.envelope.occurred_at, r.touchpoint.event_id()))
        .chain(std::iter::once((7_000, at(730, 7_000).event_id())))
        .collect();
    expected.sort_by_key(|e| std::cmp::Reverse(*e));
    for (size, by) in [(1, survivor), (2, loser), (4, survivor), (100, survivor)] {
        let mut query = TimelineQuery {
            limit: size,
            ..TimelineQuery::default()
        };
        let mut seen = Vec::new();
        for _ in 0..expected.len() + 1 {
            let page = store
                .timeline(by, &query)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(page.entries.len() <= size, "a page longer than asked");
            seen.extend(page.entries.iter().map(|e| (e.occurred_at, e.event_id)));
            match page.next {
                Some(next) => query.after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, expected, "pages of {size} read through {by}");
    }
}

fn rust_decimal_total(n: i64) -> rust_decimal::Decimal {
    rust_decimal::Decimal::from(n)
}

/// Concurrent folds of one customer lose no update.
pub async fn profiles_lose_no_concurrent_update(
    store: std::sync::Arc<dyn ProfileStore>,
    prefix: &str,
) {
    let c = CustomerId(Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("{prefix}-busy").as_bytes(),
    ));
    let ids = [email(prefix, "busy")];
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let store = std::sync::Arc::clone(&store);
        let ids = ids.clone();
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            for i in 0..10u64 {
                let n = 1000 + w * 100 + i;
                let t = event(
                    &prefix,
                    n,
                    n as i64,
                    EventType::PointsEarned,
                    &ids,
                    json!({"points": 1}),
                );
                store
                    .apply(&[resolved(c, t)], &FoldOptions::default())
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let p = store
        .profile(c)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no profile"));
    assert_eq!(p.view().loyalty_points, 40, "an update was lost");
}

/// Search finds a customer by a name prefix without diacritics, an email
/// prefix and a national phone prefix, and follows merges.
pub async fn profiles_are_searchable(store: &dyn ProfileStore, prefix: &str) {
    let c = CustomerId(Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("{prefix}-searchable").as_bytes(),
    ));
    let phone = (IdKind::Phone, "+84983334455".to_string());
    let mut t = event(
        prefix,
        500,
        1000,
        EventType::Identify,
        &[email(prefix, "tim"), phone],
        json!({}),
    );
    let name = format!("Nguyễn Thị {prefix}Lâm");
    t.personal.traits.insert("name".into(), json!(name));
    store
        .apply(&[resolved(c, t)], &FoldOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for query in [
        format!("{}lam", prefix.to_lowercase()),
        format!("tim.{prefix}"),
        "0983 334".to_string(),
    ] {
        let prefixes = cdp_domain::search::query_prefixes(&query);
        let found = store
            .search(&prefixes, 10)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            found.contains(&c),
            "search {query:?} did not find the customer: {found:?}"
        );
    }
    let none = store
        .search(&cdp_domain::search::query_prefixes("zzz-nobody"), 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(none.is_empty());
}

/// An erasure removes one customer's profile, timeline and search entries
/// and nothing of anyone else's.
pub async fn profiles_erase_removes_views_and_search(store: &dyn ProfileStore, prefix: &str) {
    let gone = CustomerId(Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("{prefix}-gone").as_bytes(),
    ));
    let kept = CustomerId(Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("{prefix}-kept").as_bytes(),
    ));
    let mut events = Vec::new();
    for (n, (c, who)) in [(gone, "gone"), (kept, "kept")].into_iter().enumerate() {
        let mut t = event(
            prefix,
            600 + n as u64,
            1000,
            EventType::Identify,
            &[email(prefix, who)],
            json!({"total": 5}),
        );
        t.personal
            .traits
            .insert("name".into(), json!(format!("Lê {who} {prefix}")));
        events.push(resolved(c, t));
    }
    store
        .apply(&events, &FoldOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let terms = cdp_domain::search::terms(&events[0].touchpoint);
    store
        .erase_views(&[gone], &terms)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        store
            .row(gone)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none()
    );
    let page = |c| async move {
        store
            .timeline(
                c,
                &TimelineQuery {
                    limit: 10,
                    ..TimelineQuery::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .entries
            .len()
    };
    assert_eq!(page(gone).await, 0);
    assert_eq!(page(kept).await, 1, "the other customer keeps its timeline");
    assert!(
        store
            .profile(kept)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_some()
    );
    for (who, c, expected) in [("gone", gone, false), ("kept", kept, true)] {
        let found = store
            .search(
                &cdp_domain::search::query_prefixes(&format!("{who}.{prefix}")),
                10,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(found.contains(&c), expected, "search for {who}: {found:?}");
        // The raw index too, not only the live filter.
        let raw = store
            .search_range(&format!("email:{who}.{prefix}"), 10)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(raw.contains(&c), expected, "index for {who}: {raw:?}");
    }
    // Erasing again (a retried request) is not an error.
    store
        .erase_views(&[gone], &terms)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Views are sealed under customer keys: once the keys of a customer and
/// of the one merged into it are erased, their profile, timeline and
/// consent read as absent, a late event does not bring them back, and
/// another customer is untouched.
pub async fn profiles_are_sealed_under_customer_keys(
    (store, keyring): (&dyn ProfileStore, Arc<crate::Keyring>),
    prefix: &str,
) {
    let id = |who: &str| {
        CustomerId(Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("{prefix}-{who}").as_bytes(),
        ))
    };
    let (loser, survivor, kept) = (id("sealed-loser"), id("sealed-survivor"), id("sealed-kept"));
    let with_address = |n: u64, who: &str, address: &str| {
        let mut t = event(
            prefix,
            n,
            1000 + i64::try_from(n).unwrap_or(0),
            EventType::OrderCompleted,
            &[(IdKind::UserId, format!("{prefix}-{who}"))],
            json!({"total": 10, "note": format!("giao cho {who}")}),
        );
        t.personal
            .traits
            .insert("address".into(), json!(address.to_owned()));
        t
    };
    let merge = cdp_domain::identity::Merge {
        loser,
        survivor,
        at: 1800,
        cause: cdp_domain::identity::MergeCause {
            event_id: EventId(Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                format!("{prefix}-sealed-merge").as_bytes(),
            )),
            identifier: Identifier::new(IdKind::UserId, format!("{prefix}-survivor")),
            rule: "user_id may merge customers".into(),
        },
    };
    let batch = vec![
        resolved(loser, with_address(700, "loser", "1 Hàng Bạc")),
        resolved(survivor, with_address(701, "survivor", "2 Hàng Bạc")),
        resolved(kept, with_address(702, "kept", "3 Hàng Bạc")),
        ResolvedTouchpoint {
            customer_id: survivor,
            merges: vec![merge],
            touchpoint: with_address(703, "survivor", "2 Hàng Bạc"),
        },
    ];
    store
        .apply(&batch, &FoldOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let all = TimelineQuery {
        limit: 10,
        ..TimelineQuery::default()
    };
    let timeline = |c| {
        let all = all.clone();
        async move {
            store
                .timeline(c, &all)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .entries
        }
    };
    let profile = |c| async move { store.profile(c).await.unwrap_or_else(|e| panic!("{e}")) };
    let address = |p: &cdp_domain::profile::Profile| {
        p.traits
            .get("address")
            .and_then(|t| t.value.as_str().map(str::to_owned))
    };
    let before = profile(survivor).await.expect("the survivor's profile");
    assert_eq!(address(&before).as_deref(), Some("2 Hàng Bạc"));
    assert_eq!(timeline(survivor).await.len(), 3, "the family's timeline");
    assert!(
        timeline(survivor)
            .await
            .iter()
            .any(|e| e.properties.get("note") == Some(&json!("giao cho loser"))),
        "the loser's entries open with the loser's key"
    );

    let subjects: Vec<cdp_seal::Subject> = [loser, survivor]
        .iter()
        .map(|c| crate::sealed::customer_subject(keyring.hasher(), *c))
        .collect();
    keyring
        .erase(&subjects, 2000, "conformance")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(profile(survivor).await, None);
    assert_eq!(profile(loser).await, None, "the redirect leads to nothing");
    assert!(timeline(survivor).await.is_empty());
    assert!(
        store
            .timeline_range(loser, &all)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty(),
        "the loser's own entries"
    );
    // A late event of the erased customer is not folded into a new view.
    store
        .apply(
            &[resolved(
                survivor,
                with_address(704, "survivor", "2 Hàng Bạc"),
            )],
            &FoldOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(profile(survivor).await, None);
    assert!(timeline(survivor).await.is_empty());
    let consents = store
        .consents(&[survivor, kept])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        consents[0].is_none() && consents[1].is_some(),
        "{consents:?}"
    );

    let other = profile(kept).await.expect("the other customer's profile");
    assert_eq!(address(&other).as_deref(), Some("3 Hàng Bạc"));
    assert_eq!(timeline(kept).await.len(), 1);
}

/// The identity graph under customer keys: a node lists its identifiers
/// and a decision names them, read whole through the store; once the
/// customer's key is erased both read as gone, while the merge redirect
/// (which names only customers) still leads to the survivor.
pub async fn identity_is_sealed_under_customer_keys(
    (store, keyring): (&dyn IdentityStore, Arc<crate::Keyring>),
    prefix: &str,
) {
    let rules = IdentityRules::default();
    let anon = (IdKind::AnonymousId, format!("{prefix}-device"));
    let browse = event(
        prefix,
        800,
        1000,
        EventType::PageViewed,
        std::slice::from_ref(&anon),
        json!({}),
    );
    let known = event(
        prefix,
        801,
        2000,
        EventType::Identify,
        &[email(prefix, "sealed")],
        json!({}),
    );
    let out = store
        .resolve(&[browse.clone(), known.clone()], &rules)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (decided(&out[0]).customer_id, decided(&out[1]).customer_id);
    assert_ne!(a, b);
    // The device logs in: the two merge, into the older customer.
    let login = event(
        prefix,
        802,
        3000,
        EventType::Identify,
        &[anon.clone(), email(prefix, "sealed")],
        json!({}),
    );
    let merged = store
        .resolve(std::slice::from_ref(&login), &rules)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let decision = decided(&merged[0]);
    assert_eq!(decision.customer_id, a);
    assert_eq!(decision.merges.len(), 1, "{decision:?}");
    let node = store
        .customer(a)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("the node of {a}"));
    let email_id = Identifier::new(email(prefix, "sealed").0, email(prefix, "sealed").1);
    assert!(node.identifiers.contains(&email_id), "{node:?}");
    assert_eq!(node.merges.len(), 1, "{node:?}");
    assert_eq!(
        store
            .decision(&login)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Some(merged[0].clone())
    );
    assert_eq!(
        store
            .owner(&login.personal.identifiers[0])
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Some(a)
    );

    let subjects: Vec<_> = [a, b]
        .iter()
        .map(|c| crate::sealed::customer_subject(keyring.hasher(), *c))
        .collect();
    keyring
        .erase(&subjects, 1, prefix)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        store.customer(b).await.unwrap_or_else(|e| panic!("{e}")),
        None
    );
    assert_eq!(
        store
            .decision(&login)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        None
    );
    assert_eq!(
        store
            .decision(&known)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        None
    );
    assert_eq!(store.root(b).await.unwrap_or_else(|e| panic!("{e}")), a);
}

/// An erasure forgets the customer's node, the claims of its identifiers
/// and the decisions of its events; another customer is untouched.
pub async fn identity_erase_forgets_claims_nodes_and_decisions(
    store: &dyn IdentityStore,
    prefix: &str,
) {
    let rules = IdentityRules::default();
    let gone = event(
        prefix,
        700,
        1000,
        EventType::Identify,
        &[email(prefix, "gone")],
        json!({}),
    );
    let kept = event(
        prefix,
        701,
        1000,
        EventType::Identify,
        &[email(prefix, "kept")],
        json!({}),
    );
    let out = store
        .resolve(&[gone.clone(), kept.clone()], &rules)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (g, k) = (decided(&out[0]).customer_id, decided(&out[1]).customer_id);
    store
        .erase_graph(&[g], &gone.personal.identifiers, &[gone.event_id()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        store
            .customer(g)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none()
    );
    assert_eq!(
        store
            .owner(&gone.personal.identifiers[0])
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        None
    );
    assert!(
        store
            .decision(&gone)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none()
    );
    assert_eq!(
        store
            .owner(&kept.personal.identifiers[0])
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Some(k)
    );
    assert!(
        store
            .decision(&kept)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_some()
    );
}

/// Unsynced folds are visible at once, idempotent like synced ones, and a
/// sync makes them durable (the caller reopens the store to check that).
pub async fn unsynced_folds_are_visible_then_synced(
    store: &dyn ProfileStore,
    prefix: &str,
) -> CustomerId {
    let c = CustomerId(Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("{prefix}-unsynced").as_bytes(),
    ));
    let options = FoldOptions::default();
    let first = event(
        prefix,
        600,
        1000,
        EventType::Identify,
        &[email(prefix, "una")],
        json!({}),
    );
    let order = event(
        prefix,
        601,
        2000,
        EventType::OrderCompleted,
        &[email(prefix, "una")],
        json!({"order_id": "U-1", "revenue": 120000, "currency": "VND"}),
    );
    let applied = store
        .apply_unsynced(&[resolved(c, first.clone())], &options)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(applied.new_events, 1);
    assert_eq!(applied.customers, vec![c]);
    let seen = store
        .profile(c)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("an unsynced fold is not visible"));
    assert_eq!(seen.customer_id, c);
    // A re-delivery (after a crash before the sync) folds nothing twice.
    let again = store
        .apply_unsynced(&[resolved(c, first), resolved(c, order)], &options)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.new_events, 1);
    store.sync().await.unwrap_or_else(|e| panic!("{e}"));
    let page = store
        .timeline(
            c,
            &TimelineQuery {
                limit: 10,
                ..TimelineQuery::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(page.entries.len(), 2);
    c
}

/// Generations: a new generation starts empty beside the active one, the
/// switch moves every reader of [`crate::LiveStores`] in one step, the
/// active generation cannot be dropped, and a dropped one is gone.
pub async fn generations_switch_and_drop(generations: Arc<dyn crate::Generations>, prefix: &str) {
    use crate::{FIRST_GENERATION, LiveStores};
    let rules = IdentityRules::default();
    let options = FoldOptions::default();
    let live = LiveStores::open(std::sync::Arc::clone(&generations))
        .await
        .expect("generations");
    assert_eq!(live.generation(), FIRST_GENERATION);
    let ana = email(prefix, "gen-ana");
    let first = event(
        prefix,
        9001,
        1_000,
        EventType::Identify,
        std::slice::from_ref(&ana),
        json!({}),
    );
    let resolved = live
        .current()
        .identity
        .resolve(std::slice::from_ref(&first), &rules)
        .await
        .expect("generations");
    let customer = decided(&resolved[0]).customer_id;
    live.current()
        .profiles
        .apply(
            &[ResolvedTouchpoint {
                customer_id: customer,
                merges: Vec::new(),
                touchpoint: first.clone(),
            }],
            &options,
        )
        .await
        .expect("generations");
    let id = Identifier::new(ana.0.clone(), ana.1.clone());
    let owner = |live: &LiveStores| {
        let identity = live.current().identity;
        let id = id.clone();
        async move { identity.owner(&id).await.expect("generations") }
    };
    assert_eq!(owner(&live).await, Some(customer));

    // A new generation is empty and does not disturb the active one.
    let next = generations
        .open(FIRST_GENERATION + 1)
        .await
        .expect("generations");
    assert_eq!(next.identity.owner(&id).await.expect("generations"), None);
    assert_eq!(live.refresh().await.expect("generations"), FIRST_GENERATION);
    assert_eq!(owner(&live).await, Some(customer));
    let listed = generations.list().await.expect("generations");
    assert!(listed.iter().any(|g| g.id == FIRST_GENERATION && g.active));
    assert!(
        listed
            .iter()
            .any(|g| g.id == FIRST_GENERATION + 1 && !g.active)
    );

    // Fill it (as a rebuild does) and switch.
    let again = next
        .identity
        .resolve(std::slice::from_ref(&first), &rules)
        .await
        .expect("generations");
    assert_eq!(
        decided(&again[0]).customer_id,
        customer,
        "a rebuild under the same rules gives the same customer id"
    );
    assert!(
        generations.activate(FIRST_GENERATION).await.is_err(),
        "the active generation cannot be activated again"
    );
    assert!(generations.activate(FIRST_GENERATION + 5).await.is_err());
    generations
        .activate(FIRST_GENERATION + 1)
        .await
        .expect("generations");
    assert_eq!(
        generations.active().await.expect("generations"),
        FIRST_GENERATION + 1
    );
    assert_eq!(
        live.refresh().await.expect("generations"),
        FIRST_GENERATION + 1
    );
    assert_eq!(live.generation(), FIRST_GENERATION + 1);
    assert_eq!(owner(&live).await, Some(customer));
    assert!(
        live.current()
            .profiles
            .profile(customer)
            .await
            .expect("generations")
            .is_none(),
        "the new generation's profiles hold only what was folded into it"
    );
    assert!(
        generations.activate(FIRST_GENERATION).await.is_err(),
        "going back to a retired generation is refused"
    );
    assert!(
        generations
            .drop_generation(FIRST_GENERATION + 1)
            .await
            .is_err(),
        "the active generation cannot be dropped"
    );

    // The old generation can be dropped; opened again, it is empty.
    generations
        .drop_generation(FIRST_GENERATION)
        .await
        .expect("generations");
    // A dropped number is never handed out again as new.
    let extra = generations
        .open(FIRST_GENERATION + 2)
        .await
        .expect("generations");
    assert_eq!(extra.generation, FIRST_GENERATION + 2);
    generations
        .drop_generation(FIRST_GENERATION + 2)
        .await
        .expect("generations");
    assert_eq!(
        generations.highest().await.expect("generations"),
        FIRST_GENERATION + 2,
        "the highest number opened is kept after its generation is dropped"
    );
    let listed = generations.list().await.expect("generations");
    assert!(!listed.iter().any(|g| g.id == FIRST_GENERATION));
    assert!(generations.drop_generation(FIRST_GENERATION).await.is_err());
    let reopened = generations
        .open(FIRST_GENERATION)
        .await
        .expect("generations");
    assert_eq!(
        reopened.identity.owner(&id).await.expect("generations"),
        None
    );
}
