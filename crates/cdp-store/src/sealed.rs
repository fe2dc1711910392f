//! The views sealed under per-customer keys (crypto-shredding of the
//! stores, as `cdp_pipeline::seal` does for the log).
//!
//! - Each customer has a data key in the keyring, under the subject
//!   `HMAC(\0 "customer" \0 id)` ([`customer_subject`]); an erasure deletes
//!   it with the keys of the customer's identifiers.
//! - A live profile, the profile a pending merge keeps, and each timeline
//!   entry are stored sealed (AES-256-GCM, `cdp_seal::seal_with`) under the
//!   key of the customer whose row holds
//!   them, bound to that row (the customer id and what the row is are the
//!   associated data), so old copies left in free pages of a redb file or
//!   in SSTables not compacted yet are unreadable once the key is gone.
//! - A merge redirect names only another customer: it stays in clear, so
//!   following redirects needs no key.
//! - Rows written before sealing (plain JSON) are still read; they are
//!   sealed when next written.
//!
//! A store folds inside a transaction that cannot wait for the keyring: it
//! fetches the keys of the customers a batch names first ([`ViewKeys`]),
//! records any other it meets ([`ViewKeys::open`] answers
//! [`Opened::Missing`]) and folds again with those fetched.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use cdp_domain::identity::CustomerNode;
use cdp_domain::profile::ProfileSlot;
use cdp_domain::{CustomerId, EventId, Identifier, Resolution, ResolvedTouchpoint};
use cdp_seal::{DataKey, Hasher, Subject};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::StoreError;
use crate::keys::Keyring;

/// First byte of a sealed row. Rows in clear are JSON, which starts with
/// `{`, `"` or `[`.
const SEALED: u8 = 0xC5;

/// First byte of a sealed row's plaintext compressed with LZ4 (block
/// format, its length prepended); JSON never starts with it. A row is
/// written to redb or Cassandra whole at every fold, so its size is what
/// each fold costs in pages and bytes written.
const LZ4: u8 = 0x04;

/// Plaintexts shorter than this are sealed as they are (compressing them
/// saves a few bytes at best).
const COMPRESS_FROM: usize = 256;

/// What a sealed row is, in its associated data: a row moved to another
/// customer or another table does not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    Profile,
    PendingMerge,
    /// A timeline entry, with its event id.
    Timeline(u128),
    /// A customer node of the identity graph.
    Node,
    /// The identity decision of an event, with its event id.
    Decision(u128),
}

impl RowKind {
    fn aad(self, customer: CustomerId) -> Vec<u8> {
        let mut aad = Vec::with_capacity(40);
        aad.extend_from_slice(customer.0.as_bytes());
        match self {
            RowKind::Profile => aad.extend_from_slice(b"profile"),
            RowKind::PendingMerge => aad.extend_from_slice(b"pending merge"),
            RowKind::Timeline(event) => {
                aad.extend_from_slice(b"timeline");
                aad.extend_from_slice(&event.to_be_bytes());
            }
            RowKind::Node => aad.extend_from_slice(b"customer node"),
            RowKind::Decision(event) => {
                aad.extend_from_slice(b"decision");
                aad.extend_from_slice(&event.to_be_bytes());
            }
        }
        aad
    }
}

/// Where the stores get customer keys: the keyring, or nothing (rows in
/// clear: unit tests and tools that never hold personal data).
#[derive(Clone, Default)]
pub struct ViewSeal {
    keyring: Option<Arc<Keyring>>,
}

impl std::fmt::Debug for ViewSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewSeal")
            .field("sealing", &self.keyring.is_some())
            .finish()
    }
}

impl ViewSeal {
    /// Views sealed under keys from `keyring`.
    pub fn new(keyring: Arc<Keyring>) -> Self {
        ViewSeal {
            keyring: Some(keyring),
        }
    }

    /// Views in clear.
    pub fn clear() -> Self {
        ViewSeal::default()
    }

    /// The keys of `customers` for writing: a customer seen for the first
    /// time gets one (durable before the views written with it are: see
    /// [`flush`](Self::flush)); an erased customer has none.
    pub async fn obtain(
        &self,
        customers: impl IntoIterator<Item = CustomerId>,
    ) -> Result<ViewKeys, StoreError> {
        self.fetch(customers, true).await
    }

    /// The keys of `customers` for reading.
    pub async fn keys(
        &self,
        customers: impl IntoIterator<Item = CustomerId>,
    ) -> Result<ViewKeys, StoreError> {
        self.fetch(customers, false).await
    }

    async fn fetch(
        &self,
        customers: impl IntoIterator<Item = CustomerId>,
        create: bool,
    ) -> Result<ViewKeys, StoreError> {
        let Some(keyring) = &self.keyring else {
            return Ok(ViewKeys::clear());
        };
        let customers: BTreeSet<CustomerId> = customers.into_iter().collect();
        let subjects: Vec<Subject> = customers
            .iter()
            .map(|c| customer_subject(keyring.hasher(), *c))
            .collect();
        let set = if create {
            keyring.obtain(&subjects).await?
        } else {
            keyring.keys(&subjects).await?
        };
        Ok(ViewKeys {
            keys: customers
                .into_iter()
                .zip(subjects)
                .map(|(c, s)| (c, set.get(&s).cloned()))
                .collect(),
            hasher: Some(keyring.hasher().clone()),
        })
    }

    /// [`obtain`](Self::obtain) of the customers `keys` lacks, added to it.
    pub async fn obtain_missing(
        &self,
        keys: &mut ViewKeys,
        customers: impl IntoIterator<Item = CustomerId>,
    ) -> Result<(), StoreError> {
        self.add_missing(keys, customers, true).await
    }

    /// The keys of the customers `keys` lacks, added to it: created where
    /// needed ([`obtain`](Self::obtain)) or only read ([`keys`](Self::keys)).
    pub async fn add_missing(
        &self,
        keys: &mut ViewKeys,
        customers: impl IntoIterator<Item = CustomerId>,
        create: bool,
    ) -> Result<(), StoreError> {
        let wanted: Vec<CustomerId> = customers
            .into_iter()
            .filter(|c| !keys.keys.contains_key(c))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let more = self.fetch(wanted, create).await?;
        keys.keys.extend(more.keys);
        if keys.hasher.is_none() {
            keys.hasher = more.hasher;
        }
        Ok(())
    }

    /// No keys yet, sealing as this seal does: keys are added with
    /// [`add_missing`](Self::add_missing).
    pub fn no_keys(&self) -> ViewKeys {
        ViewKeys {
            keys: HashMap::new(),
            hasher: self.hasher().cloned(),
        }
    }

    /// How search entries are named (none in clear).
    pub fn hasher(&self) -> Option<&Hasher> {
        self.keyring.as_ref().map(|k| k.hasher())
    }

    /// The entries a search for `prefix` looks up (see [`query_entries`]).
    pub fn query_entries(&self, prefix: &str) -> Vec<String> {
        query_entries(self.hasher(), prefix)
    }

    /// Makes every key created so far durable (the embedded log's keyring
    /// writes new keys with its next append otherwise): a store calls it
    /// before views sealed with those keys become durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        match &self.keyring {
            Some(k) => k.flush().await,
            None => Ok(()),
        }
    }
}

/// The keyring subject of a customer's views: the HMAC of
/// `\0customer\0` and the id's bytes (an identifier's subject starts with
/// its kind, never with a zero byte).
pub fn customer_subject(hasher: &cdp_seal::Hasher, customer: CustomerId) -> Subject {
    hasher.subject_of_parts(&[b"\0customer\0", customer.0.as_bytes()])
}

/// A row whose customer key a store fetched, yet did not get.
pub fn unfetched(customer: CustomerId) -> StoreError {
    StoreError::Storage(format!(
        "the key of customer {customer} was fetched but not found"
    ))
}

/// A sealed row opened.
#[derive(Debug, PartialEq)]
pub enum Opened {
    /// The row's bytes in clear (a row written before sealing, as it is).
    Clear(Vec<u8>),
    /// The customer's key is erased: the row is gone for good.
    Erased,
    /// The customer's key was not fetched: fetch it and read again.
    Missing,
}

/// A row to write, sealed.
#[derive(Debug, PartialEq)]
pub enum ToWrite {
    Bytes(Vec<u8>),
    /// The customer's key is erased: write nothing (an erased customer's
    /// views are not created again).
    Erased,
    /// The customer's key was not fetched.
    Missing,
}

/// The customer keys a store fetched for one fold or read.
#[derive(Debug, Clone, Default)]
pub struct ViewKeys {
    /// By customer; `None`: erased.
    keys: HashMap<CustomerId, Option<DataKey>>,
    /// Names search entries; none in clear, where rows are written as
    /// they are.
    hasher: Option<Hasher>,
}

impl ViewKeys {
    /// Keys of a store in clear: rows are written as they are.
    pub fn clear() -> Self {
        ViewKeys::default()
    }

    /// How this fold names search entries (none in clear).
    pub fn hasher(&self) -> Option<&Hasher> {
        self.hasher.as_ref()
    }

    /// Whether `customer`'s key was fetched and found erased.
    pub fn erased(&self, customer: CustomerId) -> bool {
        matches!(self.keys.get(&customer), Some(None))
    }

    fn key(&self, customer: CustomerId) -> Result<&DataKey, ToWrite> {
        match self.keys.get(&customer) {
            Some(Some(k)) => Ok(k),
            Some(None) => Err(ToWrite::Erased),
            None => Err(ToWrite::Missing),
        }
    }

    /// `plain` (a row's bytes) sealed under `customer`'s key.
    pub fn seal(
        &self,
        customer: CustomerId,
        kind: RowKind,
        plain: Vec<u8>,
    ) -> Result<ToWrite, StoreError> {
        if self.hasher.is_none() {
            return Ok(ToWrite::Bytes(plain));
        }
        let key = match self.key(customer) {
            Ok(k) => k,
            Err(other) => return Ok(other),
        };
        let sealed = cdp_seal::seal_with(key, &kind.aad(customer), &plain)
            .map_err(|e| StoreError::Storage(format!("cannot seal a row of {customer}: {e}")))?;
        let mut out = Vec::with_capacity(1 + sealed.len());
        out.push(SEALED);
        out.extend_from_slice(&sealed);
        Ok(ToWrite::Bytes(out))
    }

    /// Opens a row of `customer`.
    pub fn open(
        &self,
        customer: CustomerId,
        kind: RowKind,
        bytes: &[u8],
    ) -> Result<Opened, StoreError> {
        if !is_sealed(bytes) {
            return Ok(Opened::Clear(bytes.to_vec()));
        }
        let key = match self.key(customer) {
            Ok(k) => k,
            Err(ToWrite::Erased) => return Ok(Opened::Erased),
            Err(_) => return Ok(Opened::Missing),
        };
        match cdp_seal::open_with(key, &kind.aad(customer), &bytes[1..]) {
            Ok(plain) => Ok(Opened::Clear(plain)),
            Err(e) => Err(StoreError::Corrupt {
                what: "sealed row",
                reason: format!("{kind:?} of {customer}: {e}"),
            }),
        }
    }
}

/// A stored value read through [`ViewKeys`].
#[derive(Debug, PartialEq)]
pub enum Read<T> {
    Value(T),
    /// Its customer's key is erased: read it as absent.
    Erased,
    /// Its customer's key was not fetched.
    Missing,
}

impl<T> Read<T> {
    /// The value, none when `customer`'s key is erased; an error when it
    /// was not fetched (for a reader that fetched it first).
    pub fn found(self, customer: CustomerId) -> Result<Option<T>, StoreError> {
        match self {
            Read::Value(v) => Ok(Some(v)),
            Read::Erased => Ok(None),
            Read::Missing => Err(unfetched(customer)),
        }
    }
}

/// A value stored as JSON.
fn parse_json<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what,
        reason: e.to_string(),
    })
}

/// A plaintext to seal: compressed when that makes it shorter.
fn compress(plain: Vec<u8>) -> Vec<u8> {
    if plain.len() < COMPRESS_FROM {
        return plain;
    }
    let packed = lz4_flex::block::compress_prepend_size(&plain);
    if packed.len() + 1 >= plain.len() {
        return plain;
    }
    let mut out = Vec::with_capacity(1 + packed.len());
    out.push(LZ4);
    out.extend_from_slice(&packed);
    out
}

/// An opened plaintext as [`compress`] left it, uncompressed.
fn decompress(what: &'static str, plain: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    match plain.split_first() {
        Some((&LZ4, packed)) => {
            lz4_flex::block::decompress_size_prepended(packed).map_err(|e| StoreError::Corrupt {
                what,
                reason: format!("compressed row: {e}"),
            })
        }
        _ => Ok(plain),
    }
}

impl ViewKeys {
    /// `value` as JSON (compressed when that makes it shorter), sealed
    /// under `customer`'s key.
    pub fn write_json<T: Serialize>(
        &self,
        customer: CustomerId,
        kind: RowKind,
        value: &T,
    ) -> Result<ToWrite, StoreError> {
        let plain = serde_json::to_vec(value).map_err(|e| StoreError::Storage(e.to_string()))?;
        if self.hasher.is_none() {
            return Ok(ToWrite::Bytes(plain));
        }
        self.seal(customer, kind, compress(plain))
    }

    /// A value [`write_json`](Self::write_json) wrote (or JSON in clear).
    pub fn read_json<T: DeserializeOwned>(
        &self,
        customer: CustomerId,
        kind: RowKind,
        what: &'static str,
        bytes: &[u8],
    ) -> Result<Read<T>, StoreError> {
        if !is_sealed(bytes) {
            return parse_json(what, bytes).map(Read::Value);
        }
        Ok(match self.open(customer, kind, bytes)? {
            Opened::Clear(plain) => Read::Value(parse_json(what, &decompress(what, plain)?)?),
            Opened::Erased => Read::Erased,
            Opened::Missing => Read::Missing,
        })
    }

    /// A profile slot as stored: a live profile sealed, a merge redirect
    /// in clear (it names only the customer it points at).
    pub fn write_slot(
        &self,
        customer: CustomerId,
        slot: &ProfileSlot,
    ) -> Result<ToWrite, StoreError> {
        match slot {
            ProfileSlot::MergedInto(_) => serde_json::to_vec(slot)
                .map(ToWrite::Bytes)
                .map_err(|e| StoreError::Storage(e.to_string())),
            ProfileSlot::Live(_) => self.write_json(customer, RowKind::Profile, slot),
        }
    }

    /// A slot [`write_slot`](Self::write_slot) wrote.
    pub fn read_slot(
        &self,
        customer: CustomerId,
        bytes: &[u8],
    ) -> Result<Read<ProfileSlot>, StoreError> {
        self.read_json(customer, RowKind::Profile, "profile", bytes)
    }
}

/// The customers whose views folding `batch` reads or writes first: each
/// event's customer and the two sides of its merges.
pub fn batch_customers(batch: &[ResolvedTouchpoint]) -> BTreeSet<CustomerId> {
    let mut out = BTreeSet::new();
    for r in batch {
        out.insert(r.customer_id);
        for m in &r.merges {
            out.insert(m.loser);
            out.insert(m.survivor);
        }
    }
    out
}

/// Lengths (in characters of a term's text, after its `kind:`) of the
/// prefixes a hashed search index holds for each term, besides the whole
/// term. A typed prefix is looked up by its longest indexed prefix (and as
/// a whole term); the candidates are checked against the search terms their
/// opened profile keeps (`Profile::matches_search`).
/// (A query shorter than the shortest finds whole terms only: shorter
/// prefixes would add an entry per term for candidates too many to check.)
pub const INDEXED_PREFIXES: [usize; 2] = [5, 8];

/// Prefix lengths indexed by earlier versions: an erasure removes their
/// entries too.
const FORMERLY_INDEXED_PREFIXES: [usize; 1] = [3];

/// First character of a hashed search entry (an entry in clear starts with
/// its term's kind: `name:`, `email:`, `tel:`).
pub const HASHED_ENTRY: char = '#';

/// A search entry: a keyed hash (the platform's hash secret, apart from
/// subjects) of what it stands for, 64 bits in hex.
fn hashed(hasher: &Hasher, what: &[u8], text: &str) -> String {
    use std::fmt::Write as _;
    let tag = hasher.subject_of_parts(&[b"\0search\0", what, text.as_bytes()]);
    let mut out = String::with_capacity(17);
    out.push(HASHED_ENTRY);
    for b in &tag.0[..8] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A term's kind (with its colon) and its text.
fn split_term(term: &str) -> (&str, &str) {
    match term.find(':') {
        Some(i) => term.split_at(i + 1),
        None => ("", term),
    }
}

/// `text` cut after `chars` characters.
fn head(text: &str, chars: usize) -> &str {
    match text.char_indices().nth(chars) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// The entry of the first `chars` characters of a term's text.
fn prefix_entry(hasher: &Hasher, kind: &str, text: &str, chars: usize) -> String {
    hashed(hasher, b"^", &format!("{kind}{}", head(text, chars)))
}

/// The search entries of a term: in clear the term itself; hashed, the
/// whole term and its [`INDEXED_PREFIXES`] shorter than it.
pub fn index_entries(hasher: Option<&Hasher>, term: &str) -> Vec<String> {
    entries_with_prefixes(hasher, term, &INDEXED_PREFIXES)
}

fn entries_with_prefixes(hasher: Option<&Hasher>, term: &str, prefixes: &[usize]) -> Vec<String> {
    let Some(h) = hasher else {
        return vec![term.to_owned()];
    };
    let (kind, text) = split_term(term);
    let n = text.chars().count();
    let mut out = vec![hashed(h, b"=", term)];
    for l in prefixes.iter().copied().filter(|l| *l < n) {
        out.push(prefix_entry(h, kind, text, l));
    }
    out
}

/// The entries a search for terms starting with `prefix` reads: in clear
/// the prefix itself (a range of terms); hashed, the entry of the term
/// equal to it and of its longest indexed prefix (its candidates are
/// checked against their profile).
pub fn query_entries(hasher: Option<&Hasher>, prefix: &str) -> Vec<String> {
    let Some(h) = hasher else {
        return vec![prefix.to_owned()];
    };
    let (kind, text) = split_term(prefix);
    let n = text.chars().count();
    let mut out = vec![hashed(h, b"=", prefix)];
    if let Some(l) = INDEXED_PREFIXES.into_iter().rev().find(|l| *l <= n) {
        out.push(prefix_entry(h, kind, text, l));
    }
    out
}

/// The entries of `terms` to delete: each term in clear (written before
/// the index was hashed) and hashed, with the prefixes indexed now and
/// those indexed before, and a phone's national form too (indexed beside
/// the international one before 2026-12-02; see
/// `cdp_domain::search::former_terms`).
pub fn erased_entries(hasher: Option<&Hasher>, terms: &[String]) -> Vec<String> {
    let terms: BTreeSet<String> = terms
        .iter()
        .flat_map(|t| std::iter::once(t.clone()).chain(cdp_domain::search::former_terms(t)))
        .collect();
    let mut out = terms.clone();
    if hasher.is_some() {
        let every: Vec<usize> = INDEXED_PREFIXES
            .iter()
            .chain(&FORMERLY_INDEXED_PREFIXES)
            .copied()
            .collect();
        for t in &terms {
            out.extend(entries_with_prefixes(hasher, t, &every));
        }
    }
    out.into_iter().collect()
}

/// Whether a stored row is sealed (else it is JSON in clear).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.first() == Some(&SEALED)
}

// ---- the identity graph -------------------------------------------------

/// First byte of a sealed row of the identity graph: `0xC6 | a customer id
/// in clear (16 bytes) | a sealed row`. The id is where a customer node
/// redirects (nil: nowhere), so merges are followed without keys, or the
/// customer whose key seals a decision.
const GRAPH_ROW: u8 = 0xC6;

/// The key a claim is filed under: `#` and the hex of its identifier's
/// keyring subject when the graph is sealed (a claim's row names only
/// customers, events and times), else `kind \0 value`.
pub fn claim_key(hasher: Option<&Hasher>, id: &Identifier) -> String {
    match hasher {
        Some(h) => hashed_claim_key(&crate::keys::subject_of(h, id)),
        None => id.key(),
    }
}

/// A claim filed in clear under `kind \0 value` ([`Identifier::key`]), as
/// [`claim_key`] files it when sealing: the subject of an identifier is the
/// keyed hash of exactly that text.
pub fn sealed_claim_key(hasher: &Hasher, clear_key: &str) -> String {
    hashed_claim_key(&hasher.subject(clear_key.as_bytes()))
}

fn hashed_claim_key(subject: &Subject) -> String {
    let mut out = String::with_capacity(65);
    out.push(HASHED_ENTRY);
    out.push_str(&subject.hex());
    out
}

/// Whether a claim key is a hashed one (else `kind \0 value`, and every
/// kind starts with a letter, after `#` and `$`).
pub fn is_hashed_claim_key(key: &str) -> bool {
    key.starts_with(HASHED_ENTRY)
}

fn graph_row(id: Option<CustomerId>, sealed: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + sealed.len());
    out.push(GRAPH_ROW);
    out.extend_from_slice(&id.map_or([0u8; 16], |c| c.0.into_bytes()));
    out.extend_from_slice(&sealed);
    out
}

/// A sealed graph row split: the customer id in clear in front (none for a
/// node that redirects nowhere) and the sealed row.
type GraphRow<'a> = (Option<CustomerId>, &'a [u8]);

/// A sealed graph row split (none for a row in clear).
fn graph_row_id(bytes: &[u8]) -> Result<Option<GraphRow<'_>>, StoreError> {
    if bytes.first() != Some(&GRAPH_ROW) {
        return Ok(None);
    }
    let (Some(id), Some(rest)) = (bytes.get(1..17), bytes.get(17..)) else {
        return Err(StoreError::Corrupt {
            what: "sealed graph row",
            reason: format!("{} bytes", bytes.len()),
        });
    };
    let id = uuid::Uuid::from_slice(id).map_err(|e| StoreError::Corrupt {
        what: "sealed graph row",
        reason: e.to_string(),
    })?;
    Ok(Some(((!id.is_nil()).then_some(CustomerId(id)), rest)))
}

/// Where a stored customer node redirects, read without opening it.
pub fn node_link(bytes: &[u8]) -> Result<Option<CustomerId>, StoreError> {
    if let Some((link, _)) = graph_row_id(bytes)? {
        return Ok(link);
    }
    #[derive(serde::Deserialize)]
    struct Node {
        #[serde(default)]
        merged_into: Option<CustomerId>,
    }
    serde_json::from_slice::<Node>(bytes)
        .map(|n| n.merged_into)
        .map_err(|e| StoreError::Corrupt {
            what: "customer",
            reason: e.to_string(),
        })
}

/// The customers whose keys seal `nodes` and the attributed `decisions`.
pub fn graph_owners<'a>(
    nodes: impl IntoIterator<Item = &'a CustomerNode>,
    decisions: impl IntoIterator<Item = &'a Resolution>,
) -> Vec<CustomerId> {
    let attributed = decisions.into_iter().filter_map(|r| match r {
        Resolution::Resolved(d) => Some(d.customer_id),
        Resolution::Unresolvable { .. } => None,
    });
    nodes.into_iter().map(|n| n.id).chain(attributed).collect()
}

/// The customer whose key seals a stored decision (none in clear).
pub fn decision_owner(bytes: &[u8]) -> Result<Option<CustomerId>, StoreError> {
    Ok(graph_row_id(bytes)?.and_then(|(owner, _)| owner))
}

impl ViewKeys {
    /// Whether `customer`'s key was fetched (found or erased).
    pub fn has(&self, customer: CustomerId) -> bool {
        self.hasher.is_none() || self.keys.contains_key(&customer)
    }

    /// Whether rows are sealed.
    pub fn sealing(&self) -> bool {
        self.hasher.is_some()
    }

    /// `value` as a graph row of `customer` to store: sealed under its
    /// key behind `front` (JSON in clear when not sealing); none when the
    /// customer is erased (it is not made again).
    fn seal_graph_row<T: Serialize>(
        &self,
        customer: CustomerId,
        front: Option<CustomerId>,
        kind: RowKind,
        value: &T,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        match self.write_json(customer, kind, value)? {
            ToWrite::Bytes(b) if self.sealing() => Ok(Some(graph_row(front, b))),
            ToWrite::Bytes(b) => Ok(Some(b)),
            ToWrite::Erased => Ok(None),
            ToWrite::Missing => Err(unfetched(customer)),
        }
    }

    /// A customer node as stored: sealed under its customer's key behind
    /// where it redirects; none when the customer is erased.
    pub fn write_node(&self, node: &CustomerNode) -> Result<Option<Vec<u8>>, StoreError> {
        self.seal_graph_row(node.id, node.merged_into, RowKind::Node, node)
    }

    /// A node [`write_node`](Self::write_node) wrote (or JSON in clear).
    pub fn read_node(
        &self,
        customer: CustomerId,
        bytes: &[u8],
    ) -> Result<Read<CustomerNode>, StoreError> {
        let body = graph_row_id(bytes)?.map_or(bytes, |(_, rest)| rest);
        self.read_json(customer, RowKind::Node, "customer", body)
    }

    /// A decision as stored: sealed under the key of the customer it
    /// attributes the event to; none when that customer is erased. Only
    /// attributed events have their decision stored
    /// (`cdp_domain::identity::resolve_once`).
    pub fn write_decision(
        &self,
        event: EventId,
        resolution: &Resolution,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let Resolution::Resolved(decision) = resolution else {
            return Err(StoreError::Invalid(format!(
                "the decision of event {event} attributes it to nobody: it is not stored"
            )));
        };
        let owner = decision.customer_id;
        let kind = RowKind::Decision(event.0.as_u128());
        self.seal_graph_row(owner, Some(owner), kind, resolution)
    }

    /// A decision [`write_decision`](Self::write_decision) wrote (or JSON in
    /// clear), under the key of its [`decision_owner`].
    pub fn read_decision(
        &self,
        event: EventId,
        bytes: &[u8],
    ) -> Result<Read<Resolution>, StoreError> {
        let Some((owner, body)) = graph_row_id(bytes)? else {
            return parse_json("resolution", bytes).map(Read::Value);
        };
        let owner = owner.ok_or_else(|| StoreError::Corrupt {
            what: "sealed decision",
            reason: format!("event {event}: no customer"),
        })?;
        self.read_json(
            owner,
            RowKind::Decision(event.0.as_u128()),
            "resolution",
            body,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn keys_for(customers: &[CustomerId], erased: &[CustomerId]) -> ViewKeys {
        let mut keys = ViewKeys {
            keys: HashMap::new(),
            hasher: Some(Hasher::new(&DataKey::generate().expect("a key"))),
        };
        for c in customers {
            keys.keys
                .insert(*c, Some(DataKey::generate().expect("a key")));
        }
        for c in erased {
            keys.keys.insert(*c, None);
        }
        keys
    }

    #[test]
    fn a_row_opens_only_as_the_row_it_was_sealed_for() {
        let (a, b) = (CustomerId(Uuid::now_v7()), CustomerId(Uuid::now_v7()));
        let keys = keys_for(&[a, b], &[]);
        let plain = br#"{"traits":{"address":"12 Ly Thai To"}}"#.to_vec();
        let Ok(ToWrite::Bytes(sealed)) = keys.seal(a, RowKind::Profile, plain.clone()) else {
            panic!("sealed");
        };
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(8).any(|w| w == b"Ly Thai "));
        assert_eq!(
            keys.open(a, RowKind::Profile, &sealed).expect("opens"),
            Opened::Clear(plain.clone())
        );
        // Another customer's row, or another kind of row: refused.
        assert!(keys.open(b, RowKind::Profile, &sealed).is_err());
        assert!(keys.open(a, RowKind::PendingMerge, &sealed).is_err());
        assert!(keys.open(a, RowKind::Timeline(1), &sealed).is_err());
        // A row in clear (written before sealing) reads as it is.
        assert_eq!(
            keys.open(a, RowKind::Profile, &plain).expect("reads"),
            Opened::Clear(plain.clone())
        );
    }

    #[test]
    fn a_large_row_is_sealed_compressed_and_a_row_sealed_whole_still_reads() {
        let a = CustomerId(Uuid::now_v7());
        let keys = keys_for(&[a], &[]);
        let events: Vec<String> = (0..40).map(|_| Uuid::now_v7().to_string()).collect();
        let row = serde_json::json!({"applied": events, "traits": {"city": "Hà Nội"}});
        let plain = serde_json::to_vec(&row).expect("json");
        let Ok(ToWrite::Bytes(written)) = keys.write_json(a, RowKind::Profile, &row) else {
            panic!("written");
        };
        // The sealed row is its compressed plaintext: shorter than the JSON.
        let Ok(Opened::Clear(opened)) = keys.open(a, RowKind::Profile, &written) else {
            panic!("opens");
        };
        assert_eq!(opened.first(), Some(&LZ4));
        assert!(
            written.len() < plain.len(),
            "{} >= {}",
            written.len(),
            plain.len()
        );
        let read = keys.read_json::<serde_json::Value>(a, RowKind::Profile, "profile", &written);
        assert_eq!(read.expect("reads"), Read::Value(row.clone()));
        // A row sealed before compression (its JSON whole) reads the same.
        let Ok(ToWrite::Bytes(whole)) = keys.seal(a, RowKind::Profile, plain) else {
            panic!("sealed");
        };
        let read = keys.read_json::<serde_json::Value>(a, RowKind::Profile, "profile", &whole);
        assert_eq!(read.expect("reads"), Read::Value(row));
        // A short row is sealed as it is.
        let Ok(ToWrite::Bytes(short)) = keys.write_json(a, RowKind::Profile, &"lan") else {
            panic!("written");
        };
        assert_eq!(
            keys.open(a, RowKind::Profile, &short).expect("opens"),
            Opened::Clear(b"\"lan\"".to_vec())
        );
    }

    #[test]
    fn a_typed_prefix_finds_the_entries_of_every_term_it_starts() {
        let h = Hasher::new(&DataKey::generate().expect("a key"));
        let term = "name:nguyễn thị lan";
        let indexed = index_entries(Some(&h), term);
        assert!(
            indexed
                .iter()
                .all(|e| e.len() == 17 && e.starts_with(HASHED_ENTRY))
        );
        assert!(!indexed.iter().any(|e| e.contains("nguy")));
        assert_eq!(indexed.len(), 1 + INDEXED_PREFIXES.len());
        for typed in ["name:nguyễ", "name:nguyễn t", "name:nguyễn thị", term] {
            let wanted = query_entries(Some(&h), typed);
            assert!(
                wanted.iter().any(|e| indexed.contains(e)),
                "{typed} finds {term}"
            );
        }
        // Shorter than the shortest indexed prefix: whole terms only.
        for typed in ["name:ngu", "name:nguy"] {
            let wanted = query_entries(Some(&h), typed);
            assert!(!wanted.iter().any(|e| indexed.contains(e)), "{typed}");
        }
        // An erasure removes the entries of prefixes indexed before too.
        let erased = erased_entries(Some(&h), &[term.to_owned()]);
        assert!(indexed.iter().all(|e| erased.contains(e)));
        assert!(erased.contains(&prefix_entry(&h, "name:", "nguyễn thị lan", 3)));
        // A phone's national form, which earlier versions indexed too, in
        // clear and hashed.
        let phone = erased_entries(Some(&h), &["tel:84912345678".to_owned()]);
        for term in ["tel:84912345678", "tel:0912345678"] {
            assert!(phone.contains(&term.to_owned()), "{term}");
            assert!(phone.contains(&hashed(&h, b"=", term)), "{term} hashed");
        }
        assert!(phone.contains(&prefix_entry(&h, "tel:", "0912345678", 3)));
        // Another word: no entry in common.
        for typed in ["name:tran", "name:ngo", "name:nguyen"] {
            let wanted = query_entries(Some(&h), typed);
            assert!(!wanted.iter().any(|e| indexed.contains(e)), "{typed}");
        }
        // Longer than the term: a candidate by its first 8 characters only,
        // which the profile's own terms then refuse.
        let longer = query_entries(Some(&h), "name:nguyễn thị lan anh");
        assert_eq!(longer.iter().filter(|e| indexed.contains(e)).count(), 1);
        // Another hash secret names other entries.
        let other = Hasher::new(&DataKey::generate().expect("a key"));
        assert!(
            !query_entries(Some(&other), "name:nguyễ")
                .iter()
                .any(|e| indexed.contains(e))
        );
        // In clear: the term, and the prefix to range over.
        assert_eq!(index_entries(None, term), vec![term.to_owned()]);
        assert_eq!(query_entries(None, "name:ngu"), vec!["name:ngu".to_owned()]);
    }

    #[test]
    fn an_erased_or_unfetched_key_neither_opens_nor_writes() {
        let (a, gone, unknown) = (
            CustomerId(Uuid::now_v7()),
            CustomerId(Uuid::now_v7()),
            CustomerId(Uuid::now_v7()),
        );
        let keys = keys_for(&[a], &[gone]);
        let Ok(ToWrite::Bytes(sealed)) = keys.seal(a, RowKind::Profile, b"{}".to_vec()) else {
            panic!("sealed");
        };
        assert_eq!(
            keys.seal(gone, RowKind::Profile, b"{}".to_vec()).ok(),
            Some(ToWrite::Erased)
        );
        assert_eq!(
            keys.seal(unknown, RowKind::Profile, b"{}".to_vec()).ok(),
            Some(ToWrite::Missing)
        );
        // The same row once the key is erased.
        let after = keys_for(&[], &[a]);
        assert_eq!(
            after.open(a, RowKind::Profile, &sealed).expect("no error"),
            Opened::Erased
        );
        assert_eq!(
            keys_for(&[], &[])
                .open(a, RowKind::Profile, &sealed)
                .expect("no error"),
            Opened::Missing
        );
        // In clear, rows are written as they are.
        assert_eq!(
            ViewKeys::clear()
                .seal(a, RowKind::Profile, b"{}".to_vec())
                .ok(),
            Some(ToWrite::Bytes(b"{}".to_vec()))
        );
    }
}
