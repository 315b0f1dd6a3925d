//! A linear layer whose weight and bias are never trained (its backward returns only dL/dx).

use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::gemm::{par_gemm_acc, Mat};
use crate::kernels::ROWS_PER_TASK;
use crate::storage::{as_rows, reshaped, to_candle, with_f32};

/// A linear layer whose weight and bias are never trained.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
}

impl FrozenLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: weight.detach(),
            bias: bias.map(|b| b.detach()),
        }
    }

    pub fn load(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self::new(
            vb.get((out_dim, in_dim), "weight")?,
            Some(vb.get(out_dim, "bias")?),
        ))
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for FrozenLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let out = self.weight.dim(0)?;
        let x2 = as_rows(x)?;
        let y = fourierft::ops::frozen_linear(&x2, &self.weight, self.bias.as_ref())
            .map_err(fourierft::Error::into_candle)?;
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = out;
        reshaped(&y, &out_dims)
    }
}

/// The bias of a frozen linear layer as a vector of `out` values (zeros without one).
fn bias_vec(proj: &FrozenLinear, out: usize) -> candle_core::Result<Vec<f32>> {
    match &proj.bias {
        Some(b) => b.to_vec1::<f32>(),
        None => Ok(vec![0f32; out]),
    }
}

/// `rows[t] = bias (+ init[t])` for `rows` rows of `bias.len()` values, in parallel.
fn bias_rows(rows: usize, bias: &[f32], init: Option<&[f32]>) -> Vec<f32> {
    let n = bias.len();
    let mut out = crate::kernels::par_zeros(rows * n);
    out.par_chunks_mut(n * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(c, oc)| {
            for (i, or) in oc.chunks_mut(n).enumerate() {
                match init {
                    Some(init) => {
                        let t = c * ROWS_PER_TASK + i;
                        for ((o, v), b) in or.iter_mut().zip(&init[t * n..(t + 1) * n]).zip(bias) {
                            *o = v + b;
                        }
                    }
                    None => or.copy_from_slice(bias),
                }
            }
        });
    out
}

impl FrozenLinear {
    /// `x·Wᵀ + b`, plus `residual` rows if given, for `x` `(tokens, in)`, as a new `(tokens, out)`
    /// buffer: bias (and residual) written first, the product accumulated onto them.
    pub(crate) fn project_rows(
        &self,
        x: &[f32],
        tokens: usize,
        residual: Option<&[f32]>,
    ) -> candle_core::Result<Vec<f32>> {
        let (out, inp) = self.weight.dims2()?;
        if x.len() != tokens * inp || residual.is_some_and(|r| r.len() != tokens * out) {
            candle_core::bail!(
                "projection ({out}, {inp}): input of {} values, residual of {:?}, {tokens} tokens",
                x.len(),
                residual.map(<[f32]>::len)
            );
        }
        let mut y = bias_rows(tokens, &bias_vec(self, out)?, residual);
        with_f32(&self.weight, |w| {
            par_gemm_acc(&mut y, x, tokens, inp, Mat::new("weight", w, out, inp)?.t())?;
            Ok(())
        })
        .map_err(to_candle)?;
        Ok(y)
    }

    /// `dst += g·W` for `g = dL/dy` `(tokens, out)`: the input gradient, accumulated into `dst`
    /// `(tokens, in)`.
    pub(crate) fn back_rows(
        &self,
        dst: &mut [f32],
        g: &[f32],
        tokens: usize,
    ) -> candle_core::Result<()> {
        let (out, inp) = self.weight.dims2()?;
        with_f32(&self.weight, |w| {
            par_gemm_acc(dst, g, tokens, out, Mat::new("weight", w, out, inp)?)?;
            Ok(())
        })
        .map_err(to_candle)
    }
}
