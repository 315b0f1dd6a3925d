//! Pooled and per-thread workspaces: results are bit-identical whatever ran before, across
//! repeated calls and interleaved shapes (a reused buffer's stale contents never leak in).

use candle_core::{DType, Device, Tensor, Var};
use fourierft::internals::{fft, forward};
use fourierft::{ops, SpectralEntries};
use std::sync::Arc;

fn data(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| ((i as f32 + 1.0) * 0.618 * (seed as f32 + 1.3)).sin())
        .collect()
}

/// Everything the fused layer and the spectral ops produce for one shape, as raw bits.
fn run(d1: usize, d2: usize, tokens: usize, n: usize) -> fourierft::Result<Vec<u32>> {
    let dev = Device::Cpu;
    let e = Arc::new(SpectralEntries::uniform(d1, d2, n, 777)?);
    let c = Var::from_vec(data(n, 1), n, &dev)?;
    let w = Tensor::from_vec(data(d1 * d2, 2), (d1, d2), &dev)?;
    let b = Tensor::from_vec(data(d1, 3), d1, &dev)?;
    let x = Var::from_vec(data(tokens * d2, 4), (tokens, d2), &dev)?;
    let y = ops::fourier_linear(x.as_tensor(), &w, Some(&b), &e, c.as_tensor(), 150.0)?;
    let g = y.sqr()?.sum_all()?.backward()?;
    let mut out: Vec<f32> = y.flatten_all()?.to_vec1()?;
    for t in [x.as_tensor(), c.as_tensor()] {
        let grad = g
            .get(t)
            .ok_or_else(|| fourierft::Error::Config("no gradient".into()))?;
        out.extend(grad.flatten_all()?.to_vec1::<f32>()?);
    }
    let ys = ops::spectral_linear(x.as_tensor(), &e, c.as_tensor(), 150.0)?;
    let gs = ys.sqr()?.sum_all()?.backward()?;
    out.extend(ys.flatten_all()?.to_vec1::<f32>()?);
    out.extend(
        gs.get(c.as_tensor())
            .map_or(Ok(vec![]), |t| t.to_vec1::<f32>())?,
    );
    let (cv, xv, gv) = (data(n, 1), data(tokens * d2, 4), data(tokens * d1, 5));
    out.extend(forward::coeff_grad(&e, 150.0, &xv, &gv)?);
    let (dx, dc) = forward::backward(&e, &cv, 150.0, &xv, &gv, true)?;
    out.extend(dx.unwrap_or_default());
    out.extend(dc);
    out.extend(fft::add_delta_weight(&e, &cv, 150.0, &data(d1 * d2, 2))?);
    out.extend(fft::delta_weight(&e, &cv, 150.0)?);
    assert_eq!(y.dtype(), DType::F32);
    Ok(out.into_iter().map(f32::to_bits).collect())
}

#[test]
fn workspaces_do_not_change_results() -> fourierft::Result<()> {
    let shapes = [
        (48, 40, 70, 100),
        (17, 33, 5, 30),
        (64, 64, 130, 300),
        (1, 9, 3, 4),
    ];
    let first: Vec<Vec<u32>> = shapes
        .iter()
        .map(|&(d1, d2, t, n)| run(d1, d2, t, n))
        .collect::<Result<_, _>>()?;
    // Again, in reverse order and twice each: buffers now hold other shapes' data.
    for (i, &(d1, d2, t, n)) in shapes.iter().enumerate().rev() {
        for _ in 0..2 {
            assert_eq!(run(d1, d2, t, n)?, first[i], "shape {:?}", shapes[i]);
        }
    }
    // From several threads at once (per-thread and pooled buffers under contention).
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|k| {
                let (d1, d2, t, n) = shapes[k % shapes.len()];
                s.spawn(move || run(d1, d2, t, n))
            })
            .collect();
        for (k, h) in handles.into_iter().enumerate() {
            let got = h.join().expect("worker thread");
            assert_eq!(got.ok().as_ref(), Some(&first[k % shapes.len()]));
        }
    });
    Ok(())
}
