//! Patched for fourierft: one-pass CPU kernels for the backward of the fused ops (softmax over
//! the last dimension, rms/layer norm, SiLU) on contiguous f32 tensors.
//!
//! The generic backwards compose candle ops: each op allocates a full-size tensor, several run
//! on one thread, and candle's gradient store adds a zero-filled buffer per result. For a
//! transformer's attention probabilities (heads × tokens × tokens) that is a dozen passes over
//! tens of megabytes per layer. These kernels read their inputs once, write one result, and
//! split rows across rayon's threads. Other dtypes, devices and layouts keep the composed path
//! (the callers return `None` from here and fall back), so results there are unchanged.

use candle::{DType, Result, Storage, Tensor};
use rayon::prelude::*;

/// Elements per rayon task (whole rows, at least one): enough work to amortise scheduling.
const MIN_ELEMS_PER_TASK: usize = 16 * 1024;

/// Runs `f` on the f32 values of a contiguous CPU tensor; `None` for anything else.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if t.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (lo, hi) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(cpu) => {
            let values = cpu.as_slice::<f32>().ok()?;
            values.get(lo..hi).map(f)
        }
        _ => None,
    }
}

/// The f32 values of two contiguous CPU tensors of the same shape, or `None`.
fn with_f32_pair<R>(a: &Tensor, b: &Tensor, f: impl FnOnce(&[f32], &[f32]) -> R) -> Option<R> {
    if a.shape() != b.shape() {
        return None;
    }
    with_f32(a, |av| with_f32(b, |bv| f(av, bv)))?
}

fn rows_per_task(row: usize) -> usize {
    MIN_ELEMS_PER_TASK.div_ceil(row.max(1)).max(1)
}

/// `dL/dx = y ⊙ (g − Σ_last g ⊙ y)` for `y = softmax(x)` over the last dimension.
pub(crate) fn softmax_last_dim_bwd(y: &Tensor, g: &Tensor) -> Option<Result<Tensor>> {
    let d = *y.dims().last()?;
    if d == 0 {
        return None;
    }
    let dx = with_f32_pair(y, g, |y, g| {
        let mut dx = vec![0f32; y.len()];
        let per = rows_per_task(d) * d;
        dx.par_chunks_mut(per)
            .zip(y.par_chunks(per).zip(g.par_chunks(per)))
            .for_each(|(dx, (y, g))| {
                for ((dx, y), g) in dx.chunks_mut(d).zip(y.chunks(d)).zip(g.chunks(d)) {
                    let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                    for ((dx, y), g) in dx.iter_mut().zip(y).zip(g) {
                        *dx = y * (g - dot);
                    }
                }
            });
        dx
    })?;
    Some(Tensor::from_vec(dx, y.shape(), y.device()))
}

/// Backward of `y = α ⊙ (x − mean?) / sqrt(var + eps)` over the last dimension (`remove_mean`:
/// layer norm; otherwise rms norm): `(dL/dx, dL/dα)`, with `x̂ = (x − mean?)·r`,
/// `r = 1/sqrt(mean(x_c²) + eps)`, `ĝ = g ⊙ α`:
/// `dL/dx = r·(ĝ − x̂·mean(ĝ ⊙ x̂) − [remove_mean]·mean(ĝ))`, `dL/dα = Σ_rows g ⊙ x̂`.
pub(crate) fn norm_bwd(
    x: &Tensor,
    alpha: &Tensor,
    g: &Tensor,
    eps: f32,
    remove_mean: bool,
) -> Option<Result<(Tensor, Tensor)>> {
    let d = *x.dims().last()?;
    if d == 0 || alpha.dims() != [d] {
        return None;
    }
    let (dx, dalpha) = with_f32(alpha, |a| {
        with_f32_pair(x, g, |x, g| {
            let mut dx = vec![0f32; x.len()];
            let per = rows_per_task(d) * d;
            let dalpha = dx
                .par_chunks_mut(per)
                .zip(x.par_chunks(per).zip(g.par_chunks(per)))
                .map(|(dx, (x, g))| {
                    let mut da = vec![0f32; d];
                    let mut xhat = vec![0f32; d];
                    for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                        let n = d as f32;
                        let mean = if remove_mean {
                            x.iter().sum::<f32>() / n
                        } else {
                            0.0
                        };
                        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
                        let r = 1.0 / (var + eps).sqrt();
                        let (mut proj, mut gmean) = (0f32, 0f32);
                        for (((xh, x), g), a) in xhat.iter_mut().zip(x).zip(g).zip(a) {
                            *xh = (x - mean) * r;
                            proj += g * a * *xh;
                            gmean += g * a;
                        }
                        proj /= n;
                        gmean = if remove_mean { gmean / n } else { 0.0 };
                        for ((((dx, xh), g), a), da) in
                            dx.iter_mut().zip(&xhat).zip(g).zip(a).zip(da.iter_mut())
                        {
                            *dx = r * (g * a - xh * proj - gmean);
                            *da += g * xh;
                        }
                    }
                    da
                })
                .reduce(
                    || vec![0f32; d],
                    |mut s, p| {
                        s.iter_mut().zip(&p).for_each(|(s, p)| *s += p);
                        s
                    },
                );
            (dx, dalpha)
        })
    })??;
    let dx = Tensor::from_vec(dx, x.shape(), x.device());
    let dalpha = Tensor::from_vec(dalpha, d, alpha.device());
    Some(dx.and_then(|dx| Ok((dx, dalpha?))))
}

/// `silu(x) = x·σ(x)` elementwise, split across rayon's threads.
pub(crate) fn silu_fwd(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(MIN_ELEMS_PER_TASK)
        .zip(x.par_chunks(MIN_ELEMS_PER_TASK))
        .for_each(|(y, x)| {
            for (y, x) in y.iter_mut().zip(x) {
                *y = x / (1.0 + (-x).exp());
            }
        });
    y
}

/// `dL/dx = g ⊙ (σ(x) + y ⊙ (1 − σ(x)))` for `y = silu(x)`.
pub(crate) fn silu_bwd(x: &Tensor, y: &Tensor, g: &Tensor) -> Option<Result<Tensor>> {
    let dx = with_f32(x, |x| {
        with_f32_pair(y, g, |y, g| {
            if x.len() != y.len() {
                return None;
            }
            let mut dx = vec![0f32; x.len()];
            let per = MIN_ELEMS_PER_TASK;
            dx.par_chunks_mut(per)
                .zip(x.par_chunks(per).zip(y.par_chunks(per).zip(g.par_chunks(per))))
                .for_each(|(dx, (x, (y, g)))| {
                    for (((dx, x), y), g) in dx.iter_mut().zip(x).zip(y).zip(g) {
                        let s = 1.0 / (1.0 + (-x).exp());
                        *dx = g * (s + y * (1.0 - s));
                    }
                });
            Some(dx)
        })?
    })??;
    Some(Tensor::from_vec(dx, x.shape(), x.device()))
}
