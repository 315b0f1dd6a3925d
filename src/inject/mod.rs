//! Model-level injection: build any candle model so that every linear layer whose module path
//! the adapter configuration targets becomes a [`FourierLinear`](crate::FourierLinear), without
//! FourierFT code in the model.
//!
//! The model uses [`linear`] (or [`linear_no_bias`], [`linear_b`], [`conv1d`]) where it would use
//! `candle_nn::linear`; everything else stays as it is. An [`AdapterContext`] travels inside the
//! [`VarBuilder`](candle_nn::VarBuilder) made by [`AdapterContext::var_builder`]; the
//! constructors find it there and consult it with the layer's path (`vb.prefix()`). With a plain `VarBuilder` they build plain
//! `candle_nn::Linear` layers, exactly like `candle_nn::linear`.
//!
//! # From `var_builder` to the layer, in one sitting
//!
//! 1. [`AdapterContext::var_builder`] wraps the base `VarBuilder` in a `ContextBackend`
//!    (`backend.rs`): the base's tensors, plus the tensors the context trains in full and a loaded
//!    adapter's extra tensors, plus one reserved name answered with the context's id.
//! 2. The model calls [`linear`]`(in, out, vb.pp("fc1"))` (`linear.rs`), which reads the weight
//!    and bias from `vb` as `candle_nn::linear` does, then asks [`AdapterContext::from_var_builder`]
//!    for the context: that reads the reserved name and looks the id up (`channel.rs`, which also
//!    says why candle leaves no more direct way).
//! 3. Found, and targeting `vb.prefix()`: [`AdapterContext::adapt`] (`context.rs`) wraps the
//!    weight and bias into a [`FourierLinear`](crate::FourierLinear) with the context's adapter,
//!    registers it under its path and returns it; otherwise the constructor returns a plain `candle_nn::Linear`.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use fourierft::config::ModuleSelector;
//! use fourierft::inject::{self, AdaptableLinear, AdapterContext};
//! use fourierft::FourierFTConfig;
//!
//! // A model written once, with no FourierFT code besides `inject::linear`.
//! struct Mlp { fc1: AdaptableLinear, fc2: AdaptableLinear }
//! impl Mlp {
//!     fn new(vb: VarBuilder) -> candle_core::Result<Self> {
//!         let fc1 = inject::linear(8, 16, vb.pp("fc1"))?;
//!         let fc2 = inject::linear(16, 4, vb.pp("fc2"))?;
//!         Ok(Self { fc1, fc2 })
//!     }
//!     fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
//!         self.fc2.forward(&self.fc1.forward(x)?.relu()?)
//!     }
//! }
//!
//! let config = FourierFTConfig {
//!     target_modules: Some(ModuleSelector::Names(vec!["fc1".into()])),
//!     n_frequency: 32,
//!     init_seed: Some(0),
//!     ..Default::default()
//! };
//! let ctx = AdapterContext::new(config)?;
//! let varmap = VarMap::new(); // or the pretrained weights
//! let base = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let model = Mlp::new(ctx.var_builder(base))?;
//! ctx.check()?; // the configuration matched something, and a loaded adapter fits the model
//! assert_eq!(ctx.layer_paths(), vec!["fc1"]);
//! assert_eq!(ctx.trainable_vars().len(), 1); // give these to the optimizer
//! let y = model.forward(&Tensor::ones((2, 8), DType::F32, &Device::Cpu)?)?;
//! ctx.merge()?; // whole model; ctx.unmerge() takes it out again
//! # let dir = std::env::temp_dir().join(format!("fourierft-inject-doc-{}", std::process::id()));
//! ctx.save_pretrained(&dir)?; // a PEFT adapter directory
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod backend;
mod channel;
mod context;
mod linear;
mod trained;

pub use context::AdapterContext;
pub use linear::{conv1d, linear, linear_b, linear_no_bias, AdaptableLinear};
