#!/usr/bin/env bash
# Set up the project on a fresh machine: a virtualenv with every pinned dependency, llama.cpp built from source.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel   # builds the package (tests build a wheel)

# llama-cpp-python ships no wheels: build only the library (≈5 min on 2 cores), once per set of flags. Not
# GGML_NATIVE: -march=native also compiles AMX kernels, which die with SIGILL on VMs that do not enable AMX tiles,
# and a native wheel breaks on other CPUs. pip's own wheel cache ignores CMAKE_ARGS, so the wheel is cached here,
# keyed by the flags.
LLAMA_VERSION=0.3.36
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=ON}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
BUILD_KEY="$LLAMA_VERSION-$(printf '%s' "$CMAKE_ARGS" | sha256sum | cut -c1-12)"
WHEELS="${MINICPM_WHEEL_CACHE:-$HOME/.cache/minicpm-jax/wheels}/llama-cpp-python-$BUILD_KEY"
if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_VERSION (about 5 minutes, cached in $WHEELS)"
  .venv/bin/python -m pip wheel -q --no-deps --no-cache-dir "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELS.tmp"
  mv "$WHEELS.tmp" "$WHEELS"
fi
if [ "$(cat .venv/.llama-cpp-build 2>/dev/null)" != "$BUILD_KEY" ]; then   # a venv with another build: replace it
  .venv/bin/python -m pip install -q --force-reinstall --no-deps --find-links "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"
  echo "$BUILD_KEY" > .venv/.llama-cpp-build
fi
.venv/bin/python -m pip install -q --find-links "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"
.venv/bin/python -m pip install -q -e ".[test]"
echo "setup done: $(.venv/bin/python -c 'import jax, flax, llama_cpp; print("jax", jax.__version__, "flax", flax.__version__, "llama_cpp", llama_cpp.__version__)')"
