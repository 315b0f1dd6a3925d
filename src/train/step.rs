//! One training step: `dL/dW` → `dL/dc` by the pruned-FFT gradient, the optimizer on `c`, and
//! the weights refreshed in place; plus the checks every training call repeats.

use super::{copy_error, State, StockTrainer, TrainedLayer};
use crate::config::shown_selector;
use crate::error::{Error, Result};
use crate::layer::LayerAdapter;
use crate::ops::DeltaWeight;
use crate::spectral::fft;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

impl StockTrainer {
    /// Checks the model built through [`var_builder`](Self::var_builder): nothing went wrong
    /// while serving weights, the configuration matched at least one weight, a loaded adapter's
    /// modules were all loaded, and gradients can flow through candle-nn's fused ops. Call it
    /// once the model is built; the training calls repeat the first three checks.
    ///
    /// # Errors
    /// The recorded serving error ([`Error::Shape`], [`Error::DType`], [`Error::EntryCount`],
    /// [`Error::File`] naming the module); [`Error::Config`] when nothing matched (listing some
    /// weights the model asked for) or when candle-nn's fused ops have no backward;
    /// [`Error::File`] naming a module of a loaded adapter the model never loaded.
    pub fn check(&self) -> Result<()> {
        self.check_state(&self.state())?;
        fused_ops_have_backward()
    }

    pub(super) fn check_state(&self, st: &State) -> Result<()> {
        if let Some(e) = &st.error {
            return Err(copy_error(e));
        }
        if st.layers.is_empty() {
            let shown: Vec<&String> = st.requested.iter().take(8).collect();
            return Err(Error::Config(format!(
                "target_modules {} matched none of the {} weight matrices the model asked for \
                 (e.g. {shown:?})",
                shown_selector(self.config().target_modules.as_ref()),
                st.requested.len()
            )));
        }
        if let Some(adapter) = &self.inner.loaded {
            if let Some(path) = adapter
                .spectra()
                .keys()
                .find(|p| !st.layers.contains_key(*p))
            {
                return Err(Error::File {
                    path: adapter
                        .source()
                        .map_or_else(|| PathBuf::from("adapter"), Path::to_path_buf),
                    message: format!(
                        "module {path:?} has a saved spectrum but the model never loaded \
                         \"{path}.weight\"; the adapter does not fit this model"
                    ),
                });
            }
        }
        Ok(())
    }

    /// `loss.backward()` with each adapted weight's gradient turned into its spectrum's: the
    /// returned store holds `dL/dc` for every spectrum (and no `dL/dW`), ready for
    /// [`Optimizer::step`]. Call [`sync`](Self::sync) after the step.
    ///
    /// Several threads may call it at once, each on its own loss (gradient accumulation over
    /// micro-batches run in parallel): the trainer's lock is not held while candle runs the
    /// backward pass, only while the weights' gradients are turned into the spectra's.
    ///
    /// Applies the subnormal policy ([`crate::runtime::ensure_flush_policy`]) to the calling
    /// thread and its rayon pool first, as the backward of this crate's own ops does.
    ///
    /// # Errors
    /// Those of [`check`](Self::check) (without the fused-op probe); [`Error::MergeState`] when
    /// unmerged or when a spectrum changed since [`sync`](Self::sync); [`Error::Config`] naming
    /// a module no gradient reached (e.g. an unpatched candle-nn).
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        // The stock model's backward runs candle's kernels, not this crate's ops: flush
        // subnormals here too (see the runtime module for why the allocator is left alone).
        crate::runtime::ensure_flush_policy();
        self.ready(&self.state())?;
        let mut grads = loss.backward()?;
        let st = self.state();
        let mut work = Vec::with_capacity(st.layers.len());
        for (path, layer) in &st.layers {
            let Some(g) = grads.remove(layer.weight.as_tensor()) else {
                return Err(Error::Config(format!(
                    "{path}: no gradient reached {:?}; the loss does not depend on it, or the \
                     model's forward goes through an op without backward (candle-nn 0.11's fused \
                     softmax_last_dim / rms_norm / layer_norm / rope: see fourierft::train)",
                    layer.weight_name
                )));
            };
            work.push((layer, g));
        }
        // Layers in parallel: many small FFT jobs keep both cores busy, where one layer at a
        // time (each parallel inside) left them waiting on each other.
        let dcs: Vec<Result<Tensor>> = work
            .par_iter()
            .map(|(layer, g)| coeff_grad(&layer.adapter, g))
            .collect();
        for ((layer, _), dc) in work.iter().zip(dcs) {
            grads.insert(layer.adapter.spectrum().as_tensor(), dc?);
        }
        Ok(grads)
    }

    fn ready(&self, st: &State) -> Result<()> {
        self.check_state(st)?;
        if st.unmerged {
            return Err(Error::MergeState {
                what: format!("adapter {:?}", self.inner.name),
                message: "unmerged: the model runs W0; merge() before training".into(),
            });
        }
        for (path, layer) in &st.layers {
            if layer.adapter.spectrum().as_tensor().to_vec1::<f32>()? != layer.applied {
                return Err(Error::MergeState {
                    what: path.clone(),
                    message: "the spectrum changed since its weight was written; call sync() \
                              after the optimizer step"
                        .into(),
                });
            }
        }
        Ok(())
    }

    /// Writes `W0 + ΔW(c)` for the current spectra into the model's weights (`Var::set`), for
    /// the modules whose spectrum changed. A no-op while unmerged ([`merge`](Self::merge)
    /// writes them then).
    pub fn sync(&self) -> Result<()> {
        let mut st = self.state();
        if st.unmerged {
            return Ok(());
        }
        // Layers in parallel, as in `backward`.
        st.layers
            .values_mut()
            .collect::<Vec<_>>()
            .into_par_iter()
            .try_for_each(|layer| -> Result<()> {
                let c = layer.adapter.spectrum().as_tensor().to_vec1::<f32>()?;
                if c != layer.applied {
                    let delta: Vec<f32> =
                        c.iter().zip(&layer.applied).map(|(a, b)| a - b).collect();
                    add_delta(layer, &delta)?;
                    layer.applied = c;
                }
                Ok(())
            })
    }

    /// [`backward`](Self::backward), `opt.step`, [`sync`](Self::sync): one training step.
    pub fn backward_step<O: Optimizer>(&self, opt: &mut O, loss: &Tensor) -> Result<()> {
        let grads = self.backward(loss)?;
        opt.step(&grads)?;
        self.sync()
    }
}

/// `W += ΔW(delta)` in place.
pub(super) fn add_delta(layer: &TrainedLayer, delta: &[f32]) -> Result<()> {
    let w = layer.weight.as_tensor();
    let entries = layer.adapter.entries();
    let scaling = layer.adapter.scaling();
    let new = if w.device().is_cpu() {
        let base = w.flatten_all()?.to_vec1::<f32>()?;
        let v = fft::add_delta_weight(entries, delta, scaling, &base)?;
        Tensor::from_vec(v, w.shape(), w.device())?
    } else {
        let d = Tensor::from_slice(delta, delta.len(), w.device())?;
        (w + DeltaWeight::new(entries.clone()).forward(&d, scaling)?)?
    };
    layer.weight.set(&new)?;
    Ok(())
}

/// `dL/dc` from `dL/dW` (the pruned-FFT gradient of ΔW).
fn coeff_grad(adapter: &LayerAdapter, g: &Tensor) -> Result<Tensor> {
    let spectrum = adapter.spectrum().as_tensor();
    if g.device().is_cpu() {
        let gv = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let dc = fft::delta_weight_grad(adapter.entries(), &gv, adapter.scaling())?;
        return Ok(Tensor::from_vec(dc, dc_len(adapter), spectrum.device())?);
    }
    // Other devices: the delta-weight op's own backward, through a proxy `Σ ΔW ∘ g`.
    let c = Var::from_tensor(spectrum)?;
    let dw =
        DeltaWeight::new(adapter.entries().clone()).forward(c.as_tensor(), adapter.scaling())?;
    let proxy = (dw * g.detach().to_dtype(DType::F32)?)?.sum_all()?;
    let grads = proxy.backward()?;
    grads
        .get(c.as_tensor())
        .cloned()
        .ok_or_else(|| Error::Config("delta-weight op produced no gradient".into()))
}

fn dc_len(adapter: &LayerAdapter) -> usize {
    adapter.entries().len()
}

/// Whether candle-nn's fused ops used by stock models record a backward in this build.
pub(super) fn fused_ops_have_backward() -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0, 2.0, 0.25]], &dev)?)?;
    let alpha = Tensor::ones(4, DType::F32, &dev)?;
    let beta = Tensor::zeros(4, DType::F32, &dev)?;
    let probes: [(&str, Tensor); 3] = [
        (
            "softmax_last_dim",
            candle_nn::ops::softmax_last_dim(x.as_tensor())?,
        ),
        (
            "rms_norm",
            candle_nn::ops::rms_norm(x.as_tensor(), &alpha, 1e-5)?,
        ),
        (
            "layer_norm",
            candle_nn::ops::layer_norm(x.as_tensor(), &alpha, &beta, 1e-5)?,
        ),
    ];
    let w = Tensor::new(&[[1.0f32, -2.0, 3.0, 0.5]], &dev)?;
    for (name, y) in probes {
        let reached = (y * &w)?
            .sum_all()?
            .backward()?
            .get(x.as_tensor())
            .is_some();
        if !reached {
            return Err(Error::Config(format!(
                "candle-nn's fused {name} records no backward in this build, so stock models \
                 pass no gradient to their layers; patch candle-nn as this crate's Cargo.toml \
                 does ([patch.crates-io] candle-nn = {{ path = \"vendor/candle-nn\" }})"
            )));
        }
    }
    Ok(())
}
