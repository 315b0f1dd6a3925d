//! A small BERT encoder for the sentiment demo and its tests: MiniLM-L6 (all-MiniLM-L6-v2) from
//! its safetensors, with trainable adapters on the attention's query and value projections.
//!
//! Built for training on CPU with candle 0.11, where every pass over memory, every
//! graph node (candle zero-fills and accumulates a gradient buffer per node) and every
//! weight-sized GEMM shows in the step time. Per layer the graph has seven nodes:
//! - query and value ([`Proj`]), and the key through `fourierft::ops::frozen_linear`, whose
//!   backward computes dL/dx only, never a gradient for the frozen weight;
//! - attention as one custom op ([`attention`]): per sequence and head, small GEMMs
//!   (`fourierft::ops::gemm`, on strided views of the `(b, s, h)` tensors, so no head split or
//!   merge copies) around a fused masked softmax, with a hand-written backward from the saved probabilities;
//!   sequences run in parallel ([`attention_composed`] is the same from candle ops, for tests);
//! - attention output + residual + layer norm as one op ([`residual_norm`]), the FFN's first
//!   projection + GELU (erf form) as one op ([`linear_gelu`]), and FFN output + residual + layer
//!   norm ([`residual_norm`] again), each with a hand-written backward (candle's fused
//!   `LayerNorm` has no backward; [`LayerNorm::forward_composed`] and [`gelu`] are the
//!   single-step versions the tests compare with);
//! - the sentence embedding is the mask-weighted mean of the last hidden states.
//!
//! Query and value are [`Proj::Fourier`], [`Proj::Lora`] (a minimal LoRA, the baseline) or
//! [`Proj::Frozen`]. The custom ops run on the CPU only.
#![allow(dead_code)] // each user (example, test) uses a different part

use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor, Var, D};
use candle_nn::{Embedding, VarBuilder};
use fourierft::ops::gemm::{matmul_into, Mat};
use fourierft::{FourierFTConfig, FourierLinear};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Deserialize;
use std::path::Path;

/// The fields of a BERT `config.json` the encoder uses (other keys are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Config = serde_json::from_str(&text)?;
        if cfg.hidden_act != "gelu" {
            bail!(
                "only hidden_act = \"gelu\" is supported, found {:?}",
                cfg.hidden_act
            );
        }
        Ok(cfg)
    }
}

/// A minimal LoRA (PEFT's `LoraConfig` defaults: A Kaiming-uniform, B zero, dropout 0):
/// `y = base(x) + (alpha/r)·(x·Aᵀ)·Bᵀ`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub seed: u64,
}

/// What to attach to the query and value projections.
#[derive(Debug, Clone)]
pub enum Adapter {
    /// Nothing: the encoder is frozen.
    None,
    /// A FourierFT adapter (`fourierft::linear`).
    FourierFT(Box<FourierFTConfig>),
    /// A LoRA adapter.
    Lora(LoraConfig),
}

// ---------------------------------------------------------------------------------------------
// Profiling (the demo's --profile): time per op kind, and how many GEMM operands are subnormal

/// Time per op kind, forward and backward apart, and the share of subnormal values among the
/// GEMM operands each kind produces (counted as stored, so run with `FOURIERFT_SUBNORMALS=ieee`
/// to see where they arise: with flush-to-zero on, none are produced). Off unless
/// [`profile::enable`] was called; then every op pays a clock read and a pass over its operands.
pub mod profile {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    #[derive(Default, Clone, Copy)]
    struct Entry {
        time: Duration,
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

    /// Runs `f`, adding its wall time to `kind` when profiling.
    pub fn time<R>(kind: &'static str, f: impl FnOnce() -> R) -> R {
        if !enabled() {
            return f();
        }
        let start = Instant::now();
        let r = f();
        add(kind, start.elapsed());
        r
    }

    pub fn add(kind: &'static str, d: Duration) {
        with(kind, |e| {
            e.time += d;
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
            let Some(all) = t.get(total).map(|e| e.time) else {
                continue;
            };
            let parts: Duration = t
                .iter()
                .filter(|(k, _)| k.ends_with(suffix))
                .map(|(_, e)| e.time)
                .sum();
            t.insert(
                rest,
                Entry {
                    time: all.saturating_sub(parts),
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
            "{:<34} {:>10} {:>10} {:>7} {:>8} {:>14}\n",
            "op kind", "total ms", "ms/step", "calls", "% timed", "subnormal ops"
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
            out += &format!(
                "{k:<34} {ms:>10.0} {:>10.1} {:>7} {:>7.1}% {sub:>14}\n",
                ms / steps.max(1) as f64,
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
        pub clock: std::sync::Arc<Mutex<Option<Instant>>>,
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
                *c = Some(Instant::now());
                if let Ok(v) = g.flatten_all().and_then(|g| g.to_vec1::<f32>()) {
                    subnormals("grad into adapted q/v (bwd)", &v);
                }
            } else if let Some(t) = c.take() {
                add(self.kind, t.elapsed());
            }
            Ok(Some(g.clone()))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frozen ops (custom ops whose backward returns only dL/dx)

/// Borrows the f32 data of a contiguous CPU tensor and calls `f` on it.
fn with_f32<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        bail!("the demo's custom ops need f32 tensors on the CPU");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .context("contiguous tensor expected")?;
    f(&data[start..end])
}

fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{what}: f32 input expected")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: contiguous input expected"),
    }
}

fn to_candle(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}

/// A linear layer whose weight and bias are never trained.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: weight.detach(),
            bias: bias.map(|b| b.detach()),
        }
    }

    pub fn load(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self::new(
            vb.get((out_dim, in_dim), "weight")?,
            Some(vb.get(out_dim, "bias")?),
        ))
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for FrozenLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let (inp, out) = (dims[dims.len() - 1], self.weight.dim(0)?);
        let x2 = x.reshape(((), inp))?;
        let y = fourierft::ops::frozen_linear(&x2, &self.weight, self.bias.as_ref())
            .map_err(fourierft::Error::into_candle)?;
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = out;
        y.reshape(out_dims)
    }
}

/// Layer norm over the last dim with frozen gain and bias, hand-written with its backward:
/// dL/dx = rstd·(g' − mean(g') − x̂·mean(g'·x̂)), g' = g·γ.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    pub fn load(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?.to_vec1::<f32>()?;
        let bias = vb.get(dim, "bias")?.to_vec1::<f32>()?;
        Ok(Self {
            weight,
            bias,
            eps: eps as f32,
        })
    }

    /// The same layer norm composed of candle ops (differentiable, slower): for tests.
    pub fn forward_composed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let n = self.weight.len();
        let w = Tensor::from_slice(&self.weight, n, x.device())?;
        let b = Tensor::from_slice(&self.bias, n, x.device())?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps as f64)?.sqrt()?)?;
        xn.broadcast_mul(&w)?.broadcast_add(&b)
    }
}

/// Mean and 1/std of one row.
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = sum8(row.iter().copied()) / n;
    let var = sum8(row.iter().map(|v| (v - mean) * (v - mean))) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// A sum with 8 independent accumulators (so that it vectorises).
#[inline(always)]
fn sum8(it: impl Iterator<Item = f32>) -> f32 {
    let mut acc = [0f32; 8];
    for (i, v) in it.enumerate() {
        acc[i % 8] += v;
    }
    acc.iter().sum()
}

/// Rows per rayon task: small tensors stay on one thread.
const ROWS_PER_TASK: usize = 64;

impl LayerNorm {
    /// `y = LN(x)` over rows of the layer's width, in parallel.
    fn forward_rows(&self, y: &mut [f32], x: &[f32]) {
        let n = self.weight.len();
        y.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_mut(n).zip(xc.chunks(n)) {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    for i in 0..n {
                        yr[i] = (xr[i] - mean) * rstd * self.weight[i] + self.bias[i];
                    }
                }
            });
    }

    /// `dx = dL/dx` from the input `x` and `g = dL/dy`, over rows, in parallel.
    fn backward_rows(&self, dx: &mut [f32], x: &[f32], g: &[f32]) {
        let n = self.weight.len();
        dx.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .zip(g.par_chunks(n * ROWS_PER_TASK))
            .for_each(|((dc, xc), gc)| {
                for ((dr, xr), gr) in dc.chunks_mut(n).zip(xc.chunks(n)).zip(gc.chunks(n)) {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    let w = &self.weight;
                    let sg = sum8((0..n).map(|i| gr[i] * w[i]));
                    let sgx = sum8((0..n).map(|i| gr[i] * w[i] * (xr[i] - mean) * rstd));
                    let (mg, mgx) = (sg / n as f32, sgx / n as f32);
                    for i in 0..n {
                        let xh = (xr[i] - mean) * rstd;
                        dr[i] = rstd * (gr[i] * w[i] - mg - xh * mgx);
                    }
                }
            });
    }
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "layer-norm")?;
        let mut y = vec![0f32; x.len()];
        self.forward_rows(&mut y, x);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let start = std::time::Instant::now();
        let dx = with_f32(x, |x| {
            with_f32(g, |g| {
                let mut dx = vec![0f32; x.len()];
                self.backward_rows(&mut dx, x, g);
                Ok(dx)
            })
        })
        .map_err(to_candle)?;
        if profile::enabled() {
            profile::add("embeddings + norm (bwd)", start.elapsed());
        }
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }
}

/// GELU (erf form, as BERT's "gelu") with a one-pass backward.
#[derive(Debug, Clone, Copy)]
struct Gelu;

/// e^x for f32 without a libm call (Cephes' expf polynomial; relative error ~2e-7), written
/// branch-free so that loops over it vectorise.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    let arg = x;
    let x = x.clamp(-87.0, 88.0);
    // Adding 1.5·2^23 rounds x·log2(e) to an integer n, held in the low mantissa bits of `z`
    // (no float-to-int conversion, so that the loop vectorises).
    let z = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = z - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    let n = (z.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let y = e * f32::from_bits(((n + 127) as u32) << 23);
    // Below −87, e^x is under f32::MIN_POSITIVE: return 0, as exp underflows for torch, instead
    // of e^−87 — which a softmax's 1/sum turns into a subnormal probability for every masked
    // key, whose gradients then stay subnormal through the whole backward (docs/PERFORMANCE.md).
    if arg < -87.0 {
        0.0
    } else {
        y
    }
}

/// erf for f32 (Abramowitz–Stegun 7.1.26, absolute error < 1.5e-7, the approximation PyTorch's
/// vectorised CPU erf also uses), branch-free.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    (1.0 - poly * exp_f32(-a * a)).copysign(x)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "gelu")?;
        let mut y = vec![0f32; x.len()];
        gelu_par(&mut y, x);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = with_f32(x, |x| {
            with_f32(g, |g| {
                let mut dx = vec![0f32; x.len()];
                gelu_grad_par(&mut dx, x, g);
                Ok(dx)
            })
        })
        .map_err(to_candle)?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// The elementwise GELU loops, compiled twice: for the baseline target (SSE2) and, chosen at run
/// time, for AVX2 + FMA (about 3× faster here); the same scalar code, vectorised by the compiler.
mod simd {
    use super::{erf, exp_f32, FRAC_1_SQRT_2, FRAC_1_SQRT_2PI};

    #[inline(always)]
    fn gelu_loop(y: &mut [f32], x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2));
        }
    }

    #[inline(always)]
    fn gelu_grad_loop(d: &mut [f32], x: &[f32], g: &[f32]) {
        for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
            let pdf = FRAC_1_SQRT_2PI * exp_f32(-0.5 * x * x);
            *d = g * (cdf + x * pdf);
        }
    }

    /// One row of [`super::MaskedSoftmax`].
    #[inline(always)]
    fn masked_softmax_loop(y: &mut [f32], x: &[f32], mask: &[f32], scale: f32) {
        let mut max = [f32::NEG_INFINITY; 8];
        for ((y, &x), &m) in y.iter_mut().zip(x).zip(mask) {
            *y = x * scale + m;
        }
        for (i, &v) in y.iter().enumerate() {
            max[i % 8] = max[i % 8].max(v);
        }
        let max = max.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for y in y.iter_mut() {
            *y = exp_f32(*y - max);
        }
        let inv = 1.0 / super::sum8(y.iter().copied());
        for y in y.iter_mut() {
            *y *= inv;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn masked_softmax_avx2(y: &mut [f32], x: &[f32], mask: &[f32], scale: f32) {
        masked_softmax_loop(y, x, mask, scale)
    }

    pub fn masked_softmax(y: &mut [f32], x: &[f32], mask: &[f32], scale: f32) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { masked_softmax_avx2(y, x, mask, scale) };
        }
        masked_softmax_loop(y, x, mask, scale)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn gelu_avx2(y: &mut [f32], x: &[f32]) {
        gelu_loop(y, x)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn gelu_grad_avx2(d: &mut [f32], x: &[f32], g: &[f32]) {
        gelu_grad_loop(d, x, g)
    }

    #[cfg(target_arch = "x86_64")]
    fn has_avx2() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    pub fn gelu(y: &mut [f32], x: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { gelu_avx2(y, x) };
        }
        gelu_loop(y, x)
    }

    pub fn gelu_grad(d: &mut [f32], x: &[f32], g: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { gelu_grad_avx2(d, x, g) };
        }
        gelu_grad_loop(d, x, g)
    }
}

/// Elements per rayon task in elementwise ops.
const ELEMS_PER_TASK: usize = 16384;

/// `y = gelu(x)` elementwise, in parallel.
fn gelu_par(y: &mut [f32], x: &[f32]) {
    y.par_chunks_mut(ELEMS_PER_TASK)
        .zip(x.par_chunks(ELEMS_PER_TASK))
        .for_each(|(yc, xc)| simd::gelu(yc, xc));
}

/// `d = g·gelu′(x)` elementwise, in parallel.
fn gelu_grad_par(d: &mut [f32], x: &[f32], g: &[f32]) {
    d.par_chunks_mut(ELEMS_PER_TASK)
        .zip(x.par_chunks(ELEMS_PER_TASK))
        .zip(g.par_chunks(ELEMS_PER_TASK))
        .for_each(|((dc, xc), gc)| simd::gelu_grad(dc, xc, gc));
}

pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

/// Block `i` of length `len` of `t`.
fn slab(t: &[f32], i: usize, len: usize) -> &[f32] {
    &t[i * len..(i + 1) * len]
}

/// Rows `[0, rows)` × columns `[col, col + cols)` of a row-major matrix with `stride` values per
/// row (one head of a `(s, h)` slab, or a whole `(s, s)` matrix), as a checked view.
fn block(
    data: &[f32],
    rows: usize,
    stride: usize,
    col: usize,
    cols: usize,
) -> fourierft::Result<Mat<'_>> {
    Mat::strided(
        "matrix block",
        data.get(col..).unwrap_or_default(),
        rows,
        cols,
        stride,
        1,
    )
}

/// `dst = a·b` on the calling thread, `dst_rs` values per row of `dst`: attention's per-head
/// products are small, so the op parallelises over sequences instead.
fn head_gemm(dst: &mut [f32], dst_rs: usize, a: Mat, b: Mat) -> fourierft::Result<()> {
    matmul_into(dst, dst_rs, a, b, false, 1)
}

/// `dst += a·b` for contiguous `a` `(m, k)`, on all rayon threads.
fn par_gemm_acc(dst: &mut [f32], a: &[f32], m: usize, k: usize, b: Mat) -> fourierft::Result<()> {
    let a = Mat::new("operand", a, m, k)?;
    matmul_into(dst, b.cols(), a, b, true, rayon::current_num_threads())
}

/// Multi-head self-attention as one op on `(b, s, h)` query, key and value tensors: per sequence
/// and head, `P = softmax(Q·Kᵀ/√hd + mask)` and `O = P·V`, written straight into the `(b, s, h)`
/// output (no head split or merge copies). The backward recomputes nothing: from the saved `P`,
/// `dV = Pᵀ·dO`, `dS = P∘(dP − Σ dP∘P)/√hd` with `dP = dO·Vᵀ`, `dQ = dS·K`, `dK = dSᵀ·Q`.
/// Sequences run in parallel. The same attention from candle ops is [`attention_composed`].
struct Attention {
    heads: usize,
    /// Additive key mask `(b, s)`: 0 for tokens, −1e9 for padding.
    mask: Vec<f32>,
    /// `P` `(b, heads, s, s)` from the forward, for the backward.
    probs: std::sync::OnceLock<Vec<f32>>,
}

impl Attention {
    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, s, h) = l.shape().dims3()?;
        if h % self.heads != 0 || self.mask.len() != b * s {
            candle_core::bail!(
                "attention: {:?} with {} heads and a mask of {}",
                l.dims(),
                self.heads,
                self.mask.len()
            );
        }
        Ok((b, s, h, h / self.heads))
    }
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, s, h, hd) = self.dims(ql)?;
        if kl.dims() != ql.dims() || vl.dims() != ql.dims() {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?}",
                ql.dims(),
                kl.dims(),
                vl.dims()
            );
        }
        let (q, k, v) = (
            cpu_f32(qs, ql, "query")?,
            cpu_f32(ks, kl, "key")?,
            cpu_f32(vs, vl, "value")?,
        );
        let scale = 1.0 / (hd as f32).sqrt();
        let heads = self.heads;
        let mut out = vec![0f32; b * s * h];
        let mut probs = vec![0f32; b * heads * s * s];
        out.par_chunks_mut(s * h)
            .zip(probs.par_chunks_mut(heads * s * s))
            .enumerate()
            .try_for_each(|(bi, (o, p))| {
                let (q, k, v) = (slab(q, bi, s * h), slab(k, bi, s * h), slab(v, bi, s * h));
                let mask = &self.mask[bi * s..(bi + 1) * s];
                let mut scores = vec![0f32; s * s];
                for (hi, p) in p.chunks_mut(s * s).enumerate() {
                    let c = hi * hd;
                    let (qh, kh) = (block(q, s, h, c, hd)?, block(k, s, h, c, hd)?);
                    head_gemm(&mut scores, s, qh, kh.t())?;
                    for (pr, sr) in p.chunks_mut(s).zip(scores.chunks(s)) {
                        simd::masked_softmax(pr, sr, mask, scale);
                    }
                    head_gemm(
                        &mut o[c..],
                        h,
                        block(p, s, s, 0, s)?,
                        block(v, s, h, c, hd)?,
                    )?;
                }
                Ok::<(), fourierft::Error>(())
            })?;
        profile::subnormals("attention (fwd)", &probs);
        let _ = self.probs.set(probs);
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let start = std::time::Instant::now();
        let (b, s, h, hd) = self.dims(q.layout())?;
        let probs = self
            .probs
            .get()
            .ok_or_else(|| candle_core::Error::msg("attention: backward before forward"))?;
        let scale = 1.0 / (hd as f32).sqrt();
        let heads = self.heads;
        let n = b * s * h;
        let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(grad, |g| {
                        dq.par_chunks_mut(s * h)
                            .zip(dk.par_chunks_mut(s * h))
                            .zip(dv.par_chunks_mut(s * h))
                            .enumerate()
                            .try_for_each(|(bi, ((dq, dk), dv))| {
                                let sl = |t| slab(t, bi, s * h);
                                let (q, k, v, g) = (sl(q), sl(k), sl(v), sl(g));
                                let p_all = &probs[bi * heads * s * s..(bi + 1) * heads * s * s];
                                let mut ds = vec![0f32; s * s];
                                for (hi, p) in p_all.chunks(s * s).enumerate() {
                                    let c = hi * hd;
                                    let pv = block(p, s, s, 0, s)?;
                                    let gh = block(g, s, h, c, hd)?;
                                    head_gemm(&mut dv[c..], h, pv.t(), gh)?;
                                    head_gemm(&mut ds, s, gh, block(v, s, h, c, hd)?.t())?;
                                    for (dr, pr) in ds.chunks_mut(s).zip(p.chunks(s)) {
                                        let dot = sum8(dr.iter().zip(pr).map(|(d, p)| d * p));
                                        for (d, p) in dr.iter_mut().zip(pr) {
                                            *d = scale * p * (*d - dot);
                                        }
                                    }
                                    let dsv = block(&ds, s, s, 0, s)?;
                                    head_gemm(&mut dq[c..], h, dsv, block(k, s, h, c, hd)?)?;
                                    head_gemm(&mut dk[c..], h, dsv.t(), block(q, s, h, c, hd)?)?;
                                }
                                Ok::<(), fourierft::Error>(())
                            })?;
                        Ok(())
                    })
                })
            })
        })
        .map_err(to_candle)?;
        if profile::enabled() {
            for d in [&dq, &dk, &dv] {
                profile::subnormals("attention (bwd)", d);
            }
            profile::add("attention (bwd)", start.elapsed());
        }
        let t = |d: Vec<f32>| Tensor::from_vec(d, (b, s, h), q.device());
        Ok((Some(t(dq)?), Some(t(dk)?), Some(t(dv)?)))
    }
}

/// Multi-head self-attention core on `(b, s, h)` tensors ([`Attention`], one op). `mask` is
/// `(b, s)`, 1 for tokens and 0 for padding.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let mask = mask
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|m| (1.0 - m) * -1e9)
        .collect();
    let op = Attention {
        heads,
        mask,
        probs: std::sync::OnceLock::new(),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The same attention from candle ops only (`candle_nn::ops::softmax`): for tests.
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let (b, s, h) = q.dims3()?;
    let hd = h / heads;
    let split = |t: &Tensor| t.reshape((b, s, heads, hd))?.transpose(1, 2)?.contiguous();
    let neg = ((mask.ones_like()? - mask)? * -1e9)?.reshape((b, 1, 1, s))?;
    let q = (split(q)? * (1.0 / (hd as f64).sqrt()))?;
    let scores = q.matmul(&split(k)?.t()?)?.broadcast_add(&neg)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    probs
        .matmul(&split(v)?)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, s, h))
}

/// The bias of a frozen linear layer as a vector of `out` values (zeros without one).
fn bias_vec(proj: &FrozenLinear, out: usize) -> candle_core::Result<Vec<f32>> {
    match &proj.bias {
        Some(b) => b.to_vec1::<f32>(),
        None => Ok(vec![0f32; out]),
    }
}

/// `rows[t] = init[t] + bias` for every row `t` (of `bias.len()` values), in parallel.
fn rows_plus_bias(init: &[f32], bias: &[f32]) -> Vec<f32> {
    let n = bias.len();
    let mut out = vec![0f32; init.len()];
    out.par_chunks_mut(n * ROWS_PER_TASK)
        .zip(init.par_chunks(n * ROWS_PER_TASK))
        .for_each(|(oc, ic)| {
            for (or, ir) in oc.chunks_mut(n).zip(ic.chunks(n)) {
                for ((o, i), b) in or.iter_mut().zip(ir).zip(bias) {
                    *o = i + b;
                }
            }
        });
    out
}

/// `LN(x·Wᵀ + b + r)` — a frozen projection, the residual add and layer norm — as one op (the
/// attention-output and FFN-output sub-blocks), for `x` `(tokens, in)` and `r` `(tokens, out)`.
/// The backward, from the saved pre-norm sum `z`: `g_z = LN′(z)ᵀ·g`, `dL/dx = g_z·W`,
/// `dL/dr = g_z`. As separate nodes (linear, add, norm) candle would also zero-fill and
/// accumulate a gradient buffer per node.
struct ResidualNorm {
    proj: FrozenLinear,
    norm: LayerNorm,
    z: std::sync::OnceLock<Vec<f32>>,
    /// The profile's name for the backward.
    kind: &'static str,
}

impl candle_core::CustomOp2 for ResidualNorm {
    fn name(&self) -> &'static str {
        "linear-residual-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, r) = (
            cpu_f32(xs, xl, "projection input")?,
            cpu_f32(rs, rl, "residual")?,
        );
        let (out, inp) = self.proj.weight.dims2()?;
        let tokens = r.len() / out;
        if x.len() != tokens * inp || r.len() != tokens * out {
            candle_core::bail!(
                "residual norm: input {:?}, residual {:?}, weight ({out}, {inp})",
                xl.dims(),
                rl.dims()
            );
        }
        let mut z = rows_plus_bias(r, &bias_vec(&self.proj, out)?);
        with_f32(&self.proj.weight, |w| {
            par_gemm_acc(&mut z, x, tokens, inp, Mat::new("weight", w, out, inp)?.t())?;
            Ok(())
        })
        .map_err(to_candle)?;
        let mut y = vec![0f32; z.len()];
        self.norm.forward_rows(&mut y, &z);
        let _ = self.z.set(z);
        Ok((CpuStorage::F32(y), rl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        r: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let start = std::time::Instant::now();
        let z = self
            .z
            .get()
            .ok_or_else(|| candle_core::Error::msg("backward before forward"))?;
        let (out, inp) = self.proj.weight.dims2()?;
        let tokens = z.len() / out;
        let mut gz = vec![0f32; z.len()];
        with_f32(g, |g| {
            self.norm.backward_rows(&mut gz, z, g);
            Ok(())
        })
        .map_err(to_candle)?;
        profile::subnormals(self.kind, &gz);
        let dx = if x.track_op() {
            let mut dx = vec![0f32; tokens * inp];
            with_f32(&self.proj.weight, |w| {
                par_gemm_acc(&mut dx, &gz, tokens, out, Mat::new("weight", w, out, inp)?)?;
                Ok(())
            })
            .map_err(to_candle)?;
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        let dr = if r.track_op() {
            Some(Tensor::from_vec(gz, r.shape(), r.device())?)
        } else {
            None
        };
        if profile::enabled() {
            profile::add(self.kind, start.elapsed());
        }
        Ok((dx, dr))
    }
}

/// `LN(x·Wᵀ + b + r)` for `x` `(..., in)` and `r` `(..., out)` ([`ResidualNorm`]).
pub fn residual_norm(
    proj: &FrozenLinear,
    norm: &LayerNorm,
    x: &Tensor,
    r: &Tensor,
) -> candle_core::Result<Tensor> {
    residual_norm_kind(proj, norm, x, r, "attn out + norm (bwd)")
}

/// [`residual_norm`] with the profile's name for its backward.
fn residual_norm_kind(
    proj: &FrozenLinear,
    norm: &LayerNorm,
    x: &Tensor,
    r: &Tensor,
    kind: &'static str,
) -> candle_core::Result<Tensor> {
    let op = ResidualNorm {
        proj: proj.clone(),
        norm: norm.clone(),
        z: std::sync::OnceLock::new(),
        kind,
    };
    let x2 = x.reshape(((), x.dim(D::Minus1)?))?.contiguous()?;
    x2.apply_op2(&r.contiguous()?, op)
}

/// `gelu(x·Wᵀ + b)` — the FFN's first projection and activation — as one op, for `x`
/// `(tokens, in)`; the backward `dL/dx = (g∘gelu′(p))·W` uses the saved pre-activation `p`.
struct LinearGelu {
    proj: FrozenLinear,
    pre: std::sync::OnceLock<Vec<f32>>,
}

impl CustomOp1 for LinearGelu {
    fn name(&self) -> &'static str {
        "linear-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "linear-gelu input")?;
        let (out, inp) = self.proj.weight.dims2()?;
        let tokens = x.len() / inp;
        if x.len() != tokens * inp {
            candle_core::bail!("linear-gelu: input {:?}, weight ({out}, {inp})", l.dims());
        }
        let mut pre = rows_plus_bias(&vec![0f32; tokens * out], &bias_vec(&self.proj, out)?);
        with_f32(&self.proj.weight, |w| {
            par_gemm_acc(
                &mut pre,
                x,
                tokens,
                inp,
                Mat::new("weight", w, out, inp)?.t(),
            )?;
            Ok(())
        })
        .map_err(to_candle)?;
        let mut y = vec![0f32; pre.len()];
        gelu_par(&mut y, &pre);
        profile::subnormals("FFN in + GELU (fwd)", &y);
        let _ = self.pre.set(pre);
        Ok((CpuStorage::F32(y), Shape::from((tokens, out))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let start = std::time::Instant::now();
        let pre = self
            .pre
            .get()
            .ok_or_else(|| candle_core::Error::msg("backward before forward"))?;
        let (out, inp) = self.proj.weight.dims2()?;
        let tokens = pre.len() / out;
        let mut dpre = vec![0f32; pre.len()];
        let mut dx = vec![0f32; tokens * inp];
        with_f32(g, |g| {
            gelu_grad_par(&mut dpre, pre, g);
            profile::subnormals("FFN in + GELU (bwd)", &dpre);
            with_f32(&self.proj.weight, |w| {
                par_gemm_acc(
                    &mut dx,
                    &dpre,
                    tokens,
                    out,
                    Mat::new("weight", w, out, inp)?,
                )?;
                Ok(())
            })
        })
        .map_err(to_candle)?;
        if profile::enabled() {
            profile::add("FFN in + GELU (bwd)", start.elapsed());
        }
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `gelu(x·Wᵀ + b)` for `x` `(..., in)` ([`LinearGelu`]).
pub fn linear_gelu(proj: &FrozenLinear, x: &Tensor) -> candle_core::Result<Tensor> {
    let op = LinearGelu {
        proj: proj.clone(),
        pre: std::sync::OnceLock::new(),
    };
    let mut dims = x.dims().to_vec();
    let last = dims.len() - 1;
    let x2 = x.reshape(((), dims[last]))?.contiguous()?;
    dims[last] = proj.weight.dim(0)?;
    x2.apply_op1(op)?.reshape(dims)
}

// ---------------------------------------------------------------------------------------------
// Projections with adapters

/// LoRA on a frozen linear layer.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: FrozenLinear,
    a: Var, // (r, in)
    b: Var, // (out, r)
    scale: f64,
}

impl LoraLinear {
    pub fn new(base: FrozenLinear, cfg: &LoraConfig, name: &str) -> Result<Self> {
        let (out, inp) = base.weight.dims2()?;
        let dev = base.weight.device().clone();
        // Kaiming-uniform with a = sqrt(5) (PEFT / torch Linear default): U(-1/sqrt(in), 1/sqrt(in)).
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ fnv1a(name));
        let bound = 1.0 / (inp as f32).sqrt();
        let a: Vec<f32> = (0..cfg.r * inp)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Ok(Self {
            base,
            a: Var::from_tensor(&Tensor::from_vec(a, (cfg.r, inp), &dev)?)?,
            b: Var::zeros((out, cfg.r), DType::F32, &dev)?,
            scale: cfg.alpha / cfg.r as f64,
        })
    }

    pub fn vars(&self) -> Vec<Var> {
        vec![self.a.clone(), self.b.clone()]
    }

    pub fn num_trainable(&self) -> usize {
        self.a.elem_count() + self.b.elem_count()
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x)?;
        let dims = x.dims().to_vec();
        let x2 = x.reshape(((), dims[dims.len() - 1]))?;
        let up = x2
            .matmul(&self.a.as_tensor().t()?)?
            .matmul(&self.b.as_tensor().t()?)?;
        let up = (up * self.scale)?.reshape(y.shape())?;
        y + up
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A query or value projection.
#[derive(Debug, Clone)]
pub enum Proj {
    Frozen(FrozenLinear),
    Fourier(FourierLinear),
    Lora(LoraLinear),
}

impl Proj {
    fn load(dim: usize, adapter: &Adapter, vb: VarBuilder) -> Result<Self> {
        Ok(match adapter {
            Adapter::None => Proj::Frozen(FrozenLinear::load(dim, dim, vb)?),
            Adapter::FourierFT(cfg) => Proj::Fourier(fourierft::linear(dim, dim, cfg, vb)?),
            Adapter::Lora(cfg) => {
                let name = vb.prefix();
                Proj::Lora(LoraLinear::new(
                    FrozenLinear::load(dim, dim, vb)?,
                    cfg,
                    &name,
                )?)
            }
        })
    }

    pub fn vars(&self) -> Vec<Var> {
        match self {
            Proj::Frozen(_) => vec![],
            Proj::Fourier(l) => l.trainable_vars(),
            Proj::Lora(l) => l.vars(),
        }
    }

    pub fn num_trainable(&self) -> usize {
        match self {
            Proj::Frozen(_) => 0,
            Proj::Fourier(l) => l.num_trainable(),
            Proj::Lora(l) => l.num_trainable(),
        }
    }
}

impl Module for Proj {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Proj::Frozen(l) => l.forward(x),
            Proj::Fourier(l) => l.forward(x),
            Proj::Lora(l) => l.forward(x),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The encoder

struct Layer {
    query: Proj,
    key: FrozenLinear,
    value: Proj,
    attn_out: FrozenLinear,
    attn_norm: LayerNorm,
    ffn_in: FrozenLinear,
    ffn_out: FrozenLinear,
    ffn_norm: LayerNorm,
}

/// MiniLM / BERT encoder with adapters on query and value.
pub struct Encoder {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    pub config: Config,
}

impl Encoder {
    /// Loads the encoder from `vb` (keys as in MiniLM's safetensors: `embeddings.*`,
    /// `encoder.layer.{i}.*`), with `adapter` on every query and value.
    pub fn load(vb: VarBuilder, config: &Config, adapter: &Adapter) -> Result<Self> {
        let h = config.hidden_size;
        if h % config.num_attention_heads != 0 {
            bail!("hidden_size {h} is not a multiple of num_attention_heads");
        }
        let eps = config.layer_norm_eps;
        let e = vb.pp("embeddings");
        let emb = |n: usize, name: &str| -> Result<Embedding> {
            Ok(Embedding::new(e.pp(name).get((n, h), "weight")?, h))
        };
        let word = emb(config.vocab_size, "word_embeddings")?;
        let position = emb(config.max_position_embeddings, "position_embeddings")?;
        let token_type = emb(config.type_vocab_size, "token_type_embeddings")?;
        let emb_norm = LayerNorm::load(h, eps, e.pp("LayerNorm"))?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let att = l.pp("attention");
            let s = att.pp("self");
            layers.push(Layer {
                query: Proj::load(h, adapter, s.pp("query"))?,
                key: FrozenLinear::load(h, h, s.pp("key"))?,
                value: Proj::load(h, adapter, s.pp("value"))?,
                attn_out: FrozenLinear::load(h, h, att.pp("output").pp("dense"))?,
                attn_norm: LayerNorm::load(h, eps, att.pp("output").pp("LayerNorm"))?,
                ffn_in: FrozenLinear::load(
                    h,
                    config.intermediate_size,
                    l.pp("intermediate").pp("dense"),
                )?,
                ffn_out: FrozenLinear::load(
                    config.intermediate_size,
                    h,
                    l.pp("output").pp("dense"),
                )?,
                ffn_norm: LayerNorm::load(h, eps, l.pp("output").pp("LayerNorm"))?,
            });
        }
        Ok(Self {
            word,
            position,
            token_type,
            emb_norm,
            layers,
            heads: config.num_attention_heads,
            config: config.clone(),
        })
    }

    /// Loads MiniLM from a directory holding `model.safetensors` and `config.json`.
    pub fn from_dir(dir: &Path, adapter: &Adapter) -> Result<Self> {
        let config = Config::from_file(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        // SAFETY: the file is not modified while mapped (it is a read-only downloaded asset).
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)? };
        Self::load(vb, &config, adapter)
    }

    /// Last hidden states `(batch, seq, hidden)` for token ids `(batch, seq)` (u32) and an
    /// attention mask `(batch, seq)` (f32, 1 for tokens, 0 for padding).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let s = ids.dim(1)?;
        let dev = ids.device();
        let positions = Tensor::arange(0u32, s as u32, dev)?;
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.position.forward(&positions)?)?
            .broadcast_add(
                &self
                    .token_type
                    .forward(&Tensor::zeros(1, DType::U32, dev)?)?,
            )?;
        let mut x = profile::time("embeddings + norm (fwd)", || self.emb_norm.forward(&x))?;
        for layer in &self.layers {
            let adapted = |p: &Proj, x: &Tensor| -> candle_core::Result<Tensor> {
                if !profile::enabled() || p.vars().is_empty() {
                    return profile::time("adapted q/v (fwd)", || p.forward(x));
                }
                // Marks around the projection time its backward (see profile::Mark).
                let clock = std::sync::Arc::new(std::sync::Mutex::new(None));
                let mark = |start| profile::Mark {
                    kind: "adapted q/v (bwd)",
                    start,
                    clock: clock.clone(),
                };
                let x = x.apply_op1(mark(false))?;
                let y = profile::time("adapted q/v (fwd)", || p.forward(&x))?;
                y.apply_op1(mark(true))
            };
            let q = adapted(&layer.query, &x)?;
            let k = profile::time("frozen key proj (fwd)", || layer.key.forward(&x))?;
            let v = adapted(&layer.value, &x)?;
            let ctx = profile::time("attention (fwd)", || {
                attention(&q, &k, &v, self.heads, mask)
            })?;
            let a = profile::time("attn out + norm (fwd)", || {
                residual_norm(&layer.attn_out, &layer.attn_norm, &ctx, &x)
            })?;
            let act = profile::time("FFN in + GELU (fwd)", || linear_gelu(&layer.ffn_in, &a))?;
            x = profile::time("FFN out + norm (fwd)", || {
                residual_norm_kind(
                    &layer.ffn_out,
                    &layer.ffn_norm,
                    &act,
                    &a,
                    "FFN out + norm (bwd)",
                )
            })?;
        }
        Ok(x)
    }

    /// Sentence embeddings `(batch, hidden)`: mask-weighted mean of the last hidden states.
    pub fn embed(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        mean_pool(&self.forward(ids, mask)?, mask)
    }

    /// The trainable adapter parameters (empty without adapters).
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.projections()
            .flat_map(|(_, p)| p.vars())
            .collect::<Vec<_>>()
    }

    /// Number of trainable adapter parameters.
    pub fn num_trainable(&self) -> usize {
        self.projections().map(|(_, p)| p.num_trainable()).sum()
    }

    /// (module path, projection) for every query and value, in layer order.
    pub fn projections(&self) -> impl Iterator<Item = (String, &Proj)> {
        self.layers.iter().enumerate().flat_map(|(i, l)| {
            let p = format!("encoder.layer.{i}.attention.self");
            [
                (format!("{p}.query"), &l.query),
                (format!("{p}.value"), &l.value),
            ]
        })
    }

    /// The FourierFT layers (module path, layer handle).
    pub fn fourier_layers(&self) -> Vec<(String, FourierLinear)> {
        self.projections()
            .filter_map(|(n, p)| match p {
                Proj::Fourier(l) => Some((n, l.clone())),
                _ => None,
            })
            .collect()
    }

    /// Every frozen weight the encoder computes with, named as in the safetensors file (for
    /// FourierFT layers: the current weight, which holds ΔW while merged).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let dev = Device::Cpu;
        let ln = |name: String, l: &LayerNorm| -> Result<[(String, Tensor); 2]> {
            Ok([
                (
                    format!("{name}.weight"),
                    Tensor::new(l.weight.as_slice(), &dev)?,
                ),
                (
                    format!("{name}.bias"),
                    Tensor::new(l.bias.as_slice(), &dev)?,
                ),
            ])
        };
        let lin = |name: String, l: &FrozenLinear| -> Vec<(String, Tensor)> {
            let mut v = vec![(format!("{name}.weight"), l.weight.clone())];
            v.extend(l.bias.clone().map(|b| (format!("{name}.bias"), b)));
            v
        };
        let e = "embeddings";
        let mut out = vec![
            (
                format!("{e}.word_embeddings.weight"),
                self.word.embeddings().clone(),
            ),
            (
                format!("{e}.position_embeddings.weight"),
                self.position.embeddings().clone(),
            ),
            (
                format!("{e}.token_type_embeddings.weight"),
                self.token_type.embeddings().clone(),
            ),
        ];
        out.extend(ln(format!("{e}.LayerNorm"), &self.emb_norm)?);
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("encoder.layer.{i}");
            for (name, proj) in [("query", &l.query), ("value", &l.value)] {
                let name = format!("{p}.attention.self.{name}");
                match proj {
                    Proj::Frozen(f) => out.extend(lin(name, f)),
                    Proj::Lora(lora) => out.extend(lin(name, &lora.base)),
                    Proj::Fourier(f) => {
                        out.push((format!("{name}.weight"), f.weight()));
                        out.extend(f.bias().map(|b| (format!("{name}.bias"), b)));
                    }
                }
            }
            out.extend(lin(format!("{p}.attention.self.key"), &l.key));
            out.extend(lin(format!("{p}.attention.output.dense"), &l.attn_out));
            out.extend(ln(format!("{p}.attention.output.LayerNorm"), &l.attn_norm)?);
            out.extend(lin(format!("{p}.intermediate.dense"), &l.ffn_in));
            out.extend(lin(format!("{p}.output.dense"), &l.ffn_out));
            out.extend(ln(format!("{p}.output.LayerNorm"), &l.ffn_norm)?);
        }
        Ok(out)
    }

    /// Merges every FourierFT adapter into its weight.
    pub fn merge(&self) -> Result<()> {
        for (_, l) in self.fourier_layers() {
            l.merge()?;
        }
        Ok(())
    }

    /// Takes the FourierFT adapters out of the weights again.
    pub fn unmerge(&self) -> Result<()> {
        for (_, l) in self.fourier_layers() {
            l.unmerge()?;
        }
        Ok(())
    }
}

/// Mask-weighted mean over the sequence: `(b, s, h)`, `(b, s)` → `(b, h)`.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    Ok(sum.broadcast_div(&count)?)
}

// ---------------------------------------------------------------------------------------------
// Runtime settings

/// The crate's CPU training settings (`fourierft::runtime::init_cpu_training`): candle's
/// elementwise ops on the calling thread instead of a second, spinning pool; freed buffers kept
/// by glibc malloc; subnormal floats flushed to zero on every thread that runs kernels (the
/// backward produces them, and on many Intel CPUs each GEMM operand that is subnormal costs a
/// microcode assist). Call first thing in `main`.
pub fn tune_runtime() {
    fourierft::runtime::init_cpu_training();
}

// ---------------------------------------------------------------------------------------------
// Tokenization

/// The MiniLM tokenizer with padding off and truncation at `max_len` tokens.
pub fn tokenizer(path: &Path, max_len: usize) -> Result<tokenizers::Tokenizer> {
    let mut tok = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))?;
    tok.with_padding(None);
    tok.with_truncation(Some(tokenizers::TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(tok)
}

/// Token ids of each text (with [CLS] … [SEP]).
pub fn encode(tok: &tokenizers::Tokenizer, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
    let enc = tok
        .encode_batch(texts.to_vec(), true)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
}

/// Pads sequences to the longest one: ids `(b, s)` u32 (pad id 0) and mask `(b, s)` f32.
pub fn pad_batch(seqs: &[&[u32]], dev: &Device) -> Result<(Tensor, Tensor)> {
    let s = seqs.iter().map(|q| q.len()).max().unwrap_or(0);
    let mut ids = vec![0u32; seqs.len() * s];
    let mut mask = vec![0f32; seqs.len() * s];
    for (i, q) in seqs.iter().enumerate() {
        ids[i * s..i * s + q.len()].copy_from_slice(q);
        mask[i * s..i * s + q.len()].fill(1.0);
    }
    Ok((
        Tensor::from_vec(ids, (seqs.len(), s), dev)?,
        Tensor::from_vec(mask, (seqs.len(), s), dev)?,
    ))
}
