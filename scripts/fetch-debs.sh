#!/usr/bin/env bash
# Downloads exactly the Debian packages pinned in images/<name>/packages.lock (`name=version sha256` lines)
# into images/<name>/debs/ with the host's apt, and checks each file's sha256, so the image build installs
# them with dpkg and never touches the network. Quick when nothing changed: debs/SHA256SUMS records the
# lock it was fetched for.
# Usage: scripts/fetch-debs.sh images/<name>
set -euo pipefail
context="${1:?usage: scripts/fetch-debs.sh images/<name>}"
context="${context%/}"
lock="$context/packages.lock"
debs="$context/debs"
[ -f "$lock" ] || { echo "error: $lock does not exist" >&2; exit 1; }
command -v apt-get >/dev/null || { echo "error: fetching $lock needs apt-get (a Debian or Ubuntu host)" >&2; exit 1; }

# shellcheck source=fetch-common.sh
. "$(dirname "$0")/fetch-common.sh"
skip_if_current "$debs" "$lock"

incoming="$debs/.incoming"
rm -rf "$incoming"
mkdir -p "$incoming"
trap 'rm -rf "$incoming"' EXIT
packages=() sums=()
while read -r package sha256; do
  case "$package" in ''|'#'*) continue ;; esac
  packages+=("$package")
  sums+=("$sha256")
done < "$lock"
# apt-get writes into the current folder; its sandbox user may not write there, which only costs a warning.
download() { (cd "$incoming" && apt-get download -qq "${packages[@]}" 2>&1 | grep -v 'unsandboxed' >&2 || true); }
download
# A fresh machine (CI) may have no package lists yet: as root, fetch them once and try again.
if [ -z "$(ls "$incoming"/*.deb 2>/dev/null)" ] && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  download
fi
: > "$incoming/SHA256SUMS"
for index in "${!packages[@]}"; do
  name="${packages[$index]%%=*}" version="${packages[$index]#*=}"
  # apt names the file name_version_arch.deb with the version's ':' written as %3a.
  file=$(cd "$incoming" && ls -- "${name}_${version//:/%3a}_"*.deb 2>/dev/null | head -n1)
  [ -n "$file" ] || { echo "error: apt-get did not download ${packages[$index]}; is it still in the archive? (apt-get update)" >&2; exit 1; }
  echo "${sums[$index]}  $file" >> "$incoming/SHA256SUMS"
done
(cd "$incoming" && sha256sum --quiet --strict -c SHA256SUMS) || { echo "error: a package does not match its sha256 in $lock" >&2; exit 1; }
find "$debs" -maxdepth 1 -type f -delete
mv "$incoming"/*.deb "$debs"/
{ echo "# lock $lock_sha256"; cat "$incoming/SHA256SUMS"; } > "$debs/SHA256SUMS"
echo "$debs: ${#packages[@]} packages for $lock"
