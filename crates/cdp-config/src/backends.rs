//! Settings of the distributed back ends. They live here, beside the rest
//! of the configuration, so that a service reads them without linking the
//! Kafka client or the ScyllaDB driver; the adapters take them from here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Kafka settings (`[log.kafka]` in the config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Prepended to every topic name, so several deployments (or test runs)
    /// can share a cluster.
    pub topic_prefix: String,
    pub replication_factor: i32,
    /// How long an append may wait for the broker before it fails.
    pub message_timeout_ms: u64,
    /// Timeout of metadata, offset and commit requests.
    pub request_timeout_ms: u64,
    /// `client.id` prefix.
    pub client_id: String,
    /// Extra librdkafka properties for every client (e.g. security settings).
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: "cdp.".into(),
            replication_factor: 1,
            message_timeout_ms: 10_000,
            request_timeout_ms: 10_000,
            client_id: "cdp".into(),
            properties: BTreeMap::new(),
        }
    }
}

/// ScyllaDB settings (`[store.scylla]` in the config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScyllaConfig {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    /// Keyspace of every table; created when it does not exist.
    pub keyspace: String,
    /// The CQL replication map of the keyspace, used when creating it.
    pub replication: String,
    /// Appended to `CREATE KEYSPACE` (e.g. ` AND tablets = {'enabled':
    /// false}` on ScyllaDB versions without LWT on tablets). Empty by default.
    pub keyspace_options: String,
    /// How long an identity worker may hold the identity lease.
    pub lease_ms: u64,
    /// Timeout of establishing a connection.
    pub connect_timeout_ms: u64,
    /// Client-side timeout of one request.
    pub request_timeout_ms: u64,
}

impl Default for ScyllaConfig {
    fn default() -> Self {
        ScyllaConfig {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "cdp".into(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            keyspace_options: String::new(),
            lease_ms: 10_000,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 12_000,
        }
    }
}
