#!/bin/sh
# Writes the one htpasswd line the stack derives from its secret password, then becomes the registry.
set -eu
if [ -z "${REGISTRY_HTPASSWD_ENTRY:-}" ]; then
  echo "REGISTRY_HTPASSWD_ENTRY is empty: set it to one bcrypt htpasswd line (user:\$2b\$...)" >&2
  exit 2
fi
umask 077
printf '%s\n' "$REGISTRY_HTPASSWD_ENTRY" > /tmp/htpasswd
exec docker-registry serve /etc/mlops-registry/config.yml
