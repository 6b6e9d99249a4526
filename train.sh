#!/usr/bin/env bash
# Runs the main job: a tiny DPO run on a generated preference set (embedded
# default config). Extra args go to the launcher, e.g. --config.loss.name=ipo.
# Relative paths (--workdir, --config, --config.data.dir) resolve against the
# directory you call it from. Installs only the main job's dependencies.
set -euo pipefail
REPO="$(cd "$(dirname "$0")" && pwd)"
if [[ -z "${ALIGNJAX_SKIP_BOOTSTRAP:-}" ]]; then
  "$REPO/scripts/bootstrap.sh" main
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$REPO/.venv/bin/python" -m launch.train "$@"
