"""The client material a stack reaches its TLS Docker host with (`docker.uses_tls`: a tcp:// host that is not
`insecure`): PEM text in the stack's config secrets, `mlops:dockerCaCert`, `mlops:dockerClientCert` and
`mlops:dockerClientKey` (docs/hosts-and-clusters.md).

The provider takes it as `ca_material`, `cert_material` and `key_material`. The `docker` CLI the program runs
at `pulumi up` (components/engine_facts.py) reads the same three from a private folder made for each command
and removed after it, not from the operator's DOCKER_CERT_PATH: the program then needs nothing but its stack's
config on any machine, and talks to the engine with the provider's identity. DOCKER_CERT_PATH is also where
terraform-provider-docker takes its `cert_path` from, and it refuses `cert_path` next to the materials
(internal/provider/config.go, NewClient), so a `pulumi up` of a TLS stage runs without DOCKER_CERT_PATH set.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import pulumi

from mlops_spec.contract import DOCKER_CA_CERT, DOCKER_CLIENT_CERT, DOCKER_CLIENT_KEY, DOCKER_TLS_KEYS
from mlops_spec.errors import SpecError
from mlops_spec.models import StageSpec

CONFIG_NAMESPACE = "mlops"
CERT_FILES = {DOCKER_CA_CERT: "ca.pem", DOCKER_CLIENT_CERT: "cert.pem", DOCKER_CLIENT_KEY: "key.pem"}
"""Each config secret's file in a DOCKER_CERT_PATH folder, named as the docker CLI looks for it."""


@dataclass(frozen=True)
class ClientTls:
    ca_cert: str = field(repr=False)
    client_cert: str = field(repr=False)
    client_key: str = field(repr=False)

    @contextmanager
    def cert_path(self) -> Iterator[str]:
        """A folder only this user can read, holding ca.pem, cert.pem and key.pem, for DOCKER_CERT_PATH; removed
        when the block ends."""
        contents = {DOCKER_CA_CERT: self.ca_cert, DOCKER_CLIENT_CERT: self.client_cert,
                    DOCKER_CLIENT_KEY: self.client_key}
        with tempfile.TemporaryDirectory(prefix="mlops-docker-tls-") as folder:  # mkdtemp: mode 0700
            for key, name in CERT_FILES.items():
                descriptor = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "w") as file:
                    file.write(contents[key])
            yield folder


def stage_tls(spec: StageSpec) -> Optional[ClientTls]:
    """The client material of the current stack, None when its Docker host is not reached over TLS; a SpecError
    naming the stack and the keys to set when any is missing or blank (the provider would skip verifying the host
    without a CA: terraform-provider-docker's buildHTTPClientFromBytes)."""
    if not spec.docker.uses_tls:
        return None
    config = pulumi.Config(CONFIG_NAMESPACE)
    values = {key: config.get(key) or "" for key in DOCKER_TLS_KEYS}
    missing = missing_tls_keys(values)
    if missing:
        stack = pulumi.get_stack()
        raise SpecError(file=f"Pulumi.{stack}.yaml", field=f"{CONFIG_NAMESPACE}:{missing[0]}",
                        message=f"stack {stack} reaches its Docker host {spec.docker.url} over TLS and its config "
                                f"lacks {', '.join(missing)}: {tls_set_commands(stack, missing)} "
                                f"(docs/hosts-and-clusters.md)")
    return ClientTls(ca_cert=values[DOCKER_CA_CERT], client_cert=values[DOCKER_CLIENT_CERT],
                     client_key=values[DOCKER_CLIENT_KEY])


def missing_tls_keys(values: Mapping[str, str]) -> list[str]:
    """The keys of DOCKER_TLS_KEYS that `values` (by key, without the namespace) lacks or leaves blank."""
    return [key for key in DOCKER_TLS_KEYS if not values.get(key, "").strip()]


def tls_set_commands(stack: str, keys: list[str]) -> str:
    """The commands that store `keys` in `stack`'s config from their PEM files, secret and never on a command line."""
    return "; ".join(f"pulumi config set --secret {CONFIG_NAMESPACE}:{key} -s {stack} < {CERT_FILES[key]}"
                     for key in keys)
