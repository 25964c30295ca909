"""Separate Docker hosts for the tests: each is a dockerd inside a container of the outer engine.

The host containers sit on one user-defined bridge network of the outer engine, each at a fixed
address, so its URL `tcp://<ip>:2375` stays the same across `stop()`/`start()` (the engine hands
freed addresses out again in start order otherwise, and two restarted hosts can swap addresses).
Each host keeps its engine's state (/var/lib/docker) in a named volume, so stopping a host stops its
engine and everything in it, and starting it brings both back, restart policies included.

The host containers need most of what `--privileged` grants, but not `--privileged` itself: this
machine's capability bounding set lacks SYS_RESOURCE, which `--privileged` asks for.

Everything created is labelled `mlops.test-hosts=<session>` and removed by `remove_hosts(session)`,
except the host image: it is tagged by the hash of its inputs and shared by all sessions, like the base
image it is built FROM.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import docker
import requests
import urllib3
from docker.types import EndpointConfig, IPAMConfig, IPAMPool

HOST_IMAGE_DIR = Path(__file__).parent / "hosts"
HOST_IMAGE_REPOSITORY = "mlops-dockerd-host"
BASE_IMAGE = "mlops-base:bookworm"
LABEL = "mlops.test-hosts"
API_PORT = 2375
HOST_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")


class ClientTimeout(urllib3.Timeout):
    """Connecting gives up after a few seconds, so a client of a host that is down raises instead of hanging;
    reading keeps docker-py's default (loads, pulls and pushes wait without limit in docker-py anyway).

    docker-py adds a container's stop grace period to its client timeout, hence `__add__`."""

    def __add__(self, seconds: float) -> ClientTimeout:
        read = self.read_timeout
        return ClientTimeout(connect=self.connect_timeout, read=None if read is None else read + seconds)


CLIENT_TIMEOUT = ClientTimeout(connect=3, read=60)


class HostError(RuntimeError):
    pass


@dataclass
class DockerHost:
    """One separate Docker host: `url` for anything that takes a DOCKER_HOST, `client` for the tests."""

    name: str
    ip: str
    container_name: str
    outer: docker.DockerClient
    _client: docker.DockerClient | None = None

    @property
    def client(self) -> docker.DockerClient:
        """The inner engine's client, once it has answered (`start_hosts` waits for that)."""
        if self._client is None:
            raise HostError(f"{self.name}: its engine has not answered yet")
        return self._client

    @property
    def url(self) -> str:
        return f"tcp://{self.ip}:{API_PORT}"

    def stop(self, timeout: int = 0) -> None:
        """Takes the whole host down: with the default timeout 0 like a power cut; give a timeout for a clean
        shutdown, in which the inner engine stops its containers first."""
        self.outer.containers.get(self.container_name).stop(timeout=timeout)

    def start(self, timeout_s: float = 60) -> None:
        """Brings the host back if it is down, and waits until its engine answers."""
        self.outer.containers.get(self.container_name).start()
        self._wait_until_answering(timeout_s)

    def load_image(self, name: str) -> None:
        """Copies an image from the outer engine, like `docker save NAME | docker -H URL load`.

        For images that hosts build FROM (the base image); images under test are built or pulled by the
        code under test."""
        wanted = self.outer.images.get(name).id
        try:
            if self.client.images.get(name).id == wanted:
                return
        except docker.errors.ImageNotFound:
            pass
        self.client.images.load(self.outer.api.get_image(name))
        if self.client.images.get(name).id != wanted:
            raise HostError(f"{self.name}: loaded {name} but its ID differs from the outer engine's {wanted}")

    def reset(self) -> None:
        """Removes every container, network and volume inside the host, keeping its images (loading them
        again is what makes hosts expensive)."""
        for container in self.client.containers.list(all=True):
            container.remove(force=True, v=True)
        for network in self.client.networks.list():
            if network.name not in ("bridge", "host", "none"):
                network.remove()
        for volume in self.client.volumes.list():
            volume.remove(force=True)

    def _wait_until_answering(self, timeout_s: float) -> None:
        container = self.outer.containers.get(self.container_name)
        deadline = time.monotonic() + timeout_s
        while True:
            container.reload()
            if container.status != "running":
                raise HostError(f"{self.name}: the inner engine exited with {container.attrs['State']['ExitCode']}"
                                f"{self._log_tail(container)}")
            try:
                # The client negotiates the API version on creation, so it can only be made once the engine answers.
                self._client = self._client or docker.DockerClient(base_url=self.url, timeout=CLIENT_TIMEOUT)
                self._client.ping()
                return
            except (docker.errors.DockerException, requests.RequestException):
                if time.monotonic() > deadline:
                    raise HostError(f"{self.name}: no engine answers at {self.url} after {timeout_s:.0f}s"
                                    f"{self._log_tail(container)}") from None
            time.sleep(0.2)

    @staticmethod
    def _log_tail(container) -> str:
        # The engine's gRPC connection chatter would crowd out the lines that say why it stopped.
        lines = container.logs(tail=300).decode(errors="replace").splitlines()
        return "; last lines of its log:\n" + "\n".join([line for line in lines if "module=grpc" not in line][-20:])


def host_image(outer: docker.DockerClient) -> str:
    """Builds the host image unless the one for the current inputs exists; returns its tag."""
    try:
        base_id = outer.images.get(BASE_IMAGE).id
    except docker.errors.ImageNotFound:
        raise HostError(f"the base image {BASE_IMAGE} is missing: build it with scripts/build-base-image.sh") from None
    digest = hashlib.sha256(base_id.encode())
    for file in sorted(path for path in HOST_IMAGE_DIR.rglob("*") if path.is_file()):
        digest.update(str(file.relative_to(HOST_IMAGE_DIR)).encode() + b"\0" + file.read_bytes())
    tag = f"{HOST_IMAGE_REPOSITORY}:{digest.hexdigest()[:12]}"
    try:
        outer.images.get(tag)
    except docker.errors.ImageNotFound:
        try:
            outer.images.build(path=str(HOST_IMAGE_DIR), tag=tag, rm=True)
        except docker.errors.BuildError as error:
            lines = "".join(line.get("stream", line.get("error", "")) for line in error.build_log)
            raise HostError(f"building {tag} failed: {error.msg}; last lines:\n{lines[-3000:]}") from None
    return tag


def start_hosts(names: list[str], *, network: str, session: str, outer: docker.DockerClient | None = None,
                trust_registries_on_network: bool = False) -> dict[str, DockerHost]:
    """Starts one host per name on `network` (created when missing), in parallel, each with BASE_IMAGE loaded.

    Names become the hosts' hostnames (what `docker info` and a swarm call the node). With
    `trust_registries_on_network`, each engine pulls from and pushes to registries at addresses on
    `network` over plain HTTP: dockerd's documented `--insecure-registry <CIDR>` setting, for a private
    network only (TEST ONLY, like the unauthenticated API: see tests/hosts/Dockerfile)."""
    outer = outer or docker.from_env()
    for name in names:
        if not HOST_NAME.fullmatch(name):
            raise ValueError(f"host name {name!r}: use 1-31 lowercase letters, digits and '-', starting with a letter or digit")
    image = host_image(outer)
    bridge = _network(outer, network, session)
    addresses = _free_addresses(bridge, len(names))
    hosts = [DockerHost(name, str(ip), f"mlops-host-{session}-{name}", outer) for name, ip in zip(names, addresses)]
    engine_flags = [f"--insecure-registry={bridge.attrs['IPAM']['Config'][0]['Subnet']}"] if trust_registries_on_network else []
    for host in hosts:
        _create(host, image, bridge, session, engine_flags)
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        # list() re-raises the first failure; remove_hosts cleans up whatever did start.
        list(pool.map(_start_and_load, hosts))
    return {host.name: host for host in hosts}


def remove_hosts(session: str, outer: docker.DockerClient | None = None) -> None:
    outer = outer or docker.from_env()
    selector = {"label": f"{LABEL}={session}"}
    for container in outer.containers.list(all=True, filters=selector):
        container.remove(force=True)
    for volume in outer.volumes.list(filters=selector):
        volume.remove(force=True)
    for network in outer.networks.list(filters=selector):
        network.remove()


def _start_and_load(host: DockerHost) -> None:
    host.start()
    host.load_image(BASE_IMAGE)


def _create(host: DockerHost, image: str, bridge, session: str, engine_flags: list[str]) -> None:
    labels = {LABEL: session}
    volume = host.outer.volumes.create(f"{host.container_name}-engine", labels=labels)
    host.outer.containers.create(
        # The command is appended to the image's dockerd ENTRYPOINT.
        image, command=engine_flags, name=host.container_name, hostname=host.name, labels={**labels, f"{LABEL}.name": host.name},
        cap_add=["ALL"], cap_drop=["SYS_RESOURCE"],
        security_opt=["seccomp=unconfined", "apparmor=unconfined"],
        # The inner runc creates device nodes and sets cgroups for its containers.
        device_cgroup_rules=["a *:* rwm"],
        volumes={volume.name: {"bind": "/var/lib/docker", "mode": "rw"},
                 "/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}},
        # A fresh /run on every start: no stale pid files or sockets of the engine that was stopped.
        tmpfs={"/run": ""},
        # /proc/sys is read-only in the container, so the inner engine cannot turn forwarding on itself.
        sysctls={"net.ipv4.ip_forward": "1"},
        network=bridge.name,
        networking_config={bridge.name: EndpointConfig(host.outer.api._version, ipv4_address=host.ip)},
    )


def _network(outer: docker.DockerClient, name: str, session: str):
    """The hosts' bridge network, with the subnet the engine picks pinned so hosts can have fixed addresses."""
    try:
        return outer.networks.get(name)
    except docker.errors.NotFound:
        pass
    labels = {LABEL: session}
    for _ in range(5):
        probe = outer.networks.create(name, driver="bridge", labels=labels)
        pool = probe.attrs["IPAM"]["Config"][0]
        probe.remove()
        try:
            return outer.networks.create(name, driver="bridge", labels=labels, ipam=IPAMConfig(
                pool_configs=[IPAMPool(subnet=pool["Subnet"], gateway=pool.get("Gateway"))]))
        except docker.errors.APIError as error:
            if "overlap" not in str(error):
                raise
            # Another session took the subnet between the probe and the creation: probe again.
    raise HostError(f"could not create network {name}: its subnet was taken five times")


def _free_addresses(bridge, count: int) -> list[ipaddress.IPv4Address]:
    bridge.reload()
    config = bridge.attrs["IPAM"]["Config"][0]
    taken = {ipaddress.ip_address(config["Gateway"])}
    # Listed from the containers, not the network's endpoints: a stopped host has none but keeps its address.
    for container in bridge.client.containers.list(all=True, filters={"network": bridge.id}):
        address = container.attrs["NetworkSettings"]["Networks"][bridge.name]["IPAMConfig"]["IPv4Address"]
        taken.add(ipaddress.ip_address(address))
    free = (ip for ip in ipaddress.IPv4Network(config["Subnet"]).hosts() if ip not in taken)
    return [next(free) for _ in range(count)]
