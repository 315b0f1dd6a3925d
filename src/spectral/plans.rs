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
    let mut guard = crate::sync::lock(m);
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
    pub real: [Vec<f32>; 3],
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

/// Element types with a process-wide pool of large buffers.
pub(crate) trait PoolElem: Copy + Default + Send + 'static {
    fn pool() -> &'static Mutex<Vec<Vec<Self>>>;
}

impl PoolElem for Complex32 {
    fn pool() -> &'static Mutex<Vec<Vec<Self>>> {
        static POOL: OnceLock<Mutex<Vec<Vec<Complex32>>>> = OnceLock::new();
        POOL.get_or_init(Default::default)
    }
}

impl PoolElem for f32 {
    fn pool() -> &'static Mutex<Vec<Vec<Self>>> {
        static POOL: OnceLock<Mutex<Vec<Vec<f32>>>> = OnceLock::new();
        POOL.get_or_init(Default::default)
    }
}

/// A large buffer taken from a small process-wide pool and returned to it on drop, so repeated
/// calls (one per layer and step) neither allocate nor fault in fresh pages: workspaces live
/// across training steps whatever the allocator does with freed memory.
pub struct Pooled<T: PoolElem>(Vec<T>);

/// Buffers kept per element type: enough for the adapted layers of a small model (each holds
/// its `W0 + ΔW` from the forward until its backward).
const POOL_SIZE: usize = 32;

fn take<T: PoolElem>(len: usize) -> Vec<T> {
    let mut p = crate::sync::lock(T::pool());
    // The smallest buffer that is big enough, else the biggest one (grown by the caller).
    let fit = p
        .iter()
        .enumerate()
        .filter(|(_, b)| b.capacity() >= len)
        .min_by_key(|(_, b)| b.capacity())
        .map(|(i, _)| i);
    match fit {
        Some(i) => p.swap_remove(i),
        None => p
            .iter()
            .enumerate()
            .max_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)
            .map(|i| p.swap_remove(i))
            .unwrap_or_default(),
    }
}

/// A zeroed pooled buffer of `len` values.
pub(crate) fn pooled<T: PoolElem>(len: usize) -> Pooled<T> {
    let mut v = take::<T>(len);
    v.clear();
    v.resize(len, T::default());
    Pooled(v)
}

/// A pooled buffer of `len` values whose contents are unspecified (left from an earlier use, or
/// zero): for outputs that are overwritten in full, so no pass zero-fills them first.
pub(crate) fn pooled_overwrite<T: PoolElem>(len: usize) -> Pooled<T> {
    let mut v = take::<T>(len);
    v.truncate(len);
    v.resize(len, T::default());
    Pooled(v)
}

impl<T: PoolElem> Drop for Pooled<T> {
    fn drop(&mut self) {
        let mut p = crate::sync::lock(T::pool());
        if p.len() < POOL_SIZE {
            p.push(std::mem::take(&mut self.0));
        }
    }
}

impl<T: PoolElem> std::ops::Deref for Pooled<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: PoolElem> std::ops::DerefMut for Pooled<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.0
    }
}
