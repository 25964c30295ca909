"""How `mlops` reaches a stage's published ports (its model registry and image registry) from where it runs.

- `unix://` — the stage's engine is on this machine: its ports are on loopback.
- `tcp://HOST` — the ports are reached at `docker.address` (default HOST), so they must be published on
  an address other machines reach (`bind_address: 0.0.0.0` with `public: true`).
- `ssh://[user@]HOST` — through one SSH tunnel per port (`ssh -N -L`, with `docker.ssh_opts`), so the
  ports stay on the remote host's loopback.

Every failure names the stage, the service and the Docker host.
"""
from __future__ import annotations

import socket
import subprocess
import time
from typing import Optional
from urllib.parse import urlsplit

from mlops import credentials
from mlops.modelstore import BasicAuth, MlflowStore
from mlops_spec.models import PublishedPort, StageSpec

TUNNEL_START_TIMEOUT_S = 15.0


class Unreachable(Exception):
    """A stage's service cannot be reached from this machine; nothing was changed."""


def _free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StageReach:
    """Addresses of a stage's published ports as seen from here; opens (and on exit closes) SSH tunnels."""

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        self._tunnels: dict[int, tuple[subprocess.Popen, int]] = {}

    def __enter__(self) -> "StageReach":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        for process, _ in self._tunnels.values():
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
        self._tunnels.clear()

    def where(self, service: str) -> str:
        return f"{self.spec.stage}'s {service} (Docker host {self.spec.docker.url})"

    def address(self, service: str, port: PublishedPort) -> str:
        """`host:port` at which `service`, published as `port`, answers from here."""
        docker = self.spec.docker
        if port.host_port is None:
            raise Unreachable(f"{self.where(service)} has no fixed host port (Docker chooses it); set port.host_port")
        if docker.is_local:
            return f"{docker.address or '127.0.0.1'}:{port.host_port}"
        if docker.url.startswith("ssh://"):
            return f"127.0.0.1:{self._tunnel(service, port.bind_address, port.host_port)}"
        if port.bind_address == "127.0.0.1" and docker.address is None:
            raise Unreachable(f"{self.where(service)} is published on 127.0.0.1:{port.host_port} of that host, which "
                              "no other machine reaches; publish it on a reachable address "
                              "(port: {bind_address: 0.0.0.0, public: true}) or use an ssh:// Docker URL, "
                              "through which mlops tunnels")
        return f"{docker.published_host}:{port.host_port}"

    def _tunnel(self, service: str, bind_address: str, host_port: int) -> int:
        if host_port in self._tunnels:
            return self._tunnels[host_port][1]
        url = urlsplit(self.spec.docker.url)
        if url.hostname is None:
            raise Unreachable(f"{self.where(service)}: {self.spec.docker.url} names no host to tunnel to")
        destination = f"{url.username}@{url.hostname}" if url.username else url.hostname
        local = _free_local_port()
        command = ["ssh", "-N", "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes",
                   *(["-p", str(url.port)] if url.port else []), *self.spec.docker.ssh_opts,
                   "-L", f"127.0.0.1:{local}:{bind_address}:{host_port}", destination]
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
        except FileNotFoundError:
            raise Unreachable(f"{self.where(service)}: reaching an ssh:// host needs the ssh client, which is not "
                              "installed") from None
        deadline = time.monotonic() + TUNNEL_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                reason = (process.communicate()[1] or "").strip().splitlines()
                raise Unreachable(f"{self.where(service)}: the SSH tunnel to port {host_port} failed: "
                                  f"{reason[-1] if reason else f'ssh exited with {process.returncode}'}")
            try:
                socket.create_connection(("127.0.0.1", local), timeout=1).close()
                self._tunnels[host_port] = (process, local)
                return local
            except OSError:
                time.sleep(0.2)
        process.kill()
        raise Unreachable(f"{self.where(service)}: the SSH tunnel to port {host_port} did not open within "
                          f"{TUNNEL_START_TIMEOUT_S:.0f}s")

    def model_registry_url(self) -> str:
        port = self.spec.model_registry.port
        return f"{'https' if port.off_loopback else 'http'}://{self.address('model registry', port)}"

    def model_store(self, identity: str) -> MlflowStore:
        """The stage's MLflow as `identity`, its certificate verified with the stage's CA where it speaks TLS."""
        login = credentials.mlflow_login(self.spec, identity)
        return MlflowStore(self.model_registry_url(), BasicAuth(identity, login.password),
                           ca_certificate=login.ca_certificate)

    def image_registry_address(self) -> Optional[str]:
        if not self.spec.image_registry.enabled:
            return None
        return self.address("image registry", self.spec.image_registry.port)
