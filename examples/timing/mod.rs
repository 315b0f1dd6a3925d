//! What the timing examples (`bench_layer`, `forward_crossover`) share.

use anyhow::Result;
use candle_core::Device;
use std::time::Instant;

/// Wall time each median covers at least: a sub-millisecond op timed only `runs` times gives a
/// median that one scheduler hiccup moves; a quarter second of calls does not.
const MIN_TOTAL_MS: f64 = 250.0;
/// Upper bound on the calls per median (tiny ops).
const MAX_CALLS: usize = 5000;

/// The median of timed calls of `f` after a warm-up call, in ms: at least `runs` (and
/// `min_runs`) calls, and more until they cover [`MIN_TOTAL_MS`] (at most [`MAX_CALLS`]).
/// Each call ends with a synchronisation of `dev` (a no-op on the CPU), so on a GPU the time is
/// the work's, not the kernel launches'. `scripts/peft_layer_bench.py` uses the same rule.
pub fn median_ms<T>(
    dev: &Device,
    runs: usize,
    min_runs: usize,
    mut f: impl FnMut() -> Result<T>,
) -> Result<f64> {
    f()?; // warm-up
    dev.synchronize()?;
    let mut t: Vec<f64> = Vec::new();
    let mut total = 0.0;
    while t.len() < runs.max(min_runs) || (total < MIN_TOTAL_MS && t.len() < MAX_CALLS) {
        let start = Instant::now();
        f()?;
        dev.synchronize()?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        total += ms;
        t.push(ms);
    }
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
