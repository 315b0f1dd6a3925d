#!/usr/bin/env python3
"""The LLM demo's job with transformers + PEFT on CPU, for a side-by-side comparison.

Same as `cargo run --release -p fourierft-demo --bin llm_sentiment`: SmolLM2-135M-Instruct loaded
by transformers from the same GGUF (target/demo-assets/smollm2/, scripts/fetch-demo-assets.sh),
dequantized to f32; Rotten Tomatoes prompts rendered with the model's chat template ("Is this movie
review positive or negative? Answer with one word.\\n\\nReview: ..."), the answer token
("positive" / "negative") after the assistant's turn header; the same split, the same batches (the
same splitmix64 order), cross-entropy on the answer token, AdamW with a linear decay to 0, the same
n, scaling, learning rates and seeds; LoRA and FourierFT on every q_proj and v_proj, dropout off.
It prints the same table.

A batch is left-padded with an attention mask and only the last position's logits are formed
(`logits_to_keep=1`): with rotary positions this equals running each prompt alone, which the Rust
side does (the stock candle model takes no padding mask).

    .venv/bin/python scripts/peft_llm_sentiment.py             # zero-shot, LoRA r=8, FourierFT n=1000,5000
    .venv/bin/python scripts/peft_llm_sentiment.py --help

--eval-adapter DIR evaluates a FourierFT adapter saved by the Rust demo (target/llm-demo-out/...)
with PEFT on the GGUF-loaded model instead of training: PEFT reads our file and should reproduce
our accuracy.

Needs: torch, transformers, peft, gguf (.venv/bin/pip install torch transformers peft gguf).
"""

import argparse
import json
import os
import sys
import time

MASK64 = (1 << 64) - 1
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTRUCTION = "Is this movie review positive or negative? Answer with one word.\n\nReview: "
ANSWERS = ["negative", "positive"]
TARGETS = ["q_proj", "v_proj"]


class SplitMix64:
    """The data-order generator, bit for bit fourierft_demo::run::SplitMix64."""

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


BUCKET_BATCHES = 32


def epoch_batches(lens, batch, seed, epoch):
    """fourierft_demo::run::bucketed_batches with runs of 32 batches sorted by prompt length."""
    rng = SplitMix64(((seed * 1_000_003) + epoch) & MASK64)
    idx = list(range(len(lens)))
    rng.shuffle(idx)
    batches = []
    for start in range(0, len(idx), batch * BUCKET_BATCHES):
        chunk = sorted(idx[start:start + batch * BUCKET_BATCHES], key=lambda i: lens[i])
        batches.extend(chunk[k:k + batch] for k in range(0, len(chunk), batch))
    rng.shuffle(batches)
    return batches


def floats(s):
    return [float(x) for x in s.split(",")]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--assets", default=os.path.join(here, "..", "target", "demo-assets"))
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--eval", choices=["test", "val"], default="test")
    p.add_argument("--methods", default="zero-shot,lora,fourierft")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--n", default="1000,5000")
    p.add_argument("--scaling", default="300")
    p.add_argument("--lr-fourier", default="0.01")
    p.add_argument("--fourier-init", choices=["zeros", "normal"], default="zeros")
    p.add_argument("--random-loc-seed", type=int, default=777)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lr-lora", default="0.001")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--dump-batches", action="store_true", help="print the batches as JSON and exit")
    p.add_argument("--eval-adapter", help="evaluate this saved FourierFT adapter (PEFT directory) instead")
    return p.parse_args()


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def main():
    args = parse_args()
    try:
        import torch
        import torch.nn.functional as F
        from peft import FourierFTConfig, LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        sys.exit(f"{e}: install torch, transformers, peft and gguf (.venv/bin/pip install torch transformers peft gguf)")
    import peft
    import transformers

    torch.set_num_threads(args.threads)
    model_dir = os.path.join(args.assets, "smollm2")
    if not os.path.exists(os.path.join(model_dir, GGUF)):
        sys.exit(f"{model_dir}/{GGUF} not found: run scripts/fetch-demo-assets.sh first")
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=GGUF)
    path = os.path.join(args.assets, "rotten_tomatoes.jsonl")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    n = len(rows)
    if args.train + args.val + args.test > n:
        sys.exit(f"--train + --val + --test exceeds the {n} snippets")
    eval_rows = rows[n - args.test:] if args.eval == "test" else rows[args.train:args.train + args.val]
    train_rows = rows[:args.train]

    def encode(rs):
        out = []
        for r in rs:
            chat = tok.apply_chat_template(
                [{"role": "user", "content": INSTRUCTION + r["text"]}], tokenize=False, add_generation_prompt=True
            )
            out.append((tok(chat, add_special_tokens=False).input_ids, r["label"]))
        return out

    train, evald = encode(train_rows), encode(eval_rows)
    train_lens = [len(ids) for ids, _ in train]
    answer_ids = []
    for w in ANSWERS:
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"answer {w!r} is {len(ids)} tokens"
        answer_ids.append(ids[0])
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.dump_batches:
        print(json.dumps([[epoch_batches(train_lens, args.batch, s, e) for e in range(args.epochs)] for s in seeds],
                         separators=(",", ":")))
        return

    def load_base():
        m = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=GGUF, dtype=torch.float32)
        m.config.use_cache = False
        return m

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def batch_tensors(data, idx):
        seqs = [data[i][0] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for k, s in enumerate(seqs):  # left padding: the last position is every prompt's end
            ids[k, width - len(s):] = torch.tensor(s)
            mask[k, width - len(s):] = 1
        return ids, mask

    def last_logits(model, data, idx):
        ids, mask = batch_tensors(data, idx)
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1, :]

    def evaluate(model):
        model.eval()
        order = sorted(range(len(evald)), key=lambda i: len(evald[i][0]))
        correct = 0
        with torch.no_grad():
            for k in range(0, len(order), args.eval_batch):
                idx = order[k:k + args.eval_batch]
                l = last_logits(model, evald, idx)[:, answer_ids]
                correct += sum(int((l[j, 1] > l[j, 0]).item()) == evald[i][1] for j, i in enumerate(idx))
        return 100.0 * correct / len(evald)

    split = args.eval
    print(f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {len(train)} train / {len(evald)} {split} prompts, batch {args.batch}")
    if args.eval_adapter:
        model = PeftModel.from_pretrained(load_base(), args.eval_adapter)
        print(f"PEFT on {args.eval_adapter}: {split} accuracy {evaluate(model):.2f}%")
        return

    results = []
    methods = args.methods.split(",")
    if "zero-shot" in methods:
        t = time.time()
        acc = evaluate(load_base())
        print(f"{'zero-shot':>36}: accuracy {acc:.2f}% ({time.time() - t:.0f} s)")
        results.append(dict(method="zero-shot", seed=0, adapter_params=0, accuracy=acc, train_s=0.0,
                            step_ms=float("nan"), step_cpu_ms=float("nan"), peak_rss_mb=peak_rss_mb()))
    specs = []
    for m in methods:
        if m == "lora":
            specs += [("lora", 0, 0.0, lr) for lr in floats(args.lr_lora)]
        elif m == "fourierft":
            specs += [("fourierft", int(nn), s, lr) for nn in args.n.split(",") for s in floats(args.scaling)
                      for lr in floats(args.lr_fourier)]
    for seed in seeds:
        for method, nf, scaling, lr in specs:
            reset_peak_rss()
            torch.manual_seed(seed)
            if method == "lora":
                label = f"LoRA r={args.lora_r} lr={lr:g}"
                cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=TARGETS)
            else:
                label = f"FourierFT n={nf} s={scaling:g} lr={lr:g}"
                cfg = FourierFTConfig(n_frequency=nf, scaling=scaling, random_loc_seed=args.random_loc_seed,
                                      init_weights=args.fourier_init == "zeros", target_modules=TARGETS)
            model = get_peft_model(load_base(), cfg)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            n_params = sum(p.numel() for p in params)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
            total = args.epochs * ((len(train) + args.batch - 1) // args.batch)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / total)
            losses, wall, cpu, step = [], 0.0, 0.0, 0
            start = time.time()
            for epoch in range(args.epochs):
                for b in epoch_batches(train_lens, args.batch, seed, epoch):
                    t, c = time.time(), time.process_time()
                    logits = last_logits(model, train, b)
                    target = torch.tensor([answer_ids[train[i][1]] for i in b])
                    loss = F.cross_entropy(logits, target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(loss.item())
                    if step > 0:
                        wall += time.time() - t
                        cpu += time.process_time() - c
                    step += 1
                    print(f"\r{label} seed {seed}: step {step}/{total} loss {sum(losses[-8:]) / len(losses[-8:]):.4f}",
                          end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
            train_s = time.time() - start
            timed = max(step - 1, 1)
            acc = evaluate(model)
            k = min(8, len(losses))
            r = dict(method=label, seed=seed, adapter_params=n_params, accuracy=acc, train_s=train_s,
                     step_ms=1e3 * wall / timed, step_cpu_ms=1e3 * cpu / timed, peak_rss_mb=peak_rss_mb(),
                     first_loss=sum(losses[:k]) / k, last_loss=sum(losses[-k:]) / k, steps=step)
            print(f"{label:>36} seed {seed}: accuracy {acc:.2f}%, loss {r['first_loss']:.3f} → {r['last_loss']:.3f}, "
                  f"{train_s:.0f} s, {r['step_ms']:.0f} ms/step ({r['step_cpu_ms']:.0f} ms CPU), "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB")
            results.append(r)
            del model, opt

    print()
    print(f"| method | adapter params | {split} acc % (mean ± std) | per seed | train s/run | step ms | step CPU ms | peak RSS MB |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    labels = []
    for r in results:
        if r["method"] not in labels:
            labels.append(r["method"])
    fmt = lambda x: "–" if x != x else f"{x:.0f}"
    for label in labels:
        rs = [r for r in results if r["method"] == label]
        accs = [r["accuracy"] for r in rs]
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if len(accs) > 1 else 0.0
        avg = lambda key: sum(r[key] for r in rs) / len(rs)
        print(f"| {label} (PEFT) | {rs[0]['adapter_params']} | {mean:.2f} ± {std:.2f} | "
              f"{' / '.join(f'{a:.1f}' for a in accs)} | {avg('train_s'):.0f} | {fmt(avg('step_ms'))} | "
              f"{fmt(avg('step_cpu_ms'))} | {fmt(avg('peak_rss_mb'))} |")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
