//! ΔW and its gradient on CPU with a pruned real inverse FFT (rustfft + realfft, f32).
//!
//! Neither direction allocates a dense complex `d1×d2` spectrum, as `ifft2` on a dense spectrum
//! would. With `C_v[j] = Σ_{l: v_l = v} c_l e^{+2πi u_l j/d1}` for each column `v`:
//!
//! 1. for each half-spectrum bin `w ≤ d2/2` that an entry reaches (directly, `v_l = w`, or by
//!    symmetry, `v_l = d2 − w`), one complex inverse FFT of length `d1` gives
//!    `H_w[j] = (C_w[j] + conj(C_{(d2−w) mod d2}[j]))/2` — the mirrored column enters at rows
//!    `(d1 − u_l) mod d1`, as the coefficients are real — so at most `d2/2 + 1` transforms;
//! 2. per row `j` (the top half only: ΔW is even), the half-spectrum `h[w] = H_w[j]` and one
//!    complex-to-real inverse FFT of length `d2` give the row `Re Σ_v C_v[j] e^{+2πi v k/d2}`.
//!
//! The gradient runs the same steps transposed: a real forward FFT per row of `dL/dΔW`, a gather
//! at the `m` distinct columns, one complex inverse FFT of length `d1` per column, a gather at the
//! entries.
//! Rows are processed in parallel blocks (rayon); plans and scratch are reused across calls.

use super::hermitian::{fix_real_bins, plus_dft_at};
use super::{phase, plans};
use crate::entries::SpectralEntries;
use crate::error::{Error, Result};
use rayon::prelude::*;
use rustfft::num_complex::Complex32;

/// Rows per parallel block: enough blocks for every thread, a bounded buffer per block.
fn block_rows(d1: usize, half: usize) -> usize {
    let by_threads = d1.div_ceil(4 * rayon::current_num_threads().max(1));
    let by_cache = ((1usize << 15) / half.max(1)).max(1);
    by_threads.clamp(1, 64).min(by_cache)
}

pub(super) fn check_len(what: &str, found: usize, expected: usize) -> Result<()> {
    if found != expected {
        return Err(Error::Shape {
            what: what.to_string(),
            expected: format!("[{expected}]"),
            found: format!("[{found}]"),
        });
    }
    Ok(())
}

/// `ΔW = scaling/(d1·d2) · Re(IDFT2(E∘c))`, row-major `d1×d2` (`d1` = out_features).
///
/// `coeffs[l]` belongs to entry `l` of `entries`. Computed in f32; error ≈ 1e-6 of `max|ΔW|`.
///
/// ```
/// use fourierft::{internals::fft::delta_weight, SpectralEntries};
/// let e = SpectralEntries::explicit(2, 4, &[(0, 1)])?;
/// let dw = delta_weight(&e, &[8.0], 1.0)?; // cos(2π k/4) for both rows
/// assert!((dw[0] - 1.0).abs() < 1e-6 && dw[1].abs() < 1e-6 && (dw[6] + 1.0).abs() < 1e-6);
/// # Ok::<(), fourierft::Error>(())
/// ```
pub fn delta_weight(entries: &SpectralEntries, coeffs: &[f32], scaling: f64) -> Result<Vec<f32>> {
    delta_weight_onto(entries, coeffs, scaling, None)
}

/// `base + ΔW` (row-major `d1×d2`) in one pass: no separate ΔW buffer (the merge path).
///
/// ```
/// use fourierft::{internals::fft, SpectralEntries};
/// let e = SpectralEntries::uniform(3, 4, 5, 7)?;
/// let c = [1.0f32, -0.5, 0.25, 2.0, 0.0];
/// let base: Vec<f32> = (0..12).map(|i| i as f32).collect();
/// let merged = fft::add_delta_weight(&e, &c, 9.0, &base)?;
/// let dw = fft::delta_weight(&e, &c, 9.0)?;
/// assert!(merged.iter().zip(&base).zip(&dw).all(|((m, b), d)| (m - (b + d)).abs() < 1e-5));
/// # Ok::<(), fourierft::Error>(())
/// ```
pub fn add_delta_weight(
    entries: &SpectralEntries,
    coeffs: &[f32],
    scaling: f64,
    base: &[f32],
) -> Result<Vec<f32>> {
    check_len(
        "base weight (flattened)",
        base.len(),
        entries.d1() * entries.d2(),
    )?;
    delta_weight_onto(entries, coeffs, scaling, Some(base))
}

fn delta_weight_onto(
    entries: &SpectralEntries,
    coeffs: &[f32],
    scaling: f64,
    base: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let (d1, d2) = entries.shape();
    let mut out = vec![0f32; d1 * d2];
    delta_weight_into(entries, coeffs, scaling, base, &mut out)?;
    Ok(out)
}

/// `base + ΔW` (or ΔW) written into `out` (`d1·d2` values, every one overwritten, so `out` may
/// hold anything on entry): the fused layer's pooled workspace.
pub(crate) fn add_delta_weight_into(
    entries: &SpectralEntries,
    coeffs: &[f32],
    scaling: f64,
    base: &[f32],
    out: &mut [f32],
) -> Result<()> {
    check_len(
        "base weight (flattened)",
        base.len(),
        entries.d1() * entries.d2(),
    )?;
    delta_weight_into(entries, coeffs, scaling, Some(base), out)
}

fn delta_weight_into(
    entries: &SpectralEntries,
    coeffs: &[f32],
    scaling: f64,
    base: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_len("spectral coefficients", coeffs.len(), entries.len())?;
    check_len(
        "ΔW output (flattened)",
        out.len(),
        entries.d1() * entries.d2(),
    )?;
    let (d1, d2) = entries.shape();
    let groups = entries.column_groups();
    let rows = entries.rows();
    let half = d2 / 2 + 1;
    // The 1/2 of the Hermitian split is folded into the coefficients.
    let s = (phase::scale(scaling, d1, d2) * 0.5) as f32;

    // Step 1: per half-spectrum bin w ≤ d2/2 that any entry reaches, the row signal
    // H_w[j] = C_w[j] + conj(C_{d2−w}[j]) (zero for the other bins) by one complex inverse FFT of
    // length d1: column d2−w enters at the mirrored rows (d1 − u) mod d1 (the coefficients are
    // real). Stored bin-major [bins][d1]; at most d2/2 + 1 transforms however many columns.
    let mut bins: Vec<(usize, Vec<(usize, bool)>)> = Vec::new();
    {
        let mut by_bin: Vec<Vec<(usize, bool)>> = vec![Vec::new(); half];
        for (g, &v) in groups.columns.iter().enumerate() {
            let v = v as usize;
            if v < half {
                by_bin[v].push((g, false));
            }
            let w = (d2 - v) % d2;
            if w < half {
                by_bin[w].push((g, true));
            }
        }
        bins.extend(
            by_bin
                .into_iter()
                .enumerate()
                .filter(|(_, c)| !c.is_empty()),
        );
    }
    let inv_d1 = plans::complex_inverse(d1);
    let mut cols = plans::pooled::<Complex32>(bins.len() * d1);
    cols.par_chunks_mut(d1)
        .zip(&bins)
        .for_each(|(col, (_, contrib))| {
            for &(g, mirrored) in contrib {
                for &l in &groups.entries[groups.offsets[g]..groups.offsets[g + 1]] {
                    let u = rows[l as usize] as usize;
                    let at = if mirrored { (d1 - u) % d1 } else { u };
                    col[at].re += coeffs[l as usize] * s;
                }
            }
            plans::with_buffers(|b| {
                let scratch = plans::sized(&mut b.scratch, inv_d1.get_inplace_scratch_len());
                inv_d1.process_with_scratch(col, scratch);
            });
        });

    // Step 2: per row, the half-spectrum h[w] = H_w[j] and one C2R of length d2 — for the top rows
    // only: ΔW is even, ΔW[d1−j, k] = ΔW[j, (d2−k) mod d2], so the bottom rows are mirrored copies.
    let top = d1 / 2 + 1;
    let c2r = plans::real_inverse(d2);
    let bl = block_rows(top, half);
    let (out_top, out_bottom) = out.split_at_mut(top * d2);
    out_top
        .par_chunks_mut(bl * d2)
        .enumerate()
        .try_for_each(|(blk, out_blk)| {
            let j0 = blk * bl;
            let nb = out_blk.len() / d2;
            plans::with_buffers(|b| {
                let h = plans::sized(&mut b.complex[0], nb * half);
                h.fill(Complex32::default());
                for (bin, &(w, _)) in bins.iter().enumerate() {
                    let src = &cols[bin * d1 + j0..bin * d1 + j0 + nb];
                    for (hr, &val) in h.chunks_exact_mut(half).zip(src) {
                        hr[w] = val;
                    }
                }
                let scratch = plans::sized(&mut b.scratch, c2r.get_scratch_len());
                for (hr, row_out) in h.chunks_exact_mut(half).zip(out_blk.chunks_exact_mut(d2)) {
                    fix_real_bins(hr, d2);
                    c2r.process_with_scratch(hr, row_out, scratch)
                        .map_err(plans::fft_error)?;
                }
                Ok::<(), Error>(())
            })
        })?;
    let out_top = &*out_top;
    out_bottom
        .par_chunks_mut(d2)
        .enumerate()
        .for_each(|(i, row)| {
            let src = &out_top[(d1 - top - i) * d2..(d1 - top - i + 1) * d2];
            row[0] = src[0];
            for (o, s) in row[1..].iter_mut().zip(src[1..].iter().rev()) {
                *o = *s;
            }
        });
    if let Some(base) = base {
        out.par_chunks_mut(d2)
            .zip(base.par_chunks(d2))
            .for_each(|(o, b)| {
                o.iter_mut().zip(b).for_each(|(o, b)| *o += b);
            });
    }
    Ok(())
}

/// Gradient of a loss with respect to the coefficients, given `grad = dL/dΔW` (row-major `d1×d2`):
/// `dL/dc_l = scaling/(d1·d2) · Σ_{j,k} grad[j,k] · cos(2π (u_l·j/d1 + v_l·k/d2))`.
///
/// ```
/// use fourierft::{internals::fft::delta_weight_grad, SpectralEntries};
/// let e = SpectralEntries::explicit(1, 4, &[(0, 1), (0, 0)])?;
/// let g = delta_weight_grad(&e, &[1.0, 0.0, 0.0, 0.0], 4.0)?;
/// assert!((g[0] - 1.0).abs() < 1e-6 && (g[1] - 1.0).abs() < 1e-6);
/// # Ok::<(), fourierft::Error>(())
/// ```
pub fn delta_weight_grad(
    entries: &SpectralEntries,
    grad: &[f32],
    scaling: f64,
) -> Result<Vec<f32>> {
    let (d1, d2) = entries.shape();
    check_len("gradient of ΔW (flattened)", grad.len(), d1 * d2)?;
    let groups = entries.column_groups();
    let m = groups.columns.len();
    let half = d2 / 2 + 1;
    let s = phase::scale(scaling, d1, d2) as f32;

    // Stage 1: per block of the top rows, Σ_k g̃[j,k] e^{+2πi v k/d2} at the m columns, stored
    // [m][rows]. The basis is even (cos θ(d1−j, k) = cos θ(j, (d2−k) mod d2)), so each bottom
    // row is folded, mirrored, onto its top partner: g̃[j] = grad[j] + mirror(grad[d1−j]).
    let top = d1 / 2 + 1;
    let r2c = plans::real_forward(d2);
    let bl = block_rows(top, half);
    let starts: Vec<usize> = (0..top).step_by(bl).collect();
    let blocks: Vec<Vec<Complex32>> = starts
        .par_iter()
        .map(|&j0| {
            let nb = bl.min(top - j0);
            let mut t = vec![Complex32::default(); m * nb];
            plans::with_buffers(|b| {
                let spec = plans::sized(&mut b.complex[0], half);
                let input = plans::sized(&mut b.real[0], d2);
                let scratch = plans::sized(&mut b.scratch, r2c.get_scratch_len());
                for r in 0..nb {
                    let j = j0 + r;
                    input.copy_from_slice(&grad[j * d2..(j + 1) * d2]);
                    let partner = d1 - j;
                    if j > 0 && partner > j {
                        let mirror = &grad[partner * d2..(partner + 1) * d2];
                        input[0] += mirror[0];
                        for (x, y) in input[1..].iter_mut().zip(mirror[1..].iter().rev()) {
                            *x += y;
                        }
                    }
                    r2c.process_with_scratch(input, spec, scratch)
                        .map_err(plans::fft_error)?;
                    for (g, &v) in groups.columns.iter().enumerate() {
                        t[g * nb + r] = plus_dft_at(spec, v as usize, d2);
                    }
                }
                Ok::<_, Error>(())
            })?;
            Ok(t)
        })
        .collect::<Result<_>>()?;

    // Stage 2: per column, the inverse FFT over rows, gathered at the column's entries.
    let inv_d1 = plans::complex_inverse(d1);
    let rows = entries.rows();
    let per_group: Vec<Vec<(u32, f32)>> = (0..m)
        .into_par_iter()
        .map(|g| {
            plans::with_buffers(|b| {
                let col = plans::sized(&mut b.complex[0], d1);
                col[top..].fill(Complex32::default());
                let mut j0 = 0;
                for t in &blocks {
                    let nb = t.len() / m;
                    col[j0..j0 + nb].copy_from_slice(&t[g * nb..(g + 1) * nb]);
                    j0 += nb;
                }
                let scratch = plans::sized(&mut b.scratch, inv_d1.get_inplace_scratch_len());
                inv_d1.process_with_scratch(col, scratch);
                groups.entries[groups.offsets[g]..groups.offsets[g + 1]]
                    .iter()
                    .map(|&l| (l, col[rows[l as usize] as usize].re * s))
                    .collect()
            })
        })
        .collect();
    let mut out = vec![0f32; entries.len()];
    for (l, val) in per_group.into_iter().flatten() {
        out[l as usize] = val;
    }
    Ok(out)
}
