#!/usr/bin/env bash
# Runs the test suite (installs alignjax with its test extras into .venv on first
# use). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh test
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv/bin/python -m pytest -n 2 -q -p no:cacheprovider "$@"
