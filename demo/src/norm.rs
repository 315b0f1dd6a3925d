//! Layer norm with frozen gain and bias as one op with a hand-written backward (candle's fused
//! `LayerNorm` has none).

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Shape, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::kernels::{sum8, ROWS_PER_TASK};
use crate::profile;
use crate::storage::{cpu_f32, to_candle, with_f32};

/// Layer norm over the last dim with frozen gain and bias, hand-written with its backward:
/// dL/dx = rstd·(g' − mean(g') − x̂·mean(g'·x̂)), g' = g·γ.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub(crate) weight: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    pub fn load(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?.to_vec1::<f32>()?;
        let bias = vb.get(dim, "bias")?.to_vec1::<f32>()?;
        Ok(Self {
            weight,
            bias,
            eps: eps as f32,
        })
    }

    /// The same layer norm composed of candle ops (differentiable, slower): for tests.
    pub fn forward_composed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let n = self.weight.len();
        let w = Tensor::from_slice(&self.weight, n, x.device())?;
        let b = Tensor::from_slice(&self.bias, n, x.device())?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps as f64)?.sqrt()?)?;
        xn.broadcast_mul(&w)?.broadcast_add(&b)
    }
}

/// Mean and 1/std of one row.
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = sum8(row.iter().copied()) / n;
    let var = sum8(row.iter().map(|v| (v - mean) * (v - mean))) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl LayerNorm {
    /// `LN(x)` over rows of the layer's width, in parallel, into a new buffer.
    pub(crate) fn forward_rows(&self, x: &[f32]) -> Vec<f32> {
        let n = self.weight.len();
        let mut y = crate::kernels::par_zeros(x.len());
        y.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_mut(n).zip(xc.chunks(n)) {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    for i in 0..n {
                        yr[i] = (xr[i] - mean) * rstd * self.weight[i] + self.bias[i];
                    }
                }
            });
        y
    }

    /// `dL/dx` from the input `x` and `g = dL/dy`, over rows, in parallel, into a new buffer.
    pub(crate) fn backward_rows(&self, x: &[f32], g: &[f32]) -> Vec<f32> {
        let n = self.weight.len();
        let mut dx = crate::kernels::par_zeros(x.len());
        dx.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .zip(g.par_chunks(n * ROWS_PER_TASK))
            .for_each(|((dc, xc), gc)| {
                for ((dr, xr), gr) in dc.chunks_mut(n).zip(xc.chunks(n)).zip(gc.chunks(n)) {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    let w = &self.weight;
                    let sg = sum8((0..n).map(|i| gr[i] * w[i]));
                    let sgx = sum8((0..n).map(|i| gr[i] * w[i] * (xr[i] - mean) * rstd));
                    let (mg, mgx) = (sg / n as f32, sgx / n as f32);
                    for i in 0..n {
                        let xh = (xr[i] - mean) * rstd;
                        dr[i] = rstd * (gr[i] * w[i] - mg - xh * mgx);
                    }
                }
            });
        dx
    }
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "layer-norm")?;
        Ok((CpuStorage::F32(self.forward_rows(x)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let start = profile::Stamp::now();
        let dx =
            with_f32(x, |x| with_f32(g, |g| Ok(self.backward_rows(x, g)))).map_err(to_candle)?;
        if profile::enabled() {
            profile::add("embeddings + norm (bwd)", start);
        }
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }
}
