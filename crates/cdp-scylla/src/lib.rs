//! The identity and profile store ports
//! ([`IdentityStore`](cdp_store::IdentityStore),
//! [`ProfileStore`](cdp_store::ProfileStore)) on ScyllaDB, with the `scylla`
//! driver. Apache Cassandra 5 speaks the same CQL and stands in for ScyllaDB
//! in tests, so the schema and the statements keep to what both accept (no
//! SASI, no Cassandra-only features). The rules are the pure functions of
//! `cdp-domain` — `identity::resolve` and `profile::fold_resolved` — run
//! against an in-memory overlay of the rows they read; this crate only
//! decides how their outcome reaches the database safely. Values are the
//! same JSON blobs as in the embedded store.
//!
//! # Consistency
//!
//! Reads and plain writes use `QUORUM`, lightweight transactions (LWT,
//! `IF ...`) use `SERIAL`, so the stores are correct on one node and on a
//! replicated cluster. Every statement on a hot path is prepared once, by
//! [`ScyllaStore::connect`]. Driver errors that may pass (no connection,
//! timeouts, overload) map to [`StoreError::Unavailable`], the rest to
//! [`StoreError::Storage`]; an LWT that timed out has an unknown outcome and
//! is settled by a `SERIAL` read (or by reading the row again).
//!
//! # Identity: one lease, fenced writes, an intent rolled forward
//!
//! A resolution reads and writes several partitions (claims of identifiers,
//! customer nodes, the decision of the event), and CQL cannot update several
//! partitions atomically. Identity workers therefore take turns:
//!
//! 1. **Lease.** `identity_lease` holds one row (`id = 0`): `holder`,
//!    `epoch`, `until` (ms since the Unix epoch) and `pending` (an intent).
//!    A `resolve` call reads it with `SERIAL`; when it is free (`until` in
//!    the past: released, or expired) it takes it with `UPDATE ... SET
//!    holder = <fresh id>, epoch = e + 1, until = now + lease_ms IF epoch = e
//!    AND until <= now`, `e` being the epoch it read. Only one caller can win
//!    the condition for a given `e`, so every acquisition gets its own epoch.
//!    While another holder's lease runs the call waits (backoff with
//!    jitter, at most until the lease ends) and gives up with
//!    [`StoreError::Unavailable`] after about twice `lease_ms`. The lease is
//!    not renewed: a call must finish within `lease_ms`, or it loses the
//!    lease and starts over. Calls on one [`ScyllaStore`] also queue on a
//!    local mutex, so only separate processes (or stores) contend on the LWT.
//!    Clocks only matter for liveness (when a lease counts as expired);
//!    safety rests on the epoch checks and the fencing below.
//! 2. **Fencing by write timestamp.** Graph rows (`claims`, `customers`,
//!    `resolutions`) are only written `USING TIMESTAMP epoch * 10^9 + n`,
//!    with `n` strictly increasing within the call. ScyllaDB and Cassandra
//!    keep the write with the highest timestamp, so a late write of a holder
//!    whose lease expired can never overwrite what a later holder wrote.
//!    (These timestamps are small — "1970" — so never write the graph
//!    tables by hand without `USING TIMESTAMP`: such a write would win
//!    over every later fenced one.)
//! 3. **Intent.** Under the lease the call first rolls forward an intent a
//!    crashed holder left in `pending` (re-applying its writes with the
//!    current epoch's timestamps, then clearing it). It then resolves the
//!    whole batch in memory — stored decisions first, exactly like the
//!    embedded store — with reads from the database (cached for the call)
//!    and writes buffered. The buffered writes and decisions are stored as
//!    the new intent with `IF holder = me AND epoch = mine`: that LWT is the
//!    commit point, and it fails when the lease was lost meanwhile (then the
//!    batch is discarded and resolved again under a new lease). Finally the
//!    writes are applied and the lease is released together with clearing
//!    the intent. When applying fails after the commit point the call
//!    returns an error and frees the lease with the intent still pending;
//!    the next call rolls it forward, and a retry of the batch gets the
//!    stored decisions.
//!
//! `GraphRead` is synchronous and the driver is not, so the in-memory
//! resolution runs on an overlay whose reads never block: rows that are not
//! cached yet are recorded as missing (and read as absent). After running
//! an event, if anything was missing, its outcome and writes are thrown
//! away, the missing rows (and the customers and redirects they point at)
//! are fetched, and the event is decided again from scratch (the decision is
//! pure). Before the loop, the rows the batch obviously needs (decisions,
//! claims of its identifiers, their customers and redirects) are prefetched
//! concurrently, so a second round is rare.
//!
//! The read-only methods (`owner`, `root`, `customer`, `claims`) read at
//! `QUORUM` without the lease.
//!
//! # Profiles: optimistic concurrency per row
//!
//! `profiles` rows carry a `version`.
//! [`ProfileStore::apply`](cdp_store::ProfileStore::apply) folds the batch on
//! an overlay (the same miss-and-retry scheme), then commits every changed
//! row with an LWT: `INSERT ... IF NOT EXISTS` for a new row, `UPDATE ... IF
//! version = <read version>` otherwise. When one does not apply, the
//! conflicting rows are read again and the whole batch is folded again;
//! folding an event is idempotent by event id, so the rows that did commit
//! change nothing the second time.
//!
//! A merge changes two rows — the survivor absorbs the loser, the loser
//! becomes a redirect — and `Profile::absorb` is *not* idempotent (counters
//! are added), so committing the survivor first and the redirect last would
//! count the loser twice when the redirect's LWT fails (a concurrent fold
//! into the loser, a crash) and the batch is folded again. The commit
//! therefore goes in three phases:
//!
//! 1. **Freeze** each loser: its row becomes the redirect *and* keeps the
//!    profile the survivor absorbed (`pending_merge`), in one LWT. From then
//!    on nobody can fold into the loser any more (every fold follows the
//!    redirect), so what the survivor must absorb is fixed.
//! 2. **Absorb**: write the live rows (the survivor with the loser absorbed).
//! 3. **Settle**: clear `pending_merge` on the frozen rows (best effort).
//!
//! Whoever loads a row with a `pending_merge` whose live root does not list
//! the loser in `merged_from` completes the merge (absorbs the kept profile)
//! before folding anything, so a crash between the phases is repaired by the
//! next fold that touches the loser (e.g. the re-delivery of the batch), and
//! a merge is absorbed exactly once. `profile()` and `timeline()` reached
//! through the loser's id complete a pending merge in memory; reads by the
//! survivor's id miss the loser's data until the merge is completed.
//!
//! Timeline entries and search terms are plain idempotent inserts written
//! before the profile rows commit, so a crash can never lose them (a retry
//! writes them again). A timeline read merges the live customer's partition
//! with those of every customer merged into it, and keeps one entry per
//! event (a batch folded again after a concurrent merge may have indexed an
//! event under two customers). Search terms are partitioned by their kind
//! and first characters (see `profile::search_bucket`): a prefix search is
//! one range read, and a prefix shorter than a bucket (2 characters after
//! `name:`/`email:`, 4 digits after `tel:`) only finds the term equal to it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cdp_store::StoreError;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{
    DbError, ExecutionError, NewSessionError, NextRowError, PagerExecutionError, PrepareError,
    RequestAttemptError, RequestError,
};
use scylla::frame::types::{Consistency, SerialConsistency};
use scylla::serialize::row::SerializeRow;
use scylla::statement::Statement;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{debug, info};

mod dedupe;
mod generations;
mod identity;
pub mod keys;
mod profile;
mod schema;

#[cfg(test)]
mod tests;

pub use generations::ScyllaGenerations;
pub use keys::ScyllaKeyRows;

pub use cdp_config::ScyllaConfig;

/// The identity and profile stores on one keyspace. Cheap to clone.
#[derive(Clone)]
pub struct ScyllaStore {
    inner: Arc<Inner>,
    /// The customer keys the views are sealed under.
    seal: cdp_store::ViewSeal,
}

struct Inner {
    session: Session,
    keyspace: String,
    lease_ms: u64,
    st: Statements,
    /// Serializes the `resolve` calls of this store, so they queue here
    /// instead of contending on the lease LWT.
    identity_gate: tokio::sync::Mutex<()>,
    #[cfg(test)]
    faults: tests::Faults,
}

/// Every prepared statement of the stores.
pub(crate) struct Statements {
    pub claim_get: PreparedStatement,
    pub claim_put: PreparedStatement,
    pub node_get: PreparedStatement,
    pub node_put: PreparedStatement,
    pub resolution_get: PreparedStatement,
    pub resolution_put: PreparedStatement,
    pub lease_init: PreparedStatement,
    pub lease_read: PreparedStatement,
    pub lease_acquire: PreparedStatement,
    pub lease_set_pending: PreparedStatement,
    pub lease_release: PreparedStatement,
    pub lease_abandon: PreparedStatement,
    pub lease_reset: PreparedStatement,
    pub profile_get: PreparedStatement,
    pub profile_insert: PreparedStatement,
    pub profile_update: PreparedStatement,
    pub timeline_put: PreparedStatement,
    pub timeline_range: PreparedStatement,
    pub search_put: PreparedStatement,
    pub search_range: PreparedStatement,
    pub due_put: PreparedStatement,
    pub due_delete: PreparedStatement,
    pub due_range: PreparedStatement,
    pub profile_scan: PreparedStatement,
    pub member_put: PreparedStatement,
    pub member_delete: PreparedStatement,
    pub member_range: PreparedStatement,
    pub idempotency_get: PreparedStatement,
    pub idempotency_put: PreparedStatement,
}

impl ScyllaStore {
    /// Connects, creates the keyspace and applies the schema migrations not
    /// applied yet, and prepares every statement.
    pub async fn connect(config: &ScyllaConfig) -> Result<Self, StoreError> {
        schema::check_keyspace_name(&config.keyspace)?;
        if config.nodes.is_empty() {
            return Err(StoreError::Invalid("no ScyllaDB node configured".into()));
        }
        if config.lease_ms == 0 {
            return Err(StoreError::Invalid("lease_ms must be positive".into()));
        }
        let profile = ExecutionProfile::builder()
            .consistency(Consistency::Quorum)
            .serial_consistency(Some(SerialConsistency::Serial))
            .request_timeout(Some(Duration::from_millis(
                config.request_timeout_ms.max(1),
            )))
            .build();
        let session = SessionBuilder::new()
            .known_nodes(&config.nodes)
            .connection_timeout(Duration::from_millis(config.connect_timeout_ms.max(1)))
            .default_execution_profile_handle(profile.into_handle())
            .build()
            .await
            .map_err(session_error)?;
        schema::migrate(&session, config).await?;
        let st = Statements::prepare(&session, &config.keyspace).await?;
        let store = ScyllaStore {
            inner: Arc::new(Inner {
                session,
                keyspace: config.keyspace.clone(),
                lease_ms: config.lease_ms,
                st,
                identity_gate: tokio::sync::Mutex::new(()),
                #[cfg(test)]
                faults: tests::Faults::default(),
            }),
            seal: cdp_store::ViewSeal::clear(),
        };
        store.init_lease().await?;
        info!(
            nodes = ?config.nodes,
            keyspace = %config.keyspace,
            "connected to ScyllaDB"
        );
        Ok(store)
    }

    /// Empties every identity and profile table (for a rebuild from the
    /// log). The identity lease keeps its epoch, so fencing timestamps keep
    /// growing; its pending intent is dropped. Run it while no worker runs.
    pub async fn truncate(&self) -> Result<(), StoreError> {
        for table in schema::DATA_TABLES {
            let cql = format!("TRUNCATE {}.{table}", self.inner.keyspace);
            self.inner
                .session
                .query_unpaged(cql, ())
                .await
                .map_err(exec_error)?;
        }
        self.reset_lease().await?;
        info!(keyspace = %self.inner.keyspace, "truncated the identity and profile tables");
        Ok(())
    }

    /// Drops the keyspace with everything in it (for tests).
    pub async fn drop_keyspace(&self) -> Result<(), StoreError> {
        let cql = format!("DROP KEYSPACE IF EXISTS {}", self.inner.keyspace);
        self.inner
            .session
            .query_unpaged(cql, ())
            .await
            .map_err(exec_error)?;
        info!(keyspace = %self.inner.keyspace, "dropped the keyspace");
        Ok(())
    }

    /// This store, sealing the identity graph and the views it writes
    /// under customer keys from `seal` (see `cdp_store::sealed`).
    pub fn with_seal(mut self, seal: cdp_store::ViewSeal) -> Self {
        self.seal = seal;
        self
    }

    /// The keyspace of this store.
    pub fn keyspace(&self) -> &str {
        &self.inner.keyspace
    }

    fn st(&self) -> &Statements {
        &self.inner.st
    }

    fn session(&self) -> &Session {
        &self.inner.session
    }

    /// Executes a statement that returns no rows.
    async fn write(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<(), StoreError> {
        self.session()
            .execute_unpaged(statement, values)
            .await
            .map_err(exec_error)?;
        Ok(())
    }

    /// Reads the single blob column of at most one row.
    async fn read_blob(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let result = self
            .session()
            .execute_unpaged(statement, values)
            .await
            .map_err(exec_error)?
            .into_rows_result()
            .map_err(storage)?;
        let row: Option<(Option<Vec<u8>>,)> = result.maybe_first_row().map_err(storage)?;
        Ok(row.and_then(|(blob,)| blob))
    }

    /// Runs a lightweight transaction and reports whether it applied.
    async fn lwt(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Lwt, StoreError> {
        match self.session().execute_unpaged(statement, values).await {
            Ok(result) => {
                let result = result.into_rows_result().map_err(storage)?;
                let row: Option<Row> = result.maybe_first_row().map_err(storage)?;
                let row = row.ok_or_else(|| {
                    StoreError::Storage("a conditional write returned no row".into())
                })?;
                Ok(if lwt_applied(&row.columns)? {
                    Lwt::Applied
                } else {
                    Lwt::NotApplied
                })
            }
            Err(e) if outcome_unknown(&e) => {
                debug!(error = %e, "conditional write with an unknown outcome");
                Ok(Lwt::Unknown(exec_error(e)))
            }
            Err(e) => Err(exec_error(e)),
        }
    }
}

/// The outcome of a lightweight transaction.
#[derive(Debug)]
enum Lwt {
    Applied,
    NotApplied,
    /// The request failed in a way that leaves the outcome open (a timeout,
    /// a broken connection): a `SERIAL` read tells.
    Unknown(StoreError),
}

impl Statements {
    async fn prepare(session: &Session, ks: &str) -> Result<Self, StoreError> {
        let read = |cql: String| prepare(session, cql, Kind::Read);
        let write = |cql: String| prepare(session, cql, Kind::Write);
        let lwt = |cql: String| prepare(session, cql, Kind::Lwt);
        Ok(Statements {
            claim_get: read(format!("SELECT claim FROM {ks}.claims WHERE id = ?")).await?,
            claim_put: write(format!(
                "INSERT INTO {ks}.claims (id, claim) VALUES (?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            node_get: read(format!("SELECT node FROM {ks}.customers WHERE id = ?")).await?,
            node_put: write(format!(
                "INSERT INTO {ks}.customers (id, node) VALUES (?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            resolution_get: read(format!(
                "SELECT resolution FROM {ks}.resolutions WHERE event_id = ?"
            ))
            .await?,
            resolution_put: write(format!(
                "INSERT INTO {ks}.resolutions (event_id, resolution) VALUES (?, ?) \
                 USING TIMESTAMP ?"
            ))
            .await?,
            lease_init: lwt(format!(
                "INSERT INTO {ks}.identity_lease (id, holder, epoch, until) \
                 VALUES (0, ?, 0, 0) IF NOT EXISTS"
            ))
            .await?,
            lease_read: prepare(
                session,
                format!(
                    "SELECT holder, epoch, until, pending FROM {ks}.identity_lease WHERE id = 0"
                ),
                Kind::SerialRead,
            )
            .await?,
            lease_acquire: lwt(format!(
                "UPDATE {ks}.identity_lease SET holder = ?, epoch = ?, until = ? \
                 WHERE id = 0 IF epoch = ? AND until <= ?"
            ))
            .await?,
            lease_set_pending: lwt(format!(
                "UPDATE {ks}.identity_lease SET pending = ? WHERE id = 0 \
                 IF holder = ? AND epoch = ?"
            ))
            .await?,
            lease_release: lwt(format!(
                "UPDATE {ks}.identity_lease SET until = 0, pending = null WHERE id = 0 \
                 IF holder = ? AND epoch = ?"
            ))
            .await?,
            lease_abandon: lwt(format!(
                "UPDATE {ks}.identity_lease SET until = 0 WHERE id = 0 \
                 IF holder = ? AND epoch = ?"
            ))
            .await?,
            lease_reset: lwt(format!(
                "UPDATE {ks}.identity_lease SET until = 0, pending = null WHERE id = 0 IF EXISTS"
            ))
            .await?,
            profile_get: read(format!(
                "SELECT version, slot, pending_merge FROM {ks}.profiles WHERE customer = ?"
            ))
            .await?,
            profile_insert: lwt(format!(
                "INSERT INTO {ks}.profiles (customer, version, slot, pending_merge) \
                 VALUES (?, 1, ?, ?) IF NOT EXISTS"
            ))
            .await?,
            profile_update: lwt(format!(
                "UPDATE {ks}.profiles SET version = ?, slot = ?, pending_merge = ? \
                 WHERE customer = ? IF version = ?"
            ))
            .await?,
            timeline_put: write(format!(
                "INSERT INTO {ks}.timeline (customer, occurred_at, event_id, entry) \
                 VALUES (?, ?, ?, ?)"
            ))
            .await?,
            timeline_range: read(format!(
                "SELECT occurred_at, event_id, entry FROM {ks}.timeline WHERE customer = ? \
                 AND occurred_at >= ? AND occurred_at < ?"
            ))
            .await?,
            idempotency_get: read(format!(
                "SELECT log_partition, log_offset FROM {ks}.idempotency WHERE key = ?"
            ))
            .await?,
            idempotency_put: write(format!(
                "INSERT INTO {ks}.idempotency (key, log_partition, log_offset) VALUES (?, ?, ?)"
            ))
            .await?,
            search_put: write(format!(
                "INSERT INTO {ks}.search (bucket, term, customer) VALUES (?, ?, ?)"
            ))
            .await?,
            search_range: read(format!(
                "SELECT term, customer FROM {ks}.search WHERE bucket = ? \
                 AND term >= ? AND term < ? LIMIT ?"
            ))
            .await?,
            due_put: write(format!(
                "INSERT INTO {ks}.audience_due (shard, due, customer) VALUES (?, ?, ?)"
            ))
            .await?,
            due_delete: write(format!(
                "DELETE FROM {ks}.audience_due WHERE shard = ? AND due = ? AND customer = ?"
            ))
            .await?,
            profile_scan: read(format!(
                "SELECT token(customer), customer FROM {ks}.profiles \
                 WHERE token(customer) > ? LIMIT ?"
            ))
            .await?,
            member_put: write(format!(
                "INSERT INTO {ks}.segment_members (segment, bucket, customer, since) \
                 VALUES (?, ?, ?, ?)"
            ))
            .await?,
            member_delete: write(format!(
                "DELETE FROM {ks}.segment_members WHERE segment = ? AND bucket = ? AND customer = ?"
            ))
            .await?,
            member_range: read(format!(
                "SELECT customer, since FROM {ks}.segment_members \
                 WHERE segment = ? AND bucket = ? AND customer > ? LIMIT ?"
            ))
            .await?,
            due_range: read(format!(
                "SELECT due, customer FROM {ks}.audience_due WHERE shard = ? AND due <= ? LIMIT ?"
            ))
            .await?,
        })
    }
}

#[derive(Clone, Copy)]
enum Kind {
    /// `QUORUM` read; idempotent.
    Read,
    /// `SERIAL` read of a row written with LWTs; idempotent.
    SerialRead,
    /// `QUORUM` write of a fixed value (fixed timestamp or content);
    /// idempotent.
    Write,
    /// Conditional write; never retried by the driver.
    Lwt,
}

async fn prepare(
    session: &Session,
    cql: String,
    kind: Kind,
) -> Result<PreparedStatement, StoreError> {
    let mut statement = Statement::new(cql);
    match kind {
        Kind::Read | Kind::Write => {
            statement.set_consistency(Consistency::Quorum);
            statement.set_is_idempotent(true);
        }
        Kind::SerialRead => {
            statement.set_consistency(Consistency::Serial);
            statement.set_is_idempotent(true);
        }
        Kind::Lwt => {
            statement.set_consistency(Consistency::Quorum);
            statement.set_serial_consistency(Some(SerialConsistency::Serial));
            statement.set_is_idempotent(false);
        }
    }
    session.prepare(statement).await.map_err(prepare_error)
}

/// Whether a conditional write applied: the `[applied]` column, always the
/// first. Cassandra returns only it on success and it plus the current row
/// on failure; ScyllaDB returns every column — so the row has no fixed shape.
pub(crate) fn lwt_applied(columns: &[Option<CqlValue>]) -> Result<bool, StoreError> {
    match columns.first() {
        Some(Some(CqlValue::Boolean(applied))) => Ok(*applied),
        other => Err(StoreError::Storage(format!(
            "a conditional write returned {other:?} instead of [applied]"
        ))),
    }
}

/// Write timestamps that fence stale lease holders: `epoch * 10^9 + n`, `n`
/// strictly increasing within one call. A later epoch always writes with
/// larger timestamps than any earlier one, whatever the wall clocks say.
#[derive(Debug)]
pub(crate) struct Fence {
    base: i64,
    next: i64,
}

impl Fence {
    /// Timestamps per epoch.
    pub const SPAN: i64 = 1_000_000_000;

    pub fn new(epoch: i64) -> Result<Self, StoreError> {
        if !(1..i64::MAX / Self::SPAN).contains(&epoch) {
            return Err(StoreError::Storage(format!(
                "identity lease epoch {epoch} is out of range"
            )));
        }
        Ok(Fence {
            base: epoch * Self::SPAN,
            next: 0,
        })
    }

    /// The next timestamp of this call.
    pub fn next(&mut self) -> Result<i64, StoreError> {
        if self.next >= Self::SPAN {
            return Err(StoreError::Invalid(format!(
                "more than {} graph writes under one identity lease",
                Self::SPAN
            )));
        }
        let ts = self.base + self.next;
        self.next += 1;
        Ok(ts)
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A random delay in `[0, max_ms]` milliseconds, to spread retries.
pub(crate) fn jitter(max_ms: u64) -> Duration {
    let random = uuid::Uuid::new_v4().as_u128();
    let max = u128::from(max_ms) + 1;
    Duration::from_millis(u64::try_from(random % max).unwrap_or(0))
}

pub(crate) fn storage<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Storage(e.to_string())
}

pub(crate) fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(storage)
}

pub(crate) fn from_json<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what,
        reason: e.to_string(),
    })
}

fn session_error(e: NewSessionError) -> StoreError {
    match e {
        NewSessionError::EmptyKnownNodesList | NewSessionError::IllegalConfig(_) => {
            StoreError::Invalid(e.to_string())
        }
        other => StoreError::Unavailable(format!("cannot connect to ScyllaDB: {other}")),
    }
}

fn transient_db(e: &DbError) -> bool {
    matches!(
        e,
        DbError::Unavailable { .. }
            | DbError::Overloaded
            | DbError::IsBootstrapping
            | DbError::ReadTimeout { .. }
            | DbError::WriteTimeout { .. }
            | DbError::ReadFailure { .. }
            | DbError::WriteFailure { .. }
            | DbError::TruncateError
            | DbError::RateLimitReached { .. }
            // CAS_WRITE_UNKNOWN (protocol v5)
            | DbError::Other(0x1700)
    )
}

fn transient_attempt(e: &RequestAttemptError) -> bool {
    match e {
        RequestAttemptError::BrokenConnectionError(_)
        | RequestAttemptError::UnableToAllocStreamId => true,
        RequestAttemptError::DbError(db, _) => transient_db(db),
        _ => false,
    }
}

fn transient_execution(e: &ExecutionError) -> bool {
    match e {
        ExecutionError::EmptyPlan
        | ExecutionError::ConnectionPoolError(_)
        | ExecutionError::RequestTimeout(_)
        | ExecutionError::SchemaAgreementError(_)
        | ExecutionError::MetadataError(_) => true,
        ExecutionError::LastAttemptError(a) => transient_attempt(a),
        ExecutionError::PrepareError(p) => transient_prepare(p),
        _ => false,
    }
}

fn transient_prepare(e: &PrepareError) -> bool {
    match e {
        PrepareError::ConnectionPoolError(_) => true,
        PrepareError::AllAttemptsFailed { first_attempt } => transient_attempt(first_attempt),
        _ => false,
    }
}

fn transient_request(e: &RequestError) -> bool {
    match e {
        RequestError::EmptyPlan
        | RequestError::ConnectionPoolError(_)
        | RequestError::RequestTimeout(_) => true,
        RequestError::LastAttemptError(a) => transient_attempt(a),
        _ => false,
    }
}

/// Whether a failed LWT may still have applied.
fn outcome_unknown(e: &ExecutionError) -> bool {
    match e {
        ExecutionError::RequestTimeout(_) => true,
        ExecutionError::LastAttemptError(a) => match a {
            RequestAttemptError::BrokenConnectionError(_) => true,
            RequestAttemptError::DbError(db, _) => matches!(
                db,
                DbError::WriteTimeout { .. }
                    | DbError::WriteFailure { .. }
                    | DbError::ReadTimeout { .. }
                    | DbError::Other(0x1700)
            ),
            _ => false,
        },
        _ => false,
    }
}

/// Driver errors: connection problems and timeouts are retryable
/// ([`StoreError::Unavailable`]), anything else is not.
pub(crate) fn exec_error(e: ExecutionError) -> StoreError {
    if transient_execution(&e) {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Storage(e.to_string())
    }
}

pub(crate) fn prepare_error(e: PrepareError) -> StoreError {
    if transient_prepare(&e) {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Storage(e.to_string())
    }
}

pub(crate) fn pager_error(e: PagerExecutionError) -> StoreError {
    let transient = match &e {
        PagerExecutionError::PrepareError(p) => transient_prepare(p),
        PagerExecutionError::NextPageError(scylla::errors::NextPageError::RequestFailure(r)) => {
            transient_request(r)
        }
        PagerExecutionError::SchemaAgreementError(_) | PagerExecutionError::MetadataError(_) => {
            true
        }
        _ => false,
    };
    if transient {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Storage(e.to_string())
    }
}

pub(crate) fn next_row_error(e: NextRowError) -> StoreError {
    match &e {
        NextRowError::NextPageError(scylla::errors::NextPageError::RequestFailure(r))
            if transient_request(r) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Storage(e.to_string()),
    }
}
