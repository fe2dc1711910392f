//! I4 on the distributed back end: truncate the identity and profile tables
//! of ScyllaDB (Cassandra here), replay the Kafka log from the start, and
//! get the same views.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cdp_domain::journey::{self, JourneyConfig};
use cdp_e2e::{Backend, CdpProcess, expect_reference, now_ms, reference_of, to_api};
use cdp_kafka::{KafkaConfig, KafkaLog};
use cdp_log::{EventLog, Membership, Topic};
use cdp_proto::v1::{GetProfileRequest, TrackBatchRequest, get_profile_request::Lookup};
use cdp_scylla::{ScyllaConfig, ScyllaStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_views_are_rebuilt_from_the_log() {
    if Backend::from_env() != Backend::Distributed {
        eprintln!("skipped: needs CDP_E2E_BACKEND=distributed (make test runs it)");
        return;
    }
    let mut cdp = CdpProcess::start();
    let now = now_ms();
    let config = JourneyConfig {
        customers: 40,
        namespace: cdp_e2e::unique("rebuild"),
        start: now - 20 * 86_400_000,
        span_ms: 19 * 86_400_000,
        ..JourneyConfig::default()
    };
    let (_, events) = journey::generate(11, &config);
    let model = reference_of(&events, now).unwrap();
    let mut ingest = cdp.ingest().await;
    for chunk in events.chunks(100) {
        let r = ingest
            .track_batch(TrackBatchRequest {
                touchpoints: chunk.iter().map(|g| to_api(&g.event)).collect(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.accepted as usize, chunk.len());
    }
    let mut profiles = cdp.profiles().await;
    expect_reference(&mut profiles, &model, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cdp.log()));

    rebuild(&mut cdp).await;
    let any = model.customers()[0]
        .identifiers
        .iter()
        .next()
        .unwrap()
        .clone();
    let gone = profiles
        .get_profile(GetProfileRequest {
            lookup: Some(Lookup::Identifier(cdp_e2e::id(
                any.kind.as_str(),
                &any.value,
            ))),
            timeline_limit: 0,
            as_of: None,
        })
        .await;
    assert_eq!(
        gone.map(|_| ()).unwrap_err().code(),
        tonic::Code::NotFound,
        "the views were not truncated"
    );
    cdp.start_stopped();
    expect_reference(&mut profiles, &model, Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("after the rebuild: {e}\n{}", cdp.log()));
}

/// Stops the projections (identity and profile), truncates their tables,
/// rewinds identity to the start of the touchpoints and moves the profile
/// fold past the resolved records of the old graph (the new graph may
/// assign events to other customer ids). Start the stopped processes again
/// to replay.
async fn rebuild(cdp: &mut CdpProcess) {
    assert!(cdp.stop_service("cdp-identity").success());
    assert!(cdp.stop_service("cdp-profile").success());
    let nodes = std::env::var("CDP_CQL_ADDR").unwrap_or_else(|_| "127.0.0.1:9042".into());
    let store = ScyllaStore::connect(&ScyllaConfig {
        nodes: vec![nodes],
        keyspace: cdp.namespace.clone(),
        ..ScyllaConfig::default()
    })
    .await
    .unwrap();
    store.truncate().await.unwrap();
    let log = KafkaLog::connect(
        KafkaConfig {
            brokers: std::env::var("CDP_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into()),
            topic_prefix: format!("{}.", cdp.namespace),
            ..KafkaConfig::default()
        },
        4,
        None,
    )
    .await
    .unwrap();
    let resolved_end = log.end_offsets(Topic::Resolved).await.unwrap();
    let touchpoints_start = vec![0; log.partitions(Topic::Touchpoints) as usize];
    for (group, topic, to) in [
        ("cdp-identity", Topic::Touchpoints, touchpoints_start),
        ("cdp-profile", Topic::Resolved, resolved_end),
    ] {
        let mut sub = log
            .subscribe(group, topic, Membership::default())
            .await
            .unwrap();
        let positions: Vec<(u32, u64)> = (0u32..).zip(to.iter().copied()).collect();
        sub.commit(&positions).await.unwrap();
        assert_eq!(log.committed(group, topic).await.unwrap(), to);
    }
}

/// Unmerge by correction: a family shared a home phone, which merged two
/// customers. The phone is then blocked in the rules, and a rebuild from the
/// log splits them again, each with their own events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_change_and_a_rebuild_split_a_wrong_merge() {
    if Backend::from_env() != Backend::Distributed {
        eprintln!("skipped: needs CDP_E2E_BACKEND=distributed (make test runs it)");
        return;
    }
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

    rebuild(&mut cdp).await;
    let blocked = format!(
        "{}\n[identity.kinds.phone]\npriority = 4\nlimit = 2\nmerge = true\nblocked = [\"{home_e164}\"]\n",
        cdp_e2e::DEFAULT_CONFIG
    );
    cdp.restart_with(&blocked);
    let mut profiles = cdp.profiles().await;
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
}
