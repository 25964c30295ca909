# Sourced by fetch-wheels.sh and fetch-debs.sh: what both do before downloading anything.
# skip_if_current FOLDER LOCK: one fetch per folder at a time (parallel `make wheels` runs and test sessions
# share it), and exit 0 at once when FOLDER/SHA256SUMS was written for LOCK (its first line, `# lock
# <sha256>`) and every file still matches. Sets lock_sha256 for the SHA256SUMS the caller writes.
skip_if_current() {
  local folder="$1" lock="$2"
  mkdir -p "$folder"
  if command -v flock >/dev/null; then
    exec 9>"${TMPDIR:-/tmp}/fetch-$(cd "$folder" && pwd | sha256sum | cut -c1-16).lock"
    flock 9
  fi
  lock_sha256=$(sha256sum "$lock" | cut -d' ' -f1)
  if [ -f "$folder/SHA256SUMS" ] && [ "$(head -n1 "$folder/SHA256SUMS")" = "# lock $lock_sha256" ] \
     && (cd "$folder" && sha256sum --quiet --strict -c SHA256SUMS >/dev/null 2>&1); then
    echo "$folder: up to date"
    exit 0
  fi
}
