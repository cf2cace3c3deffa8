#!/usr/bin/env bash
# Set up (see setup.sh) and run the lint and the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${ENTRODROP_VENV:-.venv}
"$VENV/bin/ruff" check .
# Run the venv's pytest (not `python -m pytest`, which would import the source tree
# without its compiled extension instead of the installed package).
exec "$VENV/bin/pytest" tests "$@"
