//! Projection rebuild (issue #7, I4): the views are rebuilt from the log
//! into a new generation while the active one keeps answering, then every
//! process switches to it; on both back ends (Kafka + Cassandra with
//! `CDP_E2E_BACKEND=distributed`, where the projection process runs the
//! rebuild and the other processes switch on their own).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use cdp_domain::journey::{self, JourneyConfig};
use cdp_e2e::{CdpProcess, expect_reference, now_ms, reference_of, to_api};
use cdp_proto::v1::projection_service_client::ProjectionServiceClient;
use cdp_proto::v1::{
    CompareGenerationsRequest, DropGenerationRequest, GetProfileRequest, Identifier,
    ListGenerationsRequest, TrackBatchRequest, get_profile_request::Lookup,
};

fn lookup(id: Identifier) -> GetProfileRequest {
    GetProfileRequest {
        lookup: Some(Lookup::Identifier(id)),
        timeline_limit: 5,
        as_of: None,
    }
}

/// Events keep arriving and agents keep looking customers up while the
/// views are rebuilt; after the switch the views are the reference fold of
/// every event, the old generation can be dropped, the active one cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_while_events_arrive_switches_to_the_same_views() {
    let cdp = CdpProcess::start();
    let now = now_ms();
    let config = JourneyConfig {
        customers: 60,
        namespace: cdp_e2e::unique("rebuild"),
        start: now - 20 * 86_400_000,
        span_ms: 19 * 86_400_000,
        ..JourneyConfig::default()
    };
    let (_, events) = journey::generate(11, &config);
    let batches: Vec<TrackBatchRequest> = events
        .chunks(20)
        .map(|chunk| TrackBatchRequest {
            touchpoints: chunk.iter().map(|g| to_api(&g.event)).collect(),
        })
        .collect();
    let third = batches.len() / 3;
    let mut batches = batches.into_iter();
    let mut ingest = cdp.ingest().await;
    for b in batches.by_ref().take(third) {
        let n = b.touchpoints.len();
        let r = ingest.track_batch(b).await.unwrap().into_inner();
        assert_eq!(r.accepted as usize, n);
    }
    let first_third: usize = events.len().min(third * 20);
    let early = reference_of(&events[..first_third], now).unwrap();
    let mut profiles = cdp.profiles().await;
    expect_reference(&mut profiles, &early, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cdp.log()));
    let known: Vec<Identifier> = early
        .customers()
        .iter()
        .filter_map(|c| c.identifiers.iter().next())
        .map(|i| cdp_e2e::id(i.kind.as_str(), &i.value))
        .collect();

    // During the rebuild: the second third arrives, lookups go on.
    let during: Vec<TrackBatchRequest> = batches.by_ref().take(third).collect();
    let done = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let traffic = {
        let mut ingest = cdp.ingest().await;
        let mut profiles = cdp.profiles().await;
        let (done, answered, known) = (Arc::clone(&done), Arc::clone(&answered), known.clone());
        tokio::spawn(async move {
            let mut pending = during.into_iter();
            let mut k = 0usize;
            while !done.load(Ordering::SeqCst) || pending.len() > 0 {
                if let Some(b) = pending.next() {
                    let n = b.touchpoints.len();
                    let r = ingest.track_batch(b).await.unwrap().into_inner();
                    assert_eq!(r.accepted as usize, n);
                }
                let id = known[k % known.len()].clone();
                k += 1;
                let p = profiles
                    .get_profile(lookup(id.clone()))
                    .await
                    .unwrap_or_else(|e| panic!("lookup of {id:?} failed during the rebuild: {e}"))
                    .into_inner();
                assert!(cdp_e2e::metrics(p.profile.as_ref().unwrap()).events_count > 0);
                answered.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut projections = ProjectionServiceClient::new(cdp.projection_channel().await);
    let before = answered.load(Ordering::SeqCst);
    let generation = cdp.rebuild_until(true).await;
    assert_eq!(generation, 2);
    let during_rebuild = answered.load(Ordering::SeqCst) - before;
    done.store(true, Ordering::SeqCst);
    traffic.await.unwrap();

    // After the switch: the last third goes to the new generation.
    for b in batches {
        let n = b.touchpoints.len();
        let r = ingest.track_batch(b).await.unwrap().into_inner();
        assert_eq!(r.accepted as usize, n);
    }
    let model = reference_of(&events, now).unwrap();
    expect_reference(&mut profiles, &model, Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("after the switch: {e}\n{}", cdp.log()));
    eprintln!(
        "{} lookups answered while generation 2 was rebuilt; {} customers checked",
        during_rebuild,
        model.customers().len()
    );

    let listed = projections
        .list_generations(ListGenerationsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.active, 2);
    let err = projections
        .drop_generation(DropGenerationRequest {
            generation: 2,
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("active"), "{}", err.message());
    // The generation the switch retired is kept for a grace period...
    let err = projections
        .drop_generation(DropGenerationRequest {
            generation: 1,
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("drop_grace_secs"),
        "{}",
        err.message()
    );
    // ...unless the operator insists.
    let after = projections
        .drop_generation(DropGenerationRequest {
            generation: 1,
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<u32> = after.generations.iter().map(|g| g.id).collect();
    assert_eq!(ids, vec![2]);
    expect_reference(&mut profiles, &model, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("after dropping generation 1: {e}\n{}", cdp.log()));
}

/// Unmerge by correction: a family shared a home phone, which merged two
/// customers. The phone is then blocked in the rules, and a rebuild from the
/// log into a new generation splits them again, each with their own events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_change_and_a_rebuild_split_a_wrong_merge() {
    let mut cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    let mut profiles = cdp.profiles().await;
    let zalo = || (4_000_000_000u128 + uuid::Uuid::new_v4().as_u128() % 1_000_000_000).to_string();
    let (mai, mother) = (zalo(), zalo());
    let home = cdp_e2e::mobile();
    let home_e164 = format!("+84{home}");
    let events = [
        vec![cdp_e2e::id("zalo_id", &mai)],
        vec![cdp_e2e::id("zalo_id", &mother)],
        vec![cdp_e2e::id("zalo_id", &mai), cdp_e2e::id("phone", &home)],
        vec![cdp_e2e::id("zalo_id", &mother), cdp_e2e::id("phone", &home)],
    ];
    for ids in events {
        let t = cdp_e2e::touchpoint(
            "Message Received",
            "chat",
            "zalo-oa",
            ids,
            serde_json::json!({}),
        );
        ingest
            .track(cdp_proto::v1::TrackRequest {
                touchpoint: Some(t),
            })
            .await
            .unwrap();
    }
    let merged = cdp_e2e::profile_until(
        &mut profiles,
        cdp_e2e::id("zalo_id", &mai),
        Duration::from_secs(60),
        |p| cdp_e2e::metrics(p).events_count == 4,
    )
    .await
    .unwrap_or_else(|e| panic!("the shared phone did not merge the family: {e}"));
    assert!(merged.identifiers.iter().any(|i| i.value == mother));
    // Every event had arrived by then: time travel to this instant, after
    // the rebuild, must show the rebuilt view of them.
    let all_arrived = now_ms();

    let blocked = format!(
        "{}\n[identity.kinds.phone]\npriority = 4\nlimit = 2\nmerge = true\nblocked = [\"{home_e164}\"]\n",
        cdp_e2e::DEFAULT_CONFIG
    );
    cdp.restart_with(&blocked);
    let mut profiles = cdp.profiles().await;
    // New rules apply to new events; the views change once rebuilt. (The
    // restart was a SIGKILL: folds not yet synced are folded again from
    // the log, so wait for them.)
    cdp_e2e::profile_until(
        &mut profiles,
        cdp_e2e::id("zalo_id", &mai),
        Duration::from_secs(60),
        |p| cdp_e2e::metrics(p).events_count == 4,
    )
    .await
    .unwrap_or_else(|e| panic!("the old rules' view is gone before the rebuild: {e}"));
    // An agent watches the mother's view (one customer with the daughter's
    // under the old rules) while the rebuild runs.
    let mut watch = profiles
        .watch_profile(lookup(cdp_e2e::id("zalo_id", &mother)))
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(
        cdp_e2e::metrics(first.profile.as_ref().unwrap()).events_count,
        4
    );
    // And an agent has the family's customer open in the console.
    let console = {
        let session = cdp.console_session(cdp_e2e::AGENT_TOKEN).await;
        let url = format!(
            "{}/api/watch?customer_id={}",
            cdp.console_url(),
            first.profile.as_ref().unwrap().customer_id
        );
        tokio::spawn(async move {
            let mut stream = reqwest::Client::new()
                .get(url)
                .bearer_auth(session)
                .send()
                .await
                .unwrap();
            let mut seen = String::new();
            while let Some(chunk) = stream.chunk().await.unwrap() {
                seen.push_str(&String::from_utf8_lossy(&chunk));
                if seen.contains("event: switched") || seen.contains("event: gone") {
                    return seen;
                }
            }
            seen
        })
    };
    // The operator's command: rebuild, switch when caught up.
    let endpoint = format!("http://{}", cdp.projection_addr());
    let out = std::process::Command::new(cdp_e2e::cdp_binary())
        .args(["rebuild", "--activate", "--endpoint", &endpoint])
        .env("CDP_TOKEN", cdp_e2e::OPERATOR_KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cdp rebuild failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cdp.log()
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("generation 2 is active"));
    let listed = std::process::Command::new(cdp_e2e::cdp_binary())
        .args(["generations", "--endpoint", &endpoint, "list"])
        .env("CDP_TOKEN", cdp_e2e::OPERATOR_KEY)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed
            .lines()
            .any(|l| l.trim_start().starts_with('2') && l.ends_with("active")),
        "{listed}"
    );
    let mut split = Vec::new();
    for who in [&mai, &mother] {
        let p = cdp_e2e::profile_until(
            &mut profiles,
            cdp_e2e::id("zalo_id", who),
            Duration::from_secs(60),
            |p| cdp_e2e::metrics(p).events_count == 2,
        )
        .await
        .unwrap_or_else(|e| panic!("after the rebuild: {e}\n{}", cdp.log()));
        assert!(
            p.identifiers.iter().all(|i| i.kind != "phone"),
            "the blocked phone is still linked: {:?}",
            p.identifiers
        );
        split.push(p.customer_id);
    }
    assert_ne!(split[0], split[1], "the family is still one customer");

    // The watch follows the switch: the lookup it started with now names
    // the mother's own customer.
    let followed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let p = watch.message().await.unwrap().unwrap().profile.unwrap();
            if p.customer_id == split[1] && cdp_e2e::metrics(&p).events_count == 2 {
                return p;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the watch never showed the rebuilt view\n{}", cdp.log()));
    assert!(followed.identifiers.iter().all(|i| i.kind != "phone"));

    // The console's live stream tells the page which customer the view is
    // in the new generation (the rebuild may have minted other ids: one of
    // the two the family split into).
    let told = tokio::time::timeout(Duration::from_secs(30), console)
        .await
        .unwrap_or_else(|_| panic!("the console stream said nothing of the switch"))
        .unwrap();
    assert!(
        split
            .iter()
            .any(|c| told.contains(&format!("event: switched\ndata: {c}"))),
        "{told}\nsplit into {split:?}\n{}",
        cdp.log()
    );

    // Time travel answers from the active generation's records (appended by
    // the rebuild, long after the events arrived): the split view, not the
    // old generation's merge.
    let past = profiles
        .get_profile(GetProfileRequest {
            as_of: Some(cdp_proto::convert::millis_to_timestamp(all_arrived)),
            ..lookup(cdp_e2e::id("zalo_id", &mother))
        })
        .await
        .unwrap_or_else(|e| panic!("time travel after the rebuild: {e}\n{}", cdp.log()))
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(past.customer_id, split[1]);
    assert_eq!(
        cdp_e2e::metrics(&past).events_count,
        2,
        "time travel mixed in the old generation's merge"
    );
}

/// Shadow rules: a candidate rule set is rebuilt into a generation that
/// does not serve, and compared with the active one before anyone switches:
/// which customers would split or join, how many events would move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_rule_set_reports_who_would_split_before_it_is_activated() {
    let mut cdp = CdpProcess::start();
    let mut ingest = cdp.ingest().await;
    let zalo = || (5_000_000_000u128 + uuid::Uuid::new_v4().as_u128() % 1_000_000_000).to_string();
    let (son, father) = (zalo(), zalo());
    let home = cdp_e2e::mobile();
    for ids in [
        vec![cdp_e2e::id("zalo_id", &son)],
        vec![cdp_e2e::id("zalo_id", &father)],
        vec![cdp_e2e::id("zalo_id", &son), cdp_e2e::id("phone", &home)],
        vec![cdp_e2e::id("zalo_id", &father), cdp_e2e::id("phone", &home)],
    ] {
        let t = cdp_e2e::touchpoint(
            "Message Received",
            "chat",
            "zalo-oa",
            ids,
            serde_json::json!({}),
        );
        ingest
            .track(cdp_proto::v1::TrackRequest {
                touchpoint: Some(t),
            })
            .await
            .unwrap();
    }
    let mut profiles = cdp.profiles().await;
    cdp_e2e::profile_until(
        &mut profiles,
        cdp_e2e::id("zalo_id", &son),
        Duration::from_secs(60),
        |p| cdp_e2e::metrics(p).events_count == 4,
    )
    .await
    .unwrap_or_else(|e| panic!("the shared phone did not merge the family: {e}"));

    // The candidate rules: the family's phone blocked.
    let candidate = format!(
        "{}\n[identity.kinds.phone]\npriority = 4\nlimit = 2\nmerge = true\nblocked = [\"0{home}\"]\n",
        cdp_e2e::DEFAULT_CONFIG
    );
    cdp.restart_with(&candidate);
    // The restart was a SIGKILL: folds not yet synced are folded again.
    let mut profiles = cdp.profiles().await;
    cdp_e2e::profile_until(
        &mut profiles,
        cdp_e2e::id("zalo_id", &father),
        Duration::from_secs(60),
        |p| cdp_e2e::metrics(p).events_count == 4,
    )
    .await
    .unwrap_or_else(|e| panic!("the active view after the restart: {e}\n{}", cdp.log()));
    let mut projections = ProjectionServiceClient::new(cdp.projection_channel().await);
    let shadow = cdp.rebuild_until(false).await;
    let report = projections
        .compare_generations(CompareGenerationsRequest {
            candidate: shadow,
            baseline: 0,
            examples: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.baseline, 1);
    assert_eq!(report.events_compared, 4, "{report:#?}");
    assert_eq!((report.splits, report.joins), (1, 0), "{report:#?}");
    assert_eq!(report.events_moved, 2, "{report:#?}");
    assert_eq!(
        (report.baseline_customers, report.candidate_customers),
        (1, 2)
    );
    assert_eq!(report.split_examples[0].candidate_customer_ids.len(), 2);
    // Nothing changed for agents yet: the active view is still the merged one.
    let p = cdp_e2e::profile_when(
        &mut profiles,
        cdp_e2e::id("zalo_id", &father),
        Duration::from_secs(30),
        |p| cdp_e2e::metrics(p).events_count == 4,
    )
    .await;
    assert!(p.identifiers.iter().any(|i| i.kind == "phone"));
    let bad = projections
        .compare_generations(CompareGenerationsRequest {
            candidate: 99,
            baseline: 0,
            examples: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}
