//! `FourierLinear`: a frozen linear layer plus one or more FourierFT adapters.
//!
//! One concept a file: [`handle`](FourierLinear) (the shared state, constructors, accessors),
//! `adapter` (the adapters a layer holds and which are active), `merge` (folding them into the
//! weight), `forward` (the forward pass and mixed-adapter batches), `mode` ([`ForwardMode`] and
//! its cost model) and `builders` ([`linear`] and friends, from a `VarBuilder`).

mod adapter;
mod builders;
mod forward;
mod handle;
mod merge;
mod mode;

pub use adapter::LayerAdapter;
pub(crate) use builders::base_parts;
pub use builders::{linear, linear_b, linear_no_bias};
pub use handle::{FourierLinear, DEFAULT_ADAPTER};
pub use mode::ForwardMode;
