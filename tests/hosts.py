"""Separate Docker hosts for the tests: each is a dockerd inside a container of the outer engine.

The host containers sit on one user-defined bridge network of the outer engine, each at a fixed
address, so its URL `tcp://<ip>:2375` (`tcp://<ip>:2376` for a TLS host) stays the same across `stop()`/`start()` (the engine hands
freed addresses out again in start order otherwise, and two restarted hosts can swap addresses).
Each host keeps its engine's state (/var/lib/docker) in a named volume, so stopping a host stops its
engine and everything in it, and starting it brings both back, restart policies included.

The host containers need most of what `--privileged` grants, but not `--privileged` itself: this
machine's capability bounding set lacks SYS_RESOURCE, which `--privileged` asks for.

A TLS host (`start_hosts(..., tls=True)`) answers on 2376 only, as a production engine is set up
(docs/hosts-and-clusters.md): `dockerd --tlsverify` with a server certificate for its address, signed by a CA
made for the session, which also signed the one client certificate it accepts (`TlsMaterial`, made with the
`openssl` CLI). The plain port 2375 is not open on it.

Everything created is labelled `mlops.test-hosts=<session>` and removed by `remove_hosts(session)`,
except the host image: it is tagged by the hash of its inputs and shared by all sessions, like the base
image it is built FROM.
"""
from __future__ import annotations

import hashlib
import io
import ipaddress
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import docker
import requests
import urllib3
from docker.tls import TLSConfig
from docker.types import EndpointConfig, IPAMConfig, IPAMPool

from components.docker_tls import CERT_FILES

HOST_IMAGE_DIR = Path(__file__).parent / "hosts"
HOST_IMAGE_REPOSITORY = "mlops-dockerd-host"
BASE_IMAGE = "mlops-base:bookworm"
LABEL = "mlops.test-hosts"
API_PORT = 2375
TLS_API_PORT = 2376
SERVER_TLS_DIR = "/etc/docker-tls"
"""Where a TLS host's engine finds ca.pem, cert.pem and key.pem: its CA and its own certificate."""
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


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise HostError(f"openssl {args[0]} failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class TlsMaterial:
    """A CA and a client certificate it signed, in `folder` as the docker CLI's DOCKER_CERT_PATH wants them
    (ca.pem, cert.pem, key.pem); `sign_server` adds a server certificate for an engine at an address."""

    folder: Path

    @classmethod
    def create(cls, folder: Path, name: str = "mlops-test") -> TlsMaterial:
        folder.mkdir(mode=0o700, parents=True)
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                 "-subj", f"/CN={name} CA", "-keyout", str(folder / "ca-key.pem"), "-out", str(folder / "ca.pem"))
        material = cls(folder)
        material._sign(folder, "cert.pem", "key.pem", f"/CN={name} client", "extendedKeyUsage=clientAuth")
        return material

    def sign_server(self, ip: str) -> Path:
        """A folder with ca.pem and the server's cert.pem and key.pem for an engine that answers at `ip`."""
        server = self.folder / f"server-{ip}"
        server.mkdir(mode=0o700)
        shutil.copy(self.folder / "ca.pem", server / "ca.pem")
        self._sign(server, "cert.pem", "key.pem", f"/CN={ip}", f"subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth")
        return server

    def _sign(self, into: Path, cert: str, key: str, subject: str, extensions: str) -> None:
        request, extension_file = into / f"{cert}.csr", into / f"{cert}.ext"
        extension_file.write_text(extensions + "\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", subject,
                 "-keyout", str(into / key), "-out", str(request))
        _openssl("x509", "-req", "-in", str(request), "-CA", str(self.folder / "ca.pem"),
                 "-CAkey", str(self.folder / "ca-key.pem"), "-CAcreateserial", "-days", "2",
                 "-extfile", str(extension_file), "-out", str(into / cert))

    def tls_config(self) -> TLSConfig:
        return TLSConfig(client_cert=(str(self.folder / "cert.pem"), str(self.folder / "key.pem")),
                         ca_cert=str(self.folder / "ca.pem"), verify=True)

    def stack_config(self) -> dict[str, str]:
        """The Pulumi config secrets a stack whose host trusts this material reaches it with."""
        return {f"mlops:{key}": (self.folder / file).read_text() for key, file in CERT_FILES.items()}


def tls_client(url: str, tls: TLSConfig, timeout: float | urllib3.Timeout) -> docker.DockerClient:
    """A docker-py client of the TLS engine at `url` (tcp://) that trusts `tls`'s CA alone.

    requests puts REQUESTS_CA_BUNDLE (set on some machines, for a proxy) in place of a session's own CA file
    unless the session ignores the environment, and docker-py would ask the engine's API version while the
    client is created, before that can be said: so the version is asked first, by a session that ignores it."""
    assert isinstance(tls.ca_cert, str), "a TLS engine is verified with its CA"
    session = requests.Session()
    session.trust_env = False
    with session:
        answer = session.get(f"https://{url.removeprefix('tcp://')}/version", cert=tls.cert, verify=tls.ca_cert,
                             timeout=10)
        answer.raise_for_status()
    client = docker.DockerClient(base_url=url, tls=tls, timeout=timeout, version=answer.json()["ApiVersion"])
    client.api.trust_env = False
    return client


@dataclass
class DockerHost:
    """One separate Docker host: `url` for anything that takes a DOCKER_HOST, `client` for the tests; a TLS host
    has the `tls` material its engine trusts."""

    name: str
    ip: str
    container_name: str
    outer: docker.DockerClient
    tls: Optional[TlsMaterial] = None
    _client: docker.DockerClient | None = None

    @property
    def client(self) -> docker.DockerClient:
        """The inner engine's client, once it has answered (`start_hosts` waits for that)."""
        if self._client is None:
            raise HostError(f"{self.name}: its engine has not answered yet")
        return self._client

    @property
    def url(self) -> str:
        return f"tcp://{self.ip}:{TLS_API_PORT if self.tls else API_PORT}"

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
                self._client = self._client or (
                    tls_client(self.url, self.tls.tls_config(), CLIENT_TIMEOUT) if self.tls
                    else docker.DockerClient(base_url=self.url, timeout=CLIENT_TIMEOUT))
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


def _tls_folder(session: str) -> Path:
    return Path(tempfile.gettempdir()) / f"mlops-test-hosts-{session}-tls"


def session_tls(session: str) -> TlsMaterial:
    """The session's CA and client certificate, made on first use, removed by `remove_hosts`."""
    folder = _tls_folder(session)
    return TlsMaterial(folder) if (folder / "cert.pem").is_file() else TlsMaterial.create(folder)


def start_hosts(names: list[str], *, network: str, session: str, outer: docker.DockerClient | None = None,
                trust_registries_on_network: bool = False, tls: bool = False) -> dict[str, DockerHost]:
    """Starts one host per name on `network` (created when missing), in parallel, each with BASE_IMAGE loaded;
    with `tls`, each engine answers over TLS only, trusting the session's client certificate (`session_tls`).

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
    material = session_tls(session) if tls else None
    hosts = [DockerHost(name, str(ip), f"mlops-host-{session}-{name}", outer, material)
             for name, ip in zip(names, addresses)]
    engine_flags = [f"--insecure-registry={bridge.attrs['IPAM']['Config'][0]['Subnet']}"] if trust_registries_on_network else []
    for host in hosts:
        _create(host, image, bridge, session, engine_flags, _tls_entrypoint(outer, image) if host.tls else None)
        if host.tls:
            _put_server_certificate(host)
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        # list() re-raises the first failure; remove_hosts cleans up whatever did start.
        list(pool.map(_start_and_load, hosts))
    return {host.name: host for host in hosts}


def remove_hosts(session: str, outer: docker.DockerClient | None = None) -> None:
    outer = outer or docker.from_env()
    shutil.rmtree(_tls_folder(session), ignore_errors=True)
    selector = {"label": f"{LABEL}={session}"}
    for container in outer.containers.list(all=True, filters=selector):
        container.remove(force=True)
    for volume in outer.volumes.list(filters=selector):
        volume.remove(force=True)
    for network in outer.networks.list(filters=selector):
        network.remove()


def _tls_entrypoint(outer: docker.DockerClient, image: str) -> list[str]:
    """The image's dockerd command with its plain-text API (TEST ONLY there: tests/hosts/Dockerfile) replaced by
    dockerd's TLS-only one, which refuses any client without a certificate its CA signed."""
    entrypoint = outer.images.get(image).attrs["Config"]["Entrypoint"]
    plain = [f"--host=tcp://0.0.0.0:{API_PORT}", "--tls=false"]
    if not set(plain) <= set(entrypoint):
        raise HostError(f"{image}'s entrypoint {entrypoint} no longer has {plain} to replace")
    return [flag for flag in entrypoint if flag not in plain] + [
        f"--host=tcp://0.0.0.0:{TLS_API_PORT}", "--tlsverify", f"--tlscacert={SERVER_TLS_DIR}/ca.pem",
        f"--tlscert={SERVER_TLS_DIR}/cert.pem", f"--tlskey={SERVER_TLS_DIR}/key.pem"]


def _put_server_certificate(host: DockerHost) -> None:
    """Copies the CA and a server certificate for the host's address into its created container."""
    assert host.tls is not None
    server = host.tls.sign_server(host.ip)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name in ("ca.pem", "cert.pem", "key.pem"):
            tar.add(server / name, arcname=f"{SERVER_TLS_DIR.lstrip('/')}/{name}")
    host.outer.containers.get(host.container_name).put_archive("/", archive.getvalue())


def _start_and_load(host: DockerHost) -> None:
    host.start()
    host.load_image(BASE_IMAGE)


def _create(host: DockerHost, image: str, bridge, session: str, engine_flags: list[str],
            entrypoint: Optional[list[str]]) -> None:
    labels = {LABEL: session}
    volume = host.outer.volumes.create(f"{host.container_name}-engine", labels=labels)
    host.outer.containers.create(
        # The command is appended to the image's dockerd ENTRYPOINT (or `entrypoint`, when given).
        image, entrypoint=entrypoint, command=engine_flags, name=host.container_name, hostname=host.name, labels={**labels, f"{LABEL}.name": host.name},
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
