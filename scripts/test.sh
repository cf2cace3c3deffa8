#!/usr/bin/env bash
# Set up (see setup.sh), check formatting and lint (lint.sh), run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${ENTRODROP_VENV:-.venv}
bash scripts/lint.sh
# The package lives in src/ (not importable from the checkout root), so pytest imports the
# installed package with its compiled extension, however it is started.
exec "$VENV/bin/pytest" tests "$@"
