#!/usr/bin/env bash
# DPO step and greedy decoding on one GPU, ~1B Llama (random weights, bf16 compute):
# alignjax vs a hand-written torch bf16 DPO step and TRL's DPOTrainer (when trl and datasets
# import), alignjax's sampler vs transformers generate; MFU against the published bf16 peak.
#   bench/gpu.sh                 # on the GPU machine (python3 with jax[cuda], flax, optax, torch, transformers)
#   SIZE=tiny bench/gpu.sh       # CPU smoke test
# Each contender runs in its own process with a time limit (LIMIT seconds, default 150);
# RESULT lines go to ${OUT:-/tmp}/gpu_results.txt, the summary to stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SIZE=${SIZE:-1b}
LIMIT=${LIMIT:-150}
RES=${OUT:-/tmp}/gpu_results.txt
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
ARGS=(--size="$SIZE")
[ "$SIZE" = tiny ] && ARGS+=(--decode_prompt=8 --new_tokens=8 --batch=2 --steps=2 --warmup=1)
: > "$RES"
for which in ${WHICH:-bandwidth dpo_alignjax dpo_torch decode_alignjax decode_hf dpo_trl}; do
  echo "== $which" >&2
  start=$(date +%s)
  timeout "$LIMIT" "$PY" bench/gpu.py --which="$which" "${ARGS[@]}" > "${RES}.$which" 2>&1
  rc=$?
  grep '^RESULT ' "${RES}.$which" >> "$RES" || { echo "$which failed (rc=$rc):" >&2; tail -n 25 "${RES}.$which" >&2; }
  echo "   $((  $(date +%s) - start )) s" >&2
done
"$PY" bench/gpu.py --which=summary --results="$RES"
