"""Experiments: specs from settings, names, TTLs, overrides, the `mlops exp` commands and `exp gc` on Docker."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pulumi
import pytest
from pulumi import automation as auto
from pulumi.automation._cmd import CommandResult
from typer.testing import CliRunner

from mlops import orphans, plan
from mlops.commands import experiments as commands
from mlops.experiments import (
    MAX_NAME_LENGTH,
    ExperimentSettings,
    check_name,
    experiment_spec,
    is_expired,
    parse_overrides,
    parse_ttl,
)
from mlops.program import load_stack_spec
from mlops.signing import private_key, public_keys
from mlops_spec.errors import SpecError
from mlops_spec.loading import load_stages
from mlops_spec.project import REPO_ROOT

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
PHYSICAL_TYPES = ("docker:index/container:Container", "docker:index/network:Network",
                  "docker:index/volume:Volume", "docker:index/image:Image")
DOCKER_NAME_LIMIT = 63


def settings(name: str, *assignments: str, ttl: str = "8h", source: str = "dev") -> dict:
    return ExperimentSettings.new(name, "alice@example.com", NOW, ttl, source, list(assignments)).to_config()


def physical_names(resources: list[plan.PlannedResource]) -> set[str]:
    return {str(r.inputs.get("name") or r.inputs.get("imageName")) for r in resources if r.type in PHYSICAL_TYPES}


def host_ports(resources: list[plan.PlannedResource]) -> list[int]:
    return [port["external"] for r in resources for port in r.inputs.get("ports", []) if port.get("external")]


# --- specs, names, TTLs and overrides -------------------------------------------------------------------------

def test_experiments_and_dev_share_no_physical_name_and_experiments_fix_no_host_port():
    dev = plan.render("dev", load_stages(["dev"])[0])
    first = plan.render("exp-first", experiment_spec("exp-first", settings("first")))
    second = plan.render("exp-second", experiment_spec("exp-second", settings("second")))

    names = [physical_names(resources) for resources in (dev, first, second)]
    assert all(names), "every rendering declares physical names"
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    assert host_ports(first) == [] and host_ports(second) == []
    assert sorted(host_ports(dev)) == [5000, 8080]


def test_experiment_labels_carry_name_owner_and_expiry():
    resources = plan.render("exp-first", experiment_spec("exp-first", settings("first")))
    labels_of = lambda resource: {item["label"]: item["value"] for item in resource.inputs["labels"]}  # noqa: E731
    for resource in resources:
        if resource.type in ("docker:index/network:Network", "docker:index/volume:Volume",
                             "docker:index/container:Container"):
            labels = labels_of(resource)
            assert labels["mlops.experiment"] == "first", resource.name
            assert labels["mlops.stage"] == "exp-first", resource.name
    container = next(r for r in resources if r.type == "docker:index/container:Container")
    assert labels_of(container)["mlops.owner"] == "alice@example.com"
    assert labels_of(container)["mlops.expires-at"] == "2026-03-01T20:00:00Z"
    # Volumes and networks carry identity only: the provider replaces them when a label changes.
    network = next(r for r in resources if r.type == "docker:index/network:Network")
    assert not {"mlops.owner", "mlops.expires-at"} & set(labels_of(network))


def test_the_longest_name_the_models_allow_with_most_replicas_keeps_every_physical_name_within_docker_limits():
    """Replica names are `<stack>-<model>-<slot>-<index>`: the longest model's green replicas bound the name."""
    longest = max(load_stages(["dev"])[0].models, key=len)
    name = "x" * (DOCKER_NAME_LIMIT - len(f"exp--{longest}-green-15"))
    assert len(name) < MAX_NAME_LENGTH
    spec = experiment_spec(f"exp-{name}", settings(name, f"models.{longest}.replicas=16",
                                                   f"models.{longest}.green.version=latest"))
    assert spec.models[longest].replicas == 16 and spec.models[longest].green.version == "latest"
    resources = plan.render(f"exp-{name}", spec)
    names = physical_names(resources)
    assert f"exp-{name}-{longest}-green-15" in names
    # Host names on the stage network: the containers that run, and the network. Image names are references,
    # and a volume's or a never-started secrets writer's name (network mode none) names no host.
    host_names = {r.inputs["name"] for r in resources if r.type == "docker:index/network:Network"
                  or (r.type == "docker:index/container:Container" and r.inputs.get("start", True))}
    assert max(map(len, host_names)) == DOCKER_NAME_LIMIT
    with pytest.raises(SpecError, match=f"replica names such as exp-{name}x-{longest}-green-15 would be longer than 63"):
        experiment_spec(f"exp-{name}x", settings(f"{name}x"))


def test_program_loads_an_experiment_stack_from_its_config():
    pulumi.runtime.set_all_config({"mlops:experiment": json.dumps(settings("cfg", "serving.replicas=2"))})
    spec = load_stack_spec("exp-cfg", pulumi.Config("mlops"))
    assert spec.kind == "experiment" and spec.serving.replicas == 2


@pytest.mark.parametrize("text, expected", [
    ("30m", timedelta(minutes=30)), ("8h", timedelta(hours=8)), ("2d", timedelta(days=2)),
    ("1h30m", timedelta(hours=1, minutes=30)), ("10m", timedelta(minutes=10)), ("7d", timedelta(days=7)),
])
def test_ttl_parsing(text, expected):
    assert parse_ttl(text) == expected


@pytest.mark.parametrize("text, message", [
    ("5m", "outside the allowed range of 10m to 7d"), ("8d", "outside the allowed range"),
    ("7d1m", "outside the allowed range"), ("9" * 20 + "d", "outside the allowed range"), ("", "not a duration"), ("1m1h", "not a duration"),
    ("8 hours", "not a duration"), ("-1h", "not a duration"),
])
def test_bad_ttls_are_rejected_clearly(text, message):
    with pytest.raises(SpecError, match=message) as caught:
        parse_ttl(text)
    assert str(caught.value).startswith("--ttl:")


def test_expiry_is_utc_iso8601_and_decides_expired_versus_active():
    info = ExperimentSettings.from_config("exp-t", settings("t", ttl="1h30m")).info()
    assert (info.created_at, info.expires_at) == ("2026-03-01T12:00:00Z", "2026-03-01T13:30:00Z")
    assert not is_expired(info, NOW + timedelta(hours=1, minutes=29))
    assert is_expired(info, NOW + timedelta(hours=1, minutes=30))


@pytest.mark.parametrize("name", ["a", "my-exp-2", "x" * MAX_NAME_LENGTH])
def test_good_names(name):
    check_name(name)


@pytest.mark.parametrize("name", ["", "Upper", "under_score", "-lead", "trail-", "1digit", "dot.ted",
                                  "x" * (MAX_NAME_LENGTH + 1)])
def test_bad_names_are_rejected_clearly(name):
    with pytest.raises(SpecError, match="must be a DNS label of at most 42 characters"):
        check_name(name)


def test_overrides_use_yaml_scalar_semantics_and_apply():
    assert parse_overrides(["serving.replicas=2", "training.limits.cpus=1.5", "training.gpu=true",
                            "models.iris-classifier.release.version=latest", "models.iris-classifier.green=null"]) == {
        "serving.replicas": 2, "training.limits.cpus": 1.5, "training.gpu": True,
        "models.iris-classifier.release.version": "latest", "models.iris-classifier.green": None}
    spec = experiment_spec("exp-o", settings("o", "serving.replicas=2", "training.limits.cpus=1.5",
                                             "models.iris-classifier.replicas=3"))
    assert spec.serving.replicas == 2 and spec.training.limits.cpus == 1.5
    assert {model.name: model.replicas for model in spec.served_models()} == {
        "diabetes-regressor": 2, "iris-classifier": 3}, "a model's own replicas, else serving.replicas"
    assert spec.training.limits.memory_mb == 2048, "siblings of an override keep the source stage's value"


@pytest.mark.parametrize("assignment, message", [
    ("serving.replica=2", "--set serving.replica: unknown key 'replica' under serving; allowed: build, gateway"),
    ("nope=1", "--set nope: unknown key 'nope'; allowed: artifact_store, docker, image_registry"),
    ("models.iris-classifier.replica=2", "--set models.iris-classifier.replica: unknown key 'replica' under "
                                         "models.iris-classifier; allowed: batching, gates, green, limits, release, "
                                         "replicas, sampling, traffic"),
    ("models.iris-classifier.replicas=0", "--set models.iris-classifier.replicas: Input should be greater than or "
                                          "equal to 1"),
    ("models.wine.replicas=2", "--set models.wine.replicas: models.wine: experiment stages build each model's images "
                               "from its project, and models/wine/mlops-model.yaml does not exist"),
    ("serving.replicas=abc", "--set serving.replicas: Input should be a valid integer"),
    ("serving.replicas=0", "--set serving.replicas: Input should be greater than or equal to 1"),
    ("models.iris-classifier.traffic.green=50", "--set models.iris-classifier.traffic.green: "
                                                "models.iris-classifier.traffic: blue (100) + green (50) must add up"),
    ("serving.port.host_port=9000", "--set serving.port.host_port: not settable: experiments let Docker choose"),
    ("experiment.owner=x", "--set experiment.owner: not settable: stage, kind and experiment are set by"),
    ("artifact_store.protect=true", "--set artifact_store.protect: not settable: experiment volumes are never"),
    ("serving..replicas=2", "--set serving..replicas: empty key"),
    ("serving.limits=1", "--set serving.limits: serving.limits is a group of settings; set one of its keys (cpus, memory_mb)"),
    ("serving.replicas.max=1", "--set serving.replicas.max: serving.replicas is a single value"),
    ("serving.replicas=[1, 2]", "--set serving.replicas: '[1, 2]' is not a single value"),
    ("serving.replicas", "--set serving.replicas: expected key.path=value"),
])
def test_bad_overrides_are_rejected_naming_the_set_option(assignment, message):
    with pytest.raises(SpecError) as caught:
        experiment_spec("exp-o", settings("o", assignment))
    assert str(caught.value).startswith(message)


def test_prod_only_rules_do_not_apply_but_the_others_do():
    spec = experiment_spec("exp-p", settings("p", "serving.replicas=1", "training.build=images/training",
                                             "serving.build=images/serving", source="prod"))
    assert spec.serving.replicas == 1 and not spec.artifact_store.protect
    with pytest.raises(SpecError, match=r"\.yaml:\d+: training.build: experiment stages build their workload images"):
        experiment_spec("exp-p", settings("p", source="prod"))
    with pytest.raises(SpecError, match="serving.build: experiment stages build their workload images"):
        experiment_spec("exp-p", settings("p", "serving.build=null"))


def test_settings_from_config_must_match_the_stack():
    with pytest.raises(SpecError, match="names experiment 'a', but the stack is 'exp-b'"):
        experiment_spec("exp-b", settings("a"))
    with pytest.raises(SpecError, match="must be a JSON object with name, owner"):
        experiment_spec("exp-b", {"name": "b"})


# --- the commands, with the Pulumi CLI absent ------------------------------------------------------------------

def run_mlops(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "mlops"), *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=120)


@pytest.fixture
def without_pulumi(tmp_path) -> dict[str, str]:
    """An environment whose PATH has no `pulumi`, and a file backend in a fresh folder."""
    path = os.pathsep.join(folder for folder in os.environ["PATH"].split(os.pathsep)
                           if not (Path(folder) / "pulumi").exists())
    return {**os.environ, "PATH": path, "PULUMI_BACKEND_URL": f"file://{tmp_path / 'state'}",
            "PULUMI_CONFIG_PASSPHRASE": "test"}


@pytest.mark.parametrize("command", [["up", "nocli"], ["list"], ["down", "nocli"]])
def test_commands_without_the_pulumi_cli_print_one_line_and_create_nothing(command, without_pulumi, tmp_path):
    result = run_mlops("exp", *command, env=without_pulumi)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: the Pulumi CLI is not installed (no `pulumi` on PATH); install it with "
        "`curl -fsSL https://get.pulumi.com | sh` (or see https://www.pulumi.com/docs/install/)"]
    assert not (tmp_path / "state").exists()
    assert not (REPO_ROOT / "Pulumi.exp-nocli.yaml").exists()


def test_up_with_bad_input_exits_2_with_one_message_before_looking_for_pulumi(without_pulumi):
    result = run_mlops("exp", "up", "ok", "--set", "serving.replicas=abc", env=without_pulumi)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --set serving.replicas: Input should be a valid integer, unable to parse string as an integer "
        "(got 'abc')"]


def test_gc_without_pulumi_refuses_a_backend_folder_without_state(without_pulumi, tmp_path):
    result = run_mlops("exp", "gc", "--dry-run", env=without_pulumi)
    assert result.returncode == 1
    assert "holds no Pulumi state" in result.stderr and "nothing removed" in result.stderr


def test_stacks_are_read_from_both_file_backend_layouts(tmp_path):
    assert orphans.stacks_in_file_backend(tmp_path, "mlops-stack") is None
    project = tmp_path / ".pulumi" / "stacks" / "mlops-stack"
    project.mkdir(parents=True)
    for file in ("exp-a.json", "exp-b.json.gz", "exp-gone.json.bak", "notes.txt"):
        (project / file).write_text("{}")
    (project.parent / "exp-legacy.json").write_text("{}")
    (project.parent / "other-project").mkdir()
    (project.parent / "other-project" / "exp-elsewhere.json").write_text("{}")
    assert orphans.stacks_in_file_backend(tmp_path, "mlops-stack") == {"exp-a", "exp-b", "exp-legacy"}


@pytest.mark.parametrize("url, folder", [
    ("file:///srv/state", Path("/srv/state")), ("file://~", Path.home()), ("file://~/state", Path.home() / "state"),
    ("file:///srv/state?no_tmp_dir=true", Path("/srv/state")), ("s3://bucket", None), ("https://api.pulumi.com", None),
])
def test_file_backend_folder(url, folder):
    assert orphans.file_backend_dir(url) == folder


# --- the commands through a stand-in for the Automation API (the Pulumi CLI cannot run here) ---------------------

class FakeStack:
    def __init__(self, name: str, workspace: "FakeWorkspace") -> None:
        self.name, self.workspace = name, workspace
        self.config: dict[str, auto.ConfigValue] = {}
        self.outputs_after_up: dict[str, auto.OutputValue] = {}
        self.deployed = False

    def set_config(self, key: str, value: auto.ConfigValue, *, path: bool = False) -> None:
        assert path is False, "the experiment settings are one JSON value, not a config path"
        self.config[key] = value

    def get_all_config(self) -> dict[str, auto.ConfigValue]:
        return dict(self.config)

    def up(self, on_output, on_error):
        # What __main__.py does with this config: fails on anything the program would reject.
        spec = experiment_spec(self.name, json.loads(self.config["mlops:experiment"].value))
        on_output(f"deploying {spec.stage}")
        self.deployed = True
        self.outputs_after_up = {"serving_endpoint": auto.OutputValue("http://127.0.0.1:49153", False),
                                 "model_registry_url": auto.OutputValue("http://127.0.0.1:49154", False),
                                 "network": auto.OutputValue(f"{self.name}-net", False)}
        return SimpleNamespace(outputs=self.outputs_after_up)

    def outputs(self) -> dict[str, auto.OutputValue]:
        return self.outputs_after_up

    def destroy(self, on_output, on_error) -> None:
        self.deployed = False
        self.workspace.destroyed.append(self.name)


class FakeWorkspace:
    def __init__(self) -> None:
        self.stacks: dict[str, FakeStack] = {}
        self.destroyed: list[str] = []

    def list_stacks(self) -> list[auto.StackSummary]:
        return [auto.StackSummary(name=f"organization/mlops-stack/{name}", current=False) for name in self.stacks]

    def remove_stack(self, name: str) -> None:
        del self.stacks[name]

    def get_all_config(self, stack_name: str) -> dict[str, auto.ConfigValue]:
        return self.stacks[stack_name].get_all_config()


@pytest.fixture
def fake_pulumi(monkeypatch, tmp_path) -> FakeWorkspace:
    workspace = FakeWorkspace()

    def create(name, ws):
        ws.stacks[name] = FakeStack(name, ws)
        return ws.stacks[name]

    monkeypatch.setattr(commands, "pulumi_installed", lambda: True)
    monkeypatch.setattr(commands.auto, "LocalWorkspace", lambda **kwargs: workspace)
    monkeypatch.setattr(commands.auto.Stack, "create", staticmethod(create))
    monkeypatch.setattr(commands.auto.Stack, "select", staticmethod(lambda name, ws: ws.stacks[name]))
    monkeypatch.setenv("PULUMI_BACKEND_URL", "s3://experiments")  # not a file backend: nothing written locally
    monkeypatch.setenv("PULUMI_CONFIG_PASSPHRASE", "test")
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setattr(commands.orphans, "find_orphans", lambda existing, host: [])
    monkeypatch.setattr(commands, "set_secret_config",
                        lambda stack, key, value: stack.set_config(key, auto.ConfigValue(value, secret=True)))
    return workspace


def invoke(*args: str):
    return CliRunner().invoke(commands.app, list(args), catch_exceptions=False)


def test_up_stores_settings_and_a_secret_password_deploys_and_prints_endpoints(fake_pulumi):
    result = invoke("up", "demo", "--ttl", "2h", "--set", "serving.replicas=2")
    assert result.exit_code == 0, result.output
    stack = fake_pulumi.stacks["exp-demo"]
    stored = json.loads(stack.config["mlops:experiment"].value)
    assert stored["owner"] == "alice" and stored["source"] == "dev" and stored["ttl"] == "2h"
    assert stored["overrides"] == {"serving.replicas": 2}
    for key in ("mlops:registryPassword", "mlops:mlflowPassword"):
        assert stack.config[key].secret and len(stack.config[key].value) >= 32, key
    assert stack.config["mlops:registryPassword"].value != stack.config["mlops:mlflowPassword"].value
    assert stack.deployed
    assert "serving_endpoint: http://127.0.0.1:49153" in result.output
    assert "network" not in result.output.split("deploying exp-demo")[1]


def test_up_gives_the_experiment_a_signing_key_of_its_own_that_it_alone_trusts_and_keeps_it(fake_pulumi):
    invoke("up", "demo")
    config = fake_pulumi.stacks["exp-demo"].config
    key = config["mlops:modelSigningKey"]
    assert key.secret and not config["mlops:trustedModelKeys"].secret
    [trusted] = public_keys(config["mlops:trustedModelKeys"].value, "trusted")
    assert trusted.public_bytes_raw() == private_key(key.value, "key").public_key().public_bytes_raw()

    invoke("up", "demo", "--set", "serving.replicas=2")
    assert fake_pulumi.stacks["exp-demo"].config["mlops:modelSigningKey"].value == key.value


def test_up_again_keeps_creation_expiry_and_password_unless_a_ttl_is_given(fake_pulumi):
    invoke("up", "demo", "--ttl", "2h")
    stack = fake_pulumi.stacks["exp-demo"]
    first = json.loads(stack.config["mlops:experiment"].value)
    passwords = {key: stack.config[key].value for key in ("mlops:registryPassword", "mlops:mlflowPassword")}

    invoke("up", "demo", "--set", "serving.replicas=2")
    again = json.loads(stack.config["mlops:experiment"].value)
    assert (again["created_at"], again["expires_at"], again["ttl"]) == (first["created_at"], first["expires_at"], "2h")
    assert again["overrides"] == {"serving.replicas": 2}
    assert {key: stack.config[key].value for key in passwords} == passwords

    invoke("up", "demo", "--ttl", "3d")
    extended = json.loads(stack.config["mlops:experiment"].value)
    assert extended["created_at"] == first["created_at"] and extended["expires_at"] > first["expires_at"]


def test_list_down_and_gc_of_expired_experiments(fake_pulumi):
    invoke("up", "fresh")
    invoke("up", "stale", "--ttl", "10m")
    stale = fake_pulumi.stacks["exp-stale"]
    stale.config["mlops:experiment"] = auto.ConfigValue(json.dumps(
        {**json.loads(stale.config["mlops:experiment"].value), "created_at": "2020-01-01T00:00:00Z",
         "expires_at": "2020-01-01T00:10:00Z"}))

    listing = invoke("list")
    assert listing.exit_code == 0
    rows = {line.split("│")[1].strip(): line for line in listing.output.splitlines() if line.count("│") > 2}
    assert "active" in rows["fresh"] and "expired" in rows["stale"] and "alice" in rows["fresh"]

    assert invoke("gc").exit_code == 0
    assert fake_pulumi.destroyed == ["exp-stale"] and set(fake_pulumi.stacks) == {"exp-fresh"}

    assert invoke("down", "fresh").exit_code == 0
    assert fake_pulumi.destroyed == ["exp-stale", "exp-fresh"] and not fake_pulumi.stacks
    missing = invoke("down", "fresh")
    assert missing.exit_code == 1 and "no experiment 'fresh'" in missing.output


def pulumi_failure(message: str) -> auto.errors.CommandError:
    return auto.errors.CommandError(CommandResult(stdout="", stderr=f"error: {message}\n", code=255))


def test_a_stack_that_never_got_its_settings_is_removed_again(fake_pulumi, monkeypatch):
    def refuse(self, key, value, *, path=False):
        raise pulumi_failure("passphrase must be set")

    monkeypatch.setattr(FakeStack, "set_config", refuse)
    result = invoke("up", "demo")
    assert result.exit_code == 1
    assert result.output.strip() == "error: pulumi failed: error: passphrase must be set"
    assert not fake_pulumi.stacks


def test_a_failed_deployment_says_how_to_retry_or_remove(fake_pulumi, monkeypatch):
    def fail(self, on_output, on_error):
        raise pulumi_failure("docker: port is already allocated")

    monkeypatch.setattr(FakeStack, "up", fail)
    result = invoke("up", "demo")
    assert result.exit_code == 1
    assert "deploying exp-demo failed (output above); fix the cause and run `mlops exp up demo` again, or " \
           "remove it with `mlops exp down demo`" in result.output
    assert "exp-demo" in fake_pulumi.stacks, "a partly deployed experiment stays manageable"


def test_up_without_a_passphrase_fails_before_creating_a_stack(fake_pulumi, monkeypatch):
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE")
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE_FILE", raising=False)
    result = invoke("up", "demo")
    assert result.exit_code == 1 and "set PULUMI_CONFIG_PASSPHRASE" in result.output
    assert not fake_pulumi.stacks


TLS_HOST = "docker.url=tcp://dev-host:2376"
TLS_KEYS = ("mlops:dockerCaCert", "mlops:dockerClientCert", "mlops:dockerClientKey")


def dev_stack(workspace: FakeWorkspace, **config: str) -> FakeStack:
    """Stack dev in the backend, with the given config secrets."""
    workspace.stacks["dev"] = FakeStack("dev", workspace)
    workspace.stacks["dev"].config = {key: auto.ConfigValue(value, secret=True) for key, value in config.items()}
    return workspace.stacks["dev"]


def dev_tls(version: str) -> dict[str, str]:
    return {key: f"-----BEGIN {key} {version}-----" for key in TLS_KEYS}


def test_up_on_a_tls_host_copies_the_client_certificates_of_the_stage_it_starts_from(fake_pulumi):
    dev_stack(fake_pulumi, **dev_tls("first"), **{"mlops:registryPassword": "dev-password"})
    result = invoke("up", "demo", "--set", TLS_HOST)
    assert result.exit_code == 0, result.output
    stack = fake_pulumi.stacks["exp-demo"]
    assert {key: (stack.config[key].value, stack.config[key].secret) for key in TLS_KEYS} == {
        key: (value, True) for key, value in dev_tls("first").items()}
    assert stack.config["mlops:registryPassword"].value != "dev-password", "the experiment's own secrets stay its own"
    assert stack.deployed

    dev_stack(fake_pulumi, **dev_tls("renewed"))
    assert invoke("up", "demo", "--set", TLS_HOST).exit_code == 0
    assert {key: stack.config[key].value for key in TLS_KEYS} == dev_tls("renewed"), "renewed certificates follow"


@pytest.mark.parametrize("assignments", [[], ["--set", "docker.url=tcp://dev-host:2375", "--set", "docker.insecure=true"]],
                         ids=["unix", "insecure-tcp"])
def test_up_on_a_host_without_tls_copies_no_certificate(fake_pulumi, assignments):
    dev_stack(fake_pulumi, **dev_tls("first"))
    result = invoke("up", "demo", *assignments)
    assert result.exit_code == 0, result.output
    assert not set(TLS_KEYS) & set(fake_pulumi.stacks["exp-demo"].config)


@pytest.mark.parametrize("dev_config, missing, create", [
    ({"mlops:dockerCaCert": "-----BEGIN CA-----", "mlops:dockerClientKey": " "},
     ("dockerClientCert", "dockerClientKey"), ""),
    (None, ("dockerCaCert", "dockerClientCert", "dockerClientKey"), "pulumi stack init dev; "),
], ids=["incomplete", "no-dev-stack"])
def test_up_on_a_tls_host_whose_source_stack_lacks_certificates_says_what_to_set_and_creates_no_stack(
        fake_pulumi, dev_config, missing, create):
    if dev_config is not None:
        dev_stack(fake_pulumi, **dev_config)
    result = invoke("up", "demo", "--set", TLS_HOST)
    assert result.exit_code == 1
    files = {"dockerCaCert": "ca.pem", "dockerClientCert": "cert.pem", "dockerClientKey": "key.pem"}
    commands = "; ".join(f"pulumi config set --secret mlops:{key} -s dev < {files[key]}" for key in missing)
    assert result.output.splitlines() == [
        f"error: exp-demo reaches its Docker host tcp://dev-host:2376 over TLS with the client certificates of stack "
        f"dev, which lacks {', '.join(missing)}: {create}{commands} (docs/hosts-and-clusters.md)"]
    assert "exp-demo" not in fake_pulumi.stacks


# --- `exp gc` on a real Docker engine --------------------------------------------------------------------------

def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.docker
def test_gc_removes_exactly_the_leftovers_of_vanished_experiments(docker_engine, tmp_path):
    prefix = f"t-exp-{uuid.uuid4().hex[:8]}"
    gone, alive = f"{prefix}-gone", f"{prefix}-alive"
    label_sets = {
        "gone": {"mlops.experiment": gone, "mlops.stage": f"exp-{gone}"},
        "alive": {"mlops.experiment": alive, "mlops.stage": f"exp-{alive}"},
        "unlabelled": {},
        "outsider": {"mlops.experiment": f"t-other-{uuid.uuid4().hex[:8]}"},  # orphaned, but not under --only
        **{stage: {"mlops.stage": stage, "mlops.experiment": gone} for stage in ("dev", "staging", "prod")},
    }
    created: list[tuple[str, str]] = []
    try:
        for key, labels in label_sets.items():
            flags = [flag for label, value in labels.items() for flag in ("--label", f"{label}={value}")]
            name = f"{prefix}-{key}"
            docker("network", "create", *flags, name)
            created.append(("network", name))
            docker("volume", "create", *flags, name)
            created.append(("volume", name))
            docker("container", "run", "--detach", "--name", name, "--network", name, "--volume", f"{name}:/data",
                   *flags, "mlops-base:bookworm", "sleep", "300")
            created.append(("container", name))
        # A file backend in which only the `alive` experiment's stack exists.
        stacks = tmp_path / ".pulumi" / "stacks" / "mlops-stack"
        stacks.mkdir(parents=True)
        (stacks / f"exp-{alive}.json").write_text("{}")

        env = {**os.environ, "PULUMI_BACKEND_URL": f"file://{tmp_path}", "PULUMI_CONFIG_PASSPHRASE": "test",
               "PATH": os.pathsep.join(folder for folder in os.environ["PATH"].split(os.pathsep)
                                       if not (Path(folder) / "pulumi").exists())}
        # --only keeps the test to its own resources: other experiments on this engine are not its to remove.
        result = run_mlops("exp", "gc", "--only", prefix, env=env)
        assert result.returncode == 0, result.stderr

        def exists(kind: str, name: str) -> bool:
            return subprocess.run(["docker", kind, "inspect", name], capture_output=True).returncode == 0

        remaining = {(kind, name) for kind, name in created if exists(kind, name)}
        removed = {(kind, f"{prefix}-gone") for kind in ("container", "network", "volume")}
        assert remaining == set(created) - removed
        assert f"container {prefix}-gone of vanished experiment {gone}" in result.stdout
    finally:
        for kind, name in reversed(created):
            subprocess.run(["docker", kind, "rm", *(["--force"] if kind == "container" else []), name],
                           capture_output=True)
