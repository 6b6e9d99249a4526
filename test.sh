#!/usr/bin/env bash
# Runs the test suite (installs alignjax with its test extras into .venv on first
# use). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh test
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# One file per worker (module fixtures -- tiny HF models, compiled steps -- built once), handed out
# longest first (tests/conftest.py's LONGEST_MODULES, not xdist's most-tests-first), the persistent
# compilation cache of tests/conftest.py, and the 15 slowest tests at the end.
exec .venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15 -q -p no:cacheprovider "$@"
