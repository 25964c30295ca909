"""How `mlops` reaches a stage's registries on its own Docker host: loopback, a published address, an SSH tunnel."""
from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
import yaml

from mlops.reach import StageReach, Unreachable
from mlops_spec.loading import load_stage
from tests.conftest import REQUIRE_DOCKER, free_port


def stage_on(environments, url: str, docker: dict | None = None, model_registry_port: dict | None = None):
    file = environments / "prod.yaml"
    data = yaml.safe_load(file.read_text())
    data["docker"] = {"url": url, **(docker or {})}
    if model_registry_port:
        data["model_registry"]["port"] |= model_registry_port
    file.write_text(yaml.safe_dump(data))
    return load_stage("prod", environments)


def test_a_local_engine_is_reached_on_loopback(environments):
    with StageReach(load_stage("prod", environments)) as reach:
        assert reach.model_registry_url() == "http://127.0.0.1:5200"
        assert reach.image_registry_address() == "127.0.0.1:5201"


def test_a_tcp_host_is_reached_at_its_published_address(environments):
    spec = stage_on(environments, "tcp://10.1.2.3:2375",
                    model_registry_port={"bind_address": "0.0.0.0", "public": True})
    with StageReach(spec) as reach:
        assert reach.model_registry_url() == "https://10.1.2.3:5200", "published off loopback: TLS"


def test_a_tcp_host_with_loopback_ports_is_refused_naming_stage_service_and_host(environments):
    spec = stage_on(environments, "tcp://10.1.2.3:2375")
    with StageReach(spec) as reach, pytest.raises(Unreachable) as refused:
        reach.image_registry_address()
    assert str(refused.value).startswith("prod's image registry (Docker host tcp://10.1.2.3:2375) is published on "
                                         "127.0.0.1:5201 of that host, which no other machine reaches")


def test_an_explicit_address_wins(environments):
    spec = stage_on(environments, "tcp://docker.internal:2375", {"address": "192.0.2.7"})
    with StageReach(spec) as reach:
        assert reach.model_registry_url() == "http://192.0.2.7:5200"



@pytest.fixture
def sshd(tmp_path):
    """An sshd on loopback that lets this user in with a throw-away key: the remote host of an ssh:// stage."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(binary) or not shutil.which("ssh"):
        reason = "needs OpenSSH (Debian's openssh-server and openssh-client)"
        if REQUIRE_DOCKER:
            pytest.fail(f"CI installs it: {reason}", pytrace=False)
        pytest.skip(reason)
    for kind, path in (("ed25519", tmp_path / "host_key"), ("ed25519", tmp_path / "user_key")):
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "user_key.pub").read_text())
    port = free_port()
    config = tmp_path / "sshd_config"
    config.write_text(f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {tmp_path / 'host_key'}\n"
                      f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\nPidFile {tmp_path / 'sshd.pid'}\n"
                      "StrictModes no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n"
                      "AllowTcpForwarding yes\nUsePAM no\n")
    os.makedirs("/run/sshd", exist_ok=True)
    server = subprocess.Popen([binary, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
            time.sleep(0.1)
    yield port, tmp_path / "user_key"
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def model_registry_stand_in():
    """An HTTP server on loopback where a remote stage's MLflow would listen."""
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_an_ssh_host_is_reached_through_a_tunnel_that_closes_afterwards(environments, sshd, model_registry_stand_in):
    ssh_port, key = sshd
    user = os.environ.get("USER") or "root"
    spec = stage_on(environments, f"ssh://{user}@127.0.0.1:{ssh_port}",
                    {"ssh_opts": ["-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]},
                    model_registry_port={"host_port": model_registry_stand_in})
    with StageReach(spec) as reach:
        url = reach.model_registry_url()
        assert url.startswith("http://127.0.0.1:") and not url.endswith(f":{model_registry_stand_in}")
        with urllib.request.urlopen(f"{url}/health", timeout=10) as answer:
            assert answer.read() == b"OK"
        assert reach.model_registry_url() == url  # one tunnel per port
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=2)


def test_a_failing_ssh_tunnel_is_one_line_naming_the_stage_and_host(environments, sshd):
    ssh_port, _ = sshd
    spec = stage_on(environments, f"ssh://nobody@127.0.0.1:{ssh_port}",
                    {"ssh_opts": ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                  "-o", "IdentitiesOnly=yes", "-i", "/nonexistent"]})
    with StageReach(spec) as reach, pytest.raises(Unreachable) as refused:
        reach.model_registry_url()
    message = str(refused.value)
    assert message.startswith(f"prod's model registry (Docker host ssh://nobody@127.0.0.1:{ssh_port}): the SSH tunnel "
                              "to port 5200 failed: ")
    assert "\n" not in message
