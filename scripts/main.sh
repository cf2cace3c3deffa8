#!/usr/bin/env bash
# The main job: entropy profile of the built-in SmolLM2-135M on the built-in corpus.
# Extra arguments go to `entrodrop profile` (e.g. --samples 16 --method bucket,cosine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${ENTRODROP_VENV:-.venv}
exec "$VENV/bin/entrodrop" profile "$@"
