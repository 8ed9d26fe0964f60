#!/usr/bin/env bash
# The test suite (CPU only): model, sparse attention (Pallas in interpret mode), data, training, export.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --durations=15 tests "$@"
