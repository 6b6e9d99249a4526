#!/usr/bin/env bash
# Runs the main job: a tiny DPO run on a generated preference set (embedded
# default config). Extra args go to the launcher, e.g. --config.loss.name=ipo.
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv/bin/python -m launch.train "$@"
