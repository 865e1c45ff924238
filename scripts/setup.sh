#!/usr/bin/env bash
# Sets up a virtual environment in .venv with the pinned torch, builds the kernels, and
# installs the test and benchmark tools. Re-running it is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned, so that nothing later pulls another build of it.
python -m pip install -q torch==2.13.0
python -m pip install -q -c scripts/constraints.txt setuptools wheel ninja pybind11
python -m pip install -q -c scripts/constraints.txt --no-build-isolation -e ".[test,bench]"
# Triton (the [gpu] extra) only if it leaves the pinned torch alone.
if python -m pip install -q -c scripts/constraints.txt --dry-run "triton>=3.2" 2>/dev/null; then
  python -m pip install -q -c scripts/constraints.txt "triton>=3.2" || echo "triton not installed: Triton tests will be skipped"
fi
