//! Spectral math: the one phase convention ([`phase`]), shared FFT plans, the pruned
//! real-FFT recovery of ΔW on CPU ([`fft`]), the O(d log d) per-token product `x·ΔWᵀ` ([`forward`])
//! and the portable tensor-op recovery of ΔW for CUDA/Metal
//! ([`portable`]).
//!
//! All paths compute the same function of the coefficients `c` (length n) on entries `(u_l, v_l)`:
//!
//! ```text
//! ΔW[j, k] = scaling / (d1·d2) · Σ_l c_l · cos(2π (u_l·j/d1 + v_l·k/d2)),   j < d1, k < d2
//! ```
//!
//! which is PEFT's `torch.fft.ifft2(dense).real * scaling` (inverse DFT, `+i` exponent, `1/(d1·d2)`).

pub mod fft;
pub mod forward;
pub(crate) mod hermitian;
pub mod phase;
pub(crate) mod plans;
pub mod portable;
