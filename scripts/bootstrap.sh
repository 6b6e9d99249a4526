#!/usr/bin/env bash
# Creates .venv with alignjax and its test extras, once; re-runs only when
# pyproject.toml changes. Installs a CPU build of torch first (used only by the
# TRL parity tests) so the test extras never pull a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.alignjax-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
echo "bootstrap: installing alignjax into $VENV (first run takes a few minutes)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
log="$(mktemp)"
pip_install() {
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2 || true
    echo "bootstrap: pip install $* failed" >&2
    exit 1
  fi
}
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  pip_install "torch==${ALIGNJAX_TORCH_VERSION:-2.13.0}"
fi
pip_install -e ".[test]"
rm -f "$log"
"$VENV/bin/python" -c "import alignjax, jax, flax, optax, orbax.checkpoint, grain, trl"
echo "$want" > "$STAMP"
