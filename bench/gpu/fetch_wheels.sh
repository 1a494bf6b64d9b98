#!/usr/bin/env bash
# Fetch the wheels the GPU kit carries to the device (Python 3.12, x86_64) into bench/gpu/wheels/ (git-ignored):
# the pinned list in wheels.txt from the registry, plus a deepspeed wheel built here without its compiled ops
# (DS_BUILD_OPS=0: a pure py3-none-any wheel; needs torch installed here, as setup.py imports it).
#   bash bench/gpu/fetch_wheels.sh          then carry bench/gpu/wheels with the working tree
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT="$HERE/wheels"
mkdir -p "$OUT"
python -m pip download --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --no-deps -d "$OUT" -r "$HERE/wheels.txt"
DS_VERSION=${DS_VERSION:-$(python -c "from importlib.metadata import version; print(version('deepspeed'))" 2>/dev/null || echo 0.19.8)}
if ! ls "$OUT"/deepspeed-"$DS_VERSION"-py3-none-any.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 python -m pip wheel --no-cache-dir --no-deps --no-build-isolation -w "$OUT" "deepspeed==$DS_VERSION"
fi
echo "wheels: $(ls "$OUT"/*.whl | wc -l) files, $(du -cb "$OUT"/*.whl | tail -1 | cut -f1) bytes in $OUT"
