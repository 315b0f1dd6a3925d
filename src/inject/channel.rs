//! How an [`AdapterContext`](super::AdapterContext) travels inside a [`VarBuilder`]: the one
//! indirect step between [`AdapterContext::var_builder`](super::AdapterContext::var_builder) and
//! the constructors ([`super::linear`] and friends).
//!
//! # Why a named tensor and a registry
//!
//! The constructors take a plain `candle_nn::VarBuilder` (so a model written against them also
//! builds with no adapter), and candle-nn 0.11 gives no way back from a `VarBuilder` to its
//! backend: the backend sits in a private field (`VarBuilderArgs::data`, an `Arc<TensorData>`
//! whose `backend` field is private too), no method returns it, and `SimpleBackend` has no
//! `as_any` to downcast through. The only things a `VarBuilder` answers are tensors by name
//! (`contains_tensor`, `get*`), dtype, device and prefix. So the context's backend answers one
//! reserved name, [`KEY`], at any prefix, with a `u32` scalar: the context's id; the id is looked
//! up here in a process-wide map of weak references. The map holds no context alive: a context
//! unregisters itself when its last handle is dropped, and a stale id finds nothing.

use super::context::Inner;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

/// The tensor name under which a context's backend answers its context id.
const KEY: &str = "__fourierft_adapter_context__";

fn registry() -> MutexGuard<'static, HashMap<u32, Weak<Inner>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<u32, Weak<Inner>>>> = OnceLock::new();
    crate::sync::lock(REGISTRY.get_or_init(Default::default))
}

/// A fresh id for a context under construction; [`register`] it once built.
pub(super) fn next_id() -> u32 {
    static NEXT_ID: AtomicU32 = AtomicU32::new(1);
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Makes `inner` findable by its id.
pub(super) fn register(id: u32, inner: &Arc<Inner>) {
    registry().insert(id, Arc::downgrade(inner));
}

/// Forgets context `id` (called when it is dropped).
pub(super) fn unregister(id: u32) {
    registry().remove(&id);
}

/// Whether `name` (a full path, any prefix) asks for the context id.
pub(super) fn is_key(name: &str) -> bool {
    name.strip_suffix(KEY)
        .is_some_and(|head| head.is_empty() || head.ends_with('.'))
}

/// What the backend of context `id` answers to [`KEY`].
pub(super) fn answer(id: u32) -> candle_core::Result<Tensor> {
    Tensor::new(id, &Device::Cpu)
}

/// The context whose backend `vb` is built on, if any and still alive.
pub(super) fn find(vb: &VarBuilder) -> Option<Arc<Inner>> {
    if !vb.contains_tensor(KEY) {
        return None;
    }
    let id = vb
        .get_unchecked_dtype(KEY, DType::U32)
        .ok()?
        .to_scalar::<u32>()
        .ok()?;
    registry().get(&id)?.upgrade()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_answered_at_any_prefix_only() {
        assert!(is_key(KEY));
        assert!(is_key(&format!("encoder.layer.0.{KEY}")));
        assert!(!is_key(&format!("x{KEY}")));
        assert!(!is_key("weight"));
    }

    #[test]
    fn a_plain_var_builder_carries_no_context() {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        assert!(find(&vb).is_none());
        assert!(find(&vb.pp("a")).is_none());
    }

    #[test]
    fn a_dropped_context_is_not_found() -> crate::Result<()> {
        let config = crate::FourierFTConfig {
            target_modules: Some(crate::config::ModuleSelector::Names(vec!["fc".into()])),
            ..Default::default()
        };
        let ctx = super::super::AdapterContext::new(config)?;
        let vb = ctx.var_builder(VarBuilder::zeros(DType::F32, &Device::Cpu));
        assert!(find(&vb.pp("fc")).is_some());
        drop(ctx);
        assert!(find(&vb.pp("fc")).is_none());
        Ok(())
    }
}
