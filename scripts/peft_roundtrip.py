#!/usr/bin/env python3
"""Round trips between REAL Hugging Face PEFT and the Rust crate (ISSUE 4).

    .venv/bin/python scripts/peft_roundtrip.py make    # (a) PEFT -> Rust fixtures
    .venv/bin/python scripts/peft_roundtrip.py check   # (b) Rust -> PEFT check
    .venv/bin/python scripts/peft_roundtrip.py check-seqcls  # Rust-trained head + biases -> PEFT
    .venv/bin/python scripts/peft_roundtrip.py check-interop # Rust re-saves of real adapters -> PEFT

(a) `make` builds a toy GPT-2-like model (non-square nn.Linear and transformers Conv1D layers),
adapts it with PEFT (regex target_modules, n_frequency_pattern, seed != 777, fan_in_fan_out on
the Conv1D weights, modules_to_save and bias="fourier_only" with changed values), and writes
tests/fixtures/peft_roundtrip/:
  adapter/               PEFT's save_pretrained output
  base.safetensors       the toy model before adaptation
  expected.safetensors   x [3, 5, 12], y_base, y_adapted (unmerged PEFT), y_merged (merge_and_unload)
  merged.safetensors     state dict of merge_and_unload(): what `fourierft merge` must produce
  matching.json          PEFT's own target_modules / n_frequency decisions for many module paths
                         and configurations (built by get_peft_model on a model with those paths)
  meta.json              versions
The Rust tests (tests/peft_roundtrip.rs, tests/cli.rs, tests/peft_io.rs) check against these.

(b) `check` loads tests/fixtures/rust_adapter/adapter (written by the Rust test
`rust_adapter_fixture_is_reproducible`, FOURIERFT_BLESS=1 regenerates it) with
PeftModel.from_pretrained onto the same base and checks PEFT's outputs and merged weights equal
the Rust ones in tests/fixtures/rust_adapter/expected.safetensors.

    .venv/bin/python scripts/peft_roundtrip.py minilm [ASSETS ADAPTER MERGED]

compares PEFT's merge_and_unload() of MiniLM with the checkpoint `cargo run --example deploy_bert`
merged in Rust (defaults: target/demo-assets, target/demo-out/deploy-demo-adapter,
target/demo-out/minilm-fourierft-merged.safetensors).
"""

import copy
import json
import os
import shutil
import sys

import peft
import torch
import torch.nn as nn
import transformers
from peft import FourierFTConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "peft_roundtrip")
RUST = os.path.join(ROOT, "rust_adapter")
TOL = 1e-5


class Block(nn.Module):
    def __init__(self, d=16, h=40, g=24):
        super().__init__()
        self.c_fc = Conv1D(h, d)  # GPT-2 layout: weight (d, h) = (in, out)
        self.c_proj = Conv1D(d, h)  # weight (h, d)
        self.gate = nn.Linear(d, g)  # weight (g, d) = (out, in)
        self.up = nn.Linear(g, d)

    def forward(self, x):
        x = x + self.c_proj(torch.tanh(self.c_fc(x)))
        return x + self.up(torch.relu(self.gate(x)))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.h = nn.ModuleList([Block() for _ in range(2)])
        self.head = nn.Linear(16, 6)

    def forward(self, x):
        x = self.embed(x)
        for block in self.h:
            x = block(x)
        return self.head(x)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def versions():
    return {
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def base_model():
    model = Toy().eval()
    model.load_state_dict(load_file(os.path.join(OUT, "base.safetensors")))
    return model


def x_input():
    return load_file(os.path.join(OUT, "expected.safetensors"))["x"]


# ---------------------------------------------------------------- matching ground truth (a)

MATCH_PATHS = [
    "encoder.layer.0.attention.self.query",
    "encoder.layer.0.attention.self.value",
    "encoder.layer.1.attention.self.query",
    "encoder.layer.1.attention.output.dense",
    "encoder.layer.2.attention.self.value",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.11.self_attn.q_proj",
    "model.layers.1.mlp.experts.0.fc2",
    "model.layers.2.mlp.experts.1.fc2",
    "transformer.h.0.attn.c_attn",
    "transformer.h.1.attn.c_attn",
    "transformer.h.1.mlp.c_proj",
    "pooler.dense",
    "classifier",
    "query",
    "out_proj",
]

MATCH_CONFIGS = [
    dict(target_modules=["query", "value"], n_frequency=5),
    dict(target_modules=r".*\.(q|v)_proj", n_frequency=6),
    dict(target_modules=r"encoder\.layer\.[01]\..*\.(query|value|dense)", n_frequency=4),
    dict(target_modules=["query", "value", "q_proj"], layers_to_transform=[0, 2], n_frequency=5),
    dict(target_modules=["c_attn", "c_proj"], layers_to_transform=1, layers_pattern="h", n_frequency=7),
    dict(target_modules=["fc2", "q_proj"], layers_to_transform=[1], layers_pattern=["blocks", "layers"],
         n_frequency=3),
    dict(target_modules=["dense", "query", "classifier"], exclude_modules=["output.dense"],
         modules_to_save=["classifier"], n_frequency=5),
    dict(target_modules=["query", "value", "dense"], exclude_modules=r".*layer\.1\..*", n_frequency=5),
    dict(target_modules=["query", "value", "out_proj", "fc2", "c_attn"], n_frequency=9,
         n_frequency_pattern={"value": 11, "encoder.layer.1.attention.self.query": 13, "query": 17,
                              "experts.[0-9].fc2": 19, "out_proj": 21}),
    dict(target_modules=r".*(query|value|c_attn)", n_frequency=2,
         n_frequency_pattern={"h.1.attn.c_attn": 3, "layer.0.attention.self.query": 4}),
]


def tree_model(paths, d_in=4, d_out=6):
    """A model whose Linear layers sit exactly at `paths` (ModuleDict containers in between)."""
    root = nn.Module()
    for path in paths:
        parts = path.split(".")
        parent = root
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.ModuleDict() if isinstance(parent, nn.ModuleDict) else nn.Module())
            parent = getattr(parent, p) if not isinstance(parent, nn.ModuleDict) else parent[p]
        parent.add_module(parts[-1], nn.Linear(d_in, d_out))
    return root


def matching_cases():
    cases = []
    for kwargs in MATCH_CONFIGS:
        config = FourierFTConfig(**copy.deepcopy(kwargs))
        model = get_peft_model(tree_model(MATCH_PATHS), config)
        result = {}
        for path in MATCH_PATHS:
            module = model.base_model.model.get_submodule(path)
            is_ft = hasattr(module, "fourierft_n_frequency")
            result[path] = module.fourierft_n_frequency["default"] if is_ft else None
        cases.append({"config": kwargs, "n_frequency": result})
    return cases


# ---------------------------------------------------------------- (a) PEFT -> Rust

def make():
    # adapter_config.json stores sets from Python: pin the hash seed so the file is stable.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable] + sys.argv)

    torch.manual_seed(0)
    base = Toy().eval()
    base_sd = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_base = base(x)

    config = FourierFTConfig(
        n_frequency=60,
        scaling=87.5,
        random_loc_seed=31337,
        target_modules=r"h\.\d+\.(c_fc|c_proj|gate)",
        n_frequency_pattern={"c_proj": 100, "h.1.gate": 30},
        fan_in_fan_out=True,
        modules_to_save=["head"],
        bias="fourier_only",
        init_weights=False,
    )
    model = get_peft_model(base, config).eval()
    inner = model.base_model.model
    # Make the saved biases and the modules_to_save copy differ from the base, as training would.
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i in range(2):
            for name in ("c_fc", "c_proj", "gate"):
                layer = getattr(inner.h[i], name).base_layer
                layer.bias += 0.05 * torch.randn(layer.bias.shape, generator=g)
        head = inner.head.modules_to_save["default"]
        head.weight += 0.05 * torch.randn(head.weight.shape, generator=g)
        head.bias += 0.05 * torch.randn(head.bias.shape, generator=g)

    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    adapter_dir = os.path.join(OUT, "adapter")
    model.save_pretrained(adapter_dir)
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)

    with torch.no_grad():
        y_adapted = model(x)
        merged = copy.deepcopy(model).merge_and_unload()
        y_merged = merged(x)
    merged_sd = {k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()}
    assert sorted(merged_sd) == sorted(base_sd), (sorted(merged_sd), sorted(base_sd))
    assert rel_err(y_merged, y_adapted) < TOL
    assert rel_err(y_adapted, y_base) > 1e-2, "the adapter must change the outputs"

    # PEFT's per-module facts (n, layout), as the Rust tests expect them.
    for i in range(2):
        for name, n, ffo in (("c_fc", 60, True), ("c_proj", 100, True), ("gate", 30 if i else 60, False)):
            layer = getattr(inner.h[i], name)
            assert layer.fourierft_n_frequency["default"] == n, (i, name)
            assert layer.fan_in_fan_out == ffo, (i, name)
            assert layer.fourierft_random_loc_seed["default"] == 31337
    saved = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    print("saved config fan_in_fan_out =", saved["fan_in_fan_out"], "(PEFT rewrites it per module)")

    save_file(base_sd, os.path.join(OUT, "base.safetensors"))
    save_file(merged_sd, os.path.join(OUT, "merged.safetensors"), metadata={"format": "pt"})
    save_file(
        {"x": x, "y_base": y_base, "y_adapted": y_adapted, "y_merged": y_merged},
        os.path.join(OUT, "expected.safetensors"),
        metadata=versions(),
    )
    with open(os.path.join(OUT, "matching.json"), "w") as f:
        json.dump({"paths": MATCH_PATHS, "cases": matching_cases()}, f, indent=1)
        f.write("\n")
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(versions(), f, indent=2)
        f.write("\n")
    print("wrote", os.path.normpath(OUT), versions())


# ---------------------------------------------------------------- (b) Rust -> PEFT

def check():
    adapter_dir = os.path.join(RUST, "adapter")
    expected = load_file(os.path.join(RUST, "expected.safetensors"))
    x = x_input()
    model = PeftModel.from_pretrained(base_model(), adapter_dir).eval()
    cfg = model.peft_config["default"]
    print(f"loaded {adapter_dir}: target_modules={cfg.target_modules} layers_to_transform="
          f"{cfg.layers_to_transform} layers_pattern={cfg.layers_pattern} "
          f"n_frequency_pattern={cfg.n_frequency_pattern}")
    adapted = sorted(n for n, m in model.named_modules() if hasattr(m, "fourierft_spectrum"))
    print("PEFT adapted:", adapted)
    ok = True

    def compare(name, found, want):
        nonlocal ok
        abs_err = (found.double() - want.double()).abs().max().item()
        rel = rel_err(found, want)
        good = rel <= TOL
        ok &= good
        print(f"  {name:28s} max abs err {abs_err:.3e}  rel {rel:.3e}  {'ok' if good else 'FAIL'}")

    with torch.no_grad():
        compare("y_adapted (PEFT vs Rust)", model(x), expected["y_adapted"])
        merged = model.merge_and_unload()
        compare("y_merged (PEFT vs Rust)", merged(x), expected["y_merged"])
    sd = merged.state_dict()
    for key in sorted(k for k in expected if k.startswith("merged.")):
        name = key[len("merged."):]
        compare(name, sd[name], expected[key])
    print("round trip (b):", "PASS" if ok else "FAIL", versions())
    sys.exit(0 if ok else 1)


# ---------------------------------------------------------------- SEQ_CLS with bias="all" (Rust -> PEFT)

class SeqCls(nn.Module):
    """The toy classifier of tests/peft_interop.rs (`SeqCls`)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.ln = nn.LayerNorm(16, eps=1e-5)
        self.query = nn.Linear(16, 16)
        self.value = nn.Linear(16, 20)
        self.classifier = nn.Linear(20, 3)

    def forward(self, x):
        h = self.value(torch.relu(self.query(self.ln(self.embed(x)))))
        return self.classifier(h.mean(1))


def check_seqcls():
    """Loads tests/fixtures/rust_seqcls/adapter (trained in Rust: spectra, the classifier head in
    modules_to_save, every bias with bias="all") with PeftModel.from_pretrained and compares the
    logits with Rust's."""
    fixture = os.path.join(ROOT, "rust_seqcls")
    model = SeqCls().eval()
    model.load_state_dict(load_file(os.path.join(fixture, "base.safetensors")))
    expected = load_file(os.path.join(fixture, "expected.safetensors"))
    peft_model = PeftModel.from_pretrained(model, os.path.join(fixture, "adapter")).eval()
    cfg = peft_model.peft_config["default"]
    print(f"loaded: task_type={cfg.task_type} bias={cfg.bias} modules_to_save={cfg.modules_to_save}")
    with torch.no_grad():
        found = peft_model.base_model.model(expected["x"])
        merged = peft_model.merge_and_unload()(expected["x"])
    rel = max(rel_err(found, expected["y_adapted"]), rel_err(merged, expected["y_adapted"]))
    print(f"SEQ_CLS bias=all (Rust -> PEFT): logits rel err {rel:.3e}", "PASS" if rel <= TOL else "FAIL",
          versions())
    sys.exit(0 if rel <= TOL else 1)


# ---------------------------------------------------------------- interop fixtures re-saved by Rust

def check_interop():
    """Loads tests/fixtures/peft_interop/<case>/resaved (each PEFT adapter read and written again
    by the crate) onto the case's base model with PeftModel.from_pretrained and compares the
    logits with those of the adapter PEFT wrote (io.safetensors)."""
    import transformers as tf

    classes = {"llama_lm_head": tf.LlamaForCausalLM, "gpt2_mixed": tf.GPT2LMHeadModel,
               "bert_seqcls": tf.BertForSequenceClassification,
               "bert_bias_all": tf.BertForSequenceClassification}
    ok = True
    for case, cls in classes.items():
        d = os.path.join(ROOT, "peft_interop", case)
        model = cls.from_pretrained(os.path.join(d, "base")).eval()
        io = load_file(os.path.join(d, "io.safetensors"))
        peft_model = PeftModel.from_pretrained(model, os.path.join(d, "resaved")).eval()
        with torch.no_grad():
            logits = peft_model(input_ids=io["input_ids"]).logits
        err = rel_err(logits, io["logits_adapted"])
        ok &= err <= TOL
        print(f"  {case:14s} logits rel err {err:.3e}  {'ok' if err <= TOL else 'FAIL'}")
    print("interop re-saves (Rust -> PEFT):", "PASS" if ok else "FAIL", versions())
    sys.exit(0 if ok else 1)


# ---------------------------------------------------------------- MiniLM (deploy_bert)

def minilm(assets="target/demo-assets", adapter="target/demo-out/deploy-demo-adapter",
           merged_file="target/demo-out/minilm-fourierft-merged.safetensors"):
    """PEFT's merge_and_unload of MiniLM + an adapter vs the merged checkpoint Rust wrote."""
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig.from_pretrained(assets)).eval()
    missing, unexpected = model.load_state_dict(load_file(os.path.join(assets, "model.safetensors")),
                                                strict=False)
    assert not [k for k in missing if "position_ids" not in k], missing
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    merged = peft_model.merge_and_unload().state_dict()
    ours = load_file(merged_file)
    worst = 0.0
    for name, t in ours.items():
        if name in merged:
            worst = max(worst, (merged[name].double() - t.double()).abs().max().item())
    n = len([k for k in ours if k in merged])
    print(f"MiniLM: {n} tensors compared, max abs err PEFT merge_and_unload vs Rust merge: {worst:.3e}")
    sys.exit(0 if worst <= TOL else 1)


if __name__ == "__main__":
    commands = {"make": make, "check": check, "check-seqcls": check_seqcls,
                "check-interop": check_interop, "minilm": minilm}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
