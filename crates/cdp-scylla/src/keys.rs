//! The keyring's rows on ScyllaDB (`subject_keys`, in the keyspace of
//! generation 1: keys outlive every projection generation).
//!
//! A key is created with a lightweight transaction (`IF NOT EXISTS`) and
//! read back with serial consistency, so two ingest processes meeting a new
//! identifier at once agree on one key. Erasing writes nulls over the
//! wrapped key and the erasure's time and request: the row stays as the
//! suppression list. The wrapped key's old cells remain in SSTables until
//! compaction purges them after `gc_grace_seconds`; they are useless
//! without the master key, which ScyllaDB never sees.

use async_trait::async_trait;
use cdp_domain::UnixMillis;
use cdp_seal::{Subject, Wrapped};
use cdp_store::StoreError;
use cdp_store::keys::{KeyRow, KeyRows};
use futures::future::try_join_all;
use scylla::statement::prepared::PreparedStatement;

use crate::{Kind, ScyllaStore, exec_error, prepare, storage};

/// Prepared statements of the keyring.
pub struct ScyllaKeyRows {
    store: ScyllaStore,
    get: PreparedStatement,
    get_serial: PreparedStatement,
    create: PreparedStatement,
    erase: PreparedStatement,
    scan_first: PreparedStatement,
    scan_after: PreparedStatement,
    rewrap: PreparedStatement,
}

type RowTuple = (
    Vec<u8>,
    Option<i32>,
    Option<Vec<u8>>,
    Option<i64>,
    Option<String>,
);

fn row_of((_, master, wrapped, erased_at, request): RowTuple) -> Option<KeyRow> {
    match (erased_at, master, wrapped) {
        (Some(at), _, _) => Some(KeyRow::Erased {
            at,
            request: request.unwrap_or_default(),
        }),
        (None, Some(m), Some(w)) => Some(KeyRow::Active(Wrapped {
            master: u32::try_from(m).unwrap_or_default(),
            bytes: w,
        })),
        _ => None,
    }
}

impl ScyllaKeyRows {
    pub async fn new(store: &ScyllaStore) -> Result<Self, StoreError> {
        let ks = store.keyspace();
        let session = store.session();
        let cols = "subject, master, wrapped, erased_at, request";
        Ok(ScyllaKeyRows {
            get: prepare(
                session,
                format!("SELECT {cols} FROM {ks}.subject_keys WHERE subject = ?"),
                Kind::Read,
            )
            .await?,
            get_serial: prepare(
                session,
                format!("SELECT {cols} FROM {ks}.subject_keys WHERE subject = ?"),
                Kind::SerialRead,
            )
            .await?,
            create: prepare(
                session,
                format!(
                    "INSERT INTO {ks}.subject_keys (subject, master, wrapped) VALUES (?, ?, ?) IF NOT EXISTS"
                ),
                Kind::Lwt,
            )
            .await?,
            erase: prepare(
                session,
                format!(
                    "UPDATE {ks}.subject_keys SET master = null, wrapped = null, erased_at = ?, request = ? WHERE subject = ? IF erased_at = null"
                ),
                Kind::Lwt,
            )
            .await?,
            scan_first: prepare(
                session,
                format!("SELECT {cols} FROM {ks}.subject_keys LIMIT ?"),
                Kind::Read,
            )
            .await?,
            scan_after: prepare(
                session,
                format!(
                    "SELECT {cols} FROM {ks}.subject_keys WHERE token(subject) > token(?) LIMIT ?"
                ),
                Kind::Read,
            )
            .await?,
            rewrap: prepare(
                session,
                format!(
                    "UPDATE {ks}.subject_keys SET master = ?, wrapped = ? WHERE subject = ? IF wrapped = ? AND erased_at = null"
                ),
                Kind::Lwt,
            )
            .await?,
            store: store.clone(),
        })
    }

    async fn one(&self, st: &PreparedStatement, s: &Subject) -> Result<Option<KeyRow>, StoreError> {
        let result = self
            .store
            .session()
            .execute_unpaged(st, (s.as_bytes().as_slice(),))
            .await
            .map_err(exec_error)?
            .into_rows_result()
            .map_err(storage)?;
        let row: Option<RowTuple> = result.maybe_first_row().map_err(storage)?;
        Ok(row.and_then(row_of))
    }

    /// A conditional write on `s`'s row, then the row read back at SERIAL:
    /// whether it applied, lost to another writer or timed out unknown,
    /// the row as it is now decides, and only a row that does not show
    /// `settled` is an error (the timeout's, or `lost`).
    async fn write_then_read(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
        s: &Subject,
        settled: impl FnOnce(&KeyRow) -> bool,
        lost: &str,
    ) -> Result<KeyRow, StoreError> {
        let outcome = self.store.lwt(st, values).await?;
        match self.one(&self.get_serial, s).await? {
            Some(row) if settled(&row) => Ok(row),
            _ => Err(match outcome {
                crate::Lwt::Unknown(e) => e,
                _ => StoreError::Unavailable(lost.to_owned()),
            }),
        }
    }
}

fn master(w: &Wrapped) -> Result<i32, StoreError> {
    i32::try_from(w.master)
        .map_err(|_| StoreError::Invalid(format!("master key version {}", w.master)))
}

#[async_trait]
impl KeyRows for ScyllaKeyRows {
    async fn read(&self, subjects: &[Subject]) -> Result<Vec<Option<KeyRow>>, StoreError> {
        try_join_all(subjects.iter().map(|s| self.one(&self.get, s))).await
    }

    async fn create(&self, rows: &[(Subject, Wrapped)]) -> Result<Vec<KeyRow>, StoreError> {
        try_join_all(rows.iter().map(|(s, w)| async move {
            // Applied or not, the row that exists now wins.
            self.write_then_read(
                &self.create,
                (s.as_bytes().as_slice(), master(w)?, w.bytes.as_slice()),
                s,
                |_| true,
                "a new subject key was not found after its insert",
            )
            .await
        }))
        .await
    }

    async fn erase(
        &self,
        subjects: &[Subject],
        at: UnixMillis,
        request: &str,
    ) -> Result<(), StoreError> {
        // Conditional, like the create and the rewrap it must win over
        // (a plain write's timestamp could lose to theirs).
        try_join_all(subjects.iter().map(|s| {
            self.write_then_read(
                &self.erase,
                (at, request, s.as_bytes().as_slice()),
                s,
                |row| matches!(row, KeyRow::Erased { .. }),
                "a subject key was not erased; retry",
            )
        }))
        .await
        .map(|_| ())
    }

    async fn scan(
        &self,
        after: Option<Subject>,
        limit: usize,
    ) -> Result<Vec<(Subject, KeyRow)>, StoreError> {
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let session = self.store.session();
        let result = match after {
            Some(a) => {
                session
                    .execute_unpaged(&self.scan_after, (a.as_bytes().as_slice(), limit))
                    .await
            }
            None => session.execute_unpaged(&self.scan_first, (limit,)).await,
        }
        .map_err(exec_error)?
        .into_rows_result()
        .map_err(storage)?;
        let mut out = Vec::new();
        for row in result.rows::<RowTuple>().map_err(storage)? {
            let row = row.map_err(storage)?;
            let subject = Subject::from_slice(&row.0).map_err(|e| StoreError::Corrupt {
                what: "keyring row",
                reason: e.to_string(),
            })?;
            if let Some(r) = row_of(row) {
                out.push((subject, r));
            }
        }
        Ok(out)
    }

    async fn rewrap(
        &self,
        subject: Subject,
        old: &Wrapped,
        new: &Wrapped,
    ) -> Result<bool, StoreError> {
        let outcome = self
            .store
            .lwt(
                &self.rewrap,
                (
                    master(new)?,
                    new.bytes.as_slice(),
                    subject.as_bytes().as_slice(),
                    old.bytes.as_slice(),
                ),
            )
            .await?;
        match outcome {
            crate::Lwt::Applied => Ok(true),
            crate::Lwt::NotApplied => Ok(false),
            crate::Lwt::Unknown(e) => Err(e),
        }
    }
}
