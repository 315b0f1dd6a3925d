//! The data order the demos share with their PEFT scripts (`fourierft_demo::run`): splitmix64
//! against its published first outputs, and the bucketed batches against the values
//! scripts/peft_llm_sentiment.py's `epoch_batches` prints for the same input (its bucket of 32
//! batches covers these 23 examples, so the whole epoch is sorted by length).

use fourierft_demo::run::{bucketed_batches, SplitMix64};

#[test]
fn splitmix64_matches_the_reference_generator() {
    assert_eq!(SplitMix64(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    assert_eq!(SplitMix64(12345).next_u64(), 2454886589211414944);
}

#[test]
fn bucketed_batches_match_the_python_twin_and_are_a_sorted_permutation() {
    let lens: Vec<usize> = (0..23).map(|i| (i * 7) % 5).collect();
    let got = bucketed_batches(&lens, 3, 32, 5, 1);
    let python: Vec<Vec<usize>> = vec![
        vec![8, 13, 18],
        vec![15, 5, 3],
        vec![2, 17],
        vec![0, 10, 20],
        vec![21, 16, 6],
        vec![11, 1, 14],
        vec![19, 4, 9],
        vec![22, 12, 7],
    ];
    assert_eq!(got, python);
    // Every example once; within a batch the lengths are nondecreasing.
    let mut all: Vec<usize> = got.concat();
    all.sort();
    assert_eq!(all, (0..23).collect::<Vec<_>>());
    for b in &got {
        assert!(b.windows(2).all(|w| lens[w[0]] <= lens[w[1]]), "{b:?}");
    }
    // Another epoch, another order; the same epoch, the same order.
    assert_ne!(bucketed_batches(&lens, 3, 32, 5, 2), got);
    assert_eq!(bucketed_batches(&lens, 3, 32, 5, 1), got);
}
