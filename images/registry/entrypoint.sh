#!/bin/sh
# Writes the one htpasswd line the stack derives from its secret password (and, where the stack hands them over,
# its TLS certificate and key), then becomes the registry.
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
# Published off loopback, the stack hands over a certificate and key (the key as a file on a swarm): speak TLS.
if [ -n "${MLOPS_TLS_KEY_FILE:-}" ]; then
  MLOPS_TLS_KEY=$(cat "$MLOPS_TLS_KEY_FILE")
fi
if [ -n "${MLOPS_TLS_CERTIFICATE:-}${MLOPS_TLS_KEY:-}" ]; then
  if [ -z "${MLOPS_TLS_CERTIFICATE:-}" ] || [ -z "${MLOPS_TLS_KEY:-}" ]; then
    echo "MLOPS_TLS_CERTIFICATE and MLOPS_TLS_KEY (or MLOPS_TLS_KEY_FILE) go together: the stack sets both where the registry's port is published off loopback" >&2
    exit 2
  fi
  mkdir -p /tmp/tls
  printf '%s\n' "$MLOPS_TLS_CERTIFICATE" > /tmp/tls/certificate.pem
  printf '%s\n' "$MLOPS_TLS_KEY" > /tmp/tls/key.pem
  export REGISTRY_HTTP_TLS_CERTIFICATE=/tmp/tls/certificate.pem REGISTRY_HTTP_TLS_KEY=/tmp/tls/key.pem
fi
unset MLOPS_TLS_KEY MLOPS_TLS_CERTIFICATE
exec docker-registry serve /etc/mlops-registry/config.yml
