#!/usr/bin/env bash
# The checks CI runs before the tests (scripts/test.sh calls this): Python format and lint
# (ruff), the types of ops/ and models/ (mypy, configured in pyproject.toml [tool.mypy]),
# C++/CUDA format (clang-format, csrc/). ruff and clang-format, at the same pinned versions,
# also run as pre-commit hooks (.pre-commit-config.yaml). Fix in place:
#   ruff format . && ruff check --fix . && clang-format -i csrc/*.h csrc/*.cpp csrc/*.cu csrc/*.cuh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ENTRODROP_VENV:-.venv}
echo "[lint] ruff format --check, ruff check, mypy (ops, models), clang-format --dry-run"
"$VENV/bin/ruff" format --check -q .
"$VENV/bin/ruff" check -q .
"$VENV/bin/mypy" src/entrodrop_fast/ops src/entrodrop_fast/models
"$VENV/bin/clang-format" --dry-run --Werror csrc/*.h csrc/*.cpp csrc/*.cu csrc/*.cuh
