#!/usr/bin/env bash
# Set up the project on a fresh machine: a virtualenv with every pinned dependency, llama.cpp built from source.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# llama-cpp-python has no wheels: build only the library (≈5 min on 2 cores; pip caches the wheel afterwards).
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=ON}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
echo "setup done: $(.venv/bin/python -c 'import jax, flax, llama_cpp; print("jax", jax.__version__, "flax", flax.__version__, "llama_cpp", llama_cpp.__version__)')"
