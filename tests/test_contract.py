"""The spec is a package of its own, the components depend on it and never on the commands, and the images'
copies of the contract (they are built without this package) equal it."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

from mlops_spec import contract
from mlops_spec.models import CanaryRelease, ModelPin, TrafficSplit
from mlops_spec.project import REPO_ROOT


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


def test_the_mlflow_image_derives_the_passwords_the_contract_derives():
    from images.mlflow import start

    assert (start.ADMIN, start.IDENTITIES) == (contract.ADMIN, contract.IDENTITIES)
    for identity in (start.ADMIN, *start.IDENTITIES):
        assert start.derived_password("s3cret", identity) == contract.derived_password("s3cret", identity)
    assert contract.derived_password("s3cret", "reader") != contract.derived_password("s3cret", "trainer")
    assert len(contract.derived_password("s3cret", "reader")) == 64


def test_the_gateway_reads_the_models_and_rollouts_the_contract_renders(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "images" / "gateway"))
    import gateway  # noqa: PLC0415 - the gateway image's module, on its own path

    green = CanaryRelease.model_validate({
        "model": {"name": "iris-classifier", "version": 3, "sha256": "a" * 64},
        "rollout": {"steps": [10, 100], "bake_time_s": 60, "max_error_rate_increase": 0.01,
                    "max_p99_latency_ratio": 1.5}})
    routes = [contract.GatewayRoute("iris-classifier", ["s-serving-blue-0:8080", "s-serving-blue-1:8080"],
                                    ["s-serving-green-0:8080"], TrafficSplit(blue=100, green=0), green),
              contract.GatewayRoute("diabetes.v2", ["tasks.s-diabetes-blue:8080"], [], TrafficSplit())]
    env = contract.gateway_env(routes, "http://prometheus:9090", 15)
    assert env["ROLLOUT_DIR"] == contract.ROLLOUT_DIR
    env["ROLLOUT_DIR"] = str(tmp_path)  # the volume's mount point, writable here
    models = gateway.models_from_env(env)
    assert [(model.name, [(pool.name, pool.weight, list(pool.replicas)) for pool in model.pools]) for model in models] == [
        (route.name, [("blue", route.traffic.blue, list(route.blue)), ("green", route.traffic.green, list(route.green))])
        for route in routes]
    assert models[1].rollout is None
    rollouts = gateway.controllers_from_env(env, {model.name: (model.rollout, model.green_weight)
                                                  for model in models if model.rollout is not None})
    assert list(rollouts) == ["iris-classifier"]
    assert rollouts["iris-classifier"].green_release == contract.release_id(green.model)
    assert vars(rollouts["iris-classifier"].policy) == {**green.rollout.model_dump(), "steps": (10, 100)}
    assert (tmp_path / "iris-classifier" / "state.json").exists()
    assert contract.rollout_folder("iris-classifier") == f"{contract.ROLLOUT_DIR}/iris-classifier"
    assert gateway.MODEL_NAME.pattern == ModelPin.model_fields["name"].metadata[0].pattern, \
        "the gateway accepts every model name a pin may have"
    assert set(contract.gateway_env(routes[1:], None, None)) == {"GATEWAY_MODELS"}, "no rollout, no Prometheus"
