//! FourierFT (Gao et al., ICML 2024) for [candle]: fine-tune a linear layer by training `n`
//! spectral coefficients instead of its `d1×d2` weight, bit-exact with Hugging Face PEFT.
//!
//! # The math
//!
//! An adapter on a frozen weight `W0` (`d1×d2` = out×in, as candle's `Linear` stores it) has `n`
//! fixed spectral entries `(u_l, v_l)`, trainable coefficients `c_l` and a scale `alpha`:
//!
//! ```text
//! ΔW[j,k] = alpha/(d1·d2) · Σ_l c_l · cos(2π (u_l·j/d1 + v_l·k/d2))      y = x·(W0 + ΔW)ᵀ + b
//! ```
//!
//! i.e. `alpha · Re(IDFT2(E∘c))`, PEFT's `torch.fft.ifft2(dense).real * scaling`. The entries come
//! from the same seeded `torch.randperm` PEFT uses ([`SpectralEntries::uniform`]), so PEFT's
//! adapter files load here unchanged.
//!
//! # Architecture (one concept per module, in dependency order)
//!
//! - [`entries`]: which spectral positions an adapter trains (PEFT-exact, frequency-biased or
//!   explicit), shared by layers of the same shape and seed.
//! - [`spectral`]: the phase convention ([`spectral::phase`]) and the math on plain slices: ΔW by
//!   a pruned real FFT ([`spectral::fft`]), the O(d log d) per-token product `x·ΔWᵀ` and the
//!   coefficient gradient from per-token spectra ([`spectral::forward`]), and the tensor-op path
//!   for CUDA/Metal ([`spectral::portable`]).
//! - [`ops`]: those as candle operations with autograd — including the adapted layer's training
//!   forward `x·(W0 + ΔW)ᵀ + b` as one op ([`ops::fourier_linear`]), whose backward forms no
//!   `d1×d2` weight gradient — plus a frozen-weight linear op whose backward skips the weight
//!   gradient.
//! - [`layer`]: [`FourierLinear`], a frozen `Linear` plus named adapters, with merge/unmerge,
//!   [`ForwardMode`] and mixed-adapter batches; [`linear`] builds one from a `VarBuilder`.
//! - [`peft`]: PEFT's adapter directories (config matching, load, save, merge).
//! - [`inject`]: model-level injection of FourierLinear layers by module path.
//! - [`backend`]: a `VarBuilder` backend serving merged weights to unmodified candle models.
//! - [`runtime`]: the CPU training policy (subnormals flushed to zero, freed buffers reused).
//! - [`train`]: training an adapter on an unmodified model ([`StockTrainer`]).
//!
//! # Quick start
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
pub mod layer;
pub mod ops;
pub mod peft;
pub mod runtime;
mod serve;
pub mod spectral;
mod sync;
pub mod train;

pub use backend::MergedBackend;
pub use config::FourierFTConfig;
pub use entries::{EntrySampling, SpectralEntries};
pub use error::{Error, Result};
pub use inject::AdapterContext;
pub use layer::{
    linear, linear_b, linear_no_bias, Adapter, ForwardMode, FourierLinear, DEFAULT_ADAPTER,
};
pub use peft::PeftAdapter;
pub use train::StockTrainer;
