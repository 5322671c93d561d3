//! The mutator: stacked byte-level mutations of a corpus input (bit flips, interesting
//! values, truncation, insertion, deletion, duplication, splicing with another input,
//! dictionary tokens), in the spirit of libFuzzer's but without coverage feedback.

use rand::rngs::StdRng;
use rand::Rng;

/// Largest input the mutator produces: bigger inputs only slow the run down.
pub const MAX_LEN: usize = 64 * 1024;

/// Bytes that make decoders take unusual branches.
const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x02, 0x7f, 0x80, 0x81, 0xfe, 0xff, b'/', b'+', b'#',
];

/// Returns a mutated copy of `input`: 1 to 8 stacked mutations.
pub fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8], dict: &[&[u8]]) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = 1 + rng.gen_range(0..8);
    for _ in 0..rounds {
        mutate_once(rng, &mut out, other, dict);
    }
    out.truncate(MAX_LEN);
    out
}

fn mutate_once(rng: &mut StdRng, out: &mut Vec<u8>, other: &[u8], dict: &[&[u8]]) {
    let len = out.len();
    match rng.gen_range(0..12) {
        // Flip one bit.
        0 if len > 0 => {
            let i = rng.gen_range(0..len);
            out[i] ^= 1 << rng.gen_range(0..8);
        }
        // Replace a byte with a random or an interesting one.
        1 if len > 0 => {
            let i = rng.gen_range(0..len);
            out[i] = if rng.gen_bool(0.5) {
                rng.gen()
            } else {
                INTERESTING[rng.gen_range(0..INTERESTING.len())]
            };
        }
        // Add or subtract a small amount (lengths, counts, codes).
        2 if len > 0 => {
            let i = rng.gen_range(0..len);
            let d = rng.gen_range(1..=16u8);
            out[i] = if rng.gen_bool(0.5) {
                out[i].wrapping_add(d)
            } else {
                out[i].wrapping_sub(d)
            };
        }
        // Truncate.
        3 if len > 0 => out.truncate(rng.gen_range(0..len)),
        // Delete a range.
        4 if len > 1 => {
            let a = rng.gen_range(0..len);
            let b = (a + rng.gen_range(1..=16)).min(len);
            out.drain(a..b);
        }
        // Insert random bytes.
        5 => {
            let at = rng.gen_range(0..=len);
            let n = rng.gen_range(1..=16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            out.splice(at..at, bytes);
        }
        // Duplicate a range (repeated fields, repeated packets).
        6 if len > 0 => {
            let a = rng.gen_range(0..len);
            let b = (a + rng.gen_range(1..=64)).min(len);
            let chunk = out[a..b].to_vec();
            let at = rng.gen_range(0..=out.len());
            out.splice(at..at, chunk);
        }
        // Splice: our head, the other input's tail.
        7 if !other.is_empty() => {
            let cut = rng.gen_range(0..=len);
            let from = rng.gen_range(0..other.len());
            out.truncate(cut);
            out.extend_from_slice(&other[from..]);
        }
        // Append the other input (several packets in one read).
        8 if !other.is_empty() => out.extend_from_slice(other),
        // Insert or overwrite with a dictionary token.
        9 if !dict.is_empty() => {
            let token = dict[rng.gen_range(0..dict.len())];
            let at = rng.gen_range(0..=len);
            if rng.gen_bool(0.5) {
                out.splice(at..at, token.iter().copied());
            } else {
                let end = (at + token.len()).min(len);
                out.splice(at..end, token.iter().copied());
            }
        }
        // Overwrite two bytes with a big-endian length-like value (MQTT u16 fields).
        10 if len > 1 => {
            let i = rng.gen_range(0..len - 1);
            let v: u16 = match rng.gen_range(0..4) {
                0 => 0,
                1 => u16::MAX,
                2 => rng.gen_range(0..64),
                _ => rng.gen(),
            };
            out[i..i + 2].copy_from_slice(&v.to_be_bytes());
        }
        // Swap two bytes.
        _ if len > 1 => {
            let a = rng.gen_range(0..len);
            let b = rng.gen_range(0..len);
            out.swap(a, b);
        }
        _ => out.push(rng.gen()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mutations_stay_bounded_and_vary() {
        let mut rng = StdRng::seed_from_u64(1);
        let seed = b"0123456789".to_vec();
        let mut distinct = std::collections::HashSet::new();
        for _ in 0..1000 {
            let m = mutate(&mut rng, &seed, b"abc", &[b"tok"]);
            assert!(m.len() <= MAX_LEN);
            distinct.insert(m);
        }
        assert!(distinct.len() > 500);
    }
}
