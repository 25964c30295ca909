"""Stage image registries as `mlops promote` needs them: look up a digest, copy an image byte for byte.

Copies go through skopeo (Debian's `skopeo`) registry to registry with `--preserve-digests`: manifests
and blobs travel unchanged, so the digest in the target is the digest in the source. A pull, tag and
push through a Docker engine could re-compress layers or rewrite the manifest and change it. Every
digest is computed here from the manifest bytes the registry serves, never taken from its word.
Credentials reach skopeo through a private auth file, never the command line.

A building stage without an image registry (dev on one host) keeps its images on its Docker engine only.
Promotion takes such an image from there once (`take_from_engine`): `docker save`, then compressed by skopeo
into a private local folder whose manifest is the one the target will serve, so the digest the promotion
shows is the digest it pins and `copy_taken` verifies in the target.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping
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


def _skopeo(args: list[str], registry: Optional[StageRegistry], what: str) -> bytes:
    """Run skopeo for `what`; `registry`: the one it talks to, which its failures are explained by (None: it
    only converts local files)."""
    try:
        done = subprocess.run(["skopeo", "--command-timeout", f"{COMMAND_TIMEOUT_S}s", *args], capture_output=True,
                              timeout=COMMAND_TIMEOUT_S + 30)
    except FileNotFoundError:
        raise RegistryError("copying images needs skopeo (Debian's package `skopeo`), which is not installed") from None
    except subprocess.TimeoutExpired:
        where = f"{registry.where} at {registry.address} did not answer" if registry else "skopeo did not finish"
        raise RegistryError(f"{what}: {where} within {COMMAND_TIMEOUT_S}s") from None
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace")
        reason = _reason(stderr, registry) if registry else (stderr.strip().splitlines() or ["skopeo failed"])[-1]
        raise RegistryError(f"{what}: {reason}")
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
    return _copy_into(target, target_repository, digest, source.reference(source_repository, digest),
                      f"copying {source_repository}@{digest} from {source.where} into {target_repository}", source)


def _copy_into(target: StageRegistry, target_repository: str, digest: str, source_reference: str, what: str,
               source: Optional[StageRegistry] = None) -> str:
    """skopeo's copy of `source_reference` (in registry `source`, or a local layout) into the target, tagged
    `sha256-<hex>` so the registry keeps it, then verified there by digest."""
    with _auth_file(*(source, target) if source else (target,)) as auth:
        _skopeo(["copy", "--quiet", "--preserve-digests", "--retry-times", "2", "--authfile", auth,
                 *(_tls_options(source, auth, "src-") if source else []), *_tls_options(target, auth, "dest-"),
                 source_reference, target.reference(target_repository, "sha256-" + digest.removeprefix("sha256:"))],
                target, what)
    manifest_digest(target, target_repository, digest)
    return f"{target_repository}@{digest}"


@dataclass(frozen=True)
class EngineImage:
    """An image taken from a Docker engine into a local folder (skopeo's `dir:` layout, layers compressed), ready
    to copy into a registry under `digest`, the sha256 of the manifest in that folder."""

    where: str  # e.g. "dev's Docker engine (unix:///var/run/docker.sock)"
    name: str  # what the engine calls it, e.g. mlops-dev/iris-classifier-serving:<content tag>
    folder: str
    digest: str


def _engine_reason(stderr: str, where: str) -> str:
    text = stderr.lower()
    if "no such image" in text or "reference does not exist" in text:
        return f"{where} does not have it"
    if "cannot connect to the docker daemon" in text or "connection refused" in text or "no such host" in text:
        return f"{where} is unreachable"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "docker save failed"
    return f"{where}: {last}"


def take_from_engine(name: str, where: str, environment: Mapping[str, str], folder: str) -> EngineImage:
    """Save image `name` from the engine the `docker` CLI reaches with `environment` and compress it into `folder`
    (created here, private to this user) once, so the digest shown before a copy is the digest copied."""
    os.makedirs(folder, mode=0o700)
    archive = os.path.join(folder, "saved.tar")
    layout = os.path.join(folder, "image")
    try:
        saved = subprocess.run(["docker", "save", "--output", archive, name], capture_output=True, text=True,
                               env=dict(environment), timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise RegistryError(f"{name}: taking it from {where} needs the docker CLI, which is not installed") from None
    except subprocess.TimeoutExpired:
        raise RegistryError(f"{name}: {where} did not hand it over within {COMMAND_TIMEOUT_S}s") from None
    if saved.returncode != 0:
        raise RegistryError(f"{name}: {_engine_reason(saved.stderr, where)}")
    try:
        # v2s2 with gzip layers: the manifest and blobs as a registry stores them, which --preserve-digests keeps.
        _skopeo(["copy", "--quiet", "--format", "v2s2", "--dest-compress", f"docker-archive:{archive}", f"dir:{layout}"],
                None, f"compressing {name} from {where}")
    finally:
        os.unlink(archive)
    with open(os.path.join(layout, "manifest.json"), "rb") as manifest:
        digest = "sha256:" + hashlib.sha256(manifest.read()).hexdigest()
    return EngineImage(where=where, name=name, folder=layout, digest=digest)


def copy_taken(image: EngineImage, target: StageRegistry, target_repository: str) -> str:
    """Copy an image taken from an engine into the target registry unchanged, tagged `sha256-<hex>` so the registry
    keeps it, and verify it there by digest; returns the target reference by digest."""
    return _copy_into(target, target_repository, image.digest, f"dir:{image.folder}",
                      f"copying {image.name} from {image.where} into {target_repository}")
