#!/usr/bin/env bash
# Creates .venv/ at the repo root with everything the demo and the tests need.
# Idempotent: a second run only checks. mmcv 2.1.0 has no wheel for torch 2.14, so it
# is built once from source (C++ standard patched) and cached under ~/.cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=$PWD/.venv
STAMP=$VENV/.setup-complete
WHEEL_CACHE=${CONVNEXT_WHEEL_CACHE:-$HOME/.cache/convnext-backbone/wheels}
HASH=$(cat pyproject.toml tools/setup_env.sh | sha1sum | cut -c1-12)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade "pip<26" "setuptools<70" wheel ninja
# torch/torchvision first: the pair that lies on this machine's disk.
$PIP install -q "torch==2.14.1" "torchvision==0.29.1"

mkdir -p "$WHEEL_CACHE"
if ! ls "$WHEEL_CACHE"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
  echo "[setup] building mmcv 2.1.0 with ops from source (~25 min on 2 cores, once; cached in $WHEEL_CACHE)"
  build=$(mktemp -d)
  $PIP download -q --no-deps --no-binary :all: mmcv==2.1.0 -d "$build"
  tar -xzf "$build"/mmcv-2.1.0.tar.gz -C "$build"
  sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$build"/mmcv-2.1.0/setup.py
  (cd "$build"/mmcv-2.1.0 && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
      "$VENV/bin/python" -m pip wheel -q --no-build-isolation --no-deps -w "$build/out" .)
  mv "$build"/out/mmcv-2.1.0-*.whl "$WHEEL_CACHE"/
  rm -rf "$build"
fi
$PIP install -q --no-deps "$WHEEL_CACHE"/mmcv-2.1.0-*.whl
$PIP install -q -e ".[all]"
echo "$HASH" > "$STAMP"
echo "[setup] environment ready in $VENV"
