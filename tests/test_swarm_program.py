"""A swarm stage under the mock runtime: services instead of containers, safe rolling updates, secrets as
files, stateful parts on their node, the gateway on the edge nodes, Prometheus finding the tasks through
Swarm's DNS, training as a one-shot job, and the one-line errors of the `swarm` key."""
from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from components import runtimes
from components.model_registry import mlflow_password_hashes
from components.runtimes import service_job_arguments
from components.training_environment import training_run
from components.workload import HttpHealth, http_probe
from mlops import plan
from mlops.commands import swarm_training
from mlops.diff import compare
from mlops_spec.contract import READER, derived_password
from mlops_spec.loading import load_stage
from mlops_spec.project import REPO_ROOT
from mlops_spec.service_tls import ca_certificate, server_tls
from tests.test_spec_errors import replace, run_cli

SERVICE = "docker:index/service:Service"
SECRET = "docker:index/secret:Secret"
MODEL = "iris-classifier"
OTHER_MODEL = "diabetes-regressor"
"""cluster.yaml serves both shipped models; the tests pin and split the first."""
BLUE, GREEN = "cluster-serving-iris-classifier-blue", "cluster-serving-iris-classifier-green"
PINNED = {"models": {MODEL: {"release": {"version": 3, "sha256": "a" * 64}}}}
CANARY = {"models": {MODEL: {"release": {"version": 3, "sha256": "a" * 64}, "green": {"version": 4, "sha256": "c" * 64},
                             "traffic": {"blue": 90, "green": 10}}}}
SECRETS = {"mlops:registryPassword": "swarm-registry-password-0123", "mlops:mlflowPassword": "swarm-mlflow-secret-0123"}


def render(overrides=None, config=None, reveal_secrets=False) -> dict[str, plan.PlannedResource]:
    spec = load_stage("cluster", overrides=PINNED if overrides is None else overrides)
    return {r.name: r for r in plan.render("cluster", spec, config=config, reveal_secrets=reveal_secrets)}


@pytest.fixture(scope="module")
def cluster() -> dict[str, plan.PlannedResource]:
    return render()


def flat(resource: plan.PlannedResource) -> dict:
    return plan.flatten(resource.inputs)


def test_a_swarm_stage_runs_every_long_lived_part_as_a_service_on_an_attachable_overlay(cluster):
    counts = Counter(resource.type for resource in cluster.values())
    assert counts["docker:index/container:Container"] == 0
    assert sorted(name for name, r in cluster.items() if r.type == SERVICE) == [
        "cluster-image-registry-server", "cluster-model-registry-server", "cluster-monitoring-prometheus",
        "cluster-serving-diabetes-regressor-blue", "cluster-serving-gateway", BLUE]
    names = {r.inputs["name"] for r in cluster.values() if r.type == SERVICE}
    assert {"cluster-iris-classifier-blue", "cluster-diabetes-regressor-blue"} <= names, "one service per model and slot"
    network = cluster["cluster-network"].inputs
    assert (network["driver"], network["attachable"], network["name"]) == ("overlay", True, "cluster-net")
    for name, resource in cluster.items():
        if resource.type == SERVICE:
            assert resource.inputs["name"].startswith("cluster-")
            assert resource.inputs["endpointSpec"]["mode"] == "dnsrr", name
            # By ID, as the provider reads it back; a name would replace the service on every `pulumi up`.
            assert resource.inputs["taskSpec"]["networksAdvanceds"] == [{"id": "cluster-network-id"}]


def test_shipped_stages_stay_single_host():
    for stage in ("dev", "staging", "prod"):
        spec = load_stage(stage)
        assert spec.swarm is None
        assert not [r for r in plan.render(stage, spec) if r.type in (SERVICE, SECRET)]


def test_serving_replicas_are_spread_limited_reserved_health_checked_and_hardened(cluster):
    spec = load_stage("cluster", overrides=PINNED)
    blue = cluster[BLUE].inputs
    task = blue["taskSpec"]
    assert blue["mode"] == {"replicated": {"replicas": spec.serving.replicas}}
    assert task["placement"] == {"constraints": ["node.role != manager"], "prefs": ["node.hostname"],
                                 "platforms": [{"architecture": "amd64", "os": "linux"}]}
    assert task["resources"] == {
        "limits": {"nanoCpus": 1_000_000_000, "memoryBytes": 512 * runtimes.MIB},
        "reservation": {"nanoCpus": 250_000_000, "memoryBytes": 256 * runtimes.MIB}}
    container = task["containerSpec"]
    assert (container["user"], container["readOnly"], container["capDrops"]) == ("10001:10001", True, ["ALL"])
    single_host = http_probe(HttpHealth(8080, "/v2/health/ready", spec.serving.health_check))
    assert container["healthcheck"]["tests"] == single_host
    assert container["healthcheck"]["retries"] == spec.serving.health_check.retries
    assert {mount["target"]: mount["type"] for mount in container["mounts"]} == {"/tmp": "tmpfs"}
    env = container["env"]
    assert (env["MODEL_VERSION"], env["MODEL_SHA256"]) == ("3", "a" * 64)
    assert env["MLFLOW_TRACKING_URI"] == "https://cluster-model-registry:5000", "MLflow is published off loopback"
    assert env["MLOPS_MLFLOW_CA_CERTIFICATE"].startswith("-----BEGIN CERTIFICATE-----")
    # The pin shows on the service, whose labels update in place; container labels are ForceNew.
    assert {"label": "mlops.model-version", "value": "3"} in blue["labels"]
    assert {label["label"] for label in container["labels"]} == {"mlops.component", "mlops.slot", "mlops.stack",
                                                                 "mlops.stage"}


def test_rolling_updates_go_one_at_a_time_start_first_and_roll_back_on_any_failure(cluster):
    spec = load_stage("cluster", overrides=PINNED)
    check = spec.serving.health_check
    blue = cluster[BLUE].inputs
    window = runtimes.swarm_duration((check.retries + 1) * (check.interval_s + check.timeout_s))
    assert blue["updateConfig"] == {"parallelism": 1, "delay": "0s", "order": "start-first",
                                    "failureAction": "rollback", "monitor": window, "maxFailureRatio": "0.0"}
    # The rollback returns to the spec that ran before and finishes whatever one of its tasks does.
    assert blue["rollbackConfig"] == {**blue["updateConfig"], "failureAction": "continue"}
    # A pinned release makes `pulumi up` wait for every replica to roll, a window per replica.
    timeout = runtimes.converge_within_s(check, spec.serving.replicas)
    assert blue["convergeConfig"] == {"delay": "7s", "timeout": runtimes.swarm_duration(timeout)}
    following_latest = render({})[BLUE].inputs
    assert "convergeConfig" not in following_latest


def test_every_tmpfs_mode_is_read_back_by_the_provider_as_declared():
    """The provider reads a tmpfs mode back as Go's `FileMode.Perm()`, the permission bits alone
    (resource_docker_service_structures.go, flattenServiceMounts); a sticky or setuid bit in the declared mode
    would differ from every read, and `mounts` is a set compared whole: every `pulumi up` would update the service."""
    modes = {(name, mount["target"]): mount["tmpfsOptions"]["mode"]
             for name, resource in render(CANARY).items() if resource.type == SERVICE
             for mount in resource.inputs["taskSpec"]["containerSpec"]["mounts"] if mount["type"] == "tmpfs"}
    assert {name for name, _ in modes} == {"cluster-image-registry-server", "cluster-model-registry-server",
                                           "cluster-monitoring-prometheus", BLUE, GREEN,
                                           "cluster-serving-diabetes-regressor-blue", "cluster-serving-gateway"}
    assert {key: oct(mode) for key, mode in modes.items() if mode & 0o777 != mode} == {}


@pytest.mark.parametrize(("platform", "architecture"), [("linux/amd64", "amd64"), ("linux/arm64", "arm64")])
def test_every_service_declares_the_one_platform_its_image_is_built_for(platform, architecture):
    """The provider creates a service with QueryRegistry, and the Docker client writes the platforms the
    registry lists for the image into the placement (docker/docker v28.5.2 client/service_create.go,
    imageDigestAndPlatforms: OCI names, `amd64` not `x86_64`), which Read returns (flattenPlacementPlatforms in
    resource_docker_service_structures.go). Declared as the one platform the stage builds for, the second
    `pulumi up` finds what it declared."""
    services = [resource for resource in render({**PINNED, "docker": {"platform": platform}}).values()
                if resource.type == SERVICE]
    assert len(services) == 6  # MLflow, the registry, Prometheus, the gateway, each model's blue
    for service in services:
        assert service.inputs["taskSpec"]["placement"]["platforms"] == [{"architecture": architecture, "os": "linux"}]


def test_durations_are_written_as_the_provider_reads_them_back():
    assert [runtimes.swarm_duration(s) for s in (0, 5, 60, 90, 3600, 3660)] == ["0s", "5s", "1m", "1m30s", "1h",
                                                                                 "1h1m"]


def test_stateful_services_stay_on_the_stateful_node_with_their_volumes(cluster):
    for name, volumes in (("cluster-model-registry-server", {"/data/db": "cluster-mlflow-db",
                                                             "/data/artifacts": "cluster-artifacts"}),
                          ("cluster-image-registry-server", {"/var/lib/registry": "cluster-registry-data"}),
                          ("cluster-monitoring-prometheus", {"/prometheus": "cluster-metrics"})):
        service = cluster[name].inputs
        assert service["mode"] == {"replicated": {"replicas": 1}}
        assert service["taskSpec"]["placement"]["constraints"] == ["node.labels.mlops.stateful == true"]
        assert service["updateConfig"]["order"] == service["rollbackConfig"]["order"] == "stop-first"
        mounts = {m["target"]: m["source"] for m in service["taskSpec"]["containerSpec"]["mounts"] if m["type"] == "volume"}
        assert mounts == volumes
    registry_port = cluster["cluster-image-registry-server"].inputs["endpointSpec"]["ports"]
    assert registry_port == [{"targetPort": 5000, "publishedPort": 5301, "publishMode": "host", "protocol": "tcp"}]


def test_the_gateway_runs_on_every_edge_node_and_resolves_the_tasks_of_each_slot():
    rendered = render(CANARY)
    gateway = rendered["cluster-serving-gateway"].inputs
    assert gateway["mode"] == {"global": True} and "convergeConfig" not in gateway
    assert gateway["taskSpec"]["placement"]["constraints"] == ["node.labels.mlops.edge == true"]
    assert gateway["endpointSpec"]["ports"] == [{"targetPort": 8080, "publishedPort": 8380, "publishMode": "host",
                                                 "protocol": "tcp"}]
    # Its host port cannot be bound twice on one node.
    assert gateway["updateConfig"]["order"] == "stop-first"
    assert json.loads(gateway["taskSpec"]["containerSpec"]["env"].pop("GATEWAY_MODELS")) == [
        {"name": OTHER_MODEL, "blue": ["tasks.cluster-diabetes-regressor-blue:8080"], "green": [],
         "weights": {"blue": 100, "green": 0}},
        {"name": MODEL, "blue": ["tasks.cluster-iris-classifier-blue:8080"],
         "green": ["tasks.cluster-iris-classifier-green:8080"], "weights": {"blue": 90, "green": 10}}]
    assert gateway["taskSpec"]["containerSpec"]["env"] == {}
    assert rendered[GREEN].inputs["taskSpec"]["containerSpec"]["env"]["MODEL_VERSION"] == "4"


def prometheus_config(rendered: dict[str, plan.PlannedResource]) -> dict:
    return json.loads(rendered["cluster-monitoring-prometheus"].inputs["taskSpec"]["containerSpec"]["env"]["PROMETHEUS_CONFIG"])


def test_prometheus_runs_on_the_stateful_node_published_in_host_mode_like_the_single_host_one(cluster):
    spec = load_stage("cluster", overrides=PINNED)
    prometheus = cluster["cluster-monitoring-prometheus"].inputs
    task = prometheus["taskSpec"]
    assert prometheus["mode"] == {"replicated": {"replicas": 1}} and "convergeConfig" in prometheus
    assert task["placement"]["constraints"] == ["node.labels.mlops.stateful == true"]
    assert "prefs" not in task["placement"]
    assert prometheus["endpointSpec"] == {"mode": "dnsrr", "ports": [
        {"targetPort": 9090, "publishedPort": 5390, "publishMode": "host", "protocol": "tcp"}]}
    # Its TSDB is locked by one Prometheus at a time.
    assert prometheus["updateConfig"]["order"] == prometheus["rollbackConfig"]["order"] == "stop-first"
    limits = {"nanoCpus": 250_000_000, "memoryBytes": 512 * runtimes.MIB}
    assert task["resources"] == {"limits": limits, "reservation": limits}
    container = task["containerSpec"]
    assert (container["user"], container["readOnly"], container["capDrops"]) == ("10001:10001", True, ["ALL"])
    assert container["healthcheck"]["tests"] == http_probe(HttpHealth(9090, "/-/ready", spec.monitoring.health_check))
    assert (container["env"]["DRIFT_THRESHOLD"], container["env"]["RETENTION_DAYS"]) == ("0.2", "15")
    assert "secrets" not in container


def test_prometheus_scrapes_every_task_of_each_slot_and_every_gateway_through_swarm_dns():
    rendered = render({**CANARY, "monitoring": {"scrape_interval_s": 5, "drift_window_rows": 500}})
    config = prometheus_config(rendered)
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["gateway"] == {"job_name": "gateway", "dns_sd_configs": [
        {"names": ["tasks.cluster-gateway"], "type": "A", "port": 9102, "refresh_interval": "5s"}]}
    serving = jobs["serving"]
    assert serving["dns_sd_configs"] == [
        {"names": [f"tasks.cluster-{model}-{slot}"], "type": "A", "port": 8082, "refresh_interval": "5s"}
        for model, slot in ((OTHER_MODEL, "blue"), (MODEL, "blue"), (MODEL, "green"))]
    # What each name's targets are labelled with, as Prometheus applies the relabelling (regexes fully anchored).
    labelled = {name: {rule["target_label"]: rule["replacement"] for rule in serving["relabel_configs"]
                       if re.fullmatch(rule["regex"], name) and rule["source_labels"] == ["__meta_dns_name"]}
                for name in ("tasks.cluster-iris-classifier-blue", "tasks.cluster-iris-classifier-green",
                             "tasks.cluster-diabetes-regressor-blue")}
    assert labelled == {
        "tasks.cluster-iris-classifier-blue": {"slot": "blue", "model": MODEL, "model_version": "3"},
        "tasks.cluster-iris-classifier-green": {"slot": "green", "model": MODEL, "model_version": "4"},
        "tasks.cluster-diabetes-regressor-blue": {"slot": "blue", "model": OTHER_MODEL, "model_version": "latest"}}
    for service_name in (BLUE, GREEN):
        service = rendered[service_name].inputs
        assert service["endpointSpec"]["mode"] == "dnsrr"
        assert service["taskSpec"]["containerSpec"]["env"]["DRIFT_WINDOW_ROWS"] == "500"
    without = render({**PINNED, "monitoring": None})
    assert not [name for name in without if "prometheus" in name or "metrics" in name]
    assert "DRIFT_WINDOW_ROWS" not in without[BLUE].inputs["taskSpec"]["containerSpec"]["env"]


def test_declared_batching_reaches_each_slots_tasks(cluster):
    batched = render({"models": {MODEL: {"release": {"version": 3, "sha256": "a" * 64},
                                         "batching": {"max_batch_size": 64, "max_batch_time_ms": 1}}}})
    env = batched[BLUE].inputs["taskSpec"]["containerSpec"]["env"]
    assert (env["MAX_BATCH_SIZE"], env["MAX_BATCH_TIME_MS"]) == ("64", "1")
    assert "MAX_BATCH_SIZE" not in cluster[BLUE].inputs["taskSpec"]["containerSpec"]["env"]
    other = batched["cluster-serving-diabetes-regressor-blue"].inputs["taskSpec"]["containerSpec"]["env"]
    assert "MAX_BATCH_SIZE" not in other, "each model batches as it declares"


def test_every_node_pulls_workload_and_gateway_images_from_the_stage_registry(cluster):
    pushed = {name: r.inputs["imageName"] for name, r in cluster.items() if name.endswith("-push")}
    # The workloads' images are the model's (its project on the platform image, which only the builder keeps).
    assert {name: image.split("/")[0] for name, image in pushed.items()} == {
        **{f"cluster-serving-{model}-image-push": "10.0.0.10:5301" for model in (MODEL, OTHER_MODEL)},
        **{f"cluster-{model}-training-image-push": "10.0.0.10:5301" for model in (MODEL, OTHER_MODEL)},
        "cluster-serving-gateway-image-push": "10.0.0.10:5301", "cluster-monitoring-image-push": "10.0.0.10:5301"}
    for model in (MODEL, OTHER_MODEL):
        assert pushed[f"cluster-serving-{model}-image-push"].startswith(f"10.0.0.10:5301/cluster/{model}-serving:")
        assert pushed[f"cluster-{model}-training-image-push"].startswith(f"10.0.0.10:5301/cluster/{model}-training:")
    assert f"cluster-serving-{MODEL}-image-push" in cluster[BLUE].dependencies
    # The platform images under them are built once for the stage, whatever the number of models.
    assert sorted(name for name in cluster if name.endswith("-platform")) == ["cluster-serving-oip-platform",
                                                                               "cluster-training-platform"]
    assert "cluster-monitoring-image-push" in cluster["cluster-monitoring-prometheus"].dependencies
    assert "cluster-serving-gateway-image-push" in cluster["cluster-serving-gateway"].dependencies


def test_the_provider_sends_nodes_the_registry_credentials_with_each_service():
    """Services set no `auth` of their own (ForceNew: a new password would replace them); the provider then
    sends its own registry_auth for the image's registry (resource_docker_service_funcs.go,
    retrieveAndMarshalAuth), which Swarm hands to the node that pulls."""
    rendered = render(config=SECRETS, reveal_secrets=True)
    auth = json.loads(rendered["cluster-docker"].inputs["registryAuth"])
    assert [(entry["address"], entry["username"]) for entry in auth] == [("10.0.0.10:5301", "mlops")]
    assert all("auth" not in r.inputs for r in rendered.values() if r.type == SERVICE)


def test_passwords_reach_services_only_as_secret_files():
    rendered = render(config=SECRETS, reveal_secrets=True)
    registry_password, mlflow_secret = SECRETS["mlops:registryPassword"], SECRETS["mlops:mlflowPassword"]
    forbidden = (registry_password, mlflow_secret, derived_password(mlflow_secret, READER))
    tls_keys = [server_tls(secret, "cluster", service, ()).key.split("\n")[1]  # a line of each key's base64
                for secret, service in ((mlflow_secret, "model-registry"), (registry_password, "image-registry"))]
    expected_files = {"cluster-model-registry-server": [("MLOPS_MLFLOW_PASSWORD_HASHES_FILE",
                                                         "/run/secrets/mlflow-password-hashes"),
                                                        ("MLOPS_TLS_KEY_FILE", "/run/secrets/mlflow-tls-key")],
                      "cluster-image-registry-server": [("REGISTRY_HTPASSWD_ENTRY_FILE", "/run/secrets/registry-htpasswd"),
                                                        ("MLOPS_TLS_KEY_FILE", "/run/secrets/registry-tls-key")],
                      BLUE: [("MLFLOW_TRACKING_PASSWORD_FILE", "/run/secrets/mlflow-reader-password")]}
    for name, resource in rendered.items():
        if resource.type != SERVICE:
            continue
        container = resource.inputs["taskSpec"]["containerSpec"]
        env = json.dumps(container.get("env", {}))
        assert not any(secret in env for secret in forbidden), name
        assert not any(key.endswith(("PASSWORD", "KEY")) for key in container.get("env", {})), name
        if name in expected_files:
            mounted = sorted(container["secrets"], key=lambda secret: secret["fileName"])
            assert [(variable, container["env"][variable]) for variable, _ in expected_files[name]] == expected_files[name]
            assert [(secret["fileName"], secret["fileUid"], secret["fileGid"], secret["fileMode"]) for secret in mounted] == [
                (path, "10001", "10001", 0o400) for path in sorted(path for _, path in expected_files[name])]
            for secret in mounted:
                assert rendered[secret["secretId"].removesuffix("-id")].inputs["name"] == secret["secretName"]
    secrets = [r for r in rendered.values() if r.type == SECRET]
    assert len(secrets) == 5
    assert not any(key_line in json.dumps(r.inputs) for r in rendered.values() if r.type == SERVICE for key_line in tls_keys)
    for secret in secrets:
        assert not any(value in secret.inputs["name"] for value in forbidden)
    assert all(r.inputs["data"] == plan.SECRET_PLACEHOLDER for r in render(config=SECRETS).values() if r.type == SECRET)


def test_a_new_password_gets_a_new_secret_name_so_services_roll_onto_it():
    before = {name: r.inputs["name"] for name, r in render(config=SECRETS).items() if r.type == SECRET}
    rotated = render(config={**SECRETS, "mlops:registryPassword": "rotated-registry-password"})
    after = {name: r.inputs["name"] for name, r in rotated.items() if r.type == SECRET}
    assert before["cluster-image-registry-secret"] != after["cluster-image-registry-secret"]
    assert before["cluster-model-registry-secret"] == after["cluster-model-registry-secret"]
    assert after["cluster-image-registry-secret"].startswith("cluster-registry-")
    assert runtimes.secret_name("s", "p", "x") == runtimes.secret_name("s", "p", "x") != runtimes.secret_name("s", "p", "y")


def test_pulumi_lets_go_of_a_replaced_secret_without_deleting_it_and_labels_it_for_settle():
    """A rollback Swarm starts after the provider returned goes back to a spec that mounts the replaced secret;
    deleting it in the same `up` would leave the rolled-back tasks without it. `mlops settle` finds the stack's
    secrets by label."""
    secrets = [r for r in render(config=SECRETS).values() if r.type == SECRET]
    assert secrets
    for secret in secrets:
        assert secret.retain_on_delete, f"{secret.name}: a replaced secret would be deleted by the same up"
        assert {item["label"]: item["value"] for item in secret.inputs["labels"]} == {
            "mlops.stage": "cluster", "mlops.stack": "cluster"}, secret.name


def test_a_new_model_rolls_the_replicas_in_place_and_diff_and_plan_show_how(monkeypatch, capsys):
    before = plan.render("cluster", load_stage("cluster", overrides=PINNED))
    newer = {"models": {MODEL: {"release": {"version": 4, "sha256": "b" * 64}, "replicas": 4}}}
    after = plan.render("cluster", load_stage("cluster", overrides=newer))
    changes, _ = compare(before, after, "cluster", "cluster")
    [blue] = [change for change in changes if change.name == BLUE]
    assert not [change for change in changes if OTHER_MODEL in change.name], "the other model is untouched"
    assert (blue.action, blue.replace_fields) == ("update", ())
    assert blue.update_policy.startswith("1 task at a time, start-first, each watched for 32s, any failure "
                                         "(max ratio 0.0) → rollback")
    code, out, _ = run_cli(monkeypatch, capsys, "plan", "cluster")
    assert code in (0, None)
    policies = [line for line in out.splitlines() if line.strip().startswith("update policy:")]
    assert len(policies) == 6 and sum("start-first" in line for line in policies) == 2


def test_training_runs_as_a_one_shot_job_on_a_node_with_its_resources():
    spec = load_stage("cluster", overrides={"swarm": {"training": {"generic_resources": {"NVIDIA-GPU": 1}}},
                                            "training": {"gpu": True}})
    image = "10.0.0.10:5301/cluster/training@sha256:" + "d" * 64
    arguments = service_job_arguments(training_run(spec, name="cluster-train-1", image=image, digest=image,
                                                   args=["--seed", "3"], password="the-password",
                                                   mlflow_ca="the stage's CA", labels={"mlops.stage": "cluster"}))
    pairs = set(zip(arguments, arguments[1:]))
    assert {("--mode", "replicated-job"), ("--restart-condition", "none"), ("--generic-resource", "NVIDIA-GPU=1"),
            ("--constraint", "node.labels.mlops.train == true"), ("--reserve-cpu", "1.0"), ("--limit-memory", "1024M"),
            ("--network", "cluster-net"), ("--user", "10001:10001"), ("--cap-drop", "ALL"),
            ("--env", "MLFLOW_TRACKING_USERNAME=trainer"),
            ("--env", "MLFLOW_TRACKING_URI=https://cluster-model-registry:5000"),
            ("--env", "MLOPS_MLFLOW_CA_CERTIFICATE=the stage's CA")} <= pairs, "MLflow speaks TLS off loopback"
    assert ("--secret", "source=cluster-train-1-password,target=mlflow-trainer-password,uid=10001,gid=10001,mode=0400") in pairs
    assert ("--env", "MLFLOW_TRACKING_PASSWORD_FILE=/run/secrets/mlflow-trainer-password") in pairs
    assert not any("the-password" in argument for argument in arguments)
    assert arguments[arguments.index("--entrypoint") + 1:] == ["python3", image, "-m", "mlops_training", "--seed", "3"]
    assert swarm_training.task_running("Running 3 minutes ago\n") and not swarm_training.task_running("Shutdown 1s ago\n")


def test_the_images_read_their_secrets_from_files(tmp_path, monkeypatch):
    from images.mlflow import start

    hashes_file = tmp_path / "hashes"
    hashes_file.write_text(mlflow_password_hashes("from-the-file", "cluster") + "\n")
    monkeypatch.setenv("MLOPS_MLFLOW_PASSWORD_HASHES_FILE", str(hashes_file))
    monkeypatch.setenv("MLOPS_MLFLOW_PASSWORD_HASHES", mlflow_password_hashes("from-the-variable", "cluster"))
    assert start.password_hashes() == dict(line.split(":", 1) for line in hashes_file.read_text().split())
    assert "MLOPS_MLFLOW_PASSWORD_HASHES_FILE" not in os.environ and "MLOPS_MLFLOW_PASSWORD_HASHES" not in os.environ

    monkeypatch.syspath_prepend(str(REPO_ROOT / "images" / "serving"))
    from serving.startup import tracking_password

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-the-variable")
    assert tracking_password() == "from-the-variable"
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-the-file\n")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD_FILE", str(secret_file))
    assert tracking_password() == "from-the-file"


def test_the_registry_image_reads_its_htpasswd_line_from_a_file(tmp_path):
    """The entrypoint as written, with the registry binary and /tmp swapped for stand-ins."""
    script = (REPO_ROOT / "images" / "registry" / "entrypoint.sh").read_text()
    script = script.replace("/tmp/htpasswd", str(tmp_path / "htpasswd")).replace(
        "exec docker-registry serve /etc/mlops-registry/config.yml", 'env | grep -c HTPASSWD_ENTRY= || true')
    (tmp_path / "entry").write_text("mlops:$2b$05$hash\n")
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "REGISTRY_HTPASSWD_ENTRY_FILE": str(tmp_path / "entry"),
                                 "REGISTRY_HTPASSWD_ENTRY": "mlops:stale"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "htpasswd").read_text() == "mlops:$2b$05$hash\n"
    assert result.stdout.strip() == "0", "the line must not stay in the registry's environment"


def test_mlflow_and_the_registry_speak_tls_with_what_the_stack_hands_over_and_keep_the_key_out_of_the_environment(
        tmp_path, monkeypatch):
    from images.mlflow import start

    tls = server_tls("the-secret", "cluster", "model-registry", ())
    key_file = tmp_path / "key"
    key_file.write_text(tls.key)
    monkeypatch.setattr(start, "TLS_FOLDER", str(tmp_path / "tls"))
    monkeypatch.setenv("MLOPS_TLS_CERTIFICATE", tls.certificate)
    monkeypatch.setenv("MLOPS_TLS_KEY_FILE", str(key_file))
    assert start.tls_arguments() == ["--uvicorn-opts", f"--ssl-certfile {tmp_path}/tls/certificate.pem "
                                                       f"--ssl-keyfile {tmp_path}/tls/key.pem"]
    assert (tmp_path / "tls" / "key.pem").read_text() == tls.key
    assert oct((tmp_path / "tls" / "key.pem").stat().st_mode & 0o777) == "0o600"
    assert not [variable for variable in os.environ if variable.startswith("MLOPS_TLS_")]
    assert start.tls_arguments() == [], "without them: plain HTTP, on loopback"
    monkeypatch.setenv("MLOPS_TLS_CERTIFICATE", tls.certificate)
    with pytest.raises(SystemExit, match="MLOPS_TLS_CERTIFICATE and MLOPS_TLS_KEY .* go together"):
        start.tls_arguments()

    script = (REPO_ROOT / "images" / "registry" / "entrypoint.sh").read_text()
    script = script.replace("/tmp/", f"{tmp_path}/registry-").replace(
        "exec docker-registry serve /etc/mlops-registry/config.yml",
        'echo "$REGISTRY_HTTP_TLS_CERTIFICATE $REGISTRY_HTTP_TLS_KEY"; env | grep -c MLOPS_TLS_ || true')
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "REGISTRY_HTPASSWD_ENTRY": "mlops:$2b$05$hash",
                                 "MLOPS_TLS_CERTIFICATE": tls.certificate, "MLOPS_TLS_KEY_FILE": str(key_file)})
    assert result.returncode == 0, result.stderr
    certificate, key, left = result.stdout.split()
    assert (Path(certificate).read_text().strip(), Path(key).read_text().strip()) == (tls.certificate.strip(), tls.key.strip())
    assert left == "1", "only MLOPS_TLS_KEY_FILE, the name of a file, stays in the registry's environment"
    half = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "REGISTRY_HTPASSWD_ENTRY": "mlops:$2b$05$hash",
                               "MLOPS_TLS_CERTIFICATE": tls.certificate})
    assert half.returncode == 2 and half.stderr.count("\n") == 1 and "go together" in half.stderr


def gpu_without_placement(file) -> None:
    replace(file, "  build: images/training", "  build: images/training\n  gpu: true")
    replace(file, '  training:\n    constraints: ["node.labels.mlops.train == true"]\n', "")


SWARM_ERRORS = {
    "loopback port": (lambda env: replace(env / "cluster.yaml", "port: {host_port: 8380, bind_address: 0.0.0.0, public: true}",
                                          "port: {host_port: 8380}"),
                      "cluster.yaml:37: serving.port: a swarm publishes ports on every address of a node: set "
                      "bind_address: 0.0.0.0 and public: true (and firewall the nodes' network)"),
    "registry port": (lambda env: replace(env / "cluster.yaml", "registry_address: 10.0.0.10:5301",
                                          "registry_address: 10.0.0.10:5999"),
                      "cluster.yaml:10: swarm.registry_address: the port must be image_registry.port.host_port (5301), "
                      "where the registry listens"),
    "bad constraint": (lambda env: replace(env / "cluster.yaml", '["node.role != manager"]', '["role=manager"]'),
                       "cluster.yaml:14: swarm.constraints.0: 'role=manager' is no placement constraint; write e.g. "
                       "'node.labels.gpu == true' or 'node.role != manager' (node.hostname|role|id|platform.os|"
                       "platform.arch|labels.NAME, then == or !=, then a value)"),
    "reservation above limit": (lambda env: replace(env / "cluster.yaml", "memory_mb: 256}", "memory_mb: 4096}"),
                                "cluster.yaml:15: swarm.reservations.memory_mb: reserves more than "
                                "diabetes-regressor's replicas may use (memory_mb 512)"),
    "gpu without placement": (lambda env: gpu_without_placement(env / "cluster.yaml"),
                              "cluster.yaml:28: training.gpu: on a swarm, place GPU training with "
                              "swarm.training.generic_resources (e.g. {NVIDIA-GPU: 1}) or a node label in "
                              "swarm.training.constraints"),
    "spread": (lambda env: replace(env / "cluster.yaml", "spread_over: node.hostname", "spread_over: node.role"),
               "cluster.yaml:13: swarm.spread_over: 'node.role' cannot be spread over; use node.hostname or "
               "node.labels.NAME"),
    "rollout": (lambda env: replace(env / "cluster.yaml", "    release: {version: latest}\n  diabetes",
                                    "    release: {version: latest}\n    green:\n      version: latest\n"
                                    "      rollout: {steps: [50, 100], bake_time_s: 600, max_error_rate_increase: 0.01, "
                                    "max_p99_latency_ratio: 1.5}\n  diabetes"),
                "cluster.yaml:44: models.iris-classifier.green.rollout: not on a swarm stage: every edge node runs a "
                "gateway of its own, and each would move green's weight and record the rollout on its own; move the "
                "model's traffic in the stage file instead"),
    "sampling": (lambda env: replace(env / "cluster.yaml", "    release: {version: latest}\n  diabetes",
                                     "    release: {version: latest}\n    sampling: {fraction: 0.1}\n  diabetes"),
                 "cluster.yaml:42: models.iris-classifier.sampling: not on a swarm stage: replicas run on many nodes "
                 "and the samples volume is local to one; remove the sampling or 'swarm'"),
    "unknown key": (lambda env: replace(env / "cluster.yaml", "  edge_label: mlops.edge", "  edge: mlops.edge"),
                    "cluster.yaml:12: swarm.edge: unknown key 'edge'; allowed here: constraints, edge_label, "
                    "registry_address, reservations, spread_over, stateful_label, training"),
}


@pytest.mark.parametrize("case", sorted(SWARM_ERRORS))
def test_a_broken_swarm_key_is_one_line_and_exit_2(case, environments, monkeypatch, capsys):
    breaks, expected = SWARM_ERRORS[case]
    breaks(environments)
    code, out, err = run_cli(monkeypatch, capsys, "validate", "cluster", "--environments", str(environments))
    assert code == 2 and out == ""
    assert err == f"error: {environments}/{expected}\n"


def test_waiting_for_a_job_reports_why_it_is_not_scheduled_and_returns_its_exit_code(monkeypatch):
    """`docker service ps` and `docker inspect` answers as the engine gave them for a job that first waits for
    resources, then runs and exits 3 (checked on a one-node swarm of an inner engine)."""
    answers = iter(["pending||no suitable node (insufficient resources on 1 node)",
                    "pending||no suitable node (insufficient resources on 1 node)", "running||", "failed|3|task: non-zero exit (3)"])

    def docker(spec, *args):
        stdout = "task-1\n" if args[:2] == ("service", "ps") else next(answers)
        return subprocess.CompletedProcess(args, 0, stdout=stdout, stderr="")

    monkeypatch.setattr(swarm_training, "POLL_S", 0)
    reasons: list[str] = []
    spec = load_stage("cluster")
    assert swarm_training.finished_task(docker, spec, "job", reasons.append) == ("failed", 3)
    assert reasons == ["no suitable node (insufficient resources on 1 node)"]

    def removed_meanwhile(spec, *args):
        return subprocess.CompletedProcess(args, 1, stdout="", stderr="no such service")

    assert swarm_training.finished_task(removed_meanwhile, spec, "job", reasons.append) == ("removed", 1)


def test_a_swarm_stage_declares_no_datasets_volume_which_mlops_data_refuses_there(cluster):
    """On a swarm the volume would be local to whichever node ran `mlops data`: declared, it would be dead."""
    volumes = {resource.inputs["name"] for resource in cluster.values() if resource.type == "docker:index/volume:Volume"}
    assert volumes == {"cluster-artifacts", "cluster-mlflow-db", "cluster-registry-data", "cluster-metrics",
                       "cluster-rollout"}


def test_mlflow_and_the_image_registry_speak_tls_with_a_ca_made_from_their_own_secret():
    rendered = render(config=SECRETS, reveal_secrets=True)
    mlflow_secret, registry_password = SECRETS["mlops:mlflowPassword"], SECRETS["mlops:registryPassword"]
    for server, secret, service, names in (
            ("cluster-model-registry-server", mlflow_secret, "model-registry", ["cluster-model-registry", "model-registry"]),
            ("cluster-image-registry-server", registry_password, "image-registry", ["cluster-image-registry", "image-registry"])):
        container = rendered[server].inputs["taskSpec"]["containerSpec"]
        leaf, ca = x509.load_pem_x509_certificates(container["env"]["MLOPS_TLS_CERTIFICATE"].encode())
        assert ca.public_bytes(Encoding.PEM).decode() == ca_certificate(secret, "cluster", service)
        leaf.verify_directly_issued_by(ca)
        subject = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert subject.get_values_for_type(x509.DNSName)[:2] == names, "the replicas reach it on the overlay by name"
        assert "10.0.0.10" in [str(ip) for ip in subject.get_values_for_type(x509.IPAddress)], \
            "mlops and every node's engine reach it at the manager's address, which is the registry address's host"
        assert container["healthcheck"]["tests"][-2].startswith("https://127.0.0.1:5000/")
    for replica in (BLUE, "cluster-serving-diabetes-regressor-blue"):
        env = rendered[replica].inputs["taskSpec"]["containerSpec"]["env"]
        assert env["MLOPS_MLFLOW_CA_CERTIFICATE"] == ca_certificate(mlflow_secret, "cluster", "model-registry")
    rotated = render(config={**SECRETS, "mlops:registryPassword": "rotated"}, reveal_secrets=True)
    certificate = rotated["cluster-image-registry-server"].inputs["taskSpec"]["containerSpec"]["env"]["MLOPS_TLS_CERTIFICATE"]
    assert ca_certificate("rotated", "cluster", "image-registry") in certificate, "a rotated secret rotates the CA"
