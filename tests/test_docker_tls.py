"""A tcp:// Docker host is reached over TLS unless a dev stage says `insecure`: the provider gets the stack's client
material as secrets, the `docker` CLI gets docker's DOCKER_TLS_VERIFY and DOCKER_CERT_PATH, and what is missing or
not allowed is one line."""
from __future__ import annotations

import json
import runpy
import stat
import sys
import textwrap
from pathlib import Path

import pulumi
import pytest

from components.docker_tls import ClientTls
from components.engine_facts import DockerCli
from mlops import plan
from mlops_spec import loading
from mlops_spec.contract import DOCKER_TLS_KEYS, TRUSTED_MODEL_KEYS
from mlops_spec.errors import SpecError
from mlops_spec.loading import load_stages
from mlops_spec.models import DockerHost
from mlops_spec.project import REPO_ROOT

PROVIDER = "pulumi:providers:docker"
MATERIAL = {"mlops:dockerCaCert": "-----BEGIN CERTIFICATE-----\nthe CA\n-----END CERTIFICATE-----\n",
            "mlops:dockerClientCert": "-----BEGIN CERTIFICATE-----\nthe client\n-----END CERTIFICATE-----\n",
            "mlops:dockerClientKey": "-----BEGIN PRIVATE KEY-----\nthe key\n-----END PRIVATE KEY-----\n"}
PROVIDER_INPUTS = {"caMaterial": "mlops:dockerCaCert", "certMaterial": "mlops:dockerClientCert",
                   "keyMaterial": "mlops:dockerClientKey"}


def set_docker(environments: Path, stage: str, lines: str) -> int:
    """Appends a `docker:` block to the stage file; returns the line of its last entry."""
    file = environments / f"{stage}.yaml"
    file.write_text(file.read_text() + "docker:\n" + textwrap.indent(lines, "  "))
    return len(file.read_text().splitlines())


def provider(stage: str, environments: Path, config: dict[str, str], reveal_secrets: bool = False) -> dict:
    spec = load_stages([stage], environments)[0]
    [declared] = [r for r in plan.render(stage, spec, config=config, reveal_secrets=reveal_secrets) if r.type == PROVIDER]
    return declared.inputs


def test_a_tls_hosts_provider_gets_the_stacks_client_material_as_secrets(released_environments):
    set_docker(released_environments, "prod", "url: tcp://10.0.0.20:2376\n")
    shown = provider("prod", released_environments, MATERIAL)
    assert shown["host"] == "tcp://10.0.0.20:2376"
    assert {name: shown[name] for name in PROVIDER_INPUTS} == {name: plan.SECRET_PLACEHOLDER for name in PROVIDER_INPUTS}
    assert not any(pem in json.dumps(shown) for pem in MATERIAL.values())
    revealed = provider("prod", released_environments, MATERIAL, reveal_secrets=True)
    assert {name: revealed[name] for name in PROVIDER_INPUTS} == {name: MATERIAL[key] for name, key in PROVIDER_INPUTS.items()}


@pytest.mark.parametrize("docker", ["url: tcp://10.0.0.30:2375\ninsecure: true\n", "url: ssh://ops@10.0.0.30\n", ""])
def test_a_host_reached_without_tls_gets_no_material(environments, docker):
    if docker:
        set_docker(environments, "dev", docker)
    inputs = provider("dev", environments, MATERIAL, reveal_secrets=True)
    assert not set(PROVIDER_INPUTS) & set(inputs)
    assert "certPath" not in inputs


@pytest.mark.parametrize("stage", ["staging", "prod"])
def test_staging_and_prod_may_not_be_insecure(environments, stage):
    line = set_docker(environments, stage, "url: tcp://10.0.0.30:2375\ninsecure: true\n")
    with pytest.raises(SpecError) as raised:
        load_stages([stage], environments)
    assert str(raised.value) == (f"{environments / stage}.yaml:{line}: docker.insecure: {stage} stages reach their "
                                 "Docker host over TLS only: remove insecure and set up TLS on the host "
                                 "(docs/hosts-and-clusters.md)")


@pytest.mark.parametrize("url", ["ssh://ops@10.0.0.30", "unix:///var/run/docker.sock"])
def test_only_a_tcp_host_may_be_insecure(environments, url):
    line = set_docker(environments, "dev", f"url: {url}\ninsecure: true\n")
    with pytest.raises(SpecError, match=rf"dev.yaml:{line}: docker.insecure: only a tcp:// host may be insecure; "
                                        rf"'{url}' has no TLS to turn off"):
        load_stages(["dev"], environments)


@pytest.mark.parametrize("missing", [DOCKER_TLS_KEYS, DOCKER_TLS_KEYS[2:]])
def test_a_tls_stack_without_its_material_is_one_line_naming_the_keys_to_set(released_environments, monkeypatch,
                                                                              missing):
    set_docker(released_environments, "prod", "url: tcp://10.0.0.20:2376\n")
    # The entry point reads the shipped environments/; point its default at the edited copy.
    monkeypatch.setattr(loading.load_stages, "__defaults__", (released_environments,))
    plan.mock_runtime("prod")
    config = {key: value for key, value in {**plan.PLAN_SECRETS, **MATERIAL}.items()
              if key.removeprefix("mlops:") not in missing}
    pulumi.runtime.set_all_config({**config, f"mlops:{TRUSTED_MODEL_KEYS}": plan.PLAN_TRUSTED_MODEL_KEYS},
                                  secret_keys=list(config))
    with pytest.raises(pulumi.RunError) as raised:
        runpy.run_path(str(REPO_ROOT / "__main__.py"))
    commands = "; ".join(f"pulumi config set --secret mlops:{key} -s prod < {file}"
                         for key, file in zip(DOCKER_TLS_KEYS, ("ca.pem", "cert.pem", "key.pem")) if key in missing)
    assert str(raised.value) == (f"Pulumi.prod.yaml: mlops:{missing[0]}: stack prod reaches its Docker host "
                                 f"tcp://10.0.0.20:2376 over TLS and its config lacks {', '.join(missing)}: {commands} "
                                 "(docs/hosts-and-clusters.md)")


def test_the_programs_docker_cli_reaches_a_tls_host_with_the_stacks_material_in_a_private_folder(tmp_path, monkeypatch):
    seen = tmp_path / "seen.json"
    script = tmp_path / "bin" / "docker"
    script.parent.mkdir()
    # Records what the CLI is given: its host and TLS variables, and each file of DOCKER_CERT_PATH with its mode.
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""
        import json, os, pathlib, stat
        folder = pathlib.Path(os.environ["DOCKER_CERT_PATH"])
        files = {{path.name: [path.read_text(), oct(stat.S_IMODE(path.stat().st_mode))] for path in folder.iterdir()}}
        pathlib.Path({str(seen)!r}).write_text(json.dumps({{
            "host": os.environ["DOCKER_HOST"], "verify": os.environ.get("DOCKER_TLS_VERIFY"), "folder": str(folder),
            "folder_mode": oct(stat.S_IMODE(folder.stat().st_mode)), "files": files}}))
        print("true")
        """))
    script.chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", str(script.parent))
    monkeypatch.setenv("DOCKER_CERT_PATH", str(tmp_path / "the-operators-own-certs"))
    tls = ClientTls(ca_cert="CA PEM", client_cert="CERT PEM", client_key="KEY PEM")
    assert DockerCli("prod", DockerHost(url="tcp://10.0.0.20:2376"), tls).limits_swap() is True
    called = json.loads(seen.read_text())
    assert (called["host"], called["verify"], called["folder_mode"]) == ("tcp://10.0.0.20:2376", "1", "0o700")
    assert called["files"] == {"ca.pem": ["CA PEM", "0o600"], "cert.pem": ["CERT PEM", "0o600"],
                               "key.pem": ["KEY PEM", "0o600"]}
    assert not Path(called["folder"]).exists(), "the key must not outlive the command"
    assert "KEY PEM" not in repr(tls)


def test_the_docker_cli_environment_speaks_tls_to_tcp_hosts_unless_insecure():
    operator = {"PATH": "/usr/bin", "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": "/home/op/.docker/prod"}
    assert DockerHost(url="tcp://10.0.0.20:2376").cli_environment(environ=operator) == {
        **operator, "DOCKER_HOST": "tcp://10.0.0.20:2376"}
    assert DockerHost(url="tcp://10.0.0.20:2376").cli_environment(environ={"PATH": "/usr/bin"}) == {
        "PATH": "/usr/bin", "DOCKER_HOST": "tcp://10.0.0.20:2376", "DOCKER_TLS_VERIFY": "1"}, "docker's default ~/.docker"
    for plain in (DockerHost(url="tcp://10.0.0.30:2375", insecure=True), DockerHost(url="ssh://op@host"), DockerHost()):
        assert plain.cli_environment(environ=operator) == {"PATH": "/usr/bin", "DOCKER_HOST": plain.url}
