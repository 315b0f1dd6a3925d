//! Time per op kind, forward and backward apart, and the share of subnormal values among the
//! GEMM operands each kind produces (counted as stored, so run with `FOURIERFT_SUBNORMALS=ieee`
//! to see where they arise: with flush-to-zero on, none are produced). Off unless [`enable`]
//! was called; then every op pays a clock read and a pass over its operands. (The demo's
//! `--profile`.)

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default, Clone, Copy)]
struct Entry {
    time: Duration,
    /// Process CPU time (all threads) over the same intervals: `cpu / time` is how many cores
    /// the kind kept busy.
    cpu: Duration,
    calls: u64,
    values: u64,
    subnormal: u64,
}

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<&'static str, Entry>> = Mutex::new(BTreeMap::new());

pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

fn with(kind: &'static str, f: impl FnOnce(&mut Entry)) {
    let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    f(t.entry(kind).or_default());
}

/// CPU time of the whole process so far (user + system, all threads).
pub fn process_cpu() -> Duration {
    #[cfg(unix)]
    {
        // SAFETY: getrusage writes into the zeroed struct we own.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
            let tv = |t: libc::timeval| {
                Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
            };
            return tv(ru.ru_utime) + tv(ru.ru_stime);
        }
    }
    Duration::ZERO
}

/// A point in time on both clocks.
#[derive(Clone, Copy)]
pub struct Stamp {
    wall: Instant,
    cpu: Duration,
}

impl Stamp {
    /// (The CPU clock is read only while profiling: it is a system call.)
    pub fn now() -> Self {
        Self {
            wall: Instant::now(),
            cpu: if enabled() {
                process_cpu()
            } else {
                Duration::ZERO
            },
        }
    }
}

/// Runs `f`, adding its wall and CPU time to `kind` when profiling.
pub fn time<R>(kind: &'static str, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    let start = Stamp::now();
    let r = f();
    add(kind, start);
    r
}

/// Adds the interval from `start` to now to `kind`.
pub fn add(kind: &'static str, start: Stamp) {
    let (wall, cpu) = (
        start.wall.elapsed(),
        process_cpu().saturating_sub(start.cpu),
    );
    with(kind, |e| {
        e.time += wall;
        e.cpu += cpu;
        e.calls += 1;
    });
}

/// Counts the subnormal values of a GEMM operand produced by `kind`.
pub fn subnormals(kind: &'static str, data: &[f32]) {
    if !enabled() {
        return;
    }
    let sub = data.iter().filter(|v| v.is_subnormal()).count() as u64;
    with(kind, |e| {
        e.values += data.len() as u64;
        e.subnormal += sub;
    });
}

pub fn reset() {
    TABLE.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// One line per kind: total ms, ms per step, calls, and the subnormal share of its operands;
/// `rest (fwd)` / `rest (bwd)` are the step's forward / backward minus the timed kinds
/// (head, loss, candle's gradient bookkeeping, the frozen key projection's backward).
pub fn report(steps: usize) -> String {
    let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    for (total, suffix, rest) in [
        ("step: forward (all)", "(fwd)", "rest (fwd)"),
        ("step: backward (all)", "(bwd)", "rest (bwd)"),
    ] {
        let Some((all, all_cpu)) = t.get(total).map(|e| (e.time, e.cpu)) else {
            continue;
        };
        let (parts, parts_cpu) = t
            .iter()
            .filter(|(k, _)| k.ends_with(suffix))
            .fold((Duration::ZERO, Duration::ZERO), |(w, c), (_, e)| {
                (w + e.time, c + e.cpu)
            });
        t.insert(
            rest,
            Entry {
                time: all.saturating_sub(parts),
                cpu: all_cpu.saturating_sub(parts_cpu),
                ..Default::default()
            },
        );
    }
    let total: f64 = t
        .iter()
        .filter(|(k, _)| !k.starts_with("step"))
        .map(|(_, e)| e.time.as_secs_f64())
        .sum();
    let mut out = format!(
        "{:<34} {:>10} {:>10} {:>10} {:>6} {:>7} {:>8} {:>14}\n",
        "op kind", "total ms", "ms/step", "CPU ms/st", "cores", "calls", "% timed", "subnormal ops"
    );
    for (k, e) in t.iter() {
        let ms = e.time.as_secs_f64() * 1e3;
        let sub = if e.values > 0 {
            format!(
                "{:.3}% of {:.1}M",
                100.0 * e.subnormal as f64 / e.values as f64,
                e.values as f64 / 1e6
            )
        } else {
            "-".into()
        };
        let cpu_ms = e.cpu.as_secs_f64() * 1e3;
        out += &format!(
            "{k:<34} {ms:>10.0} {:>10.1} {:>10.1} {:>6.2} {:>7} {:>7.1}% {sub:>14}\n",
            ms / steps.max(1) as f64,
            cpu_ms / steps.max(1) as f64,
            if ms > 0.0 { cpu_ms / ms } else { 0.0 },
            e.calls,
            if k.starts_with("step") {
                100.0
            } else {
                100.0 * e.time.as_secs_f64() / total.max(1e-12)
            }
        );
    }
    out
}

/// Identity on the forward; its backward records when the gradient reaches it (at the output
/// of an adapted projection: its backward starts; at its input: it has finished).
pub struct Mark {
    pub kind: &'static str,
    pub start: bool,
    pub clock: std::sync::Arc<Mutex<Option<Stamp>>>,
}

impl candle_core::CustomOp1 for Mark {
    fn name(&self) -> &'static str {
        "profile-mark"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((s.try_clone(l)?, l.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &candle_core::Tensor,
        _y: &candle_core::Tensor,
        g: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        let mut c = self.clock.lock().unwrap_or_else(|e| e.into_inner());
        if self.start {
            *c = Some(Stamp::now());
            if let Ok(v) = g.flatten_all().and_then(|g| g.to_vec1::<f32>()) {
                subnormals("grad into adapted q/v (bwd)", &v);
            }
        } else if let Some(t) = c.take() {
            add(self.kind, t);
        }
        Ok(Some(g.clone()))
    }
}
