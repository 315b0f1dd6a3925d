//! A linear layer whose weight and bias are never trained (its backward returns only dL/dx).

use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::kernels::ROWS_PER_TASK;
use crate::storage::{as_rows, reshaped};

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
        let (inp, out) = (dims[dims.len() - 1], self.weight.dim(0)?);
        let _ = inp;
        let x2 = as_rows(x)?;
        let y = fourierft::ops::frozen_linear(&x2, &self.weight, self.bias.as_ref())
            .map_err(fourierft::Error::into_candle)?;
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = out;
        reshaped(&y, &out_dims)
    }
}

/// The bias of a frozen linear layer as a vector of `out` values (zeros without one).
pub(crate) fn bias_vec(proj: &FrozenLinear, out: usize) -> candle_core::Result<Vec<f32>> {
    match &proj.bias {
        Some(b) => b.to_vec1::<f32>(),
        None => Ok(vec![0f32; out]),
    }
}

/// `rows[t] = init[t] + bias` for every row `t` (of `bias.len()` values), in parallel.
pub(crate) fn rows_plus_bias(init: &[f32], bias: &[f32]) -> Vec<f32> {
    let n = bias.len();
    let mut out = crate::kernels::par_zeros(init.len());
    out.par_chunks_mut(n * ROWS_PER_TASK)
        .zip(init.par_chunks(n * ROWS_PER_TASK))
        .for_each(|(oc, ic)| {
            for (or, ir) in oc.chunks_mut(n).zip(ic.chunks(n)) {
                for ((o, i), b) in or.iter_mut().zip(ir).zip(bias) {
                    *o = i + b;
                }
            }
        });
    out
}
