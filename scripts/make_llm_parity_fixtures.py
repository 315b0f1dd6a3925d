#!/usr/bin/env python3
"""Reference values for SmolLM2-135M-Instruct loaded from its GGUF by transformers (the model of
the LLM demo, target/demo-assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, fetched by
scripts/fetch-demo-assets.sh), for demo/tests/llm.rs:

- token ids of the first 200 Rotten Tomatoes snippets (no special tokens added), and of three
  chat prompts rendered with the file's chat template (the rendered text too);
- last-position logits of the three prompts: every 32nd vocabulary id, the top 10, and the
  log-sum-exp over the whole vocabulary (the full vectors would be 590 KB);
- 16 greedily generated tokens per prompt.

Writes demo/tests/fixtures/smollm2_parity.json. Needs torch, transformers and gguf:
    pip install torch transformers gguf
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ASSETS = os.environ.get("FOURIERFT_DEMO_ASSETS", os.path.join(ROOT, "target", "demo-assets"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Its own folder: from_pretrained would otherwise pick up the MiniLM tokenizer.json beside it.
MODEL_DIR = os.path.join(ASSETS, "smollm2")
PROMPTS = [
    "Is this movie review positive or negative? Answer with one word.\n\nReview: a gorgeous, witty, seductive movie.",
    "What is the capital of France?",
    "Write a haiku about candles.",
]
STRIDE, TOP, NEW_TOKENS = 32, 10, 16


def main():
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=GGUF, dtype=torch.float32)
    model.eval()
    with open(os.path.join(ASSETS, "rotten_tomatoes.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(200), f)]
    out = {
        "gguf": GGUF,
        "stride": STRIDE,
        "texts": [tok(t, add_special_tokens=False).input_ids for t in texts],
        "prompts": [],
    }
    for p in PROMPTS:
        chat = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(chat, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            gen = model.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, attention_mask=torch.ones(1, len(ids))
            )[0, len(ids):].tolist()
        top = torch.topk(logits, TOP)
        out["prompts"].append(
            {
                "user": p,
                "rendered": chat,
                "ids": ids,
                "logits_strided": logits[::STRIDE].tolist(),
                "top_ids": top.indices.tolist(),
                "top_logits": top.values.tolist(),
                "logsumexp": torch.logsumexp(logits, 0).item(),
                "greedy_ids": gen,
                "greedy_text": tok.decode(gen, skip_special_tokens=False),
            }
        )
        print(repr(p[:40]), "->", repr(out["prompts"][-1]["greedy_text"]), file=sys.stderr)
    dest = os.path.join(ROOT, "demo", "tests", "fixtures", "smollm2_parity.json")
    with open(dest + ".tmp", "w", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"))
    os.replace(dest + ".tmp", dest)
    print("wrote", dest, os.path.getsize(dest), "bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
