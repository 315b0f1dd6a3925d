//! Independent f64 reference helpers shared by the integration tests.
//! Deliberately naive: no FFT, no crate code, just the formula of docs/ARCHITECTURE.md ("The function every path computes").
#![allow(dead_code)]

use std::f64::consts::PI;

/// ΔW[j,k] = alpha/(d1·d2) · Σ_l c_l · cos(2π((u_l·j mod d1)/d1 + (v_l·k mod d2)/d2)),
/// row-major d1×d2, with the phases reduced exactly in u64 before becoming angles.
pub fn reference_delta_weight(
    d1: usize,
    d2: usize,
    rows: &[u32],
    cols: &[u32],
    coeffs: &[f32],
    alpha: f64,
) -> Vec<f64> {
    assert_eq!(rows.len(), coeffs.len(), "rows/coeffs length");
    assert_eq!(cols.len(), coeffs.len(), "cols/coeffs length");
    let (m1, m2) = (d1 as u64, d2 as u64);
    let scale = alpha / (d1 as f64 * d2 as f64);
    let mut out = vec![0f64; d1 * d2];
    for j in 0..d1 {
        for k in 0..d2 {
            let mut acc = 0f64;
            for l in 0..coeffs.len() {
                let pu = (rows[l] as u64 * j as u64) % m1;
                let pv = (cols[l] as u64 * k as u64) % m2;
                let phase = pu as f64 / d1 as f64 + pv as f64 / d2 as f64;
                acc += coeffs[l] as f64 * (2.0 * PI * phase).cos();
            }
            out[j * d2 + k] = scale * acc;
        }
    }
    out
}

/// max_i |v_i| (0 for an empty slice).
pub fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0f64, |m, x| m.max(x.abs()))
}

/// Asserts max_i |found_i - expected_i| <= rel_tol · max(max|expected|, 1e-30).
pub fn assert_close(found: &[f32], expected: &[f64], rel_tol: f64, what: &str) {
    assert_eq!(found.len(), expected.len(), "{what}: length mismatch");
    let (mut worst, mut worst_i) = (0f64, 0usize);
    for (i, (&f, &e)) in found.iter().zip(expected).enumerate() {
        let err = (f as f64 - e).abs();
        // A NaN error is kept as the worst and fails the bound below.
        if err > worst || err.is_nan() {
            worst = err;
            worst_i = i;
        }
    }
    let bound = rel_tol * max_abs(expected).max(1e-30);
    assert!(
        worst <= bound,
        "{what}: max abs error {worst:e} > {bound:e} (rel_tol {rel_tol:e}) at index {worst_i}: \
         found {} expected {}",
        found[worst_i],
        expected[worst_i]
    );
}

/// Deterministic pseudo-random values in [-1, 1] (splitmix64; no dependencies).
pub fn lcg_coeffs(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // Top 24 bits -> exact f32 in [0, 1], then map to [-1, 1].
            let unit = (z >> 40) as f32 / ((1u64 << 24) - 1) as f32;
            2.0 * unit - 1.0
        })
        .collect()
}

/// The device named by `FOURIERFT_TEST_DEVICE` (`cpu`, the default; `cuda`; `metal`), for the
/// tests that run every numeric path on it (`scripts/gpu-check.sh` sets it). A device that cannot
/// be opened fails the test: a GPU run never silently falls back to the CPU.
pub fn test_device() -> candle_core::Device {
    let name = std::env::var("FOURIERFT_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dev = match name.as_str() {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => candle_core::Device::new_cuda(0),
        "metal" => candle_core::Device::new_metal(0),
        other => panic!("FOURIERFT_TEST_DEVICE={other}: expected cpu, cuda or metal"),
    };
    dev.unwrap_or_else(|e| {
        panic!("FOURIERFT_TEST_DEVICE={name}: {e} (build with --features {name} on a machine with that device)")
    })
}

/// `tests/fixtures/<rel>` in this checkout.
pub fn fixture(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// max |a − b| over all elements of two f32 tensors of the same shape.
pub fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> anyhow::Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// All values of `t` (any float dtype), flattened, as f32.
pub fn f32s(t: &candle_core::Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?)
}

/// A fuzz input split as the fuzz targets split it (`fuzz/src/lib.rs`): a little-endian `u32`
/// length, that many bytes, the rest.
pub fn split_prefixed(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let rest = &data[4..];
    (len <= rest.len()).then(|| rest.split_at(len))
}

/// All values of `t` (any float dtype), flattened, as f64.
pub fn f64s(t: &candle_core::Tensor) -> Vec<f64> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F64))
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor values")
}

/// Asserts max_i |found_i − want_i| ≤ rel · max(max|want|, 1e-12).
#[track_caller]
pub fn assert_near(found: &[f64], want: &[f64], rel: f64, what: &str) {
    assert_eq!(found.len(), want.len(), "{what}: length");
    let scale = max_abs(want).max(1e-12);
    let worst = found
        .iter()
        .zip(want)
        .map(|(f, w)| (f - w).abs())
        .fold(0.0, f64::max);
    assert!(
        worst <= rel * scale,
        "{what}: max error {worst:e} > {rel:e} x {scale:e}"
    );
}

/// A tensor of normal(0, std) f32 values from a generator seeded with `seed`, so that every run
/// of a test sees the same data (candle's CPU `randn` cannot be seeded).
pub fn randn(
    seed: u64,
    std: f32,
    shape: impl Into<candle_core::Shape>,
) -> anyhow::Result<candle_core::Tensor> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let shape = shape.into();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0f32, std)?;
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| normal.sample(&mut rng))
        .collect();
    Ok(candle_core::Tensor::from_vec(
        v,
        shape,
        &candle_core::Device::Cpu,
    )?)
}

/// The inputs in a fuzz corpus folder, sorted, hidden files (`.gitkeep`) left out. A missing
/// folder is an error: a replay that iterates nothing would pass silently.
pub fn fuzz_inputs(dir: std::path::PathBuf) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut v: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| anyhow::anyhow!("fuzz corpus folder {}: {e}", dir.display()))?
        .map(|e| Ok(e?.path()))
        .collect::<std::io::Result<_>>()?;
    v.retain(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
    });
    v.sort();
    Ok(v)
}
