//! The versioned schema. `schema_version` records the migrations applied;
//! [`migrate`] applies the missing ones in order. Every statement is
//! idempotent (`IF NOT EXISTS`), so a migration interrupted half-way is
//! simply applied again. Run migrations from one process at a time: CQL
//! schema changes from several coordinators at once can disagree.

use cdp_store::StoreError;
use scylla::client::session::Session;
use tracing::info;

use crate::{ScyllaConfig, exec_error, now_ms, storage};

/// One schema change: CQL statements with `{ks}` standing for the keyspace.
pub(crate) struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub statements: &'static [&'static str],
}

/// Every migration, oldest first. Never edit an applied one; add a new one.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "identity graph, identity lease, profiles, timeline, search",
        statements: &[
            // identifier key (`kind \0 value`) -> Claim (JSON).
            "CREATE TABLE IF NOT EXISTS {ks}.claims (id text PRIMARY KEY, claim blob)",
            // customer id -> CustomerNode (JSON).
            "CREATE TABLE IF NOT EXISTS {ks}.customers (id uuid PRIMARY KEY, node blob)",
            // event id -> Resolution (JSON): what identity decided for the event.
            "CREATE TABLE IF NOT EXISTS {ks}.resolutions (event_id uuid PRIMARY KEY, resolution blob)",
            // The single lease row (id = 0) of the identity workers; `pending`
            // is the intent (JSON) of the holder of `epoch`.
            "CREATE TABLE IF NOT EXISTS {ks}.identity_lease (id int PRIMARY KEY, holder uuid, \
         epoch bigint, until bigint, pending blob)",
            // customer id -> ProfileSlot (JSON), with an optimistic version and,
            // on a merged-away customer until the survivor absorbed it, the
            // profile it must absorb (JSON).
            "CREATE TABLE IF NOT EXISTS {ks}.profiles (customer uuid PRIMARY KEY, version bigint, \
         slot blob, pending_merge blob)",
            // (customer, occurred_at, event id) -> TimelineEntry (JSON), newest first.
            "CREATE TABLE IF NOT EXISTS {ks}.timeline (customer uuid, occurred_at bigint, \
         event_id uuid, entry blob, PRIMARY KEY ((customer), occurred_at, event_id)) \
         WITH CLUSTERING ORDER BY (occurred_at DESC, event_id DESC)",
            // (bucket, search term, customer): see `cdp_domain::search` and
            // `profile::search_bucket`.
            "CREATE TABLE IF NOT EXISTS {ks}.search (bucket text, term text, customer uuid, \
         PRIMARY KEY ((bucket), term, customer))",
        ],
    },
    Migration {
        version: 2,
        name: "idempotency keys of the event log (Kafka), kept 7 days",
        statements: &[
            "CREATE TABLE IF NOT EXISTS {ks}.idempotency (key blob PRIMARY KEY, \
         log_partition int, log_offset bigint) WITH default_time_to_live = 604800",
        ],
    },
    Migration {
        version: 3,
        name: "registry of projection generations and the active pointer",
        statements: &[
            // Generations that exist (1 is this keyspace, n > 1 is `{ks}_gn`).
            "CREATE TABLE IF NOT EXISTS {ks}.generations (id int PRIMARY KEY, created_at bigint)",
            // One row (k = 0): the generation that serves.
            "CREATE TABLE IF NOT EXISTS {ks}.generation_active (k int PRIMARY KEY, id int)",
        ],
    },
    Migration {
        version: 4,
        name: "keyring of crypto-shredding: a data key per subject, wrapped; erased rows are the suppression list",
        statements: &[
            // subject (HMAC of an identifier) -> the data key wrapped by master
            // key `master`, or, once erased, when and by which request.
            // Erased cells are purged from SSTables an hour after compaction
            // reaches them (gc_grace_seconds), instead of ten days.
            "CREATE TABLE IF NOT EXISTS {ks}.subject_keys (subject blob PRIMARY KEY, master int, \
         wrapped blob, erased_at bigint, request text) WITH gc_grace_seconds = 3600",
        ],
    },
    Migration {
        version: 5,
        name: "audience timers: live profiles by the instant their audience state is due",
        statements: &[
            // (shard of the customer, due, customer): see `profile::due_shard`.
            // Written before the profile row that is due then, removed after
            // the row moved on, so a row never waits on a missing entry.
            // Every fired timer leaves a tombstone where the next scan
            // starts: they are purged an hour after compaction reaches them.
            "CREATE TABLE IF NOT EXISTS {ks}.audience_due (shard int, due bigint, \
         customer uuid, PRIMARY KEY ((shard), due, customer)) WITH gc_grace_seconds = 3600",
        ],
    },
    Migration {
        version: 6,
        name: "segment members: each segment's live members, beside the profile rows",
        statements: &[
            // (segment, bucket of the customer, customer) -> since: see
            // `profile::member_bucket`. Written before the profile row that
            // enters, removed after the row that exits.
            "CREATE TABLE IF NOT EXISTS {ks}.segment_members (segment text, bucket int, \
         customer uuid, since bigint, PRIMARY KEY ((segment, bucket), customer)) \
         WITH gc_grace_seconds = 3600",
        ],
    },
];

/// The tables holding data, emptied by `truncate` (not the lease nor the
/// schema version).
pub(crate) const DATA_TABLES: &[&str] = &[
    "claims",
    "customers",
    "resolutions",
    "profiles",
    "timeline",
    "search",
    "audience_due",
    "segment_members",
];

/// Keyspace names go into CQL text: allow only what CQL allows unquoted.
pub(crate) fn check_keyspace_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "keyspace name {name:?} must be 1 to 48 letters, digits or _, starting with a letter"
        )))
    }
}

/// Creates the keyspace and applies the migrations not recorded yet.
pub(crate) async fn migrate(session: &Session, config: &ScyllaConfig) -> Result<(), StoreError> {
    let ks = &config.keyspace;
    let ddl = |cql: String| async move {
        session
            .query_unpaged(cql, ())
            .await
            .map(|_| ())
            .map_err(exec_error)
    };
    ddl(format!(
        "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {}{}",
        config.replication, config.keyspace_options
    ))
    .await?;
    ddl(format!(
        "CREATE TABLE IF NOT EXISTS {ks}.schema_version (version int PRIMARY KEY, \
         name text, applied_at bigint)"
    ))
    .await?;
    let applied: Vec<i32> = session
        .query_unpaged(format!("SELECT version FROM {ks}.schema_version"), ())
        .await
        .map_err(exec_error)?
        .into_rows_result()
        .map_err(storage)?
        .rows::<(i32,)>()
        .map_err(storage)?
        .map(|row| row.map(|(v,)| v))
        .collect::<Result<_, _>>()
        .map_err(storage)?;
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
        for statement in migration.statements {
            ddl(statement.replace("{ks}", ks)).await?;
        }
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {ks}.schema_version (version, name, applied_at) VALUES (?, ?, ?)"
                ),
                (migration.version, migration.name, now_ms()),
            )
            .await
            .map_err(exec_error)?;
        info!(
            keyspace = %ks,
            version = migration.version,
            name = migration.name,
            "applied a schema migration"
        );
    }
    Ok(())
}
