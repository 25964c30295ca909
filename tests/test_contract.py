"""The spec is a package of its own, the components depend on it and never on the commands, and the images'
copies of the contract (they are built without this package) equal it."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlops_spec import contract
from mlops_spec.contract import (
    GatewayEnv,
    MlflowEnv,
    PrometheusEnv,
    RegistryEnv,
    ReplicaEnv,
    TlsEnv,
    TrackingEnv,
    TrainingEnv,
)
from mlops_spec.models import MAX_MODEL_NAME, ModelPin, RolloutPolicy, TrafficSplit
from mlops_spec.project import REPO_ROOT

IMAGES = REPO_ROOT / "images"


def imported_modules(folder: str) -> dict[str, set[str]]:
    """Top-level packages each module of `folder` imports, wherever the import statement is."""
    found = {}
    for file in sorted((REPO_ROOT / folder).glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[file.name] = names
    return found


def test_the_spec_package_imports_neither_pulumi_nor_docker_nor_the_rest_of_the_stack():
    for module, names in imported_modules("mlops_spec").items():
        assert not names & {"pulumi", "pulumi_docker", "docker", "mlops", "components"}, module
    # And at run time: loading every stage pulls in none of them either.
    loaded = subprocess.run([sys.executable, "-c", "import sys, mlops_spec.loading, mlops_spec.contract\n"
                             "mlops_spec.loading.load_all_stages()\n"
                             "print(sorted({m.split('.')[0] for m in sys.modules}))"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True, env={**os.environ})
    assert not {"pulumi", "pulumi_docker", "docker", "mlops", "components"} & set(eval(loaded.stdout))


def test_the_components_never_import_the_commands():
    for module, names in imported_modules("components").items():
        assert "mlops" not in names, module


def test_the_mlflow_image_creates_the_identities_the_contract_derives_passwords_for():
    from images.mlflow import start

    assert (start.ADMIN, start.IDENTITIES) == (contract.ADMIN, contract.IDENTITIES)
    assert contract.derived_password("s3cret", "reader") != contract.derived_password("s3cret", "trainer")
    assert len(contract.derived_password("s3cret", "reader")) == 64


def test_the_gateway_reads_the_models_and_rollouts_the_contract_renders(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "images" / "gateway"))
    import gateway  # noqa: PLC0415 - the gateway image's module, on its own path

    green = ModelPin(name="iris-classifier", version=3, sha256="a" * 64)
    policy = RolloutPolicy(steps=[10, 100], bake_time_s=60, max_error_rate_increase=0.01, max_p99_latency_ratio=1.5)
    routes = [contract.GatewayRoute("iris-classifier", ["s-iris-classifier-blue-0:8080", "s-iris-classifier-blue-1:8080"],
                                    ["s-iris-classifier-green-0:8080"], TrafficSplit(blue=100, green=0), (green, policy)),
              contract.GatewayRoute("diabetes-regressor", ["tasks.s-diabetes-regressor-blue:8080"], [], TrafficSplit())]
    env = contract.gateway_env(routes, "http://prometheus:9090", 15)
    assert env[GatewayEnv.ROLLOUT_DIR] == contract.ROLLOUT_DIR
    env[GatewayEnv.ROLLOUT_DIR] = str(tmp_path)  # the volume's mount point, writable here
    models = gateway.models_from_env(env)
    assert [(model.name, [(pool.name, pool.weight, list(pool.replicas)) for pool in model.pools]) for model in models] == [
        (route.name, [("blue", route.traffic.blue, list(route.blue)), ("green", route.traffic.green, list(route.green))])
        for route in routes]
    assert models[1].rollout is None
    rollouts = gateway.controllers_from_env(env, {model.name: (model.rollout, model.green_weight)
                                                  for model in models if model.rollout is not None})
    assert list(rollouts) == ["iris-classifier"]
    assert rollouts["iris-classifier"].green_release == contract.release_id(green)
    assert vars(rollouts["iris-classifier"].policy) == {**policy.model_dump(), "steps": (10, 100)}
    assert (tmp_path / "iris-classifier" / "state.json").exists()
    assert contract.rollout_folder("iris-classifier") == f"{contract.ROLLOUT_DIR}/iris-classifier"
    for name in ("a", "iris-classifier", "m" * MAX_MODEL_NAME, "x2-y"):
        assert gateway.MODEL_NAME.match(name) and ModelPin(name=name, version=1), "the gateway accepts every model name"
    for name in ("Iris", "iris_classifier", "iris.v2", "-iris", "iris-", "m" * (MAX_MODEL_NAME + 1), "2iris"):
        assert not gateway.MODEL_NAME.match(name), f"the gateway routes no model the spec refuses: {name}"
        with pytest.raises(ValueError, match="is not a model name"):
            ModelPin(name=name, version=1)
    assert set(contract.gateway_env(routes[1:], None, None)) == {GatewayEnv.MODELS}, "no rollout, no Prometheus"


def module_constants(file: Path) -> dict[str, object]:
    """`NAME = <literal>` (or `Path(<literal>)`) assignments at the top level of a python file."""
    found: dict[str, object] = {}
    for node in ast.parse(file.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "Path":
                value = value.args[0]
            if all(isinstance(part, (ast.Constant, ast.BinOp, ast.operator)) for part in ast.walk(value)):
                # Arithmetic of numbers (`64 * 1024 * 1024`), which literal_eval refuses; nothing else is evaluated.
                found[node.targets[0].id] = eval(compile(ast.Expression(value), str(file), "eval"), {"__builtins__": {}})
                continue
            try:
                found[node.targets[0].id] = ast.literal_eval(value)
            except ValueError:
                continue
    return found


def string_constants(folder: Path) -> set[str]:
    """Every string literal in the python files under `folder`, f-strings' literal parts included."""
    return {node.value for file in folder.rglob("*.py") for node in ast.walk(ast.parse(file.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def only(pattern: str, text: str) -> str:
    found = set(re.findall(pattern, text))
    assert len(found) == 1, f"{pattern}: {found}"
    return found.pop()


def env_names(*namespaces: type) -> set[str]:
    return {value for namespace in namespaces for key, value in vars(namespace).items() if key.isupper()}


def image_ports() -> list[tuple[str, object, int]]:
    serving = module_constants(IMAGES / "serving/serving/__main__.py")
    dockerfile = {image: (IMAGES / image / "Dockerfile").read_text() for image in ("gateway", "mlflow", "registry")}
    return [
        ("serving: PORT", serving["PORT"], contract.SERVING_PORT),
        ("serving: METRICS_PORT", serving["METRICS_PORT"], contract.SERVING_METRICS_PORT),
        ("gateway: nginx listen", int(only(r"listen (\d+);", (IMAGES / "gateway/nginx.conf.template").read_text())),
         contract.GATEWAY_PORT),
        ("gateway: EXPOSE", int(only(r"EXPOSE (\d+)", dockerfile["gateway"])), contract.GATEWAY_PORT),
        ("gateway: METRICS_PORT", module_constants(IMAGES / "gateway/metrics.py")["METRICS_PORT"],
         contract.GATEWAY_METRICS_PORT),
        ("mlflow: --port", int(only(r'"--port", "(\d+)"', dockerfile["mlflow"])), contract.MLFLOW_PORT),
        ("mlflow: EXPOSE", int(only(r"EXPOSE (\d+)", dockerfile["mlflow"])), contract.MLFLOW_PORT),
        ("registry: addr", int(only(r"addr: :(\d+)", (IMAGES / "registry/config.yml").read_text())),
         contract.IMAGE_REGISTRY_PORT),
        ("prometheus: PORT", module_constants(IMAGES / "prometheus/start.py")["PORT"], contract.PROMETHEUS_PORT),
    ]


@pytest.mark.parametrize("where, copy, expected", image_ports(), ids=lambda value: str(value))
def test_each_image_listens_on_the_port_the_contract_names(where, copy, expected):
    assert copy == expected, where


def test_each_image_owns_the_folders_the_contract_mounts_its_volumes_at():
    owned = {"gateway": [contract.ROLLOUT_DIR], "mlflow": [contract.MLFLOW_DB_DIR, contract.ARTIFACTS_DIR],
             "registry": [contract.REGISTRY_DATA_DIR], "serving": [contract.SAMPLES_DIR],
             "training": [contract.DATASETS_DIR], "prometheus": [contract.PROMETHEUS_DATA_DIR]}
    for image, folders in owned.items():
        dockerfile = (IMAGES / image / "Dockerfile").read_text()
        for folder in folders:
            # created and handed to the runtime user, so an empty volume mounted there takes both on
            assert re.search(rf"(mkdir|install -d)[^\n]*\s{re.escape(folder)}(\s|$)", dockerfile, re.M), (image, folder)
            assert re.search(rf"(chown|-o) 10001[^\n]*\s{re.escape(folder)}(\s|$)", dockerfile, re.M), (image, folder)
    training = module_constants(IMAGES / "training/mlops_training/datasets.py")
    assert (training["DATASETS_DIR"], training["SAMPLES_DIR"]) == (contract.DATASETS_DIR, contract.SAMPLES_DIR)
    assert module_constants(IMAGES / "prometheus/start.py")["DATA_DIR"] == contract.PROMETHEUS_DATA_DIR
    mlflow_command = (IMAGES / "mlflow/Dockerfile").read_text()
    assert f"sqlite:///{contract.MLFLOW_DB_DIR}/mlflow.db" in mlflow_command
    assert f'"--artifacts-destination", "{contract.ARTIFACTS_DIR}"' in mlflow_command
    assert f"rootdirectory: {contract.REGISTRY_DATA_DIR}" in (IMAGES / "registry/config.yml").read_text()


def test_each_image_reads_the_variables_the_components_set_on_it():
    reads = {
        "serving": env_names(ReplicaEnv, TrackingEnv),
        # The password and username reach MLflow's client library, which reads them itself.
        "training": {TrackingEnv.URI, TrackingEnv.CA_CERTIFICATE, TrainingEnv.IMAGE_DIGEST},
        "mlflow": env_names(MlflowEnv, TlsEnv),
        "prometheus": env_names(PrometheusEnv),
        "gateway": env_names(GatewayEnv),
    }
    for image, variables in reads.items():
        missing = variables - string_constants(IMAGES / image)
        assert not missing, f"images/{image} never reads {sorted(missing)}"
    registry_entrypoint = (IMAGES / "registry/entrypoint.sh").read_text()
    assert all(variable in registry_entrypoint for variable in env_names(RegistryEnv, TlsEnv))
    start = module_constants(IMAGES / "mlflow/start.py")
    assert start["HASHES_VARIABLE"] == MlflowEnv.PASSWORD_HASHES
    assert (start["TLS_CERTIFICATE_VARIABLE"], start["TLS_KEY_VARIABLE"]) == (TlsEnv.CERTIFICATE, TlsEnv.KEY)
    for image in ("serving/serving/registry.py", "training/mlops_training/registry.py"):
        assert module_constants(IMAGES / image)["CA_CERTIFICATE_VARIABLE"] == TrackingEnv.CA_CERTIFICATE, image
    # Every variable of the contract is checked against the image that reads it.
    checked = set().union(*reads.values(), env_names(RegistryEnv, GatewayEnv))
    assert checked == env_names(MlflowEnv, RegistryEnv, TlsEnv, TrackingEnv, ReplicaEnv, TrainingEnv, GatewayEnv,
                                PrometheusEnv)



def test_mlflow_accepts_the_host_name_the_stage_network_reaches_it_by():
    allowed = only(r"MLFLOW_SERVER_ALLOWED_HOSTS=(\S+)", (IMAGES / "mlflow/Dockerfile").read_text()).split(",")
    assert f"{contract.model_registry_name('*')}:{contract.MLFLOW_PORT}" in allowed
    assert contract.tracking_uri("staging", tls=False) == f"http://{contract.model_registry_name('staging')}:{contract.MLFLOW_PORT}"
    assert contract.tracking_uri("staging", tls=True) == f"https://{contract.model_registry_name('staging')}:{contract.MLFLOW_PORT}"


def test_the_replicas_cap_what_they_read_from_the_registry_as_the_cli_does():
    replica = module_constants(IMAGES / "serving/serving/registry.py")
    assert (replica["MAX_MODEL_BYTES"], replica["MAX_MLFLOW_ANSWER_BYTES"]) == (contract.MAX_MODEL_BYTES,
                                                                            contract.MAX_MLFLOW_ANSWER_BYTES)


def test_the_images_tag_check_and_sign_what_the_contract_names():
    replica = module_constants(IMAGES / "serving/serving/registry.py")
    training = module_constants(IMAGES / "training/mlops_training/registry.py")
    for image in (replica, training):
        assert (image["MODEL_HASH_TAG"], image["MANIFEST_HASH_TAG"]) == (contract.MODEL_HASH_TAG,
                                                                        contract.MANIFEST_HASH_TAG)
    assert replica["SIGNATURE_TAG"] == contract.SIGNATURE_TAG
    runner = module_constants(IMAGES / "training/mlops_training/runner.py")
    assert (runner["SKOPS_FILE"], runner["SKOPS_OUTPUT"]) == (contract.SKOPS_FILE, contract.SKOPS_OUTPUT)
    assert (replica["SKOPS_ARTIFACT"], replica["SKOPS_OUTPUT"]) == (f"model/{contract.SKOPS_FILE}", contract.SKOPS_OUTPUT)
    assert replica["SIGNING_KEYS_VARIABLE"] == ReplicaEnv.SIGNING_KEYS
    assert replica["TRUSTED_KEYS_CONFIG"] == f"mlops:{contract.TRUSTED_MODEL_KEYS}"
    access = module_constants(IMAGES / "mlflow/access.py")
    assert access["WRITE_ONCE_TAGS"] == contract.WRITE_ONCE_TAGS
    assert access["TRUSTED_KEYS_VARIABLE"] == MlflowEnv.TRUSTED_MODEL_KEYS == ReplicaEnv.SIGNING_KEYS
    sys.path.insert(0, str(IMAGES / "serving"))
    from serving.registry import signed_message  # noqa: PLC0415 - the serving image's module, on its own path

    # access.py imports MLflow, which this environment lacks: its function alone, compiled from its source.
    source = ast.parse((IMAGES / "mlflow/access.py").read_text())
    [function] = [node for node in source.body if isinstance(node, ast.FunctionDef) and node.name == "signed_message"]
    namespace: dict = {}
    exec(compile(ast.Module([function], type_ignores=[]), "access.py", "exec"), namespace)  # noqa: S102 - our own file
    for model, model_sha256, manifest_sha256 in (("iris-classifier", "a" * 64, "b" * 64), ("m", "", ""),
                                                 ("x2-y", "0" * 64, "f" * 64)):
        expected = contract.signed_message(model, model_sha256, manifest_sha256)
        assert signed_message(model, model_sha256, manifest_sha256) == expected
        assert namespace["signed_message"](model, model_sha256, manifest_sha256) == expected
