//! Run-time settings that keep a CPU training step's speed independent of the machine:
//! the subnormal-float policy and the memory allocator's treatment of large temporary buffers.
//!
//! # Subnormal floats
//!
//! Backward passes produce values below `f32::MIN_POSITIVE` (≈ 1.18e-38): GELU′ and softmax
//! tails, products of small gradients. Fed to a GEMM, such *subnormal* operands cost a
//! microcode assist per operation on many Intel CPUs (a training step measured 6× slower), while
//! other CPUs (e.g. AMD Zen) handle them at full speed — so the same binary's speed depended on the
//! machine. With **flush-to-zero** (results that would be subnormal become ±0) and
//! **denormals-are-zero** (subnormal inputs are read as ±0) every CPU runs at full speed.
//!
//! Numerical effect: only values with magnitude below 1.18e-38 change (to zero); normal f32
//! values, and so every result that does not pass through such a tiny intermediate, are bit for
//! bit the same. For training this is the setting torch uses on many builds
//! (`torch.set_flush_denormal`) and what GPUs do by default; an f32 gradient of 1e-38 is 30
//! orders of magnitude below anything AdamW acts on.
//!
//! Policy ([`SubnormalPolicy`]): the default is [`SubnormalPolicy::FlushToZero`] *for training*:
//! the first backward pass through a fourierft op ([`ensure_training_policy`]) switches
//! flush-to-zero and denormals-are-zero on for the calling thread and every thread of the rayon
//! pool it runs in (where candle's and this crate's CPU kernels run). Opt out with
//! [`set_subnormal_policy`]`(SubnormalPolicy::Ieee)` or the environment variable
//! `FOURIERFT_SUBNORMALS=ieee`; [`FlushGuard`] scopes the mode explicitly (and restores the
//! previous one), [`flush_on_thread_start`] is a rayon `start_handler` for pools you build.
//!
//! Covered: x86-64 (the MXCSR FTZ and DAZ bits) and aarch64 (the FPCR FZ bit, which flushes
//! both inputs and outputs). Elsewhere the calls do nothing and [`thread_flushes`] reports
//! `false`.
//!
//! Caveat: Rust (like LLVM) assumes the default floating-point environment, so a computation
//! constant-folded at compile time keeps IEEE subnormals where the same computation at run time
//! gives zero. Only values below `f32::MIN_POSITIVE` can differ; nothing else is affected.
//!
//! # Large temporary buffers
//!
//! candle allocates every tensor's buffer with the global allocator, and the `gemm` crate
//! allocates its packing buffer per product. glibc serves allocations above its `mmap`
//! threshold with fresh `mmap`s and returns heap tops above its trim threshold to the kernel,
//! so a step that allocates and frees the same few megabytes pays page faults, kernel page
//! zeroing and cross-CPU TLB shootdowns on every call. [`keep_freed_memory`] (called by
//! [`ensure_training_policy`] unless `FOURIERFT_MALLOC=default`) sets glibc's thresholds so that
//! freed buffers are reused instead; this crate's own ops also keep their workspaces across calls.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

/// What happens to subnormal f32/f64 values on the CPU threads that train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubnormalPolicy {
    /// Flush-to-zero and denormals-are-zero on (the default for training).
    FlushToZero,
    /// IEEE 754 gradual underflow (the CPU's default; slow on some CPUs).
    Ieee,
}

/// 0: not read yet, 1: FlushToZero, 2: Ieee.
static POLICY: AtomicU8 = AtomicU8::new(0);

/// The training policy: set by [`set_subnormal_policy`], else `FOURIERFT_SUBNORMALS`
/// (`ieee` / `flush`), else [`SubnormalPolicy::FlushToZero`].
pub fn subnormal_policy() -> SubnormalPolicy {
    match POLICY.load(Ordering::Relaxed) {
        1 => SubnormalPolicy::FlushToZero,
        2 => SubnormalPolicy::Ieee,
        _ => {
            let from_env = match std::env::var("FOURIERFT_SUBNORMALS").as_deref() {
                Ok("ieee") | Ok("keep") | Ok("0") => SubnormalPolicy::Ieee,
                _ => SubnormalPolicy::FlushToZero,
            };
            // Keep an explicit choice made meanwhile by another thread.
            let _ =
                POLICY.compare_exchange(0, encode(from_env), Ordering::Relaxed, Ordering::Relaxed);
            decode(POLICY.load(Ordering::Relaxed))
        }
    }
}

fn encode(p: SubnormalPolicy) -> u8 {
    match p {
        SubnormalPolicy::FlushToZero => 1,
        SubnormalPolicy::Ieee => 2,
    }
}

fn decode(v: u8) -> SubnormalPolicy {
    if v == 2 {
        SubnormalPolicy::Ieee
    } else {
        SubnormalPolicy::FlushToZero
    }
}

/// Chooses the policy [`ensure_training_policy`] applies from now on (threads already switched
/// to flush-to-zero stay so; use [`FlushGuard`] or [`set_thread_flush`] to switch them back).
pub fn set_subnormal_policy(policy: SubnormalPolicy) {
    POLICY.store(encode(policy), Ordering::Relaxed);
}

#[cfg(target_arch = "x86_64")]
mod arch {
    /// MXCSR bit 15 (FTZ) and bit 6 (DAZ).
    const BITS: u32 = (1 << 15) | (1 << 6);

    fn read() -> u32 {
        let mut csr = 0u32;
        // SAFETY: stmxcsr stores the 4-byte MXCSR at a valid, writable, aligned address.
        unsafe {
            core::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
        }
        csr
    }

    fn write(csr: u32) {
        // SAFETY: ldmxcsr loads MXCSR from a valid address; only the FTZ/DAZ bits are ever
        // changed from the value read (no reserved bit is set, no exception unmasked).
        unsafe {
            core::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags, readonly));
        }
    }

    pub fn get() -> bool {
        read() & BITS == BITS
    }

    pub fn set(on: bool) {
        let csr = read();
        write(if on { csr | BITS } else { csr & !BITS });
    }

    pub const SUPPORTED: bool = true;
}

#[cfg(target_arch = "aarch64")]
mod arch {
    /// FPCR bit 24 (FZ): flush subnormal inputs and results to zero.
    const FZ: u64 = 1 << 24;

    fn read() -> u64 {
        let v: u64;
        // SAFETY: reading FPCR has no side effects.
        unsafe {
            core::arch::asm!("mrs {}, fpcr", out(reg) v, options(nomem, nostack, preserves_flags));
        }
        v
    }

    fn write(v: u64) {
        // SAFETY: only the FZ bit is ever changed from the value read.
        unsafe {
            core::arch::asm!("msr fpcr, {}", in(reg) v, options(nomem, nostack, preserves_flags));
        }
    }

    pub fn get() -> bool {
        read() & FZ != 0
    }

    pub fn set(on: bool) {
        let v = read();
        write(if on { v | FZ } else { v & !FZ });
    }

    pub const SUPPORTED: bool = true;
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod arch {
    pub fn get() -> bool {
        false
    }

    pub fn set(_: bool) {}

    pub const SUPPORTED: bool = false;
}

/// Whether this target can flush subnormals (x86-64, aarch64).
pub const FLUSH_SUPPORTED: bool = arch::SUPPORTED;

/// Whether flush-to-zero (and on x86-64 denormals-are-zero) is on for the calling thread.
pub fn thread_flushes() -> bool {
    arch::get()
}

/// Switches flush-to-zero and denormals-are-zero on or off for the calling thread only;
/// returns the previous state.
pub fn set_thread_flush(on: bool) -> bool {
    let prev = arch::get();
    if prev != on {
        arch::set(on);
    }
    prev
}

/// A rayon `start_handler` that switches flush-to-zero on for each thread of a pool you build:
/// `rayon::ThreadPoolBuilder::new().start_handler(fourierft::runtime::flush_on_thread_start)`.
pub fn flush_on_thread_start(_thread_index: usize) {
    set_thread_flush(true);
}

/// Sets the mode on the calling thread and every thread of the current rayon pool; returns the
/// calling thread's previous state and each pool thread's previous state (by index).
fn set_everywhere(on: bool) -> (bool, Vec<bool>) {
    let here = set_thread_flush(on);
    let pool = rayon::broadcast(|ctx| (ctx.index(), set_thread_flush(on)));
    let mut prev = vec![false; pool.len()];
    for (i, p) in pool {
        if let Some(slot) = prev.get_mut(i) {
            *slot = p;
        }
    }
    (here, prev)
}

/// Flush-to-zero and denormals-are-zero on the calling thread and all threads of the current
/// rayon pool while it lives; dropping it restores each thread's previous mode.
///
/// ```
/// use fourierft::runtime::{FlushGuard, FLUSH_SUPPORTED};
/// use std::hint::black_box;
/// let guard = FlushGuard::new();
/// // 2^-127 is subnormal: flushed to zero where the target supports it.
/// let half_min = black_box(f32::MIN_POSITIVE) * black_box(0.5);
/// assert_eq!(half_min == 0.0, FLUSH_SUPPORTED);
/// drop(guard); // each thread's previous mode is back
/// ```
#[must_use = "the mode is restored when the guard is dropped"]
pub struct FlushGuard {
    here: bool,
    pool: Vec<bool>,
}

impl FlushGuard {
    /// Switches the mode on (see the type's docs).
    pub fn new() -> Self {
        let (here, pool) = set_everywhere(true);
        Self { here, pool }
    }
}

impl Default for FlushGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        set_thread_flush(self.here);
        let pool = &self.pool;
        rayon::broadcast(|ctx| {
            set_thread_flush(pool.get(ctx.index()).copied().unwrap_or(false));
        });
    }
}

thread_local! {
    /// Whether [`ensure_training_policy`] already ran on this thread (and its pool).
    static APPLIED: Cell<bool> = const { Cell::new(false) };
    /// Whether [`ensure_flush_policy`] already ran on this thread (and its pool).
    static FLUSH_APPLIED: Cell<bool> = const { Cell::new(false) };
}

/// The subnormal half of [`ensure_training_policy`], once per calling thread: with
/// [`SubnormalPolicy::FlushToZero`] (the default), flush-to-zero and denormals-are-zero on this
/// thread and every thread of the current rayon pool; the allocator is left alone.
/// `StockTrainer::backward` calls it: a stock model's backward runs candle's kernels, which meet
/// subnormals like ours. It leaves glibc's thresholds to the process there: in the LLM demo
/// (a 135M-parameter model, one worker thread per core, then recreated per run) keeping freed
/// buffers went with gigabytes more peak memory and no faster step; call [`keep_freed_memory`]
/// yourself to choose it.
pub fn ensure_flush_policy() {
    if FLUSH_APPLIED.with(|a| a.replace(true)) {
        return;
    }
    if subnormal_policy() == SubnormalPolicy::FlushToZero {
        set_everywhere(true);
    }
}

/// Applies the training policy once per calling thread: with [`SubnormalPolicy::FlushToZero`]
/// (the default), flush-to-zero and denormals-are-zero on this thread and every thread of the
/// current rayon pool, and [`keep_freed_memory`]. Called by the backward of this crate's ops, so
/// a training loop gets it without asking; call it yourself to cover the first forward too.
pub fn ensure_training_policy() {
    if APPLIED.with(|a| a.replace(true)) {
        return;
    }
    ensure_flush_policy();
    if !matches!(std::env::var("FOURIERFT_MALLOC").as_deref(), Ok("default")) {
        keep_freed_memory();
    }
}

/// Process settings for training on the CPU; call it first thing in `main`, before any other
/// thread starts (it sets environment variables that candle reads):
///
/// - `RAYON_NUM_THREADS` = the available cores, unless set: candle's matmul asks for its thread
///   count on every call and, without the variable, re-counts the cores from `/proc/cpuinfo`;
/// - `CANDLE_NUM_THREADS=1`, unless set: candle's elementwise ops then run on the calling thread
///   instead of a second pool of threads that spin at a barrier after every op and compete with
///   rayon's threads (GEMMs, FFTs, this crate's ops) for the same cores — oversubscription that
///   cost up to 1.5× a layer's training step on two cores;
/// - [`keep_freed_memory`] (unless `FOURIERFT_MALLOC=default`) and the subnormal policy on this
///   thread and rayon's global pool ([`ensure_training_policy`]).
///
/// Without it the crate still applies the last item at its first training op.
pub fn init_cpu_training() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    ensure_training_policy();
}

/// Makes glibc's allocator keep and reuse freed large buffers instead of returning them to the
/// kernel and asking for fresh zeroed pages on the next allocation (see the module docs):
/// buffers up to 32 MiB (glibc's largest `mmap` threshold) come from the heap, and up to 1 GiB of
/// free heap is kept. The process's
/// resident memory stays at its peak instead of shrinking between steps. Does nothing on other
/// platforms. Returns whether the settings were applied.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::sync::OnceLock;
        static DONE: OnceLock<bool> = OnceLock::new();
        *DONE.get_or_init(|| {
            // SAFETY: mallopt only changes allocator parameters; any value is accepted or refused.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                    && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
                    && libc::mallopt(libc::M_TOP_PAD, 64 << 20) == 1
            }
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_sets_and_restores() {
        let before = thread_flushes();
        {
            let _g = FlushGuard::new();
            assert_eq!(thread_flushes(), FLUSH_SUPPORTED);
        }
        assert_eq!(thread_flushes(), before);
    }
}
