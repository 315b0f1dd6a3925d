//! Bit-exact reimplementation of the parts of torch's CPU random generator that PEFT's FourierFT
//! uses: the MT19937 engine behind `torch.Generator().manual_seed(seed)` and `torch.randperm(n)`.
//!
//! Only the first `k` values of a permutation are ever needed (PEFT keeps
//! `randperm(d1*d2)[:n]`), so [`randperm_prefix`] computes just those.

use std::collections::HashMap;

/// torch's CPU `randperm(n)` switches algorithm at this size (`u32::MAX / 20`): below it, the
/// forward Fisher–Yates shuffle on 32-bit draws; at or above it, the inside-out shuffle on
/// 64-bit draws (torch ≥ 2.7).
pub const RANDPERM_SMALL_LIMIT: u64 = u32::MAX as u64 / 20;

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The 32-bit Mersenne Twister exactly as torch's CPU generator runs it.
///
/// [`Mt19937::new`] seeds with the low 32 bits of `seed` (the standard `init_genrand`, as
/// `torch.Generator().manual_seed(seed)` does); [`Mt19937::next_u32`] is torch's `random()`
/// (one tempered draw) and [`Mt19937::next_u64`] is torch's `random64()`.
///
/// ```
/// use fourierft::internals::torch_rng::Mt19937;
/// let mut rng = Mt19937::new(777);
/// assert_eq!(rng.next_u32(), 655685735);
/// assert_eq!(rng.next_u32(), 2776480559);
/// ```
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; N],
    index: usize,
}

impl std::fmt::Debug for Mt19937 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mt19937")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Mt19937 {
    /// A generator seeded like `torch.Generator().manual_seed(seed)`: only the low 32 bits of
    /// `seed` are used.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self { state, index: N }
    }

    /// Regenerates the whole state block (the standard MT19937 twist), without `% N` so that
    /// unoptimised builds stay fast.
    fn twist(&mut self) {
        let s = &mut self.state;
        let mix = |a: u32, b: u32, far: u32| {
            let y = (a & UPPER_MASK) | (b & LOWER_MASK);
            far ^ (y >> 1) ^ (MATRIX_A & (y & 1).wrapping_neg())
        };
        for i in 0..N - M {
            s[i] = mix(s[i], s[i + 1], s[i + M]);
        }
        for i in N - M..N - 1 {
            s[i] = mix(s[i], s[i + 1], s[i + M - N]);
        }
        s[N - 1] = mix(s[N - 1], s[0], s[M - 1]);
        self.index = 0;
    }

    /// The next tempered 32-bit output (torch's `random()`).
    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// Two draws combined as `(first << 32) | second` (torch's `random64()`).
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }
}

/// The first `min(k, n)` values of torch's CPU `torch.randperm(n, generator=g)` where `g` is a
/// fresh generator seeded with `seed` — i.e. PEFT's `randperm(n)[:k]`, bit-exact.
///
/// Cost depends on torch's branch:
/// - `n < RANDPERM_SMALL_LIMIT` (214,748,364): forward Fisher–Yates; position `i` is final after
///   step `i`, so only `k` draws are made, in `O(k)` time and memory.
/// - `n >= RANDPERM_SMALL_LIMIT`: inside-out shuffle; a later step may still overwrite any of the
///   first `k` positions, so all `n` steps (2·n 32-bit draws) are run: `O(n)` time but only
///   `O(k)` memory (positions `>= k` never feed back into the first `k`). This only happens for
///   layers with `d1*d2 >= 214,748,364`; expect about a second per such shape in release builds.
///
/// ```
/// use fourierft::internals::torch_rng::randperm_prefix;
/// assert_eq!(randperm_prefix(10, 10, 777), vec![5, 9, 0, 3, 1, 7, 4, 8, 6, 2]);
/// assert_eq!(randperm_prefix(10, 3, 777), vec![5, 9, 0]);
/// ```
pub fn randperm_prefix(n: u64, k: usize, seed: u64) -> Vec<u64> {
    let k = (k as u64).min(n);
    let mut rng = Mt19937::new(seed);
    if n < RANDPERM_SMALL_LIMIT {
        if k.saturating_mul(4) >= n {
            forward_dense(n, k, &mut rng)
        } else {
            forward_sparse(n, k, &mut rng)
        }
    } else {
        inside_out_prefix(n, k, &mut rng)
    }
}

/// Forward Fisher–Yates (`n < RANDPERM_SMALL_LIMIT`) with a dense `0..n` array.
fn forward_dense(n: u64, k: u64, rng: &mut Mt19937) -> Vec<u64> {
    let mut r: Vec<u64> = (0..n).collect();
    for i in 0..k.min(n.saturating_sub(1)) {
        let z = rng.next_u32() as u64 % (n - i);
        r.swap(i as usize, (i + z) as usize);
    }
    r.truncate(k as usize);
    r
}

/// Forward Fisher–Yates (`n < RANDPERM_SMALL_LIMIT`) with a sparse map of moved positions.
fn forward_sparse(n: u64, k: u64, rng: &mut Mt19937) -> Vec<u64> {
    let mut moved: HashMap<u64, u64> = HashMap::with_capacity(2 * k as usize);
    let mut out = Vec::with_capacity(k as usize);
    for i in 0..k {
        let here = moved.remove(&i).unwrap_or(i);
        if i + 1 < n {
            let j = i + rng.next_u32() as u64 % (n - i);
            if j != i {
                let there = moved.insert(j, here).unwrap_or(j);
                out.push(there);
                continue;
            }
        }
        out.push(here);
    }
    out
}

/// Inside-out shuffle (`n >= RANDPERM_SMALL_LIMIT`): `for i in 0..n { z = random64() % (i+1);
/// r[i] = r[z]; r[z] = i }`, tracking only positions `< k`.
fn inside_out_prefix(n: u64, k: u64, rng: &mut Mt19937) -> Vec<u64> {
    let mut r: Vec<u64> = Vec::with_capacity(k as usize);
    for i in 0..k {
        let z = (rng.next_u64() % (i + 1)) as usize;
        r.push(i);
        r.swap(i as usize, z);
    }
    for i in k..n {
        let z = rng.next_u64() % (i + 1);
        if z < k {
            r[z as usize] = i;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full inside-out shuffle, written exactly as torch does it.
    fn inside_out_full(n: u64, seed: u64) -> Vec<u64> {
        let mut rng = Mt19937::new(seed);
        let mut r = vec![0u64; n as usize];
        for i in 0..n {
            let z = (rng.next_u64() % (i + 1)) as usize;
            r[i as usize] = r[z];
            r[z] = i;
        }
        r
    }

    #[test]
    fn mt19937_seed_777() {
        let mut rng = Mt19937::new(777);
        assert_eq!(
            [rng.next_u32(), rng.next_u32(), rng.next_u32()],
            [655685735, 2776480559, 1298611771]
        );
        // Only the low 32 bits of the seed matter.
        let mut hi = Mt19937::new(777 | (5 << 32));
        assert_eq!(hi.next_u32(), 655685735);
        let mut a = Mt19937::new(777);
        assert_eq!(a.next_u64(), (655685735u64 << 32) | 2776480559);
    }

    #[test]
    fn mt19937_reference_seed_5489() {
        // The canonical std::mt19937 default-seed outputs; the 10000th is 4123659995.
        let mut rng = Mt19937::new(5489);
        assert_eq!(rng.next_u32(), 3499211612);
        let last = (1..10000).map(|_| rng.next_u32()).last();
        assert_eq!(last, Some(4123659995));
    }

    #[test]
    fn sparse_prefix_matches_full_forward_shuffle() {
        for &n in &[1u64, 2, 3, 7, 10, 97, 240, 1000, 4099] {
            for &seed in &[0u64, 1, 777, 2024, u64::MAX] {
                let full = forward_dense(n, n, &mut Mt19937::new(seed));
                for &k in &[0u64, 1, 2, n / 3, n.saturating_sub(1), n] {
                    let k = k.min(n);
                    let sparse = forward_sparse(n, k, &mut Mt19937::new(seed));
                    assert_eq!(sparse, full[..k as usize], "n={n} k={k} seed={seed}");
                    let public = randperm_prefix(n, k as usize, seed);
                    assert_eq!(public, full[..k as usize], "n={n} k={k} seed={seed}");
                }
                let mut sorted = full.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn inside_out_prefix_matches_full_inside_out_shuffle() {
        for &n in &[1u64, 2, 5, 64, 1000] {
            for &seed in &[0u64, 777, 31337] {
                let full = inside_out_full(n, seed);
                for &k in &[0u64, 1, 3, n / 2, n] {
                    let k = k.min(n);
                    let prefix = inside_out_prefix(n, k, &mut Mt19937::new(seed));
                    assert_eq!(prefix, full[..k as usize], "n={n} k={k} seed={seed}");
                }
            }
        }
    }

    #[test]
    fn k_larger_than_n_is_clamped() {
        assert_eq!(randperm_prefix(3, 10, 777).len(), 3);
        assert!(randperm_prefix(0, 10, 777).is_empty());
    }
}
