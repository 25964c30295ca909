"""A stage file is data from a pull request: nothing in it may reach a process as an option or a command."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.test_spec_errors import append, replace, run_cli

PROXY_COMMAND = "-oProxyCommand=sh -c 'touch {marker}'"


def ssh_stage(environments, *, url: str = "ssh://deploy@127.0.0.1:2222", opts: list[str]) -> None:
    quoted = ", ".join(f'"{opt}"' for opt in opts)
    append(environments / "dev.yaml", f"docker:\n  url: {url}\n  ssh_opts: [{quoted}]\n")


@pytest.mark.parametrize("command", [["validate", "dev"], ["status", "dev"], ["drift", "--stage", "dev"],
                                     ["data", "fresh", "--stage", "dev", "--serving", "dev"], ["plan", "dev"]])
def test_a_proxy_command_in_a_stage_file_is_refused_before_anything_runs(environments, tmp_path, command):
    marker = tmp_path / "ran"
    ssh_stage(environments, opts=[PROXY_COMMAND.format(marker=marker)])
    result = subprocess.run([sys.executable, "-m", "mlops", *command, "--environments", str(environments)],
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "dev.yaml:19: docker.ssh_opts: ssh option 'ProxyCommand' is not allowed in a stage file; allowed: " \
           "-i FILE, -p PORT, -l USER" in result.stderr
    assert not marker.exists()


REFUSED = {
    "LocalCommand": (["-o", "PermitLocalCommand=yes", "-o", "LocalCommand=id"],
                     "ssh option 'PermitLocalCommand' is not allowed in a stage file"),
    "a config file": (["-F", "/tmp/evil_config"], "ssh option '-F' is not allowed in a stage file"),
    "an option as a value": (["-i", "-oProxyCommand=id"], "'-oProxyCommand=id' is no value for ssh option "
                                                          "IdentityFile"),
    "a space in a value": (["-o", "IdentityFile=/k -oProxyCommand=id"], "'/k -oProxyCommand=id' is no value for "
                                                                       "ssh option IdentityFile"),
    "KnownHostsCommand": (["-oKnownHostsCommand=id"], "ssh option 'KnownHostsCommand' is not allowed"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_only_connection_options_pass(environments, monkeypatch, capsys, case):
    opts, expected = REFUSED[case]
    ssh_stage(environments, opts=opts)
    code, out, err = run_cli(monkeypatch, capsys, "validate", "dev", "--environments", str(environments))
    assert (code, out) == (2, "")
    assert expected in err, err


def test_connection_options_are_kept(environments):
    from mlops_spec.loading import load_stage

    opts = ["-i", "/home/ci/.ssh/id_ed25519", "-o", "StrictHostKeyChecking=yes", "-oUserKnownHostsFile=~/.ssh/kh",
            "-p", "2222", "-4", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15"]
    ssh_stage(environments, opts=opts)
    assert load_stage("dev", environments).docker.ssh_opts == opts


@pytest.mark.parametrize("url", ["ssh://-oProxyCommand=id", "ssh://-oProxyCommand=id@host", "ssh://a:secret@host",
                                 "tcp://host:2376/-H"])
def test_a_docker_url_is_only_user_host_and_port(environments, monkeypatch, capsys, url):
    ssh_stage(environments, url=url, opts=[])
    code, out, err = run_cli(monkeypatch, capsys, "validate", "dev", "--environments", str(environments))
    assert (code, out) == (2, "")
    assert "dev.yaml:18: docker.url: " in err, err


@pytest.mark.parametrize("declared,where", [
    ("models:\n  iris-classifier:\n    release: {version: latest}\n    green:\n      version: latest\n"
     "      serving_image: --privileged", "17: models.iris-classifier.green.serving_image"),
    ("serving:\n  build: images/serving\n  gateway:\n    image: {ref: -v/:/host}", "10: serving.gateway.image.ref"),
    ("training:\n  build: images/training\n  base_image: -v/:/host", "6: training.base_image")])
def test_an_image_reference_is_never_an_option(environments, monkeypatch, capsys, declared, where):
    section = declared.split(":")[0]
    replace(environments / "dev.yaml", "models:\n  iris-classifier:\n    release: {version: latest}"
            if section == "models" else f"{section}:\n  build: images/{section}", declared)
    code, out, err = run_cli(monkeypatch, capsys, "validate", "dev", "--environments", str(environments))
    assert (code, out) == (2, "")
    assert f"dev.yaml:{where}: " in err and "is no image reference" in err, err
