"""No secret on a command line: every local user reads other processes' arguments (`ps`, /proc/*/cmdline).

`make stack-secrets` (what `make up` and the idempotence workflow store their stacks' secrets with) and
`mlops exp up` (with the TLS client certificates it copies from stack dev) run against a stand-in `pulumi` on PATH
that records its arguments and stdin and keeps the config it is given, while the test reads every process's command
line as they run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from components.docker_tls import CERT_FILES
from mlops.signing import private_key, public_pem
from mlops_spec.project import REPO_ROOT

# A stand-in Pulumi CLI: answers what `make stack-secrets` and the Automation API ask, keeps each stack's config in
# $FAKE_PULUMI_DIR/config.STACK.json (the stacks it lists) and appends every call ({"argv", "stdin"}) to
# $FAKE_PULUMI_DIR/calls.jsonl. Each call lives a little while, so the test's sampling of /proc sees every one.
FAKE_PULUMI = '''#!{python}
import json, os, sys, time
from pathlib import Path

folder = Path(os.environ["FAKE_PULUMI_DIR"])
args = sys.argv[1:]
TAKES_VALUE = {{"--stack", "-s", "--cwd", "-C", "--config-file", "--event-log", "--exec-kind", "--client"}}
positional, option, stack = [], None, None
for arg in args:
    if option is not None:
        stack = arg if option in ("--stack", "-s") else stack
        option = None
    elif arg in TAKES_VALUE:
        option = arg
    elif not arg.startswith("-"):
        positional.append(arg)
config_file = folder / f"config.{{stack}}.json"
config = json.loads(config_file.read_text()) if config_file.exists() else {{}}
stdin = ""
if positional[:2] == ["config", "set"] and len(positional) == 3:
    stdin = sys.stdin.read().removesuffix("\\n")
with open(folder / "calls.jsonl", "a") as calls:
    calls.write(json.dumps({{"argv": args, "stdin": stdin}}) + "\\n")
time.sleep(0.3)
if positional[:1] == ["version"]:
    print("v3.272.0")
elif positional[:2] == ["config", "set"]:
    key = positional[2]
    value = positional[3] if len(positional) > 3 else stdin
    config[key] = {{"value": value, "secret": "--secret" in args}}
    config_file.write_text(json.dumps(config))
elif positional[:2] == ["config", "get"]:
    if positional[2] not in config:
        sys.exit(1)
    print(config[positional[2]]["value"])
elif positional == ["config"]:
    print(json.dumps(config))
elif positional[:2] == ["stack", "ls"]:
    print(json.dumps([{{"name": file.name.split(".")[1], "current": False}} for file in folder.glob("config.*.json")]))
elif positional[:2] == ["stack", "output"]:
    print("{{}}")
elif positional[:2] == ["stack", "history"]:
    print(json.dumps([{{"kind": "update", "startTime": "2026-01-01T00:00:00.000Z", "message": "", "environment": {{}},
                       "config": {{}}, "result": "succeeded", "endTime": "2026-01-01T00:00:01.000Z"}}]))
'''


@dataclass
class Run:
    secrets: list[str]
    """The values the stand-in stored as secrets."""
    calls: list[dict]
    command_lines: set[str]
    """Every command line seen in /proc while the command ran."""


def command_lines() -> set[str]:
    seen = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            seen.add(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # the process ended meanwhile
            pass
    return seen


def with_stand_in_pulumi(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """This process's environment and `env`, with the stand-in pulumi first on PATH, keeping its files in tmp_path."""
    fake = tmp_path / "bin" / "pulumi"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(FAKE_PULUMI.format(python=sys.executable))
    fake.chmod(0o755)
    return {**os.environ, **env, "FAKE_PULUMI_DIR": str(tmp_path), "PATH": f"{fake.parent}:{os.environ['PATH']}"}


def run_watched(command: list[str], tmp_path: Path, env: dict[str, str], stack: str) -> Run:
    """Run `command` with the stand-in pulumi first on PATH, reading every process's command line meanwhile; the
    secrets are those the stand-in keeps for `stack`."""
    env = with_stand_in_pulumi(tmp_path, env)
    seen: set[str] = set()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.update(command_lines())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        ran = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        done.set()
        sampler.join()
    assert ran.returncode == 0, ran.stdout + ran.stderr
    config = json.loads((tmp_path / f"config.{stack}.json").read_text())
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    return Run([entry["value"] for entry in config.values() if entry["secret"]], calls, seen)


def assert_no_secret_in_any_argv(run: Run, keys: tuple[str, ...]) -> None:
    assert len(run.secrets) == len(keys) and all(len(secret) >= 24 for secret in run.secrets)
    assert [call["stdin"] for call in run.calls if call["stdin"] and "--secret" in call["argv"]] == run.secrets, \
        "each secret went in on stdin"
    stored = [line for line in run.command_lines if "config set" in line and "--secret" in line]
    assert len(stored) >= len(keys), "the sampling saw pulumi storing each secret"
    for secret in run.secrets:
        assert not [line for line in run.command_lines if secret in line]
        assert not [call["argv"] for call in run.calls if any(secret in arg for arg in call["argv"])]


def stored_config(tmp_path: Path, stack: str) -> dict[str, dict]:
    return json.loads((tmp_path / f"config.{stack}.json").read_text())


def test_make_stores_the_stack_secrets_without_putting_them_on_a_command_line(tmp_path):
    make = ["make", "--no-print-directory", "stack-secrets", "ENV=dev"]
    run = run_watched(make, tmp_path, {}, "dev")
    assert_no_secret_in_any_argv(run, ("mlops:registryPassword", "mlops:mlflowPassword", "mlops:modelSigningKey"))
    again = run_watched(make, tmp_path, {}, "dev")
    assert again.secrets == run.secrets, "a stack's secrets are made once"


def test_make_gives_a_training_stage_a_signing_key_and_its_whole_chain_trust_in_its_public_half(tmp_path):
    make = ["make", "--no-print-directory", "stack-secrets"]
    run_watched([*make, "ENV=dev"], tmp_path, {}, "dev")
    prod = run_watched([*make, "ENV=prod"], tmp_path, {}, "prod")
    dev_config, prod_config = stored_config(tmp_path, "dev"), stored_config(tmp_path, "prod")
    signing_key = private_key(dev_config["mlops:modelSigningKey"]["value"], "dev's signing key")
    assert dev_config["mlops:trustedModelKeys"] == {"value": public_pem(signing_key).strip(), "secret": False}
    assert "mlops:modelSigningKey" not in prod_config, "prod trains nothing, so it holds no signing key"
    assert prod_config["mlops:trustedModelKeys"] == dev_config["mlops:trustedModelKeys"]
    read_key = dev_config["mlops:modelSigningKey"]["value"].splitlines()[1]
    for secret in (*prod.secrets, read_key):
        assert not [line for line in prod.command_lines if secret in line], "prod read dev's key on stdin only"


TLS_FILES = {f"mlops:{key}": name for key, name in CERT_FILES.items()}
"""Each of a TLS host's config secrets and its file, as the program names them: the Makefile must agree."""


def certificate_folder(folder: Path, files: tuple[str, ...] = tuple(TLS_FILES.values())) -> dict[str, str]:
    """DOCKER_CERT_PATH's layout with stand-in PEM texts; returns each file's text."""
    folder.mkdir()
    texts = {name: f"-----BEGIN {name}-----\nMIIBszCCAVmgAwIBAgIU{name}\n-----END {name}-----" for name in files}
    for name, text in texts.items():
        (folder / name).write_text(text + "\n")
    return texts


def test_make_stores_a_tls_hosts_client_certificate_from_its_folder_without_putting_it_on_a_command_line(tmp_path):
    texts = certificate_folder(tmp_path / "certs")
    make = ["make", "--no-print-directory", "docker-tls-secrets", "ENV=cluster", f"CERTS={tmp_path / 'certs'}"]
    run = run_watched(make, tmp_path, {}, "cluster")
    assert_no_secret_in_any_argv(run, tuple(TLS_FILES))
    assert stored_config(tmp_path, "cluster") == {key: {"value": texts[name], "secret": True}
                                                   for key, name in TLS_FILES.items()}


@pytest.mark.parametrize("files, certs, said", [
    (("ca.pem", "cert.pem"), "certs", "{certs}/key.pem: missing or unreadable; CERTS holds ca.pem, cert.pem and key.pem"),
    ((), "", "make docker-tls-secrets ENV=cluster CERTS=FOLDER: FOLDER holds the client certificate (ca.pem, cert.pem, "
             "key.pem)")])
def test_make_refuses_an_incomplete_certificate_folder_in_one_line_and_stores_nothing(tmp_path, files, certs, said):
    certificate_folder(tmp_path / "certs", files)
    folder = str(tmp_path / certs) if certs else ""
    ran = subprocess.run(["make", "--no-print-directory", "docker-tls-secrets", "ENV=cluster", f"CERTS={folder}"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=with_stand_in_pulumi(tmp_path, {}))
    assert ran.returncode == 2 and ran.stdout.splitlines() == [said.format(certs=folder)], ran.stdout + ran.stderr
    assert not (tmp_path / "calls.jsonl").exists(), "pulumi was never called"


EXP_UP = [sys.executable, "-m", "mlops", "exp", "up", "argv"]
EXP_ENV = {"PULUMI_BACKEND_URL": "s3://experiments", "PULUMI_CONFIG_PASSPHRASE": "test", "USER": "alice"}


def test_exp_up_stores_the_experiment_secrets_without_putting_them_on_a_command_line(tmp_path):
    run = run_watched(EXP_UP, tmp_path, EXP_ENV, "exp-argv")
    assert_no_secret_in_any_argv(run, ("mlops:registryPassword", "mlops:mlflowPassword", "mlops:modelSigningKey"))
    assert any("up" in call["argv"] for call in run.calls), "the experiment was deployed"


def test_exp_up_on_a_tls_host_copies_the_client_certificates_without_putting_them_on_a_command_line(tmp_path):
    tls = {f"mlops:{key}": f"-----BEGIN {key.upper()}-----\nMIIBszCCAVmgAwIBAgIU{key}\n-----END-----"
           for key in ("dockerCaCert", "dockerClientCert", "dockerClientKey")}
    (tmp_path / "config.dev.json").write_text(json.dumps({key: {"value": value, "secret": True}
                                                          for key, value in tls.items()}))
    run = run_watched([*EXP_UP, "--set", "docker.url=tcp://dev-host:2376"], tmp_path, EXP_ENV, "exp-argv")
    assert_no_secret_in_any_argv(run, ("mlops:registryPassword", "mlops:mlflowPassword", *tls, "mlops:modelSigningKey"))
    assert run.secrets[2:5] == list(tls.values()), "the experiment holds stack dev's client certificates"
