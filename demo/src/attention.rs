//! Multi-head self-attention as one op with a hand-written backward, and the same from candle
//! ops for tests.

use candle_core::{CpuStorage, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::gemm::{block, head_gemm};
use crate::kernels::{simd, sum8};
use crate::profile;
use crate::storage::{cpu_f32, slab, to_candle, with_f32};

/// Multi-head self-attention as one op on `(b, s, h)` query, key and value tensors: per sequence
/// and head, `P = softmax(Q·Kᵀ/√hd + mask)` and `O = P·V`, written straight into the `(b, s, h)`
/// output (no head split or merge copies). The backward recomputes nothing: from the saved `P`,
/// `dV = Pᵀ·dO`, `dS = P∘(dP − Σ dP∘P)/√hd` with `dP = dO·Vᵀ`, `dQ = dS·K`, `dK = dSᵀ·Q`.
/// Sequences run in parallel. The same attention from candle ops is [`attention_composed`].
struct Attention {
    heads: usize,
    /// Sequences in the batch (the inputs may also come as `(b·s, h)` rows).
    batch: usize,
    /// Additive key mask `(b, s)`: 0 for tokens, −1e9 for padding.
    mask: Vec<f32>,
    /// `P` `(b, heads, s, s)` from the forward, for the backward.
    probs: std::sync::OnceLock<Vec<f32>>,
}

impl Attention {
    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, s, h) = match *l.dims() {
            [b, s, h] => (b, s, h),
            [rows, h] if self.batch > 0 && rows.is_multiple_of(self.batch) => {
                (self.batch, rows / self.batch, h)
            }
            _ => candle_core::bail!("attention: {:?} for {} sequences", l.dims(), self.batch),
        };
        if b != self.batch || !h.is_multiple_of(self.heads) || self.mask.len() != b * s {
            candle_core::bail!(
                "attention: {:?} with {} heads and a mask of {}",
                l.dims(),
                self.heads,
                self.mask.len()
            );
        }
        Ok((b, s, h, h / self.heads))
    }
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, s, h, hd) = self.dims(ql)?;
        if kl.dims() != ql.dims() || vl.dims() != ql.dims() {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?}",
                ql.dims(),
                kl.dims(),
                vl.dims()
            );
        }
        let (q, k, v) = (
            cpu_f32(qs, ql, "query")?,
            cpu_f32(ks, kl, "key")?,
            cpu_f32(vs, vl, "value")?,
        );
        let scale = 1.0 / (hd as f32).sqrt();
        let heads = self.heads;
        let mut out = vec![0f32; b * s * h];
        let mut probs = vec![0f32; b * heads * s * s];
        out.par_chunks_mut(s * h)
            .zip(probs.par_chunks_mut(heads * s * s))
            .enumerate()
            .try_for_each(|(bi, (o, p))| {
                let (q, k, v) = (slab(q, bi, s * h), slab(k, bi, s * h), slab(v, bi, s * h));
                let mask = &self.mask[bi * s..(bi + 1) * s];
                let mut scores = vec![0f32; s * s];
                for (hi, p) in p.chunks_mut(s * s).enumerate() {
                    let c = hi * hd;
                    let (qh, kh) = (block(q, s, h, c, hd)?, block(k, s, h, c, hd)?);
                    head_gemm(&mut scores, s, qh, kh.t())?;
                    for (pr, sr) in p.chunks_mut(s).zip(scores.chunks(s)) {
                        simd::masked_softmax(pr, sr, mask, scale);
                    }
                    head_gemm(
                        &mut o[c..],
                        h,
                        block(p, s, s, 0, s)?,
                        block(v, s, h, c, hd)?,
                    )?;
                }
                Ok::<(), candle_core::Error>(())
            })?;
        profile::subnormals("attention (fwd)", &probs);
        let _ = self.probs.set(probs);
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let start = profile::Stamp::now();
        let (b, s, h, hd) = self.dims(q.layout())?;
        let probs = self
            .probs
            .get()
            .ok_or_else(|| candle_core::Error::msg("attention: backward before forward"))?;
        let scale = 1.0 / (hd as f32).sqrt();
        let heads = self.heads;
        let n = b * s * h;
        let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(grad, |g| {
                        dq.par_chunks_mut(s * h)
                            .zip(dk.par_chunks_mut(s * h))
                            .zip(dv.par_chunks_mut(s * h))
                            .enumerate()
                            .try_for_each(|(bi, ((dq, dk), dv))| {
                                let sl = |t| slab(t, bi, s * h);
                                let (q, k, v, g) = (sl(q), sl(k), sl(v), sl(g));
                                let p_all = &probs[bi * heads * s * s..(bi + 1) * heads * s * s];
                                let mut ds = vec![0f32; s * s];
                                for (hi, p) in p_all.chunks(s * s).enumerate() {
                                    let c = hi * hd;
                                    let pv = block(p, s, s, 0, s)?;
                                    let gh = block(g, s, h, c, hd)?;
                                    head_gemm(&mut dv[c..], h, pv.t(), gh)?;
                                    head_gemm(&mut ds, s, gh, block(v, s, h, c, hd)?.t())?;
                                    for (dr, pr) in ds.chunks_mut(s).zip(p.chunks(s)) {
                                        let dot = sum8(dr.iter().zip(pr).map(|(d, p)| d * p));
                                        for (d, p) in dr.iter_mut().zip(pr) {
                                            *d = scale * p * (*d - dot);
                                        }
                                    }
                                    let dsv = block(&ds, s, s, 0, s)?;
                                    head_gemm(&mut dq[c..], h, dsv, block(k, s, h, c, hd)?)?;
                                    head_gemm(&mut dk[c..], h, dsv.t(), block(q, s, h, c, hd)?)?;
                                }
                                Ok::<(), candle_core::Error>(())
                            })?;
                        Ok(())
                    })
                })
            })
        })
        .map_err(to_candle)?;
        if profile::enabled() {
            for d in [&dq, &dk, &dv] {
                profile::subnormals("attention (bwd)", d);
            }
            profile::add("attention (bwd)", start);
        }
        let t = |d: Vec<f32>| Tensor::from_vec(d, q.shape(), q.device());
        Ok((Some(t(dq)?), Some(t(dk)?), Some(t(dv)?)))
    }
}

/// Multi-head self-attention core on `(b, s, h)` tensors, or the same as `(b·s, h)` rows
/// ([`Attention`], one op; the output has the inputs' shape). `mask` is `(b, s)`, 1 for tokens
/// and 0 for padding.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let batch = mask.dim(0)?;
    let mask = mask
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|m| (1.0 - m) * -1e9)
        .collect();
    let op = Attention {
        heads,
        batch,
        mask,
        probs: std::sync::OnceLock::new(),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The same attention from candle ops only (`candle_nn::ops::softmax`): for tests.
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let (b, s, h) = q.dims3()?;
    let hd = h / heads;
    let split = |t: &Tensor| t.reshape((b, s, heads, hd))?.transpose(1, 2)?.contiguous();
    let neg = ((mask.ones_like()? - mask)? * -1e9)?.reshape((b, 1, 1, s))?;
    let q = (split(q)? * (1.0 / (hd as f64).sqrt()))?;
    let scores = q.matmul(&split(k)?.t()?)?.broadcast_add(&neg)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    probs
        .matmul(&split(v)?)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, s, h))
}
