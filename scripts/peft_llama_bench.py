#!/usr/bin/env python3
"""PEFT sibling of `cargo run --release --example finetune_llama -- --bench`.

One FourierFT training step of a random-init transformers LlamaForCausalLM (hidden 1024, 8 layers,
MLP 2816, vocab 32000, 16 heads), 512 tokens, q_proj + v_proj adapted (n_frequency 1000, scaling
150), AdamW on the spectra, loss = cross-entropy of the last position's logits (what candle's
Llama computes; `logits_to_keep=1`). Prints `train_step_ms`, `forward_ms` and `backward_ms`
(medians of --steps after one warm-up) and `peak_rss_mb`.

Run: .venv/bin/python scripts/peft_llama_bench.py [--threads 2] [--steps 5]
"""

import argparse
import resource
import statistics
import time

import torch
from peft import FourierFTConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).float()
    pcfg = FourierFTConfig(n_frequency=1000, scaling=150.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, pcfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens))
    target = torch.randint(0, cfg.vocab_size, (1,))
    times = []  # (forward, backward, optimizer) ms per timed step
    for step in range(args.steps + 1):
        t = time.perf_counter()
        opt.zero_grad()
        logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1, :]
        loss = torch.nn.functional.cross_entropy(logits, target)
        t_fwd = time.perf_counter()
        loss.backward()
        t_bwd = time.perf_counter()
        opt.step()
        if step > 0:
            t_end = time.perf_counter()
            times.append(((t_fwd - t) * 1e3, (t_bwd - t_fwd) * 1e3, (t_end - t_bwd) * 1e3))
    n = sum(p.numel() for p in params)
    print(
        f"PEFT {__import__('peft').__version__} / torch {torch.__version__}: Llama hidden 1024, 8 layers, "
        f"{args.tokens} tokens, q_proj+v_proj n=1000 ({n} trainable), {torch.get_num_threads()} threads"
    )
    print(f"train_step_ms {statistics.median(sum(t) for t in times):.1f}")
    print(f"forward_ms {statistics.median(t[0] for t in times):.1f}")
    print(f"backward_ms {statistics.median(t[1] for t in times):.1f}")
    print(f"peak_rss_mb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")


if __name__ == "__main__":
    main()
