#!/usr/bin/env bash
# The checks CI runs before the tests (scripts/test.sh calls this): Python format and lint
# (ruff), the types of ops/ and models/ (mypy, configured in pyproject.toml [tool.mypy]),
# C++/CUDA format (clang-format, csrc/). ruff and clang-format, at the same pinned versions,
# also run as pre-commit hooks (.pre-commit-config.yaml). Fix in place:
#   ruff format . && ruff check --fix . && clang-format -i csrc/*.h csrc/*.cpp csrc/*.cu csrc/*.cuh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ENTRODROP_VENV:-.venv}
echo "[lint] ruff format --check, ruff check, mypy (ops, models), clang-format --dry-run, model-type tests"
"$VENV/bin/ruff" format --check -q .
"$VENV/bin/ruff" check -q .
"$VENV/bin/mypy" src/entrodrop_fast/ops src/entrodrop_fast/models
"$VENV/bin/clang-format" --dry-run --Werror csrc/*.h csrc/*.cpp csrc/*.cu csrc/*.cuh
# architecture knowledge lives in the adapter table (models/): no test of the model type elsewhere
# (tests/test_layout.py checks every spelling; this is the quick textual form)
if grep -rnE "model_type['\"]?\s*[])]?\s*(==|!=|in |not in )|model_type\s*\.\s*(startswith|endswith)\(" \
    --include='*.py' src/entrodrop_fast | grep -v '^src/entrodrop_fast/models/'; then
    echo "[lint] model-type tests outside src/entrodrop_fast/models/: move them into the adapter table" >&2
    exit 1
fi
