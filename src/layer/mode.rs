//! [`ForwardMode`] and the cost model `Auto` decides by.

use super::adapter::Adapter;
use crate::entries::SpectralEntries;
use candle_core::Device;

/// How [`FourierLinear`]'s unmerged forward computes the adapters' contribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardMode {
    /// Materialise ΔW (pruned real FFT on CPU, tensor ops on GPU) and multiply by `W0 + ΔW`.
    Dense,
    /// `x·ΔWᵀ` per token in O(d log d) without forming ΔW (CPU only), added to the frozen base.
    Spectral,
    /// Spectral on CPU when it needs fewer operations than materialising ΔW, else Dense.
    #[default]
    Auto,
}

impl ForwardMode {
    /// Relative cost of a length-`len` real FFT, in units where a complex multiply-add is 1.
    fn fft_cost(len: usize) -> f64 {
        let l = len.max(2) as f64;
        0.5 * l * l.log2()
    }

    /// Estimated cost of the spectral product for `tokens` tokens with these entries. The
    /// per-token constant is the measured fixed overhead (copies, plan dispatch) at small d.
    fn spectral_cost(entries: &SpectralEntries, tokens: usize) -> f64 {
        let (d1, d2) = entries.shape();
        let per_token = Self::fft_cost(d1) + Self::fft_cost(d2) + entries.len() as f64 + 2000.0;
        tokens as f64 * per_token
    }

    /// Estimated cost of materialising ΔW with these entries (and adding it to the weight): one
    /// complex transform of length d1 per half-spectrum bin the entries reach, one real transform
    /// of length d2 per row of the top half (see [`crate::spectral::fft`]).
    fn dense_cost(entries: &SpectralEntries) -> f64 {
        let (d1, d2) = entries.shape();
        let bins = entries.column_groups().columns.len().min(d2 / 2 + 1);
        let rows = d1 / 2 + 1;
        bins as f64 * Self::fft_cost(d1) * 2.0 + rows as f64 * (Self::fft_cost(d2) + d2 as f64)
    }

    /// The concrete mode (`Dense` or `Spectral`) this one computes an adapter with `entries` for
    /// `tokens` tokens on `device`: `Auto` decided by the cost model, the others as they are.
    /// Public so that `examples/forward_crossover.rs` can hold the model against measurements.
    pub fn resolve(self, entries: &SpectralEntries, tokens: usize, device: &Device) -> Self {
        match self {
            ForwardMode::Auto if !device.is_cpu() => ForwardMode::Dense,
            ForwardMode::Auto
                if Self::spectral_cost(entries, tokens) < Self::dense_cost(entries) =>
            {
                ForwardMode::Spectral
            }
            ForwardMode::Auto => ForwardMode::Dense,
            other => other,
        }
    }

    /// The concrete mode for several adapters forwarded together.
    pub(super) fn resolve_all(self, adapters: &[&Adapter], tokens: usize, device: &Device) -> Self {
        match self {
            ForwardMode::Auto if !device.is_cpu() => ForwardMode::Dense,
            ForwardMode::Auto => {
                let (s, d) = adapters.iter().fold((0.0, 0.0), |(s, d), a| {
                    (
                        s + Self::spectral_cost(a.entries(), tokens),
                        d + Self::dense_cost(a.entries()),
                    )
                });
                if s < d {
                    ForwardMode::Spectral
                } else {
                    ForwardMode::Dense
                }
            }
            other => other,
        }
    }
}
