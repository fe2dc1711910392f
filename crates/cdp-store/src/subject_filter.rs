//! A Bloom filter of keyring subjects: which subjects may have a row.
//!
//! The embedded keyring asks it before reading its table, so a subject seen
//! for the first time (a new customer's identifiers, the common case of a
//! shop's ingest) costs no B-tree lookup, twice per batch (once to read,
//! once more when the key is created). It never answers "absent" for a
//! subject it was given; it answers "maybe" for about 1% of the others,
//! which then cost the lookup they cost without it.
//!
//! A subject is a keyed hash already (HMAC-SHA256), so its bits are the
//! probes: no hash function is needed, only a mix of its four words (the
//! all-zero subject of the hash secret included). Written here rather than
//! taken from a crate for that reason.

/// Bits per subject of a layer, rounded up to a power of two: 10 to 20 bits
/// and seven probes give at most 1% false "maybe".
const BITS_PER_SUBJECT: usize = 10;
const PROBES: u64 = 7;
/// Subjects of the first layer; each further layer holds twice the last.
const FIRST_CAPACITY: usize = 1 << 16;

struct Layer {
    bits: Vec<u64>,
    mask: u64,
    len: usize,
    capacity: usize,
}

impl Layer {
    fn new(capacity: usize) -> Self {
        let nbits = (capacity * BITS_PER_SUBJECT).next_power_of_two().max(64);
        Layer {
            bits: vec![0; nbits / 64],
            mask: (nbits - 1) as u64,
            len: 0,
            capacity,
        }
    }

    fn insert(&mut self, s: &[u8; 32]) {
        for (word, bit) in probes(s, self.mask) {
            self.bits[word] |= bit;
        }
        self.len += 1;
    }

    fn may_contain(&self, s: &[u8; 32]) -> bool {
        probes(s, self.mask).all(|(word, bit)| self.bits[word] & bit != 0)
    }
}

/// The word and bit of each probe of `s` in a table of `mask + 1` bits.
fn probes(s: &[u8; 32], mask: u64) -> impl Iterator<Item = (usize, u64)> {
    let (h1, h2) = mix(s);
    (0..PROBES).map(move |i| {
        let bit = h1.wrapping_add(i.wrapping_mul(h2)) & mask;
        ((bit / 64) as usize, 1u64 << (bit % 64))
    })
}

/// Two 64-bit hashes of a subject for double hashing (the second odd, so
/// the probes of a power-of-two table differ).
fn mix(s: &[u8; 32]) -> (u64, u64) {
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    let (a, b, c, d) = (word(0), word(1), word(2), word(3));
    (
        splitmix(a ^ c.rotate_left(32)),
        splitmix(b ^ d.rotate_left(17)) | 1,
    )
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A filter that grows by layers as subjects are added (a scalable Bloom
/// filter): memory stays near 2 bytes per subject, whatever the count.
pub(crate) struct SubjectFilter {
    layers: Vec<Layer>,
}

impl Default for SubjectFilter {
    fn default() -> Self {
        SubjectFilter::with_capacity(0)
    }
}

impl SubjectFilter {
    /// A filter sized for about `expected` subjects (it grows past that).
    pub(crate) fn with_capacity(expected: usize) -> Self {
        SubjectFilter {
            layers: vec![Layer::new(expected.max(FIRST_CAPACITY))],
        }
    }

    /// A filter for exactly `count` subjects (a run's, which never grows).
    pub(crate) fn exactly(count: usize) -> Self {
        SubjectFilter {
            layers: vec![Layer::new(count.max(1))],
        }
    }

    pub(crate) fn insert(&mut self, s: &[u8; 32]) {
        let full = self.layers.last().is_none_or(|l| l.len >= l.capacity);
        if full {
            let next = self
                .layers
                .last()
                .map_or(FIRST_CAPACITY, |l| l.capacity * 2);
            self.layers.push(Layer::new(next));
        }
        if let Some(last) = self.layers.last_mut() {
            last.insert(s);
        }
    }

    /// False only for a subject never inserted.
    pub(crate) fn may_contain(&self, s: &[u8; 32]) -> bool {
        self.layers.iter().any(|l| l.may_contain(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn subject(n: u64) -> [u8; 32] {
        // Uniform like an HMAC: the mix of a counter.
        let mut s = [0u8; 32];
        for (i, chunk) in s.chunks_mut(8).enumerate() {
            chunk
                .copy_from_slice(&splitmix(n.wrapping_mul(4).wrapping_add(i as u64)).to_le_bytes());
        }
        s
    }

    #[test]
    fn it_grows_keeps_every_subject_and_rarely_answers_maybe_for_others() {
        let mut f = SubjectFilter::with_capacity(0);
        let n = 300_000u64; // past the first layers: it grows.
        for i in 0..n {
            f.insert(&subject(i));
        }
        assert!(f.layers.len() > 1);
        assert!((0..n).all(|i| f.may_contain(&subject(i))));
        let false_maybe = (n..n + 100_000)
            .filter(|i| f.may_contain(&subject(*i)))
            .count();
        // A layer answers maybe for ~0.8% at most; the layers together
        // for a few percent.
        assert!(false_maybe < 5_000, "{false_maybe} of 100000");
        assert!(f.may_contain(&subject(0)));
    }

    #[test]
    fn the_all_zero_subject_is_kept() {
        let mut f = SubjectFilter::with_capacity(10);
        assert!(!f.may_contain(&[0; 32]));
        f.insert(&[0; 32]);
        assert!(f.may_contain(&[0; 32]));
    }

    proptest! {
        #[test]
        fn never_absent_for_an_inserted_subject(subjects in proptest::collection::vec(any::<[u8; 32]>(), 1..200)) {
            let mut f = SubjectFilter::with_capacity(1);
            for s in &subjects {
                f.insert(s);
            }
            for s in &subjects {
                prop_assert!(f.may_contain(s));
            }
        }
    }
}
