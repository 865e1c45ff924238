#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs the C++ tests (ctest) and the whole pytest suite,
# the Triton kernels under the interpreter included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure
ruff check .
python -m pytest -q -p no:cacheprovider "$@"
