#!/usr/bin/env bash
# Downloads exactly the wheels pinned in images/<name>/requirements.lock into images/<name>/wheels/, for the
# images' interpreter (CPython 3.11, manylinux x86_64) rather than the host's, so image builds install
# with `pip install --no-index --require-hashes` and never touch the network.
# Quick when nothing changed: wheels/SHA256SUMS records the lock it was fetched for and every wheel's hash.
# Usage: scripts/fetch-wheels.sh images/<name>
set -euo pipefail
context="${1:?usage: scripts/fetch-wheels.sh images/<name>}"
context="${context%/}"
lock="$context/requirements.lock"
wheels="$context/wheels"
[ -f "$lock" ] || { echo "error: $lock does not exist" >&2; exit 1; }

lock_sha256=$(sha256sum "$lock" | cut -d' ' -f1)
if [ -f "$wheels/SHA256SUMS" ] && [ "$(head -n1 "$wheels/SHA256SUMS")" = "# lock $lock_sha256" ] \
   && (cd "$wheels" && sha256sum --quiet --strict -c SHA256SUMS 2>/dev/null); then
  echo "$wheels: up to date"
  exit 0
fi

# A fresh folder drops wheels an older lock pinned; wheels already here are reused instead of downloaded.
fresh="$context/wheels.partial"
rm -rf "$fresh"
trap 'rm -rf "$fresh"' EXIT
mkdir -p "$wheels"
# Debian bookworm ships glibc 2.36, so any manylinux wheel up to 2_36 runs in the images. pip before 24
# matches --platform literally, so every compatible tag is listed (2_17, 2_12 and 2_5 by both names).
platforms=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
for glibc_minor in $(seq 5 36); do platforms+=(--platform "manylinux_2_${glibc_minor}_x86_64"); done
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
  --implementation cp --python-version 3.11 "${platforms[@]}" \
  --find-links "$wheels" --dest "$fresh" -r "$lock"
{ echo "# lock $lock_sha256"; (cd "$fresh" && sha256sum -- *.whl); } > "$fresh/SHA256SUMS"
rm -rf "$wheels"
mv "$fresh" "$wheels"
echo "$wheels: $(ls "$wheels" | grep -c '\.whl$') wheels for $lock"
