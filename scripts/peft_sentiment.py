#!/usr/bin/env python3
"""The sentiment demo's job with transformers + PEFT on CPU, for a side-by-side comparison.

Same as `cargo run --release -p fourierft-demo --bin sentiment`: MiniLM-L6 (all-MiniLM-L6-v2) on Rotten
Tomatoes from target/demo-assets (scripts/fetch-demo-assets.sh), the same split (train from the
front of the shuffled corpus, test from the back), the same tokenizer file and settings (no
padding, truncation at --max-len), the same batches (the same splitmix64 data order and length
bucketing), zero-initialised linear head on the mean-pooled embedding, dropout off, AdamW with a
linear decay to 0, the same learning rates, n, scaling and seeds. It prints the same table.

    .venv/bin/python scripts/peft_sentiment.py            # head only, LoRA r=8, FourierFT n=1000
    .venv/bin/python scripts/peft_sentiment.py --help

--load-candle DIR evaluates a FourierFT adapter saved by the Rust demo (target/demo-out/
fourierft-seed0) with PEFT instead of training: PEFT reads our file and should reproduce our
accuracy.

Needs: torch, transformers, peft, safetensors, tokenizers (python3 -m venv .venv &&
.venv/bin/pip install torch transformers peft safetensors).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

MASK64 = (1 << 64) - 1
BUCKET_BATCHES = 16


class SplitMix64:
    """The data-order generator, bit for bit the one in demo/src/bin/sentiment/data.rs."""

    def __init__(self, state):
        self.state = state & MASK64

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def shuffle(self, v):
        for i in range(len(v) - 1, 0, -1):
            j = self.next() % (i + 1)
            v[i], v[j] = v[j], v[i]


def epoch_batches(lens, batch, seed, epoch):
    rng = SplitMix64(((seed * 1_000_003) + epoch) & MASK64)
    idx = list(range(len(lens)))
    rng.shuffle(idx)
    batches = []
    for start in range(0, len(idx), batch * BUCKET_BATCHES):
        chunk = sorted(idx[start:start + batch * BUCKET_BATCHES], key=lambda i: lens[i])
        batches.extend(chunk[k:k + batch] for k in range(0, len(chunk), batch))
    rng.shuffle(batches)
    return batches


def eval_batches(lens, batch):
    idx = sorted(range(len(lens)), key=lambda i: lens[i])
    return [idx[k:k + batch] for k in range(0, len(idx), batch)]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default="target/demo-assets")
    p.add_argument("--train", type=int, default=1600)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--eval", choices=["test", "val"], default="test")
    p.add_argument("--methods", default="head,lora,fourierft")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--head-epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--scaling", type=float, default=150.0)
    p.add_argument("--random-loc-seed", type=int, default=777)
    p.add_argument("--fourier-init", choices=["zeros", "normal"], default="zeros")
    p.add_argument("--lr-fourier", type=float, default=1e-1)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=8.0)
    p.add_argument("--lr-lora", type=float, default=5e-3)
    p.add_argument("--lr-head", type=float, default=3e-2)
    p.add_argument("--lr-head-only", type=float, default=5e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None)
    p.add_argument("--dump-batches", action="store_true",
                   help="print every seed's training batches as JSON and exit (compare with the Rust demo's)")
    p.add_argument("--load-candle", default=None,
                   help="evaluate this FourierFT adapter dir saved by the Rust demo, then exit")
    return p.parse_args()


def main():
    args = parse_args()
    try:
        import torch
        import torch.nn.functional as F
        from peft import FourierFTConfig, LoraConfig, PeftModel, get_peft_model
        from safetensors.torch import load_file
        from tokenizers import Tokenizer
        from transformers import BertConfig, BertModel
    except ImportError as e:
        sys.exit(f"{e}: install torch, transformers, peft and safetensors "
                 "(python3 -m venv .venv && .venv/bin/pip install torch transformers peft safetensors)")
    import peft
    import transformers

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]

    path = os.path.join(args.assets, "rotten_tomatoes.jsonl")
    if not os.path.exists(path):
        sys.exit(f"{path} not found: run scripts/fetch-demo-assets.sh first")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    n = len(rows)
    if args.train + args.val + args.test > n:
        sys.exit(f"--train + --val + --test exceeds the {n} snippets")
    eval_rows = rows[n - args.test:] if args.eval == "test" else rows[args.train:args.train + args.val]
    train_rows = rows[:args.train]
    tok = Tokenizer.from_file(os.path.join(args.assets, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=args.max_len)

    def encode(rs):
        enc = tok.encode_batch([r["text"] for r in rs])
        return [e.ids for e in enc], [r["label"] for r in rs]

    train_ids, train_y = encode(train_rows)
    eval_ids, eval_y = encode(eval_rows)
    train_lens = [len(i) for i in train_ids]
    eval_lens = [len(i) for i in eval_ids]

    if args.dump_batches:
        print(json.dumps([[epoch_batches(train_lens, args.batch, seed, e) for e in range(args.epochs)]
                          for seed in seeds], separators=(",", ":")))
        return

    def pad(ids_list, idx):
        s = max(len(ids_list[i]) for i in idx)
        ids = torch.zeros((len(idx), s), dtype=torch.long)
        mask = torch.zeros((len(idx), s), dtype=torch.long)
        for k, i in enumerate(idx):
            ids[k, :len(ids_list[i])] = torch.tensor(ids_list[i])
            mask[k, :len(ids_list[i])] = 1
        return ids, mask

    config = BertConfig.from_json_file(os.path.join(args.assets, "config.json"))
    config.hidden_dropout_prob = 0.0
    config.attention_probs_dropout_prob = 0.0
    state = load_file(os.path.join(args.assets, "model.safetensors"))

    def load_bert():
        model = BertModel(config, add_pooling_layer=False)
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if k != "embeddings.position_ids" and not k.startswith("pooler.")]
        if missing or unexpected:
            sys.exit(f"MiniLM weights do not fit BertModel: missing {missing}, unexpected {unexpected}")
        return model

    def embed(model, ids, mask):
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def evaluate(model, head):
        model.eval()
        correct = 0
        with torch.no_grad():
            for b in eval_batches(eval_lens, 64):
                ids, mask = pad(eval_ids, b)
                pred = head(embed(model, ids, mask)).argmax(-1)
                correct += sum(int(p) == eval_y[i] for p, i in zip(pred.tolist(), b))
        return 100.0 * correct / len(eval_y)

    def new_head():
        head = torch.nn.Linear(config.hidden_size, 2)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        return head

    def linear_decay(total):
        return lambda step: 1.0 - step / total

    if args.load_candle:
        d = args.load_candle
        model = PeftModel.from_pretrained(load_bert(), d)
        head = new_head()
        h = load_file(os.path.join(d, "head.safetensors"))
        head.weight.data.copy_(h["weight"])
        head.bias.data.copy_(h["bias"])
        print(f"PEFT {peft.__version__} loaded {d}: {args.eval} accuracy {evaluate(model, head):.2f}%")
        return

    print(f"MiniLM-L6 + Rotten Tomatoes (transformers {transformers.__version__}, PEFT "
          f"{peft.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads): "
          f"{len(train_ids)} train / {len(eval_ids)} {args.eval} snippets, batch {args.batch}, "
          f"max length {args.max_len}, {args.epochs} epoch(s) (head only: {args.head_epochs}), "
          f"seeds {seeds}")
    results = []

    if "head" in methods:
        model = load_bert()
        model.eval()
        t = time.time()
        with torch.no_grad():
            feats = {}
            for name, ids_list, lens in (("train", train_ids, train_lens), ("eval", eval_ids, eval_lens)):
                out = torch.zeros((len(ids_list), config.hidden_size))
                for b in eval_batches(lens, 64):
                    ids, mask = pad(ids_list, b)
                    out[b] = embed(model, ids, mask)
                feats[name] = out
        print(f"head only: embedded {len(train_ids) + len(eval_ids)} snippets with the frozen "
              f"encoder in {time.time() - t:.1f} s")
        ty = torch.tensor(train_y)
        for seed in seeds:
            torch.manual_seed(seed)
            head = new_head()
            opt = torch.optim.AdamW(head.parameters(), lr=args.lr_head_only, weight_decay=args.weight_decay)
            total = math.ceil(len(train_ids) / args.batch) * args.head_epochs
            sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_decay(total))
            t = time.time()
            for epoch in range(args.head_epochs):
                for b in epoch_batches(train_lens, args.batch, seed, epoch):
                    loss = F.cross_entropy(head(feats["train"][b]), ty[b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
            train_s = time.time() - t
            with torch.no_grad():
                pred = head(feats["eval"]).argmax(-1)
            acc = 100.0 * sum(int(p) == y for p, y in zip(pred.tolist(), eval_y)) / len(eval_y)
            print(f" head only seed {seed}: accuracy {acc:.2f}%")
            results.append(dict(method="head only", seed=seed, adapter_params=0, accuracy=acc,
                                train_s=train_s, step_ms=1e3 * train_s / total,
                                step_cpu_ms=float("nan"), steps=total))

    # Seed by seed, alternating the methods (as the Rust demo does).
    for seed in seeds:
        for method in methods:
            if method == "head":
                continue
            torch.manual_seed(seed)
            if method == "lora":
                cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                 target_modules=["query", "value"])
                lr, label = args.lr_lora, "LoRA"
            elif method == "fourierft":
                cfg = FourierFTConfig(n_frequency=args.n, scaling=args.scaling,
                                      random_loc_seed=args.random_loc_seed,
                                      init_weights=args.fourier_init == "zeros",
                                      target_modules=["query", "value"])
                lr, label = args.lr_fourier, "FourierFT"
            else:
                sys.exit(f"unknown method {method}")
            model = get_peft_model(load_bert(), cfg)
            model.train()
            head = new_head()
            adapter_params = [p for p in model.parameters() if p.requires_grad]
            n_adapter = sum(p.numel() for p in adapter_params)
            opt = torch.optim.AdamW([
                {"params": adapter_params, "lr": lr},
                {"params": head.parameters(), "lr": args.lr_head},
            ], weight_decay=args.weight_decay)
            total = math.ceil(len(train_ids) / args.batch) * args.epochs
            sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_decay(total))
            step_time, step_cpu, steps, seen, ema = 0.0, 0.0, 0, 0, None
            start = time.time()
            for epoch in range(args.epochs):
                for b in epoch_batches(train_lens, args.batch, seed, epoch):
                    t, cpu = time.time(), time.process_time()
                    ids, mask = pad(train_ids, b)
                    y = torch.tensor([train_y[i] for i in b])
                    loss = F.cross_entropy(head(embed(model, ids, mask)), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    step_time += time.time() - t
                    step_cpu += time.process_time() - cpu
                    steps += 1
                    seen += len(b)
                    ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
                    if sys.stderr.isatty():
                        print(f"\r{label} seed {seed}: {steps}/{total} loss {ema:.3f} "
                              f"{seen / (time.time() - start):.1f} ex/s", end="", file=sys.stderr)
            if sys.stderr.isatty():
                print("\r\033[K", end="", file=sys.stderr)
            train_s = time.time() - start
            acc = evaluate(model, head)
            print(f"{label:>10} seed {seed}: accuracy {acc:.2f}%, {train_s:.0f} s, "
                  f"{1e3 * step_time / steps:.0f} ms/step ({1e3 * step_cpu / steps:.0f} ms CPU)")
            results.append(dict(method=label, seed=seed, adapter_params=n_adapter, accuracy=acc,
                                train_s=train_s, step_ms=1e3 * step_time / steps,
                                step_cpu_ms=1e3 * step_cpu / steps, steps=steps))

    print()
    print(f"| method | adapter params | {args.eval} acc % (mean ± std) | per seed | train s/run | step ms "
          f"| step CPU ms |")
    print("|---|---:|---:|---|---:|---:|---:|")
    names = {"head": "head only", "lora": "LoRA", "fourierft": "FourierFT"}
    for method in methods:
        rs = [r for r in results if r["method"] == names[method]]
        if not rs:
            continue
        accs = [r["accuracy"] for r in rs]
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        name = {"head": "head only", "lora": f"LoRA r={args.lora_r}",
                "fourierft": f"FourierFT n={args.n}"}[method]
        per_seed = " / ".join(f"{a:.1f}" for a in accs)
        train_s = statistics.mean(r["train_s"] for r in rs)
        step_ms = statistics.mean(r["step_ms"] for r in rs)
        cpu = statistics.mean(r["step_cpu_ms"] for r in rs)
        cpu = "–" if math.isnan(cpu) else f"{cpu:.0f}"
        print(f"| {name} (PEFT) | {rs[0]['adapter_params']} | {mean:.2f} ± {std:.2f} | {per_seed} "
              f"| {train_s:.1f} | {step_ms:.0f} | {cpu} |")
    print(f"\nsettings: FourierFT n={args.n} scaling={args.scaling} init={args.fourier_init} "
          f"random_loc_seed={args.random_loc_seed} lr_c={args.lr_fourier}; LoRA r={args.lora_r} "
          f"alpha={args.lora_alpha} lr={args.lr_lora}; head lr={args.lr_head} (head only: "
          f"lr={args.lr_head_only}, {args.head_epochs} epochs); AdamW weight_decay={args.weight_decay}, "
          f"linear decay to 0, no warmup; dropout 0")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
