//! I3 against the running services: for generated omnichannel journeys, the
//! profiles the pipeline produces (4 partitions, 2 identity and 2 profile
//! workers, events in any interleaving) equal the reference fold of the
//! same events.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use cdp_domain::journey::{self, JourneyConfig};
use cdp_domain::reference::ReferenceModel;
use cdp_domain::{Context, IdentityRules, ValidationLimits, validate};
use cdp_e2e::{CdpProcess, metrics, profile_until};
use cdp_proto::v1::{self, TrackBatchRequest};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn to_api(raw: &cdp_domain::RawTouchpoint) -> v1::Touchpoint {
    v1::Touchpoint {
        event_id: raw.event_id.clone().unwrap_or_default(),
        r#type: raw.event_type.clone().unwrap_or_default(),
        channel: raw.channel.clone().unwrap_or_default(),
        source_id: raw.source_id.clone().unwrap_or_default(),
        occurred_at: raw.occurred_at.map(cdp_proto::convert::millis_to_timestamp),
        properties: Some(cdp_proto::convert::json_to_struct(&raw.properties)),
        personal: Some(v1::PersonalData {
            identifiers: raw
                .identifiers
                .iter()
                .map(|i| cdp_e2e::id(&i.kind, &i.value))
                .collect(),
            traits: Some(cdp_proto::convert::json_to_struct(&raw.traits)),
        }),
    }
}

#[test]
fn the_pipeline_converges_to_the_reference_fold() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cdp = CdpProcess::start();
    let mut runner = TestRunner::new(Config {
        cases: 10,
        failure_persistence: None,
        max_shrink_iters: 0,
        ..Config::default()
    });
    let result = runner.run(&(any::<u64>(), 4usize..20), |(seed, customers)| {
        rt.block_on(async {
            let now = now_ms();
            let config = JourneyConfig {
                customers,
                namespace: format!("p{seed:x}"),
                start: now - 20 * 86_400_000,
                span_ms: 19 * 86_400_000,
                ..JourneyConfig::default()
            };
            let (_, events) = journey::generate(seed, &config);
            let rules = IdentityRules::default();
            let mut model =
                ReferenceModel::new(rules.clone(), cdp_domain::profile::FoldOptions::default());
            for g in &events {
                let t = validate(
                    &g.event,
                    &rules,
                    &ValidationLimits::default(),
                    Context {
                        now,
                        fresh_event_id: uuid::Uuid::nil(),
                    },
                )
                .map_err(|e| TestCaseError::fail(format!("generated event rejected: {e}")))?;
                model.apply(&t);
            }
            let mut ingest = cdp.ingest().await;
            for chunk in events.chunks(100) {
                let batch = chunk.iter().map(|g| to_api(&g.event)).collect();
                let r = ingest
                    .track_batch(TrackBatchRequest { touchpoints: batch })
                    .await
                    .unwrap()
                    .into_inner();
                prop_assert_eq!(
                    r.accepted as usize,
                    chunk.len(),
                    "rejected: {:?}",
                    r.results
                );
            }
            let mut profiles = cdp.profiles().await;
            let expected = model.customers();
            prop_assert_eq!(expected.len(), customers);
            let mut seen_ids = BTreeSet::new();
            for customer in &expected {
                let want = cdp_proto::convert::metrics(&customer.view);
                let any = customer.identifiers.iter().next().unwrap();
                let p = profile_until(
                    &mut profiles,
                    cdp_e2e::id(any.kind.as_str(), &any.value),
                    Duration::from_secs(20),
                    |p| metrics(p).events_count == want.events_count,
                )
                .await
                .map_err(|e| {
                    TestCaseError::fail(format!(
                        "seed {seed}, {customers} customers: expected {want:#?}\n{e}"
                    ))
                })?;
                prop_assert_eq!(metrics(&p), &want);
                let got: BTreeSet<(String, String)> = p
                    .identifiers
                    .iter()
                    .map(|i| (i.kind.clone(), i.value.clone()))
                    .collect();
                let wanted: BTreeSet<(String, String)> = customer
                    .identifiers
                    .iter()
                    .map(|i| (i.kind.to_string(), i.value.clone()))
                    .collect();
                prop_assert_eq!(got, wanted);
                prop_assert!(
                    seen_ids.insert(p.customer_id.clone()),
                    "two reference customers map to one profile"
                );
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}\n--- cdp log ---\n{}", cdp.log());
    }
}
