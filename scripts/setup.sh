#!/usr/bin/env bash
# Sets up a virtual environment in .venv with the pinned torch, builds the kernels, and
# installs the test and benchmark tools and transformers (the [hf] extra). Re-running it is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate

pip_install() {
  # pip's notices about unused local index paths are noise here.
  python -m pip install -q -c scripts/constraints.txt "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}

pip_install --upgrade pip
# torch first and pinned, so that nothing later pulls another build of it.
pip_install torch==2.13.0 numpy
pip_install setuptools wheel ninja pybind11
# setuptools' editable-install notice (a Python warning from the build backend) is not for the user.
PYTHONWARNINGS=ignore pip_install --no-build-isolation -e ".[test,bench,hf]"
# Triton (the [gpu] extra) only if it leaves the pinned torch alone.
if python -m pip install -q -c scripts/constraints.txt --dry-run "triton>=3.2" >/dev/null 2>&1; then
  pip_install "triton>=3.2" || echo "triton not installed: the Triton tests will be skipped"
fi
