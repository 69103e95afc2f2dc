#!/usr/bin/env bash
# Set up on a fresh machine, then run the embedded default end to end (see scripts/quickstart.py).
# Extra arguments go to quickstart.py: --long for better quality, --fast for a smoke run, --run-dir DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec python scripts/quickstart.py "$@"
