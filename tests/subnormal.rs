//! The subnormal policy (`fourierft::runtime`): flush-to-zero really flushes, on the calling
//! thread and rayon's threads, the guard restores the previous mode, and the first training op
//! applies the default policy. One test function: the modes are per thread and the rayon pool is
//! shared, so the checks run in sequence.

use candle_core::{Device, Tensor, Var};
use fourierft::runtime::{self, FlushGuard, SubnormalPolicy};
use fourierft::{ops, SpectralEntries};
use std::hint::black_box;
use std::sync::Arc;

/// A product whose exact value is subnormal (2^-127), and a subnormal operand times one.
fn subnormal_results() -> (f32, f32) {
    let a = black_box(f32::MIN_POSITIVE) * black_box(0.5);
    let b = black_box(f32::from_bits(1)) * black_box(1.0);
    (a, b)
}

fn pool_modes() -> Vec<bool> {
    let mut v = rayon::broadcast(|ctx| (ctx.index(), runtime::thread_flushes()));
    v.sort();
    v.into_iter().map(|(_, m)| m).collect()
}

#[test]
fn flush_to_zero_policy() -> fourierft::Result<()> {
    // IEEE on a fresh thread: gradual underflow.
    std::thread::spawn(|| {
        assert!(!runtime::thread_flushes());
        let (a, b) = subnormal_results();
        assert!(a.is_subnormal() && b.is_subnormal());
    })
    .join()
    .expect("IEEE thread");

    if !runtime::FLUSH_SUPPORTED {
        return Ok(());
    }
    // The guard flushes here and on every pool thread, and restores both.
    let (here, pool) = (runtime::thread_flushes(), pool_modes());
    {
        let _g = FlushGuard::new();
        assert!(runtime::thread_flushes());
        assert_eq!(subnormal_results(), (0.0, 0.0));
        let flushed = rayon::broadcast(|_| subnormal_results() == (0.0, 0.0));
        assert!(flushed.iter().all(|&f| f));
    }
    assert_eq!(runtime::thread_flushes(), here);
    assert_eq!(pool_modes(), pool);
    // set_thread_flush returns the previous mode.
    let prev = runtime::set_thread_flush(true);
    assert!(runtime::set_thread_flush(prev));
    assert_eq!(runtime::thread_flushes(), prev);

    // Opting out: a training op on a fresh thread leaves it IEEE.
    let train_op = || -> fourierft::Result<bool> {
        let e = Arc::new(SpectralEntries::uniform(6, 5, 4, 7)?);
        let c = Var::new(&[1f32, -0.5, 0.25, 2.0], &Device::Cpu)?;
        let x = Tensor::ones((3, 5), candle_core::DType::F32, &Device::Cpu)?;
        let w = Tensor::zeros((6, 5), candle_core::DType::F32, &Device::Cpu)?;
        let y = ops::fourier_linear(&x, &w, None, &e, c.as_tensor(), 10.0)?;
        y.sum_all()?.backward()?;
        Ok(runtime::thread_flushes())
    };
    runtime::set_subnormal_policy(SubnormalPolicy::Ieee);
    let flushed = std::thread::spawn(train_op).join().expect("op thread")?;
    assert!(!flushed);
    // The default: the first training op switches the calling thread and the pool over.
    runtime::set_subnormal_policy(SubnormalPolicy::FlushToZero);
    let flushed = std::thread::spawn(train_op).join().expect("op thread")?;
    assert!(flushed);
    assert!(pool_modes().iter().all(|&m| m));
    Ok(())
}
