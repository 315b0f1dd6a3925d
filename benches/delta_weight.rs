//! ΔW recovery: the pruned real FFT path vs a dense complex 2-D inverse FFT (what PEFT's
//! `torch.fft.ifft2` on a dense spectrum does), both with rustfft, both parallel over rows.
//!
//! `cargo bench --bench delta_weight`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rayon::prelude::*;
use rustfft::num_complex::Complex32;
use rustfft::FftPlanner;
use std::hint::black_box;

/// Baseline: scatter c into a dense complex d1×d2 spectrum, 2-D inverse FFT, real part, scale.
fn dense_complex_baseline(
    d1: usize,
    d2: usize,
    rows: &[u32],
    cols: &[u32],
    c: &[f32],
    alpha: f32,
) -> Vec<f32> {
    let mut planner = FftPlanner::<f32>::new();
    let (f1, f2) = (planner.plan_fft_inverse(d1), planner.plan_fft_inverse(d2));
    let mut dense = vec![Complex32::default(); d1 * d2];
    for ((&u, &v), &c) in rows.iter().zip(cols).zip(c) {
        dense[u as usize * d2 + v as usize] = Complex32::new(c, 0.0);
    }
    dense.par_chunks_mut(d2).for_each(|row| f2.process(row));
    let mut t = vec![Complex32::default(); d1 * d2];
    t.par_chunks_mut(d1).enumerate().for_each(|(k, col)| {
        for (j, x) in col.iter_mut().enumerate() {
            *x = dense[j * d2 + k];
        }
        f1.process(col);
    });
    let s = alpha / (d1 * d2) as f32;
    let mut out = vec![0f32; d1 * d2];
    out.par_chunks_mut(d2).enumerate().for_each(|(j, row)| {
        for (k, x) in row.iter_mut().enumerate() {
            *x = t[k * d1 + j].re * s;
        }
    });
    out
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("delta_weight");
    group.sample_size(10);
    for d in [384usize, 1024, 4096] {
        let n = 1000;
        let e = fourierft::SpectralEntries::uniform(d, d, n, 777).expect("entries");
        let coeffs: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        // Both sides compute the same ΔW.
        let a = fourierft::internals::fft::delta_weight(&e, &coeffs, 150.0).expect("dw");
        let b = dense_complex_baseline(d, d, e.rows(), e.cols(), &coeffs, 150.0);
        let max = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            err <= 1e-4 * max,
            "pruned vs dense mismatch at d={d}: {err} vs max {max}"
        );
        group.bench_with_input(BenchmarkId::new("pruned_real", d), &d, |b, _| {
            b.iter(|| {
                fourierft::internals::fft::delta_weight(&e, black_box(&coeffs), 150.0).expect("dw")
            })
        });
        group.bench_with_input(BenchmarkId::new("dense_complex_ifft2", d), &d, |b, _| {
            b.iter(|| dense_complex_baseline(d, d, e.rows(), e.cols(), black_box(&coeffs), 150.0))
        });
        group.bench_with_input(BenchmarkId::new("gradient_pruned_real", d), &d, |b, _| {
            let g: Vec<f32> = (0..d * d)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0)
                .collect();
            b.iter(|| {
                fourierft::internals::fft::delta_weight_grad(&e, black_box(&g), 150.0)
                    .expect("grad")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
