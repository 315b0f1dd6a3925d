//! Spectral entries: torch/PEFT bit-exactness, validity, sharing, frequency bias and errors.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use fourierft::internals::torch_rng::{randperm_prefix, Mt19937};
use fourierft::{EntrySampling, Error, SpectralEntries};

const SEED: u64 = 777;

#[test]
fn mt19937_first_outputs() {
    let mut rng = Mt19937::new(SEED);
    let got: Vec<u32> = (0..3).map(|_| rng.next_u32()).collect();
    assert_eq!(got, [655685735, 2776480559, 1298611771]);
}

#[test]
fn randperm_small_vectors() {
    assert_eq!(
        randperm_prefix(10, 10, SEED),
        [5, 9, 0, 3, 1, 7, 4, 8, 6, 2]
    );
    assert_eq!(
        randperm_prefix(1000, 8, SEED),
        [735, 819, 201, 799, 435, 497, 175, 590]
    );
    assert_eq!(
        randperm_prefix(240, 10, SEED),
        [215, 113, 235, 59, 143, 227, 177, 53, 151, 46]
    );
    assert_eq!(
        randperm_prefix(768 * 768, 6, SEED),
        [391271, 183699, 413551, 384200, 435559, 59955]
    );
    assert_eq!(
        randperm_prefix(4096 * 4096, 6, SEED),
        [1374311, 8240085, 6766295, 6474818, 14786199, 14783200]
    );
}

#[test]
fn randperm_big_branch_vector() {
    let start = Instant::now();
    assert_eq!(
        randperm_prefix(214_748_364, 4, SEED),
        [150358698, 199533091, 83306822, 145970095]
    );
    eprintln!("randperm(214748364)[:4] took {:?}", start.elapsed());
}

#[test]
fn uniform_entries_match_peft() {
    let cases: [(usize, usize, &[u64]); 4] = [
        (768, 768, &[391271, 183699, 413551, 384200, 435559, 59955]),
        (
            4096,
            4096,
            &[1374311, 8240085, 6766295, 6474818, 14786199, 14783200],
        ),
        (10, 24, &[215, 113, 235, 59, 143, 227, 177, 53, 151, 46]),
        (1, 1000, &[735, 819, 201, 799, 435, 497, 175, 590]),
    ];
    for (d1, d2, want) in cases {
        let e = SpectralEntries::uniform(d1, d2, want.len(), SEED).unwrap();
        assert_eq!(e.flat_indices(), want, "{d1}x{d2}");
        for (l, &f) in want.iter().enumerate() {
            assert_eq!(e.rows()[l] as u64, f / d2 as u64);
            assert_eq!(e.cols()[l] as u64, f % d2 as u64);
        }
        // The same index set, transposed shape: same flat indices, different (u, v).
        let t = SpectralEntries::uniform(d2, d1, want.len(), SEED).unwrap();
        assert_eq!(t.flat_indices(), want);
    }
    let full = SpectralEntries::uniform(2, 5, 10, SEED).unwrap();
    assert_eq!(full.flat_indices(), [5, 9, 0, 3, 1, 7, 4, 8, 6, 2]);
}

#[test]
fn prefix_consistency() {
    for &(n, seed) in &[(1000u64, SEED), (589_824, 3), (97, 0), (5, 42)] {
        let long = randperm_prefix(n, 64, seed);
        for k in [0, 1, 2, 7, long.len()].map(|k| k.min(long.len())) {
            assert_eq!(randperm_prefix(n, k, seed), long[..k], "n={n} k={k}");
        }
    }
    let big = SpectralEntries::uniform(64, 48, 300, 9).unwrap();
    let small = SpectralEntries::uniform(64, 48, 17, 9).unwrap();
    assert_eq!(small.flat_indices(), big.flat_indices()[..17]);
}

fn assert_valid(e: &SpectralEntries, d1: usize, d2: usize, n: usize) {
    assert_eq!(e.shape(), (d1, d2));
    assert_eq!((e.d1(), e.d2()), (d1, d2));
    assert_eq!(e.len(), n);
    assert!(!e.is_empty());
    assert_eq!(e.rows().len(), n);
    assert_eq!(e.cols().len(), n);
    assert!(e.rows().iter().all(|&u| (u as usize) < d1));
    assert!(e.cols().iter().all(|&v| (v as usize) < d2));
    let unique: HashSet<u64> = e.flat_indices().into_iter().collect();
    assert_eq!(unique.len(), n, "duplicate entries");
    assert_groups_consistent(e);
}

fn assert_groups_consistent(e: &SpectralEntries) {
    let g = fourierft::internals::column_groups(e);
    assert_eq!(g.offsets.len(), g.columns.len() + 1);
    assert_eq!(g.offsets.first(), Some(&0));
    assert_eq!(g.offsets.last(), Some(&e.len()));
    assert!(g.columns.windows(2).all(|w| w[0] < w[1]));
    assert!(g.offsets.windows(2).all(|w| w[0] < w[1]));
    let mut seen = vec![false; e.len()];
    for (grp, (col, members)) in g.iter().enumerate() {
        assert_eq!(col, g.columns[grp]);
        assert!(members.windows(2).all(|w| w[0] < w[1]));
        for &l in members {
            assert_eq!(e.cols()[l as usize], col);
            assert!(!seen[l as usize]);
            seen[l as usize] = true;
        }
    }
    assert!(seen.iter().all(|&s| s));
    let distinct: HashSet<u32> = e.cols().iter().copied().collect();
    assert_eq!(distinct.len(), g.columns.len());
}

#[test]
fn uniform_entries_are_valid_for_awkward_shapes() {
    let shapes: [(usize, usize); 7] = [
        (1, 1),
        (1, 97),
        (97, 1),
        (7, 13),
        (13, 7),
        (101, 103),
        (3, 4096),
    ];
    for (d1, d2) in shapes {
        let total = d1 * d2;
        for n in [1, total.div_ceil(3), total.saturating_sub(1).max(1), total] {
            for seed in [0, 1, SEED, u64::MAX] {
                let e = SpectralEntries::uniform(d1, d2, n, seed).unwrap();
                assert_valid(&e, d1, d2, n);
            }
        }
        // n = d1*d2 is a full permutation.
        let e = SpectralEntries::uniform(d1, d2, total, 5).unwrap();
        let mut flat = e.flat_indices();
        flat.sort_unstable();
        assert_eq!(flat, (0..total as u64).collect::<Vec<_>>());
    }
}

#[test]
fn cached_entries_are_shared() {
    let a = SpectralEntries::uniform(300, 200, 50, 1234).unwrap();
    let b = SpectralEntries::uniform(300, 200, 50, 1234).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    let c = SpectralEntries::uniform(300, 200, 50, 1235).unwrap();
    assert!(!Arc::ptr_eq(&a, &c));
    let d = SpectralEntries::uniform(200, 300, 50, 1234).unwrap();
    assert!(!Arc::ptr_eq(&a, &d));
    let s = SpectralEntries::sample(300, 200, 50, 1234, &EntrySampling::Uniform).unwrap();
    assert!(Arc::ptr_eq(&a, &s));

    let f1 = SpectralEntries::frequency_biased(40, 30, 25, 8, 1.0, 3.0).unwrap();
    let f2 = SpectralEntries::sample(
        40,
        30,
        25,
        8,
        &EntrySampling::FrequencyBiased {
            center: 1.0,
            width: 3.0,
        },
    )
    .unwrap();
    assert!(Arc::ptr_eq(&f1, &f2));
    let f3 = SpectralEntries::frequency_biased(40, 30, 25, 8, 1.0, 3.5).unwrap();
    assert!(!Arc::ptr_eq(&f1, &f3));

    // Dropping every user frees the entries; a later call rebuilds equal ones.
    let (weak, flat) = (Arc::downgrade(&a), a.flat_indices());
    drop((a, b, s));
    assert!(weak.upgrade().is_none());
    let again = SpectralEntries::uniform(300, 200, 50, 1234).unwrap();
    assert_eq!(again.flat_indices(), flat);
}

#[test]
fn sharing_across_threads() {
    let all: Vec<Arc<SpectralEntries>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| SpectralEntries::uniform(512, 384, 100, 99).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in &all[1..] {
        assert!(Arc::ptr_eq(&all[0], e));
    }
}

fn mean_distance(e: &SpectralEntries) -> f64 {
    let signed = |i: u32, d: usize| {
        let i = i as f64;
        let d = d as f64;
        if i <= (d / 2.0).floor() {
            i
        } else {
            i - d
        }
    };
    let total: f64 = e
        .rows()
        .iter()
        .zip(e.cols())
        .map(|(&u, &v)| signed(u, e.d1()).hypot(signed(v, e.d2())))
        .sum();
    total / e.len() as f64
}

#[test]
fn frequency_biased_entries() {
    for (d1, d2) in [(64, 64), (1, 50), (50, 1), (31, 17)] {
        for (center, width) in [(0.0, 2.0), (3.0, 1.5), (10.0, 50.0)] {
            let n = (d1 * d2 / 4).max(1);
            let e = SpectralEntries::frequency_biased(d1, d2, n, 3, center, width).unwrap();
            assert_valid(&e, d1, d2, n);
        }
    }
    // Deterministic for a seed (also after the cached copy is gone), different across seeds.
    let a = SpectralEntries::frequency_biased(64, 64, 100, 11, 0.0, 4.0).unwrap();
    let a_flat = a.flat_indices();
    drop(a);
    let b = SpectralEntries::frequency_biased(64, 64, 100, 11, 0.0, 4.0).unwrap();
    assert_eq!(b.flat_indices(), a_flat);
    let c = SpectralEntries::frequency_biased(64, 64, 100, 12, 0.0, 4.0).unwrap();
    assert_ne!(c.flat_indices(), a_flat);

    // Concentrated near DC for a small center and width.
    let uniform = SpectralEntries::uniform(64, 64, 100, 11).unwrap();
    let (biased_d, uniform_d) = (mean_distance(&b), mean_distance(&uniform));
    assert!(biased_d < 6.0, "mean distance {biased_d}");
    assert!(biased_d < uniform_d / 4.0, "{biased_d} vs {uniform_d}");
    // With center 0 the DC term has the largest weight; a band at 20 concentrates near D = 20.
    let band = SpectralEntries::frequency_biased(64, 64, 100, 11, 20.0, 1.0).unwrap();
    let band_d = mean_distance(&band);
    assert!((band_d - 20.0).abs() < 2.0, "band mean distance {band_d}");

    // The full spectrum with center 0: every position has positive weight.
    let full = SpectralEntries::frequency_biased(6, 5, 30, 1, 0.0, 1.0).unwrap();
    assert_valid(&full, 6, 5, 30);
}

#[test]
fn explicit_entries_keep_order() {
    let pos = [(2, 3), (0, 0), (4, 3), (1, 2)];
    let e = SpectralEntries::explicit(5, 4, &pos).unwrap();
    assert_valid(&e, 5, 4, 4);
    assert_eq!(e.rows(), [2, 0, 4, 1]);
    assert_eq!(e.cols(), [3, 0, 3, 2]);
    assert_eq!(e.flat_indices(), [11, 0, 19, 6]);
    let g = fourierft::internals::column_groups(&e);
    assert_eq!(g.columns, [0, 2, 3]);
    assert_eq!(g.offsets, [0, 1, 2, 4]);
    assert_eq!(g.entries, [1, 3, 0, 2]);
    let s = SpectralEntries::sample(5, 4, 4, 0, &EntrySampling::Explicit(pos.to_vec())).unwrap();
    assert_eq!(*s, *e);
    assert_eq!(EntrySampling::default(), EntrySampling::Uniform);
}

#[test]
fn bad_inputs_give_the_right_errors() {
    let count = |r: fourierft::Result<Arc<SpectralEntries>>| match r {
        Err(Error::EntryCount { n, max, .. }) => (n, max),
        other => panic!("expected EntryCount, got {other:?}"),
    };
    let config = |r: fourierft::Result<Arc<SpectralEntries>>| match r {
        Err(Error::Config(msg)) => msg,
        other => panic!("expected Config, got {other:?}"),
    };

    // n out of range, zero dims.
    assert_eq!(count(SpectralEntries::uniform(4, 5, 0, 1)), (0, 20));
    assert_eq!(count(SpectralEntries::uniform(4, 5, 21, 1)), (21, 20));
    assert_eq!(count(SpectralEntries::uniform(0, 5, 1, 1)), (1, 0));
    assert_eq!(count(SpectralEntries::uniform(5, 0, 1, 1)), (1, 0));
    assert_eq!(
        count(SpectralEntries::frequency_biased(4, 5, 21, 1, 0.0, 1.0)),
        (21, 20)
    );
    assert_eq!(count(SpectralEntries::explicit(4, 5, &[])), (0, 20));
    assert_eq!(
        count(SpectralEntries::explicit(1, 1, &[(0, 0), (0, 0)])),
        (2, 1)
    );
    match SpectralEntries::uniform(4, 5, 0, 1) {
        Err(e @ Error::EntryCount { .. }) => {
            assert!(e.to_string().contains("uniform spectral entries"))
        }
        other => panic!("{other:?}"),
    }

    // Dimensions too large (and a product that would overflow u64 arithmetic naively).
    #[cfg(target_pointer_width = "64")]
    {
        config(SpectralEntries::uniform(1 << 32, 2, 1, 1));
        config(SpectralEntries::uniform(2, usize::MAX, 1, 1));
        config(SpectralEntries::explicit(usize::MAX, usize::MAX, &[(0, 0)]));
        config(SpectralEntries::frequency_biased(
            1 << 40,
            1 << 40,
            1,
            1,
            0.0,
            1.0,
        ));
    }
    assert_eq!(count(SpectralEntries::uniform(1, 1, usize::MAX, 1)).1, 1);

    // Bad center / width.
    for (c, w) in [
        (-1.0, 1.0),
        (f64::NAN, 1.0),
        (f64::INFINITY, 1.0),
        (0.0, 0.0),
        (0.0, -2.0),
        (0.0, f64::NAN),
        (0.0, f64::INFINITY),
    ] {
        config(SpectralEntries::frequency_biased(8, 8, 4, 1, c, w));
    }
    // Too few positive weights: with center > 0 DC has weight zero.
    let msg = config(SpectralEntries::frequency_biased(4, 4, 16, 1, 1.0, 1.0));
    assert!(msg.contains("15"), "{msg}");

    // Explicit positions out of range / duplicated.
    match SpectralEntries::explicit(3, 4, &[(0, 0), (2, 3), (3, 0)]) {
        Err(Error::EntryOutOfRange {
            index: 2,
            row: 3,
            col: 0,
            d1: 3,
            d2: 4,
        }) => {}
        other => panic!("{other:?}"),
    }
    match SpectralEntries::explicit(3, 4, &[(0, 4)]) {
        Err(Error::EntryOutOfRange {
            index: 0, col: 4, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    match SpectralEntries::explicit(3, 4, &[(1, 1), (0, 2), (2, 2), (0, 2)]) {
        Err(Error::DuplicateEntry {
            row: 0,
            col: 2,
            first: 1,
            second: 3,
        }) => {}
        other => panic!("{other:?}"),
    }

    // sample() with explicit positions: n must match.
    let explicit = EntrySampling::Explicit(vec![(0, 0), (1, 1)]);
    assert_eq!(
        count(SpectralEntries::sample(4, 4, 3, 0, &explicit)),
        (3, 2)
    );
    assert_eq!(
        count(SpectralEntries::sample(4, 4, 0, 0, &explicit)),
        (0, 2)
    );
    assert!(SpectralEntries::sample(4, 4, 2, 0, &explicit).is_ok());
}

#[test]
fn entry_sampling_serde_roundtrip() {
    for s in [
        EntrySampling::Uniform,
        EntrySampling::FrequencyBiased {
            center: 2.0,
            width: 0.5,
        },
        EntrySampling::Explicit(vec![(1, 2), (3, 4)]),
    ] {
        let json = serde_json::to_string(&s).unwrap();
        let back: EntrySampling = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }
}
