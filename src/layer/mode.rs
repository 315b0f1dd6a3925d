//! [`ForwardMode`] and the cost model `Auto` decides by.

use super::adapter::LayerAdapter;
use crate::entries::SpectralEntries;
use candle_core::Device;

/// How [`FourierLinear`](super::FourierLinear)'s unmerged forward computes the adapters' contribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
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

    /// Estimated cost of the spectral product for `tokens` tokens with these entries: per token
    /// a real FFT of the input row, an inverse one of the output row, one multiply-add per entry,
    /// and [`ROW_PASSES`](Self::ROW_PASSES) passes over both rows.
    fn spectral_cost(entries: &SpectralEntries, tokens: usize) -> f64 {
        let (d1, d2) = entries.shape();
        let rows = Self::ROW_PASSES * (d1 + d2) as f64;
        let per_token = Self::fft_cost(d1) + Self::fft_cost(d2) + entries.len() as f64 + rows;
        tokens as f64 * per_token
    }

    /// The spectral product's per-token work besides the FFT arithmetic, in passes over the
    /// input and output rows (copying a row in and out of the FFT buffers, packing the half
    /// spectra, adding into the output): memory traffic that grows with d, which the FFT
    /// operation counts leave out.
    ///
    /// Measured, not tuned: `cargo run --release --example forward_crossover -- --threads 2`
    /// times the unmerged forward of a d×d layer (n = 1000) in both modes at 1, 2, 4, … tokens.
    /// Where Dense first gets at least as fast at `T` tokens, the crossover lies in `(T/2, T]`,
    /// and setting `spectral_cost(T*) = dense_cost` bounds the per-token overhead. On a 2-core
    /// AMD EPYC (Zen 3) under a load of 6 (other builds), 2 threads, four runs per size up to
    /// d = 1024 (two more with 1 thread agreed), one at d = 2048:
    ///
    /// | d | Dense first as fast at | overhead the crossover allows | 8·(d1 + d2) |
    /// |---:|---:|---:|---:|
    /// | 64 | 16–32 tokens | ≤ 1,256 | 1,024 |
    /// | 256 | 64 | 3,660 – 10,368 | 4,096 |
    /// | 1024 | 512–1024 | ≤ 21,592 | 16,384 |
    /// | 2048 | 1024 | 7,100 – 37,800 | 32,768 |
    ///
    /// No constant fits both d = 64 and d = 256 (the former 2,000 picked Dense a power of two
    /// too early at d = 64 and too late at 256 and 2048); an overhead proportional to
    /// `d1 + d2` fits every size for a factor between 7.2 and 9.8. With 8, the model switches at
    /// 16, 64, 512 and 1024 tokens, where the measurements do (rerun after the change).
    ///
    /// Fitted at n = 1000 (PEFT's default `n_frequency`). Elsewhere the model is rougher: at
    /// n = 100 the crossover is flat (d = 256: the modes stay within 35% of each other from 64 to
    /// 256 tokens, and repeated runs put the switch anywhere from 64 to 512 tokens) and at
    /// n = 4000, d = 256 Dense is already faster at 32 tokens where the model still picks
    /// Spectral (20% slower there). A wrong pick near the crossover costs little because both
    /// modes cost about the same there; the per-entry term is the part to refine next.
    const ROW_PASSES: f64 = 8.0;

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
    pub(super) fn resolve_all(
        self,
        adapters: &[&LayerAdapter],
        tokens: usize,
        device: &Device,
    ) -> Self {
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
