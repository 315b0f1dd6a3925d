//! What the timing examples (`bench_layer`, `forward_crossover`) share.

use anyhow::Result;
use candle_core::Device;
use std::time::Instant;

/// The median of `runs` (at least `min_runs`) timed calls of `f` after a warm-up call, in ms.
/// Each call ends with a synchronisation of `dev` (a no-op on the CPU), so on a GPU the time is
/// the work's, not the kernel launches'.
pub fn median_ms<T>(
    dev: &Device,
    runs: usize,
    min_runs: usize,
    mut f: impl FnMut() -> Result<T>,
) -> Result<f64> {
    f()?; // warm-up
    dev.synchronize()?;
    let mut t: Vec<f64> = (0..runs.max(min_runs))
        .map(|_| {
            let start = Instant::now();
            f()?;
            dev.synchronize()?;
            Ok(start.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// Runs candle's kernels and the FFTs on `threads` threads (all cores when `None`), with the
/// crate's CPU training settings (docs/PERFORMANCE.md: candle's elementwise ops on the calling
/// thread, freed buffers reused, subnormals flushed; FOURIERFT_SUBNORMALS=ieee,
/// FOURIERFT_MALLOC=default and CANDLE_NUM_THREADS=N undo each one).
pub fn init_cpu(threads: Option<usize>) -> Result<()> {
    if let Some(t) = threads {
        // candle's CPU kernels read RAYON_NUM_THREADS; the FFTs use rayon's global pool.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()?;
    }
    fourierft::runtime::init_cpu_training();
    Ok(())
}
