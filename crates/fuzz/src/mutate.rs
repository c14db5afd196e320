//! Input mutation: a small, deterministic generator of variants of seed inputs (pure).
//!
//! Without a nightly toolchain there is no coverage-guided fuzzer here; structure-aware
//! mutations of valid seeds (which the parsers mostly accept) reach deep into the parsers
//! anyway, and every input the parsers newly accept joins the corpus, so later mutations start
//! from further in.

/// xorshift64*: fast, reproducible from its seed, good enough to choose mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next_u64() % u64::try_from(n.max(1)).unwrap_or(u64::MAX)).unwrap_or(0)
    }
}

/// Bytes that make parsers take unusual branches.
const INTERESTING: &[&[u8]] = &[
    b"\0",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"-1",
    b"0",
    b"9223372036854775808",
    b"1e999",
    b"NaN",
    b"\"",
    b"'",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"\n",
    b"\r\n",
    b"---\n",
    b"...\n",
    b"&a",
    b"*a",
    b"<<: *a",
    b"!!binary",
    b"? ",
    b"- ",
    b"|\n",
    b">-\n",
    b"%YAML 1.2\n",
    b"\t",
    b" ",
    b"null",
    b"true",
    b"~",
    b"..",
    b"/",
    b"%",
    b".",
    b"=",
    b"\xef\xbb\xbf",
    b"\xc3\x28",
    b"\xf0\x9f\x92\xa9",
];

/// Applies 1 to 8 random mutations to a copy of `input`, sometimes splicing in `other`.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(8) {
        mutate_once(rng, &mut out, other);
    }
    out.truncate(max_len);
    out
}

fn mutate_once(rng: &mut Rng, out: &mut Vec<u8>, other: &[u8]) {
    let len = out.len();
    match rng.below(9) {
        0 if len > 0 => {
            let i = rng.below(len);
            out[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            out[i] = u8::try_from(rng.below(256)).unwrap_or(0);
        }
        2 => {
            let word = INTERESTING[rng.below(INTERESTING.len())];
            let at = rng.below(len + 1);
            out.splice(at..at, word.iter().copied());
        }
        3 if len > 0 => {
            let start = rng.below(len);
            let end = (start + 1 + rng.below(16)).min(len);
            out.drain(start..end);
        }
        4 if len > 0 => {
            // Duplicate a range: repeated keys, nested structures, long runs.
            let start = rng.below(len);
            let end = (start + 1 + rng.below(64)).min(len);
            let chunk: Vec<u8> = out[start..end].to_vec();
            let at = rng.below(out.len() + 1);
            out.splice(at..at, chunk);
        }
        5 if !other.is_empty() => {
            let start = rng.below(other.len());
            let end = (start + 1 + rng.below(128)).min(other.len());
            let at = rng.below(len + 1);
            out.splice(at..at, other[start..end].iter().copied());
        }
        6 if len > 0 => out.truncate(rng.below(len)),
        7 if len > 1 => {
            let (a, b) = (rng.below(len), rng.below(len));
            out.swap(a, b);
        }
        _ => {
            let at = rng.below(len + 1);
            let byte = u8::try_from(rng.below(256)).unwrap_or(0);
            out.insert(at, byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_inputs() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            assert_eq!(
                mutate(&mut a, b"hello: world", b"other", 64),
                mutate(&mut b, b"hello: world", b"other", 64)
            );
        }
    }

    #[test]
    fn outputs_respect_the_length_bound() {
        let mut r = Rng::new(1);
        for _ in 0..1000 {
            assert!(mutate(&mut r, &[b'x'; 100], &[b'y'; 100], 120).len() <= 120);
        }
    }
}
