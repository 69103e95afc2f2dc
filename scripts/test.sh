#!/usr/bin/env bash
# Set everything up on a fresh machine and run the test suite (slow tests excluded; add -m "" to run them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
