#!/usr/bin/env bash
# Build cluster/Dockerfile and run `loft-dist --help` in the image: the check that the image the manifests name
# can be built and starts the CLI.
#
#   cluster/build_image.sh [TAG] [extra build args, e.g. --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu]
#
# Uses a Docker engine when one answers (`docker info`), else buildah (Debian: apt-get install buildah), rootless
# or as root, with its vfs storage under $BUILD_ROOT (default /tmp/loft-dist-buildah) and chroot isolation, which
# need no daemon, no overlay mounts and no user namespaces. The base image (rayproject/ray) comes from Docker Hub:
# a machine that cannot reach it stops at the FROM step, with the registry's error.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TAG="${1:-loft-dist:0.1.0-cpu}"
shift || true

if command -v docker > /dev/null && docker info > /dev/null 2>&1; then
  docker build -f cluster/Dockerfile -t "$TAG" "$@" .
  docker run --rm "$TAG" loft-dist --help
elif command -v buildah > /dev/null; then
  ROOT="${BUILD_ROOT:-/tmp/loft-dist-buildah}"
  STORE=(--storage-driver vfs --root "$ROOT/storage" --runroot "$ROOT/run")
  # Fully qualified: buildah, unlike docker, resolves no short names without a registries.conf alias.
  buildah "${STORE[@]}" bud --isolation chroot -f cluster/Dockerfile -t "$TAG" \
    --build-arg BASE_IMAGE="${BASE_IMAGE:-docker.io/rayproject/ray:2.60.0-py311-cpu}" "$@" .
  CONTAINER="$(buildah "${STORE[@]}" from "$TAG")"
  trap 'buildah "${STORE[@]}" rm "$CONTAINER" > /dev/null' EXIT
  buildah "${STORE[@]}" run --isolation chroot "$CONTAINER" -- loft-dist --help
else
  echo "error: neither a Docker engine (docker info) nor buildah is available; e.g. apt-get install buildah" >&2
  exit 2
fi
