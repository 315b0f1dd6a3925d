//! The fused CPU ops — `ops::fourier_linear` (`x·(W0 + ΔW)ᵀ + b` in one op) and the fast path of
//! `ops::frozen_linear` — against an independent f64 reference, their gradients against finite
//! differences, and against the composed candle ops they replace.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, f32s, lcg_coeffs, randn, reference_delta_weight};
use fourierft::{ops, Error, SpectralEntries};

/// Odd, even, prime, non-square and 1×N shapes: (d1 = out, d2 = in, n).
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 9, 4),
    (9, 1, 5),
    (6, 6, 10),
    (7, 11, 30),
    (16, 9, 50),
    (13, 17, 1),
    (40, 24, 90),
];

/// `y = x·(W0 + ΔW)ᵀ + b` in f64 from the naive cosine-sum ΔW.
fn reference(
    e: &SpectralEntries,
    w0: &[f32],
    b: &[f32],
    c: &[f32],
    alpha: f64,
    x: &[f32],
) -> Vec<f64> {
    let (d1, d2) = e.shape();
    let dw = reference_delta_weight(d1, d2, e.rows(), e.cols(), c, alpha);
    let tokens = x.len() / d2;
    let mut y = vec![0f64; tokens * d1];
    for t in 0..tokens {
        for j in 0..d1 {
            y[t * d1 + j] = b[j] as f64
                + (0..d2)
                    .map(|k| (w0[j * d2 + k] as f64 + dw[j * d2 + k]) * x[t * d2 + k] as f64)
                    .sum::<f64>();
        }
    }
    y
}

#[test]
fn fourier_linear_matches_f64_reference() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for &(d1, d2, n) in SHAPES {
        let e = SpectralEntries::uniform(d1, d2, n, 2024)?;
        for tokens in [1, 5] {
            let (w0, b) = (lcg_coeffs(d1 * d2, 1), lcg_coeffs(d1, 2));
            let (c, x) = (lcg_coeffs(n, 3), lcg_coeffs(tokens * d2, 4));
            let y = ops::fourier_linear(
                &Tensor::from_vec(x.clone(), (tokens, d2), &dev)?,
                &Tensor::from_vec(w0.clone(), (d1, d2), &dev)?,
                Some(&Tensor::new(b.as_slice(), &dev)?),
                &e,
                &Tensor::new(c.as_slice(), &dev)?,
                40.0,
            )?;
            let want = reference(&e, &w0, &b, &c, 40.0, &x);
            assert_close(
                &f32s(&y)?,
                &want,
                1e-5,
                &format!("{d1}x{d2} n={n} t={tokens}"),
            );
        }
    }
    Ok(())
}

/// `Σ (fourier_linear(x) − target)²` with or without bias.
fn loss(
    e: &std::sync::Arc<SpectralEntries>,
    w0: &Tensor,
    b: Option<&Tensor>,
    c: &Tensor,
    x: &Tensor,
    t: &Tensor,
) -> candle_core::Result<Tensor> {
    let y = ops::fourier_linear(x, w0, b, e, c, 30.0).map_err(Error::into_candle)?;
    (y - t)?.sqr()?.sum_all()
}

#[test]
fn fourier_linear_gradients_match_finite_differences() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for &(d1, d2, n) in &[(7usize, 11usize, 9usize), (8, 6, 20), (1, 5, 3), (9, 1, 4)] {
        let e = SpectralEntries::uniform(d1, d2, n, 5)?;
        let tokens = 3;
        let (c0, x0) = (lcg_coeffs(n, 7), lcg_coeffs(tokens * d2, 8));
        let w0 = Tensor::from_vec(lcg_coeffs(d1 * d2, 10), (d1, d2), &dev)?;
        let b = Tensor::from_vec(lcg_coeffs(d1, 11), d1, &dev)?;
        let target = Tensor::from_vec(lcg_coeffs(tokens * d1, 9), (tokens, d1), &dev)?;
        let c = Var::new(c0.as_slice(), &dev)?;
        let x = Var::from_vec(x0.clone(), (tokens, d2), &dev)?;
        let grads = loss(&e, &w0, Some(&b), c.as_tensor(), x.as_tensor(), &target)?.backward()?;
        let gc = f32s(grads.get(c.as_tensor()).expect("dc"))?;
        let gx = f32s(grads.get(x.as_tensor()).expect("dx"))?;
        // Nothing for the frozen weight or bias.
        assert!(grads.get(&w0).is_none() && grads.get(&b).is_none());

        let eval = |c: &[f32], x: &[f32]| -> anyhow::Result<f64> {
            let c = Tensor::new(c, &dev)?;
            let x = Tensor::from_vec(x.to_vec(), (tokens, d2), &dev)?;
            Ok(loss(&e, &w0, Some(&b), &c, &x, &target)?.to_scalar::<f32>()? as f64)
        };
        let eps = 0.05f32;
        let fd = |v0: &[f32], f: &dyn Fn(&[f32]) -> anyhow::Result<f64>| {
            (0..v0.len())
                .map(|i| {
                    let (mut p, mut m) = (v0.to_vec(), v0.to_vec());
                    p[i] += eps;
                    m[i] -= eps;
                    Ok((f(&p)? - f(&m)?) / (2.0 * eps as f64))
                })
                .collect::<anyhow::Result<Vec<f64>>>()
        };
        let fd_c = fd(&c0, &|c| eval(c, &x0))?;
        let fd_x = fd(&x0, &|x| eval(&c0, x))?;
        assert_close(&gc, &fd_c, 2e-3, &format!("dL/dc {d1}x{d2}"));
        assert_close(&gx, &fd_x, 2e-3, &format!("dL/dx {d1}x{d2}"));
    }
    Ok(())
}

#[test]
fn fourier_linear_equals_composed_ops_in_value_and_gradients() -> anyhow::Result<()> {
    let (d1, d2, n, tokens) = (24, 40, 60, 33);
    let e = SpectralEntries::uniform(d1, d2, n, 3)?;
    let w0 = randn(101, 0.2, (d1, d2))?;
    let r = randn(102, 1.0, (tokens, d1))?;
    let c = Var::from_tensor(&randn(103, 1.0, n)?)?;
    let x = Var::from_tensor(&randn(104, 1.0, (tokens, d2))?)?;
    for bias in [None, Some(randn(105, 1.0, d1)?)] {
        let fused = ops::fourier_linear(x.as_tensor(), &w0, bias.as_ref(), &e, &c, 25.0)?;
        let w = (&w0 + ops::delta_weight(&e, &c, 25.0)?)?;
        let mut composed = x.matmul(&w.t()?)?;
        if let Some(b) = &bias {
            composed = composed.broadcast_add(b)?;
        }
        let diff = (&fused - &composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "forward differs by {diff}");
        let g1 = (fused * &r)?.sum_all()?.backward()?;
        let g2 = (composed * &r)?.sum_all()?.backward()?;
        for v in [c.as_tensor(), x.as_tensor()] {
            let (a, b) = (f32s(g1.get(v).unwrap())?, f32s(g2.get(v).unwrap())?);
            let want: Vec<f64> = b.iter().map(|&v| v as f64).collect();
            assert_close(&a, &want, 1e-4, "fused vs composed gradient");
        }
    }
    Ok(())
}

#[test]
fn fourier_linear_without_tracked_input_gives_only_dc() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let e = SpectralEntries::uniform(5, 7, 6, 1)?;
    let c = Var::new(lcg_coeffs(6, 1).as_slice(), &dev)?;
    let x = randn(106, 1.0, (4, 7))?;
    let w0 = Tensor::zeros((5, 7), DType::F32, &dev)?;
    let y = ops::fourier_linear(&x, &w0, None, &e, &c, 10.0)?;
    let g = y.sum_all()?.backward()?;
    assert_eq!(g.get(c.as_tensor()).expect("dc").dims(), &[6]);
    assert!(g.get(&x).is_none());
    Ok(())
}

#[test]
fn fourier_linear_rejects_bad_shapes_with_typed_errors() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let e = SpectralEntries::uniform(5, 7, 6, 1)?;
    let c = Tensor::zeros(6, DType::F32, &dev)?;
    let w0 = Tensor::zeros((5, 7), DType::F32, &dev)?;
    let x = Tensor::zeros((4, 7), DType::F32, &dev)?;
    let bad = [
        ops::fourier_linear(
            &Tensor::zeros((4, 6), DType::F32, &dev)?,
            &w0,
            None,
            &e,
            &c,
            1.0,
        ),
        ops::fourier_linear(&x, &w0.t()?, None, &e, &c, 1.0),
        ops::fourier_linear(
            &x,
            &w0,
            Some(&Tensor::zeros(7, DType::F32, &dev)?),
            &e,
            &c,
            1.0,
        ),
        ops::fourier_linear(&x, &w0, None, &e, &Tensor::zeros(5, DType::F32, &dev)?, 1.0),
    ];
    for (i, r) in bad.into_iter().enumerate() {
        match r {
            Err(Error::Shape { what, .. }) => assert!(what.contains("5x7"), "case {i}: {what}"),
            other => panic!("case {i}: expected a shape error, got {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn frozen_linear_fast_path_equals_matmul_for_views_and_shapes() -> anyhow::Result<()> {
    for &(out, inp, tokens) in &[(1usize, 1usize, 1usize), (1, 9, 3), (9, 1, 2), (13, 17, 5)] {
        let x = Var::from_tensor(&randn(107, 1.0, (tokens, inp))?)?;
        let r = randn(108, 1.0, (tokens, out))?;
        let b = randn(109, 1.0, out)?;
        // A contiguous weight and a transposed view of an (in, out) one.
        let w = randn(110, 1.0, (out, inp))?;
        let wt = randn(111, 1.0, (inp, out))?.t()?;
        for w in [w, wt] {
            for bias in [None, Some(&b)] {
                let y = ops::frozen_linear(&x, &w, bias)?;
                let mut want = x.matmul(&w.t()?)?;
                if let Some(b) = bias {
                    want = want.broadcast_add(b)?;
                }
                let diff = (&y - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "{out}x{inp}: forward differs by {diff}");
                let g1 = (y * &r)?.sum_all()?.backward()?;
                let g2 = (want * &r)?.sum_all()?.backward()?;
                let d = (g1.get(&x).unwrap() - g2.get(&x).unwrap())?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert!(d < 1e-5, "{out}x{inp}: dL/dx differs by {d}");
                assert!(g1.get(&w).is_none());
            }
        }
    }
    Ok(())
}
