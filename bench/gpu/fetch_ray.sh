#!/usr/bin/env bash
# Ray for the device, trimmed to fit the 64 MiB carry limit beside the kit (issue 18, item 2). From Ray's wheel for
# Python $PYV (3.12, the device's) it removes what the kit's code never runs: the Java jar, the dashboard's web
# assets, RLlib, Serve, Ray LLM and the test suites; strips the symbols of the three native binaries (_raylet.so,
# gcs_server, raylet); and packs the rest, dist-info first, as an xz tarball in bench/gpu/wheels/ (git-ignored).
# Then it fetches the wheels of ray[data,train]'s dependencies (ray-wheels.txt) the device may lack.
#   bash bench/gpu/fetch_ray.sh            # PYV=3.11 bash bench/gpu/fetch_ray.sh: a tarball this machine can run
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT="$HERE/wheels"
PYV=${PYV:-3.12}
ABI="cp${PYV/./}"
RAY_VERSION=${RAY_VERSION:-$(python -c "from importlib.metadata import version; print(version('ray'))" 2>/dev/null || echo 2.60.0)}
TARBALL="$OUT/ray-$RAY_VERSION-$ABI-trimmed.tar.xz"
mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
PLAT=(--only-binary=:all: --python-version "$PYV" --implementation cp --abi "$ABI" --platform manylinux2014_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --no-deps)
python -m pip download "${PLAT[@]}" -d "$tmp" "ray==$RAY_VERSION"
wheel=$(ls "$tmp"/ray-*.whl)
mkdir "$tmp/tree"
(cd "$tmp/tree" && python -m zipfile -e "$wheel" .)
cd "$tmp/tree"
rm -rf ray/jars ray/dashboard/client/build ray/rllib ray/serve ray/llm ray/tests ray-*.data
find . -name __pycache__ -prune -exec rm -rf {} +
find . -type d -name tests -prune -exec rm -rf {} +
strip --strip-unneeded ray/_raylet.so ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet
chmod +x ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet
tar -cf - ray-*.dist-info ray | xz -9 -T0 > "$TARBALL.part"
mv "$TARBALL.part" "$TARBALL"
echo "ray: wheel $(stat -c %s "$wheel") bytes, unpacked+trimmed $(du -sb . | cut -f1) bytes, $TARBALL $(stat -c %s "$TARBALL") bytes"
if [[ "$PYV" == 3.12 ]]; then
  python -m pip download "${PLAT[@]}" -d "$OUT" -r "$HERE/ray-wheels.txt"
fi
