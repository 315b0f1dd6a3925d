//! The [`VarBuilder`](candle_nn::VarBuilder) backend of an
//! [`AdapterContext`](super::AdapterContext).

use super::channel;
use super::trained::TrainedTensors;
use crate::peft::PeftAdapter;
use crate::serve::{extra_tensor, Request, Serve};
use crate::sync::lock;
use candle_core::{DType, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// Serves a model built through a context, in this order:
///
/// 1. the reserved channel name: the context's id ([`channel`]), which is how the constructors
///    find the context;
/// 2. tensors the context trains in full ([`TrainedTensors`]): a `Var` made from the loaded
///    adapter's tensor of that name, else from the base;
/// 3. the loaded adapter's extra tensors (trained biases, `modules_to_save`), replacing the base
///    tensors of the same name;
/// 4. everything else from the base, unchanged.
///
/// Weights are never merged here: the constructors wrap them into layers that carry the
/// adapter.
pub(super) struct ContextBackend<'a> {
    pub(super) base: VarBuilder<'a>,
    pub(super) id: u32,
    pub(super) loaded: Option<Arc<PeftAdapter>>,
    /// Names of the loaded adapter's extra tensors the model asked for (for `check`).
    pub(super) used: Arc<Mutex<BTreeSet<String>>>,
    pub(super) trained: Arc<TrainedTensors>,
}

impl ContextBackend<'_> {
    /// The loaded adapter's extra tensor replacing base tensor `name`, if it has one.
    fn replacement(&self, name: &str, shape: Option<&Shape>) -> Result<Option<Tensor>> {
        match &self.loaded {
            Some(a) if a.extra_tensors().contains_key(name) => {
                Ok(Some(extra_tensor(a, name, name, shape)?))
            }
            _ => Ok(None),
        }
    }
}

impl Serve for ContextBackend<'_> {
    fn base(&self) -> &VarBuilder<'_> {
        &self.base
    }

    fn serve(&self, req: Request) -> Result<Tensor> {
        let name = req.name;
        if channel::is_key(name) {
            return channel::answer(self.id);
        }
        if self.trained.trains(name) {
            let init = |dt: DType| match self.replacement(name, req.shape)? {
                Some(t) => t.to_dtype(dt),
                None => req.base(dt),
            };
            let var = self.trained.var(name, req.dtype, req.device, init)?;
            lock(&self.used).insert(name.to_string());
            return Ok(var.as_tensor().clone());
        }
        if let Some(t) = self.replacement(name, req.shape)? {
            lock(&self.used).insert(name.to_string());
            return t.to_dtype(req.dtype)?.to_device(req.device);
        }
        req.base(req.dtype)?.to_device(req.device)
    }

    fn adds(&self, name: &str) -> bool {
        channel::is_key(name)
            || self
                .loaded
                .as_ref()
                .is_some_and(|a| a.extra_tensors().contains_key(name))
    }
}
