//! The forward pass: input checks, the dispatch between the frozen base, the fused dense op and
//! the spectral product ([`ForwardMode`]), and mixed-adapter batches.

use super::adapter::LayerAdapter;
use super::handle::{FourierLinear, State};
use super::mode::ForwardMode;
use crate::error::{dims_str, Error, Result};
use crate::ops::{add_to_frozen, fourier_linear, frozen_linear, reshaped, spectral_linear};
use candle_core::{DType, Module, Tensor};

impl FourierLinear {
    /// Checks `x` is `(..., in_features)` with at least 2 dims, in the weight's dtype; returns the
    /// number of tokens.
    fn check_input(&self, x: &Tensor) -> Result<usize> {
        let dims = x.dims();
        if dims.len() < 2 || dims[dims.len() - 1] != self.in_features {
            return Err(Error::Shape {
                what: format!("input of {}", self.name),
                expected: format!("(batch, [seq,] {})", self.in_features),
                found: dims_str(dims),
            });
        }
        let dtype = self.read().weight.dtype();
        if x.dtype() != dtype {
            return Err(Error::DType {
                what: format!("input of {}", self.name),
                expected: format!("{dtype:?} (the dtype of its weight)"),
                found: x.dtype(),
            });
        }
        Ok(dims[..dims.len() - 1].iter().product())
    }

    /// The weight as `(out, in)` (a transposed view for `fan_in_fan_out`).
    pub(super) fn weight_out_in(&self, weight: &Tensor) -> Result<Tensor> {
        Ok(if self.fan_in_fan_out {
            weight.t()?
        } else {
            weight.clone()
        })
    }

    /// The frozen base `x·W0ᵀ + b` (W0 including merged adapters), for `x` `(tokens, in)`.
    fn base_forward(&self, st: &State, x2: &Tensor) -> Result<Tensor> {
        let (fused, trained) = split_bias(st);
        let y = frozen_linear(x2, &self.weight_out_in(&st.weight)?, fused)?;
        add_bias(y, trained)
    }

    /// `x·ΔWᵀ` of one adapter for `x` `(tokens, in)`, by `mode` (Auto resolved here).
    fn adapter_forward(
        &self,
        adapter: &LayerAdapter,
        x2: &Tensor,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let tokens = x2.dim(0)?;
        let entries = adapter.entries();
        if mode.resolve(entries, tokens, x2.device()) == ForwardMode::Spectral {
            spectral_linear(x2, entries, adapter.spectrum.as_tensor(), adapter.scaling)
        } else {
            let dw = adapter.delta_weight()?.to_dtype(x2.dtype())?;
            Ok(x2.matmul(&dw.t()?)?)
        }
    }

    /// `weight + Σ ΔW` over the active adapters, differentiable in their spectra only (ΔW summed
    /// in f32 and cast to the weight's dtype once).
    fn effective_weight(&self, st: &State) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for name in &st.active {
            let adapter = st
                .adapters
                .get(name)
                .ok_or_else(|| self.unknown(st, name))?;
            let dw = adapter.delta_weight()?;
            sum = Some(match sum {
                None => dw,
                Some(s) => (s + dw)?,
            });
        }
        let Some(dw) = sum else {
            return Ok(st.weight.clone());
        };
        let dw = if self.fan_in_fan_out { dw.t()? } else { dw };
        add_to_frozen(&dw.to_device(st.weight.device())?, &st.weight)
    }

    /// The forward pass with a typed error: `x` has shape `(..., in_features)` with at least 2 dims.
    ///
    /// Merged, disabled or without active adapters: the frozen base only (its backward computes
    /// `dL/dx` only). Otherwise, per [`ForwardMode`]: `Dense` multiplies by `W0 + Σ ΔW` (ΔW
    /// materialised once per call); `Spectral` adds each adapter's `x·ΔWᵀ` computed in
    /// O(d log d) per token to the frozen base; `Auto` picks the cheaper.
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor> {
        let tokens = self.check_input(x)?;
        let x2 = reshaped(x, &[tokens, self.in_features])?;
        let st = self.read();
        let active: Vec<&LayerAdapter> = st
            .active
            .iter()
            .filter_map(|a| st.adapters.get(a))
            .collect();
        let y = if st.disabled || !st.merged.is_empty() || active.is_empty() {
            self.base_forward(&st, &x2)?
        } else if crate::ops::half::is_half(st.weight.dtype()) {
            // f16/bf16: each adapter's x·ΔWᵀ in f32, added to the rounded base (`ops::half`).
            let base = self.base_forward(&st, &x2)?;
            let x32 = x2.to_dtype(DType::F32)?;
            let parts = active
                .iter()
                .map(|a| self.adapter_forward(a, &x32, st.mode));
            crate::ops::half::add_in_f32(&base, parts)?
        } else if ForwardMode::resolve_all(st.mode, &active, tokens, x.device())
            == ForwardMode::Dense
        {
            if let [a] = active[..] {
                let w = self.weight_out_in(&st.weight)?;
                let (c, scaling) = (a.spectrum.as_tensor(), a.scaling);
                let (fused, trained) = split_bias(&st);
                let y = fourier_linear(&x2, &w, fused, a.entries(), c, scaling)?;
                add_bias(y, trained)?
            } else {
                // One GEMM with W0 + ΔW: its weight gradient is exactly what ΔW's backward needs.
                let w = self.weight_out_in(&self.effective_weight(&st)?)?;
                let mut y = x2.matmul(&w.t()?)?;
                if let Some(b) = &st.bias {
                    y = y.broadcast_add(b)?;
                }
                y
            }
        } else {
            let mut y = self.base_forward(&st, &x2)?;
            for a in active {
                y = (y + self.adapter_forward(a, &x2, ForwardMode::Spectral)?)?;
            }
            y
        };
        let mut out_dims = x.dims().to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_features;
        Ok(reshaped(&y, &out_dims)?)
    }

    /// Forward for a batch whose rows use different adapters: row `b` of `x` (shape
    /// `(batch, ..., in_features)`) gets adapter `adapters[b]`, or none for `None`, without
    /// merging — one base model serving many adapters at once. Ignores the active set; not
    /// allowed while merged.
    ///
    /// ```
    /// use candle_core::{Device, Module, Tensor};
    /// use fourierft::{FourierFTConfig, FourierLinear};
    /// let dev = Device::Cpu;
    /// let base = candle_nn::Linear::new(Tensor::randn(0f32, 0.1, (6, 4), &dev)?, None);
    /// let layer = FourierLinear::new(base, &FourierFTConfig { n_frequency: 5, ..Default::default() })?;
    /// layer.add_adapter("b", &FourierFTConfig { n_frequency: 3, random_loc_seed: 1, ..Default::default() })?;
    /// let x = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
    /// let y = layer.forward_mixed(&x, &[Some("default"), None, Some("b")])?;
    /// assert_eq!(y.dims(), &[3, 6]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_mixed(&self, x: &Tensor, adapters: &[Option<&str>]) -> Result<Tensor> {
        let tokens = self.check_input(x)?;
        let batch = x.dim(0)?;
        if adapters.len() != batch {
            return Err(Error::Shape {
                what: format!("adapter list of a mixed batch for {}", self.name),
                expected: format!("{batch} entries (one per row of the input)"),
                found: format!("{} entries", adapters.len()),
            });
        }
        let st = self.read();
        self.ensure_unmerged(&st, "run a mixed-adapter batch")?;
        let x2 = reshaped(x, &[tokens, self.in_features])?;
        let mut y = self.base_forward(&st, &x2)?;
        let per_row = tokens / batch.max(1);
        let mut names: Vec<&str> = adapters.iter().flatten().copied().collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let adapter = st
                .adapters
                .get(name)
                .ok_or_else(|| self.unknown(&st, name))?;
            // Token indices of the rows that use this adapter.
            let idx: Vec<u32> = (0..batch)
                .filter(|&b| adapters[b] == Some(name))
                .flat_map(|b| (b * per_row..(b + 1) * per_row).map(|t| t as u32))
                .collect();
            let len = idx.len();
            let idx = Tensor::from_vec(idx, len, x.device())?;
            let xs = x2.index_select(&idx, 0)?;
            let delta = self.adapter_forward(adapter, &xs, st.mode)?;
            y = y.index_add(&idx, &delta, 0)?;
        }
        let mut out_dims = x.dims().to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_features;
        Ok(reshaped(&y, &out_dims)?)
    }
}

impl Module for FourierLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.try_forward(x).map_err(Error::into_candle)
    }
}

/// The bias split by whether it trains: a frozen bias is fused into the frozen/adapted ops
/// (which give it no gradient), a trained one (a [`Var`](candle_core::Var), e.g. with PEFT's `bias = "all"`) is
/// added afterwards so that it gets its gradient.
fn split_bias(st: &State) -> (Option<&Tensor>, Option<&Tensor>) {
    match &st.bias {
        Some(b) if b.is_variable() => (None, Some(b)),
        other => (other.as_ref(), None),
    }
}

/// `y + b` for a trained bias `b`, else `y`.
fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}
