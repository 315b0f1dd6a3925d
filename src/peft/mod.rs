//! Hugging Face PEFT interoperability: adapter directories in PEFT's format, PEFT's module
//! matching rules, and merging an adapter into a safetensors checkpoint.
//!
//! An adapter directory holds `adapter_config.json` (a [`FourierFTConfig`](crate::FourierFTConfig)
//! as JSON) and `adapter_model.safetensors` (one f32 `[n]` tensor
//! `base_model.model.<module path>.fourierft_spectrum` per adapted module). Entry positions are
//! not stored; they are regenerated bit-exactly from `random_loc_seed`. See [`PeftAdapter`] for
//! files, [`ModuleMatcher`] for `target_modules` and friends, [`merge_safetensors`] for the
//! offline merge behind `fourierft merge`, and [`crate::inject`] / [`crate::backend`] for using
//! an adapter with a model.

mod adapter;
mod io;
mod merge;
mod orientation;
mod parse;
mod pickle;
mod prefix;
mod target;

pub(crate) use adapter::base_layer_key;
pub use adapter::{
    adapter_dir, spectrum_key, PeftAdapter, BIN_WEIGHTS_FILE, CONFIG_FILE, KEY_PREFIX,
    PEFT_FORMAT_VERSION, SPECTRUM_SUFFIX, WEIGHTS_FILE,
};
pub use merge::{merge_safetensors, merge_safetensors_bytes, merge_safetensors_with, MergeSummary};
pub use orientation::{Orientation, StoredShape, CONV1D_MODEL_TYPES, CONV1D_MODULES};
pub use prefix::prefix_hint;
pub use target::ModuleMatcher;
