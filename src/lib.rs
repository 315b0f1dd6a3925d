//! FourierFT (Gao et al., ICML 2024) for [candle]: fine-tune a linear layer by training `n`
//! spectral coefficients instead of its `d1×d2` weight, bit-exact with Hugging Face PEFT.
//!
//! # The math
//!
//! An adapter on a frozen weight `W0` (`d1×d2` = out×in, as candle's `Linear` stores it) has `n`
//! fixed spectral entries `(u_l, v_l)`, trainable coefficients `c_l` and a scale `scaling` (α in
//! the paper; the crate uses PEFT's name everywhere):
//!
//! ```text
//! ΔW[j,k] = scaling/(d1·d2) · Σ_l c_l · cos(2π (u_l·j/d1 + v_l·k/d2))      y = x·(W0 + ΔW)ᵀ + b
//! ```
//!
//! i.e. `scaling · Re(IDFT2(E∘c))`, PEFT's `torch.fft.ifft2(dense).real * scaling`. The entries
//! come from the same seeded `torch.randperm` PEFT uses ([`SpectralEntries::uniform`]), so PEFT's
//! adapter files load here unchanged. `docs/ARCHITECTURE.md` in the repository describes how the
//! crate is put together.
//!
//! # The five types you need
//!
//! | type | what for |
//! |---|---|
//! | [`FourierLinear`] | one adapted linear layer: train, merge, switch adapters |
//! | [`FourierFTConfig`] | PEFT's `adapter_config.json`, field for field |
//! | [`PeftAdapter`] | a PEFT adapter directory: load, inspect, save |
//! | [`AdapterContext`] | adapt a whole model you write (its `linear` calls become adapted layers); [`StockTrainer`] does the same for an unmodified candle-transformers model |
//! | [`MergedBackend`] | deploy: an unmodified model loads `W0 + ΔW` through its `VarBuilder` |
//!
//! ## [`FourierLinear`]: one adapted layer
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use fourierft::{FourierFTConfig, FourierLinear};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let base = candle_nn::Linear::new(Tensor::randn(0f32, 0.02, (64, 48), &dev)?, None);
//! let layer = FourierLinear::new(base, &FourierFTConfig { n_frequency: 100, ..Default::default() })?;
//! let mut opt = candle_nn::AdamW::new_lr(layer.trainable_vars(), 1e-2)?; // only c is trained
//! let x = Tensor::randn(0f32, 1.0, (8, 48), &dev)?;
//! let loss = layer.forward(&x)?.sqr()?.mean_all()?;
//! candle_nn::Optimizer::backward_step(&mut opt, &loss)?;
//! layer.merge()?; // fold ΔW into W0 for inference
//! # Ok(()) }
//! ```
//!
//! ## [`FourierFTConfig`]: PEFT's configuration
//!
//! ```
//! use fourierft::FourierFTConfig;
//! let json = r#"{"peft_type": "FOURIERFT", "n_frequency": 90, "scaling": 120.0,
//!                "target_modules": ["fc1", "fc2"], "n_frequency_pattern": {"fc2": 50}}"#;
//! let cfg: FourierFTConfig = serde_json::from_str(json)?;
//! cfg.validate()?;
//! assert_eq!((cfg.n_frequency, cfg.scaling, cfg.random_loc_seed), (90, 120.0, 777));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## [`PeftAdapter`]: an adapter directory PEFT wrote
//!
//! ```
//! use fourierft::PeftAdapter;
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/peft_mlp/adapter");
//! let adapter = PeftAdapter::load(dir)?;
//! assert_eq!(adapter.config().scaling, 120.0);
//! assert_eq!(adapter.spectrum("fc2").map(|c| c.dims().to_vec()), Some(vec![50]));
//! assert_eq!(adapter.num_coefficients(), 90 + 50);
//! # Ok::<(), fourierft::Error>(())
//! ```
//!
//! ## [`AdapterContext`]: adapt a model you write
//!
//! The model calls [`inject::linear`] where it would call `candle_nn::linear` (same arguments);
//! the layers the configuration targets come back as [`FourierLinear`].
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use fourierft::{config::ModuleSelector, inject, AdapterContext, FourierFTConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = FourierFTConfig {
//!     target_modules: Some(ModuleSelector::Names(vec!["fc1".into()])),
//!     n_frequency: 32,
//!     ..Default::default()
//! };
//! let ctx = AdapterContext::new(config)?;
//! let varmap = VarMap::new(); // or the pretrained weights
//! let vb = ctx.var_builder(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu));
//! let fc1 = inject::linear(8, 16, vb.pp("fc1"))?; // adapted: targeted
//! let fc2 = inject::linear(16, 4, vb.pp("fc2"))?; // a plain candle_nn::Linear
//! ctx.check()?;
//! assert_eq!((ctx.layer_paths(), fc2.fourier().is_none()), (vec!["fc1".to_string()], true));
//! let y = fc2.forward(&fc1.forward(&Tensor::ones((2, 8), DType::F32, &Device::Cpu)?)?)?;
//! assert_eq!(y.dims(), &[2, 4]);
//! // train ctx.trainable_vars(), then ctx.save_pretrained(dir) writes a PEFT directory
//! # Ok(()) }
//! ```
//!
//! [`StockTrainer`] trains an adapter on a model whose source you do not change (e.g.
//! `candle_transformers`' Llama): see [`train`].
//!
//! ## [`MergedBackend`]: deploy on an unmodified model
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::VarBuilder;
//! use fourierft::{MergedBackend, PeftAdapter};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/peft_mlp");
//! let dev = Device::Cpu;
//! let weights = candle_core::safetensors::load(format!("{fixture}/base.safetensors"), &dev)?;
//! let base = VarBuilder::from_tensors(weights, DType::F32, &dev);
//! let merged = MergedBackend::new(base, PeftAdapter::load(format!("{fixture}/adapter"))?);
//! // Any model code that loads its weights through a VarBuilder, here two candle_nn layers.
//! let (fc1, fc2) = merged.load(|vb| {
//!     Ok((candle_nn::linear(24, 40, vb.pp("fc1"))?, candle_nn::linear(40, 18, vb.pp("fc2"))?))
//! })?; // errors if the adapter does not fit the model
//! let y = fc2.forward(&fc1.forward(&Tensor::ones((1, 24), DType::F32, &dev)?)?.relu()?)?;
//! assert_eq!(y.dims(), &[1, 18]);
//! # Ok(()) }
//! ```
//!
//! # Which `linear`?
//!
//! Two constructor families follow `candle_nn`'s names (`linear`, `linear_no_bias`, `linear_b`):
//!
//! - [`linear`]`(in, out, &config, vb)` (in [`layer`]) **always** builds a [`FourierLinear`]
//!   with the given configuration: for model code that knows which layers it adapts.
//! - [`inject::linear`]`(in, out, vb)` has `candle_nn::linear`'s exact signature and builds a
//!   [`FourierLinear`] only where an [`AdapterContext`] in `vb` targets the layer's path, else a
//!   plain `candle_nn::Linear`: for model code that stays adapter-agnostic.
//!
//! # Modules (in dependency order)
//!
//! - [`entries`]: which spectral positions an adapter trains (PEFT-exact, frequency-biased or
//!   explicit), shared by layers of the same shape and seed.
//! - [`ops`]: the FourierFT math as candle operations with autograd (input first, then the
//!   adapter's entries, coefficients and `scaling`): ΔW ([`ops::delta_weight`]), the adapted
//!   layer's training forward `x·(W0 + ΔW)ᵀ + b` as one op ([`ops::fourier_linear`]), the
//!   O(d log d) per-token product ([`ops::spectral_linear`]) and a frozen-weight linear op.
//! - [`layer`]: [`FourierLinear`], a frozen `Linear` plus named adapters ([`LayerAdapter`]), with
//!   merge/unmerge, [`ForwardMode`] and mixed-adapter batches.
//! - [`peft`]: PEFT's adapter directories (config matching, load, save, merge into a checkpoint).
//! - [`inject`]: model-level injection of FourierLinear layers by module path.
//! - [`backend`]: [`MergedBackend`], merged weights for an unmodified model.
//! - [`train`]: [`StockTrainer`], training an adapter on an unmodified model.
//! - [`runtime`]: the CPU training policy (subnormals flushed to zero, freed buffers reused).
//!
//! # Errors and untrusted input
//!
//! Every fallible call returns [`Error`], whose variants name the layer, tensor or file at fault
//! (see its docs). Adapter files and checkpoints are untrusted input: [`PeftAdapter::load`] /
//! [`PeftAdapter::from_bytes`] and [`peft::merge_safetensors`] /
//! [`peft::merge_safetensors_bytes`] check every header, dtype, shape and value before using it
//! and are fuzzed (`fuzz/`); outputs are written to a temporary file and renamed, so a failure
//! leaves nothing half-written.
//!
//! # Cargo features
//!
//! `cuda`, `metal`, `mkl`, `accelerate` forward to candle; `cli` builds the `fourierft` binary
//! (merge and inspect adapter directories); `avx512` enables the `gemm` crate's AVX-512 kernels
//! (chosen at run time on CPUs that have them) for candle's matmul and the fused ops.
//!
//! [candle]: https://github.com/huggingface/candle
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod backend;
pub mod config;
pub mod entries;
pub mod error;
pub mod inject;
#[doc(hidden)]
pub mod internals;
pub mod layer;
pub mod ops;
pub mod peft;
pub mod runtime;
mod serve;
pub(crate) mod spectral;
mod sync;
pub mod train;

pub use backend::MergedBackend;
pub use config::FourierFTConfig;
pub use entries::{EntrySampling, SpectralEntries};
pub use error::{Error, Result};
pub use inject::AdapterContext;
pub use layer::{
    linear, linear_b, linear_no_bias, ForwardMode, FourierLinear, LayerAdapter, DEFAULT_ADAPTER,
};
pub use peft::PeftAdapter;
pub use train::StockTrainer;
