//! ΔW with candle tensor ops only (no FFT, no complex dtype): the path for CUDA and Metal.
//!
//! Each entry contributes `c_l·cos(a_l·j + b_l·k)` with `a_l = 2π u_l/d1`, `b_l = 2π v_l/d2`.
//! Two reductions keep the GEMM small:
//!
//! - **Columns folded.** Write `v_l` as `s_l·f_l (mod d2)` with `f_l = min(v_l, d2 − v_l)` and
//!   `s_l = ±1`; then `cos(a j + s b_f k) = cos(a j)·cos(b_f k) − s·sin(a j)·sin(b_f k)`, so all
//!   entries of one folded column share one pair of right-hand basis rows:
//!
//!   ```text
//!   ΔW = scaling/(d1·d2) · F · [ cos V_f ; −sin V_f ],   F = Σ_{l ∈ group} c_l·[cos U_l | s_l·sin U_l]
//!   ```
//!
//!   `F` is `(d1, 2m)` for the `m ≤ d2/2 + 1` distinct folded columns, summed with `index_add`
//!   (`O(d1·n)`), instead of a `(d1, 2n)` left basis multiplied by a `(2n, d2)` right one.
//! - **Rows mirrored.** ΔW is a real inverse DFT, so `ΔW[−j, −k] = ΔW[j, k]` (indices mod d1, d2):
//!   only rows `0..=d1/2` go through the GEMM; the rest are a gather of those.
//!
//! GEMM cost `2·(d1/2+1)·2m·d2` instead of `2·d1·2n·d2` (768×768, n = 1000: 0.43 instead of 2.36
//! GFLOP, see docs/DEVICES.md). The bases are built once per entry set and device from exactly
//! reduced phases (f64 on the host, stored as f32) and shared by every layer that shares the
//! entries. Autograd comes from candle. The same code runs on `Device::Cpu`, where it is tested
//! against [`super::fft`] and the f64 reference.

use super::phase::{self, UnitCircle};
use crate::entries::SpectralEntries;
use crate::error::{Error, Result};
use candle_core::{DType, Device, DeviceLocation, Tensor};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// The constant bases of one entry set on one device.
#[derive(Debug)]
pub struct PortableBasis {
    /// `[cos U | s·sin U]` for rows `0..top`, shape `(top, 2n)`.
    left: Tensor,
    /// Folded column group of each half of `left`'s columns: `[g_l | m + g_l]`, `[2n]` (u32).
    groups: Tensor,
    /// `[cos V_f ; −sin V_f]` over the folded columns, shape `(2m, d2)`.
    right: Tensor,
    /// For the rows below `top`: the row `d1 − j` and the column permutation `k ↦ −k mod d2`
    /// they mirror (u32), or `None` when `top == d1`.
    mirror: Option<(Tensor, Tensor)>,
    n: usize,
    d1: usize,
    d2: usize,
}

/// `(f, s)` with `v ≡ s·f (mod d2)`, `f = min(v, d2 − v)`.
fn fold(v: usize, d2: usize) -> (usize, f64) {
    let neg = (d2 - v) % d2;
    if v <= neg {
        (v, 1.0)
    } else {
        (neg, -1.0)
    }
}

impl PortableBasis {
    /// Builds the bases for `entries` on `device` (f32).
    pub fn new(entries: &SpectralEntries, device: &Device) -> Result<Self> {
        let (d1, d2) = entries.shape();
        let n = entries.len();
        let top = d1 / 2 + 1;
        let (cu, cv) = (UnitCircle::new(d1), UnitCircle::new(d2));
        let folded: Vec<(usize, f64)> = entries
            .cols()
            .iter()
            .map(|&v| fold(v as usize, d2))
            .collect();
        let mut columns: Vec<usize> = folded.iter().map(|&(f, _)| f).collect();
        columns.sort_unstable();
        columns.dedup();
        let m = columns.len();
        // Folded column -> its group (every f in `folded` is one of `columns`).
        let mut group_of = vec![0u32; d2 / 2 + 1];
        for (g, &f) in columns.iter().enumerate() {
            group_of[f] = g as u32;
        }
        let mut groups: Vec<u32> = folded.iter().map(|&(f, _)| group_of[f]).collect();
        groups.extend(folded.iter().map(|&(f, _)| m as u32 + group_of[f]));

        let mut left = vec![0f32; top * 2 * n];
        for (j, row) in left.chunks_exact_mut(2 * n).enumerate() {
            for (l, (&u, &(_, sign))) in entries.rows().iter().zip(&folded).enumerate() {
                row[l] = cu.cos(u as usize, j) as f32;
                row[n + l] = (sign * cu.sin(u as usize, j)) as f32;
            }
        }
        let mut right = vec![0f32; 2 * m * d2];
        let (cos_v, sin_v) = right.split_at_mut(m * d2);
        for (g, &f) in columns.iter().enumerate() {
            for k in 0..d2 {
                cos_v[g * d2 + k] = cv.cos(f, k) as f32;
                sin_v[g * d2 + k] = -cv.sin(f, k) as f32;
            }
        }
        let mirror = if top < d1 {
            let rows: Vec<u32> = (top..d1).map(|j| (d1 - j) as u32).collect();
            let cols: Vec<u32> = (0..d2).map(|k| ((d2 - k) % d2) as u32).collect();
            Some((
                Tensor::from_vec(rows, d1 - top, device)?,
                Tensor::from_vec(cols, d2, device)?,
            ))
        } else {
            None
        };
        Ok(Self {
            left: Tensor::from_vec(left, (top, 2 * n), device)?,
            groups: Tensor::from_vec(groups, 2 * n, device)?,
            right: Tensor::from_vec(right, (2 * m, d2), device)?,
            mirror,
            n,
            d1,
            d2,
        })
    }

    /// Multiply-adds of the GEMM that forms ΔW (`top·2m·d2`), for the cost figures in the docs.
    pub fn gemm_macs(&self) -> usize {
        self.left.dims()[0] * self.right.dims()[0] * self.d2
    }

    /// The bases for `entries` on `device`, built once and shared while `entries` is alive.
    pub fn shared(entries: &Arc<SpectralEntries>, device: &Device) -> Result<Arc<Self>> {
        type Slot = (Weak<SpectralEntries>, DeviceLocation, Arc<PortableBasis>);
        static CACHE: OnceLock<Mutex<Vec<Slot>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let loc = device.location();
        {
            let mut slots = crate::sync::lock(cache);
            slots.retain(|(w, _, _)| w.strong_count() > 0);
            if let Some((_, _, b)) = slots
                .iter()
                .find(|(w, l, _)| *l == loc && std::ptr::eq(w.as_ptr(), Arc::as_ptr(entries)))
            {
                return Ok(b.clone());
            }
        }
        let basis = Arc::new(Self::new(entries, device)?);
        let mut slots = crate::sync::lock(cache);
        slots.push((Arc::downgrade(entries), loc, basis.clone()));
        Ok(basis)
    }

    /// `ΔW` (f32, `d1×d2`) for coefficients `coeffs` (f32, `[n]`), differentiable in `coeffs`.
    pub fn delta_weight(&self, coeffs: &Tensor, scaling: f64) -> Result<Tensor> {
        let n = self.n;
        if coeffs.dims() != [n] {
            return Err(Error::Shape {
                what: "spectral coefficients".into(),
                expected: format!("[{n}]"),
                found: crate::error::dims_str(coeffs.dims()),
            });
        }
        let c = coeffs.to_dtype(DType::F32)?;
        let cc = Tensor::cat(&[&c, &c], 0)?.unsqueeze(0)?;
        let scaled = self.left.broadcast_mul(&cc)?;
        let (top, two_m) = (self.left.dim(0)?, self.right.dim(0)?);
        let zeros = Tensor::zeros((top, two_m), DType::F32, coeffs.device())?;
        let folded = zeros.index_add(&self.groups, &scaled, 1)?;
        let upper = folded
            .matmul(&self.right)?
            .affine(phase::scale(scaling, self.d1, self.d2), 0.0)?;
        Ok(match &self.mirror {
            None => upper,
            Some((rows, cols)) => {
                let lower = upper.index_select(rows, 0)?.index_select(cols, 1)?;
                Tensor::cat(&[&upper, &lower], 0)?
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The folded, mirrored basis needs far fewer multiply-adds than one `(d1, 2n)·(2n, d2)`
    /// GEMM, and the count is what the docs report for 768×768, n = 1000.
    #[test]
    fn gemm_is_smaller_than_the_unfolded_one() -> Result<()> {
        let e = SpectralEntries::uniform(768, 768, 1000, 777)?;
        let b = PortableBasis::new(&e, &Device::Cpu)?;
        let unfolded = 768 * 2 * 1000 * 768;
        assert!(
            b.gemm_macs() * 5 < unfolded,
            "{} vs {unfolded}",
            b.gemm_macs()
        );
        Ok(())
    }

    #[test]
    fn fold_maps_columns_to_the_lower_half() {
        assert_eq!(fold(0, 8), (0, 1.0));
        assert_eq!(fold(3, 8), (3, 1.0));
        assert_eq!(fold(4, 8), (4, 1.0));
        assert_eq!(fold(5, 8), (3, -1.0));
        assert_eq!(fold(0, 1), (0, 1.0));
        assert_eq!(fold(4, 7), (3, -1.0));
    }
}
