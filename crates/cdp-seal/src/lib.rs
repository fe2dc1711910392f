//! Crypto-shredding, the pure part.
//!
//! - A **subject** is what personal data is about: an identifier (its
//!   normalised key) or a customer id. It is named by [`Subject`], an
//!   HMAC-SHA256 of its value under the platform's hash secret, so the
//!   stores and the log never need the value to find its key.
//! - Each subject has a random 256-bit [`DataKey`], kept in the keyring
//!   wrapped (AES-256-GCM) by a versioned master key ([`MasterKeys`]) that
//!   lives only in configuration. Erasing a subject deletes its data key.
//! - A record's personal part is [`seal`]ed under a key derived (HKDF) from
//!   the data keys of **every** subject it names and a random salt: deleting
//!   any one of those keys makes it unreadable everywhere it was copied
//!   (Kafka segments, replicas, backups, exports of the raw log).
//!
//! AES-256-GCM, HKDF-SHA256, HMAC-SHA256 and the random source are `ring`'s.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};
use thiserror::Error;
use zeroize::Zeroize;

/// Bytes of a data key, a master key, a subject and a salt.
pub const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// What the HKDF of a record key is for (changing it changes every key).
const RECORD_INFO: &[u8] = b"cdp personal part v1";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the system random source failed")]
    Random,
    #[error("{what} must be {KEY_LEN} bytes, found {found}")]
    Length { what: &'static str, found: usize },
    #[error("master key version {0} is not configured (privacy.master_key_file)")]
    UnknownMaster(u32),
    #[error("master key file, line {line}: {reason}")]
    MasterFile { line: usize, reason: String },
    #[error("no master key is configured (privacy.master_key_file)")]
    NoMaster,
    #[error(
        "master key version {0} has a different key in the reloaded file: versions are never reused"
    )]
    ChangedMaster(u32),
    /// The ciphertext or its associated data was changed, or the key is
    /// not the one it was sealed with.
    #[error("{0} does not open: altered, or sealed under another key")]
    Tampered(&'static str),
}

/// An HMAC-SHA256 naming a subject (an identifier, a customer) without its value.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Subject(pub [u8; KEY_LEN]);

/// A subject hashes as its first 8 bytes: it is a keyed hash already,
/// uniform and unknown to whoever chooses the values it names.
impl std::hash::Hash for Subject {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(head));
    }
}

/// A hasher for maps keyed by [`Subject`]: takes the 8 bytes a subject
/// hashes as, with no further mixing (they are a keyed hash already).
#[derive(Debug, Default, Clone, Copy)]
pub struct SubjectHasher(u64);

impl std::hash::Hasher for SubjectHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached by keys other than a subject: mixed plainly.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// Builds [`SubjectHasher`]s.
pub type BuildSubjectHasher = std::hash::BuildHasherDefault<SubjectHasher>;

/// A map keyed by subjects.
pub type SubjectMap<V> = HashMap<Subject, V, BuildSubjectHasher>;

impl Subject {
    pub fn from_slice(bytes: &[u8]) -> Result<Self, SealError> {
        <[u8; KEY_LEN]>::try_from(bytes)
            .map(Subject)
            .map_err(|_| SealError::Length {
                what: "a subject",
                found: bytes.len(),
            })
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Subject({}…)", &self.hex()[..12])
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

/// A secret key (a subject's data key, the hash secret). Zeroed when
/// dropped; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey([u8; KEY_LEN]);

impl DataKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, SealError> {
        let mut k = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| SealError::Random)?;
        Ok(DataKey(k))
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Self, SealError> {
        <[u8; KEY_LEN]>::try_from(bytes)
            .map(DataKey)
            .map_err(|_| SealError::Length {
                what: "a data key",
                found: bytes.len(),
            })
    }

    fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// Names subjects: HMAC-SHA256 under the platform's hash secret (kept in
/// the keyring, wrapped like a data key). The same value always gives the
/// same subject, so a suppressed identifier is recognised when it comes
/// back; without the secret a subject cannot be tested against guesses.
#[derive(Clone)]
pub struct Hasher(hmac::Key);

impl Hasher {
    pub fn new(secret: &DataKey) -> Self {
        Hasher(hmac::Key::new(hmac::HMAC_SHA256, secret.bytes()))
    }

    pub fn subject(&self, value: &[u8]) -> Subject {
        self.subject_of_parts(&[value])
    }

    /// [`subject`](Self::subject) of the concatenation of `parts`, without
    /// building it.
    pub fn subject_of_parts(&self, parts: &[&[u8]]) -> Subject {
        let mut ctx = hmac::Context::with_key(&self.0);
        for p in parts {
            ctx.update(p);
        }
        let tag = ctx.sign();
        let mut s = [0u8; KEY_LEN];
        s.copy_from_slice(&tag.as_ref()[..KEY_LEN]);
        Subject(s)
    }
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hasher(..)")
    }
}

/// A data key wrapped by a master key: the nonce, then the ciphertext and
/// its tag. The subject is the associated data, so a wrapped key moved to
/// another subject's row does not open.
#[derive(Clone, PartialEq, Eq)]
pub struct Wrapped {
    pub master: u32,
    pub bytes: Vec<u8>,
}

impl fmt::Debug for Wrapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Wrapped(master {}, {} bytes)",
            self.master,
            self.bytes.len()
        )
    }
}

/// The master keys by version: the newest wraps, every one unwraps (so a
/// key can be rotated while processes still hold rows wrapped by the old
/// one). Read from a file of lines `<version> <base64 of 32 bytes>`;
/// `#` starts a comment.
pub struct MasterKeys {
    keys: BTreeMap<u32, LessSafeKey>,
    /// SHA-256 of each version's key: tells a reloaded file that changed a
    /// version's key from one that only added versions.
    fingerprints: BTreeMap<u32, [u8; 32]>,
}

impl fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKeys(versions {:?})", self.versions())
    }
}

/// Bytes that must never repeat and cannot be guessed (a salt, a nonce),
/// from the thread's CSPRNG (`rand::rng()`: ChaCha12 seeded and reseeded
/// from the operating system), without a system call each. Keys come from
/// the operating system itself ([`random`]).
fn unique<const N: usize>() -> [u8; N] {
    use rand::RngCore as _;
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

fn random<const N: usize>() -> Result<[u8; N], SealError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| SealError::Random)?;
    Ok(b)
}

fn aes(key: &[u8]) -> Result<LessSafeKey, SealError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| SealError::Length {
            what: "an AES-256 key",
            found: key.len(),
        })
}

impl MasterKeys {
    pub fn parse(text: &str) -> Result<Self, SealError> {
        let mut keys = BTreeMap::new();
        let mut fingerprints = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |reason: &str| SealError::MasterFile {
                line: i + 1,
                reason: reason.to_owned(),
            };
            let (version, key) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| bad("expected `<version> <base64 key>`"))?;
            let version: u32 = version
                .parse()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| bad("the version must be a whole number above 0"))?;
            let mut bytes = base64::engine::general_purpose::STANDARD
                .decode(key.trim())
                .map_err(|e| bad(&format!("the key is not base64: {e}")))?;
            if bytes.len() != KEY_LEN {
                let found = bytes.len();
                bytes.zeroize();
                return Err(bad(&format!("the key must be 32 bytes, found {found}")));
            }
            let key = aes(&bytes)?;
            let mut fingerprint = [0u8; 32];
            fingerprint
                .copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
            bytes.zeroize();
            fingerprints.insert(version, fingerprint);
            if keys.insert(version, key).is_some() {
                return Err(bad(&format!("version {version} appears twice")));
            }
        }
        if keys.is_empty() {
            return Err(SealError::NoMaster);
        }
        Ok(MasterKeys { keys, fingerprints })
    }

    /// Adds the versions of `newer` (a reloaded file) this set lacks, and
    /// returns them. Versions are only ever added in memory: a row wrapped
    /// by a version the file no longer lists still opens until restart. A
    /// version whose key changed refuses the whole reload.
    pub fn absorb(&mut self, newer: MasterKeys) -> Result<Vec<u32>, SealError> {
        for (v, f) in &newer.fingerprints {
            if self.fingerprints.get(v).is_some_and(|mine| mine != f) {
                return Err(SealError::ChangedMaster(*v));
            }
        }
        let mut added = Vec::new();
        let MasterKeys { keys, fingerprints } = newer;
        for (v, k) in keys {
            if let std::collections::btree_map::Entry::Vacant(e) = self.keys.entry(v) {
                e.insert(k);
                if let Some(f) = fingerprints.get(&v) {
                    self.fingerprints.insert(v, *f);
                }
                added.push(v);
            }
        }
        Ok(added)
    }

    /// The text of a new master key file holding one fresh key, version 1.
    pub fn generate_file() -> Result<String, SealError> {
        Ok(format!(
            "# CDP master keys: `<version> <base64 of 32 random bytes>`, the highest version wraps.\n\
             # Keep this file out of backups of the data it protects.\n{}\n",
            Self::generate_line(1)?
        ))
    }

    /// One line of a master key file: `version` and a fresh key (what an
    /// operator appends to rotate).
    pub fn generate_line(version: u32) -> Result<String, SealError> {
        let mut key = random::<KEY_LEN>()?;
        let line = format!(
            "{version} {}",
            base64::engine::general_purpose::STANDARD.encode(key)
        );
        key.zeroize();
        Ok(line)
    }

    pub fn versions(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// The version that wraps.
    pub fn current(&self) -> u32 {
        self.keys.keys().next_back().copied().unwrap_or(0)
    }

    pub fn wrap(&self, subject: &Subject, key: &DataKey) -> Result<Wrapped, SealError> {
        let master = self.current();
        let k = self.keys.get(&master).ok_or(SealError::NoMaster)?;
        let nonce = unique::<NONCE_LEN>();
        let mut bytes = Vec::with_capacity(NONCE_LEN + KEY_LEN + TAG_LEN);
        bytes.extend_from_slice(&nonce);
        let mut body = key.bytes().to_vec();
        k.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(subject.as_bytes()),
            &mut body,
        )
        .map_err(|_| SealError::Tampered("a data key"))?;
        bytes.extend_from_slice(&body);
        Ok(Wrapped { master, bytes })
    }

    pub fn unwrap(&self, subject: &Subject, w: &Wrapped) -> Result<DataKey, SealError> {
        let k = self
            .keys
            .get(&w.master)
            .ok_or(SealError::UnknownMaster(w.master))?;
        if w.bytes.len() != NONCE_LEN + KEY_LEN + TAG_LEN {
            return Err(SealError::Tampered("a wrapped data key"));
        }
        let (nonce, body) = w.bytes.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Tampered("a nonce"))?;
        let mut body = body.to_vec();
        let plain = k
            .open_in_place(nonce, Aad::from(subject.as_bytes()), &mut body)
            .map_err(|_| SealError::Tampered("a wrapped data key"))?;
        let key = DataKey::from_slice(plain);
        body.zeroize();
        key
    }
}

/// A personal part sealed under the keys of its subjects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Sorted, each once.
    pub subjects: Vec<Subject>,
    pub salt: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// The AES key and nonce of one record: HKDF over every subject's key, in
/// subject order, with the record's salt.
fn record_key(keys: &[&DataKey], salt: &[u8]) -> Result<(LessSafeKey, Nonce), SealError> {
    let mut ikm = Vec::with_capacity(keys.len() * KEY_LEN);
    for k in keys {
        ikm.extend_from_slice(k.bytes());
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&ikm);
    ikm.zeroize();
    let mut okm = [0u8; KEY_LEN + NONCE_LEN];
    prk.expand(&[RECORD_INFO], Len(okm.len()))
        .and_then(|o| o.fill(&mut okm))
        .map_err(|_| SealError::Tampered("a record key"))?;
    let key = aes(&okm[..KEY_LEN]);
    let nonce = Nonce::try_assume_unique_for_key(&okm[KEY_LEN..]);
    okm.zeroize();
    Ok((key?, nonce.map_err(|_| SealError::Tampered("a nonce"))?))
}

/// Seals `plaintext` so that it opens only while every subject's key
/// exists. `aad` (the event id) binds it to its record.
pub fn seal(
    keys: &[(Subject, &DataKey)],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Sealed, SealError> {
    let mut keys: Vec<(Subject, &DataKey)> = keys.to_vec();
    keys.sort_by_key(|(s, _)| *s);
    keys.dedup_by_key(|(s, _)| *s);
    let salt = unique::<KEY_LEN>();
    let data: Vec<&DataKey> = keys.iter().map(|(_, k)| *k).collect();
    let (key, nonce) = record_key(&data, &salt)?;
    let mut ciphertext = plaintext.to_vec();
    key.seal_in_place_append_tag(nonce, Aad::from(aad), &mut ciphertext)
        .map_err(|_| SealError::Tampered("a personal part"))?;
    Ok(Sealed {
        subjects: keys.into_iter().map(|(s, _)| s).collect(),
        salt: salt.to_vec(),
        ciphertext,
    })
}

/// Seals `plaintext` under one data key directly (AES-256-GCM, a random
/// 96-bit nonce): `nonce | ciphertext | tag`. For rows that belong to a
/// single subject and are rewritten often (a customer's views): no key
/// derivation per row. A key seals far fewer than the 2^32 messages a
/// random nonce allows.
pub fn seal_with(key: &DataKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    let k = aes(key.bytes())?;
    let nonce = unique::<NONCE_LEN>();
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = k
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[NONCE_LEN..],
        )
        .map_err(|_| SealError::Tampered("a row"))?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens what [`seal_with`] sealed.
pub fn open_with(key: &DataKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(SealError::Tampered("a row"));
    }
    let k = aes(key.bytes())?;
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce =
        Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Tampered("a nonce"))?;
    let mut body = body.to_vec();
    let len = k
        .open_in_place(nonce, Aad::from(aad), &mut body)
        .map_err(|_| SealError::Tampered("a row"))?
        .len();
    body.truncate(len);
    Ok(body)
}

/// Opens a sealed part: `Ok(None)` when a subject's key is gone (erased).
pub fn open<'k>(
    sealed: &Sealed,
    aad: &[u8],
    key_of: impl Fn(&Subject) -> Option<&'k DataKey>,
) -> Result<Option<Vec<u8>>, SealError> {
    let mut keys = Vec::with_capacity(sealed.subjects.len());
    for s in &sealed.subjects {
        match key_of(s) {
            Some(k) => keys.push(k),
            None => return Ok(None),
        }
    }
    let (key, nonce) = record_key(&keys, &sealed.salt)?;
    let mut body = sealed.ciphertext.clone();
    let plain = key
        .open_in_place(nonce, Aad::from(aad), &mut body)
        .map_err(|_| SealError::Tampered("a personal part"))?;
    let len = plain.len();
    body.truncate(len);
    Ok(Some(body))
}

/// The data keys a reader fetched for a batch: a subject maps to `None`
/// when its key is gone (erased).
#[derive(Debug, Default, Clone)]
pub struct KeySet {
    keys: SubjectMap<Option<DataKey>>,
    /// How subjects are named, for records whose identifiers are in clear
    /// (written before sealing).
    hasher: Option<Hasher>,
}

impl KeySet {
    pub fn new() -> Self {
        KeySet::default()
    }

    /// This set, able to name the subjects of identifiers in clear.
    pub fn with_hasher(mut self, hasher: Hasher) -> Self {
        self.hasher = Some(hasher);
        self
    }

    pub fn hasher(&self) -> Option<&Hasher> {
        self.hasher.as_ref()
    }

    pub fn insert(&mut self, subject: Subject, key: Option<DataKey>) {
        self.keys.insert(subject, key);
    }

    pub fn get(&self, subject: &Subject) -> Option<&DataKey> {
        self.keys.get(subject).and_then(Option::as_ref)
    }

    /// Whether the subject was looked up and found erased.
    pub fn erased(&self, subject: &Subject) -> bool {
        matches!(self.keys.get(subject), Some(None))
    }

    pub fn contains(&self, subject: &Subject) -> bool {
        self.keys.contains_key(subject)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_row_sealed_with_a_key_opens_with_it_only() {
        let (key, other) = (DataKey::generate().unwrap(), DataKey::generate().unwrap());
        let row = seal_with(&key, b"row 1", b"12 Hang Bac").unwrap();
        assert!(!row.windows(4).any(|w| w == b"Hang"));
        assert_eq!(open_with(&key, b"row 1", &row).unwrap(), b"12 Hang Bac");
        assert!(open_with(&other, b"row 1", &row).is_err());
        assert!(open_with(&key, b"row 2", &row).is_err());
        let mut tampered = row.clone();
        if let Some(last) = tampered.last_mut() {
            *last ^= 1;
        }
        assert!(open_with(&key, b"row 1", &tampered).is_err());
        // A fresh nonce each time.
        assert_ne!(
            seal_with(&key, b"row 1", b"x").unwrap(),
            seal_with(&key, b"row 1", b"x").unwrap()
        );
    }

    fn subject(n: u8) -> Subject {
        Subject([n; KEY_LEN])
    }

    #[test]
    fn a_part_opens_only_with_every_key_of_its_subjects() {
        let (a, b) = (DataKey::generate().unwrap(), DataKey::generate().unwrap());
        let sealed = seal(
            &[(subject(2), &b), (subject(1), &a)],
            b"event",
            b"+84912345678",
        )
        .unwrap();
        assert_eq!(sealed.subjects, vec![subject(1), subject(2)]);
        assert!(!sealed.ciphertext.windows(4).any(|w| w == b"8491"));
        let both = |s: &Subject| match s.0[0] {
            1 => Some(&a),
            2 => Some(&b),
            _ => None,
        };
        assert_eq!(
            open(&sealed, b"event", both).unwrap().as_deref(),
            Some(&b"+84912345678"[..])
        );
        // One key erased: gone.
        assert_eq!(
            open(&sealed, b"event", |s: &Subject| (s.0[0] == 1).then_some(&a)).unwrap(),
            None
        );
        // Bound to its record.
        assert_eq!(
            open(&sealed, b"other", both),
            Err(SealError::Tampered("a personal part"))
        );
        // A wrong key does not open it.
        let c = DataKey::generate().unwrap();
        assert!(
            open(&sealed, b"event", |s: &Subject| Some(if s.0[0] == 1 {
                &a
            } else {
                &c
            }))
            .is_err()
        );
    }

    #[test]
    fn a_reloaded_master_file_adds_versions_and_refuses_a_changed_key() {
        let text = MasterKeys::generate_file().unwrap();
        let mut running = MasterKeys::parse(&text).unwrap();
        let key = DataKey::generate().unwrap();
        let v2_line = MasterKeys::generate_line(2).unwrap();
        // Another process already wraps under version 2.
        let elsewhere = MasterKeys::parse(&format!("{text}{v2_line}\n")).unwrap();
        let w2 = elsewhere.wrap(&subject(5), &key).unwrap();
        assert_eq!(w2.master, 2);
        assert_eq!(
            running.unwrap(&subject(5), &w2),
            Err(SealError::UnknownMaster(2))
        );
        // The file reloaded without version 1: version 1 stays in memory.
        let added = running
            .absorb(MasterKeys::parse(&format!("{v2_line}\n")).unwrap())
            .unwrap();
        assert_eq!(added, vec![2]);
        assert_eq!(running.versions(), vec![1, 2]);
        assert_eq!(running.current(), 2);
        assert_eq!(running.unwrap(&subject(5), &w2).unwrap(), key);
        // A file that gives version 1 another key is refused whole.
        let stranger = MasterKeys::generate_file().unwrap();
        let v3 = MasterKeys::generate_line(3).unwrap();
        assert_eq!(
            running.absorb(MasterKeys::parse(&format!("{stranger}{v3}\n")).unwrap()),
            Err(SealError::ChangedMaster(1))
        );
        assert_eq!(running.versions(), vec![1, 2]);
    }

    #[test]
    fn master_keys_wrap_with_the_newest_and_unwrap_with_any() {
        let v1 = MasterKeys::parse(&MasterKeys::generate_file().unwrap()).unwrap();
        let key = DataKey::generate().unwrap();
        let w1 = v1.wrap(&subject(7), &key).unwrap();
        assert_eq!(w1.master, 1);
        assert!(
            !w1.bytes
                .windows(8)
                .any(|w| key.bytes().windows(8).any(|k| k == w))
        );
        let second = MasterKeys::generate_file().unwrap().replace("\n1 ", "\n2 ");
        let both = MasterKeys::parse(&format!(
            "{}\n{}",
            MasterKeys::generate_file().unwrap(),
            second
        ));
        // Different v1 keys: the wrapped key does not open under a stranger's v1.
        let both = both.unwrap();
        assert_eq!(both.current(), 2);
        assert_eq!(
            both.unwrap(&subject(7), &w1),
            Err(SealError::Tampered("a wrapped data key"))
        );
        // The same file plus a new version opens the old rows and wraps new ones.
        let text = MasterKeys::generate_file().unwrap();
        let old = MasterKeys::parse(&text).unwrap();
        let w = old.wrap(&subject(3), &key).unwrap();
        let rotated =
            MasterKeys::parse(&format!("{text}{}", second.lines().last().unwrap())).unwrap();
        assert_eq!(rotated.unwrap(&subject(3), &w).unwrap(), key);
        assert_eq!(rotated.wrap(&subject(3), &key).unwrap().master, 2);
        // Moved to another subject's row: refused.
        assert!(rotated.unwrap(&subject(4), &w).is_err());
        // A retired version is named.
        let only2 = MasterKeys::parse(second.lines().last().unwrap()).unwrap();
        assert_eq!(
            only2.unwrap(&subject(3), &w),
            Err(SealError::UnknownMaster(1))
        );
    }

    #[test]
    fn a_bad_master_file_is_named_by_line() {
        assert_eq!(
            MasterKeys::parse("# nothing\n").unwrap_err(),
            SealError::NoMaster
        );
        let e = MasterKeys::parse("1 AAAA\n").unwrap_err();
        assert!(
            e.to_string().contains("line 1") && e.to_string().contains("32 bytes"),
            "{e}"
        );
        let e = MasterKeys::parse("\n\nx abc\n").unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
    }

    #[test]
    fn subjects_are_stable_and_keyed() {
        let secret = DataKey::generate().unwrap();
        let h = Hasher::new(&secret);
        assert_eq!(
            h.subject(b"phone\0+84912345678"),
            h.subject(b"phone\0+84912345678")
        );
        assert_ne!(
            h.subject(b"phone\0+84912345678"),
            h.subject(b"phone\0+84912345679")
        );
        let other = Hasher::new(&DataKey::generate().unwrap());
        assert_ne!(h.subject(b"x"), other.subject(b"x"));
    }

    proptest! {
        #[test]
        fn sealing_round_trips(plain in proptest::collection::vec(any::<u8>(), 0..512), n in 1usize..5) {
            let keys: Vec<DataKey> = (0..n).map(|_| DataKey::generate().unwrap()).collect();
            let pairs: Vec<(Subject, &DataKey)> = keys.iter().enumerate().map(|(i, k)| (subject(i as u8), k)).collect();
            let sealed = seal(&pairs, b"id", &plain).unwrap();
            let opened = open(&sealed, b"id", |s: &Subject| keys.get(usize::from(s.0[0]))).unwrap();
            prop_assert_eq!(opened, Some(plain));
        }
    }
}
