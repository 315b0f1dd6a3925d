//! The unmerged spectral forward `y = x·ΔWᵀ` in O(d log d) per token, and its backward,
//! without ever forming ΔW (CPU, f32).
//!
//! For one token `x` (length `d2`), with `X̃[v] = Σ_k x_k e^{+2πi v k/d2}`:
//!
//! ```text
//! y_j = scaling/(d1·d2) · Re Σ_u z[u] e^{+2πi u j/d1},   z[u] = Σ_{l: u_l = u} c_l · X̃[v_l]
//! ```
//!
//! i.e. one real FFT of length `d2`, `n` complex multiply-adds, one complex-to-real inverse FFT of
//! length `d1`. The backward has the same shape transposed: with `Ĝ[u] = Σ_j g_j e^{+2πi u j/d1}`
//! for the output gradient `g`, `dL/dx = scaling/(d1·d2)·Re Σ_v w[v] e^{+2πi v k/d2}` with
//! `w[v] = Σ_{l: v_l = v} c_l Ĝ[u_l]`, and `dL/dc_l = scaling/(d1·d2)·Σ_tokens Re(Ĝ[u_l]·X̃[v_l])`.
//! Tokens are processed in parallel blocks; plans and scratch are reused across calls.

use super::fft::check_len;
use super::hermitian::{add_hermitian, fix_real_bins, plus_dft_at};
use super::{phase, plans};
use crate::entries::SpectralEntries;
use crate::error::{Error, Result};
use rayon::prelude::*;
use rustfft::num_complex::Complex32;

fn check(what: &str, found: usize, per_token: usize) -> Result<usize> {
    if per_token == 0 || !found.is_multiple_of(per_token) {
        return Err(Error::Shape {
            what: what.into(),
            expected: format!("(tokens, {per_token}) flattened"),
            found: format!("{found} values"),
        });
    }
    Ok(found / per_token)
}

/// Tokens per parallel block.
fn block_tokens(tokens: usize) -> usize {
    tokens
        .div_ceil(4 * rayon::current_num_threads().max(1))
        .clamp(1, 256)
}

/// `y = x·ΔWᵀ` for `x` of shape `(tokens, d2)` (row-major), returning `(tokens, d1)`.
///
/// ```
/// use fourierft::{internals::{fft, forward}, SpectralEntries};
/// let e = SpectralEntries::uniform(5, 4, 6, 1)?;
/// let c = [0.5f32, -1.0, 2.0, 0.3, 1.0, -0.2];
/// let x = [1.0f32, 2.0, -1.0, 0.5];
/// let y = forward::forward(&e, &c, 10.0, &x)?;
/// let dw = fft::delta_weight(&e, &c, 10.0)?;
/// for j in 0..5 {
///     let want: f32 = (0..4).map(|k| dw[j * 4 + k] * x[k]).sum();
///     assert!((y[j] - want).abs() < 1e-5);
/// }
/// # Ok::<(), fourierft::Error>(())
/// ```
pub fn forward(
    entries: &SpectralEntries,
    coeffs: &[f32],
    scaling: f64,
    x: &[f32],
) -> Result<Vec<f32>> {
    let (d1, d2) = entries.shape();
    check_len("spectral coefficients", coeffs.len(), entries.len())?;
    check("input of the spectral forward", x.len(), d2)?;
    let cs = scaled(coeffs, scaling, d1, d2, 0.5);
    per_token(x, (d2, entries.cols()), (d1, entries.rows()), &cs)
}

/// The per-token map both directions share: for each row `a` (length `len_a`) of `input`,
/// `Re Σ_l cs_l·A[f_l]·e^{+2πi t_l j/len_b}` for `j < len_b`, with `A[f] = Σ_k a_k e^{+2πi f k/len_a}`
/// — one real FFT, `n` multiply-adds into a Hermitian half-spectrum, one complex-to-real inverse
/// FFT. The forward maps `x` through (cols → rows); `dL/dx` maps `g` through (rows → cols).
/// Tokens are processed in parallel blocks.
fn per_token(
    input: &[f32],
    (len_a, from): (usize, &[u32]),
    (len_b, to): (usize, &[u32]),
    cs: &[f32],
) -> Result<Vec<f32>> {
    let tokens = input.len() / len_a;
    let mut out = vec![0f32; tokens * len_b];
    per_token_into(input, (len_a, from), (len_b, to), cs, &mut out)?;
    Ok(out)
}

/// [`per_token`] into `out` (`tokens · len_b` values, all overwritten).
fn per_token_into(
    input: &[f32],
    (len_a, from): (usize, &[u32]),
    (len_b, to): (usize, &[u32]),
    cs: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let tokens = input.len() / len_a;
    check_len("output of the spectral product", out.len(), tokens * len_b)?;
    let (half_a, half_b) = (len_a / 2 + 1, len_b / 2 + 1);
    let (r2c, c2r) = (plans::real_forward(len_a), plans::real_inverse(len_b));
    let scratch_len = r2c.get_scratch_len().max(c2r.get_scratch_len());
    let bt = block_tokens(tokens);
    out.par_chunks_mut(bt * len_b)
        .zip(input.par_chunks(bt * len_a))
        .try_for_each(|(out_blk, in_blk)| {
            plans::with_buffers(|b| {
                let plans::Buffers {
                    scratch,
                    complex: [spec, h, _],
                    real: [a_in, _, _],
                } = b;
                let scratch = plans::sized(scratch, scratch_len);
                let (spec, h) = (plans::sized(spec, half_a), plans::sized(h, half_b));
                let a_in = plans::sized(a_in, len_a);
                for (o, a) in out_blk
                    .chunks_exact_mut(len_b)
                    .zip(in_blk.chunks_exact(len_a))
                {
                    a_in.copy_from_slice(a);
                    r2c.process_with_scratch(a_in, spec, scratch)
                        .map_err(plans::fft_error)?;
                    h.fill(Complex32::default());
                    for l in 0..cs.len() {
                        let val = plus_dft_at(spec, from[l] as usize, len_a) * cs[l];
                        add_hermitian(h, to[l] as usize, len_b, val);
                    }
                    fix_real_bins(h, len_b);
                    c2r.process_with_scratch(h, o, scratch)
                        .map_err(plans::fft_error)?;
                }
                Ok::<(), Error>(())
            })
        })
}

/// The number of tokens of `x` `(tokens, d2)` and `g = dL/dy` `(tokens, d1)`, checked to agree.
fn grad_tokens(entries: &SpectralEntries, x: &[f32], g: &[f32]) -> Result<usize> {
    let (d1, d2) = entries.shape();
    let tokens = check("input of the spectral forward", x.len(), d2)?;
    let g_tokens = check("gradient of the spectral forward", g.len(), d1)?;
    if g_tokens != tokens {
        return Err(Error::Shape {
            what: "gradient of the spectral forward".into(),
            expected: format!("({tokens}, {d1})"),
            found: format!("({g_tokens}, {d1})"),
        });
    }
    Ok(tokens)
}

/// Gradients of the spectral forward: given `x` `(tokens, d2)` and `g = dL/dy` `(tokens, d1)`,
/// returns `dL/dx` `(tokens, d2)` (only when `need_dx`) and `dL/dc` `[n]` ([`coeff_grad`]).
pub fn backward(
    entries: &SpectralEntries,
    coeffs: &[f32],
    scaling: f64,
    x: &[f32],
    g: &[f32],
    need_dx: bool,
) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
    let n = entries.len();
    let mut packed = backward_packed(entries, coeffs, scaling, x, g, need_dx)?;
    let dc = packed.split_off(packed.len() - n);
    Ok((need_dx.then_some(packed), dc))
}

/// [`backward`] as one buffer `[dL/dx (flattened, if need_dx) | dL/dc]`, allocated once at its
/// final size (the layout the spectral op hands to candle).
pub(crate) fn backward_packed(
    entries: &SpectralEntries,
    coeffs: &[f32],
    scaling: f64,
    x: &[f32],
    g: &[f32],
    need_dx: bool,
) -> Result<Vec<f32>> {
    check_len("spectral coefficients", coeffs.len(), entries.len())?;
    let tokens = grad_tokens(entries, x, g)?;
    let (d1, d2) = entries.shape();
    let dx_len = if need_dx { tokens * d2 } else { 0 };
    let mut packed = Vec::with_capacity(dx_len + entries.len());
    packed.resize(dx_len, 0f32);
    if need_dx {
        let cs = scaled(coeffs, scaling, d1, d2, 0.5);
        per_token_into(
            g,
            (d1, entries.rows()),
            (d2, entries.cols()),
            &cs,
            &mut packed,
        )?;
    }
    packed.extend_from_slice(&coeff_grad(entries, scaling, x, g)?);
    Ok(packed)
}

/// Tokens whose spectra are stored together, frequency-major, in [`coeff_grad`].
const GRAD_BLOCK: usize = 64;

/// Tokens transformed together before their spectra are transposed into the block.
const TILE: usize = 8;

/// Sum of `a_i·b_i` with 8 independent accumulators (so that it vectorises).
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Stores the spectra of `tl ≤ TILE` tokens, `tile[i·half + w]`, frequency-major into a block:
/// `re[w·GRAD_BLOCK + t0 + i]`, `im[…]`.
#[inline(always)]
fn transpose_tile(
    tile: &[Complex32],
    half: usize,
    tl: usize,
    re: &mut [f32],
    im: &mut [f32],
    t0: usize,
) {
    if tl == TILE {
        // Fixed trip count: TILE loads per bin, one contiguous TILE-wide store each.
        for w in 0..half {
            let (r, m) = (
                &mut re[w * GRAD_BLOCK + t0..w * GRAD_BLOCK + t0 + TILE],
                &mut im[w * GRAD_BLOCK + t0..w * GRAD_BLOCK + t0 + TILE],
            );
            for i in 0..TILE {
                let z = tile[i * half + w];
                r[i] = z.re;
                m[i] = z.im;
            }
        }
    } else {
        for w in 0..half {
            for i in 0..tl {
                let z = tile[i * half + w];
                re[w * GRAD_BLOCK + t0 + i] = z.re;
                im[w * GRAD_BLOCK + t0 + i] = z.im;
            }
        }
    }
}

/// `dL/dc` of `y = x·ΔWᵀ` (and so of any layer whose weight includes ΔW): given `x` `(tokens, d2)`
/// and `g = dL/dy` `(tokens, d1)`, `dL/dc_l = scaling/(d1·d2)·Σ_tokens Re(Ĝ[u_l]·X̃[v_l])`.
///
/// Two real FFTs per token, then per block of tokens the spectra are stored frequency-major
/// (real and imaginary parts apart), so each coefficient's sum is two contiguous dot products:
/// `O(tokens·(d1 log d1 + d2 log d2 + n))`, against `O(tokens·d1·d2)` for the weight gradient
/// `gᵀ·x` followed by [`delta_weight_grad`](super::fft::delta_weight_grad).
///
/// ```
/// use fourierft::{internals::{fft, forward}, SpectralEntries};
/// let e = SpectralEntries::uniform(5, 4, 6, 1)?;
/// let (x, g) = ([1.0f32, 2.0, -1.0, 0.5], [0.5f32, -1.0, 0.0, 2.0, 1.0]);
/// let dc = forward::coeff_grad(&e, 10.0, &x, &g)?;
/// // The same through the weight gradient gᵀ·x.
/// let gw: Vec<f32> = (0..20).map(|i| g[i / 4] * x[i % 4]).collect();
/// let want = fft::delta_weight_grad(&e, &gw, 10.0)?;
/// assert!(dc.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-4));
/// # Ok::<(), fourierft::Error>(())
/// ```
pub fn coeff_grad(
    entries: &SpectralEntries,
    scaling: f64,
    x: &[f32],
    g: &[f32],
) -> Result<Vec<f32>> {
    let (d1, d2) = entries.shape();
    let tokens = grad_tokens(entries, x, g)?;
    let (half1, half2) = (d1 / 2 + 1, d2 / 2 + 1);
    let (r2c_x, r2c_g) = (plans::real_forward(d2), plans::real_forward(d1));
    let scratch_len = r2c_x.get_scratch_len().max(r2c_g.get_scratch_len());
    // Per entry: the stored bins of Ĝ and X̃, and the sign of Im·Im in Re(Ĝ[u]·X̃[v]) — realfft
    // stores e^{−i·} bins, conjugated below the half (see `plus_dft_at`).
    let fold = |f: usize, d: usize, half: usize| {
        if f < half {
            (f, -1f32)
        } else {
            (d - f, 1f32)
        }
    };
    let terms: Vec<(usize, usize, f32)> = entries
        .rows()
        .iter()
        .zip(entries.cols())
        .map(|(&u, &v)| {
            let ((iu, su), (iv, sv)) = (fold(u as usize, d1, half1), fold(v as usize, d2, half2));
            (iu, iv, su * sv)
        })
        .collect();
    let n = terms.len();
    let bt = block_tokens(tokens).max(GRAD_BLOCK.min(tokens));
    let partial: Vec<Vec<f32>> = x
        .par_chunks(bt * d2)
        .zip(g.par_chunks(bt * d1))
        .map(|(x_blk, g_blk)| {
            plans::with_buffers(|b| {
                let plans::Buffers {
                    scratch,
                    complex: [xs, gs, _],
                    real: [xin, gin, spec],
                } = b;
                let scratch = plans::sized(scratch, scratch_len);
                let (xt, gt) = (
                    plans::sized(xs, TILE * half2),
                    plans::sized(gs, TILE * half1),
                );
                let (xin, gin) = (plans::sized(xin, d2), plans::sized(gin, d1));
                // Frequency-major spectra of up to GRAD_BLOCK tokens: [bin][token] (this
                // thread's workspace; every value read is written first for each sub-block).
                let spec = plans::sized(spec, 2 * (half1 + half2) * GRAD_BLOCK);
                let (g_re, rest) = spec.split_at_mut(half1 * GRAD_BLOCK);
                let (g_im, rest) = rest.split_at_mut(half1 * GRAD_BLOCK);
                let (x_re, x_im) = rest.split_at_mut(half2 * GRAD_BLOCK);
                let mut dc = vec![0f32; n];
                for (x_sub, g_sub) in x_blk
                    .chunks(GRAD_BLOCK * d2)
                    .zip(g_blk.chunks(GRAD_BLOCK * d1))
                {
                    let len = x_sub.len() / d2;
                    // FFTs of up to TILE tokens into token-major tiles, then each bin's TILE
                    // values stored contiguously in the frequency-major block.
                    for t0 in (0..len).step_by(TILE) {
                        let tl = TILE.min(len - t0);
                        for i in 0..tl {
                            let t = t0 + i;
                            gin.copy_from_slice(&g_sub[t * d1..(t + 1) * d1]);
                            r2c_g
                                .process_with_scratch(
                                    gin,
                                    &mut gt[i * half1..(i + 1) * half1],
                                    scratch,
                                )
                                .map_err(plans::fft_error)?;
                            xin.copy_from_slice(&x_sub[t * d2..(t + 1) * d2]);
                            r2c_x
                                .process_with_scratch(
                                    xin,
                                    &mut xt[i * half2..(i + 1) * half2],
                                    scratch,
                                )
                                .map_err(plans::fft_error)?;
                        }
                        transpose_tile(gt, half1, tl, g_re, g_im, t0);
                        transpose_tile(xt, half2, tl, x_re, x_im, t0);
                    }
                    let row = |w: usize| w * GRAD_BLOCK..w * GRAD_BLOCK + len;
                    for (d, &(iu, iv, sign)) in dc.iter_mut().zip(&terms) {
                        let (ru, rv) = (row(iu), row(iv));
                        *d += dot8(&g_re[ru.clone()], &x_re[rv.clone()])
                            - sign * dot8(&g_im[ru], &x_im[rv]);
                    }
                }
                Ok::<_, Error>(dc)
            })
        })
        .collect::<Result<_>>()?;
    let s = phase::scale(scaling, d1, d2) as f32;
    let mut dc = vec![0f32; n];
    for p in partial {
        for (a, b) in dc.iter_mut().zip(p) {
            *a += b;
        }
    }
    dc.iter_mut().for_each(|v| *v *= s);
    Ok(dc)
}

/// `c_l · scaling/(d1·d2) · extra`.
fn scaled(coeffs: &[f32], scaling: f64, d1: usize, d2: usize, extra: f64) -> Vec<f32> {
    let s = (phase::scale(scaling, d1, d2) * extra) as f32;
    coeffs.iter().map(|c| c * s).collect()
}
