#!/usr/bin/env bash
# The checks CI runs before the tests (scripts/test.sh calls this): Python format and lint
# (ruff), C++/CUDA format (clang-format, csrc/). The same tools, at the same pinned versions,
# run as pre-commit hooks (.pre-commit-config.yaml). Fix in place:
#   ruff format . && ruff check --fix . && clang-format -i csrc/*.h csrc/*.cpp csrc/*.cu csrc/*.cuh
# The type check of ops/ and models/ (mypy) is not here yet: issue 15 lists what it reports.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ENTRODROP_VENV:-.venv}
echo "[lint] ruff format --check, ruff check, clang-format --dry-run"
"$VENV/bin/ruff" format --check -q .
"$VENV/bin/ruff" check -q .
"$VENV/bin/clang-format" --dry-run --Werror csrc/*.h csrc/*.cpp csrc/*.cu csrc/*.cuh
