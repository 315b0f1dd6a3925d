//! What the demos' training runs share: the data-order generator (bit for bit the same in the
//! PEFT scripts), the learning-rate schedule, progress bars, CPU time and peak memory.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;

/// One Rotten Tomatoes snippet (label 1 = fresh, 0 = rotten).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Snippet {
    pub label: u32,
    pub text: String,
}

/// The snippets of `assets/rotten_tomatoes.jsonl` (written by scripts/fetch-demo-assets.sh), in
/// the file's fixed shuffled order.
pub fn read_snippets(assets: &Path) -> anyhow::Result<Vec<Snippet>> {
    let path = assets.join("rotten_tomatoes.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (run scripts/fetch-demo-assets.sh first)",
            path.display()
        )
    })?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{} line {}", path.display(), i + 1))
        })
        .collect()
}

/// splitmix64: the data-order generator, shared bit for bit with scripts/peft_sentiment.py and
/// scripts/peft_llm_sentiment.py.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fisher–Yates from the back: `j = next % (i + 1)` for `i = len-1 … 1`.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// The batches of one epoch: the indices shuffled (SplitMix64 seeded with `seed·1000003 +
/// epoch`), each run of `bucket_batches` batches' worth sorted by length (stable, so a batch pads
/// or splits little), cut into batches of `batch`, and the batches shuffled.
pub fn bucketed_batches(
    lens: &[usize],
    batch: usize,
    bucket_batches: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = SplitMix64(seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
    let mut idx: Vec<usize> = (0..lens.len()).collect();
    rng.shuffle(&mut idx);
    let mut batches = Vec::new();
    for chunk in idx.chunks(batch * bucket_batches) {
        let mut c = chunk.to_vec();
        c.sort_by_key(|&i| lens[i]);
        batches.extend(c.chunks(batch).map(|b| b.to_vec()));
    }
    rng.shuffle(&mut batches);
    batches
}

/// Linear decay from `lr` at step 0 to 0 after `total` steps (no warmup).
pub fn lr_at(lr: f64, step: usize, total: usize) -> f64 {
    lr * (1.0 - step as f64 / total as f64)
}

/// A progress bar `prefix [bar] pos/len [elapsed] msg`.
pub fn progress_bar(len: usize, prefix: String) -> anyhow::Result<ProgressBar> {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>22} {bar:30} {pos}/{len} [{elapsed_precise}] {msg}",
        )?
        .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    Ok(pb)
}

/// CPU time used by this process so far (all threads), in seconds; NaN where unsupported.
pub fn process_cpu_s() -> f64 {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec through a valid pointer.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
            return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
    }
    f64::NAN
}

/// The process's peak resident memory in MB (`VmHWM`; Linux), NaN elsewhere.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Resets the peak resident memory to the current one (Linux `clear_refs` 5), so that
/// [`peak_rss_mb`] measures from here; false where the kernel does not allow it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Mean and sample standard deviation (0 for one value).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}
