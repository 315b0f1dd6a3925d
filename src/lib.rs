//! fourierft
#![deny(unsafe_code)]

pub mod config;
pub mod entries;
pub mod error;
pub mod layer;
pub mod ops;
pub mod spectral;

pub use config::FourierFTConfig;
pub use entries::{EntrySampling, SpectralEntries};
pub use error::{Error, Result};
pub use layer::{linear, linear_b, linear_no_bias, Adapter, FourierLinear, DEFAULT_ADAPTER};
