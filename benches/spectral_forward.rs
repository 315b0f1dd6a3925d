//! Unmerged adapter forward `x·ΔWᵀ` for 64 tokens: the spectral op (O(d log d) per token, no ΔW)
//! vs the dense path (materialise ΔW, then matmul), forward and forward+backward.
//!
//! `cargo bench --bench spectral_forward`

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use fourierft::{ops, SpectralEntries};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("adapter_forward");
    group.sample_size(10);
    let (n, tokens) = (1000, 64);
    for d in [384usize, 1024, 4096] {
        let e = SpectralEntries::uniform(d, d, n, 777).expect("entries");
        let coeffs = Var::randn(0f32, 1.0, n, &Device::Cpu).expect("coeffs");
        let x = Tensor::randn(0f32, 1.0, (tokens, d), &Device::Cpu).expect("x");
        let spectral =
            || ops::spectral_linear(&x, &e, coeffs.as_tensor(), 150.0).expect("spectral");
        let dense = || {
            let dw = ops::delta_weight(&e, coeffs.as_tensor(), 150.0).expect("dw");
            x.matmul(&dw.t().expect("t")).expect("matmul")
        };
        group.bench_with_input(BenchmarkId::new("spectral", d), &d, |b, _| b.iter(spectral));
        group.bench_with_input(BenchmarkId::new("dense", d), &d, |b, _| b.iter(dense));
        group.bench_with_input(BenchmarkId::new("spectral_fwd_bwd", d), &d, |b, _| {
            b.iter(|| {
                spectral()
                    .sqr()
                    .and_then(|y| y.sum_all())
                    .and_then(|l| l.backward())
                    .expect("bwd")
            })
        });
        group.bench_with_input(BenchmarkId::new("dense_fwd_bwd", d), &d, |b, _| {
            b.iter(|| {
                dense()
                    .sqr()
                    .and_then(|y| y.sum_all())
                    .and_then(|l| l.backward())
                    .expect("bwd")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
