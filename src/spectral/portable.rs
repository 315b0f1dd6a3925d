//! ΔW with candle tensor ops only (no FFT, no complex dtype): the path for CUDA and Metal.
//!
//! With `cos(a + b) = cos a·cos b − sin a·sin b`,
//!
//! ```text
//! ΔW = alpha/(d1·d2) · [ (cos U ∘ c) | (sin U ∘ c) ] · [ cos V ; −sin V ]
//! ```
//!
//! where `cos U[j, l] = cos(2π u_l j/d1)` (`d1×n`) and `cos V[l, k] = cos(2π v_l k/d2)` (`n×d2`).
//! The bases are built once per entry set and device from exactly reduced phases (f64 on the host,
//! stored as f32) and shared by every layer that shares the entries. Autograd comes from candle.
//! The same code runs on `Device::Cpu`, where it is tested against [`super::fft`].

use super::phase::{self, UnitCircle};
use crate::entries::SpectralEntries;
use crate::error::{Error, Result};
use candle_core::{DType, Device, DeviceLocation, Tensor};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// The constant bases of one entry set on one device.
#[derive(Debug)]
pub struct PortableBasis {
    /// `[cos U | sin U]`, shape `(d1, 2n)`.
    left: Tensor,
    /// `[cos V ; −sin V]`, shape `(2n, d2)`.
    right: Tensor,
    d1: usize,
    d2: usize,
}

impl PortableBasis {
    /// Builds the bases for `entries` on `device` (f32).
    pub fn new(entries: &SpectralEntries, device: &Device) -> Result<Self> {
        let (d1, d2) = entries.shape();
        let n = entries.len();
        let (cu, cv) = (UnitCircle::new(d1), UnitCircle::new(d2));
        let mut left = vec![0f32; d1 * 2 * n];
        for (j, row) in left.chunks_exact_mut(2 * n).enumerate() {
            for (l, &u) in entries.rows().iter().enumerate() {
                row[l] = cu.cos(u as usize, j) as f32;
                row[n + l] = cu.sin(u as usize, j) as f32;
            }
        }
        let mut right = vec![0f32; 2 * n * d2];
        let (cos_v, sin_v) = right.split_at_mut(n * d2);
        for (l, &v) in entries.cols().iter().enumerate() {
            for k in 0..d2 {
                cos_v[l * d2 + k] = cv.cos(v as usize, k) as f32;
                sin_v[l * d2 + k] = -cv.sin(v as usize, k) as f32;
            }
        }
        Ok(Self {
            left: Tensor::from_vec(left, (d1, 2 * n), device)?,
            right: Tensor::from_vec(right, (2 * n, d2), device)?,
            d1,
            d2,
        })
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
    pub fn delta_weight(&self, coeffs: &Tensor, alpha: f64) -> Result<Tensor> {
        let n = self.left.dim(1)? / 2;
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
        let dw = scaled.matmul(&self.right)?;
        Ok(dw.affine(phase::scale(alpha, self.d1, self.d2), 0.0)?)
    }
}
