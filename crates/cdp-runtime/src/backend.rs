//! Opens the configured back ends: the event log (embedded or Kafka) and the
//! stores (embedded or ScyllaDB). Services only see the ports.

use std::sync::Arc;

use cdp_kafka::KafkaLog;
use cdp_log::{DedupeIndex, EmbeddedLog, EventLog, LogError};
use cdp_scylla::ScyllaGenerations;
use cdp_store::{
    EmbeddedGenerations, Generations, IdentityStore, LiveStores, ProfileStore, StoreError,
};
use thiserror::Error;

use crate::PlatformConfig;
use crate::config::{LogBackend, StoreBackend};

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("event log ({what}): {source}")]
    Log { what: String, source: LogError },
    #[error("store ({what}): {source}")]
    Store { what: String, source: StoreError },
}

/// The ports every service is wired with.
#[derive(Clone)]
pub struct Backends {
    pub log: Arc<dyn EventLog>,
    /// The active projection generation (see `cdp_store::generations`):
    /// `identity` and `profiles` are this, seen through each port.
    pub live: Arc<LiveStores>,
    pub identity: Arc<dyn IdentityStore>,
    pub profiles: Arc<dyn ProfileStore>,
}

/// Opens the store and the log named by the configuration. With Kafka and
/// ScyllaDB, the ScyllaDB store is also the log's idempotency-key index.
pub async fn open(config: &PlatformConfig) -> Result<Backends, BackendError> {
    let (generations, dedupe): (Arc<dyn Generations>, Option<Arc<dyn DedupeIndex>>) =
        match config.store.backend {
            StoreBackend::Embedded => {
                let dir = config.data_dir.join("store");
                let cache =
                    usize::try_from(config.store.embedded_cache_mib << 20).unwrap_or(usize::MAX);
                let generations = EmbeddedGenerations::open(&dir)
                    .map_err(|source| BackendError::Store {
                        what: dir.display().to_string(),
                        source,
                    })?
                    .with_cache(cache);
                (Arc::new(generations), None)
            }
            StoreBackend::Scylla => {
                let c = &config.store.scylla;
                let generations =
                    ScyllaGenerations::connect(c)
                        .await
                        .map_err(|source| BackendError::Store {
                            what: format!("scylla {} keyspace {}", c.nodes.join(","), c.keyspace),
                            source,
                        })?;
                let dedupe: Arc<dyn DedupeIndex> = Arc::new(generations.base().clone());
                (Arc::new(generations), Some(dedupe))
            }
        };
    let live =
        Arc::new(
            LiveStores::open(generations)
                .await
                .map_err(|source| BackendError::Store {
                    what: "the active projection generation".into(),
                    source,
                })?,
        );
    let log: Arc<dyn EventLog> = match config.log.backend {
        LogBackend::Embedded => {
            let dir = config.data_dir.join("log");
            Arc::new(
                EmbeddedLog::open_with_cache(
                    &dir,
                    config.log.partitions,
                    usize::try_from(config.log.embedded_cache_mib << 20).unwrap_or(usize::MAX),
                )
                .map_err(|source| BackendError::Log {
                    what: dir.display().to_string(),
                    source,
                })?,
            )
        }
        LogBackend::Kafka => {
            let k = &config.log.kafka;
            if dedupe.is_none() {
                tracing::warn!(
                    "Kafka without the ScyllaDB store: retried events are not reported as duplicates (consumers still ignore them)"
                );
            }
            Arc::new(
                KafkaLog::connect(k.clone(), config.log.partitions, dedupe)
                    .await
                    .map_err(|source| BackendError::Log {
                        what: format!("kafka {} prefix {:?}", k.brokers, k.topic_prefix),
                        source,
                    })?,
            )
        }
    };
    tracing::info!(log = ?config.log.backend, store = ?config.store.backend, "back ends open");
    Ok(Backends {
        log,
        identity: Arc::clone(&live) as Arc<dyn IdentityStore>,
        profiles: Arc::clone(&live) as Arc<dyn ProfileStore>,
        live,
    })
}
