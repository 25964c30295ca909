"""A TLS inner engine, set up as docs/hosts-and-clusters.md says a production host is: it answers only a client
whose certificate its CA signed, on 2376, and the plain-text port 2375 is not open."""
from __future__ import annotations

import socket
import subprocess

import docker
import pytest
import requests
from docker.tls import TLSConfig

from mlops_spec.models import DockerHost
from tests.hosts import CLIENT_TIMEOUT, TlsMaterial, tls_client

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def tls_host(docker_hosts):
    host = docker_hosts("prod", tls=True)["prod"]
    assert host.tls is not None
    return host


def answers(url: str, tls: TLSConfig) -> bool:
    try:
        return tls_client(url, tls, CLIENT_TIMEOUT).ping()
    except (docker.errors.DockerException, requests.RequestException):
        return False


def test_the_engine_answers_the_client_its_ca_signed(tls_host):
    assert tls_host.url.endswith(":2376")
    assert answers(tls_host.url, tls_host.tls.tls_config())


def test_the_engine_refuses_a_client_without_a_certificate_or_with_one_its_ca_did_not_sign(tls_host, tmp_path):
    ca = str(tls_host.tls.folder / "ca.pem")
    assert not answers(tls_host.url, TLSConfig(ca_cert=ca, verify=True))
    stranger = TlsMaterial.create(tmp_path / "stranger", name="stranger")
    assert not answers(tls_host.url, TLSConfig(client_cert=(str(stranger.folder / "cert.pem"),
                                                            str(stranger.folder / "key.pem")),
                                               ca_cert=ca, verify=True))


def test_nothing_answers_in_plain_text(tls_host):
    with pytest.raises(OSError):
        socket.create_connection((tls_host.ip, 2375), timeout=3).close()
    plain = requests.get(f"http://{tls_host.ip}:2376/_ping", timeout=5)
    assert plain.status_code == 400 and "HTTPS" in plain.text


def test_the_docker_cli_reaches_it_with_the_stages_environment_and_the_operators_certificates(tls_host, tmp_path):
    stage_host = DockerHost(url=tls_host.url)
    version = ["docker", "version", "--format", "{{.Server.Version}}"]
    reached = subprocess.run(version, capture_output=True, text=True, timeout=60,
                             env=stage_host.cli_environment(environ={"PATH": "/usr/bin:/bin",
                                                                     "DOCKER_CERT_PATH": str(tls_host.tls.folder)}))
    assert reached.returncode == 0 and reached.stdout.strip(), reached.stderr
    refused = subprocess.run(version, capture_output=True, text=True, timeout=60,
                             env=stage_host.cli_environment(environ={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}))
    assert refused.returncode != 0
