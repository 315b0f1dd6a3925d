//! candle operations with autograd: ΔW from the coefficients ([`delta_weight`]).

mod delta_weight;

pub use delta_weight::{delta_weight, DeltaWeight};
