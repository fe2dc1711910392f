//! The event-log conformance suite against a real Kafka broker (KRaft),
//! started by `deploy/harness/infra.sh` (`make test` does it).

use std::sync::Arc;

use cdp_kafka::{KafkaConfig, KafkaLog};
use cdp_log::{EventLog, MemoryDedupe, conformance};

/// The broker to test against, or None (skip) when it is not running and
/// the run does not require it.
fn broker() -> Option<String> {
    let addr = std::env::var("CDP_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let reachable = addr
        .split(',')
        .any(|a| std::net::TcpStream::connect(a.trim()).is_ok());
    if reachable {
        return Some(addr);
    }
    if std::env::var("CDP_REQUIRE_INFRA").is_ok_and(|v| v == "1") {
        panic!("Kafka is not reachable at {addr} (CDP_REQUIRE_INFRA=1); run `make infra-up`");
    }
    eprintln!("skipped: Kafka is not reachable at {addr}; run `make infra-up`");
    None
}

fn config(brokers: String) -> KafkaConfig {
    KafkaConfig {
        brokers,
        topic_prefix: format!("test-{}.", uuid::Uuid::new_v4().simple()),
        ..KafkaConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_log_conforms() {
    let Some(brokers) = broker() else { return };
    let log = KafkaLog::connect(config(brokers), 4, Some(Arc::new(MemoryDedupe::default())))
        .await
        .unwrap();
    assert!(log.deduplicates());
    conformance::run_all(&log, "kafka").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_log_without_dedupe_index_appends_every_record() {
    let Some(brokers) = broker() else { return };
    let log = KafkaLog::connect(config(brokers), 4, None).await.unwrap();
    assert!(!log.deduplicates());
    conformance::keeps_order_per_key(&log, "plain").await;
}
