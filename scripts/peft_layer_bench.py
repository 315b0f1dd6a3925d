#!/usr/bin/env python3
"""One FourierFT layer (d x d, no bias) with Hugging Face PEFT, timed line by line.

Same flags and output lines as `cargo run --release --example bench_layer`:

    python3 -m venv .venv && .venv/bin/pip install torch peft safetensors
    .venv/bin/python scripts/peft_layer_bench.py --dim 4096 --n 1000 --batch 64 --threads 2

Each *_ms line is the median of --runs (>= 7) timed runs after a warm-up, more until they cover
250 ms (at most 5000). `--device cuda` runs on the GPU (each run ends with
torch.cuda.synchronize()); `--dtype bf16` makes the base weight and input bf16 (PEFT keeps the spectrum in f32, its default autocast_adapter_dtype).
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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


MIN_TOTAL_MS = 250.0  # as examples/timing/mod.rs: a median covers at least this much wall time
MAX_CALLS = 5000


def median_ms(device, runs, f):
    f()  # warm-up
    sync(device)
    times = []
    while len(times) < max(runs, 7) or (sum(times) < MIN_TOTAL_MS and len(times) < MAX_CALLS):
        start = time.perf_counter()
        f()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    a = p.parse_args()
    dev = torch.device(a.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d = a.dim
    base = One(d)
    nn.init.normal_(base.lin.weight, std=0.02)
    base_lin = nn.Linear(d, d, bias=False)
    base_lin.weight.data.copy_(base.lin.weight.data)
    base_lin.requires_grad_(False)
    base, base_lin = base.to(dev, dtype), base_lin.to(dev, dtype)
    model = get_peft_model(base, FourierFTConfig(n_frequency=a.n, scaling=150.0, target_modules=["lin"]))
    layer = model.base_model.model.lin
    x = torch.randn(a.batch, d).to(dev, dtype)
    target = torch.randn(a.batch, d).to(dev, dtype)

    with torch.no_grad():
        delta = median_ms(dev, a.runs, lambda: layer.get_delta_weight("default"))
        forward = median_ms(dev, a.runs, lambda: model(x))
        base_only = median_ms(dev, a.runs, lambda: base_lin(x))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)

    def step():
        opt.zero_grad()
        loss = ((model(x) - target).float() ** 2).mean()
        loss.backward()
        opt.step()

    train = median_ms(dev, a.runs, step)

    def merge():
        with torch.no_grad():
            layer.merge()
            layer.unmerge()

    merge_ms = median_ms(dev, a.runs, merge) / 2
    print(f"delta_weight_ms {delta:.3f}")
    print(f"forward_ms {forward:.3f}")
    print(f"base_only_forward_ms {base_only:.3f}")
    print(f"train_step_ms {train:.3f}")
    print(f"merge_ms {merge_ms:.3f}")
    print(f"peak_rss_mb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")


if __name__ == "__main__":
    main()
