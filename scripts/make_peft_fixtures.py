#!/usr/bin/env python3
"""Generate the PEFT FourierFT fixtures in tests/fixtures/peft_mlp/ with REAL Hugging Face PEFT.

How to run (from the repository root):

    python3 -m venv .venv && .venv/bin/pip install torch peft safetensors \
        && .venv/bin/python scripts/make_peft_fixtures.py

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

    # Sanity check of torch's randperm against DESIGN.md §2.
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

        # DESIGN.md §1: ΔW = scaling * ifft2(dense).real, equal to the naive cosine sum.
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


if __name__ == "__main__":
    main()
