#!/usr/bin/env python3
"""Generate the PEFT FourierFT fixtures in tests/fixtures/peft_mlp/ with REAL Hugging Face PEFT.

How to run (from the repository root):

    python3 -m venv .venv && .venv/bin/pip install torch peft safetensors transformers \
        && .venv/bin/python scripts/make_peft_fixtures.py [mlp|interop|formats|half|all]

`interop` writes tests/fixtures/peft_interop/<case>/ from tiny random-init transformers models
(see `interop()`); `formats` runs scripts/make_peft_format_fixtures.py, `half` runs
scripts/make_peft_half_fixtures.py (a bf16 model).

Writes (all small, a few tens of KB):
  adapter/adapter_model.safetensors, adapter/adapter_config.json  -- PEFT's own save_pretrained output
  base.safetensors      -- base MLP state dict before adaptation (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
  expected.safetensors  -- per adapted layer L in {fc1, fc2}:
                             L.rows, L.cols, L.flat (int64; flat = rows*d2 + cols, PEFT's order),
                             L.spectrum (f32 [n]), L.delta_weight (f32 [d1, d2], get_delta_weight),
                             L.merged_weight (f32 [d1, d2], base weight + delta as merged by PEFT);
                           x (f32 [5, 24]), y_base, y_adapted (unmerged), y_merged (merge_and_unload);
                           metadata: peft_version, torch_version
  meta.json             -- per layer d1, d2, n, seed, scaling; peft/torch versions
"""

import copy
import json
import os
import shutil
import sys

import peft
import torch
import torch.nn as nn
from peft import FourierFTConfig, get_peft_model
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "peft_mlp")
SEED = 2024
SCALING = 120.0
N_DEFAULT = 90
N_PATTERN = {"fc2": 50}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 40)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(40, 18)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def naive_delta(rows, cols, coeffs, d1, d2, alpha):
    """ΔW[j,k] = alpha/(d1 d2) Σ c cos(2π((u j mod d1)/d1 + (v k mod d2)/d2)), in float64."""
    j = torch.arange(d1, dtype=torch.int64)
    k = torch.arange(d2, dtype=torch.int64)
    pu = (rows[:, None] * j[None, :]) % d1  # [n, d1]
    pv = (cols[:, None] * k[None, :]) % d2  # [n, d2]
    phase = pu.double()[:, :, None] / d1 + pv.double()[:, None, :] / d2  # [n, d1, d2]
    dw = (coeffs.double()[:, None, None] * torch.cos(2 * torch.pi * phase)).sum(0)
    return dw * alpha / (d1 * d2)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def main():
    # adapter_config.json stores target_modules from a Python set: pin the hash seed so its order is stable.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable] + sys.argv)

    # Sanity check of torch's randperm (seed 777, n = 10) against the value the Rust tests use.
    rp = torch.randperm(10, generator=torch.Generator().manual_seed(777)).tolist()
    assert rp == [5, 9, 0, 3, 1, 7, 4, 8, 6, 2], rp

    torch.manual_seed(0)
    base = MLP().eval()
    base_sd = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_base = base(x)

    config = FourierFTConfig(
        n_frequency=N_DEFAULT,
        scaling=SCALING,
        random_loc_seed=SEED,
        target_modules=["fc1", "fc2"],
        n_frequency_pattern=N_PATTERN,
        init_weights=False,
    )
    model = get_peft_model(base, config).eval()

    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    adapter_dir = os.path.join(OUT, "adapter")
    model.save_pretrained(adapter_dir)
    readme = os.path.join(adapter_dir, "README.md")  # model card boilerplate, not needed
    if os.path.exists(readme):
        os.remove(readme)

    with torch.no_grad():
        y_adapted = model(x)
        merged = copy.deepcopy(model).merge_and_unload()
        y_merged = merged(x)

    versions = {"peft_version": peft.__version__, "torch_version": torch.__version__}
    tensors = {"x": x, "y_base": y_base, "y_adapted": y_adapted, "y_merged": y_merged}
    meta = {"layers": {}, **versions}
    for name in ["fc1", "fc2"]:
        layer = getattr(model.base_model.model, name)
        d1, d2 = layer.out_features, layer.in_features
        n = N_PATTERN.get(name, N_DEFAULT)
        idx_store = getattr(layer, "indices", None) or getattr(layer, "fourierft_indices")
        rows, cols = idx_store["default"][0].long(), idx_store["default"][1].long()
        flat = rows * d2 + cols
        perm = torch.randperm(d1 * d2, generator=torch.Generator().manual_seed(SEED))[:n]
        assert torch.equal(flat, perm), name
        assert layer.fourierft_scaling["default"] == SCALING and layer.fourierft_n_frequency["default"] == n

        spectrum = layer.fourierft_spectrum["default"].detach().float()
        with torch.no_grad():
            delta = layer.get_delta_weight("default").float()
        assert delta.shape == (d1, d2)

        # ΔW = scaling * ifft2(dense).real, equal to the naive cosine sum (docs/ARCHITECTURE.md).
        dense = torch.zeros(d1, d2, dtype=torch.float64)
        dense[rows, cols] = spectrum.double()
        ifft64 = torch.fft.ifft2(dense).real * SCALING
        naive = naive_delta(rows, cols, spectrum, d1, d2, SCALING)
        assert rel_err(ifft64, naive) < 1e-12, name
        assert rel_err(delta, naive) < 1e-5, (name, rel_err(delta, naive))

        merged_w = getattr(merged, name).weight.detach()
        assert torch.equal(merged_w, base_sd[f"{name}.weight"] + delta), name

        tensors.update(
            {
                f"{name}.rows": rows,
                f"{name}.cols": cols,
                f"{name}.flat": flat,
                f"{name}.spectrum": spectrum,
                f"{name}.delta_weight": delta,
                f"{name}.merged_weight": merged_w,
            }
        )
        meta["layers"][name] = {"d1": d1, "d2": d2, "n": n, "seed": SEED, "scaling": SCALING}
        print(f"{name}: d1={d1} d2={d2} n={n} max|dW|={delta.abs().max():.4g} "
              f"rel err vs f64 naive {rel_err(delta, naive):.2e}")

    # Forward through the merged model agrees with the unmerged adapter.
    assert rel_err(y_merged, y_adapted) < 1e-5
    manual = base_sd["fc2.weight"] + tensors["fc2.delta_weight"]
    h = torch.relu(x @ (base_sd["fc1.weight"] + tensors["fc1.delta_weight"]).T + base_sd["fc1.bias"])
    assert rel_err(h @ manual.T + base_sd["fc2.bias"], y_adapted) < 1e-5

    save_file({k: v.detach().contiguous() for k, v in base_sd.items()}, os.path.join(OUT, "base.safetensors"))
    save_file(
        {k: v.detach().contiguous() for k, v in tensors.items()},
        os.path.join(OUT, "expected.safetensors"),
        metadata=versions,
    )
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print("wrote", os.path.normpath(OUT), versions)


INTEROP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "peft_interop")


def tiny_models():
    """Tiny random-init transformers models, one per interop case: (case, model, peft kwargs)."""
    import transformers as tf

    torch.manual_seed(0)
    llama = tf.LlamaForCausalLM(
        tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)
    )
    gpt2 = tf.GPT2LMHeadModel(
        tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                      tie_word_embeddings=False)
    )
    bert_cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    seqcls = tf.BertForSequenceClassification(tf.BertConfig(**bert_cfg))
    bias_all = tf.BertForSequenceClassification(tf.BertConfig(**bert_cfg))
    common = dict(scaling=100.0, random_loc_seed=2024, init_weights=False)
    return [
        # lm_head targeted with PEFT's default save: the file also stores lm_head.base_layer.weight.
        ("llama_lm_head", llama, dict(n_frequency=40, target_modules=["q_proj", "v_proj", "lm_head"], **common)),
        # Conv1D (c_attn, c_proj) next to an nn.Linear lm_head: the file's fan_in_fan_out is the
        # last module's (false), attn.c_proj is square.
        ("gpt2_mixed", gpt2, dict(n_frequency=40, target_modules=["c_attn", "c_proj", "lm_head"], **common)),
        # SEQ_CLS: PEFT adds classifier/score to modules_to_save and saves the head.
        ("bert_seqcls", seqcls, dict(n_frequency=40, target_modules=["query", "value"], task_type="SEQ_CLS", **common)),
        # bias="all": every *.bias of the model trains and is saved (layer norms included).
        ("bert_bias_all", bias_all, dict(n_frequency=40, target_modules=["query", "value"], task_type="SEQ_CLS",
                                         bias="all", **common)),
    ]


def interop():
    """tests/fixtures/peft_interop/<case>/: base/ (config.json + model.safetensors as transformers
    saves them), adapter/ (PEFT's save_pretrained with default settings), merged.safetensors
    (merge_and_unload().state_dict()), io.safetensors (input_ids, base / unmerged / merged logits)."""
    import warnings

    warnings.simplefilter("ignore")
    for case, model, kwargs in tiny_models():
        out = os.path.join(INTEROP, case)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.makedirs(out)
        model.eval()
        model.save_pretrained(os.path.join(out, "base"), safe_serialization=True)
        for extra in ["generation_config.json"]:
            path = os.path.join(out, "base", extra)
            if os.path.exists(path):
                os.remove(path)
        ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            logits_base = model(input_ids=ids).logits
        peft_model = get_peft_model(model, FourierFTConfig(**kwargs)).eval()
        # Stand in for training: move every trainable tensor that is not a spectrum (heads, biases)
        # away from its base value, so a loader that drops them fails.
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if p.requires_grad and "fourierft_spectrum" not in name:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        adapter_dir = os.path.join(out, "adapter")
        peft_model.save_pretrained(adapter_dir)
        os.remove(os.path.join(adapter_dir, "README.md"))
        with torch.no_grad():
            logits_adapted = peft_model(input_ids=ids).logits
            merged = copy.deepcopy(peft_model).merge_and_unload()
            logits_merged = merged(input_ids=ids).logits
        assert rel_err(logits_merged, logits_adapted) < 1e-5, case
        sd = {k: v.detach().contiguous().clone() for k, v in merged.state_dict().items()}
        save_file(sd, os.path.join(out, "merged.safetensors"))
        save_file(
            {"input_ids": ids, "logits_base": logits_base, "logits_adapted": logits_adapted,
             "logits_merged": logits_merged},
            os.path.join(out, "io.safetensors"),
            metadata={"peft_version": peft.__version__, "torch_version": torch.__version__},
        )
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            saved = json.load(f)
        print(f"{case}: fan_in_fan_out={saved['fan_in_fan_out']} modules_to_save={saved['modules_to_save']} "
              f"bias={saved['bias']} target_modules={saved['target_modules']}")


if __name__ == "__main__":
    # adapter_config.json stores target_modules from a Python set: pin the hash seed so its order is stable.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which in ("mlp", "all"):
        main()
    if which in ("interop", "all"):
        interop()
    here = os.path.dirname(os.path.abspath(__file__))
    for mode, script in (("formats", "make_peft_format_fixtures.py"), ("half", "make_peft_half_fixtures.py")):
        if which in (mode, "all"):
            import subprocess

            subprocess.run([sys.executable, os.path.join(here, script)], check=True)
