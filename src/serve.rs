//! What the crate's [`VarBuilder`] backends share: serving a request from a base `VarBuilder`
//! unless the backend decides otherwise, wrapping such a backend into a `VarBuilder` with the
//! base's dtype, device and prefix, and an adapter's extra tensor replacing a base tensor.
//!
//! The backends are [`crate::backend::MergedBackend`]'s (merged weights),
//! [`crate::inject`]'s (an [`AdapterContext`](crate::inject::AdapterContext) and its trained
//! tensors) and [`crate::train::StockTrainer`]'s (weights with adapters attached).

use crate::error::Error;
use crate::peft::PeftAdapter;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// A backend that serves tensors from a base [`VarBuilder`] (held at its root: requests arrive
/// with full names) and may serve some names otherwise.
pub(crate) trait Serve: Send + Sync {
    /// The base, at its root.
    fn base(&self) -> &VarBuilder<'_>;

    /// The tensor `req` asks for.
    fn serve(&self, req: Request) -> Result<Tensor>;

    /// Whether this backend serves `name` although the base has no such tensor.
    fn adds(&self, _name: &str) -> bool {
        false
    }
}

/// One request to a [`Serve`]: tensor `name` (a full path) in `dtype` on `device`, and the shape
/// the model asked for, when it gave one.
pub(crate) struct Request<'r> {
    pub(crate) name: &'r str,
    pub(crate) shape: Option<&'r Shape>,
    pub(crate) dtype: DType,
    pub(crate) device: &'r Device,
    load_base: &'r dyn Fn(DType) -> Result<Tensor>,
}

impl Request<'_> {
    /// The base's tensor of this name, in `dtype` (on the base's device).
    pub(crate) fn base(&self, dtype: DType) -> Result<Tensor> {
        (self.load_base)(dtype)
    }
}

/// The [`SimpleBackend`] of a [`Serve`].
struct Served<S>(S);

impl<S: Serve> SimpleBackend for Served<S> {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let base = self.0.base();
        self.0.serve(Request {
            name,
            shape: Some(&s),
            dtype,
            device: dev,
            load_base: &|dt| base.get_with_hints_dtype(s.clone(), name, h, dt),
        })
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let base = self.0.base();
        self.0.serve(Request {
            name,
            shape: None,
            dtype,
            device: dev,
            load_base: &|dt| base.get_unchecked_dtype(name, dt),
        })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.adds(name) || self.0.base().contains_tensor(name)
    }
}

/// A [`VarBuilder`] over the backend `make` builds from `base`'s root, with `base`'s dtype,
/// device and prefix (so a model built from it sees the same names as one built from `base`).
pub(crate) fn var_builder<'a, S: Serve + 'a>(
    base: &VarBuilder<'a>,
    make: impl FnOnce(VarBuilder<'a>) -> S,
) -> VarBuilder<'a> {
    let (dtype, device, prefix) = (base.dtype(), base.device().clone(), base.prefix());
    let vb = VarBuilder::from_backend(Box::new(Served(make(base.root()))), dtype, device);
    if prefix.is_empty() {
        vb
    } else {
        vb.set_prefix(prefix)
    }
}

/// The adapter's extra tensor `extra` replacing base tensor `name`, checked against the
/// requested shape.
pub(crate) fn extra_tensor(
    adapter: &PeftAdapter,
    extra: &str,
    name: &str,
    shape: Option<&Shape>,
) -> Result<Tensor> {
    let t = adapter
        .extra_tensors()
        .get(extra)
        .ok_or_else(|| candle_core::Error::msg(format!("missing extra tensor {extra}")))?;
    if let Some(shape) = shape.filter(|s| s.dims() != t.dims()) {
        return Err(Error::Shape {
            what: format!("{} replacing {name:?}", adapter.describe(extra)),
            expected: format!("{:?}", shape.dims()),
            found: format!("{:?}", t.dims()),
        }
        .into_candle());
    }
    Ok(t.clone())
}
