"""Stage image registries as `mlops promote` needs them: look up a digest, copy an image byte for byte.

Copies go through skopeo (Debian's `skopeo`) registry to registry with `--preserve-digests`: manifests
and blobs travel unchanged, so the digest in the target is the digest in the source. A pull, tag and
push through a Docker engine could re-compress layers or rewrite the manifest and change it. Every
digest is computed here from the manifest bytes the registry serves, never taken from its word.
Credentials reach skopeo through a private auth file, never the command line.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

COMMAND_TIMEOUT_S = 600
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# An HTTP 401 as a word of its own: skopeo's messages also carry blob digests, whose hex may hold "401".
UNAUTHORIZED = re.compile(r"unauthorized|authentication required|\b401\b")


class RegistryError(Exception):
    """A registry could not do what was asked; the message names the stage, registry and reason."""


@dataclass(frozen=True)
class StageRegistry:
    """One stage's image registry, at the address it is reached from here."""

    where: str  # e.g. "prod's image registry (Docker host tcp://10.0.0.5:2375)"
    address: str  # host:port reachable from here
    username: str
    password: str
    ca_certificate: Optional[str] = None
    """PEM of the CA its certificate must verify with where it speaks TLS (published off loopback,
    mlops_spec/service_tls.py); None: plain HTTP on loopback."""

    def reference(self, repository: str, digest_or_tag: str) -> str:
        return f"docker://{self.address}/{_name(repository, digest_or_tag)}"


def _name(repository: str, digest_or_tag: str) -> str:
    return f"{repository}{'@' if digest_or_tag.startswith('sha256:') else ':'}{digest_or_tag}"


@contextmanager
def _auth_file(*registries: StageRegistry) -> Iterator[str]:
    auths = {registry.address: {"auth": base64.b64encode(f"{registry.username}:{registry.password}".encode()).decode()}
             for registry in registries}
    with tempfile.TemporaryDirectory(prefix="mlops-skopeo-") as folder:
        path = os.path.join(folder, "auth.json")
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as out:
            json.dump({"auths": auths}, out)
        yield path


def _tls_options(registry: StageRegistry, auth: str, side: str = "") -> list[str]:
    """skopeo's options for `registry`'s TLS (`side`: "src-" or "dest-" of a copy): its certificate verified with
    its stage's CA, which goes beside the auth file; a registry on loopback speaks plain HTTP."""
    if registry.ca_certificate is None:
        return [f"--{side}tls-verify=false"]
    folder = os.path.join(os.path.dirname(auth), f"{side}certs")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "ca.crt"), "w", encoding="utf-8") as out:
        out.write(registry.ca_certificate)
    return [f"--{side}tls-verify=true", f"--{side}cert-dir", folder]


def _skopeo(args: list[str], registry: StageRegistry, what: str) -> bytes:
    try:
        done = subprocess.run(["skopeo", "--command-timeout", f"{COMMAND_TIMEOUT_S}s", *args], capture_output=True,
                              timeout=COMMAND_TIMEOUT_S + 30)
    except FileNotFoundError:
        raise RegistryError("copying images needs skopeo (Debian's package `skopeo`), which is not installed") from None
    except subprocess.TimeoutExpired:
        raise RegistryError(f"{what}: {registry.where} at {registry.address} did not answer within "
                            f"{COMMAND_TIMEOUT_S}s") from None
    if done.returncode != 0:
        raise RegistryError(f"{what}: {_reason(done.stderr.decode(errors='replace'), registry)}")
    return done.stdout


def _reason(stderr: str, registry: StageRegistry) -> str:
    """skopeo's error chains are long; say which of the few cases a user can act on it is."""
    text = stderr.lower()
    if UNAUTHORIZED.search(text):
        return (f"{registry.where} at {registry.address} refused user {registry.username}'s credentials (401); "
                "check the stage's Pulumi config secret mlops:registryPassword")
    if "x509:" in text or "certificate" in text:
        return (f"{registry.where} at {registry.address} presented a certificate that does not verify with the CA "
                "the stage's Pulumi config secret mlops:registryPassword makes: is it the stage's registry?")
    if "server gave http response to https client" in text:
        return f"{registry.where} at {registry.address} speaks plain HTTP, where the stage's registry speaks TLS"
    if "manifest unknown" in text or "not found" in text or "name unknown" in text:
        return f"{registry.where} at {registry.address} does not have it"
    if "digest" in text and ("mismatch" in text or "does not match" in text):
        return f"{registry.where} at {registry.address} served content that does not match its digest (tampered?)"
    if any(word in text for word in ("connection refused", "no such host", "i/o timeout", "no route to host",
                                     "network is unreachable", "connection reset")):
        return f"{registry.where} at {registry.address} is unreachable"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "skopeo failed"
    return f"{registry.where} at {registry.address}: {last}"


def read_manifest(registry: StageRegistry, repository: str, digest_or_tag: str) -> bytes:
    """The manifest bytes the registry serves for `repository` at a tag or digest, checked against the
    digest when one is asked for."""
    with _auth_file(registry) as auth:
        manifest = _skopeo(["inspect", "--raw", "--authfile", auth, *_tls_options(registry, auth),
                            registry.reference(repository, digest_or_tag)],
                           registry, _name(repository, digest_or_tag))
    served = "sha256:" + hashlib.sha256(manifest).hexdigest()
    if digest_or_tag.startswith("sha256:") and served != digest_or_tag:
        raise RegistryError(f"{repository}@{digest_or_tag}: {registry.where} at {registry.address} served a manifest "
                            f"whose sha256 is {served} (tampered?)")
    return manifest


def manifest_digest(registry: StageRegistry, repository: str, digest_or_tag: str) -> str:
    """The sha256 of the manifest the registry serves for `repository` at a tag or digest."""
    return "sha256:" + hashlib.sha256(read_manifest(registry, repository, digest_or_tag)).hexdigest()


def copy_image(source: StageRegistry, source_repository: str, digest: str,
               target: StageRegistry, target_repository: str) -> str:
    """Copy `source_repository@digest` into the target registry unchanged and verify it there by digest.
    Tagged `sha256-<hex>` so the registry keeps it; returns the target reference by digest."""
    if not DIGEST.match(digest):
        raise RegistryError(f"{source_repository}: '{digest}' is not a sha256 digest")
    # Verify the source first: a tampered source is refused before anything is written to the target.
    manifest_digest(source, source_repository, digest)
    with _auth_file(source, target) as auth:
        _skopeo(["copy", "--quiet", "--preserve-digests", "--retry-times", "2", "--authfile", auth,
                 *_tls_options(source, auth, "src-"), *_tls_options(target, auth, "dest-"),
                 source.reference(source_repository, digest),
                 target.reference(target_repository, "sha256-" + digest.removeprefix("sha256:"))],
                target, f"copying {source_repository}@{digest} from {source.where} into {target_repository}")
    manifest_digest(target, target_repository, digest)
    return f"{target_repository}@{digest}"
