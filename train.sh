#!/usr/bin/env bash
# Runs the main job: the reward-KL frontier study (launch/study.py, embedded
# default config, a few minutes on 2 CPU cores). Extra args go to the launcher.
# A first argument naming another launcher runs that one instead:
#   ./train.sh                                   # the study
#   ./train.sh train --config.loss.name=ipo      # one training run (launch/train.py)
#   ./train.sh sample|pipeline|convert|plan ...  # launch/<name>.py
#   ./train.sh real                              # SmolLM2-135M-Instruct recipe (launch/real.py; ~20 min)
# Relative paths (--workdir, --config, --config.data.dir) resolve against the
# directory you call it from. Installs only the main job's dependencies.
set -euo pipefail
REPO="$(cd "$(dirname "$0")" && pwd)"
LAUNCHER=study
case "${1:-}" in
  study|train|sample|pipeline|convert|plan|real) LAUNCHER="$1"; shift ;;
esac
if [[ -z "${ALIGNJAX_SKIP_BOOTSTRAP:-}" ]]; then
  "$REPO/scripts/bootstrap.sh" "$([[ "$LAUNCHER" == real ]] && echo real || echo main)"
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$REPO/.venv/bin/python" -m "launch.$LAUNCHER" "$@"
