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
    pub complex: Vec<Complex32>,
    pub real: Vec<f32>,
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
