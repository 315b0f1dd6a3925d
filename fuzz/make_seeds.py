#!/usr/bin/env python3
"""Writes the seed corpora fuzz/seeds/<target>/ from the real PEFT fixtures in tests/fixtures/.

Input formats (see src/lib.rs): load_adapter = u32 len | config | safetensors;
load_adapter_bin = u32 len | config | adapter_model.bin;
merge = u32 len | config | u32 len | adapter safetensors | base safetensors.
Besides the files as PEFT wrote them, seeds re-encode tensors as F16, BF16 and F64.
Run from anywhere: python3 fuzz/make_seeds.py
"""
import json
import pathlib
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = ROOT / "fuzz" / "seeds"


def read_st(path):
    b = path.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8 : 8 + n])
    data = b[8 + n :]
    meta = header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        s, e = info["data_offsets"]
        tensors[name] = (info["dtype"], info["shape"], data[s:e])
    return meta, tensors


def f32_values(raw):
    return struct.unpack(f"<{len(raw) // 4}f", raw)


def convert(dtype, shape, raw, to):
    if dtype != "F32" or to == "F32":
        return dtype, shape, raw
    vals = f32_values(raw)
    if to == "F16":
        return to, shape, struct.pack(f"<{len(vals)}e", *vals)
    if to == "F64":
        return to, shape, struct.pack(f"<{len(vals)}d", *vals)
    if to == "BF16":  # truncate the f32 bit pattern to its top 16 bits
        words = struct.unpack(f"<{len(vals)}I", raw)
        return to, shape, struct.pack(f"<{len(vals)}H", *(w >> 16 for w in words))
    raise ValueError(to)


def write_st(meta, tensors):
    header, blobs, off = {}, [], 0
    if meta is not None:
        header["__metadata__"] = meta
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def st_bytes(path, dtype="F32", only=None):
    """The file as PEFT wrote it (F32), or re-encoded with F32 tensors as `dtype`."""
    if dtype == "F32":
        return path.read_bytes()
    meta, tensors = read_st(path)
    tensors = {
        k: convert(*v, dtype) if (only is None or k.endswith(only)) else v
        for k, v in tensors.items()
    }
    return write_st(meta, tensors)


def prefixed(part):
    return struct.pack("<I", len(part)) + part


def main():
    adapters = {
        "peft_mlp": FIX / "peft_mlp" / "adapter",
        "peft_roundtrip": FIX / "peft_roundtrip" / "adapter",
        "rust_adapter": FIX / "rust_adapter" / "adapter",
    }
    bases = {
        "peft_mlp": FIX / "peft_mlp" / "base.safetensors",
        "peft_roundtrip": FIX / "peft_roundtrip" / "base.safetensors",
        "rust_adapter": FIX / "peft_roundtrip" / "base.safetensors",
    }
    (OUT / "load_adapter").mkdir(parents=True, exist_ok=True)
    (OUT / "merge").mkdir(parents=True, exist_ok=True)
    for name, adir in adapters.items():
        config = (adir / "adapter_config.json").read_bytes()
        weights = adir / "adapter_model.safetensors"
        for dt in ["F32", "F16", "BF16", "F64"]:
            if dt != "F32" and name != "peft_mlp":
                continue
            spectra = st_bytes(weights, dt, only=".fourierft_spectrum")
            seed = prefixed(config) + spectra
            (OUT / "load_adapter" / f"{name}_{dt.lower()}").write_bytes(seed)
        spectra = st_bytes(weights)
        for dt in ["F32", "F16", "BF16"]:
            if dt != "F32" and name == "rust_adapter":
                continue
            base = st_bytes(bases[name], dt)
            seed = prefixed(config) + prefixed(spectra) + base
            (OUT / "merge" / f"{name}_base_{dt.lower()}").write_bytes(seed)

    # load_adapter_bin: PEFT's adapter_model.bin (torch.save zip archives) as written.
    (OUT / "load_adapter_bin").mkdir(parents=True, exist_ok=True)
    for case in ["llama_bin"]:
        adir = FIX / "peft_formats" / case / "adapter"
        config = (adir / "adapter_config.json").read_bytes()
        seed = prefixed(config) + (adir / "adapter_model.bin").read_bytes()
        (OUT / "load_adapter_bin" / case).write_bytes(seed)
    # torch.save variants: OrderedDict with _metadata, bf16 Parameter, strided view.
    tv = FIX / "peft_formats" / "torch_variants"
    for name, n in [("ordered_dict_metadata", 3), ("parameter_bf16", 3), ("strided_view", 2)]:
        config = json.dumps({"peft_type": "FOURIERFT", "n_frequency": n, "target_modules": ["fc"]}).encode()
        seed = prefixed(config) + (tv / f"{name}.bin").read_bytes()
        (OUT / "load_adapter_bin" / name).write_bytes(seed)


if __name__ == "__main__":
    main()
