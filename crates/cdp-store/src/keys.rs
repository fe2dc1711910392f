//! The keyring of crypto-shredding (see `cdp_seal`): one data key per
//! subject, stored wrapped by the master key, and erased on request.
//!
//! [`KeyRows`] is the port (rows of `subject -> wrapped key | erased`), with
//! an embedded implementation here ([`EmbeddedKeyRows`], redb) and one on
//! ScyllaDB. [`Keyring`] is what the services use: it wraps and unwraps,
//! creates missing keys for writers, keeps recently used keys in memory for
//! `key_cache` (so an erasure reaches every process within that time), and
//! rewraps rows under the newest master key ([`Keyring::rotate`]).
//!
//! An erased row is never deleted: it stays as the subject's hash with the
//! time and the request that erased it, which is the suppression list.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cdp_domain::{Identifier, UnixMillis};
use cdp_seal::{DataKey, Hasher, KeySet, MasterKeys, SealError, Subject, Wrapped};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::Deserialize;

use crate::StoreError;
use crate::subject_filter::SubjectFilter;

/// A subject's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRow {
    Active(Wrapped),
    /// Erased at `at` by erasure request `request`.
    Erased {
        at: UnixMillis,
        request: String,
    },
}

/// The rows of the keyring. Writes are durable when they return, except
/// [`create`](KeyRows::create) on the embedded log's own file
/// ([`EmbeddedKeyRows::open_on`]): a new key is durable with the log's next
/// append, which is the append it was created for.
#[async_trait]
pub trait KeyRows: Send + Sync + 'static {
    /// The row of each subject, in order.
    async fn read(&self, subjects: &[Subject]) -> Result<Vec<Option<KeyRow>>, StoreError>;

    /// Stores each row where the subject has none yet, and returns the row
    /// each subject has now (another writer's may have won).
    async fn create(&self, rows: &[(Subject, Wrapped)]) -> Result<Vec<KeyRow>, StoreError>;

    /// Replaces each subject's row with an erased marker (a subject with no
    /// row gets one too: it is suppressed before it is ever seen).
    async fn erase(
        &self,
        subjects: &[Subject],
        at: UnixMillis,
        request: &str,
    ) -> Result<(), StoreError>;

    /// Up to `limit` rows after the cursor `after` (a subject this adapter
    /// returned), in the adapter's order; empty at the end.
    async fn scan(
        &self,
        after: Option<Subject>,
        limit: usize,
    ) -> Result<Vec<(Subject, KeyRow)>, StoreError>;

    /// Replaces `subject`'s active row `old` with `new`; false when the row
    /// is no longer `old` (erased or rewrapped meanwhile).
    async fn rewrap(
        &self,
        subject: Subject,
        old: &Wrapped,
        new: &Wrapped,
    ) -> Result<bool, StoreError>;

    /// Makes every row [`create`](Self::create) returned durable. Rows
    /// are durable when `create` returns, except on the embedded log's
    /// file, where they wait for its next append.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

fn seal_error(e: SealError) -> StoreError {
    StoreError::Corrupt {
        what: "keyring",
        reason: e.to_string(),
    }
}

/// The row holding the platform's hash secret (wrapped like a data key).
const HASH_SECRET: Subject = Subject([0; 32]);

struct Cache {
    entries: cdp_seal::SubjectMap<(Option<DataKey>, Instant)>,
    capacity: usize,
    ttl: Duration,
    /// Only this keyring reads and writes its rows: entries never expire
    /// (and no other process holds keys to wait for). See
    /// [`Keyring::exclusive`].
    exclusive: bool,
}

impl Cache {
    fn get(&self, s: &Subject) -> Option<Option<DataKey>> {
        self.entries
            .get(s)
            .filter(|(_, at)| self.exclusive || at.elapsed() < self.ttl)
            .map(|(k, _)| k.clone())
    }

    /// An entry however old: what a process goes on with while the
    /// keyring's store cannot be reached.
    fn stale(&self, s: &Subject) -> Option<Option<DataKey>> {
        self.entries.get(s).map(|(k, _)| k.clone())
    }

    fn put(&mut self, s: Subject, k: Option<DataKey>) {
        if self.entries.len() >= self.capacity {
            // Bounded memory: start over rather than track recency.
            self.entries.clear();
        }
        self.entries.insert(s, (k, Instant::now()));
    }
}

/// What a rotation pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rotation {
    /// Versions read from the master key file for the first time.
    pub added: Vec<u32>,
    pub scanned: u64,
    pub rewrapped: u64,
    /// Rows wrapped by a master key version this process does not have.
    pub unknown: u64,
}

/// The keyring the services use. Cheap to share (`Arc`).
pub struct Keyring {
    rows: Arc<dyn KeyRows>,
    master: RwLock<MasterKeys>,
    /// Where the master keys were read from: read again when a row names a
    /// version this process lacks, and before a rotation.
    master_file: Option<PathBuf>,
    reloaded: Mutex<Option<Instant>>,
    /// The file's modification time when it was last looked at.
    looked: Mutex<Option<std::time::SystemTime>>,
    hasher: Hasher,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring({:?})", self.master_keys().versions())
    }
}

impl Keyring {
    /// Opens the keyring over `rows`: reads (or creates, once for the whole
    /// platform) the hash secret, which must open with `master`.
    pub async fn open(
        rows: Arc<dyn KeyRows>,
        master: MasterKeys,
        cache_ttl: Duration,
        cache_capacity: usize,
    ) -> Result<Self, StoreError> {
        let fresh = DataKey::generate().map_err(seal_error)?;
        let wrapped = master.wrap(&HASH_SECRET, &fresh).map_err(seal_error)?;
        let row = match rows.read(&[HASH_SECRET]).await?.pop().flatten() {
            Some(row) => row,
            None => rows
                .create(&[(HASH_SECRET, wrapped)])
                .await?
                .pop()
                .ok_or_else(|| StoreError::Storage("keyring: no row for the hash secret".into()))?,
        };
        let secret = match row {
            KeyRow::Active(w) => master.unwrap(&HASH_SECRET, &w).map_err(|e| {
                StoreError::Invalid(format!(
                    "the master key does not open this platform's keyring ({e}): every process must use the same master key file (privacy.master_key_file)"
                ))
            })?,
            KeyRow::Erased { .. } => {
                return Err(StoreError::Corrupt {
                    what: "keyring",
                    reason: "the hash secret is erased".into(),
                });
            }
        };
        Ok(Keyring {
            rows,
            master: RwLock::new(master),
            master_file: None,
            reloaded: Mutex::new(None),
            looked: Mutex::new(None),
            hasher: Hasher::new(&secret),
            cache: Mutex::new(Cache {
                entries: cdp_seal::SubjectMap::default(),
                capacity: cache_capacity.max(16),
                ttl: cache_ttl,
                exclusive: false,
            }),
        })
    }

    /// An embedded keyring in `dir` (tests, and `cdp dev`).
    pub async fn embedded(dir: &Path, master: MasterKeys) -> Result<Self, StoreError> {
        let rows = Arc::new(EmbeddedKeyRows::open(dir)?);
        Keyring::open(rows, master, Duration::from_secs(5), 100_000).await
    }

    /// This keyring, declared the only one that reads and writes its rows
    /// (the embedded keyring of a process, whose files it holds locked): a
    /// key then changes only through it, and it keeps its cache in step, so
    /// cached keys never expire (erased ones are forgotten at once).
    pub fn exclusive(self) -> Self {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .exclusive = true;
        self
    }

    /// Reads the master keys again from `path` when a row names a version
    /// this process lacks, and before each [`rotate`](Self::rotate): a new
    /// version added to the file reaches running processes without a
    /// restart.
    pub fn with_master_file(mut self, path: PathBuf) -> Self {
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        *self.looked.lock().unwrap_or_else(|p| p.into_inner()) = modified;
        self.master_file = Some(path);
        self
    }

    /// Before wrapping new keys: reads the master key file again when it
    /// changed (one `stat`, next to the synced write that stores the new
    /// keys), so a version added to the file wraps every key created after
    /// that, in every process.
    fn refresh_master(&self) {
        let Some(path) = &self.master_file else {
            return;
        };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let changed = {
            let mut looked = self.looked.lock().unwrap_or_else(|p| p.into_inner());
            let changed = modified != *looked;
            *looked = modified;
            changed
        };
        if changed && let Err(error) = self.reload_master() {
            tracing::error!(%error, "cannot reload the master keys; new keys stay wrapped by the version in memory");
        }
    }

    fn master_keys(&self) -> RwLockReadGuard<'_, MasterKeys> {
        self.master.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the master key file again and adds the versions it lists that
    /// this process lacks (none is ever removed while running); returns
    /// them.
    pub fn reload_master(&self) -> Result<Vec<u32>, StoreError> {
        let Some(path) = &self.master_file else {
            return Ok(Vec::new());
        };
        *self.reloaded.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let text = std::fs::read_to_string(path).map_err(|e| {
            StoreError::Invalid(format!(
                "cannot read the master key file {}: {e}",
                path.display()
            ))
        })?;
        let newer = MasterKeys::parse(&text).map_err(|e| {
            StoreError::Invalid(format!("the master key file {}: {e}", path.display()))
        })?;
        let added = self
            .master
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .absorb(newer)
            .map_err(|e| {
                StoreError::Invalid(format!("the master key file {}: {e}", path.display()))
            })?;
        if !added.is_empty() {
            tracing::info!(versions = ?added, current = self.master_version(), "master key versions added");
        }
        Ok(added)
    }

    /// [`reload_master`](Self::reload_master) at most once a second, for a
    /// row wrapped by an unknown version.
    fn reload_for_unknown(&self, version: u32) -> bool {
        let recent = self
            .reloaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1));
        if recent || self.master_file.is_none() {
            return false;
        }
        match self.reload_master() {
            Ok(added) => added.contains(&version),
            Err(error) => {
                tracing::error!(%error, version, "cannot reload the master keys");
                false
            }
        }
    }

    fn unwrap_key(&self, s: &Subject, w: &Wrapped) -> Result<DataKey, SealError> {
        // Bound first: the read guard must be gone before a reload writes.
        let first = self.master_keys().unwrap(s, w);
        match first {
            Err(SealError::UnknownMaster(v)) if self.reload_for_unknown(v) => {
                self.master_keys().unwrap(s, w)
            }
            other => other,
        }
    }

    pub fn hasher(&self) -> &Hasher {
        &self.hasher
    }

    /// The subject of an identifier (of its normalised value).
    pub fn subject(&self, id: &Identifier) -> Subject {
        subject_of(&self.hasher, id)
    }

    fn cached(&self, subjects: &[Subject], set: &mut KeySet) -> Vec<Subject> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let mut missing = Vec::new();
        for s in subjects {
            if set.contains(s) {
                continue;
            }
            match cache.get(s) {
                Some(k) => set.insert(*s, k),
                None => missing.push(*s),
            }
        }
        missing.sort();
        missing.dedup();
        missing
    }

    /// The rows of `missing`, or, when the keyring's store cannot be
    /// reached, the keys this process last had for them (an outage of the
    /// store does not stop the pipeline for customers it has seen lately;
    /// an erasure needs the store, so none can happen meanwhile).
    async fn read_rows(&self, missing: &[Subject]) -> Result<Vec<Option<KeyRow>>, StoreError> {
        match self.rows.read(missing).await {
            Ok(rows) => Ok(rows),
            Err(StoreError::Unavailable(reason)) => {
                let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                let stale: Option<Vec<Option<DataKey>>> =
                    missing.iter().map(|s| cache.stale(s)).collect();
                drop(cache);
                match stale {
                    Some(keys) => {
                        tracing::warn!(%reason, subjects = missing.len(), "keyring unavailable: using the keys last read");
                        let mut set = Vec::with_capacity(keys.len());
                        for (s, k) in missing.iter().zip(keys) {
                            set.push(match k {
                                Some(k) => Some(KeyRow::Active(
                                    self.master_keys().wrap(s, &k).map_err(seal_error)?,
                                )),
                                None => Some(KeyRow::Erased {
                                    at: 0,
                                    request: String::new(),
                                }),
                            });
                        }
                        Ok(set)
                    }
                    None => Err(StoreError::Unavailable(reason)),
                }
            }
            Err(e) => Err(e),
        }
    }

    fn remember(&self, entries: &[(Subject, Option<DataKey>)]) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for (s, k) in entries {
            cache.put(*s, k.clone());
        }
    }

    fn unwrap_row(&self, s: &Subject, row: Option<KeyRow>) -> Result<Option<DataKey>, StoreError> {
        match row {
            Some(KeyRow::Active(w)) => self.unwrap_key(s, &w).map(Some).map_err(seal_error),
            Some(KeyRow::Erased { .. }) | None => Ok(None),
        }
    }

    /// The keys of `subjects` for reading: `None` for an erased subject (or
    /// one that never had a key).
    pub async fn keys(&self, subjects: &[Subject]) -> Result<KeySet, StoreError> {
        self.key_set(subjects, false).await
    }

    /// The keys of `subjects` for writing: a subject seen for the first
    /// time gets a key (stored durably before this returns, or, on the
    /// embedded log's file, with the log's next append: see
    /// [`EmbeddedKeyRows::append_hook`]); an erased
    /// (suppressed) subject maps to `None`.
    pub async fn obtain(&self, subjects: &[Subject]) -> Result<KeySet, StoreError> {
        self.key_set(subjects, true).await
    }

    async fn key_set(&self, subjects: &[Subject], create: bool) -> Result<KeySet, StoreError> {
        let mut set = KeySet::new().with_hasher(self.hasher.clone());
        let missing = self.cached(subjects, &mut set);
        if missing.is_empty() {
            return Ok(set);
        }
        let rows = self.read_rows(&missing).await?;
        let mut fetched = Vec::with_capacity(missing.len());
        let mut absent = Vec::new();
        for (s, row) in missing.into_iter().zip(rows) {
            match row {
                None => absent.push(s),
                row => fetched.push((s, self.unwrap_row(&s, row)?)),
            }
        }
        if create && !absent.is_empty() {
            self.refresh_master();
            let mut new = Vec::with_capacity(absent.len());
            let mut plain = Vec::with_capacity(absent.len());
            {
                let master = self.master_keys();
                for s in absent.drain(..) {
                    let key = DataKey::generate().map_err(seal_error)?;
                    new.push((s, master.wrap(&s, &key).map_err(seal_error)?));
                    plain.push(key);
                }
            }
            let stored = self.rows.create(&new).await?;
            for (((s, wrapped), key), row) in new.into_iter().zip(plain).zip(stored) {
                // Ours unless another writer's key won (then it is unwrapped).
                let key = match row {
                    KeyRow::Active(w) if w == wrapped => Some(key),
                    row => self.unwrap_row(&s, Some(row))?,
                };
                fetched.push((s, key));
            }
        }
        self.remember(&fetched);
        for (s, k) in fetched {
            set.insert(s, k);
        }
        // Not remembered: a writer may create them next.
        for s in absent {
            set.insert(s, None);
        }
        Ok(set)
    }

    /// Makes every key created so far durable (see [`KeyRows::flush`]).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.rows.flush().await
    }

    /// Erases the keys of `subjects` (and forgets them here at once; other
    /// processes forget them within the cache's time to live).
    pub async fn erase(
        &self,
        subjects: &[Subject],
        at: UnixMillis,
        request: &str,
    ) -> Result<(), StoreError> {
        let mut subjects = subjects.to_vec();
        subjects.retain(|s| *s != HASH_SECRET);
        subjects.sort();
        subjects.dedup();
        self.rows.erase(&subjects, at, request).await?;
        let gone: Vec<(Subject, Option<DataKey>)> = subjects.iter().map(|s| (*s, None)).collect();
        self.remember(&gone);
        Ok(())
    }

    /// The erasure (time, request) of each subject that is suppressed.
    pub async fn erasures(
        &self,
        subjects: &[Subject],
    ) -> Result<Vec<Option<(UnixMillis, String)>>, StoreError> {
        Ok(self
            .rows
            .read(subjects)
            .await?
            .into_iter()
            .map(|r| match r {
                Some(KeyRow::Erased { at, request }) => Some((at, request)),
                _ => None,
            })
            .collect())
    }

    /// How long another process may still use a key after it was erased
    /// (none when the keyring is [`exclusive`](Self::exclusive)).
    pub fn cache_ttl(&self) -> Duration {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.exclusive {
            Duration::ZERO
        } else {
            cache.ttl
        }
    }

    /// The master key version that wraps.
    pub fn master_version(&self) -> u32 {
        self.master_keys().current()
    }

    /// Reads the master key file again (see
    /// [`with_master_file`](Self::with_master_file)), then rewraps every
    /// active row wrapped by an older master key version under the newest
    /// one, `page` rows at a time. Safe to run from several processes at
    /// once (each rewrap is conditional), and while they serve: a process
    /// that meets a row wrapped by a version it lacks reads the file again.
    pub async fn rotate(&self, page: usize) -> Result<Rotation, StoreError> {
        let mut done = Rotation {
            added: self.reload_master()?,
            ..Rotation::default()
        };
        let current = self.master_version();
        let mut after = None;
        loop {
            let rows = self.rows.scan(after, page.max(1)).await?;
            let Some((last, _)) = rows.last() else {
                break;
            };
            after = Some(*last);
            for (s, row) in rows {
                done.scanned += 1;
                let KeyRow::Active(w) = row else { continue };
                if w.master == current {
                    continue;
                }
                let key = match self.unwrap_key(&s, &w) {
                    Ok(k) => k,
                    Err(SealError::UnknownMaster(_)) => {
                        done.unknown += 1;
                        continue;
                    }
                    Err(e) => return Err(seal_error(e)),
                };
                let new = self.master_keys().wrap(&s, &key).map_err(seal_error)?;
                if self.rows.rewrap(s, &w, &new).await? {
                    done.rewrapped += 1;
                }
            }
        }
        Ok(done)
    }
}

/// The subject of an identifier under `hasher`: of its
/// [`key`](Identifier::key), `kind \0 value`, without building it.
pub fn subject_of(hasher: &Hasher, id: &Identifier) -> Subject {
    hasher.subject_of_parts(&[id.kind.as_str().as_bytes(), b"\0", id.value.as_bytes()])
}

/// Rows filed by subject alone: erased subjects that had no filed row,
/// and every row of a keyring from before runs.
const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("subject_keys");

/// The journal filed in runs (`run (u32, big-endian) | subject -> row`):
/// each filing is a new run, sorted by subject, after every earlier one,
/// so it appends to the end of the tree instead of rewriting a leaf per
/// key of a tree of random subjects, and keys created together (one
/// chunk of customers) stay together for the readers that follow the log.
const RUNS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("subject_keys_runs");

/// Up to `limit` rows of `table` after the key `after`.
fn rows_after(
    table: &redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<(Vec<u8>, KeyRow)>, StoreError> {
    let range = match after {
        Some(a) => table.range::<&[u8]>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
        None => table.range::<&[u8]>(..),
    }
    .map_err(db_error)?;
    let mut out = Vec::new();
    for item in range.take(limit) {
        let (k, v) = item.map_err(db_error)?;
        out.push((k.value().to_vec(), decode(v.value())?));
    }
    Ok(out)
}

/// Where a filed row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// In [`KEYS`].
    Keys,
    /// In [`RUNS`], in this run.
    Run(u32),
}

impl Place {
    fn key(self, s: &Subject) -> Vec<u8> {
        match self {
            Place::Keys => s.as_bytes().to_vec(),
            Place::Run(run) => {
                let mut k = Vec::with_capacity(36);
                k.extend_from_slice(&run.to_be_bytes());
                k.extend_from_slice(s.as_bytes());
                k
            }
        }
    }
}

/// The subject and run of a key of [`RUNS`].
fn read_run_key(k: &[u8]) -> Result<(u32, Subject), StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: "keyring runs",
        reason: format!("a key of {} bytes", k.len()),
    };
    let (run, s) = k.split_first_chunk::<4>().ok_or_else(corrupt)?;
    let s = Subject::from_slice(s).map_err(|_| corrupt())?;
    Ok((u32::from_be_bytes(*run), s))
}

/// Which filed places may hold a subject: a filter per run and one for
/// [`KEYS`] (every subject that has a filed row is in its place's filter),
/// and one of every filed subject, so a new subject is answered by one
/// filter however many runs there are.
#[derive(Default)]
struct Filed {
    all: SubjectFilter,
    keys: SubjectFilter,
    /// Oldest first.
    runs: Vec<(u32, SubjectFilter)>,
}

impl Filed {
    /// The places that may hold `s`, newest first (a subject has one row,
    /// so the first that holds it decides).
    fn places(&self, s: &Subject) -> Vec<Place> {
        if !self.all.may_contain(&s.0) {
            return Vec::new();
        }
        let mut out: Vec<Place> = self
            .runs
            .iter()
            .rev()
            .filter(|(_, f)| f.may_contain(&s.0))
            .map(|(run, _)| Place::Run(*run))
            .collect();
        if self.keys.may_contain(&s.0) {
            out.push(Place::Keys);
        }
        out
    }

    fn may_contain(&self, s: &Subject) -> bool {
        self.all.may_contain(&s.0)
    }

    /// Notes a subject filed by subject alone.
    fn add_by_subject(&mut self, s: &Subject) {
        self.all.insert(&s.0);
        self.keys.insert(&s.0);
    }

    /// The number of the next run.
    fn next_run(&self) -> u32 {
        self.runs.last().map_or(0, |(run, _)| run.saturating_add(1))
    }

    /// Notes a new run of `subjects`.
    fn add_run<'s>(&mut self, run: u32, subjects: impl ExactSizeIterator<Item = &'s Subject>) {
        let mut f = SubjectFilter::exactly(subjects.len());
        for s in subjects {
            f.insert(&s.0);
            self.all.insert(&s.0);
        }
        self.runs.push((run, f));
    }
}

/// The two filed tables of a transaction.
struct FiledTables<T> {
    keys: T,
    runs: T,
}

impl<T: ReadableTable<&'static [u8], &'static [u8]>> FiledTables<T> {
    /// The filed row of `s` among `places`, and where it is.
    fn find(&self, places: &[Place], s: &Subject) -> Result<Option<(Place, KeyRow)>, StoreError> {
        for &place in places {
            let table = match place {
                Place::Keys => &self.keys,
                Place::Run(_) => &self.runs,
            };
            if let Some(v) = table.get(place.key(s).as_slice()).map_err(db_error)? {
                return Ok(Some((place, decode(v.value())?)));
            }
        }
        Ok(None)
    }
}

impl FiledTables<redb::ReadOnlyTable<&'static [u8], &'static [u8]>> {
    fn read(tx: &redb::ReadTransaction) -> Result<Self, StoreError> {
        Ok(FiledTables {
            keys: tx.open_table(KEYS).map_err(db_error)?,
            runs: tx.open_table(RUNS).map_err(db_error)?,
        })
    }
}

impl<'tx> FiledTables<redb::Table<'tx, &'static [u8], &'static [u8]>> {
    fn write(tx: &'tx redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(FiledTables {
            keys: tx.open_table(KEYS).map_err(db_error)?,
            runs: tx.open_table(RUNS).map_err(db_error)?,
        })
    }

    fn put(&mut self, place: Place, s: &Subject, row: &[u8]) -> Result<(), StoreError> {
        let table = match place {
            Place::Keys => &mut self.keys,
            Place::Run(_) => &mut self.runs,
        };
        table
            .insert(place.key(s).as_slice(), row)
            .map_err(db_error)?;
        Ok(())
    }
}

/// The keyring's own file, when the log is not embedded.
const OWN_FILE: &str = "keys.redb";

/// The JSON rows written before rows became binary (still read).
#[derive(Deserialize)]
enum Stored {
    Active { master: u32, wrapped: Vec<u8> },
    Erased { at: UnixMillis, request: String },
}

const ACTIVE: u8 = 1;
const ERASED: u8 = 2;

/// A row as bytes: `1 | master (u32 BE) | wrapped` or
/// `2 | at (i64 BE) | request (UTF-8)`. A third of the JSON rows' size, so
/// a commit that adds scattered subjects rewrites fewer pages.
fn encode(row: &KeyRow) -> Vec<u8> {
    match row {
        KeyRow::Active(w) => {
            let mut out = Vec::with_capacity(5 + w.bytes.len());
            out.push(ACTIVE);
            out.extend_from_slice(&w.master.to_be_bytes());
            out.extend_from_slice(&w.bytes);
            out
        }
        KeyRow::Erased { at, request } => {
            let mut out = Vec::with_capacity(9 + request.len());
            out.push(ERASED);
            out.extend_from_slice(&at.to_be_bytes());
            out.extend_from_slice(request.as_bytes());
            out
        }
    }
}

fn decode(bytes: &[u8]) -> Result<KeyRow, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        what: "keyring row",
        reason,
    };
    match bytes.split_first() {
        Some((&ACTIVE, rest)) if rest.len() >= 4 => {
            let (master, wrapped) = rest.split_at(4);
            let master =
                u32::from_be_bytes(master.try_into().map_err(|_| corrupt("master".into()))?);
            Ok(KeyRow::Active(Wrapped {
                master,
                bytes: wrapped.to_vec(),
            }))
        }
        Some((&ERASED, rest)) if rest.len() >= 8 => {
            let (at, request) = rest.split_at(8);
            let at = i64::from_be_bytes(at.try_into().map_err(|_| corrupt("time".into()))?);
            let request = std::str::from_utf8(request)
                .map_err(|e| corrupt(e.to_string()))?
                .to_owned();
            Ok(KeyRow::Erased { at, request })
        }
        Some((b'{', _)) => {
            let s: Stored = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
            Ok(match s {
                Stored::Active { master, wrapped } => KeyRow::Active(Wrapped {
                    master,
                    bytes: wrapped,
                }),
                Stored::Erased { at, request } => KeyRow::Erased { at, request },
            })
        }
        _ => Err(corrupt(format!("unknown row of {} bytes", bytes.len()))),
    }
}

fn db_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(format!("keyring: {e}"))
}

/// A write transaction saving the allocator state with its commit (redb's
/// quick repair), as the log's do: the file may be the log's.
fn begin_write(db: &Database) -> Result<redb::WriteTransaction, StoreError> {
    let mut tx = db.begin_write().map_err(db_error)?;
    tx.set_quick_repair(true);
    Ok(tx)
}

/// Page cache of a keyring in a file of its own (redb's default is 1 GiB).
const OWN_FILE_CACHE: usize = 16 << 20;

/// Rows waiting for the next commit of [`EmbeddedKeyRows::create`].
struct Waiting {
    rows: Vec<(Subject, Wrapped)>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<KeyRow>, StoreError>>,
}

/// New keys in creation order (`seq -> subject | row`): appending touches
/// only the last page, where filing each new key by its (random) subject
/// would rewrite a page of the tree per key in every commit.
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("subject_keys_journal");

/// Journal entries are filed as a new run in one commit once this many
/// wait (about 14 MB of memory for their index).
pub const FILE_AT: usize = 100_000;

/// The journal's entries by subject, in memory (loaded when the file
/// opens), and the next sequence number.
#[derive(Default)]
struct Journal {
    by_subject: cdp_seal::SubjectMap<(u64, KeyRow)>,
    next: u64,
    /// Entries of `by_subject` not written to the file yet (on the log's
    /// file: the next commit of the file writes them, the log's append
    /// above all). An entry is written with the row `by_subject` holds then,
    /// and only while it holds the same sequence number (an erasure
    /// removes it).
    pending: BTreeMap<u64, Subject>,
    /// Where the subjects that have a filed row may be: a subject no
    /// filter holds is looked up nowhere.
    filed: Filed,
}

impl Journal {
    /// Whether the journal should be filed once `adding` more entries wait.
    fn filing_due(&self, file_at: usize, adding: usize) -> bool {
        self.by_subject.len() + adding >= file_at
    }

    /// Whether `s`, not in the journal, may have a filed row to look up.
    fn may_be_filed(&self, s: &Subject) -> bool {
        !self.by_subject.contains_key(s) && self.filed.may_contain(s)
    }

    /// Writes the pending entries into `tx` and takes them out of
    /// `pending`; give them back with [`restore`](Self::restore) if `tx`
    /// does not commit.
    fn write_pending(
        &mut self,
        tx: &redb::WriteTransaction,
    ) -> Result<BTreeMap<u64, Subject>, StoreError> {
        if self.pending.is_empty() {
            return Ok(BTreeMap::new());
        }
        let taken = std::mem::take(&mut self.pending);
        let written = (|| {
            let mut appended = tx.open_table(JOURNAL).map_err(db_error)?;
            for (seq, s) in &taken {
                if let Some((at, row)) = self.by_subject.get(s)
                    && at == seq
                {
                    appended
                        .insert(*seq, journal_entry(s, row).as_slice())
                        .map_err(db_error)?;
                }
            }
            Ok(())
        })();
        match written {
            Ok(()) => Ok(taken),
            Err(e) => {
                self.restore(taken);
                Err(e)
            }
        }
    }

    /// Gives back entries [`write_pending`](Self::write_pending) took for a
    /// transaction that did not commit (those erased meanwhile stay out).
    fn restore(&mut self, taken: BTreeMap<u64, Subject>) {
        for (seq, s) in taken {
            if self.by_subject.get(&s).is_some_and(|(at, _)| *at == seq) {
                self.pending.insert(seq, s);
            }
        }
    }
}

fn journal_entry(s: &Subject, row: &KeyRow) -> Vec<u8> {
    let mut out = s.as_bytes().to_vec();
    out.extend_from_slice(&encode(row));
    out
}

fn read_journal_entry(bytes: &[u8]) -> Result<(Subject, KeyRow), StoreError> {
    if bytes.len() < 32 {
        return Err(StoreError::Corrupt {
            what: "keyring journal",
            reason: format!("an entry of {} bytes", bytes.len()),
        });
    }
    let (s, row) = bytes.split_at(32);
    Ok((Subject::from_slice(s).map_err(seal_error)?, decode(row)?))
}

/// The keyring's rows in redb: in the embedded log's file when the log is
/// embedded ([`open_on`](Self::open_on)), else in a file of their own
/// (`<dir>/keys.redb`).
///
/// - On the log's file, a new key is not committed on its own: it waits in
///   memory (readers see it at once) and the log's next append writes it in
///   the append's own transaction ([`append_hook`](Self::append_hook)),
///   which is the append it was created for or an earlier one. An ingest
///   batch costs one commit and one sync, not two; a crash before that
///   append loses keys nothing was sealed with.
/// - In a file of its own, creations are group-committed: concurrent ingest
///   batches that bring new subjects wait for one synced commit together
///   instead of one each (that commit is on the ingest path).
/// - New keys are appended to a journal in creation order, indexed by
///   subject in memory, and filed in one commit once [`FILE_AT`] of them
///   wait (or before a scan), as a run sorted by subject after the earlier
///   runs (see [`RUNS`]), with a filter of its subjects in memory.
/// - Every write (create, erase, rewrap, filing) holds one lock, so the
///   journal and its index change together.
pub struct EmbeddedKeyRows {
    db: Arc<Database>,
    waiting: Arc<Mutex<Vec<Waiting>>>,
    committer: tokio::sync::Mutex<()>,
    journal: Arc<Mutex<Journal>>,
    file_at: usize,
    /// Creations are synced by their own commit (false on the log's file).
    sync_creates: bool,
}

impl EmbeddedKeyRows {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_filing_at(dir, FILE_AT)
    }

    /// [`open`](Self::open), filing the journal once `file_at` entries wait.
    pub fn open_filing_at(dir: &Path, file_at: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(db_error)?;
        let db = redb::Builder::new()
            .set_cache_size(OWN_FILE_CACHE)
            .create(dir.join(OWN_FILE))
            .map_err(db_error)?;
        Self::init(Arc::new(db), file_at, true)
    }

    /// The keyring in `db`, the embedded log's file, whose appends sync new
    /// keys (see the type). Rows of an earlier keyring of its own in
    /// `old_dir` (`keys.redb`) are moved in first, and that file deleted.
    pub fn open_on(db: Arc<Database>, old_dir: &Path) -> Result<Self, StoreError> {
        Self::open_on_filing_at(db, old_dir, FILE_AT)
    }

    /// [`open_on`](Self::open_on), filing the journal once `file_at` entries
    /// wait.
    pub fn open_on_filing_at(
        db: Arc<Database>,
        old_dir: &Path,
        file_at: usize,
    ) -> Result<Self, StoreError> {
        let rows = Self::init(db, file_at, false)?;
        rows.move_in(old_dir)?;
        Ok(rows)
    }

    /// Moves the rows of the keyring file in `old_dir` into this one (an
    /// erased row wins over an active one), syncs, and deletes the file.
    /// Two different active keys for one subject (the hash secret above
    /// all: every subject depends on it) are refused, and the file is kept.
    fn move_in(&self, old_dir: &Path) -> Result<(), StoreError> {
        let path = old_dir.join(OWN_FILE);
        if !path.exists() {
            return Ok(());
        }
        let old = Self::open_filing_at(old_dir, FILE_AT)?;
        let mut rows: Vec<(Subject, KeyRow)> = Self::journal(&old.journal)
            .by_subject
            .iter()
            .map(|(s, (_, r))| (*s, r.clone()))
            .collect();
        {
            let tx = old.db.begin_read().map_err(db_error)?;
            let t = tx.open_table(KEYS).map_err(db_error)?;
            for item in t.iter().map_err(db_error)? {
                let (k, v) = item.map_err(db_error)?;
                rows.push((
                    Subject::from_slice(k.value()).map_err(seal_error)?,
                    decode(v.value())?,
                ));
            }
            let t = tx.open_table(RUNS).map_err(db_error)?;
            for item in t.iter().map_err(db_error)? {
                let (k, v) = item.map_err(db_error)?;
                rows.push((read_run_key(k.value())?.1, decode(v.value())?));
            }
        }
        drop(old);
        // Every row of this file filed first, so the filters decide.
        Self::file_journal(&self.db, &self.journal)?;
        rows.sort_unstable_by_key(|r| r.0);
        let (run, places): (u32, Vec<Vec<Place>>) = {
            let j = Self::journal(&self.journal);
            (
                j.filed.next_run(),
                rows.iter().map(|(s, _)| j.filed.places(s)).collect(),
            )
        };
        let tx = begin_write(&self.db)?;
        let mut conflicts = 0usize;
        let mut added: Vec<Subject> = Vec::new();
        {
            let mut filed = FiledTables::write(&tx)?;
            for ((s, row), places) in rows.iter().zip(&places) {
                let here = filed.find(places, s)?;
                let place = match (&here, row) {
                    (None, _) => {
                        added.push(*s);
                        Place::Run(run)
                    }
                    (Some((at, KeyRow::Active(_))), KeyRow::Erased { .. }) => *at,
                    (Some((_, KeyRow::Active(a))), KeyRow::Active(b)) if a != b => {
                        conflicts += 1;
                        continue;
                    }
                    (Some(_), _) => continue,
                };
                filed.put(place, s, encode(row).as_slice())?;
            }
        }
        if conflicts > 0 {
            tx.abort().map_err(db_error)?;
            return Err(StoreError::Invalid(format!(
                "keyring: {} and the log's file hold different keys for {conflicts} subjects (two keyrings of different platforms?); move one away",
                path.display()
            )));
        }
        tx.commit().map_err(db_error)?;
        if !added.is_empty() {
            Self::journal(&self.journal)
                .filed
                .add_run(run, added.iter());
        }
        std::fs::remove_file(&path).map_err(db_error)?;
        tracing::info!(rows = rows.len(), from = %path.display(), "keyring moved into the log's file");
        Ok(())
    }

    fn init(db: Arc<Database>, file_at: usize, sync_creates: bool) -> Result<Self, StoreError> {
        let tx = begin_write(&db)?;
        tx.open_table(KEYS).map_err(db_error)?;
        tx.open_table(RUNS).map_err(db_error)?;
        tx.open_table(JOURNAL).map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        let mut journal = Journal::default();
        {
            let tx = db.begin_read().map_err(db_error)?;
            let t = tx.open_table(JOURNAL).map_err(db_error)?;
            for item in t.iter().map_err(db_error)? {
                let (seq, v) = item.map_err(db_error)?;
                let (s, row) = read_journal_entry(v.value())?;
                journal.by_subject.insert(s, (seq.value(), row));
                journal.next = journal.next.max(seq.value() + 1);
            }
            let filed = tx.open_table(KEYS).map_err(db_error)?;
            let count = usize::try_from(filed.len().map_err(db_error)?).unwrap_or(usize::MAX);
            let in_runs = tx
                .open_table(RUNS)
                .map_err(db_error)?
                .len()
                .map_err(db_error)?;
            journal.filed.keys = SubjectFilter::with_capacity(count);
            journal.filed.all = SubjectFilter::with_capacity(
                count.saturating_add(usize::try_from(in_runs).unwrap_or(usize::MAX)),
            );
            for item in filed.iter().map_err(db_error)? {
                let (s, _) = item.map_err(db_error)?;
                journal
                    .filed
                    .add_by_subject(&Subject::from_slice(s.value()).map_err(seal_error)?);
            }
            // Run by run, in order: the subjects of one, then its filter.
            let runs = tx.open_table(RUNS).map_err(db_error)?;
            let mut run: Option<(u32, Vec<Subject>)> = None;
            for item in runs.iter().map_err(db_error)? {
                let (k, _) = item.map_err(db_error)?;
                let (n, s) = read_run_key(k.value())?;
                match &mut run {
                    Some((at, subjects)) if *at == n => subjects.push(s),
                    _ => {
                        if let Some((at, subjects)) = run.replace((n, vec![s])) {
                            journal.filed.add_run(at, subjects.iter());
                        }
                    }
                }
            }
            if let Some((at, subjects)) = run {
                journal.filed.add_run(at, subjects.iter());
            }
            // A journal entry for a subject already filed is a stale copy
            // (written by an append between a filing's commit and its
            // clearing of the journal, before filing took the pending
            // entries first): the filed row stands, an erasure above all.
            let tables = FiledTables::read(&tx)?;
            let mut stale = Vec::new();
            for s in journal.by_subject.keys() {
                if tables.find(&journal.filed.places(s), s)?.is_some() {
                    stale.push(*s);
                }
            }
            for s in &stale {
                journal.by_subject.remove(s);
            }
            if !stale.is_empty() {
                tracing::warn!(
                    subjects = stale.len(),
                    "keyring: journal entries of subjects already filed were left out"
                );
            }
        }
        Ok(EmbeddedKeyRows {
            db,
            waiting: Arc::new(Mutex::new(Vec::new())),
            committer: tokio::sync::Mutex::new(()),
            journal: Arc::new(Mutex::new(journal)),
            file_at: file_at.max(1),
            sync_creates,
        })
    }

    fn journal(journal: &Mutex<Journal>) -> std::sync::MutexGuard<'_, Journal> {
        journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the database and the journal while holding the writers'
    /// lock.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database, &Mutex<Journal>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _turn = self.committer.lock().await;
        let (db, journal) = (Arc::clone(&self.db), Arc::clone(&self.journal));
        tokio::task::spawn_blocking(move || f(&db, &journal))
            .await
            .map_err(db_error)?
    }

    /// Stores every waiting creation in one transaction and answers each.
    fn commit_waiting(
        db: &Database,
        journal: &Mutex<Journal>,
        waiting: Vec<Waiting>,
        file_at: usize,
    ) {
        let rows: Vec<&(Subject, Wrapped)> = waiting.iter().flat_map(|w| &w.rows).collect();
        let stored = Self::append_new(db, journal, &rows).and_then(|stored| {
            if Self::journal(journal).filing_due(file_at, 0) {
                Self::file_journal(db, journal)?;
            }
            Ok(stored)
        });
        match stored {
            Ok(stored) => {
                let mut stored = stored.into_iter();
                for w in waiting {
                    let mine: Vec<KeyRow> = stored.by_ref().take(w.rows.len()).collect();
                    // A caller that gave up is fine.
                    let _ = w.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                let reason = e.to_string();
                for w in waiting {
                    let _ = w.reply.send(Err(match &e {
                        StoreError::Unavailable(_) => StoreError::Unavailable(reason.clone()),
                        _ => StoreError::Storage(reason.clone()),
                    }));
                }
            }
        }
    }

    /// Appends the subjects that have no row yet to the journal, in one
    /// synced commit (a keyring in a file of its own); returns the row each
    /// subject has now.
    fn append_new(
        db: &Database,
        journal: &Mutex<Journal>,
        rows: &[&(Subject, Wrapped)],
    ) -> Result<Vec<KeyRow>, StoreError> {
        let mut next = Self::journal(journal).next;
        let mut added: HashMap<Subject, (u64, KeyRow)> = HashMap::new();
        let mut out = Vec::with_capacity(rows.len());
        let tx = begin_write(db)?;
        {
            let filed = FiledTables::write(&tx)?;
            let mut appended = tx.open_table(JOURNAL).map_err(db_error)?;
            for (s, w) in rows {
                let known = Self::journal(journal)
                    .by_subject
                    .get(s)
                    .map(|(_, r)| r.clone());
                if let Some(row) = known.or_else(|| added.get(s).map(|(_, r)| r.clone())) {
                    out.push(row);
                    continue;
                }
                let places = Self::journal(journal).filed.places(s);
                if let Some((_, row)) = filed.find(&places, s)? {
                    out.push(row);
                    continue;
                }
                let row = KeyRow::Active(w.clone());
                appended
                    .insert(next, journal_entry(s, &row).as_slice())
                    .map_err(db_error)?;
                added.insert(*s, (next, row.clone()));
                out.push(row);
                next += 1;
            }
        }
        tx.commit().map_err(db_error)?;
        let mut j = Self::journal(journal);
        j.by_subject.extend(added);
        j.next = next;
        Ok(out)
    }

    /// Gives the subjects that have no row yet a pending journal entry
    /// (written by the next commit of the file: see
    /// [`append_hook`](Self::append_hook)); returns the row each subject
    /// has now.
    fn add_pending(
        db: &Database,
        journal: &Mutex<Journal>,
        rows: &[(Subject, Wrapped)],
    ) -> Result<Vec<KeyRow>, StoreError> {
        // The writers' turn is held: only this call adds to the journal, so
        // what it lacks now it lacks below. The filed rows are read without
        // the journal's lock, which the log's append takes.
        let unjournaled: Vec<(Subject, Vec<Place>)> = {
            let j = Self::journal(journal);
            rows.iter()
                .map(|(s, _)| *s)
                .filter(|s| j.may_be_filed(s))
                .map(|s| (s, j.filed.places(&s)))
                .collect()
        };
        let mut filed_rows: HashMap<Subject, KeyRow> = HashMap::new();
        if !unjournaled.is_empty() {
            let tx = db.begin_read().map_err(db_error)?;
            let filed = FiledTables::read(&tx)?;
            for (s, places) in unjournaled {
                if let Some((_, row)) = filed.find(&places, &s)? {
                    filed_rows.insert(s, row);
                }
            }
        }
        Ok(Self::journal_new(
            &mut Self::journal(journal),
            rows,
            &filed_rows,
        ))
    }

    /// The row of each subject: its journal entry, else its filed row
    /// (from `filed_rows`), else a new pending entry.
    fn journal_new(
        j: &mut Journal,
        rows: &[(Subject, Wrapped)],
        filed_rows: &HashMap<Subject, KeyRow>,
    ) -> Vec<KeyRow> {
        let mut out = Vec::with_capacity(rows.len());
        for (s, w) in rows {
            if let Some((_, row)) = j.by_subject.get(s) {
                out.push(row.clone());
            } else if let Some(row) = filed_rows.get(s) {
                out.push(row.clone());
            } else {
                let seq = j.next;
                j.next += 1;
                let row = KeyRow::Active(w.clone());
                j.by_subject.insert(*s, (seq, row.clone()));
                j.pending.insert(seq, *s);
                out.push(row);
            }
        }
        out
    }

    /// What the embedded log must call before it commits each append, when
    /// the keyring is on the log's file ([`open_on`](Self::open_on)): it
    /// writes the keys created since the last commit into the append's
    /// transaction, so a key is durable with the first record sealed with
    /// it, in the same sync. Without it keys created on the log's file are
    /// written only by the keyring's own writes (an erasure, a rotation, the
    /// filing of the journal).
    pub fn append_hook(&self) -> cdp_log::embedded::AppendHook {
        let journal = Arc::clone(&self.journal);
        Box::new(move |tx| {
            let taken = Self::journal(&journal)
                .write_pending(tx)
                .map_err(|e| e.to_string())?;
            let journal = Arc::clone(&journal);
            Ok(Box::new(move |committed| {
                if !committed {
                    Self::journal(&journal).restore(taken);
                }
            }))
        })
    }

    /// Files every journal entry as a new run and empties the journal, in
    /// one commit.
    fn file_journal(db: &Database, journal: &Mutex<Journal>) -> Result<(), StoreError> {
        // The pending entries are taken now: this commit files them, and
        // the log's next append must not write them into the new journal
        // between this commit and the journal's update below.
        let (run, mut entries, taken) = {
            let mut j = Self::journal(journal);
            let entries: Vec<(Subject, KeyRow)> = j
                .by_subject
                .iter()
                .map(|(s, (_, r))| (*s, r.clone()))
                .collect();
            let taken = std::mem::take(&mut j.pending);
            (j.filed.next_run(), entries, taken)
        };
        if entries.is_empty() {
            return Ok(());
        }
        // In key order, after every earlier run: appended to the tree.
        entries.sort_unstable_by_key(|e| e.0);
        let written = (|| {
            let tx = begin_write(db)?;
            // No entry is filed already: the journal gains only subjects
            // without a filed row, and `init` leaves out stale copies.
            let filed: Vec<Subject> = entries.iter().map(|(s, _)| *s).collect();
            {
                let mut runs = tx.open_table(RUNS).map_err(db_error)?;
                for (s, row) in &entries {
                    runs.insert(Place::Run(run).key(s).as_slice(), encode(row).as_slice())
                        .map_err(db_error)?;
                }
            }
            tx.delete_table(JOURNAL).map_err(db_error)?;
            tx.open_table(JOURNAL).map_err(db_error)?;
            tx.commit().map_err(db_error)?;
            Ok::<_, StoreError>(filed)
        })();
        let filed = match written {
            Ok(filed) => filed,
            Err(e) => {
                Self::journal(journal).restore(taken);
                return Err(e);
            }
        };
        // Every entry is filed now, the pending ones too. Nothing was
        // created meanwhile: creations and filing take the writers' turn.
        // The run's filter and the journal change under one lock, so a
        // reader finds a subject in one or the other.
        let mut j = Self::journal(journal);
        if !filed.is_empty() {
            j.filed.add_run(run, filed.iter());
        }
        j.by_subject.clear();
        j.pending.clear();
        tracing::debug!(keys = filed.len(), "keyring journal filed");
        Ok(())
    }
}

#[async_trait]
impl KeyRows for EmbeddedKeyRows {
    /// Writes the pending keys (on the log's file) in a synced commit of
    /// their own.
    async fn flush(&self) -> Result<(), StoreError> {
        if self.sync_creates || Self::journal(&self.journal).pending.is_empty() {
            return Ok(());
        }
        self.write(|db, journal| {
            let tx = begin_write(db)?;
            let taken = Self::journal(journal).write_pending(&tx)?;
            if taken.is_empty() {
                return Ok(());
            }
            if let Err(e) = tx.commit().map_err(db_error) {
                Self::journal(journal).restore(taken);
                return Err(e);
            }
            Ok(())
        })
        .await
    }

    async fn read(&self, subjects: &[Subject]) -> Result<Vec<Option<KeyRow>>, StoreError> {
        // The journal first: an entry leaves it only after it is filed.
        // Then the filed rows of the subjects the filter may hold.
        let (mut out, missing) = {
            let j = Self::journal(&self.journal);
            let mut out: Vec<Option<KeyRow>> = Vec::with_capacity(subjects.len());
            let mut missing: Vec<(usize, Subject, Vec<Place>)> = Vec::new();
            for (i, s) in subjects.iter().enumerate() {
                let row = j.by_subject.get(s).map(|(_, r)| r.clone());
                if row.is_none() {
                    let places = j.filed.places(s);
                    if !places.is_empty() {
                        missing.push((i, *s, places));
                    }
                }
                out.push(row);
            }
            (out, missing)
        };
        if missing.is_empty() {
            return Ok(out);
        }
        let db = Arc::clone(&self.db);
        let found = tokio::task::spawn_blocking(move || {
            let tx = db.begin_read().map_err(db_error)?;
            let filed = FiledTables::read(&tx)?;
            missing
                .into_iter()
                .map(|(i, s, places)| Ok((i, filed.find(&places, &s)?.map(|(_, r)| r))))
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .await
        .map_err(db_error)??;
        for (i, row) in found {
            out[i] = row;
        }
        Ok(out)
    }

    async fn create(&self, rows: &[(Subject, Wrapped)]) -> Result<Vec<KeyRow>, StoreError> {
        if !self.sync_creates {
            // On the log's file: pending until the log's next append.
            {
                // Subjects with no filed row to look up (as the filter says
                // of new ones) and no filing due: the journal in memory
                // answers, with no hop to the blocking pool.
                let _turn = self.committer.lock().await;
                let mut j = Self::journal(&self.journal);
                let lookups = rows.iter().any(|(s, _)| j.may_be_filed(s));
                if !lookups && !j.filing_due(self.file_at, rows.len()) {
                    return Ok(Self::journal_new(&mut j, rows, &HashMap::new()));
                }
            }
            let (rows, file_at) = (rows.to_vec(), self.file_at);
            return self
                .write(move |db, journal| {
                    let stored = Self::add_pending(db, journal, &rows)?;
                    if Self::journal(journal).filing_due(file_at, 0) {
                        Self::file_journal(db, journal)?;
                    }
                    Ok(stored)
                })
                .await;
        }
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Waiting {
                rows: rows.to_vec(),
                reply,
            });
        // Whoever holds the committer commits everything waiting, this
        // caller's rows included unless an earlier holder took them.
        let turn = self.committer.lock().await;
        if let Ok(done) = answer.try_recv() {
            return done;
        }
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()));
        if !waiting.is_empty() {
            let (db, journal, file_at) = (
                Arc::clone(&self.db),
                Arc::clone(&self.journal),
                self.file_at,
            );
            tokio::task::spawn_blocking(move || {
                Self::commit_waiting(&db, &journal, waiting, file_at)
            })
            .await
            .map_err(db_error)?;
        }
        drop(turn);
        answer
            .await
            .map_err(|_| StoreError::Storage("keyring: the commit was abandoned".into()))?
    }

    async fn erase(
        &self,
        subjects: &[Subject],
        at: UnixMillis,
        request: &str,
    ) -> Result<(), StoreError> {
        let subjects = subjects.to_vec();
        let row = encode(&KeyRow::Erased {
            at,
            request: request.to_owned(),
        });
        self.write(move |db, journal| {
            let tx = begin_write(db)?;
            let mut j = Self::journal(journal);
            // An erased subject's pending key is never written; the others
            // are, with this commit.
            let erased: std::collections::HashSet<Subject> = subjects.iter().copied().collect();
            let dropped: BTreeMap<u64, Subject> = j
                .pending
                .iter()
                .filter(|(_, s)| erased.contains(s))
                .map(|(seq, s)| (*seq, *s))
                .collect();
            j.pending.retain(|seq, _| !dropped.contains_key(seq));
            let taken = match j.write_pending(&tx) {
                Ok(taken) => taken,
                Err(e) => {
                    j.restore(dropped);
                    return Err(e);
                }
            };
            // A filed row is overwritten where it is; the others are filed
            // by subject (noted first: a false "maybe" if this commit fails
            // costs a lookup, nothing else).
            let written = (|| {
                let mut filed = FiledTables::write(&tx)?;
                let mut appended = tx.open_table(JOURNAL).map_err(db_error)?;
                for s in &subjects {
                    if let Some((seq, _)) = j.by_subject.get(s) {
                        appended.remove(*seq).map_err(db_error)?;
                    }
                    let place = match filed.find(&j.filed.places(s), s)? {
                        Some((place, _)) => place,
                        None => {
                            j.filed.add_by_subject(s);
                            Place::Keys
                        }
                    };
                    filed.put(place, s, row.as_slice())?;
                }
                Ok::<(), StoreError>(())
            })();
            drop(j);
            if let Err(e) = written.and_then(|()| tx.commit().map_err(db_error)) {
                let mut j = Self::journal(journal);
                j.restore(taken);
                j.restore(dropped);
                return Err(e);
            }
            let mut j = Self::journal(journal);
            for s in &subjects {
                j.by_subject.remove(s);
            }
            Ok(())
        })
        .await
    }

    async fn scan(
        &self,
        after: Option<Subject>,
        limit: usize,
    ) -> Result<Vec<(Subject, KeyRow)>, StoreError> {
        // Filed first, so the filed tables hold every row: those filed by
        // subject, then the runs in order. Only before the first page: a
        // filing per page would make a run of the keys created meanwhile
        // each time (keys created during a scan are made under the newest
        // master key anyway).
        if after.is_none() {
            self.write(Self::file_journal).await?;
        }
        let (db, journal) = (Arc::clone(&self.db), Arc::clone(&self.journal));
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_read().map_err(db_error)?;
            let filed = FiledTables::read(&tx)?;
            // Where the cursor is: in a run, or by subject.
            let cursor = match after {
                Some(a) => {
                    let places = Self::journal(&journal).filed.places(&a);
                    let place = filed.find(&places, &a)?.map_or(Place::Keys, |(p, _)| p);
                    Some(place.key(&a))
                }
                None => None,
            };
            // By subject first, unless the cursor is already in the runs.
            let in_runs = cursor.as_ref().is_some_and(|k| k.len() > 32);
            let mut out = Vec::new();
            if !in_runs {
                for (k, row) in rows_after(&filed.keys, cursor.as_deref(), limit)? {
                    out.push((Subject::from_slice(&k).map_err(seal_error)?, row));
                }
            }
            let from = if in_runs { cursor.as_deref() } else { None };
            for (k, row) in rows_after(&filed.runs, from, limit - out.len())? {
                out.push((read_run_key(&k)?.1, row));
            }
            Ok(out)
        })
        .await
        .map_err(db_error)?
    }

    async fn rewrap(
        &self,
        subject: Subject,
        old: &Wrapped,
        new: &Wrapped,
    ) -> Result<bool, StoreError> {
        let (old, new) = (KeyRow::Active(old.clone()), KeyRow::Active(new.clone()));
        self.write(move |db, journal| {
            let in_journal = Self::journal(journal).by_subject.get(&subject).cloned();
            let tx = begin_write(db)?;
            // Pending entries first, so the rewrap below overwrites.
            let taken = Self::journal(journal).write_pending(&tx)?;
            let swapped = (|| {
                Ok::<bool, StoreError>(match &in_journal {
                    Some((seq, now)) => {
                        let mut appended = tx.open_table(JOURNAL).map_err(db_error)?;
                        if *now == old {
                            appended
                                .insert(*seq, journal_entry(&subject, &new).as_slice())
                                .map_err(db_error)?;
                            true
                        } else {
                            false
                        }
                    }
                    None => {
                        let mut filed = FiledTables::write(&tx)?;
                        let places = Self::journal(journal).filed.places(&subject);
                        match filed.find(&places, &subject)? {
                            Some((place, now)) if now == old => {
                                filed.put(place, &subject, encode(&new).as_slice())?;
                                true
                            }
                            _ => false,
                        }
                    }
                })
            })();
            let swapped = match swapped.and_then(|sw| tx.commit().map_err(db_error).map(|()| sw)) {
                Ok(swapped) => swapped,
                Err(e) => {
                    Self::journal(journal).restore(taken);
                    return Err(e);
                }
            };
            if swapped && let Some((seq, _)) = in_journal {
                Self::journal(journal)
                    .by_subject
                    .insert(subject, (seq, new));
            }
            Ok(swapped)
        })
        .await
    }
}

/// The conformance suite of [`KeyRows`] adapters, through a [`Keyring`].
#[cfg(any(test, feature = "testsuite"))]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod conformance {
    use super::*;
    use cdp_domain::IdKind;

    fn id(v: &str) -> Identifier {
        Identifier::new(IdKind::Email, v.to_owned())
    }

    /// Keys are created once, read back, erased (suppressed), and rewrapped
    /// under a new master key without changing.
    pub async fn keyring_creates_erases_and_rotates(rows: Arc<dyn KeyRows>) {
        let v1 = MasterKeys::generate_file().unwrap();
        let ring = Keyring::open(
            Arc::clone(&rows),
            MasterKeys::parse(&v1).unwrap(),
            Duration::ZERO,
            64,
        )
        .await
        .unwrap();
        let (a, b) = (ring.subject(&id("a@x.vn")), ring.subject(&id("b@x.vn")));
        assert_ne!(a, b);
        let first = ring.obtain(&[a, b]).await.unwrap();
        let again = ring.obtain(&[a]).await.unwrap();
        assert_eq!(first.get(&a), again.get(&a), "a key is created once");
        assert!(first.get(&a).is_some() && first.get(&b).is_some());
        // A second process with the same master key: the same hash secret.
        let other = Keyring::open(
            Arc::clone(&rows),
            MasterKeys::parse(&v1).unwrap(),
            Duration::ZERO,
            64,
        )
        .await
        .unwrap();
        assert_eq!(other.subject(&id("a@x.vn")), a);
        assert_eq!(other.keys(&[a]).await.unwrap().get(&a), first.get(&a));
        // A process with another master key is refused, with the reason.
        let stranger = Keyring::open(
            Arc::clone(&rows),
            MasterKeys::parse(&MasterKeys::generate_file().unwrap()).unwrap(),
            Duration::ZERO,
            64,
        )
        .await
        .unwrap_err();
        assert!(stranger.to_string().contains("master key"), "{stranger}");

        ring.erase(&[a], 1_700_000_000_000, "req-1").await.unwrap();
        let after = other.keys(&[a, b]).await.unwrap();
        assert!(after.erased(&a) && after.get(&a).is_none());
        assert_eq!(after.get(&b), first.get(&b), "others keep their keys");
        // Suppressed: a writer gets no new key for it.
        assert!(other.obtain(&[a]).await.unwrap().get(&a).is_none());
        assert_eq!(
            other.erasures(&[a, b]).await.unwrap(),
            vec![Some((1_700_000_000_000, "req-1".to_owned())), None]
        );

        // Rotation: add version 2, rewrap, then retire version 1.
        let v2_line = MasterKeys::generate_line(2).unwrap();
        let both = Keyring::open(
            Arc::clone(&rows),
            MasterKeys::parse(&format!("{v1}{v2_line}\n")).unwrap(),
            Duration::ZERO,
            64,
        )
        .await
        .unwrap();
        let done = both.rotate(1).await.unwrap();
        assert_eq!(done.rewrapped, 2, "the hash secret and b: {done:?}");
        assert_eq!(both.rotate(10).await.unwrap().rewrapped, 0);
        let only2 = Keyring::open(
            rows,
            MasterKeys::parse(&v2_line).unwrap(),
            Duration::ZERO,
            64,
        )
        .await
        .unwrap();
        assert_eq!(only2.subject(&id("b@x.vn")), b);
        assert_eq!(only2.keys(&[b]).await.unwrap().get(&b), first.get(&b));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Rows whose reads fail while `down` (unreachable) or `broken` (an
    /// error no cache may hide) is set.
    struct Flaky {
        rows: EmbeddedKeyRows,
        down: std::sync::atomic::AtomicBool,
        broken: std::sync::atomic::AtomicBool,
    }

    impl Flaky {
        fn new(rows: EmbeddedKeyRows) -> Self {
            Flaky {
                rows,
                down: std::sync::atomic::AtomicBool::new(false),
                broken: std::sync::atomic::AtomicBool::new(false),
            }
        }
    }

    #[async_trait]
    impl KeyRows for Flaky {
        async fn read(&self, s: &[Subject]) -> Result<Vec<Option<KeyRow>>, StoreError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down".into()));
            }
            if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Storage("broken".into()));
            }
            self.rows.read(s).await
        }
        async fn create(&self, rows: &[(Subject, Wrapped)]) -> Result<Vec<KeyRow>, StoreError> {
            self.rows.create(rows).await
        }
        async fn erase(&self, s: &[Subject], at: UnixMillis, r: &str) -> Result<(), StoreError> {
            self.rows.erase(s, at, r).await
        }
        async fn scan(
            &self,
            after: Option<Subject>,
            limit: usize,
        ) -> Result<Vec<(Subject, KeyRow)>, StoreError> {
            self.rows.scan(after, limit).await
        }
        async fn rewrap(
            &self,
            s: Subject,
            old: &Wrapped,
            new: &Wrapped,
        ) -> Result<bool, StoreError> {
            self.rows.rewrap(s, old, new).await
        }
    }

    /// The only keyring of its rows (the embedded one of a process) keeps
    /// its keys past their time to live without reading the rows again, and
    /// forgets an erased one at once; a shared one reads again.
    #[tokio::test]
    async fn an_exclusive_keyring_keeps_its_keys_and_forgets_erased_ones() {
        let dir = tempfile::tempdir().unwrap();
        let rows = Arc::new(Flaky::new(EmbeddedKeyRows::open(dir.path()).unwrap()));
        let text = MasterKeys::generate_file().unwrap();
        let open = |rows: Arc<Flaky>| {
            let master = MasterKeys::parse(&text).unwrap();
            async move {
                Keyring::open(rows, master, Duration::ZERO, 64)
                    .await
                    .unwrap()
            }
        };
        let ring = open(rows.clone()).await.exclusive();
        let shared = open(rows.clone()).await;
        assert_eq!(
            ring.cache_ttl(),
            Duration::ZERO,
            "no other process to wait for"
        );
        let id = Identifier::new(cdp_domain::IdKind::Email, "a@x.vn");
        let a = ring.subject(&id);
        let key = ring.obtain(&[a]).await.unwrap().get(&a).cloned();
        assert!(key.is_some());
        assert_eq!(shared.keys(&[a]).await.unwrap().get(&a).cloned(), key);
        rows.broken.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(ring.keys(&[a]).await.unwrap().get(&a).cloned(), key);
        assert!(shared.keys(&[a]).await.is_err(), "its cached key expired");
        ring.erase(&[a], 1, "r1").await.unwrap();
        let after = ring.keys(&[a]).await.unwrap();
        assert!(after.erased(&a) && after.get(&a).is_none());
    }

    /// While its store is unreachable, a process goes on with the keys it
    /// last read (expired or not); a subject it never saw fails, retryably.
    #[tokio::test]
    async fn an_unreachable_keyring_serves_the_keys_last_read() {
        let dir = tempfile::tempdir().unwrap();
        let rows = Arc::new(Flaky::new(EmbeddedKeyRows::open(dir.path()).unwrap()));
        let master = MasterKeys::parse(&MasterKeys::generate_file().unwrap()).unwrap();
        let ring = Keyring::open(rows.clone(), master, Duration::ZERO, 64)
            .await
            .unwrap();
        let id = |v: &str| Identifier::new(cdp_domain::IdKind::Email, v.to_owned());
        let (a, b) = (ring.subject(&id("a@x.vn")), ring.subject(&id("b@x.vn")));
        let key = ring.obtain(&[a]).await.unwrap().get(&a).cloned();
        assert!(key.is_some());
        rows.down.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(ring.keys(&[a]).await.unwrap().get(&a).cloned(), key);
        assert_eq!(ring.obtain(&[a]).await.unwrap().get(&a).cloned(), key);
        assert!(matches!(
            ring.obtain(&[a, b]).await,
            Err(StoreError::Unavailable(_))
        ));
        rows.down.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(ring.obtain(&[a, b]).await.unwrap().get(&b).is_some());
    }

    /// Concurrent writers share commits, and every one gets the key the
    /// store kept for each subject, whichever writer created it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_creations_agree_on_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Arc<dyn KeyRows> = Arc::new(EmbeddedKeyRows::open(dir.path()).unwrap());
        let text = MasterKeys::generate_file().unwrap();
        let mut rings = Vec::new();
        for _ in 0..2 {
            let master = MasterKeys::parse(&text).unwrap();
            rings.push(Arc::new(
                Keyring::open(Arc::clone(&rows), master, Duration::ZERO, 64)
                    .await
                    .unwrap(),
            ));
        }
        let id = |i: usize| Identifier::new(cdp_domain::IdKind::Email, format!("c{i}@x.vn"));
        let subjects: Vec<Subject> = (0..40).map(|i| rings[0].subject(&id(i))).collect();
        let mut tasks = Vec::new();
        for w in 0..16 {
            let ring = Arc::clone(&rings[w % 2]);
            // Overlapping windows: several writers create the same subjects.
            let mine: Vec<Subject> = subjects[(w * 2)..(w * 2 + 10)].to_vec();
            tasks.push(tokio::spawn(async move {
                let set = ring.obtain(&mine).await.unwrap();
                mine.iter()
                    .map(|s| (*s, set.get(s).cloned().unwrap()))
                    .collect::<Vec<_>>()
            }));
        }
        let stored = rings[0].keys(&subjects).await.unwrap();
        let mut seen = 0;
        for t in tasks {
            for (s, key) in t.await.unwrap() {
                let now = rings[1].keys(&[s]).await.unwrap();
                assert_eq!(
                    now.get(&s),
                    Some(&key),
                    "a writer got a key the store did not keep"
                );
                seen += 1;
            }
        }
        assert_eq!(seen, 160);
        // Read before all writers finished: a subject is absent or the same.
        for s in &subjects {
            if let Some(k) = stored.get(s) {
                assert_eq!(rings[1].keys(&[*s]).await.unwrap().get(s), Some(k));
            }
        }
    }

    /// A version added to the master key file reaches a running process
    /// when it meets a row wrapped by it, without a restart; rows written
    /// as JSON before rows became binary still open.
    #[tokio::test]
    async fn a_rotation_elsewhere_reaches_a_running_process() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Arc<dyn KeyRows> = Arc::new(EmbeddedKeyRows::open(dir.path()).unwrap());
        let file = dir.path().join("master.keys");
        let v1 = MasterKeys::generate_file().unwrap();
        std::fs::write(&file, &v1).unwrap();
        let open = |rows: Arc<dyn KeyRows>| {
            let file = file.clone();
            async move {
                let text = std::fs::read_to_string(&file).unwrap();
                Keyring::open(rows, MasterKeys::parse(&text).unwrap(), Duration::ZERO, 64)
                    .await
                    .unwrap()
                    .with_master_file(file)
            }
        };
        let serving = open(Arc::clone(&rows)).await;
        let id = Identifier::new(cdp_domain::IdKind::Phone, "+84912345678");
        let s = serving.subject(&id);
        let key = serving
            .obtain(&[s])
            .await
            .unwrap()
            .get(&s)
            .cloned()
            .unwrap();

        let v2 = MasterKeys::generate_line(2).unwrap();
        std::fs::write(&file, format!("{v1}{v2}\n")).unwrap();
        let operator = open(Arc::clone(&rows)).await;
        let done = operator.rotate(10).await.unwrap();
        assert_eq!(
            (done.rewrapped, done.unknown),
            (2, 0),
            "the key and the hash secret"
        );
        assert_eq!(operator.master_version(), 2);
        assert!(matches!(
            rows.read(&[s]).await.unwrap()[0],
            Some(KeyRow::Active(Wrapped { master: 2, .. }))
        ));
        // The serving process still has only version 1 in memory.
        assert_eq!(serving.master_version(), 1);
        assert_eq!(serving.keys(&[s]).await.unwrap().get(&s), Some(&key));
        assert_eq!(serving.master_version(), 2);

        // A JSON row from before.
        let legacy = dir.path().join("legacy");
        let old = EmbeddedKeyRows::open(&legacy).unwrap();
        let json = br#"{"Erased":{"at":7,"request":"r1"}}"#;
        {
            let tx = old.db.begin_write().unwrap();
            tx.open_table(KEYS)
                .unwrap()
                .insert(s.as_bytes().as_slice(), json.as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        // Opened again, as a file from before is.
        drop(old);
        let old = EmbeddedKeyRows::open(&legacy).unwrap();
        assert_eq!(
            old.read(&[s]).await.unwrap(),
            vec![Some(KeyRow::Erased {
                at: 7,
                request: "r1".into()
            })]
        );
    }

    /// Subjects name every record key and keyring row written so far: the
    /// allocation-free computation must give the same bytes as the HMAC of
    /// the identifier's key.
    #[test]
    fn a_subject_is_the_hmac_of_the_identifiers_key() {
        let hasher = Hasher::new(&DataKey::generate().unwrap());
        for (kind, value) in [
            (cdp_domain::IdKind::Email, "lan@x.vn"),
            (cdp_domain::IdKind::Phone, "+84912345678"),
            (cdp_domain::IdKind::Email, ""),
        ] {
            let id = Identifier::new(kind, value.to_owned());
            assert_eq!(
                subject_of(&hasher, &id),
                hasher.subject(id.key().as_bytes())
            );
        }
    }

    #[tokio::test]
    async fn embedded_keyring_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let rows = Arc::new(EmbeddedKeyRows::open(dir.path()).unwrap());
        conformance::keyring_creates_erases_and_rotates(rows).await;
        // Filing the journal after every other key.
        let dir = tempfile::tempdir().unwrap();
        let rows = Arc::new(EmbeddedKeyRows::open_filing_at(dir.path(), 2).unwrap());
        conformance::keyring_creates_erases_and_rotates(rows).await;
    }

    /// The keyring on the embedded log's file: it conforms, takes in the
    /// rows of a keyring file of its own (an erasure wins over a key) and
    /// deletes that file, and keys created without a sync are kept by the
    /// next synced commit of the file (the log's append).
    #[tokio::test]
    async fn the_keyring_on_the_logs_file_conforms_and_takes_in_an_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let open_db = |name: &str| Arc::new(Database::create(dir.path().join(name)).unwrap());
        let rows = Arc::new(EmbeddedKeyRows::open_on(open_db("a.redb"), dir.path()).unwrap());
        conformance::keyring_creates_erases_and_rotates(rows).await;
        let rows =
            Arc::new(EmbeddedKeyRows::open_on_filing_at(open_db("b.redb"), dir.path(), 2).unwrap());
        conformance::keyring_creates_erases_and_rotates(rows).await;

        let text = MasterKeys::generate_file().unwrap();
        let ring = |rows: Arc<dyn KeyRows>| {
            let master = MasterKeys::parse(&text).unwrap();
            async move {
                Keyring::open(rows, master, Duration::ZERO, 64)
                    .await
                    .unwrap()
            }
        };
        let id = |i: usize| Identifier::new(cdp_domain::IdKind::Email, format!("m{i}@x.vn"));
        // A keyring of its own: four keys, one erased.
        let own_dir = dir.path().join("keys");
        let own = ring(Arc::new(EmbeddedKeyRows::open(&own_dir).unwrap())).await;
        let subjects: Vec<Subject> = (0..4).map(|i| own.subject(&id(i))).collect();
        let keys = own.obtain(&subjects).await.unwrap();
        own.erase(&[subjects[3]], 5, "req-own").await.unwrap();
        drop(own);
        let log_db = open_db("log.redb");
        let shared = Arc::new(EmbeddedKeyRows::open_on(Arc::clone(&log_db), &own_dir).unwrap());
        assert!(!own_dir.join(OWN_FILE).exists(), "the own file is deleted");
        let hook_rows = Arc::clone(&shared);
        let moved = ring(shared).await;
        assert_eq!(
            moved.subject(&id(0)),
            subjects[0],
            "the hash secret moved in"
        );
        let read = moved.keys(&subjects).await.unwrap();
        for s in &subjects[..3] {
            assert_eq!(read.get(s), keys.get(s), "moved in");
        }
        assert!(read.erased(&subjects[3]), "an erasure moves in");
        assert_eq!(
            moved.erasures(&subjects[3..]).await.unwrap(),
            vec![Some((5, "req-own".to_owned()))]
        );
        // Another platform's keyring file: its hash secret differs, so it is
        // refused and kept.
        let stranger_dir = dir.path().join("stranger");
        let stranger = ring(Arc::new(EmbeddedKeyRows::open(&stranger_dir).unwrap())).await;
        stranger.obtain(&subjects[..1]).await.unwrap();
        drop(stranger);
        let refused = EmbeddedKeyRows::open_on(Arc::clone(&log_db), &stranger_dir).err();
        assert!(
            matches!(&refused, Some(StoreError::Invalid(r)) if r.contains("different keys")),
            "{refused:?}"
        );
        assert!(
            stranger_dir.join(OWN_FILE).exists(),
            "a refused file is kept"
        );

        // A key created on the log's file waits for the log's next append,
        // whose transaction writes it (the hook the log calls); an append
        // that fails gives it back for the next one.
        let late = moved.subject(&id(9));
        let key = moved.obtain(&[late]).await.unwrap().get(&late).cloned();
        let hook = hook_rows.append_hook();
        let tx = log_db.begin_write().unwrap();
        hook(&tx).unwrap()(false);
        tx.abort().unwrap();
        let tx = log_db.begin_write().unwrap();
        let written = hook(&tx).unwrap();
        tx.commit().unwrap();
        written(true);
        let tx = log_db.begin_write().unwrap();
        hook(&tx).unwrap()(true);
        tx.commit().unwrap();
        drop(hook);
        drop(hook_rows);
        drop(moved);
        drop(log_db);
        let reopened = ring(Arc::new(
            EmbeddedKeyRows::open_on(open_db("log.redb"), &own_dir).unwrap(),
        ))
        .await;
        assert_eq!(
            reopened.keys(&[late]).await.unwrap().get(&late).cloned(),
            key
        );
    }

    /// Rows filed by subject alone (a keyring from before runs) and rows
    /// in runs read, erase and rewrap alike, and a scan in small pages
    /// passes from one table to the other, seeing every row once.
    #[tokio::test]
    async fn rows_by_subject_and_in_runs_read_erase_rewrap_and_scan_alike() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = MasterKeys::generate_file().unwrap();
        let ring = Keyring::open(
            Arc::new(EmbeddedKeyRows::open_filing_at(dir.path(), 3).unwrap()),
            MasterKeys::parse(&v1).unwrap(),
            Duration::ZERO,
            64,
        )
        .await
        .unwrap();
        let id = |i: usize| Identifier::new(cdp_domain::IdKind::Email, format!("r{i}@x.vn"));
        let subjects: Vec<Subject> = (0..10).map(|i| ring.subject(&id(i))).collect();
        let mut keys = Vec::new();
        for s in &subjects {
            keys.push(ring.obtain(&[*s]).await.unwrap().get(s).cloned().unwrap());
        }
        drop(ring);
        // As a keyring from before runs left them: the first four filed by
        // subject, their run rows gone.
        {
            let db = redb::Database::open(dir.path().join(OWN_FILE)).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut by_subject = tx.open_table(KEYS).unwrap();
                let mut runs = tx.open_table(RUNS).unwrap();
                let moved: Vec<(Vec<u8>, Vec<u8>)> = runs
                    .iter()
                    .unwrap()
                    .map(|r| r.unwrap())
                    .filter(|(k, _)| {
                        let s = read_run_key(k.value()).unwrap().1;
                        subjects[..4].contains(&s)
                    })
                    .map(|(k, v)| (k.value().to_vec(), v.value().to_vec()))
                    .collect();
                assert_eq!(moved.len(), 4, "the first keys were filed in runs");
                for (k, v) in moved {
                    runs.remove(k.as_slice()).unwrap();
                    by_subject.insert(&k[4..], v.as_slice()).unwrap();
                }
            }
            tx.commit().unwrap();
        }
        let v2 = MasterKeys::generate_line(2).unwrap();
        let ring = Keyring::open(
            Arc::new(EmbeddedKeyRows::open_filing_at(dir.path(), 3).unwrap()),
            MasterKeys::parse(&format!("{v1}{v2}\n")).unwrap(),
            Duration::ZERO,
            64,
        )
        .await
        .unwrap();
        let read = ring.keys(&subjects).await.unwrap();
        for (s, k) in subjects.iter().zip(&keys) {
            assert_eq!(read.get(s), Some(k));
        }
        // One by subject, one in a run.
        ring.erase(&[subjects[1], subjects[7]], 5, "req-r")
            .await
            .unwrap();
        let rotation = ring.rotate(2).await.unwrap();
        assert_eq!(rotation.scanned, 11, "ten subjects and the hash secret");
        assert_eq!(rotation.rewrapped, 9, "every active row, once");
        let read = ring.keys(&subjects).await.unwrap();
        assert!(read.erased(&subjects[1]) && read.erased(&subjects[7]));
        for (i, (s, k)) in subjects.iter().zip(&keys).enumerate() {
            if i != 1 && i != 7 {
                assert_eq!(read.get(s), Some(k), "key {i} changed in the rotation");
            }
        }
        assert_eq!(ring.rotate(3).await.unwrap().rewrapped, 0);
    }

    /// A journal entry left on disk for a subject already filed (as an
    /// append between a filing's commit and its clearing of the journal
    /// once wrote) never brings back a key its filed row erased.
    #[tokio::test]
    async fn a_stale_journal_entry_does_not_bring_back_an_erased_key() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = MasterKeys::generate_file().unwrap();
        let open = || {
            let rows: Arc<dyn KeyRows> =
                Arc::new(EmbeddedKeyRows::open_filing_at(dir.path(), 2).unwrap());
            let master = MasterKeys::parse(&v1).unwrap();
            async move {
                Keyring::open(rows, master, Duration::ZERO, 64)
                    .await
                    .unwrap()
            }
        };
        fn raw<T>(dir: &Path, f: impl FnOnce(&redb::WriteTransaction) -> T) -> T {
            let db = redb::Database::open(dir.join(OWN_FILE)).unwrap();
            let tx = db.begin_write().unwrap();
            let out = f(&tx);
            tx.commit().unwrap();
            out
        }
        let ring = open().await;
        let id = |i: usize| Identifier::new(cdp_domain::IdKind::Email, format!("s{i}@x.vn"));
        let s1 = ring.subject(&id(1));
        // The hash secret and s1: filed as run 0.
        assert!(ring.obtain(&[s1]).await.unwrap().get(&s1).is_some());
        drop(ring);
        let active = raw(dir.path(), |tx| {
            let runs = tx.open_table(RUNS).unwrap();
            let v = runs
                .get(Place::Run(0).key(&s1).as_slice())
                .unwrap()
                .unwrap();
            journal_entry(&s1, &decode(v.value()).unwrap())
        });
        let ring = open().await;
        ring.erase(&[s1], 7, "req-s").await.unwrap();
        drop(ring);
        raw(dir.path(), |tx| {
            let mut journal = tx.open_table(JOURNAL).unwrap();
            journal.insert(1_000, active.as_slice()).unwrap();
        });
        let ring = open().await;
        assert!(ring.keys(&[s1]).await.unwrap().erased(&s1));
        // A filing after it files nothing for s1, and a scan sees it once.
        let more: Vec<Subject> = (2..6).map(|i| ring.subject(&id(i))).collect();
        ring.obtain(&more).await.unwrap();
        assert!(ring.keys(&[s1]).await.unwrap().erased(&s1));
        assert!(ring.obtain(&[s1]).await.unwrap().erased(&s1));
        assert_eq!(ring.rotate(1).await.unwrap().scanned, 6);
    }

    /// Keys in the journal and keys filed by subject read, erase and
    /// rewrap alike, and survive a reopen (the journal is loaded again).
    #[tokio::test]
    async fn journaled_and_filed_keys_behave_alike_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let text = MasterKeys::generate_file().unwrap();
        let open = |file_at: usize| {
            let rows: Arc<dyn KeyRows> =
                Arc::new(EmbeddedKeyRows::open_filing_at(dir.path(), file_at).unwrap());
            let master = MasterKeys::parse(&text).unwrap();
            async move {
                Keyring::open(rows, master, Duration::ZERO, 64)
                    .await
                    .unwrap()
            }
        };
        let ring = open(5).await;
        let id = |i: usize| Identifier::new(cdp_domain::IdKind::Email, format!("j{i}@x.vn"));
        let subjects: Vec<Subject> = (0..12).map(|i| ring.subject(&id(i))).collect();
        let mut keys = Vec::new();
        for chunk in subjects.chunks(3) {
            let set = ring.obtain(chunk).await.unwrap();
            keys.extend(chunk.iter().map(|s| set.get(s).cloned().unwrap()));
        }
        // 12 keys and the hash secret, filed at 5 and 10: 3 in the journal.
        let read = ring.keys(&subjects).await.unwrap();
        for (s, k) in subjects.iter().zip(&keys) {
            assert_eq!(read.get(s), Some(k));
        }
        // One filed, one journaled.
        ring.erase(&[subjects[0], subjects[11]], 9, "req-1")
            .await
            .unwrap();
        drop(ring);

        let ring = open(1000).await;
        let read = ring.keys(&subjects).await.unwrap();
        assert!(read.erased(&subjects[0]) && read.erased(&subjects[11]));
        for (s, k) in subjects[1..11].iter().zip(&keys[1..11]) {
            assert_eq!(read.get(s), Some(k), "a key changed across the reopen");
        }
        assert_eq!(
            ring.erasures(&[subjects[11]]).await.unwrap(),
            vec![Some((9, "req-1".to_owned()))]
        );
        // New keys go to the journal again; a second obtain returns them.
        let late = ring.subject(&id(99));
        let first = ring.obtain(&[late]).await.unwrap().get(&late).cloned();
        assert_eq!(
            ring.obtain(&[late]).await.unwrap().get(&late).cloned(),
            first
        );
        // A scan (rotation) files the journal and sees every row once.
        let scanned = ring.rotate(4).await.unwrap().scanned;
        assert_eq!(scanned, 14, "12 subjects, the late one and the hash secret");
        // An identifier erased before it ever had a key (a suppression):
        // its row is found at once, and it gets no key.
        let never = ring.subject(&id(500));
        ring.erase(&[never], 10, "req-2").await.unwrap();
        assert!(ring.obtain(&[never]).await.unwrap().erased(&never));
        // Filed by subject, before the runs: a scan in pages of one still
        // sees every row once.
        assert_eq!(ring.rotate(1).await.unwrap().scanned, 15);
    }
}
