#!/usr/bin/env python3
"""Generate tests/fixtures/peft_formats/<case>/ with REAL Hugging Face PEFT: adapter files in the
formats and from the PEFT versions that tests/peft_formats.rs reads.

How to run (from the repository root, with the venv of scripts/make_peft_fixtures.py):

    .venv/bin/python scripts/make_peft_format_fixtures.py

The `layers_*` cases also run PEFT 0.19.1 and 0.20.0 (their layer-index regexes differ from
0.21's). Their wheels are fetched with `pip download --no-deps peft==<v>` into $PEFT_OLD_DIR
(default /tmp/peftold) and unpacked there; they run on this venv's torch through PYTHONPATH.

Cases (each tiny: a random-init model of a few thousand weights):
  llama_bin/           PEFT save_pretrained(safe_serialization=False): adapter/adapter_model.bin
  llama_all_linear/    target_modules="all-linear" (the file holds PEFT's expanded list), and a
                       negative random_loc_seed (-5)
  bert_default_targets/ target_modules=None (PEFT's default for model_type "bert": query, value),
                       layers_to_transform=[1] with an empty layers_pattern ""
  llama_unprefixed/    PEFT's low-level API (inject_adapter_in_model + get_peft_model_state_dict):
                       tensor names without the "base_model.model." prefix
  torch_variants/      torch.save of an OrderedDict with _metadata, a bf16 nn.Parameter, a strided view
  layers_<rule>_<v>/   a toy model whose module paths tell PEFT 0.19, 0.20 and 0.21's layer-index
                       regexes apart, adapted by PEFT <v> with layers_to_transform=[1] and
                       layers_pattern None (rule "default") or "layers" (rule "pattern")

Each case: base/model.safetensors (+ base/config.json for transformers models), adapter/ (as PEFT
wrote it, README.md removed), merged.safetensors (merge_and_unload().state_dict()) and
expected.json (PEFT version, adapted module paths, notes).
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "peft_formats")
OLD_VERSIONS = ["0.19.1", "0.20.0"]


def old_peft_path(version):
    """A directory holding PEFT `version`'s unpacked wheel (downloaded once)."""
    root = os.environ.get("PEFT_OLD_DIR", "/tmp/peftold")
    target = os.path.join(root, version)
    if not os.path.isdir(os.path.join(target, "peft")):
        os.makedirs(root, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"peft=={version}", "-d", root],
                       check=True)
        wheel = os.path.join(root, f"peft-{version}-py3-none-any.whl")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    return target


def fresh_dir(case):
    out = os.path.join(OUT, case)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "base"))
    return out


def tiny_llama(seed=0):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg).eval()


def tiny_bert(seed=0):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=32)
    return tf.BertModel(cfg, add_pooling_layer=False).eval()


def save_base(model, out):
    from safetensors.torch import save_file

    if hasattr(model, "save_pretrained"):
        model.save_pretrained(os.path.join(out, "base"), safe_serialization=True)
        gen = os.path.join(out, "base", "generation_config.json")
        if os.path.exists(gen):
            os.remove(gen)
    else:
        sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(sd, os.path.join(out, "base", "model.safetensors"))


def finish(peft_model, out, notes, **save_kwargs):
    """Saves the adapter, the merged state dict and expected.json."""
    import copy

    import peft
    import torch
    from safetensors.torch import save_file

    adapter_dir = os.path.join(out, "adapter")
    peft_model.save_pretrained(adapter_dir, **save_kwargs)
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    adapted = sorted(peft_model.base_model.targeted_module_names)
    with torch.no_grad():
        merged = copy.deepcopy(peft_model).merge_and_unload()
    sd = {k: v.detach().contiguous().clone() for k, v in merged.state_dict().items()}
    save_file(sd, os.path.join(out, "merged.safetensors"))
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"peft_version": peft.__version__, "torch_version": torch.__version__,
                   "adapted": adapted, "notes": notes}, f, indent=2, sort_keys=True)
        f.write("\n")
    return adapted


def current_cases():
    import torch
    from peft import FourierFTConfig, get_peft_model, inject_adapter_in_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    # .bin: torch.save of the adapter state dict (zip archive with data.pkl).
    out = fresh_dir("llama_bin")
    model = tiny_llama(1)
    save_base(model, out)
    pm = get_peft_model(model, FourierFTConfig(n_frequency=20, scaling=100.0, random_loc_seed=2024,
                                               target_modules=["q_proj", "v_proj"]))
    finish(pm, out, "adapter_model.bin written by save_pretrained(safe_serialization=False)",
           safe_serialization=False)
    assert os.listdir(os.path.join(out, "adapter")) == ["adapter_config.json", "adapter_model.bin"] or sorted(
        os.listdir(os.path.join(out, "adapter"))) == ["adapter_config.json", "adapter_model.bin"]

    # "all-linear" (expanded by PEFT into the saved file) and a negative seed.
    out = fresh_dir("llama_all_linear")
    model = tiny_llama(2)
    save_base(model, out)
    pm = get_peft_model(model, FourierFTConfig(n_frequency=20, scaling=100.0, random_loc_seed=-5,
                                               target_modules="all-linear"))
    adapted = finish(pm, out, "target_modules=\"all-linear\" (saved expanded), random_loc_seed=-5")
    assert "lm_head" not in adapted and len(adapted) == 14, adapted
    with open(os.path.join(out, "adapter", "adapter_config.json")) as f:
        saved = json.load(f)
    assert sorted(saved["target_modules"]) == adapted and saved["random_loc_seed"] == -5, saved

    # target_modules=None: PEFT's FourierFT default for model_type "bert"; empty layers_pattern.
    out = fresh_dir("bert_default_targets")
    model = tiny_bert(3)
    save_base(model, out)
    pm = get_peft_model(model, FourierFTConfig(n_frequency=20, scaling=100.0, random_loc_seed=11,
                                               layers_to_transform=[1], layers_pattern=""))
    adapted = finish(pm, out, "target_modules=None (bert default), layers_to_transform=[1], layers_pattern=\"\"")
    assert adapted == ["encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value"], adapted

    # Keys without the base_model.model. prefix (PEFT's low-level API, as the transformers
    # integration saves them).
    out = fresh_dir("llama_unprefixed")
    model = tiny_llama(4)
    save_base(model, out)
    cfg = FourierFTConfig(n_frequency=20, scaling=100.0, random_loc_seed=7, target_modules=["q_proj", "o_proj"])
    injected = inject_adapter_in_model(cfg, model)
    with torch.no_grad():
        for name, p in injected.named_parameters():
            if "fourierft_spectrum" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    sd = get_peft_model_state_dict(injected)
    assert all(not k.startswith("base_model.") for k in sd), list(sd)
    os.makedirs(os.path.join(out, "adapter"))
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "adapter", "adapter_model.safetensors"),
              metadata={"format": "pt"})
    cfg.save_pretrained(os.path.join(out, "adapter"))
    adapted = []
    for name, module in injected.named_modules():
        if hasattr(module, "merge") and hasattr(module, "fourierft_spectrum"):
            module.merge()
            adapted.append(name)
    for name, module in list(injected.named_modules()):
        for child_name, child in list(module.named_children()):
            if hasattr(child, "fourierft_spectrum"):
                setattr(module, child_name, child.get_base_layer())
    merged = {k: v.detach().contiguous().clone() for k, v in injected.state_dict().items()}
    save_file(merged, os.path.join(out, "merged.safetensors"))
    import peft

    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"peft_version": peft.__version__, "torch_version": torch.__version__,
                   "adapted": sorted(adapted),
                   "notes": "inject_adapter_in_model + get_peft_model_state_dict: unprefixed keys"},
                  f, indent=2, sort_keys=True)
        f.write("\n")


def torch_variants():
    """torch_variants/: state dicts torch writes in other shapes than PEFT's plain dict."""
    import collections

    import torch

    out = os.path.join(OUT, "torch_variants")
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    key = "base_model.model.fc.fourierft_spectrum"
    sd = collections.OrderedDict()
    sd[key] = torch.tensor([1.0, -2.0, 0.5])
    sd._metadata = collections.OrderedDict({"": {"version": 1}})
    torch.save(sd, os.path.join(out, "ordered_dict_metadata.bin"))
    torch.save({key: torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]).to(torch.bfloat16))},
               os.path.join(out, "parameter_bf16.bin"))
    torch.save({key: torch.arange(6.0).reshape(2, 3).t()[1]}, os.path.join(out, "strided_view.bin"))


TOY = r'''
import torch
import torch.nn as nn


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 6)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([Expert(), Expert()])


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])


class Toy(nn.Module):
    """Paths model.layers.<i>.experts.<j>.fc and layers.<k>.fc: PEFT 0.19's greedy default regex
    reads j, 0.20 and 0.21's lazy one reads i; only 0.21's pattern regex matches layers.<k>. at the
    start of a path."""

    def __init__(self):
        super().__init__()
        self.model = Inner()
        self.layers = nn.ModuleList([Expert(), Expert()])


def toy():
    torch.manual_seed(5)
    return Toy().eval()
'''


def layers_case(version):
    """Runs in a process whose `peft` is `version`: writes layers_default_<v> and layers_pattern_<v>."""
    import peft
    from peft import FourierFTConfig, get_peft_model

    ns = {}
    exec(TOY, ns)
    tag = version.replace(".", "")
    assert peft.__version__ == version, (peft.__version__, version)
    for rule, pattern in [("default", None), ("pattern", "layers")]:
        out = fresh_dir(f"layers_{rule}_{tag}")
        model = ns["toy"]()
        save_base(model, out)
        pm = get_peft_model(model, FourierFTConfig(n_frequency=10, scaling=50.0, random_loc_seed=99,
                                                   target_modules=["fc"], layers_to_transform=[1],
                                                   layers_pattern=pattern))
        adapted = finish(pm, out, f"PEFT {version}: layers_to_transform=[1], layers_pattern={pattern!r}")
        print(f"layers_{rule}_{tag}: {adapted}")


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--layers":
        layers_case(sys.argv[2])
        return
    # adapter_config.json stores target_modules from a Python set: pin the hash seed so its order is stable.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    import warnings

    warnings.simplefilter("ignore")
    import peft

    os.makedirs(OUT, exist_ok=True)
    current_cases()
    torch_variants()
    layers_case(peft.__version__)
    for version in OLD_VERSIONS:
        env = dict(os.environ, PYTHONPATH=old_peft_path(version), PYTHONWARNINGS="ignore")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--layers", version], check=True, env=env)


if __name__ == "__main__":
    main()
