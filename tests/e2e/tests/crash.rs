//! I1 and I2 under crashes: while a generator sends a few thousand events of
//! a few hundred customers, the identity process and then the profile
//! process are SIGKILLed and restarted. Afterwards every customer's orders,
//! spend and events equal the reference fold: nothing lost, nothing
//! counted twice. On the embedded back end the one process is killed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cdp_domain::journey::{self, JourneyConfig};
use cdp_e2e::{CdpProcess, expect_reference, now_ms, reference_of, to_api};
use cdp_proto::v1::TrackBatchRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_identity_and_profile_loses_and_doubles_nothing() {
    let mut cdp = CdpProcess::start();
    let now = now_ms();
    let config = JourneyConfig {
        customers: 300,
        min_events: 5,
        max_events: 15,
        namespace: cdp_e2e::unique("crash"),
        start: now - 20 * 86_400_000,
        span_ms: 19 * 86_400_000,
    };
    let (_, events) = journey::generate(7, &config);
    assert!(events.len() > 2000, "only {} events", events.len());
    let model = reference_of(&events, now).unwrap();

    // The generator runs while the workers die; ingest stays up (when it is
    // its own process), so every batch must be acknowledged.
    let mut ingest = cdp.ingest().await;
    let batches: Vec<Vec<_>> = events
        .chunks(50)
        .map(|c| c.iter().map(|g| to_api(&g.event)).collect())
        .collect();
    let total = batches.len();
    let sender = tokio::spawn(async move {
        let mut accepted = 0usize;
        for batch in batches {
            // On the embedded back end the one process restarts under us.
            loop {
                let request = TrackBatchRequest {
                    touchpoints: batch.clone(),
                };
                match ingest.track_batch(request).await {
                    Ok(r) => {
                        accepted += r.into_inner().accepted as usize;
                        break;
                    }
                    Err(s) if s.code() == tonic::Code::Unavailable => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(s) => panic!("TrackBatch failed: {s}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        accepted
    });
    let embedded = cdp.backend == cdp_e2e::Backend::Embedded;
    for service in ["cdp-identity", "cdp-profile"] {
        tokio::time::sleep(Duration::from_millis(700)).await;
        cdp.kill_service(service);
        tokio::time::sleep(Duration::from_millis(300)).await;
        cdp.start_stopped();
        if embedded {
            break;
        }
    }
    let accepted = if embedded {
        // The sender's channel pointed at the killed process: its retries
        // cannot reach the new one, so resend everything (duplicates are
        // reported, never counted).
        sender.abort();
        let mut ingest = cdp.ingest().await;
        let mut accepted = 0;
        for chunk in events.chunks(200) {
            let r = ingest
                .track_batch(TrackBatchRequest {
                    touchpoints: chunk.iter().map(|g| to_api(&g.event)).collect(),
                })
                .await
                .unwrap()
                .into_inner();
            accepted += (r.accepted + r.duplicates) as usize;
        }
        accepted
    } else {
        sender.await.unwrap()
    };
    assert_eq!(accepted, events.len(), "{total} batches");
    let mut profiles = cdp.profiles().await;
    let n = expect_reference(&mut profiles, &model, Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cdp.log()));
    assert_eq!(n, 300);
}
