//! Mutations of inputs: byte-level (flips, inserts, deletes, splices,
//! truncation) and the ones that break decoders in practice (deep nesting,
//! huge numbers, invalid UTF-8, odd Unicode, a target's own tokens).

use rand::Rng;

/// Numbers at the edges of every integer and float type.
const HUGE_NUMBERS: &[&str] = &[
    "0",
    "-1",
    "-0",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999999999999999",
    "1e308",
    "1e309",
    "-1e400",
    "1.7976931348623157e308",
    "5e-324",
    "0.1e-99999999",
    "1E+9999999999",
    "922337203685477.5807",
];

/// Byte sequences that are not UTF-8, or awkward UTF-8.
const ODD_BYTES: &[&[u8]] = &[
    b"\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xe2\x82",
    b"\x00",
    b"\x1b[0m",
    "\u{130}".as_bytes(),  // İ: lower-cases to two characters
    "\u{df}".as_bytes(),   // ß: upper-cases to two characters
    "\u{fb03}".as_bytes(), // ﬃ: upper-cases to three characters
    "\u{202e}".as_bytes(),
    "\u{200b}".as_bytes(),
    "\u{feff}".as_bytes(),
    "\u{85}".as_bytes(),
    "\u{2028}".as_bytes(),
    "ạ\u{300}\u{301}\u{302}".as_bytes(),
    "\u{ff10}\u{ff19}".as_bytes(), // full-width digits
    "\u{661}\u{662}".as_bytes(),   // Arabic-Indic digits
    b"\\u0000",
    b"\\ud800",
    b"\\uDFFF\\uD800",
];

/// Openers that nest without bound.
const NESTERS: &[&[u8]] = &[b"[", b"{\"a\":", b"[{\"x\":", b"a=[", b"[[", b"{a={"];

/// Bytes decoders give meaning to.
const INTERESTING: &[u8] = b"\x00\x01\x7f\x80\xff\"'\\{}[]:,=.@+-#\n\r\t 0189eE";

/// Mutates `input` with one to four stacked mutations; `other` is another
/// input to splice from, `dictionary` the target's own tokens.
pub fn mutate(
    rng: &mut impl Rng,
    input: &[u8],
    other: &[u8],
    dictionary: &[&str],
    max_len: usize,
) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = rng.random_range(1..=4);
    for _ in 0..rounds {
        mutate_once(rng, &mut out, other, dictionary);
    }
    out.truncate(max_len);
    out
}

fn mutate_once(rng: &mut impl Rng, out: &mut Vec<u8>, other: &[u8], dictionary: &[&str]) {
    let len = out.len();
    let at = |rng: &mut dyn rand::RngCore| -> usize {
        if len == 0 {
            0
        } else {
            (rng.next_u64() % (len as u64 + 1)) as usize
        }
    };
    match rng.random_range(0..16u8) {
        // Flip one bit.
        0 if len > 0 => {
            let i = rng.random_range(0..len);
            out[i] ^= 1 << rng.random_range(0..8);
        }
        // Set a byte to one decoders care about.
        1 if len > 0 => {
            let i = rng.random_range(0..len);
            out[i] = INTERESTING[rng.random_range(0..INTERESTING.len())];
        }
        // Insert random bytes.
        2 => {
            let i = at(rng);
            let n = rng.random_range(1..=8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            out.splice(i..i, bytes);
        }
        // Delete a range.
        3 if len > 0 => {
            let i = rng.random_range(0..len);
            let n = rng.random_range(1..=(len - i).min(32));
            out.drain(i..i + n);
        }
        // Duplicate a range in place.
        4 if len > 0 => {
            let i = rng.random_range(0..len);
            let n = rng.random_range(1..=(len - i).min(64));
            let chunk = out[i..i + n].to_vec();
            let j = at(rng);
            out.splice(j..j, chunk);
        }
        // Splice: this input's head, the other's tail.
        5 => {
            let i = at(rng);
            let j = if other.is_empty() {
                0
            } else {
                rng.random_range(0..other.len())
            };
            out.truncate(i);
            out.extend_from_slice(&other[j..]);
        }
        // Insert a piece of the other input.
        6 if !other.is_empty() => {
            let j = rng.random_range(0..other.len());
            let n = rng.random_range(1..=(other.len() - j).min(128));
            let i = at(rng);
            out.splice(i..i, other[j..j + n].iter().copied());
        }
        // Truncate.
        7 if len > 0 => {
            let i = rng.random_range(0..len);
            out.truncate(i);
        }
        // Deep nesting.
        8 => {
            let i = at(rng);
            let opener = NESTERS[rng.random_range(0..NESTERS.len())];
            let depth = [10, 100, 129, 1000, 5000][rng.random_range(0..5)];
            let run: Vec<u8> = opener
                .iter()
                .copied()
                .cycle()
                .take(opener.len() * depth)
                .collect();
            out.splice(i..i, run);
        }
        // Replace a run of digits (or insert) with a number at a type's edge.
        9 => {
            let n = HUGE_NUMBERS[rng.random_range(0..HUGE_NUMBERS.len())].as_bytes();
            let digits: Vec<usize> = (0..len).filter(|&k| out[k].is_ascii_digit()).collect();
            if digits.is_empty() {
                let i = at(rng);
                out.splice(i..i, n.iter().copied());
            } else {
                let start = digits[rng.random_range(0..digits.len())];
                let mut end = start;
                while end < len && out[end].is_ascii_digit() {
                    end += 1;
                }
                let mut begin = start;
                while begin > 0 && out[begin - 1].is_ascii_digit() {
                    begin -= 1;
                }
                out.splice(begin..end, n.iter().copied());
            }
        }
        // Invalid UTF-8 or awkward Unicode.
        10 => {
            let i = at(rng);
            let odd = ODD_BYTES[rng.random_range(0..ODD_BYTES.len())];
            out.splice(i..i, odd.iter().copied());
        }
        // Insert one of the target's tokens (a field name, a kind).
        11 | 12 if !dictionary.is_empty() => {
            let i = at(rng);
            let word = dictionary[rng.random_range(0..dictionary.len())].as_bytes();
            out.splice(i..i, word.iter().copied());
        }
        // Replace a quoted string's content with a token.
        13 if !dictionary.is_empty() => {
            let quotes: Vec<usize> = (0..len).filter(|&k| out[k] == b'"').collect();
            if quotes.len() >= 2 {
                let q = rng.random_range(0..quotes.len() - 1);
                let (a, b) = (quotes[q] + 1, quotes[q + 1]);
                let word = dictionary[rng.random_range(0..dictionary.len())].as_bytes();
                out.splice(a..b, word.iter().copied());
            }
        }
        // Repeat a chunk many times (length blow-up).
        14 if len > 0 => {
            let i = rng.random_range(0..len);
            let n = rng.random_range(1..=(len - i).min(16));
            let chunk = out[i..i + n].to_vec();
            let times = rng.random_range(2..=512);
            let run: Vec<u8> = chunk.iter().copied().cycle().take(n * times).collect();
            out.splice(i..i, run);
        }
        // Swap two bytes.
        _ if len > 1 => {
            let i = rng.random_range(0..len);
            let j = rng.random_range(0..len);
            out.swap(i, j);
        }
        _ => out.push(rng.random()),
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn mutations_change_inputs_and_respect_the_length_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        let seed = br#"{"userId":"u-1","event":"Order Completed","properties":{"total":5}}"#;
        let mut changed = 0;
        for _ in 0..500 {
            let m = mutate(&mut rng, seed, b"[1,2,3]", &["userId"], 4096);
            assert!(m.len() <= 4096);
            if m.as_slice() != seed.as_slice() {
                changed += 1;
            }
        }
        assert!(
            changed > 450,
            "only {changed} of 500 mutations changed the input"
        );
    }
}
