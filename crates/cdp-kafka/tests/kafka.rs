//! The event-log conformance suite against a real Kafka broker (KRaft),
//! started by `deploy/harness/infra.sh`. These tests need the broker, so
//! they are ignored by a plain `cargo test`; `make test` starts Kafka and
//! runs them with `--include-ignored`, and an unreachable broker fails them.

use std::sync::Arc;

use async_trait::async_trait;
use cdp_kafka::{KafkaConfig, KafkaLog};
use cdp_log::conformance::{LogUnderTest, PARTITIONS, TOPICS};
use cdp_log::{EventLog, MemoryDedupe};

/// The broker to test against; a test that needs it fails without it.
fn brokers() -> String {
    let addr = std::env::var("CDP_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let reachable = addr
        .split(',')
        .any(|a| std::net::TcpStream::connect(a.trim()).is_ok());
    assert!(
        reachable,
        "Kafka is not reachable at {addr}; run `make infra-up` (or `make test`)"
    );
    addr
}

/// Every case gets its own topics (a fresh prefix).
fn config() -> KafkaConfig {
    KafkaConfig {
        brokers: brokers(),
        topic_prefix: format!("test-{}.", uuid::Uuid::new_v4().simple()),
        ..KafkaConfig::default()
    }
}

/// Kafka with an idempotency-key index (as with ScyllaDB in production).
struct Deduplicating(KafkaLog);

#[async_trait]
impl LogUnderTest for Deduplicating {
    async fn open() -> Self {
        let dedupe = Arc::new(MemoryDedupe::default());
        let log = KafkaLog::connect(config(), &TOPICS, PARTITIONS, Some(dedupe))
            .await
            .expect("connects to Kafka");
        assert!(log.deduplicates());
        Deduplicating(log)
    }

    fn log(&self) -> &dyn EventLog {
        &self.0
    }
}

/// Kafka alone: every record is appended, retries included.
struct Plain(KafkaLog);

#[async_trait]
impl LogUnderTest for Plain {
    async fn open() -> Self {
        let log = KafkaLog::connect(config(), &TOPICS, PARTITIONS, None)
            .await
            .expect("connects to Kafka");
        assert!(!log.deduplicates());
        Plain(log)
    }

    fn log(&self) -> &dyn EventLog {
        &self.0
    }
}

cdp_log::event_log_test_suite!(
    kafka_with_dedupe_index,
    Deduplicating,
    #[ignore = "needs Kafka on 127.0.0.1:9092: `make test` starts it"]
);

cdp_log::event_log_test_suite!(
    kafka_without_dedupe_index,
    Plain,
    #[ignore = "needs Kafka on 127.0.0.1:9092: `make test` starts it"]
);
