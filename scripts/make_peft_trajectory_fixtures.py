#!/usr/bin/env python3
"""Training-trajectory fixtures made by real transformers + PEFT, for tests/train_stock.rs.

For each of a tiny random-init LlamaForCausalLM, Qwen2ForCausalLM (q/k/v biases) and BertModel
(no pooler), this trains a FourierFT adapter (n_frequency 64, scaling 100, init_weights=False so
the spectra start non-zero, one non-square target) for 10 steps of torch.optim.AdamW on fixed
token batches, and writes into tests/fixtures/trajectory_<model>/:

  config.json                 the model's HF config (as transformers saves it)
  base.safetensors            the base weights (HF names, f32)
  data.json                   batches, hyper-parameters, per-step losses, the loss definition
  adapter_init/               the adapter before training (PEFT save_pretrained)
  adapter_final/              the adapter after 10 steps
  outputs.safetensors         base-model output on batch 0 (`base_out`), the merged model's output
                              on batch 0 (`merged_out`) and every merged adapted weight
                              (`merged.<weight name>`, from merge_and_unload)

Losses (what candle-transformers' stock models can compute):
  llama, qwen2: cross-entropy of the LAST position's logits against `targets` (candle's
                LlamaForCausalLM / qwen2::ModelForCausalLM return the last position only);
  bert:         cross-entropy of every position's `hidden @ word_embeddings.T` against
                `targets` (a per-token MLM-style loss on BertModel's last hidden state).

Run: .venv/bin/python scripts/make_peft_trajectory_fixtures.py
"""

import json
import os
import sys

import torch
from peft import FourierFTConfig, get_peft_model
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
STEPS = 10
BATCH, SEQ = 4, 8
HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}


def make_llama():
    cfg = LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
    )
    cfg._attn_implementation = "eager"
    # q_proj/v_proj 32x32 / 16x32 (GQA), up_proj 40x32: non-square targets.
    return cfg, LlamaForCausalLM(cfg), ["q_proj", "v_proj", "up_proj"]


def make_qwen2():
    cfg = Qwen2Config(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    cfg._attn_implementation = "eager"
    # q/k/v carry biases in Qwen2; k_proj 16x32 and down_proj 32x40 are non-square.
    return cfg, Qwen2ForCausalLM(cfg), ["q_proj", "k_proj", "down_proj"]


def make_bert():
    cfg = BertConfig(
        vocab_size=48,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=32,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = "eager"
    # intermediate.dense is 40x32: non-square.
    return cfg, BertModel(cfg, add_pooling_layer=False), ["query", "value", "intermediate.dense"]


def loss_fn(kind, model, ids, targets, word_emb):
    if kind == "bert":
        hidden = model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        logits = hidden @ word_emb.T
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    logits = model(input_ids=ids).logits[:, -1, :]
    return torch.nn.functional.cross_entropy(logits, targets)


def output_of(kind, model, ids):
    with torch.no_grad():
        if kind == "bert":
            return model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        return model(input_ids=ids).logits[:, -1, :]


def save_adapter(peft_model, path):
    peft_model.save_pretrained(path)
    readme = os.path.join(path, "README.md")  # PEFT's model card: not needed, keep fixtures small
    if os.path.exists(readme):
        os.remove(readme)


def make(kind, builder, seed):
    torch.manual_seed(seed)
    cfg, model, targets_modules = builder()
    model = model.float().eval()  # dropout off; the loss is deterministic
    vocab = cfg.vocab_size
    out = os.path.join(ROOT, f"trajectory_{kind}")
    os.makedirs(out, exist_ok=True)
    cfg.save_pretrained(out)
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(base, os.path.join(out, "base.safetensors"), metadata={"format": "pt"})
    word_emb = base["embeddings.word_embeddings.weight"] if kind == "bert" else None

    gen = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
        tshape = (BATCH, SEQ) if kind == "bert" else (BATCH,)
        tg = torch.randint(0, vocab, tshape, generator=gen)
        batches.append((ids, tg))
    base_out = output_of(kind, model, batches[0][0])

    pcfg = FourierFTConfig(
        n_frequency=64,
        scaling=100.0,
        target_modules=targets_modules,
        init_weights=False,
        random_loc_seed=777,
    )
    torch.manual_seed(seed + 2)  # the spectra's standard-normal init
    peft_model = get_peft_model(model, pcfg)
    save_adapter(peft_model, os.path.join(out, "adapter_init"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=HYPER["lr"],
        betas=(HYPER["beta1"], HYPER["beta2"]),
        eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"],
    )
    losses = []
    for ids, tg in batches:
        opt.zero_grad()
        loss = loss_fn(kind, peft_model, ids, tg, word_emb)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    save_adapter(peft_model, os.path.join(out, "adapter_final"))
    merged = peft_model.merge_and_unload()
    merged_out = output_of(kind, merged, batches[0][0])
    tensors = {"base_out": base_out.contiguous(), "merged_out": merged_out.contiguous()}
    sd = merged.state_dict()
    for name in base:
        if name.endswith(".weight") and any(name[: -len(".weight")].endswith(t) for t in targets_modules):
            tensors[f"merged.{name}"] = sd[name].detach().contiguous()
    save_file(tensors, os.path.join(out, "outputs.safetensors"), metadata={"format": "pt"})
    data = {
        "kind": kind,
        "loss": "bert_token_ce" if kind == "bert" else "last_token_ce",
        "hyper": HYPER,
        "steps": STEPS,
        "batches": [{"input_ids": i.tolist(), "targets": t.tolist()} for i, t in batches],
        "losses": losses,
        "made_with": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__,
        },
    }
    with open(os.path.join(out, "data.json"), "w") as f:
        json.dump(data, f, indent=1)
    print(kind, "losses", [round(x, 5) for x in losses])


def main():
    torch.set_num_threads(1)
    kinds = sys.argv[1:] or ["llama", "qwen2", "bert"]
    builders = {"llama": (make_llama, 10), "qwen2": (make_qwen2, 20), "bert": (make_bert, 30)}
    for k in kinds:
        b, seed = builders[k]
        make(k, b, seed)


if __name__ == "__main__":
    main()
