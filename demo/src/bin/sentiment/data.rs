//! The corpus split, tokenized, and the batches: their order comes from a generator shared bit
//! for bit with scripts/peft_sentiment.py.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};

use crate::{Args, EvalSplit};
use fourierft_demo::run::{bucketed_batches, read_snippets, Snippet};

/// One labelled snippet, tokenized.
pub(crate) struct Example {
    pub(crate) ids: Vec<u32>,
    pub(crate) label: u32,
}

/// Examples per length bucket, in batches.
const BUCKET_BATCHES: usize = 16;

/// The batches of one epoch (`fourierft_demo::run::bucketed_batches`, runs of 16 batches sorted
/// by length), the same as scripts/peft_sentiment.py's.
pub(crate) fn epoch_batches(
    lens: &[usize],
    batch: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    bucketed_batches(lens, batch, BUCKET_BATCHES, seed, epoch)
}

/// Evaluation batches: sorted by length, in order.
pub(crate) fn eval_batches(lens: &[usize], batch: usize) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..lens.len()).collect();
    idx.sort_by_key(|&i| lens[i]);
    idx.chunks(batch).map(|b| b.to_vec()).collect()
}

pub(crate) fn load_split(args: &Args) -> Result<(Vec<Example>, Vec<Example>)> {
    let rows = read_snippets(&args.assets)?;
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
    let encode = |rows: &[Snippet]| -> Result<Vec<Example>> {
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
