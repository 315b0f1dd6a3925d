//! Property tests (proptest) over random shapes, entries, coefficients and seeds:
//! ΔW of both paths and the spectral forward against the independent f64 reference, merge →
//! unmerge round trips, validity of sampled entries, and PEFT's entry sampling against a
//! straightforward torch `randperm` (torch's small-n Fisher–Yates branch) written here.
//!
//! Case counts are modest (the whole file runs in about a second on 2 cores); set
//! `PROPTEST_CASES` to run more.

mod common;

use std::collections::HashSet;

use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;
use common::{lcg_coeffs, reference_delta_weight};
use fourierft::internals::torch_rng::randperm_prefix;
use fourierft::internals::{fft, forward};
use fourierft::ops;
use fourierft::{FourierFTConfig, FourierLinear, SpectralEntries};
use proptest::prelude::*;
use proptest::test_runner::Config;

/// `default` cases, or `PROPTEST_CASES` when set.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Sides: 1, small, even, odd and primes (FFT lengths with every kind of factorisation).
fn side() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        1usize..=12,
        prop::sample::select(vec![
            2usize, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47
        ]),
        prop::sample::select(vec![16usize, 24, 32, 40, 48, 53, 61, 64]),
    ]
}

/// How the entries of a case are chosen.
#[derive(Debug, Clone)]
enum Pick {
    /// PEFT's sampling with this seed and count.
    Uniform { seed: u64, n: usize },
    /// Explicit positions, as raw numbers reduced into the shape (duplicates dropped).
    Explicit(Vec<(usize, usize)>),
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        (any::<u64>(), 1usize..=64).prop_map(|(seed, n)| Pick::Uniform { seed, n }),
        prop::collection::vec((any::<usize>(), any::<usize>()), 1..=24).prop_map(Pick::Explicit),
    ]
}

fn entries(d1: usize, d2: usize, pick: &Pick) -> std::sync::Arc<SpectralEntries> {
    match pick {
        Pick::Uniform { seed, n } => {
            SpectralEntries::uniform(d1, d2, (*n).min(d1 * d2), *seed).expect("uniform entries")
        }
        Pick::Explicit(raw) => {
            let mut seen = HashSet::new();
            let pos: Vec<(usize, usize)> = raw
                .iter()
                .map(|&(u, v)| (u % d1, v % d2))
                .filter(|p| seen.insert(*p))
                .collect();
            SpectralEntries::explicit(d1, d2, &pos).expect("explicit entries")
        }
    }
}

/// A case: shape, entries, coefficients in [-1, 1] and a scale.
fn case() -> impl Strategy<Value = (usize, usize, Pick, u64, f64)> {
    (side(), side(), pick(), any::<u64>(), 0.01f64..500.0)
}

/// The largest |ΔW| the coefficients allow: `alpha/(d1·d2)·Σ|c|`, the natural scale of the
/// rounding error of every path (a relative bound on max|ΔW| fails when terms cancel).
fn magnitude(d1: usize, d2: usize, c: &[f32], alpha: f64) -> f64 {
    alpha / (d1 * d2) as f64 * c.iter().map(|x| x.abs() as f64).sum::<f64>()
}

fn assert_near(found: &[f32], want: &[f64], bound: f64, what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(found.len(), want.len(), "{}: length", what);
    for (i, (&f, &w)) in found.iter().zip(want).enumerate() {
        let err = (f as f64 - w).abs();
        prop_assert!(
            err <= bound,
            "{}: index {} found {} expected {} (error {:e} > {:e})",
            what,
            i,
            f,
            w,
            err,
            bound
        );
    }
    Ok(())
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 tensor")
}

proptest! {
    #![proptest_config(Config { cases: cases(128), ..Config::default() })]

    #[test]
    fn delta_weight_of_both_paths_matches_the_f64_reference((d1, d2, pick, cseed, alpha) in case()) {
        let e = entries(d1, d2, &pick);
        let c = lcg_coeffs(e.len(), cseed);
        let want = reference_delta_weight(d1, d2, e.rows(), e.cols(), &c, alpha);
        let bound = 1e-5 * magnitude(d1, d2, &c, alpha) + 1e-30;

        let got = fft::delta_weight(&e, &c, alpha).expect("fft path");
        assert_near(&got, &want, bound, &format!("fft {d1}x{d2} n={}", e.len()))?;

        let ct = Tensor::new(c.as_slice(), &Device::Cpu).expect("tensor");
        let portable = fourierft::internals::delta_weight_portable(&e, &ct, alpha)
            .expect("portable path");
        prop_assert_eq!(portable.dims(), &[d1, d2]);
        assert_near(&f32s(&portable), &want, bound, &format!("portable {d1}x{d2} n={}", e.len()))?;
    }

    #[test]
    fn spectral_forward_matches_dense(
        (d1, d2, pick, cseed, alpha) in case(),
        tokens in 1usize..=5,
        xseed in any::<u64>(),
    ) {
        let e = entries(d1, d2, &pick);
        let c = lcg_coeffs(e.len(), cseed);
        let x = lcg_coeffs(tokens * d2, xseed);
        let dw = reference_delta_weight(d1, d2, e.rows(), e.cols(), &c, alpha);
        let want: Vec<f64> = (0..tokens)
            .flat_map(|t| {
                let (x, dw) = (&x, &dw);
                (0..d1).map(move |j| (0..d2).map(|k| dw[j * d2 + k] * x[t * d2 + k] as f64).sum())
            })
            .collect();
        let x_l1: f64 = x.chunks(d2).map(|r| r.iter().map(|v| v.abs() as f64).sum::<f64>()).fold(0.0, f64::max);
        let bound = 1e-5 * magnitude(d1, d2, &c, alpha) * x_l1.max(1.0) + 1e-30;
        let what = format!("{d1}x{d2} n={} tokens={tokens}", e.len());

        let y = forward::forward(&e, &c, alpha, &x).expect("spectral forward");
        assert_near(&y, &want, bound, &format!("spectral::forward {what}"))?;

        let xt = Tensor::from_vec(x.clone(), (tokens, d2), &Device::Cpu).expect("x");
        let ct = Tensor::new(c.as_slice(), &Device::Cpu).expect("c");
        let yt = ops::spectral_linear(&xt, &e, &ct, alpha).expect("spectral_linear");
        prop_assert_eq!(yt.dims(), &[tokens, d1]);
        let dense = xt
            .matmul(&ops::delta_weight(&e, &ct, alpha).expect("ΔW").t().expect("t"))
            .expect("dense");
        assert_near(&f32s(&yt), &f32s(&dense).iter().map(|&v| v as f64).collect::<Vec<_>>(), 2.0 * bound, &format!("spectral_linear vs dense {what}"))?;
        assert_near(&f32s(&yt), &want, bound, &format!("spectral_linear {what}"))?;
    }

    #[test]
    fn merge_then_unmerge_restores_the_weight(
        (d1, d2, pick, cseed, alpha) in case(),
        fan_in_fan_out in any::<bool>(),
        wseed in any::<u64>(),
    ) {
        let e = entries(d1, d2, &pick);
        let n = e.len();
        let stored = if fan_in_fan_out { (d2, d1) } else { (d1, d2) };
        let w0 = Tensor::from_vec(lcg_coeffs(d1 * d2, wseed), stored, &Device::Cpu).expect("w0");
        let config = FourierFTConfig {
            n_frequency: n,
            scaling: alpha,
            fan_in_fan_out,
            init_weights: true,
            entry_sampling: fourierft::EntrySampling::Explicit(
                e.rows().iter().zip(e.cols()).map(|(&u, &v)| (u as usize, v as usize)).collect(),
            ),
            ..Default::default()
        };
        let layer = FourierLinear::from_parts(w0.clone(), None, fan_in_fan_out).expect("layer");
        layer.add_adapter("default", &config).expect("adapter");
        let c = lcg_coeffs(n, cseed);
        layer.set_spectrum("default", &Tensor::new(c.as_slice(), &Device::Cpu).expect("c")).expect("set");

        let x = Tensor::from_vec(lcg_coeffs(3 * d2, cseed ^ 1), (3, d2), &Device::Cpu).expect("x");
        let y = f32s(&layer.forward(&x).expect("unmerged forward"));
        layer.merge().expect("merge");
        let ym = f32s(&layer.forward(&x).expect("merged forward"));
        let x_l1 = 1.0 + 3.0 * d2 as f64;
        let out_bound = 1e-5 * (magnitude(d1, d2, &c, alpha) + 1.0) * x_l1;
        assert_near(&ym, &y.iter().map(|&v| v as f64).collect::<Vec<_>>(), out_bound, "merged vs unmerged forward")?;

        layer.unmerge().expect("unmerge");
        prop_assert!(!layer.is_merged());
        let back = f32s(&layer.weight());
        let w0v = f32s(&w0);
        let bound = 4.0 * f32::EPSILON as f64 * (1.0 + magnitude(d1, d2, &c, alpha));
        assert_near(&back, &w0v.iter().map(|&v| v as f64).collect::<Vec<_>>(), bound, "unmerged weight vs W0")?;
        let w = layer.weight();
        prop_assert_eq!(w.dims(), w0.dims());
    }
}

proptest! {
    #![proptest_config(Config { cases: cases(256), ..Config::default() })]

    #[test]
    fn sampled_entries_are_valid_and_unique(
        d1 in 1usize..=300,
        d2 in 1usize..=300,
        frac in 0.0f64..=1.0,
        seed in any::<u64>(),
        biased in any::<bool>(),
        center in 0.0f64..50.0,
        width in 0.1f64..50.0,
    ) {
        let total = d1 * d2;
        // Mostly small n, sometimes all of the spectrum.
        let n = ((frac * frac * frac * total as f64) as usize).clamp(1, total);
        let e = if biased && total <= 4096 {
            match SpectralEntries::frequency_biased(d1, d2, n, seed, center, width) {
                Ok(e) => e,
                // Too few positions with positive weight for this band: a typed error.
                Err(fourierft::Error::Config(m)) => {
                    prop_assert!(m.contains("positive weight"), "{}", m);
                    return Ok(());
                }
                Err(other) => return Err(TestCaseError::fail(format!("{other}"))),
            }
        } else {
            SpectralEntries::uniform(d1, d2, n, seed).expect("uniform")
        };
        prop_assert_eq!(e.len(), n);
        prop_assert_eq!(e.shape(), (d1, d2));
        prop_assert!(e.rows().iter().all(|&u| (u as usize) < d1));
        prop_assert!(e.cols().iter().all(|&v| (v as usize) < d2));
        let flat = e.flat_indices();
        prop_assert_eq!(flat.iter().collect::<HashSet<_>>().len(), n, "duplicates");
        prop_assert!(flat.iter().all(|&f| f < total as u64));
        // The column groups cover every entry once, under its own column.
        let g = fourierft::internals::column_groups(&e);
        let mut covered = vec![false; n];
        for (col, members) in g.iter() {
            for &l in members {
                prop_assert_eq!(e.cols()[l as usize], col);
                prop_assert!(!covered[l as usize]);
                covered[l as usize] = true;
            }
        }
        prop_assert!(covered.iter().all(|&c| c));
    }

    #[test]
    fn peft_sampling_equals_reference_randperm(
        d1 in 1usize..=80,
        d2 in 1usize..=80,
        frac in 0.0f64..=1.0,
        seed in any::<u64>(),
    ) {
        let total = d1 * d2;
        let n = ((frac * total as f64) as usize).clamp(1, total);
        let want = reference_randperm(total as u64, seed);
        let e = SpectralEntries::uniform(d1, d2, n, seed).expect("uniform");
        prop_assert_eq!(&e.flat_indices()[..], &want[..n]);
        for (l, &f) in want[..n].iter().enumerate() {
            prop_assert_eq!(e.rows()[l] as u64, f / d2 as u64);
            prop_assert_eq!(e.cols()[l] as u64, f % d2 as u64);
        }
        // Any prefix length, including the whole permutation.
        let k = (seed % (total as u64 + 1)) as usize;
        prop_assert_eq!(randperm_prefix(total as u64, k, seed), want[..k].to_vec());
    }
}

/// PEFT's torch seeding with the commonly used small seeds (0, 1, 777, 2024, ...) too.
#[test]
fn peft_sampling_equals_reference_randperm_for_common_seeds() {
    for seed in [0u64, 1, 42, 777, 2024, 31337, u32::MAX as u64, u64::MAX] {
        for (d1, d2) in [(1usize, 1usize), (1, 9), (9, 1), (24, 40), (97, 13)] {
            let total = d1 * d2;
            let want = reference_randperm(total as u64, seed);
            let e = SpectralEntries::uniform(d1, d2, total, seed).expect("uniform");
            assert_eq!(e.flat_indices(), want, "{d1}x{d2} seed {seed}");
        }
    }
    // torch.randperm(10, generator=torch.Generator().manual_seed(777)).
    assert_eq!(
        reference_randperm(10, 777),
        vec![5, 9, 0, 3, 1, 7, 4, 8, 6, 2]
    );
}

/// Merging two adapters into a layer and unmerging restores W0 as well (a fixed case, checked
/// here because the property test above merges one).
#[test]
fn two_adapters_merge_and_unmerge() -> anyhow::Result<()> {
    let w0 = Tensor::from_vec(lcg_coeffs(7 * 11, 5), (7, 11), &Device::Cpu)?;
    let base = Linear::new(w0.clone(), None);
    let cfg = |seed| FourierFTConfig {
        n_frequency: 9,
        random_loc_seed: seed,
        init_seed: Some(seed),
        ..Default::default()
    };
    let layer = FourierLinear::new(base, &cfg(1))?;
    layer.add_adapter("b", &cfg(2))?;
    layer.set_active_adapters(&["default", "b"])?;
    let x = Tensor::from_vec(lcg_coeffs(2 * 11, 6), (2, 11), &Device::Cpu)?;
    let y = layer.forward(&x)?;
    layer.merge()?;
    let ym = layer.forward(&x)?;
    assert!((y - ym)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-3);
    layer.unmerge()?;
    let diff = (layer.weight() - w0)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(diff < 1e-5, "{diff}");
    Ok(())
}

/// The MT19937 engine of torch's CPU generator, written out from the textbook algorithm.
struct Mt {
    mt: [u32; 624],
    idx: usize,
}

impl Mt {
    fn new(seed: u64) -> Self {
        let mut mt = [0u32; 624];
        mt[0] = seed as u32; // torch keeps the low 32 bits
        for i in 1..624 {
            mt[i] = 1812433253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        Self { mt, idx: 624 }
    }

    fn random(&mut self) -> u32 {
        if self.idx == 624 {
            for i in 0..624 {
                let y = (self.mt[i] & 0x8000_0000) | (self.mt[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.mt[(i + 397) % 624] ^ (y >> 1);
                if y & 1 == 1 {
                    v ^= 0x9908_b0df;
                }
                self.mt[i] = v;
            }
            self.idx = 0;
        }
        let mut y = self.mt[self.idx];
        self.idx += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` for
/// `n < 214,748,364`: torch's forward Fisher–Yates variant, on the whole array.
fn reference_randperm(n: u64, seed: u64) -> Vec<u64> {
    assert!(n < u32::MAX as u64 / 20, "the small-n branch only");
    let mut rng = Mt::new(seed);
    let mut r: Vec<u64> = (0..n).collect();
    for i in 0..n.saturating_sub(1) {
        let z = rng.random() as u64 % (n - i);
        r.swap(i as usize, (i + z) as usize);
    }
    r
}
