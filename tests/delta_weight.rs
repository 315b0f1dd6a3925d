//! ΔW of both paths (pruned real FFT, portable tensor ops) against the independent f64 reference,
//! and gradients against finite differences and the reference.

mod common;

use candle_core::{Device, Tensor, Var};
use common::{assert_close, lcg_coeffs, reference_delta_weight};
use fourierft::internals::fft;
use fourierft::ops::DeltaWeight;
use fourierft::SpectralEntries;

/// Odd, even, prime, non-square, 1×N and N×1 shapes.
const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (1, 2),
    (1, 7),
    (1, 16),
    (7, 1),
    (16, 1),
    (2, 2),
    (5, 5),
    (6, 6),
    (7, 11),
    (13, 17),
    (16, 9),
    (8, 12),
    (31, 2),
    (2, 31),
    (24, 40),
    (64, 48),
    (97, 101),
];

fn ns(d1: usize, d2: usize) -> Vec<usize> {
    let full = d1 * d2;
    let mut v = vec![1, (full / 3).max(1), full.min(40), full];
    v.sort();
    v.dedup();
    v
}

#[test]
fn both_paths_match_f64_reference_on_many_shapes() -> anyhow::Result<()> {
    for &(d1, d2) in SHAPES {
        for n in ns(d1, d2) {
            let e = SpectralEntries::uniform(d1, d2, n, 2024)?;
            let c = lcg_coeffs(n, (d1 * 1000 + d2 + n) as u64);
            let alpha = 150.0;
            let want = reference_delta_weight(d1, d2, e.rows(), e.cols(), &c, alpha);
            let what = format!("{d1}x{d2} n={n}");

            let got = fft::delta_weight(&e, &c, alpha)?;
            assert_close(&got, &want, 1e-5, &format!("fft {what}"));

            let ct = Tensor::new(c.as_slice(), &Device::Cpu)?;
            let op = DeltaWeight::new(e.clone());
            let via_op = op.forward(&ct, alpha)?.flatten_all()?.to_vec1::<f32>()?;
            assert_close(&via_op, &want, 1e-5, &format!("op {what}"));

            let portable = fourierft::internals::delta_weight_portable(op.entries(), &ct, alpha)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert_close(&portable, &want, 1e-5, &format!("portable {what}"));
        }
    }
    Ok(())
}

#[test]
fn explicit_entries_incl_nyquist_and_dc() -> anyhow::Result<()> {
    // Entries on v = 0 and v = d2/2 exercise the purely real bins of the Hermitian half-spectrum.
    let (d1, d2) = (6, 8);
    let e = SpectralEntries::explicit(d1, d2, &[(0, 0), (3, 4), (5, 4), (1, 7), (2, 1), (0, 4)])?;
    let c = [0.5f32, -1.0, 2.0, 0.25, -0.75, 1.5];
    let want = reference_delta_weight(d1, d2, e.rows(), e.cols(), &c, 3.0);
    assert_close(
        &fft::delta_weight(&e, &c, 3.0)?,
        &want,
        1e-6,
        "fft explicit",
    );
    Ok(())
}

#[test]
fn large_layer_matches_reference_at_sampled_positions() -> anyhow::Result<()> {
    // d = 4096 is where phase reduction matters; the reference is evaluated at 512 positions.
    let (d1, d2, n) = (4096, 4096, 1000);
    let e = SpectralEntries::uniform(d1, d2, n, 777)?;
    let c = lcg_coeffs(n, 7);
    let got = fft::delta_weight(&e, &c, 150.0)?;
    let scale = 150.0 / (d1 * d2) as f64;
    let mut found = Vec::new();
    let mut want = Vec::new();
    for t in 0..512u64 {
        let j = ((t * 2_654_435_761) % d1 as u64) as usize;
        let k = ((t * 40_503 + 17) % d2 as u64) as usize;
        let acc: f64 = (e.rows().iter().zip(e.cols()).zip(&c))
            .map(|((&u, &v), &cl)| {
                let pu = (u as u64 * j as u64) % d1 as u64;
                let pv = (v as u64 * k as u64) % d2 as u64;
                let ph = pu as f64 / d1 as f64 + pv as f64 / d2 as f64;
                cl as f64 * (std::f64::consts::TAU * ph).cos()
            })
            .sum();
        found.push(got[j * d2 + k]);
        want.push(scale * acc);
    }
    assert_close(&found, &want, 1e-5, "fft 4096x4096 n=1000");
    Ok(())
}

/// Quadratic loss L(c) = Σ (ΔW(c) − T)², so central differences are exact up to rounding.
fn loss(
    op: &DeltaWeight,
    c: &Tensor,
    target: &Tensor,
    alpha: f64,
    portable: bool,
) -> candle_core::Result<Tensor> {
    let dw = if portable {
        fourierft::internals::delta_weight_portable(op.entries(), c, alpha)
    } else {
        op.forward(c, alpha)
    };
    let dw = dw.map_err(fourierft::Error::into_candle)?;
    (dw - target)?.sqr()?.sum_all()
}

#[test]
fn gradient_matches_finite_differences_and_reference() -> anyhow::Result<()> {
    for &(d1, d2, n) in &[
        (7usize, 11usize, 9usize),
        (8, 12, 30),
        (1, 9, 4),
        (13, 1, 5),
        (16, 16, 256),
    ] {
        let e = SpectralEntries::uniform(d1, d2, n, 99)?;
        let op = DeltaWeight::new(e.clone());
        let alpha = 50.0;
        let c0 = lcg_coeffs(n, 3);
        let t = lcg_coeffs(d1 * d2, 4);
        let target = Tensor::from_vec(t.clone(), (d1, d2), &Device::Cpu)?;
        let c = Var::new(c0.as_slice(), &Device::Cpu)?;

        for portable in [false, true] {
            let l = loss(&op, c.as_tensor(), &target, alpha, portable)?;
            let grads = l.backward()?;
            let g = grads
                .get(c.as_tensor())
                .expect("gradient for c")
                .to_vec1::<f32>()?;

            // Reference: dL/dc_l = Σ 2(ΔW − T)·basis_l, everything in f64.
            let dw = reference_delta_weight(d1, d2, e.rows(), e.cols(), &c0, alpha);
            let resid: Vec<f64> = dw
                .iter()
                .zip(&t)
                .map(|(a, b)| 2.0 * (a - *b as f64))
                .collect();
            let want: Vec<f64> = (0..n)
                .map(|l| {
                    let (u, v) = (e.rows()[l] as usize, e.cols()[l] as usize);
                    let basis =
                        reference_delta_weight(d1, d2, &[u as u32], &[v as u32], &[1.0], alpha);
                    basis.iter().zip(&resid).map(|(b, r)| b * r).sum()
                })
                .collect();
            assert_close(
                &g,
                &want,
                1e-4,
                &format!("grad vs reference {d1}x{d2} portable={portable}"),
            );

            // Central finite differences through the op itself (f32).
            let eps = 0.05f32;
            let fd: Vec<f64> = (0..n)
                .map(|l| -> candle_core::Result<f64> {
                    let mut p = c0.clone();
                    p[l] += eps;
                    let mut m = c0.clone();
                    m[l] -= eps;
                    let lp = loss(
                        &op,
                        &Tensor::new(p.as_slice(), &Device::Cpu)?,
                        &target,
                        alpha,
                        portable,
                    )?;
                    let lm = loss(
                        &op,
                        &Tensor::new(m.as_slice(), &Device::Cpu)?,
                        &target,
                        alpha,
                        portable,
                    )?;
                    Ok(
                        (lp.to_scalar::<f32>()? as f64 - lm.to_scalar::<f32>()? as f64)
                            / (2.0 * eps as f64),
                    )
                })
                .collect::<candle_core::Result<_>>()?;
            assert_close(
                &g,
                &fd,
                2e-3,
                &format!("grad vs finite differences {d1}x{d2} portable={portable}"),
            );
        }
    }
    Ok(())
}

#[test]
fn gradient_of_large_layer_matches_portable_path() -> anyhow::Result<()> {
    let (d1, d2, n) = (96, 160, 700);
    let e = SpectralEntries::uniform(d1, d2, n, 1)?;
    let op = DeltaWeight::new(e);
    let c = Var::new(lcg_coeffs(n, 11).as_slice(), &Device::Cpu)?;
    let w = Tensor::from_vec(lcg_coeffs(d1 * d2, 12), (d1, d2), &Device::Cpu)?;
    let g_fft = (op.forward(c.as_tensor(), 150.0)? * &w)?
        .sum_all()?
        .backward()?;
    let g_por = (fourierft::internals::delta_weight_portable(op.entries(), c.as_tensor(), 150.0)?
        * &w)?
        .sum_all()?
        .backward()?;
    let a = g_fft
        .get(c.as_tensor())
        .expect("fft grad")
        .to_vec1::<f32>()?;
    let b: Vec<f64> = g_por
        .get(c.as_tensor())
        .expect("portable grad")
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    assert_close(&a, &b, 1e-4, "fft vs portable gradient");
    Ok(())
}

#[test]
fn wrong_coefficient_shape_or_dtype_is_an_error() -> anyhow::Result<()> {
    let e = SpectralEntries::uniform(4, 5, 3, 777)?;
    let op = DeltaWeight::new(e.clone());
    let bad = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu)?;
    assert!(matches!(
        op.forward(&bad, 1.0),
        Err(fourierft::Error::Shape { .. })
    ));
    let bad = Tensor::zeros(3, candle_core::DType::F64, &Device::Cpu)?;
    assert!(matches!(
        op.forward(&bad, 1.0),
        Err(fourierft::Error::DType { .. })
    ));
    assert!(matches!(
        fft::delta_weight(&e, &[1.0; 2], 1.0),
        Err(fourierft::Error::Shape { .. })
    ));
    assert!(matches!(
        fft::delta_weight_grad(&e, &[1.0; 7], 1.0),
        Err(fourierft::Error::Shape { .. })
    ));
    Ok(())
}
