#!/usr/bin/env bash
# Install Detectron2 into the current Python environment through the package registry.
#
# Detectron2 is not on PyPI under its own name. `sal-detectron2==0.7.2` packages Detectron2's 2024
# sources, built for CPython 3.10 only. Its Python sources run on 3.11; its compiled `_C` extension
# does not and no hybrid_d2 model needs it (rotated boxes, deformable conv, fast COCOeval, which
# falls back to pycocotools). We download the wheel, drop `detectron2/_C*.so`, retag it
# `py3-none-any` and install it. An already importable detectron2 (e.g. built from GitHub) is kept.
#
# Usage: tools/install_detectron2.sh [PYTHON]     (default: python)
set -euo pipefail
PY=${1:-python}
if "$PY" -c "import detectron2" 2>/dev/null; then
  echo "detectron2 already importable ($("$PY" -c 'import detectron2; print(detectron2.__file__)')); keeping it."
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
  sal-detectron2==0.7.2 -d "$work/dl"
"$PY" -m wheel unpack -d "$work/src" "$work"/dl/sal_detectron2-*.whl
pkg=$(echo "$work"/src/sal_detectron2-*)
rm -f "$pkg"/detectron2/_C*.so
sed -i -e 's/^Tag: .*/Tag: py3-none-any/' -e '/^Root-Is-Purelib/s/.*/Root-Is-Purelib: true/' \
  "$pkg"/*.dist-info/WHEEL
sed -i '/detectron2\/_C/d' "$pkg"/*.dist-info/RECORD
mkdir -p "$work/out"
"$PY" -m wheel pack -d "$work/out" "$pkg"
"$PY" -m pip install -q "$work"/out/sal_detectron2-*-py3-none-any.whl
"$PY" -c "import detectron2; print('installed detectron2', detectron2.__version__)"
