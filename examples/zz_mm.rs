use candle_core::{Device, Tensor};
fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for &(m, k, n) in &[
        (1000usize, 384usize, 384usize),
        (1000, 384, 1536),
        (1000, 1536, 384),
        (384, 1000, 384),
    ] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let bt = b.t()?;
        for _ in 0..3 {
            let _ = a.matmul(&bt)?;
        }
        let it = 50;
        let t = std::time::Instant::now();
        for _ in 0..it {
            let _ = a.matmul(&bt)?;
        }
        let s = t.elapsed().as_secs_f64() / it as f64;
        println!(
            "{m}x{k}x{n} (B^T view): {:.3} ms, {:.1} GFLOPS",
            s * 1e3,
            2.0 * (m * k * n) as f64 / s / 1e9
        );
        let bc = bt.contiguous()?;
        let t = std::time::Instant::now();
        for _ in 0..it {
            let _ = a.matmul(&bc)?;
        }
        let s = t.elapsed().as_secs_f64() / it as f64;
        println!(
            "{m}x{k}x{n} (B contiguous): {:.3} ms, {:.1} GFLOPS",
            s * 1e3,
            2.0 * (m * k * n) as f64 / s / 1e9
        );
    }
    Ok(())
}
