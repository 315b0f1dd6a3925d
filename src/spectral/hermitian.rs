//! Small helpers for real signals' spectra, shared by every FFT path of the crate.
//!
//! realfft's forward transform of a real sequence `x` of length `d` gives
//! `X[w] = Σ_k x_k e^{−2πi w k/d}` for `w` in `0..=d/2`. The crate's convention uses the `+i`
//! exponent, so [`plus_dft_at`] reads `Σ_k x_k e^{+2πi v k/d}` for any `v` in `0..d` from it.
//! In the other direction, [`add_hermitian`] accumulates a complex spectrum `z` directly into the
//! half-spectrum `h = (z + conj(z[−·]))/2` whose complex-to-real inverse is `Re Σ_u z[u] e^{+2πi u j/d}`.

use rustfft::num_complex::Complex32;

/// `Σ_k x_k e^{+2πi v k/d}` for `v` in `0..d`, from the half-spectrum `spec` (length `d/2 + 1`)
/// of realfft's forward transform of `x`.
#[inline]
pub(crate) fn plus_dft_at(spec: &[Complex32], v: usize, d: usize) -> Complex32 {
    if v < spec.len() {
        spec[v].conj()
    } else {
        spec[d - v]
    }
}

/// Adds `val` at frequency `u` (in `0..d`) of a full spectrum `z`, folded into its Hermitian
/// half `h` (length `d/2 + 1`): `h[u] += val/2`, `h[(d−u) mod d] += conj(val)/2`, where they fall
/// in the half. The caller passes `val` already halved.
#[inline]
pub(crate) fn add_hermitian(h: &mut [Complex32], u: usize, d: usize, half_val: Complex32) {
    if u < h.len() {
        h[u] += half_val;
    }
    let w = (d - u) % d;
    if w < h.len() {
        h[w] += half_val.conj();
    }
}

/// Zeroes the imaginary parts of the bins that must be real (0 and, for even `d`, `d/2`), as
/// realfft's inverse requires; they are already zero up to rounding.
#[inline]
pub(crate) fn fix_real_bins(h: &mut [Complex32], d: usize) {
    h[0].im = 0.0;
    if d.is_multiple_of(2) {
        let last = h.len() - 1;
        h[last].im = 0.0;
    }
}
