//! Unit tests, and tests against a running server that need the crate's
//! internals (crash injection).

use std::collections::HashSet;
use std::sync::Mutex;

/// Crash points armed by a test: the next pass through an armed point
/// panics, which (in a spawned task) leaves the database exactly as a
/// process killed there would.
#[derive(Default)]
pub(crate) struct Faults {
    armed: Mutex<HashSet<&'static str>>,
}

impl Faults {
    pub(crate) fn arm(&self, point: &'static str) {
        self.armed.lock().unwrap().insert(point);
    }

    pub(crate) fn hit(&self, point: &'static str) {
        let armed = self.armed.lock().unwrap().remove(point);
        if armed {
            panic!("injected crash at {point}");
        }
    }
}

mod unit {
    use std::collections::HashMap;

    use cdp_domain::identity::{Merge, MergeCause};
    use cdp_domain::profile::{FoldOptions, Profile, ProfileAccess, ProfileSlot, fold_resolved};
    use cdp_domain::{CustomerId, IdKind, Identifier, ResolvedTouchpoint};
    use scylla::value::CqlValue;
    use uuid::Uuid;

    use super::fixtures::{customer, points};
    use crate::profile::{
        Entry, EventAccess, PendingMerge, Stored, prefix_upper_bound, search_bucket, settle_chain,
    };
    use crate::schema::check_keyspace_name;
    use crate::{Fence, ScyllaConfig, lwt_applied};

    #[test]
    fn fencing_timestamps_grow_within_a_call_and_across_epochs() {
        let mut first = Fence::new(1).unwrap();
        assert_eq!(first.next().unwrap(), 1_000_000_000);
        assert_eq!(first.next().unwrap(), 1_000_000_001);
        let mut last_of_epoch_1 = Fence::new(1).unwrap();
        let mut ts = 0;
        for _ in 0..3 {
            ts = last_of_epoch_1.next().unwrap();
        }
        let mut second = Fence::new(2).unwrap();
        let first_of_epoch_2 = second.next().unwrap();
        assert!(first_of_epoch_2 > ts);
        // Even the largest timestamp of an epoch is below the next epoch's.
        assert!(Fence::SPAN + (Fence::SPAN - 1) < first_of_epoch_2);
        assert_eq!(first_of_epoch_2, 2 * Fence::SPAN);
    }

    #[test]
    fn fencing_rejects_bad_epochs_and_too_many_writes() {
        assert!(Fence::new(0).is_err());
        assert!(Fence::new(-3).is_err());
        assert!(Fence::new(i64::MAX / Fence::SPAN).is_err());
        let biggest = Fence::new(i64::MAX / Fence::SPAN - 1).unwrap();
        assert!(biggest.base + (Fence::SPAN - 1) > 0, "no overflow");
        let mut f = Fence::new(5).unwrap();
        f.next = Fence::SPAN - 1;
        assert_eq!(f.next().unwrap(), 6 * Fence::SPAN - 1);
        assert!(
            f.next().is_err(),
            "the counter may not reach the next epoch"
        );
    }

    #[test]
    fn applied_is_read_from_the_first_column_whatever_follows() {
        // Cassandra on success.
        assert!(lwt_applied(&[Some(CqlValue::Boolean(true))]).unwrap());
        // Cassandra on failure: [applied] and the current row.
        assert!(
            !lwt_applied(&[
                Some(CqlValue::Boolean(false)),
                Some(CqlValue::BigInt(7)),
                None,
            ])
            .unwrap()
        );
        // ScyllaDB: every column, also on success.
        assert!(
            lwt_applied(&[
                Some(CqlValue::Boolean(true)),
                None,
                Some(CqlValue::Text("x".into())),
            ])
            .unwrap()
        );
        assert!(lwt_applied(&[]).is_err());
        assert!(lwt_applied(&[None]).is_err());
        assert!(lwt_applied(&[Some(CqlValue::Int(1))]).is_err());
    }

    #[test]
    fn search_buckets_hold_every_term_a_prefix_matches() {
        assert_eq!(search_bucket("name:nguyen"), "name:ng");
        assert_eq!(search_bucket("name:ng"), "name:ng");
        assert_eq!(search_bucket("email:tim.x@shop.vn"), "email:ti");
        assert_eq!(search_bucket("tel:0983334455"), "tel:0983");
        assert_eq!(search_bucket("tel:84983334455"), "tel:8498");
        // Shorter than the bucket: the term is its own bucket.
        assert_eq!(search_bucket("name:a"), "name:a");
        assert_eq!(search_bucket("tel:09"), "tel:09");
        assert_eq!(search_bucket("xy"), "xy");
        // Multi-byte characters count as one.
        assert_eq!(search_bucket("name:ấn độ"), "name:ấn");
        for (term, prefix) in [
            ("name:nguyen thi lan", "name:nguy"),
            ("tel:0983334455", "tel:0983 3"),
            ("email:tim.x@shop.vn", "email:tim."),
        ] {
            if term.starts_with(prefix) {
                assert_eq!(search_bucket(term), search_bucket(prefix));
            }
        }
    }

    #[test]
    fn the_upper_bound_of_a_prefix_excludes_exactly_what_does_not_start_with_it() {
        assert_eq!(prefix_upper_bound("name:ab"), "name:ac");
        assert_eq!(prefix_upper_bound("a\u{D7FF}"), "a\u{E000}");
        assert_eq!(prefix_upper_bound("a\u{10FFFF}"), "b");
        let bound = prefix_upper_bound("name:lam");
        for s in ["name:lam", "name:lam thi", "name:lam\u{10FFFF}"] {
            assert!(s < bound.as_str(), "{s}");
        }
        for s in ["name:lan", "name:lb", "name:m"] {
            assert!(s >= bound.as_str(), "{s}");
        }
    }

    #[test]
    fn config_defaults_and_partial_files() {
        let c = ScyllaConfig::default();
        assert_eq!(c.lease_ms, 10_000);
        assert_eq!(
            c.replication,
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        );
        let c: ScyllaConfig =
            serde_json::from_str(r#"{"keyspace": "cdp_prod", "lease_ms": 3000}"#).unwrap();
        assert_eq!(c.keyspace, "cdp_prod");
        assert_eq!(c.lease_ms, 3000);
        assert_eq!(c.nodes, vec!["127.0.0.1:9042".to_string()]);
        assert!(serde_json::from_str::<ScyllaConfig>(r#"{"lease": 1}"#).is_err());
    }

    #[test]
    fn keyspace_names_are_checked_before_they_reach_cql() {
        assert!(check_keyspace_name("cdp_test_0af3").is_ok());
        for bad in ["", "1cdp", "cdp-x", "cdp; DROP", &"k".repeat(49)] {
            assert!(check_keyspace_name(bad).is_err(), "{bad}");
        }
    }

    fn merge(loser: CustomerId, survivor: CustomerId, name: &str) -> ResolvedTouchpoint {
        let mut r = points(survivor, name, 100);
        r.merges.push(Merge {
            loser,
            survivor,
            at: 100,
            cause: MergeCause {
                event_id: r.touchpoint.event_id(),
                identifier: Identifier::new(IdKind::Email, "m@x.vn"),
                rule: "test".into(),
            },
        });
        r
    }

    fn live(p: &Profile) -> Entry {
        Entry {
            slot: ProfileSlot::Live(Box::new(p.clone())),
            pending: None,
            fresh: false,
        }
    }

    fn profile_with(c: CustomerId, names: &[&str]) -> Profile {
        let mut p = Profile::new(c);
        for (i, n) in names.iter().enumerate() {
            assert!(p.apply(&points(c, n, i as i64).touchpoint, &FoldOptions::default()));
        }
        p
    }

    #[test]
    fn settling_absorbs_a_pending_merge_once_nearest_the_root_first() {
        let (l, s, t) = (customer("l"), customer("s"), customer("t"));
        let pl = profile_with(l, &["l1", "l2"]);
        let mut ps = profile_with(s, &["s1"]);
        ps.absorb(pl.clone());
        let pt = profile_with(t, &["t1"]);
        let pending_l = PendingMerge {
            absorbed: Some(Box::new(pl)),
        };
        let pending_s = PendingMerge {
            absorbed: Some(Box::new(ps)),
        };
        // L -> S -> T, both pending: S's kept profile already holds L.
        let (root, changed) = settle_chain(
            &[(l, Some(&pending_l)), (s, Some(&pending_s))],
            t,
            Some(pt.clone()),
        );
        let root = root.unwrap();
        assert!(changed);
        assert_eq!(root.view().loyalty_points, 4);
        assert_eq!(root.merged_from, [l, s].into_iter().collect());
        // Settling again (the root already lists both) changes nothing.
        let (again, changed) = settle_chain(
            &[(l, Some(&pending_l)), (s, Some(&pending_s))],
            t,
            Some(root.clone()),
        );
        assert!(!changed);
        assert_eq!(again.unwrap(), root);
        // A loser without a profile only joins merged_from; a missing root
        // starts empty.
        let empty = PendingMerge { absorbed: None };
        let (root, changed) = settle_chain(&[(l, Some(&empty))], t, None);
        assert!(changed);
        let root = root.unwrap();
        assert_eq!(root.customer_id, t);
        assert_eq!(root.merged_from, [l].into_iter().collect());
    }

    #[test]
    fn a_fold_freezes_the_loser_with_what_the_survivor_absorbed() {
        let (l, s) = (customer("l"), customer("s"));
        let pl = profile_with(l, &["l1"]);
        let ps = profile_with(s, &["s1"]);
        let rows: HashMap<CustomerId, Option<Stored>> = [
            (
                l,
                Some(Stored {
                    version: 3,
                    entry: live(&pl),
                }),
            ),
            (
                s,
                Some(Stored {
                    version: 1,
                    entry: live(&ps),
                }),
            ),
        ]
        .into_iter()
        .collect();
        let batch = HashMap::new();
        let mut access = EventAccess::new(&rows, &batch);
        fold_resolved(&mut access, &merge(l, s, "m"), &FoldOptions::default()).unwrap();
        assert!(access.missing.is_empty());
        let loser = &access.writes[&l];
        assert_eq!(loser.slot, ProfileSlot::MergedInto(s));
        assert!(loser.fresh);
        assert_eq!(
            loser.pending,
            Some(PendingMerge {
                absorbed: Some(Box::new(pl))
            })
        );
        match &access.writes[&s].slot {
            ProfileSlot::Live(p) => assert_eq!(p.view().loyalty_points, 3),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fold_completes_a_merge_left_pending_before_folding() {
        let (l, s) = (customer("l"), customer("s"));
        let pl = profile_with(l, &["l1", "l2"]);
        let ps = profile_with(s, &["s1"]);
        // A crash left L frozen and S without L.
        let rows: HashMap<CustomerId, Option<Stored>> = [
            (
                l,
                Some(Stored {
                    version: 4,
                    entry: Entry {
                        slot: ProfileSlot::MergedInto(s),
                        pending: Some(PendingMerge {
                            absorbed: Some(Box::new(pl)),
                        }),
                        fresh: false,
                    },
                }),
            ),
            (
                s,
                Some(Stored {
                    version: 1,
                    entry: live(&ps),
                }),
            ),
        ]
        .into_iter()
        .collect();
        let batch = HashMap::new();
        // The re-delivered merge: the loser already redirects, so the fold
        // skips the merge; loading the loser completes it.
        let mut access = EventAccess::new(&rows, &batch);
        let entry = fold_resolved(&mut access, &merge(l, s, "m"), &FoldOptions::default()).unwrap();
        assert!(entry.timeline.is_some());
        assert!(access.missing.is_empty());
        assert_eq!(access.writes[&l].pending, None, "the loser is settled");
        match &access.writes[&s].slot {
            ProfileSlot::Live(p) => {
                assert_eq!(p.view().loyalty_points, 4, "absorbed once, then the event");
                assert!(p.merged_from.contains(&l));
            }
            other => panic!("{other:?}"),
        }
        // A row not read yet is reported missing, not invented.
        let rows: HashMap<CustomerId, Option<Stored>> = HashMap::new();
        let mut access = EventAccess::new(&rows, &batch);
        assert_eq!(access.load(l).unwrap(), None);
        assert!(access.missing.contains(&l));
        let _ = Uuid::nil();
    }
}

pub(crate) mod fixtures {
    use cdp_domain::{
        Attributes, Channel, CustomerId, Envelope, EventId, EventType, IdKind, Identifier,
        Personal, ResolvedTouchpoint, Touchpoint,
    };
    use serde_json::json;
    use uuid::Uuid;

    pub(crate) fn customer(name: &str) -> CustomerId {
        CustomerId(Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("customer-{name}").as_bytes(),
        ))
    }

    pub(crate) fn event(
        name: &str,
        at: i64,
        event_type: EventType,
        ids: &[Identifier],
    ) -> Touchpoint {
        let mut identifiers = ids.to_vec();
        identifiers.sort();
        let properties = match event_type {
            EventType::PointsEarned => json!({"points": 1}),
            _ => json!({}),
        };
        Touchpoint {
            envelope: Envelope {
                event_id: EventId(Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())),
                event_type,
                channel: Channel::Web,
                source_id: "unit".into(),
                occurred_at: at,
                received_at: at,
                properties: properties.as_object().cloned().unwrap_or_default(),
            },
            personal: Personal {
                identifiers,
                traits: Attributes::new(),
                ..Personal::default()
            },
        }
    }

    /// A one-point event of `customer`.
    pub(crate) fn points(customer: CustomerId, name: &str, at: i64) -> ResolvedTouchpoint {
        ResolvedTouchpoint {
            customer_id: customer,
            merges: Vec::new(),
            touchpoint: event(
                name,
                at,
                EventType::PointsEarned,
                &[Identifier::new(IdKind::Email, format!("{name}@unit.vn"))],
            ),
        }
    }
}

/// Crashes injected at each step of the commit protocols, against a real
/// server: ignored by a plain `cargo test`; `make test` starts Cassandra and
/// runs them, and an unreachable server fails them.
mod server {
    use std::future::Future;
    use std::time::{Duration, Instant};

    use cdp_domain::identity::{Claim, Merge, MergeCause};
    use cdp_domain::profile::FoldOptions;
    use cdp_domain::{
        CustomerId, EventType, IdKind, Identifier, IdentityRules, Resolution, ResolvedTouchpoint,
    };
    use cdp_store::{IdentityStore, ProfileStore, TimelineQuery};
    use uuid::Uuid;

    use super::fixtures::{customer, event, points};
    use crate::identity::Intent;
    use crate::{Fence, ScyllaConfig, ScyllaStore, now_ms};

    /// Runs `body` with two stores (separate sessions) on a fresh keyspace
    /// and drops it afterwards, even when the body panics.
    async fn with_keyspace<F, Fut>(test: &str, lease_ms: u64, body: F)
    where
        F: FnOnce(ScyllaStore, ScyllaStore) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let addr = std::env::var("CDP_CQL_ADDR").unwrap_or_else(|_| "127.0.0.1:9042".into());
        let suffix = Uuid::new_v4().simple().to_string();
        let config = ScyllaConfig {
            nodes: vec![addr.clone()],
            keyspace: format!("cdp_test_{}", &suffix[..16]),
            lease_ms,
            ..ScyllaConfig::default()
        };
        let a = match ScyllaStore::connect(&config).await {
            Ok(store) => store,
            Err(e) => panic!(
                "{test}: cannot connect to a CQL server at {addr} ({e}); `make test` starts Cassandra"
            ),
        };
        let b = ScyllaStore::connect(&config).await.unwrap();
        let outcome = tokio::spawn(body(a.clone(), b)).await;
        a.drop_keyspace().await.unwrap();
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    fn email(v: &str) -> Identifier {
        Identifier::new(IdKind::Email, v)
    }

    fn decided(r: &Resolution) -> &cdp_domain::Decision {
        match r {
            Resolution::Resolved(d) => d,
            other => panic!("expected a decision, got {other:?}"),
        }
    }

    /// `store` sealing with a keyring of its own on its keyspace.
    async fn sealing(store: &ScyllaStore) -> ScyllaStore {
        let text = cdp_seal::MasterKeys::generate_file().unwrap();
        let master = cdp_seal::MasterKeys::parse(&text).unwrap();
        let rows = crate::ScyllaKeyRows::new(store).await.unwrap();
        let keyring =
            cdp_store::Keyring::open(std::sync::Arc::new(rows), master, Duration::ZERO, 64)
                .await
                .unwrap();
        store
            .clone()
            .with_seal(cdp_store::ViewSeal::new(std::sync::Arc::new(keyring)))
    }

    /// A keyspace whose graph was written in clear, by a version before
    /// sealing, opened by a sealing store: its claims are filed under
    /// hashed identifiers once, an intent left in clear is rolled forward
    /// sealed, and every identifier still finds its customer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs a CQL server on 127.0.0.1:9042: `make test` starts Cassandra"]
    async fn a_graph_in_clear_is_sealed_when_opened_with_keys() {
        with_keyspace("graph_sealed_on_open", 300, |a, _| async move {
            let rules = IdentityRules::default();
            let (x, y, z) = (
                email("x@clear.vn"),
                email("y@clear.vn"),
                email("z@clear.vn"),
            );
            let first = event("clear-1", 10, EventType::Identify, std::slice::from_ref(&x));
            let owner = decided(&a.resolve(&[first], &rules).await.unwrap()[0]).customer_id;
            // A holder of the version before sealing stored its intent in
            // clear and died.
            let lease = a.acquire_lease().await.unwrap();
            let clear = serde_json::json!({
                "claims": [[y, Claim::new(owner, cdp_domain::EventId(Uuid::nil()), 20)]],
                "nodes": [],
                "resolutions": [],
            });
            assert!(
                a.set_pending(&lease, Some(serde_json::to_vec(&clear).unwrap()))
                    .await
                    .unwrap()
            );
            tokio::time::sleep(Duration::from_millis(400)).await;

            let sealed = sealing(&a).await;
            assert_eq!(sealed.seal_claims().await.unwrap(), 1);
            assert_eq!(sealed.seal_claims().await.unwrap(), 0, "once per keyspace");
            assert_eq!(sealed.owner(&x).await.unwrap(), Some(owner));
            let second = event("clear-2", 30, EventType::Identify, &[x.clone(), z.clone()]);
            let d = decided(&sealed.resolve(&[second], &rules).await.unwrap()[0]).clone();
            assert_eq!(d.customer_id, owner);
            assert_eq!(
                sealed.owner(&y).await.unwrap(),
                Some(owner),
                "rolled forward"
            );
            let node = sealed.customer(owner).await.unwrap().unwrap();
            assert!(node.identifiers.contains(&z), "{node:?}");

            // No claim key nor node names an identifier any more.
            let ks = sealed.keyspace().to_owned();
            let rows = sealed
                .session()
                .query_unpaged(format!("SELECT id FROM {ks}.claims"), ())
                .await
                .unwrap()
                .into_rows_result()
                .unwrap();
            let keys: Vec<String> = rows
                .rows::<(String,)>()
                .unwrap()
                .map(|r| r.unwrap().0)
                .collect();
            assert_eq!(keys.len(), 3, "{keys:?}");
            assert!(
                keys.iter()
                    .all(|k| k.starts_with('#') && !k.contains("clear.vn")),
                "{keys:?}"
            );
            let rows = sealed
                .session()
                .query_unpaged(format!("SELECT node FROM {ks}.customers"), ())
                .await
                .unwrap()
                .into_rows_result()
                .unwrap();
            for (node,) in rows.rows::<(Vec<u8>,)>().unwrap().map(Result::unwrap) {
                assert!(
                    !node.windows(8).any(|w| w == b"clear.vn"),
                    "a node in clear"
                );
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs a CQL server on 127.0.0.1:9042: `make test` starts Cassandra"]
    async fn an_intent_left_by_a_crashed_holder_is_rolled_forward() {
        with_keyspace("intent_rolled_forward", 1_500, |a, b| async move {
            let rules = IdentityRules::default();
            let (x, y) = (email("x@crash.vn"), email("y@crash.vn"));
            let crashed = event("crash-1", 10, EventType::Identify, std::slice::from_ref(&x));
            a.inner.faults.arm("identity.after_intent");
            let run = {
                let (a, e, rules) = (a.clone(), crashed.clone(), rules.clone());
                tokio::spawn(async move { a.resolve(&[e], &rules).await })
            };
            assert!(run.await.is_err(), "the holder crashed");
            // Committed but not applied, and the lease still runs.
            let row = b.read_lease().await.unwrap().unwrap();
            assert!(row.pending.is_some());
            assert!(row.until > now_ms());
            assert_eq!(b.owner(&x).await.unwrap(), None);

            // The next holder waits for the lease, then finishes the intent
            // before its own work.
            let started = Instant::now();
            let other = event("crash-2", 20, EventType::Identify, std::slice::from_ref(&y));
            b.resolve(&[other], &rules).await.unwrap();
            assert!(started.elapsed() > Duration::from_millis(200));
            let expected =
                CustomerId::derived_from(crashed.event_id(), crashed.envelope.received_at);
            assert_eq!(b.owner(&x).await.unwrap(), Some(expected));
            assert!(b.read_lease().await.unwrap().unwrap().pending.is_none());
            // The crashed event's decision was kept: a re-delivery gets it.
            let again = b.resolve(&[crashed], &rules).await.unwrap();
            let d = decided(&again[0]);
            assert!(d.created);
            assert_eq!(d.customer_id, expected);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs a CQL server on 127.0.0.1:9042: `make test` starts Cassandra"]
    async fn a_holder_crashing_before_its_release_loses_nothing() {
        with_keyspace("crash_before_release", 1_000, |a, b| async move {
            let rules = IdentityRules::default();
            let (x, y) = (email("x@late.vn"), email("y@late.vn"));
            let first = event("late-1", 10, EventType::Identify, std::slice::from_ref(&x));
            let link = event("late-2", 20, EventType::Identify, &[x.clone(), y.clone()]);
            a.inner.faults.arm("identity.after_apply");
            let run = {
                let (a, e, rules) = (a.clone(), first.clone(), rules.clone());
                tokio::spawn(async move { a.resolve(&[e], &rules).await })
            };
            assert!(run.await.is_err());
            let linked = b.resolve(&[link], &rules).await.unwrap();
            let d = decided(&linked[0]);
            assert_eq!(
                d.customer_id,
                CustomerId::derived_from(first.event_id(), first.envelope.received_at)
            );
            assert_eq!(b.owner(&y).await.unwrap(), Some(d.customer_id));
            let node = b.customer(d.customer_id).await.unwrap().unwrap();
            assert_eq!(node.identifiers, [x, y].into_iter().collect());
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs a CQL server on 127.0.0.1:9042: `make test` starts Cassandra"]
    async fn a_stale_holder_can_neither_commit_nor_overwrite() {
        with_keyspace("stale_holder_fenced", 300, |a, b| async move {
            let rules = IdentityRules::default();
            let x = email("x@fence.vn");
            let stale = a.acquire_lease().await.unwrap();
            // The stale holder stalls past its lease; another takes over.
            tokio::time::sleep(Duration::from_millis(400)).await;
            let e = event("fence-1", 10, EventType::Identify, std::slice::from_ref(&x));
            let owner = decided(&b.resolve(&[e], &rules).await.unwrap()[0]).customer_id;
            assert!(!a.set_pending(&stale, Some(b"{}".to_vec())).await.unwrap());

            // Its late writes reach the server but lose to the later epoch.
            let intruder = customer("intruder");
            let bogus = Intent {
                claims: vec![(
                    a.claim_key(&x),
                    Claim::new(intruder, cdp_domain::EventId(Uuid::nil()), 1),
                )],
                ..Intent::default()
            };
            a.apply_intent(&bogus, &mut Fence::new(stale.epoch).unwrap())
                .await
                .unwrap();
            assert_eq!(b.owner(&x).await.unwrap(), Some(owner));
            // The same write from a later epoch does win: the fence is what
            // stopped it.
            let current = b.read_lease().await.unwrap().unwrap().epoch;
            a.apply_intent(&bogus, &mut Fence::new(current + 1).unwrap())
                .await
                .unwrap();
            assert_eq!(b.owner(&x).await.unwrap(), Some(intruder));
        })
        .await;
    }

    fn merge(loser: CustomerId, survivor: CustomerId, name: &str) -> ResolvedTouchpoint {
        let mut r = points(survivor, name, 500);
        r.merges.push(Merge {
            loser,
            survivor,
            at: 500,
            cause: MergeCause {
                event_id: r.touchpoint.event_id(),
                identifier: email("m@merge.vn"),
                rule: "email may merge customers".into(),
            },
        });
        r
    }

    async fn points_of(store: &ScyllaStore, c: CustomerId) -> i64 {
        store
            .profile(c)
            .await
            .unwrap()
            .unwrap()
            .view()
            .loyalty_points
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs a CQL server on 127.0.0.1:9042: `make test` starts Cassandra"]
    async fn a_merge_frozen_by_a_crashed_worker_is_completed_once() {
        with_keyspace("merge_frozen", 10_000, |a, b| async move {
            let options = FoldOptions::default();
            let (l, s) = (customer("frozen-l"), customer("frozen-s"));
            b.apply(
                &[
                    points(l, "fl1", 1),
                    points(l, "fl2", 2),
                    points(s, "fs1", 3),
                ],
                &options,
            )
            .await
            .unwrap();
            let m = merge(l, s, "fm");
            a.inner.faults.arm("profile.after_freeze");
            let run = {
                let (a, m, options) = (a.clone(), m.clone(), options.clone());
                tokio::spawn(async move { a.apply(&[m], &options).await })
            };
            assert!(run.await.is_err(), "the worker crashed");
            // Frozen: reads through the loser see the merge completed; the
            // survivor shows its own data until someone completes it.
            let raw = b.fetch_profile(l).await.unwrap().unwrap();
            assert!(raw.entry.pending.is_some());
            let via_loser = b.profile(l).await.unwrap().unwrap();
            assert_eq!(via_loser.customer_id, s);
            assert_eq!(via_loser.view().loyalty_points, 3);
            assert_eq!(points_of(&b, s).await, 1);

            // A fold into the loser completes the merge first.
            b.apply(&[points(l, "fl3", 4)], &options).await.unwrap();
            assert_eq!(points_of(&b, s).await, 4);
            assert!(
                b.fetch_profile(l)
                    .await
                    .unwrap()
                    .unwrap()
                    .entry
                    .pending
                    .is_none()
            );
            // The re-delivered merge folds its event once, absorbs nothing again.
            assert_eq!(
                b.apply(std::slice::from_ref(&m), &options)
                    .await
                    .unwrap()
                    .new_events,
                1
            );
            assert_eq!(b.apply(&[m], &options).await.unwrap().new_events, 0);
            assert_eq!(points_of(&b, s).await, 5);
            assert_eq!(points_of(&b, l).await, 5);
            let page = b
                .timeline(
                    l,
                    &TimelineQuery {
                        limit: 10,
                        ..TimelineQuery::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(page.entries.len(), 5);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs a CQL server on 127.0.0.1:9042: `make test` starts Cassandra"]
    async fn a_merge_absorbed_before_a_crash_is_not_absorbed_twice() {
        with_keyspace("merge_absorbed", 10_000, |a, b| async move {
            let options = FoldOptions::default();
            let (l, s) = (customer("absorbed-l"), customer("absorbed-s"));
            b.apply(&[points(l, "al1", 1), points(s, "as1", 2)], &options)
                .await
                .unwrap();
            let m = merge(l, s, "am");
            a.inner.faults.arm("profile.after_live");
            let run = {
                let (a, m, options) = (a.clone(), m.clone(), options.clone());
                tokio::spawn(async move { a.apply(&[m], &options).await })
            };
            assert!(run.await.is_err(), "the worker crashed");
            // Absorbed but not settled: both ids read the merged profile once.
            assert!(
                b.fetch_profile(l)
                    .await
                    .unwrap()
                    .unwrap()
                    .entry
                    .pending
                    .is_some()
            );
            assert_eq!(points_of(&b, s).await, 3);
            assert_eq!(points_of(&b, l).await, 3);
            // Re-delivery: nothing new, the loser is settled.
            assert_eq!(
                b.apply(std::slice::from_ref(&m), &options)
                    .await
                    .unwrap()
                    .new_events,
                0
            );
            assert!(
                b.fetch_profile(l)
                    .await
                    .unwrap()
                    .unwrap()
                    .entry
                    .pending
                    .is_none()
            );
            b.apply(&[points(l, "al2", 3)], &options).await.unwrap();
            assert_eq!(points_of(&b, s).await, 4);
        })
        .await;
    }
}
