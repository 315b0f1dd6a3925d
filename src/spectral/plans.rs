//! Process-wide FFT planners (their plans are cached by length) and per-thread scratch buffers,
//! so repeated calls neither re-plan nor re-allocate.

use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::num_complex::Complex32;
use rustfft::{Fft, FftPlanner};
use std::cell::RefCell;
use std::sync::{Arc, Mutex, OnceLock};

struct Planners {
    complex: FftPlanner<f32>,
    real: RealFftPlanner<f32>,
}

fn planners<R>(f: impl FnOnce(&mut Planners) -> R) -> R {
    static PLANNERS: OnceLock<Mutex<Planners>> = OnceLock::new();
    let m = PLANNERS.get_or_init(|| {
        Mutex::new(Planners {
            complex: FftPlanner::new(),
            real: RealFftPlanner::new(),
        })
    });
    // A panic elsewhere cannot leave a planner half-updated in a way that matters: recover.
    let mut guard = m.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut guard)
}

/// Unnormalised complex inverse FFT (`+i` exponent) of length `len`.
pub(crate) fn complex_inverse(len: usize) -> Arc<dyn Fft<f32>> {
    planners(|p| p.complex.plan_fft_inverse(len))
}

/// Unnormalised real-to-complex forward FFT (`-i` exponent) of length `len`.
pub(crate) fn real_forward(len: usize) -> Arc<dyn RealToComplex<f32>> {
    planners(|p| p.real.plan_fft_forward(len))
}

/// Unnormalised complex-to-real inverse FFT (`+i` exponent) of length `len`.
pub(crate) fn real_inverse(len: usize) -> Arc<dyn ComplexToReal<f32>> {
    planners(|p| p.real.plan_fft_inverse(len))
}

/// Per-thread working buffers, grown on demand and kept between calls.
#[derive(Default)]
pub(crate) struct Buffers {
    pub scratch: Vec<Complex32>,
    pub complex: [Vec<Complex32>; 3],
    pub real: [Vec<f32>; 2],
}

/// Runs `f` with this thread's buffers. `f` must not call back into rayon.
pub(crate) fn with_buffers<R>(f: impl FnOnce(&mut Buffers) -> R) -> R {
    thread_local! {
        static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
    }
    BUFFERS.with(|b| match b.try_borrow_mut() {
        Ok(mut b) => f(&mut b),
        // Re-entered on the same thread: fall back to fresh buffers rather than panic.
        Err(_) => f(&mut Buffers::default()),
    })
}

/// Resizes `v` to exactly `len` elements (zero-filling new ones) and returns it.
pub(crate) fn sized<T: Clone + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    v.resize(len, T::default());
    &mut v[..len]
}

/// realfft only fails on wrongly sized buffers or non-real bins, which the callers rule out;
/// should it happen anyway, it is an error, not a panic.
pub(crate) fn fft_error(e: realfft::FftError) -> crate::Error {
    crate::Error::Candle(candle_core::Error::msg(format!(
        "fourierft: real FFT failed: {e}"
    )))
}

/// A large zeroed complex buffer taken from a small process-wide pool and returned on drop, so
/// repeated calls do not pay fresh pages (page faults and kernel zeroing) every time.
pub(crate) struct Pooled(Vec<Complex32>);

const POOL_SIZE: usize = 2;

fn pool() -> &'static Mutex<Vec<Vec<Complex32>>> {
    static POOL: OnceLock<Mutex<Vec<Vec<Complex32>>>> = OnceLock::new();
    POOL.get_or_init(Default::default)
}

/// A zeroed buffer of `len` complex values.
pub(crate) fn pooled(len: usize) -> Pooled {
    let mut v = {
        let mut p = pool().lock().unwrap_or_else(|e| e.into_inner());
        // Prefer a buffer that is already big enough.
        match p.iter().position(|b| b.capacity() >= len) {
            Some(i) => p.swap_remove(i),
            None => p.pop().unwrap_or_default(),
        }
    };
    v.clear();
    v.resize(len, Complex32::default());
    Pooled(v)
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut p = pool().lock().unwrap_or_else(|e| e.into_inner());
        if p.len() < POOL_SIZE {
            p.push(std::mem::take(&mut self.0));
        }
    }
}

impl std::ops::Deref for Pooled {
    type Target = [Complex32];
    fn deref(&self) -> &[Complex32] {
        &self.0
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut [Complex32] {
        &mut self.0
    }
}
