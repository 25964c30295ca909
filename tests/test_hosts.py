"""The separate Docker hosts the stage tests run on (tests/hosts.py): each its own engine, a registry on
one host's localhost reachable only there, ports published on one host reachable from containers on
another through its address, and a host that goes down failing fast and coming back with its containers.

Traffic goes only to the hosts' own addresses on the session's private bridge network."""
from __future__ import annotations

import io
import tarfile
import time
import urllib.request

import docker
import pytest
import requests

from tests.hosts import BASE_IMAGE, CLIENT_TIMEOUT

pytestmark = pytest.mark.docker

# Debian's docker-registry, without the htpasswd auth of its packaged config.
REGISTRY_CONFIG = "version: 0.1\nstorage: {filesystem: {rootdirectory: /var/lib/docker-registry}}\nhttp: {addr: ':5000'}\n"
REGISTRY_COMMAND = ["sh", "-c", 'printf %s "$0" >/tmp/config.yml && exec docker-registry serve /tmp/config.yml',
                    REGISTRY_CONFIG]
HTTP_SERVER = ["python3", "-u", "-m", "http.server", "8080"]


@pytest.fixture
def dev_and_staging(docker_hosts):
    hosts = docker_hosts("dev", "staging")
    yield hosts["dev"], hosts["staging"]
    for host in docker_hosts("dev", "staging").values():
        host.reset()


def test_hosts_are_separate_engines(dev_and_staging):
    dev, staging = dev_and_staging
    dev_info, staging_info = dev.client.info(), staging.client.info()
    assert dev_info["ID"] != staging_info["ID"]
    assert (dev_info["Name"], staging_info["Name"]) == ("dev", "staging")
    assert dev_info["Driver"] == "overlay2"
    dev.client.containers.run(BASE_IMAGE, ["sleep", "infinity"], name="only-on-dev", detach=True)
    assert [c.name for c in dev.client.containers.list()] == ["only-on-dev"]
    assert staging.client.containers.list(all=True) == []
    assert staging.client.images.get(BASE_IMAGE).id == dev.client.images.get(BASE_IMAGE).id


def test_registry_on_localhost_is_only_on_its_host(dev_and_staging):
    dev, staging = dev_and_staging
    registry = dev.client.containers.run(BASE_IMAGE, REGISTRY_COMMAND, detach=True,
                                         ports={"5000/tcp": ("127.0.0.1", 5000)})
    wait_for_log(registry, "listening on")
    for host in (dev, staging):
        host.client.images.build(fileobj=tiny_build_context(), custom_context=True, tag="localhost:5000/probe:1")
    # An engine trusts registries on localhost without --insecure-registry: pushing over plain HTTP works.
    assert push_errors(dev, "localhost:5000/probe:1") == []
    assert "connection refused" in " ".join(push_errors(staging, "localhost:5000/probe:1"))


def test_container_reaches_port_published_on_another_host(dev_and_staging):
    dev, staging = dev_and_staging
    server = dev.client.containers.run(BASE_IMAGE, HTTP_SERVER, detach=True, ports={"8080/tcp": ("0.0.0.0", None)})
    port = published_port(server, 8080)
    wait_for_log(server, "Serving HTTP")
    probe = f"import urllib.request; print(urllib.request.urlopen('http://{dev.ip}:{port}/', timeout=5).status)"
    assert staging.client.containers.run(BASE_IMAGE, ["python3", "-c", probe], remove=True).strip() == b"200"


def test_stopped_host_fails_fast_and_comes_back_with_its_containers(dev_and_staging):
    dev, staging = dev_and_staging
    # A fixed host port: an engine that restarts a container may pick another free port for an ephemeral one.
    server = dev.client.containers.run(BASE_IMAGE, HTTP_SERVER, name="survivor", detach=True,
                                       restart_policy={"Name": "unless-stopped"}, ports={"8080/tcp": ("0.0.0.0", 8080)})
    wait_for_log(server, "Serving HTTP")

    dev.stop()
    staging.client.ping()
    # The client that was talking to the engine, and a new one, which asks the engine its API version.
    for connect in (dev.client.ping, lambda: docker.DockerClient(base_url=dev.url, timeout=CLIENT_TIMEOUT)):
        started = time.monotonic()
        with pytest.raises((requests.ConnectionError, docker.errors.DockerException)):
            connect()
        assert time.monotonic() - started < 5

    dev.start()
    deadline = time.monotonic() + 30
    while dev.client.containers.get("survivor").status != "running":
        assert time.monotonic() < deadline, "the unless-stopped container did not come back with its host"
        time.sleep(0.5)
    assert http_status(f"http://{dev.ip}:8080/") == 200


def tiny_build_context() -> io.BytesIO:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, content in {"Dockerfile": b"FROM scratch\nCOPY probe /probe\n", "probe": b"probe\n"}.items():
            entry = tarfile.TarInfo(name)
            entry.size = len(content)
            tar.addfile(entry, io.BytesIO(content))
    archive.seek(0)
    return archive


def push_errors(host, image: str) -> list[str]:
    return [line["error"] for line in host.client.images.push(image, stream=True, decode=True) if "error" in line]


def published_port(container, internal: int) -> int:
    container.reload()
    return int(container.ports[f"{internal}/tcp"][0]["HostPort"])


def wait_for_log(container, text: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in container.logs().decode(errors="replace"):
        assert time.monotonic() < deadline, (
            f"{container.name} never logged {text!r}:\n{container.logs(tail=20).decode()}")
        time.sleep(0.2)


def http_status(url: str, timeout_s: float = 20) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                return response.status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
