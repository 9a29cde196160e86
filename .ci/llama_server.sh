#!/usr/bin/env bash
# Installs llama-cpp-python[server] (a real OpenAI-compatible server) for the OpenRS integration
# tests (pytest -m integration tests/test_judge_integration.py).
# Uses a prebuilt wheel from $WHEELHOUSE when one is there; otherwise builds one from the sdist
# with GGML_NATIVE=OFF (a native build can die with an illegal instruction on another CPU) and
# keeps it in $WHEELHOUSE so the next run (or a CI cache of that directory) skips the ~8-20 min build.
set -euo pipefail
WHEELHOUSE="${WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/clipo_jax/wheelhouse}"
PY="${PYTHON:-python}"
if "$PY" -c "import llama_cpp.server" 2>/dev/null; then
  echo "llama-cpp-python already installed: $("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)')"
  exit 0
fi
mkdir -p "$WHEELHOUSE"
wheel="$(ls -t "$WHEELHOUSE"/llama_cpp_python-*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$wheel" ]]; then
  echo "no llama-cpp-python wheel in $WHEELHOUSE; building from source (slow)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$PY" -m pip wheel --no-deps -w "$WHEELHOUSE" llama-cpp-python
  wheel="$(ls -t "$WHEELHOUSE"/llama_cpp_python-*.whl | head -n1)"
fi
version="$(basename "$wheel" | cut -d- -f2)"
echo "installing $wheel (llama-cpp-python==$version) with the [server] extra"
"$PY" -m pip install --find-links "$WHEELHOUSE" "llama-cpp-python[server]==$version"
"$PY" -c "import llama_cpp, llama_cpp.server; print('llama_cpp', llama_cpp.__version__, 'ok')"
