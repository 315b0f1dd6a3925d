//! The tensors a context trains in full besides the spectra.

use crate::peft::ModuleMatcher;
use crate::sync::lock;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// The tensors a context trains in full besides the spectra, as PEFT decides them
/// ([`ModuleMatcher::trains_in_full`]): every parameter of a `modules_to_save` module (e.g. a
/// classification head) and, with `bias = "all"` / `"fourier_only"`, biases. The model asks for
/// them through the context's [`VarBuilder`](candle_nn::VarBuilder) like any weight and gets a
/// [`Var`]'s tensor, so any candle model trains them without code changes.
#[derive(Debug)]
pub(super) struct TrainedTensors {
    matcher: ModuleMatcher,
    vars: Mutex<BTreeMap<String, Var>>,
}

impl TrainedTensors {
    pub(super) fn new(matcher: ModuleMatcher) -> Self {
        Self {
            matcher,
            vars: Mutex::default(),
        }
    }

    /// Whether model tensor `name` is trained in full.
    pub(super) fn trains(&self, name: &str) -> bool {
        self.matcher.trains_in_full(name)
    }

    /// The `Var` of tensor `name`, made from `init` on first request; a second request (e.g. a
    /// tied weight) gets the same `Var`.
    pub(super) fn var(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
        init: impl FnOnce(DType) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Var> {
        let mut vars = lock(&self.vars);
        if let Some(v) = vars.get(name) {
            return Ok(v.clone());
        }
        let v = Var::from_tensor(&init(dtype)?.to_device(device)?)?;
        vars.insert(name.to_string(), v.clone());
        Ok(v)
    }

    /// The `Var`s made so far, by tensor name.
    pub(super) fn vars(&self) -> BTreeMap<String, Var> {
        lock(&self.vars).clone()
    }
}
