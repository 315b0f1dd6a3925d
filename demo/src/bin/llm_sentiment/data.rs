//! The task: Rotten Tomatoes snippets as chat prompts, the answer token, the split and the
//! batches (their order comes from the generator shared with scripts/peft_llm_sentiment.py).

use anyhow::{ensure, Result};
use fourierft_demo::llm::ChatTemplate;
use fourierft_demo::run::{bucketed_batches, read_snippets, Snippet};
use std::collections::BTreeMap;
use tokenizers::Tokenizer;

use crate::{Args, EvalSplit};

/// The instruction before each snippet (the user turn of the chat template).
pub(crate) const INSTRUCTION: &str =
    "Is this movie review positive or negative? Answer with one word.\n\nReview: ";

/// The answers, negative first (label 0 = rotten, 1 = fresh). The assistant's turn starts on a
/// new line, so the answer is the word without a leading space.
pub(crate) const ANSWERS: [&str; 2] = ["negative", "positive"];

/// One snippet as a chat prompt: token ids up to the assistant's turn, and the label.
pub(crate) struct Example {
    pub(crate) ids: Vec<u32>,
    pub(crate) label: u32,
}

/// The prompts of the training split and of the evaluated split, and the answers' token ids.
pub(crate) struct Task {
    pub(crate) train: Vec<Example>,
    pub(crate) eval: Vec<Example>,
    pub(crate) answer_ids: [u32; 2],
}

pub(crate) fn load_task(args: &Args, tok: &Tokenizer, chat: &ChatTemplate) -> Result<Task> {
    let rows = read_snippets(&args.assets)?;
    let n = rows.len();
    ensure!(
        args.train + args.val + args.test <= n,
        "--train {} + --val {} + --test {} exceeds the {n} snippets",
        args.train,
        args.val,
        args.test
    );
    let eval_range = match args.eval {
        EvalSplit::Test => n - args.test..n,
        EvalSplit::Val => args.train..args.train + args.val,
    };
    let encode = |rows: &[Snippet]| -> Result<Vec<Example>> {
        rows.iter()
            .map(|r| {
                let prompt = chat.user_prompt(&format!("{INSTRUCTION}{}", r.text))?;
                let ids = tok
                    .encode(prompt.as_str(), false)
                    .map_err(anyhow::Error::msg)?
                    .get_ids()
                    .to_vec();
                Ok(Example {
                    ids,
                    label: r.label,
                })
            })
            .collect()
    };
    let mut answer_ids = [0u32; 2];
    for (slot, word) in answer_ids.iter_mut().zip(ANSWERS) {
        let enc = tok.encode(word, false).map_err(anyhow::Error::msg)?;
        ensure!(
            enc.get_ids().len() == 1,
            "the answer {word:?} is {} tokens for this tokenizer; the task needs one",
            enc.get_ids().len()
        );
        *slot = enc.get_ids()[0];
    }
    Ok(Task {
        train: encode(&rows[..args.train])?,
        eval: encode(&rows[eval_range])?,
        answer_ids,
    })
}

/// Prompts per length bucket, in batches: a batch holds prompts of nearly one length, so it
/// runs as few forwards (one per distinct length) of many rows.
pub(crate) const BUCKET_BATCHES: usize = 32;

/// The batches of one epoch (`fourierft_demo::run::bucketed_batches`: shuffled, runs of 32
/// batches sorted by prompt length, the batches shuffled), as scripts/peft_llm_sentiment.py's.
pub(crate) fn epoch_batches(
    data: &[Example],
    batch: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let lens: Vec<usize> = data.iter().map(|e| e.ids.len()).collect();
    bucketed_batches(&lens, batch, BUCKET_BATCHES, seed, epoch)
}

/// `idx` grouped by prompt length (the stock model takes no padding mask, so one forward runs
/// prompts of one length), each group at most `max` long.
pub(crate) fn same_length_groups(data: &[Example], idx: &[usize], max: usize) -> Vec<Vec<usize>> {
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &i in idx {
        by_len.entry(data[i].ids.len()).or_default().push(i);
    }
    by_len
        .into_values()
        .flat_map(|g| g.chunks(max).map(|c| c.to_vec()).collect::<Vec<_>>())
        .collect()
}
