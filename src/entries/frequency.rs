//! Frequency-biased sampling of spectral positions (FourierFT paper, Eq. 5).
//!
//! The weight of position `(u, v)` of a `d1 x d2` spectrum is
//! `w(u, v) = exp(-((D² - fc²) / (D·W))²)`, where `D = sqrt(fu² + fv²)` is the distance from DC
//! in signed frequencies (`fu = u` if `u <= d1/2` else `u - d1`, likewise `fv` with `d2`), `fc`
//! is the band center and `W` its width, all in frequency-index units. At `D = 0` the weight is
//! the limit: `1` if `fc == 0`, else `0`.
//!
//! Sampling without replacement uses an exponential race (Efraimidis–Spirakis): every position
//! with positive weight gets the key `E / w` with `E ~ Exp(1)`, and the `n` smallest keys win, in
//! ascending key order. That order is distributed exactly as drawing one position at a time with
//! probability proportional to `w` among those not yet drawn. Keys are compared in log space
//! (`ln E - ln w`), so positions whose weight would underflow `f64` are still ranked correctly;
//! a position has zero weight only when `ln w` is `-inf` (DC when `fc > 0`, or an overflow of the
//! squared ratio for absurdly small widths).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// `ln w(u, v)` for signed frequencies `(fu, fv)`; `-inf` means zero weight.
fn log_weight(fu: f64, fv: f64, center: f64, width: f64) -> f64 {
    let dist_sq = fu * fu + fv * fv;
    if dist_sq == 0.0 {
        return if center == 0.0 {
            0.0
        } else {
            f64::NEG_INFINITY
        };
    }
    let ratio = (dist_sq - center * center) / (dist_sq.sqrt() * width);
    -(ratio * ratio)
}

/// Signed frequency of index `i` in a length-`d` axis (DC at 0, Nyquist positive).
fn signed(i: usize, d: usize) -> f64 {
    if i <= d / 2 {
        i as f64
    } else {
        -((d - i) as f64)
    }
}

/// A race candidate, ordered by key then flat index (a total order, so the heap is deterministic).
struct Candidate {
    key: f64,
    flat: u64,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key
            .total_cmp(&other.key)
            .then(self.flat.cmp(&other.flat))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

/// Samples `n` distinct flat indices `u*d2 + v` in sampling order (see the module docs), seeded
/// with `StdRng::seed_from_u64(seed)`. `O(d1·d2·log n)` time, `O(n)` memory.
///
/// The caller has checked `1 <= n <= d1*d2`. Errors with [`Error::Config`] on a bad
/// `center`/`width` or when fewer than `n` positions have positive weight.
pub(crate) fn sample(
    d1: usize,
    d2: usize,
    n: usize,
    seed: u64,
    center: f64,
    width: f64,
) -> Result<Vec<u64>> {
    if !(center.is_finite() && center >= 0.0) {
        return Err(Error::Config(format!(
            "frequency-biased sampling: center must be finite and >= 0, found {center}"
        )));
    }
    if !(width.is_finite() && width > 0.0) {
        return Err(Error::Config(format!(
            "frequency-biased sampling: width must be finite and > 0, found {width}"
        )));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut heap: BinaryHeap<Candidate> = BinaryHeap::with_capacity(n);
    let mut positive = 0u64;
    for u in 0..d1 {
        let fu = signed(u, d1);
        for v in 0..d2 {
            let lw = log_weight(fu, signed(v, d2), center, width);
            if lw == f64::NEG_INFINITY {
                continue;
            }
            positive += 1;
            // E = -ln(1 - U) ~ Exp(1) with U in [0, 1); key = ln E - ln w.
            let exp1 = -(-rng.random::<f64>()).ln_1p();
            let cand = Candidate {
                key: exp1.ln() - lw,
                flat: u as u64 * d2 as u64 + v as u64,
            };
            if heap.len() < n {
                heap.push(cand);
            } else if let Some(mut worst) = heap.peek_mut() {
                if cand < *worst {
                    *worst = cand;
                }
            }
        }
    }
    if positive < n as u64 {
        return Err(Error::Config(format!(
            "frequency-biased sampling (center {center}, width {width}): only {positive} of the \
             {d1}x{d2} positions have positive weight, cannot pick {n}; widen the band or lower n"
        )));
    }
    Ok(heap.into_sorted_vec().into_iter().map(|c| c.flat).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_limits_and_signed_frequencies() {
        assert_eq!(log_weight(0.0, 0.0, 0.0, 1.0), 0.0);
        assert_eq!(log_weight(0.0, 0.0, 2.0, 1.0), f64::NEG_INFINITY);
        // On the band (D = fc) the weight is 1.
        assert_eq!(log_weight(3.0, 4.0, 5.0, 1.0), 0.0);
        assert_eq!(signed(0, 8), 0.0);
        assert_eq!(signed(4, 8), 4.0);
        assert_eq!(signed(5, 8), -3.0);
        assert_eq!(signed(3, 7), 3.0);
        assert_eq!(signed(4, 7), -3.0);
    }

    #[test]
    fn full_spectrum_with_zero_center_is_a_permutation() {
        let mut flat = sample(5, 7, 35, 1, 0.0, 3.0).unwrap_or_default();
        flat.sort_unstable();
        assert_eq!(flat, (0..35).collect::<Vec<u64>>());
    }
}
