#!/bin/sh
# Writes the one htpasswd line the stack derives from its secret password, then becomes the registry.
# On a swarm the line arrives as a secret file, named by REGISTRY_HTPASSWD_ENTRY_FILE.
set -eu
if [ -n "${REGISTRY_HTPASSWD_ENTRY_FILE:-}" ]; then
  REGISTRY_HTPASSWD_ENTRY=$(cat "$REGISTRY_HTPASSWD_ENTRY_FILE")
fi
if [ -z "${REGISTRY_HTPASSWD_ENTRY:-}" ]; then
  echo "REGISTRY_HTPASSWD_ENTRY is empty: set it (or REGISTRY_HTPASSWD_ENTRY_FILE) to one bcrypt htpasswd line (user:\$2b\$...)" >&2
  exit 2
fi
umask 077
printf '%s\n' "$REGISTRY_HTPASSWD_ENTRY" > /tmp/htpasswd
unset REGISTRY_HTPASSWD_ENTRY
exec docker-registry serve /etc/mlops-registry/config.yml
