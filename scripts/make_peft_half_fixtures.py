#!/usr/bin/env python3
"""Half-precision fixture: a tiny bf16 model adapted by REAL Hugging Face PEFT.

How to run (from the repository root; the same virtualenv as scripts/make_peft_fixtures.py):

    .venv/bin/python scripts/make_peft_half_fixtures.py      # or: make_peft_fixtures.py half

Writes tests/fixtures/peft_half/ (tests/half_precision.rs reads it):
  adapter/                 PEFT's save_pretrained output (spectra in f32: PEFT's default
                           autocast_adapter_dtype keeps bf16/f16 adapter weights in f32)
  base.safetensors         the bf16 base: L.weight, L.bias for L in LAYERS
  expected.safetensors     per layer L: L.x (bf16 input), L.y_base (base layer output, bf16),
                           L.y_adapted (PEFT's unmerged forward, bf16), L.merged_weight (bf16 weight
                           after merge_and_unload), L.delta_weight (f32, PEFT's get_delta_weight)
  meta.json                per layer d1, d2, n, the measured ratio |dW| / |W0| (root mean squares)

The three layers scale their spectra so that |dW| / |W0| is about 1e-3, 1e-2 and 1e-1: at 1e-3 the
update is below half a bf16 ulp of most weights, which is where rounding W0 + dW in bf16 loses it.
"""

import json
import os
import shutil
import sys

import peft
import torch
import torch.nn as nn
from peft import FourierFTConfig, get_peft_model
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "peft_half")
# name: (out, in, target |dW|/|W0|); odd, non-square and power-of-two shapes.
LAYERS = {"tiny_update": (64, 48, 1e-3), "mid_update": (33, 40, 1e-2), "large_update": (96, 128, 1e-1)}
N = 120
SCALING = 100.0
TOKENS = 9


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        for name, (d1, d2, _) in LAYERS.items():
            lin = nn.Linear(d2, d1)
            nn.init.normal_(lin.weight, std=0.05)
            nn.init.normal_(lin.bias, std=0.02)
            setattr(self, name, lin)


def rms(t):
    return t.double().pow(2).mean().sqrt().item()


def main():
    torch.manual_seed(7)
    base = Tiny().to(torch.bfloat16).eval()
    base_sd = {k: v.clone().contiguous() for k, v in base.state_dict().items()}
    cfg = FourierFTConfig(
        n_frequency=N, scaling=SCALING, target_modules=list(LAYERS), init_weights=False, random_loc_seed=777
    )
    model = get_peft_model(base, cfg).eval()

    expected, meta = {}, {"peft_version": peft.__version__, "torch_version": torch.__version__, "layers": {}}
    for name, (d1, d2, target) in LAYERS.items():
        layer = getattr(model.base_model.model, name)
        spectrum = layer.fourierft_spectrum["default"]
        assert spectrum.dtype == torch.float32, spectrum.dtype
        w0 = layer.base_layer.weight
        with torch.no_grad():
            ratio = rms(layer.get_delta_weight("default")) / rms(w0)
            spectrum.mul_(target / ratio)
        dw = layer.get_delta_weight("default").detach()
        ratio = rms(dw) / rms(w0)
        x = torch.randn(TOKENS, d2).to(torch.bfloat16)
        with torch.no_grad():
            y_adapted = layer(x)
            y_base = layer.base_layer(x)
        assert y_adapted.dtype == torch.bfloat16
        expected.update(
            {
                f"{name}.x": x,
                f"{name}.y_base": y_base,
                f"{name}.y_adapted": y_adapted,
                f"{name}.delta_weight": dw.float().contiguous(),
            }
        )
        below_half_ulp = (dw.abs() < w0.float().abs() * 2.0**-9).double().mean().item()
        meta["layers"][name] = {"d1": d1, "d2": d2, "n": N, "dw_over_w0_rms": ratio,
                                "share_of_dw_below_half_bf16_ulp_of_w0": below_half_ulp}
        print(f"{name}: {d1}x{d2} |dW|/|W0| = {ratio:.2e}, {below_half_ulp:.0%} of dW below half an ulp of W0")

    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    model.save_pretrained(os.path.join(OUT, "adapter"))
    merged = model.merge_and_unload()
    for name in LAYERS:
        w = getattr(merged, name).weight
        assert w.dtype == torch.bfloat16
        expected[f"{name}.merged_weight"] = w.detach().clone().contiguous()
    save_file(base_sd, os.path.join(OUT, "base.safetensors"))
    save_file(expected, os.path.join(OUT, "expected.safetensors"),
              metadata={"peft_version": peft.__version__, "torch_version": torch.__version__})
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    main()
