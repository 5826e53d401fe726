#!/usr/bin/env bash
# Set up (if needed) and run `budgetune demo`: a tiny Llama trained on the Python standard
# library's sources within a 3-minute budget, on the CPU, with no downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec budgetune demo "$@"
