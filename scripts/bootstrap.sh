#!/usr/bin/env bash
# Creates .venv and installs alignjax into it, once per pyproject.toml version.
#   scripts/bootstrap.sh main   the main job's dependencies only (no torch/trl/transformers)
#   scripts/bootstrap.sh test   plus the test extras; a CPU build of torch is installed
#                               first (used only by the parity tests) so the extras never
#                               pull a multi-GB CUDA wheel
#   scripts/bootstrap.sh real   the main job's plus the real-checkpoint recipe's (CPU torch,
#                               transformers, gguf)
# Each target has its own stamp; it re-runs only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${1:-test}"
case "$TARGET" in
  main) EXTRAS="" ;;
  test) EXTRAS="[test]" ;;
  real) EXTRAS="[real]" ;;
  *) echo "bootstrap: unknown target '$TARGET' (expected main, test or real)" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.alignjax-$TARGET"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
echo "bootstrap: installing alignjax ($TARGET) into $VENV (first run takes a few minutes)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
log="$(mktemp)"
pip_install() {
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2 || true
    echo "bootstrap: pip install $* failed" >&2
    exit 1
  fi
}
if [[ "$TARGET" != main ]] && ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  pip_install "torch==${ALIGNJAX_TORCH_VERSION:-2.13.0}"
fi
pip_install -e ".$EXTRAS"
rm -f "$log"
"$VENV/bin/python" -c "import alignjax, jax, flax, optax, orbax.checkpoint, grain, tensorboardX, tqdm"
if [[ "$TARGET" == test ]]; then
  "$VENV/bin/python" -c "import trl, transformers, pytest"
fi
echo "$want" > "$STAMP"
