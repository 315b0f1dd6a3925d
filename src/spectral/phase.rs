//! The phase convention and normalisation, written once.
//!
//! Every path in the crate computes `scaling / (d1·d2) · Σ_l c_l · e^{+2πi (u_l·j/d1 + v_l·k/d2)}` and
//! keeps the real part. Phases are reduced exactly as integers, `(u·j) mod d1`, before they become
//! angles: an angle formed in floating point as `2π·u·j/d1` loses ~1e-3 relative accuracy at d = 4096.

/// The normalisation of ΔW: `scaling / (d1·d2)` (torch's `norm="backward"` inverse FFT times PEFT's
/// `scaling`).
///
/// ```
/// assert_eq!(fourierft::internals::phase::scale(150.0, 10, 3), 5.0);
/// ```
pub fn scale(scaling: f64, d1: usize, d2: usize) -> f64 {
    scaling / (d1 as f64 * d2 as f64)
}

/// `(freq · pos) mod len`, exactly, for `freq, pos < len ≤ 2^32`.
///
/// ```
/// assert_eq!(fourierft::internals::phase::reduce(4095, 4095, 4096), 1);
/// ```
#[inline]
pub fn reduce(freq: usize, pos: usize, len: usize) -> usize {
    ((freq as u64 * pos as u64) % len as u64) as usize
}

/// `cos` and `sin` of `2π t / len` for `t` in `0..len`, computed in f64.
///
/// Index with [`reduce`] to get `cos(2π·freq·pos/len)` without phase error.
#[derive(Debug, Clone)]
pub struct UnitCircle {
    cos: Vec<f64>,
    sin: Vec<f64>,
}

impl UnitCircle {
    /// The `len` roots of unity `e^{2πi t/len}`.
    ///
    /// ```
    /// let c = fourierft::internals::phase::UnitCircle::new(4);
    /// assert!((c.cos(1, 1) - 0.0).abs() < 1e-15 && (c.sin(1, 1) - 1.0).abs() < 1e-15);
    /// ```
    pub fn new(len: usize) -> Self {
        let step = std::f64::consts::TAU / len as f64;
        let (cos, sin) = (0..len)
            .map(|t| (step * t as f64).sin_cos())
            .map(|(s, c)| (c, s))
            .unzip();
        Self { cos, sin }
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.cos.len()
    }

    /// Whether it is empty (never, for `len ≥ 1`).
    pub fn is_empty(&self) -> bool {
        self.cos.is_empty()
    }

    /// `cos(2π · freq · pos / len)` with exact integer phase reduction.
    #[inline]
    pub fn cos(&self, freq: usize, pos: usize) -> f64 {
        self.cos[reduce(freq, pos, self.len())]
    }

    /// `sin(2π · freq · pos / len)` with exact integer phase reduction.
    #[inline]
    pub fn sin(&self, freq: usize, pos: usize) -> f64 {
        self.sin[reduce(freq, pos, self.len())]
    }
}
