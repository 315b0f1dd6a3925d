//! Serving the model its weights: adapted weights as `Var`s holding `W0 + ΔW(c)`, everything
//! else detached; problems recorded for [`StockTrainer::check`] instead of failing the model's
//! `load`.

use super::{State, StockTrainer, TrainedLayer};
use crate::config::{Bias, FourierFTConfig};
use crate::error::{dims_str, Error, Result};
use crate::layer::FourierLinear;
use crate::serve::{Request, Serve};
use candle_core::{DType, Tensor, Var};
use candle_nn::VarBuilder;

impl StockTrainer {
    /// Serves base tensor `name`: adapted when its module is targeted.
    fn serve(&self, name: &str, t: Tensor) -> Tensor {
        let mut st = self.state();
        if t.rank() == 2 {
            st.requested.push(name.to_string());
        }
        let Some(path) = name.strip_suffix(".weight") else {
            return t.detach();
        };
        if !self.inner.matcher.is_target(path) {
            return t.detach();
        }
        match self.adapt(&mut st, path, name, &t) {
            Ok(w) => w,
            Err(e) => {
                if st.error.is_none() {
                    st.error = Some(e);
                }
                t.detach()
            }
        }
    }

    fn adapt(&self, st: &mut State, path: &str, name: &str, w0: &Tensor) -> Result<Tensor> {
        if let Some(layer) = st.layers.get(path) {
            if layer.weight.dims() != w0.dims() {
                return Err(Error::Shape {
                    what: format!("{path}: adapted weight {name:?} asked for again"),
                    expected: dims_str(layer.weight.dims()),
                    found: dims_str(w0.dims()),
                });
            }
            return Ok(layer.weight.as_tensor().clone());
        }
        if w0.rank() != 2 {
            return Err(Error::Shape {
                what: format!("{path}: targeted weight {name:?} (FourierFT adapts linear layers)"),
                expected: "a 2-D (out_features, in_features) matrix".into(),
                found: dims_str(w0.dims()),
            });
        }
        if w0.dtype() != DType::F32 {
            return Err(Error::DType {
                what: format!("{path}: adapted weight {name:?} (load the base in f32 to train)"),
                expected: "f32".into(),
                found: w0.dtype(),
            });
        }
        let config = FourierFTConfig {
            n_frequency: self.inner.matcher.n_frequency(path),
            fan_in_fan_out: false,
            ..self.config().clone()
        };
        let adapter_name = &self.inner.name;
        let layer = FourierLinear::from_parts(w0.clone(), None, false)?.with_name(path);
        match &self.inner.loaded {
            Some(adapter) => {
                let spectrum = adapter
                    .spectrum(path)
                    .ok_or_else(|| adapter.missing_spectrum(path, ""))?;
                if spectrum.dims() != [config.n_frequency] {
                    return Err(Error::Shape {
                        what: format!(
                            "{path}: saved fourierft_spectrum for the {:?} weight",
                            w0.dims()
                        ),
                        expected: format!("[{}]", config.n_frequency),
                        found: dims_str(spectrum.dims()),
                    });
                }
                layer.add_adapter(
                    adapter_name,
                    &FourierFTConfig {
                        init_weights: true,
                        ..config
                    },
                )?;
                layer.set_spectrum(adapter_name, spectrum)?;
            }
            None => layer.add_adapter(adapter_name, &config)?,
        }
        let adapter = layer.adapter(adapter_name)?;
        let applied = adapter.spectrum().as_tensor().to_vec1::<f32>()?;
        let w = (w0.detach() + adapter.delta_weight()?.to_device(w0.device())?)?;
        let weight = Var::from_tensor(&w)?;
        let served = weight.as_tensor().clone();
        st.layers.insert(
            path.to_string(),
            TrainedLayer {
                weight_name: name.to_string(),
                weight,
                adapter,
                applied,
            },
        );
        Ok(served)
    }
}

/// Rejects configurations this trainer cannot honour on stock models.
pub(super) fn supported(config: &FourierFTConfig) -> Result<()> {
    if config.fan_in_fan_out {
        return Err(Error::Config(
            "fan_in_fan_out (GPT-2 Conv1D weights stored (in, out)) is not supported by \
             fourierft::train; use fourierft::inject::conv1d in the model"
                .into(),
        ));
    }
    if config.bias != Bias::None {
        return Err(Error::Config(format!(
            "bias {:?}: fourierft::train trains only the spectra (bias \"none\")",
            config.bias
        )));
    }
    if config
        .modules_to_save
        .as_ref()
        .is_some_and(|m| !m.is_empty())
    {
        return Err(Error::Config(
            "modules_to_save is not supported by fourierft::train".into(),
        ));
    }
    Ok(())
}

/// The backend behind [`StockTrainer::var_builder`].
pub(super) struct TrainBackend<'a> {
    pub(super) base: VarBuilder<'a>,
    pub(super) trainer: StockTrainer,
}

impl Serve for TrainBackend<'_> {
    fn base(&self) -> &VarBuilder<'_> {
        &self.base
    }

    fn serve(&self, req: Request) -> candle_core::Result<Tensor> {
        let t = req.base(req.dtype)?.to_device(req.device)?;
        Ok(self.trainer.serve(req.name, t))
    }
}
