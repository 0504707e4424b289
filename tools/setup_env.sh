#!/usr/bin/env bash
# Creates .venv/ at the repo root with everything the demo and the tests need.
# Idempotent: once done (stamp matches pyproject.toml + this script) a rerun is instant.
# mmcv 2.1.0 (needed by mmsegmentation 1.2.2) has no wheel for torch 2.14: it is built once
# from source with the C++ standard raised to C++20 (~25 min on 2 cores) and the wheel is
# cached under ~/.cache/convnext-backbone/wheels for every later setup.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=$ROOT/.venv
STAMP=$VENV/.setup-complete
WHEEL_CACHE=${CONVNEXT_WHEEL_CACHE:-$HOME/.cache/convnext-backbone/wheels}
HASH=$(cat pyproject.toml tools/setup_env.sh | sha1sum | cut -c1-12)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
log() { echo "[setup] $*"; }
# A set-up killed half-way can leave a venv without pip: start that one again.
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  log "removing an incomplete $VENV"; rm -rf "$VENV"
fi
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
# pip's exit status is kept; only the noise about absent local indexes is filtered.
pip_() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }

log "installing torch 2.14.1 + torchvision 0.29.1 (the pair on this machine's disk)"
pip_ install --upgrade "pip<26" wheel ninja
pip_ install "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -c "import torch, torchvision" || { echo "torch/torchvision failed to install" >&2; exit 1; }

mkdir -p "$WHEEL_CACHE"
if ! ls "$WHEEL_CACHE"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
  log "building mmcv 2.1.0 with ops from source (~25 min on 2 cores, once; cached in $WHEEL_CACHE)"
  build=$(mktemp -d)
  # mmcv's setup.py imports pkg_resources: build with an older setuptools, restored below.
  pip_ install "setuptools<70"
  pip_ download --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0 -d "$build"
  tar -xzf "$build"/mmcv-2.1.0.tar.gz -C "$build"
  # torch 2.14's headers need C++20; mmcv forces c++14/17.
  sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$build"/mmcv-2.1.0/setup.py
  (cd "$build"/mmcv-2.1.0 && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
      "$VENV/bin/python" -m pip -q wheel --no-build-isolation --no-deps -w "$build/out" .)
  cp "$build"/out/mmcv-2.1.0-*.whl "$WHEEL_CACHE"/
  rm -rf "$build"
fi
pip_ install --no-deps "$WHEEL_CACHE"/mmcv-2.1.0-*.whl
log "installing convnext-backbone[all] (editable)"
pip_ install -e ".[all]"
pip_ install "setuptools>=77"
"$VENV/bin/python" -c "import mmcv.ops, mmseg, mmengine, timm, transformers, pycocotools, convnext_backbone" \
  || { echo "setup incomplete: an import failed (see above)" >&2; exit 1; }
echo "$HASH" > "$STAMP"
log "environment ready in $VENV"
