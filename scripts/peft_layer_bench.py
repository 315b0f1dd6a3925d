#!/usr/bin/env python3
"""One FourierFT layer (d x d, no bias, f32) with Hugging Face PEFT, timed line by line.

Same flags and output lines as `cargo run --release --example bench_layer`:

    python3 -m venv .venv && .venv/bin/pip install torch peft safetensors
    .venv/bin/python scripts/peft_layer_bench.py --dim 4096 --n 1000 --batch 64 --threads 2

Each *_ms line is the median of --runs (>= 7) timed runs after a warm-up.
"""
import argparse
import resource
import statistics
import time

import torch
from torch import nn
from peft import FourierFTConfig, get_peft_model


class One(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.lin(x)


def median_ms(runs, f):
    f()  # warm-up
    times = []
    for _ in range(max(runs, 7)):
        start = time.perf_counter()
        f()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runs", type=int, default=9)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d = a.dim
    base = One(d)
    nn.init.normal_(base.lin.weight, std=0.02)
    base_lin = nn.Linear(d, d, bias=False)
    base_lin.weight.data.copy_(base.lin.weight.data)
    base_lin.requires_grad_(False)
    model = get_peft_model(base, FourierFTConfig(n_frequency=a.n, scaling=150.0, target_modules=["lin"]))
    layer = model.base_model.model.lin
    x = torch.randn(a.batch, d)
    target = torch.randn(a.batch, d)

    with torch.no_grad():
        delta = median_ms(a.runs, lambda: layer.get_delta_weight("default"))
        forward = median_ms(a.runs, lambda: model(x))
        base_only = median_ms(a.runs, lambda: base_lin(x))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)

    def step():
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        opt.step()

    train = median_ms(a.runs, step)

    def merge():
        with torch.no_grad():
            layer.merge()
            layer.unmerge()

    merge_ms = median_ms(a.runs, merge) / 2
    print(f"delta_weight_ms {delta:.3f}")
    print(f"forward_ms {forward:.3f}")
    print(f"base_only_forward_ms {base_only:.3f}")
    print(f"train_step_ms {train:.3f}")
    print(f"merge_ms {merge_ms:.3f}")
    print(f"peak_rss_mb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")


if __name__ == "__main__":
    main()
