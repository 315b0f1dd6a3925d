//! Linear layer
//!
//! This layer applies a linear transformation to the incoming data, `y = x@w.t() + b`.
//! The bias is optional. The `forward` method can be used to apply the layer, it supports input
//! with a batch dimension (so of shape `(b_sz, in_c)`) or without (of shape `(in_c,)`), the
//! output has shape `(b_sz, out_c)` and `(out_c,)` respectively.
//!
//! ```rust
//! use candle::{Tensor, Device::Cpu};
//! use candle_nn::{Linear, Module};
//! # fn main() -> candle::Result<()> {
//!
//! let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Cpu)?;
//! let layer = Linear::new(w, None); // Use no bias.
//! let xs = Tensor::new(&[[10f32, 100.]], &Cpu)?;
//! let ys = layer.forward(&xs)?;
//! assert_eq!(ys.to_vec2::<f32>()?, &[[210.0, 430.0, 650.0]]);
//! # Ok(()) }
//! ```
use candle::{CustomOp1, Layout, Result, Shape, Tensor};

#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// Patched for fourierft: `x · Wᵀ` for a weight that records no gradient (a frozen weight) and
/// an input that does. candle-core's matmul backward forms the gradient of both operands, so a
/// frozen weight's `dL/dW` — a product as large as the forward one — would be computed and then
/// kept, with its accumulation graph, until `backward` returns, although nothing can read it.
/// This op's backward forms only `dL/dx = dL/dy · W`. Same forward kernel as `Tensor::matmul`.
/// It takes the input at any rank (`(.., in)`, contiguous) and returns `(.., out)`: no
/// `reshape` nodes, each of which would cost a zero-filled buffer and an add in the backward.
struct FrozenWeightMatmul {
    /// `(out, in)`, untracked.
    weight: Tensor,
}

/// `x · Wᵀ` as one graph node for a weight that records a gradient (trainable): candle's path
/// (`reshape`, `w.t()`, `matmul`, `reshape`) records four nodes, three of which only move
/// gradients (each a zero-filled buffer and an add in the backward). Backward:
/// `dL/dx = dL/dy · W`, `dL/dW = (dL/dy)ᵀ · x`, over the rows of all leading dimensions.
struct TrackedWeightMatmul;

/// `(.., k) · Wᵀ` with candle's own matmul kernel, for any backend storage; the input must be
/// contiguous. Returns the storage and the output shape `(.., n)`.
fn matmul_wt<S: candle::backend::BackendStorage>(
    x: &S,
    x_layout: &Layout,
    w: &S,
    w_layout: &Layout,
) -> Result<(S, Shape)> {
    let dims = x_layout.dims();
    let k = *dims.last().unwrap_or(&0);
    let (n, k2) = w_layout.shape().dims2()?;
    if k != k2 || dims.is_empty() {
        candle::bail!("linear: input {dims:?} vs weight ({n}, {k2})")
    }
    if !x_layout.is_contiguous() {
        candle::bail!("linear: the input must be contiguous")
    }
    let m = x_layout.shape().elem_count() / k.max(1);
    let x2 = Layout::contiguous_with_offset((m, k), x_layout.start_offset());
    let out = x.matmul(w, (1, m, n, k), &x2, &w_layout.transpose(0, 1)?)?;
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    Ok((out, Shape::from(out_dims)))
}

/// `dL/dx = dL/dy · W` for `y = x · Wᵀ` at any rank. Detached: a gradient computed from tracked
/// tensors would otherwise record its ops and keep their inputs alive in candle's gradient
/// store until `backward` returns (candle computes no higher-order gradients).
fn input_grad(x: &Tensor, weight: &Tensor, grad_y: &Tensor) -> Result<Tensor> {
    let n = weight.dim(0)?;
    let m = grad_y.elem_count() / n.max(1);
    let dx = grad_y
        .detach()
        .contiguous()?
        .reshape((m, n))?
        .matmul(&weight.detach())?
        .reshape(x.shape())?;
    Ok(dx)
}

impl CustomOp1 for FrozenWeightMatmul {
    fn name(&self) -> &'static str {
        "frozen-weight-matmul"
    }

    fn cpu_fwd(&self, s: &candle::CpuStorage, l: &Layout) -> Result<(candle::CpuStorage, Shape)> {
        let (ws, wl) = self.weight.storage_and_layout();
        match &*ws {
            candle::Storage::Cpu(w) => matmul_wt(s, l, w, wl),
            _ => candle::bail!("frozen linear: weight and input on different devices"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle::CudaStorage,
        l: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let (ws, wl) = self.weight.storage_and_layout();
        match &*ws {
            candle::Storage::Cuda(w) => matmul_wt(s, l, w, wl),
            _ => candle::bail!("frozen linear: weight and input on different devices"),
        }
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle::MetalStorage,
        l: &Layout,
    ) -> Result<(candle::MetalStorage, Shape)> {
        let (ws, wl) = self.weight.storage_and_layout();
        match &*ws {
            candle::Storage::Metal(w) => matmul_wt(s, l, w, wl),
            _ => candle::bail!("frozen linear: weight and input on different devices"),
        }
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(input_grad(x, &self.weight, grad_y)?))
    }
}

impl candle::CustomOp2 for TrackedWeightMatmul {
    fn name(&self) -> &'static str {
        "tracked-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &candle::CpuStorage,
        l1: &Layout,
        s2: &candle::CpuStorage,
        l2: &Layout,
    ) -> Result<(candle::CpuStorage, Shape)> {
        matmul_wt(s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        matmul_wt(s1, l1, s2, l2)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle::MetalStorage,
        l1: &Layout,
        s2: &candle::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle::MetalStorage, Shape)> {
        matmul_wt(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k.max(1);
        // Detached, as in `input_grad`.
        let g2 = grad_y.detach().contiguous()?.reshape((m, n))?;
        let dw = g2.t()?.matmul(&x.detach().reshape((m, k))?)?;
        let dx = if x.track_op() {
            Some(g2.matmul(&w.detach())?.reshape(x.shape())?)
        } else {
            None
        };
        Ok((dx, Some(dw)))
    }
}

impl Linear {
    /// The patched paths: the input (any rank ≥ 1, made contiguous) through one op,
    /// [`FrozenWeightMatmul`] or [`TrackedWeightMatmul`].
    fn forward_one_node(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        if self.weight.track_op() {
            x.apply_op2(&self.weight.contiguous()?, TrackedWeightMatmul)
        } else {
            x.apply_op1(FrozenWeightMatmul {
                weight: self.weight.clone(),
            })
        }
    }
}

impl super::Module for Linear {
    fn forward(&self, x: &Tensor) -> candle::Result<Tensor> {
        if (x.track_op() || self.weight.track_op()) && x.rank() >= 1 {
            let y = self.forward_one_node(x)?;
            return match &self.bias {
                None => Ok(y),
                Some(bias) => y.broadcast_add(bias),
            };
        }
        // When possible, we avoid using a broadcasted matmul as it is much slower
        // than the standard matmul for the cuda and cpu backends.
        let x = match *x.dims() {
            [b1, b2, m, k] => {
                if x.is_contiguous() {
                    let w = self.weight.t()?;
                    x.reshape((b1 * b2 * m, k))?
                        .matmul(&w)?
                        .reshape((b1, b2, m, ()))?
                } else {
                    let w = self.weight.broadcast_left((b1, b2))?.t()?;
                    x.matmul(&w)?
                }
            }
            [bsize, m, k] => {
                if x.is_contiguous() {
                    let w = self.weight.t()?;
                    x.reshape((bsize * m, k))?
                        .matmul(&w)?
                        .reshape((bsize, m, ()))?
                } else {
                    let w = self.weight.broadcast_left(bsize)?.t()?;
                    x.matmul(&w)?
                }
            }
            _ => {
                let w = self.weight.t()?;
                x.matmul(&w)?
            }
        };
        match &self.bias {
            None => Ok(x),
            Some(bias) => x.broadcast_add(bias),
        }
    }
}

/// Create or initialize a new linear layer.
///
/// This uses some default names for weights and biases, namely `"weight"` and `"bias"`.
pub fn linear(in_dim: usize, out_dim: usize, vb: crate::VarBuilder) -> Result<Linear> {
    let init_ws = crate::init::DEFAULT_KAIMING_NORMAL;
    let ws = vb.get_with_hints((out_dim, in_dim), "weight", init_ws)?;
    let bound = 1. / (in_dim as f64).sqrt();
    let init_bs = crate::Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let bs = vb.get_with_hints(out_dim, "bias", init_bs)?;
    Ok(Linear::new(ws, Some(bs)))
}

/// Create or initialize a new linear layer without biases.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: crate::VarBuilder) -> Result<Linear> {
    let init_ws = crate::init::DEFAULT_KAIMING_NORMAL;
    let ws = vb.get_with_hints((out_dim, in_dim), "weight", init_ws)?;
    Ok(Linear::new(ws, None))
}

pub fn linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: crate::VarBuilder,
) -> Result<Linear> {
    if bias {
        linear(in_dim, out_dim, vb)
    } else {
        linear_no_bias(in_dim, out_dim, vb)
    }
}
