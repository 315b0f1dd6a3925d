//! Elementwise f32 kernels: a vectorisable `exp` and `erf`, GELU and its derivative, the masked
//! softmax row, and a sum with independent accumulators.

use rayon::prelude::*;

/// A sum with 8 independent accumulators (so that it vectorises).
#[inline(always)]
pub(crate) fn sum8(it: impl Iterator<Item = f32>) -> f32 {
    let mut acc = [0f32; 8];
    for (i, v) in it.enumerate() {
        acc[i % 8] += v;
    }
    acc.iter().sum()
}

/// Rows per rayon task: small tensors stay on one thread.
pub(crate) const ROWS_PER_TASK: usize = 64;

/// e^x for f32 without a libm call (Cephes' expf polynomial; relative error ~2e-7), written
/// branch-free so that loops over it vectorise.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    let arg = x;
    let x = x.clamp(-87.0, 88.0);
    // Adding 1.5·2^23 rounds x·log2(e) to an integer n, held in the low mantissa bits of `z`
    // (no float-to-int conversion, so that the loop vectorises).
    let z = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = z - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    let n = (z.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let y = e * f32::from_bits(((n + 127) as u32) << 23);
    // Below −87, e^x is under f32::MIN_POSITIVE: return 0, as exp underflows for torch, instead
    // of e^−87 — which a softmax's 1/sum turns into a subnormal probability for every masked
    // key, whose gradients then stay subnormal through the whole backward (docs/PERFORMANCE.md).
    if arg < -87.0 {
        0.0
    } else {
        y
    }
}

/// erf for f32 (Abramowitz–Stegun 7.1.26, absolute error < 1.5e-7, the approximation PyTorch's
/// vectorised CPU erf also uses), branch-free.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    (1.0 - poly * exp_f32(-a * a)).copysign(x)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// The elementwise GELU loops, compiled twice: for the baseline target (SSE2) and, chosen at run
/// time, for AVX2 + FMA (about 3× faster here); the same scalar code, vectorised by the compiler.
pub(crate) mod simd {
    use super::{erf, exp_f32, FRAC_1_SQRT_2, FRAC_1_SQRT_2PI};

    #[inline(always)]
    fn gelu_loop(y: &mut [f32], x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2));
        }
    }

    #[inline(always)]
    fn gelu_grad_loop(d: &mut [f32], x: &[f32], g: &[f32]) {
        for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
            let pdf = FRAC_1_SQRT_2PI * exp_f32(-0.5 * x * x);
            *d = g * (cdf + x * pdf);
        }
    }

    /// One row of the attention's masked softmax (`crate::attention`).
    #[inline(always)]
    fn masked_softmax_loop(y: &mut [f32], x: &[f32], mask: &[f32], scale: f32) {
        let mut max = [f32::NEG_INFINITY; 8];
        for ((y, &x), &m) in y.iter_mut().zip(x).zip(mask) {
            *y = x * scale + m;
        }
        for (i, &v) in y.iter().enumerate() {
            max[i % 8] = max[i % 8].max(v);
        }
        let max = max.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for y in y.iter_mut() {
            *y = exp_f32(*y - max);
        }
        let inv = 1.0 / super::sum8(y.iter().copied());
        for y in y.iter_mut() {
            *y *= inv;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn masked_softmax_avx2(y: &mut [f32], x: &[f32], mask: &[f32], scale: f32) {
        masked_softmax_loop(y, x, mask, scale)
    }

    pub fn masked_softmax(y: &mut [f32], x: &[f32], mask: &[f32], scale: f32) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { masked_softmax_avx2(y, x, mask, scale) };
        }
        masked_softmax_loop(y, x, mask, scale)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn gelu_avx2(y: &mut [f32], x: &[f32]) {
        gelu_loop(y, x)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn gelu_grad_avx2(d: &mut [f32], x: &[f32], g: &[f32]) {
        gelu_grad_loop(d, x, g)
    }

    #[cfg(target_arch = "x86_64")]
    fn has_avx2() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    pub fn gelu(y: &mut [f32], x: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { gelu_avx2(y, x) };
        }
        gelu_loop(y, x)
    }

    pub fn gelu_grad(d: &mut [f32], x: &[f32], g: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { gelu_grad_avx2(d, x, g) };
        }
        gelu_grad_loop(d, x, g)
    }
}

/// Elements per rayon task in elementwise ops.
const ELEMS_PER_TASK: usize = 16384;

/// `gelu(x)` elementwise, in parallel, into a new buffer.
pub(crate) fn gelu_par(x: &[f32]) -> Vec<f32> {
    let mut y = par_zeros(x.len());
    y.par_chunks_mut(ELEMS_PER_TASK)
        .zip(x.par_chunks(ELEMS_PER_TASK))
        .for_each(|(yc, xc)| simd::gelu(yc, xc));
    y
}

/// `g·gelu′(x)` elementwise, in parallel, into a new buffer.
pub(crate) fn gelu_grad_par(x: &[f32], g: &[f32]) -> Vec<f32> {
    let mut d = par_zeros(x.len());
    d.par_chunks_mut(ELEMS_PER_TASK)
        .zip(x.par_chunks(ELEMS_PER_TASK))
        .zip(g.par_chunks(ELEMS_PER_TASK))
        .for_each(|((dc, xc), gc)| simd::gelu_grad(dc, xc, gc));
    d
}

/// A zero-filled vector of `len` values, written by all rayon threads (a serial `vec![0; len]`
/// of a freed-and-reused buffer is a memset on one core).
pub(crate) fn par_zeros(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    v.par_extend(rayon::iter::repeat_n(0f32, len));
    v
}
