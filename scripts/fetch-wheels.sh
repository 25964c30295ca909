#!/usr/bin/env bash
# Downloads exactly the wheels pinned in images/<name>/requirements.lock (or a model project's,
# models/<name>/requirements.lock) into that folder's wheels/, for the
# images' interpreter (CPython 3.11, manylinux x86_64) rather than the host's, so image builds install
# with `pip install --no-index --require-hashes` and never touch the network.
# Quick when nothing changed: wheels/SHA256SUMS records the lock it was fetched for and every wheel's hash.
# Usage: scripts/fetch-wheels.sh images/<name>|models/<name>
set -euo pipefail
context="${1:?usage: scripts/fetch-wheels.sh images/<name>|models/<name>}"
context="${context%/}"
lock="$context/requirements.lock"
wheels="$context/wheels"
[ -f "$lock" ] || { echo "error: $lock does not exist" >&2; exit 1; }

# shellcheck source=fetch-common.sh
. "$(dirname "$0")/fetch-common.sh"
skip_if_current "$wheels" "$lock"

# Downloaded into a folder of its own first, so an interrupted fetch never looks complete; wheels already
# here are reused instead of downloaded, and those an older lock pinned are dropped.
incoming="$wheels/.incoming"
rm -rf "$incoming"
trap 'rm -rf "$incoming"' EXIT
# Debian bookworm ships glibc 2.36, so any manylinux wheel up to 2_36 runs in the images. pip before 24
# matches --platform literally, so every compatible tag is listed (2_17, 2_12 and 2_5 by both names).
platforms=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
for glibc_minor in $(seq 5 36); do platforms+=(--platform "manylinux_2_${glibc_minor}_x86_64"); done
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
  --implementation cp --python-version 3.11 "${platforms[@]}" \
  --find-links "$wheels" --dest "$incoming" -r "$lock"
find "$wheels" -maxdepth 1 -type f -delete
mv "$incoming"/*.whl "$wheels"/
{ echo "# lock $lock_sha256"; (cd "$wheels" && sha256sum -- *.whl); } > "$wheels/SHA256SUMS"
echo "$wheels: $(grep -c '\.whl$' "$wheels/SHA256SUMS") wheels for $lock"
