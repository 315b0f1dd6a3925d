//! The corpus split, tokenized, and the batches: their order comes from a generator shared bit
//! for bit with scripts/peft_sentiment.py.

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};

use crate::{Args, EvalSplit};

/// One labelled snippet, tokenized.
pub(crate) struct Example {
    pub(crate) ids: Vec<u32>,
    pub(crate) label: u32,
}

/// splitmix64: the data-order generator, shared bit for bit with scripts/peft_sentiment.py.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Examples per length bucket, in batches.
const BUCKET_BATCHES: usize = 16;

/// The batches of one epoch: shuffle, sort each run of 16 batches' worth of examples by length
/// (so a batch pads little), cut into batches, shuffle the batches.
pub(crate) fn epoch_batches(
    lens: &[usize],
    batch: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = SplitMix64(seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
    let mut idx: Vec<usize> = (0..lens.len()).collect();
    rng.shuffle(&mut idx);
    let mut batches = Vec::new();
    for chunk in idx.chunks(batch * BUCKET_BATCHES) {
        let mut c = chunk.to_vec();
        c.sort_by_key(|&i| lens[i]);
        batches.extend(c.chunks(batch).map(|b| b.to_vec()));
    }
    rng.shuffle(&mut batches);
    batches
}

/// Evaluation batches: sorted by length, in order.
pub(crate) fn eval_batches(lens: &[usize], batch: usize) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..lens.len()).collect();
    idx.sort_by_key(|&i| lens[i]);
    idx.chunks(batch).map(|b| b.to_vec()).collect()
}

pub(crate) fn load_split(args: &Args) -> Result<(Vec<Example>, Vec<Example>)> {
    let path = args.assets.join("rotten_tomatoes.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (run scripts/fetch-demo-assets.sh first)",
            path.display()
        )
    })?;
    #[derive(serde::Deserialize)]
    struct Row {
        label: u32,
        text: String,
    }
    let rows: Vec<Row> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    let n = rows.len();
    let eval_range = match args.eval {
        EvalSplit::Test => n.saturating_sub(args.test)..n,
        EvalSplit::Val => args.train..args.train + args.val,
    };
    ensure!(
        args.train + args.val + args.test <= n,
        "--train {} + --val {} + --test {} exceeds the {n} snippets",
        args.train,
        args.val,
        args.test
    );
    let tok = fourierft_demo::tokenizer(&args.assets.join("tokenizer.json"), args.max_len)?;
    let encode = |rows: &[Row]| -> Result<Vec<Example>> {
        let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
        Ok(fourierft_demo::encode(&tok, &texts)?
            .into_iter()
            .zip(rows)
            .map(|(ids, r)| Example {
                ids,
                label: r.label,
            })
            .collect())
    };
    Ok((encode(&rows[..args.train])?, encode(&rows[eval_range])?))
}

pub(crate) fn batch_tensors(
    data: &[Example],
    idx: &[usize],
    dev: &Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let seqs: Vec<&[u32]> = idx.iter().map(|&i| data[i].ids.as_slice()).collect();
    let (ids, mask) = fourierft_demo::pad_batch(&seqs, dev)?;
    let labels: Vec<u32> = idx.iter().map(|&i| data[i].label).collect();
    Ok((ids, mask, Tensor::new(labels, dev)?))
}
