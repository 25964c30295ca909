#!/usr/bin/env bash
# Builds the local base image every workload and platform image starts FROM, without any image registry:
# a minimal Debian rootfs from Debian's package mirror, imported into the Docker engine.
# Usage: scripts/build-base-image.sh [IMAGE]   (default mlops-base:bookworm)
set -euo pipefail
image="${1:-mlops-base:bookworm}"
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image already present"
  exit 0
fi
command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; }
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
# python3 for the Python images, nginx-light for the gateway, docker-registry for the image registry:
# one rootfs keeps CI to a single debootstrap run.
debootstrap --variant=minbase \
  --include=python3,python3-venv,ca-certificates,nginx-light,docker-registry \
  bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "built base image $image"
