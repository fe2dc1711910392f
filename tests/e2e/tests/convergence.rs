//! I3 against the running services: for generated omnichannel journeys, the
//! profiles the pipeline produces (4 partitions, 2 identity and 2 profile
//! workers, events in any interleaving) equal the reference fold of the
//! same events.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cdp_domain::journey::{self, JourneyConfig};
use cdp_e2e::{CdpProcess, expect_reference, now_ms, reference_of, to_api};
use cdp_proto::v1::TrackBatchRequest;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

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
            let model = reference_of(&events, now).map_err(TestCaseError::fail)?;
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
            let n = expect_reference(&mut profiles, &model, Duration::from_secs(30))
                .await
                .map_err(|e| {
                    TestCaseError::fail(format!("seed {seed}, {customers} customers: {e}"))
                })?;
            prop_assert_eq!(n, customers);
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}\n--- cdp log ---\n{}", cdp.log());
    }
}
