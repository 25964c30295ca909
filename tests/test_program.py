"""The real Pulumi program under the SDK's mock runtime: graph, ports, limits, protection and secrets."""
from __future__ import annotations

import json
import re
import runpy
from collections import Counter
from pathlib import Path

import bcrypt
import pulumi
import pytest

from components.model_registry import mlflow_password_hashes
from mlops import plan
from mlops_spec import loading
from mlops_spec.contract import ADMIN, IDENTITIES, READER, derived_password
from mlops_spec.loading import load_stages
from mlops_spec.project import REPO_ROOT
from mlops_spec.service_tls import ca_certificate
from tests.conftest import FIXTURE_MODEL_SHA256, FIXTURE_SERVING_IMAGE, FIXTURE_TRAINING_IMAGE, pinned_image
from tests.model_signing import SIGNING_KEY_PEM, TRUSTED_KEYS_PEM

CONTAINER = "docker:index/container:Container"
IMAGE = "docker:index/image:Image"
REMOTE_IMAGE = "docker:index/remoteImage:RemoteImage"
VOLUME = "docker:index/volume:Volume"


def render(stage: str, environments=None, reveal_secrets: bool = False) -> list[plan.PlannedResource]:
    spec = load_stages([stage], *([environments] if environments else []))[0]
    return plan.render(stage, spec, reveal_secrets=reveal_secrets)


def render_dev_with_a_registry() -> list[plan.PlannedResource]:
    """dev with an image registry of its own, as a dev on a swarm has: it pushes what it builds."""
    return plan.render("dev", loading.load_stage("dev", overrides={"image_registry": {"enabled": True}}))


def by_name(resources: list[plan.PlannedResource]) -> dict[str, plan.PlannedResource]:
    return {resource.name: resource for resource in resources}


def type_counts(resources: list[plan.PlannedResource]) -> Counter:
    return Counter(resource.type for resource in resources)


def containers(resources):
    """The containers that run: each workload's, without the ones that only hold its secret files."""
    return [resource for resource in resources if resource.type == CONTAINER and resource.inputs.get("start", True)]


def secret_writers(resources):
    """The containers created, never started, to write a workload's secrets into its volume."""
    return [resource for resource in resources if resource.type == CONTAINER and not resource.inputs.get("start", True)]


def label_map(resource: plan.PlannedResource) -> dict[str, str]:
    return {label["label"]: label["value"] for label in resource.inputs["labels"]}


SHIPPED_MODELS = ("diabetes-regressor", "iris-classifier")


def test_dev_declares_the_whole_stack_and_builds_its_workloads():
    resources = render("dev")
    assert type_counts(resources) == Counter({
        "pulumi:pulumi:Stack": 1, "mlops:stack:MLOpsStack": 1, "pulumi:providers:docker": 1,
        "docker:index/network:Network": 1, "mlops:artifact_store:ArtifactStore": 1,
        "mlops:model_registry:ModelRegistry": 1,
        "mlops:training_environment:TrainingEnvironment": 2, "mlops:model_serving:ModelServing": 1,
        # mlflow, gateway; the two platform images; each model's training and serving image, pushed nowhere
        IMAGE: 2 + 2 + 2 * 2,
        # mlflow-db, artifacts, datasets; the secret files of MLflow and of each model's replicas
        VOLUME: 3 + 1 + 2,
        # mlflow, gateway, each model's replica; the writers of those secret files
        CONTAINER: 2 + 2 + 1 + 2,
    })
    named = by_name(resources)
    assert named["dev-serving-gateway"].parent == "dev-serving"
    assert named["dev-model-registry-server"].parent == "dev-model-registry"
    assert {r.parent for r in resources if r.type.startswith("mlops:") and r.type != "mlops:stack:MLOpsStack"} == {"dev"}
    # Each model's images are its project on the stage's platform image; dev keeps every image on its engine,
    # where `mlops promote` takes them from; the serving platform is built for the chosen runtime.
    assert "dev-training-platform-push" not in named and "dev-serving-oip-platform-push" not in named
    assert named["dev-serving-oip-platform"].inputs["build"]["target"] == "oip"
    assert named["dev-serving-oip-platform"].inputs["build"]["context"] == "images/serving"
    assert named["dev-training-platform"].inputs["build"]["context"] == "images/training"
    revealed = by_name(render("dev", reveal_secrets=True))
    for model in SHIPPED_MODELS:
        images = {"training": f"dev-{model}-training-image", "serving": f"dev-serving-{model}-image"}
        assert named[images["training"]].parent == f"dev-{model}-training"
        assert named[images["serving"]].parent == "dev-serving"
        for role, platform in (("training", "dev-training-platform"), ("serving", "dev-serving-oip-platform")):
            image = named[images[role]]
            assert image.inputs["build"]["context"] == f"models/{model}"
            assert image.inputs["build"]["dockerfile"] == "images/model/Dockerfile"
            assert image.inputs["build"]["args"] == {"PLATFORM_IMAGE": named[platform].inputs["imageName"],
                                                     "MODEL_NAME": model}
            assert platform in image.dependencies
            assert image.inputs["skipPush"] is True and f"{images[role]}-push" not in named
            assert image.inputs["imageName"].startswith(f"mlops-dev/{model}-{role}:")
        replica = named[f"dev-serving-{model}-blue-0"]
        assert (replica.parent, replica.inputs["name"]) == ("dev-serving", f"dev-{model}-blue-0")
        assert images["serving"] in replica.dependencies
        assert {key: value for key, value in label_map(replica).items() if key.startswith("mlops.model")} \
            == {"mlops.model": model, "mlops.model-version": "latest", "mlops.model-sha256": ""}
        blue_env = revealed[f"dev-serving-{model}-blue-0"].inputs["envs"]
        assert {f"MODEL_NAME={model}", "MODEL_VERSION=latest",
                "MLFLOW_TRACKING_URI=http://dev-model-registry:5000"} <= set(blue_env)
    assert sorted(gateway_models(named["dev-serving-gateway"]), key=lambda routed: routed["name"]) == [
        {"name": model, "blue": [f"dev-{model}-blue-0:8080"], "green": [], "weights": {"blue": 100, "green": 0}}
        for model in SHIPPED_MODELS]


def test_a_dev_with_a_registry_pushes_each_models_images_and_its_containers_never_wait_for_a_push():
    named = by_name(render_dev_with_a_registry())
    for model in SHIPPED_MODELS:
        for image in (f"dev-{model}-training-image", f"dev-serving-{model}-image"):
            local, pushed = named[image], named[f"{image}-push"]
            # Containers run the local build of the same inputs.
            assert local.inputs["skipPush"] is True and pushed.inputs["build"] == local.inputs["build"]
            role = "training" if "training" in image else "serving"
            assert pushed.inputs["imageName"].startswith(f"localhost:5001/dev/{model}-{role}:")
            assert "dev-image-registry-server" in pushed.dependencies
        replica = named[f"dev-serving-{model}-blue-0"]
        assert f"dev-serving-{model}-image" in replica.dependencies
        assert f"dev-serving-{model}-image-push" not in replica.dependencies


def test_the_pushes_of_the_models_on_one_platform_image_follow_each_other():
    """Each model's push waits for the previous model's push on the same platform image, so the platform's layers are
    uploaded once and mounted after; pushes on different platform images run side by side."""
    named = by_name(render_dev_with_a_registry())
    pushes = {role: {f"dev-{model}-training-image-push" if role == "training" else f"dev-serving-{model}-image-push"
                     for model in SHIPPED_MODELS} for role in ("training", "serving")}
    every_push = set().union(*pushes.values())
    for role, names in pushes.items():
        waits = {name: [dependency for dependency in named[name].dependencies if dependency in every_push]
                 for name in names}
        chain = [name for name, waited_for in waits.items() if not waited_for]
        assert len(chain) == 1, f"{role}: {waits}"
        while following := [name for name, waited_for in waits.items() if waited_for == [chain[-1]]]:
            chain += following
        assert sorted(chain) == sorted(names), f"{role}: {waits}"


def test_staging_without_a_release_declares_no_serving_and_builds_nothing():
    resources = render("staging")
    counts = type_counts(resources)
    # model registry, image registry and Prometheus only
    assert sorted(c.inputs["name"] for c in containers(resources)) == [
        "staging-image-registry", "staging-model-registry", "staging-prometheus"]
    assert "mlops:model_serving:ModelServing" not in counts
    assert "mlops:training_environment:TrainingEnvironment" not in counts
    built = [r.inputs["build"]["context"] for r in resources if r.type == IMAGE]
    assert sorted(built) == ["images/mlflow", "images/prometheus", "images/registry"]


def test_promoted_prod_runs_the_promoted_digests_with_three_replicas(released_environments):
    resources = render("prod", released_environments)
    named = by_name(resources)
    remote = {r.name: r.inputs["name"] for r in resources if r.type == REMOTE_IMAGE}
    assert remote == {"prod-iris-classifier-training-image": FIXTURE_TRAINING_IMAGE,
                      "prod-serving-iris-classifier-image": FIXTURE_SERVING_IMAGE}
    assert not [r for r in resources if r.type == IMAGE and r.inputs["build"]["context"].startswith(
        ("images/training", "images/serving", "models/"))]
    # diabetes-regressor is declared (with its gates) but not promoted: nothing of it is deployed.
    assert not [r.name for r in resources if "diabetes-regressor" in r.name]
    assert [r.name for r in resources if r.type == "mlops:training_environment:TrainingEnvironment"] \
        == ["prod-iris-classifier-training"]
    replicas = sorted(r.name for r in containers(resources) if r.parent == "prod-serving" and r.name != "prod-serving-gateway")
    assert replicas == [f"prod-serving-iris-classifier-blue-{index}" for index in range(3)]
    env = by_name(render("prod", released_environments, reveal_secrets=True))["prod-serving-iris-classifier-blue-1"].inputs["envs"]
    assert {f"MODEL_SHA256={FIXTURE_MODEL_SHA256}", "MODEL_VERSION=4", "MODEL_NAME=iris-classifier"} <= set(env)
    assert {key: value for key, value in label_map(named["prod-serving-iris-classifier-blue-1"]).items()
            if key.startswith("mlops.model")} \
        == {"mlops.model": "iris-classifier", "mlops.model-version": "4", "mlops.model-sha256": FIXTURE_MODEL_SHA256}
    # Containers run the image ID the RemoteImage resolved, never the mutable name.
    for index in range(3):
        replica = named[f"prod-serving-iris-classifier-blue-{index}"]
        assert replica.inputs["image"].startswith("sha256:") and "prod-serving-iris-classifier-image" in replica.dependencies
    assert gateway_models(named["prod-serving-gateway"]) == [{
        "name": "iris-classifier", "blue": [f"prod-iris-classifier-blue-{index}:8080" for index in range(3)],
        "green": [], "weights": {"blue": 100, "green": 0}}]


def gateway_models(gateway) -> list[dict]:
    """The models the gateway container is told to route (GATEWAY_MODELS)."""
    return json.loads(next(entry.split("=", 1)[1] for entry in gateway.inputs["envs"] if entry.startswith("GATEWAY_MODELS=")))


def test_prod_volumes_are_protected_and_nothing_else_is(released_environments):
    resources = render("prod", released_environments)
    protected = sorted(r.name for r in resources if r.protect)
    assert protected == ["prod-artifact-store-artifacts", "prod-artifact-store-datasets", "prod-artifact-store-metrics",
                         "prod-artifact-store-mlflow-db", "prod-artifact-store-registry-data",
                         "prod-artifact-store-rollout"]
    assert not [r for r in render("dev") if r.protect]


@pytest.mark.parametrize("stage", ["dev", "staging", "prod"])
def test_data_volumes_and_the_network_survive_routine_edits(stage, released_environments):
    resources = render(stage, released_environments)
    volumes = [r for r in resources if r.type == VOLUME]
    network = next(r for r in resources if r.type == "docker:index/network:Network")
    # `labels` is ForceNew on volumes and networks: only labels that never change may be on them.
    for resource in [*volumes, network]:
        assert set(label_map(resource)) <= {"mlops.stack", "mlops.stage", "mlops.component", "mlops.experiment"}, \
            resource.name
    secret_files = [volume for volume in volumes if volume.inputs["name"].endswith("-secrets")]
    assert secret_files, "every stage has workloads with secrets"
    # Data outlives its resource; a workload's secret files do not outlive the workload.
    assert all(volume.retain_on_delete != (volume in secret_files) for volume in volumes)
    assert network.delete_before_replace
    for container in containers(resources):
        assert {"mlops.owner", "mlops.cost-centre"} <= set(label_map(container)), container.name


@pytest.mark.parametrize("stage", ["dev", "staging", "prod"])
def test_container_inputs_are_rendered_as_the_provider_reads_them_back(stage, released_environments):
    for container in containers(render(stage, released_environments)):
        inputs = container.inputs
        assert inputs["memorySwap"] == inputs["memory"], container.name
        assert inputs["cpus"] in ("0.5", "1.0", "2.0"), container.name
        check = inputs["healthcheck"]
        assert {check["interval"], check["timeout"], check["startPeriod"]} <= {"3s", "5s", "20s"}, container.name


def test_the_swap_limit_is_declared_as_the_engine_stores_it():
    """The provider reads `memory_swap` back as the engine stores it and the field is not Computed
    (resourceDockerContainerRead, resource_docker_container_funcs.go), so dropping it would not help: the engine
    stores 2 x memory for an unset limit, and -1 whatever it is given when it has no swap accounting. Declared
    as memory (no swap) where the engine limits swap, and as -1 where it cannot, the next read finds it."""
    from components.engine_facts import NoEngine

    class WithoutSwapAccounting(NoEngine):
        def limits_swap(self) -> bool:
            return False

    spec = load_stages(["dev"])[0]
    for engine, swap_of in ((NoEngine(), lambda memory: memory), (WithoutSwapAccounting(), lambda memory: -1)):
        rendered = containers(plan.render("dev", spec, engines=lambda spec, engine=engine: engine))
        assert len(rendered) >= 4
        for container in rendered:
            assert container.inputs["memorySwap"] == swap_of(container.inputs["memory"]), container.name


def test_go_durations_and_provider_cpus_match_the_provider():
    from components.runtimes import go_duration
    from mlops_spec.encoding import provider_cpus

    assert [go_duration(s) for s in (0, 5, 59, 60, 90, 3600, 3661)] == ["0s", "5s", "59s", "1m0s", "1m30s", "1h0m0s", "1h1m1s"]
    # terraform-provider-docker v4.5.0 nanoInt64ToDecimalString, worked through by hand.
    assert [provider_cpus(c) for c in (1, 0.5, 10, 1.5, 0.25, 64, 20)] == ["1.0", "0.5", "10.", "1.5", "0.25", "64.0", "20."]


def test_pulumi_up_waits_for_health_except_for_dev_replicas_following_latest(released_environments):
    followers = []
    for stage in ("dev", "prod"):
        for container in containers(render(stage, released_environments)):
            follows_latest = stage == "dev" and label_map(container).get("mlops.model-version") == "latest"
            assert container.inputs.get("wait", False) is not follows_latest, container.name
            if follows_latest:
                followers.append(container.name)
            else:
                assert container.inputs["waitTimeout"] >= 60, container.name
    assert sorted(followers) == [f"dev-serving-{model}-blue-0" for model in SHIPPED_MODELS]


def test_promoted_images_are_pulled_from_the_stages_own_registry_with_its_credentials(released_environments):
    resources = render("prod", released_environments)
    provider = next(r for r in resources if r.type == "pulumi:providers:docker")
    assert provider.inputs["registryAuth"] == "[secret]"
    revealed = plan.render("prod", load_stages(["prod"], released_environments)[0],
                           config={"mlops:registryPassword": "s3cret"}, reveal_secrets=True)
    auth = json.loads(next(r for r in revealed if r.type == "pulumi:providers:docker").inputs["registryAuth"])
    assert [(a["address"], a["username"], a["password"]) for a in auth] == [("localhost:5201", "mlops", "s3cret")]
    for remote in (r for r in resources if r.type == REMOTE_IMAGE):
        assert remote.inputs["name"].startswith("localhost:5201/prod/"), remote.name
        assert remote.inputs["platform"] == "linux/amd64", remote.name
        # Pulled only once the registry answers (its container waits for health).
        assert "prod-image-registry-server" in remote.dependencies, remote.name


def test_every_build_names_its_platform_and_builds_with_buildkit():
    for image in (r for r in render("dev") if r.type == IMAGE):
        assert image.inputs["build"]["platform"] == "linux/amd64", image.name
        assert image.inputs["build"]["builderVersion"] == "BuilderBuildKit", image.name


@pytest.mark.parametrize("stage, ports", [
    ("dev", {"dev-model-registry-server": 5000, "dev-serving-gateway": 8080}),
    ("prod", {"prod-model-registry-server": 5200, "prod-image-registry-server": 5201, "prod-serving-gateway": 8280,
              "prod-monitoring-prometheus": 5290}),
])
def test_published_ports_bind_to_loopback(stage, ports, released_environments):
    resources = render(stage, released_environments)
    published = {r.name: r.inputs["ports"] for r in containers(resources) if r.inputs.get("ports")}
    assert {name: value[0]["external"] for name, value in published.items()} == ports
    assert {value[0]["ip"] for value in published.values()} == {"127.0.0.1"}


@pytest.mark.parametrize("stage", ["dev", "staging", "prod"])
def test_every_container_is_hardened_limited_and_labelled(stage, released_environments):
    resources = render(stage, released_environments)
    assert containers(resources)
    for container in containers(resources):
        inputs = container.inputs
        assert inputs["user"] == "10001:10001", container.name
        assert inputs["readOnly"] is True, container.name
        assert inputs["securityOpts"] == ["no-new-privileges:true"], container.name
        assert inputs["capabilities"] == {"drops": ["ALL"]}, container.name
        assert inputs["memory"] > 0 and float(inputs["cpus"]) > 0, container.name
        assert inputs["healthcheck"]["tests"][0] == "CMD", container.name
        assert inputs["restart"] == "unless-stopped", container.name
        labels = label_map(container)
        assert labels["mlops.stage"] == stage and labels["mlops.stack"] == stage, container.name
        assert labels["mlops.component"], container.name
    # The writers of secret files never start; should someone start one, it is as bare, but for the writable
    # root that the provider's uploads need, and it reaches no network.
    assert secret_writers(resources)
    for writer in secret_writers(resources):
        inputs = writer.inputs
        assert (inputs["start"], inputs["mustRun"], inputs["networkMode"]) == (False, False, "none"), writer.name
        assert (inputs["user"], inputs["securityOpts"], inputs["capabilities"], inputs["ipcMode"]) == (
            "10001:10001", ["no-new-privileges:true"], {"drops": ["ALL"]}, "none"), writer.name
        assert "readOnly" not in inputs, writer.name


@pytest.mark.parametrize("stage", ["dev", "staging", "prod"])
def test_physical_names_carry_the_stack(stage, released_environments):
    for resource in render(stage, released_environments):
        for key in ("name", "imageName"):
            value = resource.inputs.get(key)
            if value and resource.type.startswith("docker:index/") and resource.type != REMOTE_IMAGE:
                assert value.startswith(f"{stage}-") or f"/{stage}/" in value or value.startswith(f"mlops-{stage}/"), \
                    f"{resource.name}: {key}={value}"


def secret_values(config: dict[str, str]) -> list[str]:
    """The stage's secrets and every password derived from them."""
    mlflow = config["mlops:mlflowPassword"]
    return [*config.values(), *(derived_password(mlflow, name) for name in (ADMIN, *IDENTITIES))]


@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_the_stage_secrets_are_secret_everywhere(stage, released_environments):
    """dev with a registry of its own, which it pushes into with the registry's password; prod as shipped."""
    resources = render_dev_with_a_registry() if stage == "dev" else render(stage, released_environments)
    rendered = json.dumps([r.to_json() for r in resources])
    for secret in secret_values(plan.PLAN_SECRETS):
        assert secret not in rendered
    # No container's configuration holds a secret: each workload's secrets are uploads of its writer.
    for container in containers(resources):
        assert container.inputs.get("envs") != plan.SECRET_PLACEHOLDER, container.name
    replicas = [r for r in containers(resources) if label_map(r)["mlops.component"] == "model-serving"]
    assert len(replicas) == (2 if stage == "dev" else 3)
    slots = {replica.name.rsplit("-", 1)[0] for replica in replicas}
    writers = secret_writers(resources)
    assert sorted(writer.name for writer in writers) == sorted(
        f"{workload}-secrets-writer" for workload in (f"{stage}-image-registry-server", f"{stage}-model-registry-server",
                                                      *slots))
    for writer in writers:
        assert writer.inputs["uploads"] == plan.SECRET_PLACEHOLDER, writer.name
    pushed = [r for r in resources if r.type == IMAGE and r.name.endswith("-push")]
    assert len(pushed) == (4 if stage == "dev" else 0)
    for image in pushed:
        assert image.inputs["registry"] == plan.SECRET_PLACEHOLDER, image.name


def test_the_mlflow_password_hashes_are_stable_per_stage_and_salted_per_stage_and_identity():
    def by_identity(stack: str) -> dict[str, str]:
        return dict(line.split(":", 1) for line in mlflow_password_hashes("mlflow-secret", stack).split("\n"))

    hashes = by_identity("prod")
    assert list(hashes) == [ADMIN, *IDENTITIES]
    # Werkzeug's `method$salt$hash`, which MLflow's auth store checks logins against.
    assert all(value.startswith("scrypt:32768:8:1$") and len(value.split("$")) == 3 for value in hashes.values())
    salts = [value.split("$")[1] for value in hashes.values()]
    assert len(set(salts)) == len(salts)
    # Rendered again, unchanged (the container is not replaced); another stage salts otherwise.
    mlflow_password_hashes.cache_clear()
    assert mlflow_password_hashes("mlflow-secret", "prod") == "\n".join(f"{k}:{v}" for k, v in hashes.items())
    assert not set(salts) & {value.split("$")[1] for value in by_identity("staging").values()}


def test_each_container_gets_only_the_mlflow_credential_it_needs(released_environments):
    config = {"mlops:registryPassword": "registry-secret", "mlops:mlflowPassword": "mlflow-secret"}
    spec = load_stages(["prod"], released_environments)[0]
    named = by_name(plan.render("prod", spec, config=config, reveal_secrets=True))
    # The MLflow container gets every user's password hash, and neither the stage's secret nor a password ...
    mlflow = named["prod-model-registry-server"].inputs
    assert "MLOPS_MLFLOW_PASSWORD_HASHES_FILE=/run/secrets/mlflow-password-hashes" in mlflow["envs"]
    assert named["prod-model-registry-server-secrets-writer"].inputs["uploads"] == [
        {"file": "/run/secrets/mlflow-password-hashes", "content": mlflow_password_hashes("mlflow-secret", "prod"),
         "permissions": "0444"}]
    passwords = ["mlflow-secret", *(derived_password("mlflow-secret", identity) for identity in (ADMIN, *IDENTITIES))]
    assert not [password for password in passwords if password in json.dumps(mlflow)]
    assert not [password for password in passwords
                if password in json.dumps(named["prod-model-registry-server-secrets-writer"].inputs)]
    # ... and a replica gets only the reader's, as a file.
    replica = named["prod-serving-iris-classifier-blue-0"].inputs
    assert {"MLFLOW_TRACKING_USERNAME=reader", "MLFLOW_TRACKING_PASSWORD_FILE=/run/secrets/mlflow-reader-password"} \
        <= set(replica["envs"])
    assert {"volumeName": "prod-iris-classifier-blue-secrets", "containerPath": "/run/secrets", "readOnly": True} \
        in replica["volumes"]
    assert named["prod-serving-iris-classifier-blue-secrets-writer"].inputs["uploads"] == [
        {"file": "/run/secrets/mlflow-reader-password", "content": derived_password("mlflow-secret", READER),
         "permissions": "0444"}]
    assert not [password for password in passwords if password in json.dumps(replica)]
    for name in ("prod-image-registry-server", "prod-serving-gateway"):
        assert not [env for env in named[name].inputs.get("envs", []) if env.startswith(("MLOPS_MLFLOW", "MLFLOW_TRACKING_P"))]


def test_secrets_never_reach_exports_and_derived_values_stay_secret():
    from components.image_registry import htpasswd_entry
    from mlops.program import declare_stack

    # dev with a registry of its own, so the registry's password is in the program too.
    spec = loading.load_stage("dev", overrides={"image_registry": {"enabled": True}})
    password = "correct horse battery staple"
    config = {"mlops:registryPassword": password, "mlops:mlflowPassword": "tr0ub4dor&3"}
    plan.mock_runtime("dev", config)

    @pulumi.runtime.test
    def check():
        stack = declare_stack("dev", spec)
        exports = stack.exports()
        # `models` is a mapping of Outputs: resolve it whole, secret flags included.
        outputs = {key: pulumi.Output.from_input(value) for key, value in exports.items()}
        secret_flags = pulumi.Output.all(*[value.is_secret() for value in outputs.values()])
        values = pulumi.Output.all(*outputs.values())

        def verify(args):
            flags, resolved = args
            assert not any(flags), f"{stack.urn}: no export is secret"
            for secret in secret_values(config):
                assert secret not in json.dumps(resolved), "a secret leaked into an export"
            assert set(exports) >= {"network", "model_registry_url", "image_registry", "serving_endpoint", "models"}
            models = dict(zip(outputs, resolved))["models"]
            assert {model: sorted(digests) for model, digests in models.items()} == {
                model: ["serving_image_digest", "training_image", "training_image_digest"] for model in SHIPPED_MODELS}
            for model, digests in models.items():
                assert f"/dev/{model}-training:" in digests["training_image"], digests

        return pulumi.Output.all(secret_flags, values).apply(verify)

    check()
    entry = htpasswd_entry("mlops", password, "dev")
    assert entry == htpasswd_entry("mlops", password, "dev"), "a stable salt keeps `pulumi up` from replacing the registry"
    assert entry.startswith("mlops:$2b$10$") and password not in entry, "bcrypt at cost 10 at least"
    assert bcrypt.checkpw(password.encode(), entry.split(":", 1)[1].encode())
    assert htpasswd_entry("mlops", password, "prod") != entry, "each stack salts its own"


def test_only_ports_published_off_loopback_speak_tls_and_the_stack_exports_their_cas():
    from mlops.program import declare_stack

    config = {"mlops:registryPassword": "registry-secret", "mlops:mlflowPassword": "mlflow-secret",
              "mlops:trustedModelKeys": TRUSTED_KEYS_PEM}
    exported = {}
    for stage in ("dev", "cluster"):
        plan.mock_runtime(stage, config)

        @pulumi.runtime.test
        def check(stage=stage):
            exports = declare_stack(stage, load_stages([stage])[0]).exports()
            keys = list(exports)
            return pulumi.Output.all(*exports.values()).apply(lambda values: exported.update({stage: dict(zip(keys, values))}))

        check()
    assert exported["dev"]["model_registry_url"].startswith("http://127.0.0.1:")
    assert "model_registry_ca" not in exported["dev"] and "image_registry_ca" not in exported["dev"], "loopback: plain"
    cluster = exported["cluster"]
    assert cluster["model_registry_url"] == "https://0.0.0.0:5300"
    assert cluster["model_registry_ca"] == ca_certificate("mlflow-secret", "cluster", "model-registry")
    assert cluster["image_registry_ca"] == ca_certificate("registry-secret", "cluster", "image-registry")
    dev = by_name(render("dev", reveal_secrets=True))
    mlflow = dev["dev-model-registry-server"].inputs
    assert not any(variable.startswith("MLOPS_TLS_") for variable in mlflow["envs"])
    assert mlflow["healthcheck"]["tests"][-2].startswith("http://127.0.0.1:5000/")
    assert all("MLOPS_MLFLOW_CA_CERTIFICATE" not in " ".join(replica.inputs["envs"])
               for replica in serving_replicas(dev, "iris-classifier"))


def test_content_tag_changes_exactly_when_inputs_change(tmp_path, monkeypatch):
    from components import images

    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM base\n")
    (context / "train.py").write_text("print(1)\n")
    (context / "wheels").mkdir()
    (context / ".dockerignore").write_text("**/__pycache__\n**/*.pyc\nwheels/.incoming\n")
    monkeypatch.setattr(images, "project_root", lambda: tmp_path)
    amd64 = images.BuildSettings(base_image="b", platform="linux/amd64")
    first = images.content_tag("ctx", amd64)
    # What .dockerignore leaves out never reaches the build, so it never changes the tag.
    (context / "__pycache__").mkdir()
    (context / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"compiled")
    (context / "wheels" / ".incoming").mkdir()
    (context / "wheels" / ".incoming" / "x.whl").write_text("a download in progress")
    assert images.content_tag("ctx", amd64) == first
    assert images.content_tag("ctx", images.BuildSettings(base_image="other", platform="linux/amd64")) != first
    assert images.content_tag("ctx", images.BuildSettings(base_image="b", platform="linux/arm64")) != first
    assert images.content_tag("ctx", amd64, target="mlserver") != first
    # The wheels are what the build installs: the provider hashes them, and so does the tag.
    (context / "wheels" / "x.whl").write_text("derived from the lock")
    with_wheel = images.content_tag("ctx", amd64)
    assert with_wheel != first
    # The executable bit, the one mode bit a clone does not take from its umask, changes the tag.
    (context / "train.py").chmod(0o755)
    assert images.content_tag("ctx", amd64) != with_wheel
    (context / "train.py").chmod(0o644)
    assert images.content_tag("ctx", amd64) == with_wheel
    (context / "train.py").write_text("print(2)\n")
    assert images.content_tag("ctx", amd64) != with_wheel


def promote_diabetes_regressor(environments, stage: str) -> None:
    """`stage` serves diabetes-regressor next to the fixture's iris-classifier."""
    import yaml

    file = environments / f"{stage}.yaml"
    data = yaml.safe_load(file.read_text())
    data["models"]["diabetes-regressor"]["release"] = {
        "version": 2, "sha256": "5" * 64,
        "images": {role: pinned_image(stage, f"diabetes-regressor-{role}", "sha256:" + digit * 64)
                   for role, digit in (("training", "6"), ("serving", "7"))}}
    file.write_text(yaml.safe_dump(data, sort_keys=False))


def test_green_release_gets_its_share_of_traffic_of_its_model_only(released_environments):
    import yaml

    promote_diabetes_regressor(released_environments, "staging")
    file = released_environments / "staging.yaml"
    data = yaml.safe_load(file.read_text())
    data["models"]["iris-classifier"] |= {"traffic": {"blue": 90, "green": 10},
                                          "green": {"version": 5, "sha256": "4" * 64}}
    file.write_text(yaml.safe_dump(data))
    resources = render("staging", released_environments, reveal_secrets=True)
    named = by_name(resources)
    for index in (0, 1):
        green = named[f"staging-serving-iris-classifier-green-{index}"]
        assert green.inputs["name"] == f"staging-iris-classifier-green-{index}"
        assert {"MODEL_NAME=iris-classifier", "MODEL_VERSION=5", f"MODEL_SHA256={'4' * 64}"} <= set(green.inputs["envs"])
        assert label_map(green)["mlops.model-version"] == "5"
        # Without a serving image of its own, green runs blue's.
        assert green.inputs["image"] == named[f"staging-serving-iris-classifier-blue-{index}"].inputs["image"]
    replicas = sorted(r.name for r in containers(resources) if label_map(r)["mlops.component"] == "model-serving")
    assert replicas == ["staging-serving-diabetes-regressor-blue-0", "staging-serving-diabetes-regressor-blue-1",
                        "staging-serving-iris-classifier-blue-0", "staging-serving-iris-classifier-blue-1",
                        "staging-serving-iris-classifier-green-0", "staging-serving-iris-classifier-green-1"]
    assert "MODEL_VERSION=2" in named["staging-serving-diabetes-regressor-blue-0"].inputs["envs"]
    assert "staging-serving-iris-classifier-green-image" not in named
    # The gateway routes each model to its own pools, by its own weights.
    assert sorted(gateway_models(named["staging-serving-gateway"]), key=lambda routed: routed["name"]) == [
        {"name": "diabetes-regressor", "blue": ["staging-diabetes-regressor-blue-0:8080",
                                                "staging-diabetes-regressor-blue-1:8080"],
         "green": [], "weights": {"blue": 100, "green": 0}},
        {"name": "iris-classifier", "blue": ["staging-iris-classifier-blue-0:8080", "staging-iris-classifier-blue-1:8080"],
         "green": ["staging-iris-classifier-green-0:8080", "staging-iris-classifier-green-1:8080"],
         "weights": {"blue": 90, "green": 10}}]


def test_a_green_serving_image_is_pulled_for_its_model_only(released_environments):
    import yaml

    promote_diabetes_regressor(released_environments, "staging")
    green_image = pinned_image("staging", "iris-classifier-serving", "sha256:" + "8" * 64)
    file = released_environments / "staging.yaml"
    data = yaml.safe_load(file.read_text())
    data["models"]["iris-classifier"] |= {"traffic": {"blue": 50, "green": 50}, "green": {
        "version": 5, "sha256": "4" * 64, "serving_image": green_image}}
    file.write_text(yaml.safe_dump(data))
    named = by_name(render("staging", released_environments))
    assert named["staging-serving-iris-classifier-green-image"].inputs["name"] == green_image
    assert "staging-serving-iris-classifier-green-image" in named["staging-serving-iris-classifier-green-0"].dependencies
    assert "staging-serving-iris-classifier-green-image" not in named["staging-serving-iris-classifier-blue-0"].dependencies
    assert not [name for name in named if "diabetes-regressor-green" in name]


@pytest.fixture
def project_copy(tmp_path, monkeypatch):
    """The build contexts and model projects copied to `tmp_path`, which is the project worked on: a test may
    edit them."""
    import shutil

    from components import images
    from mlops_spec.project import REPO_ROOT

    for folder in ("images", "models"):
        shutil.copytree(REPO_ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("wheels"))
    monkeypatch.setattr(images, "project_root", lambda: tmp_path)
    return tmp_path


def inputs_changed_by(edited: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """dev's rendered inputs by resource before and after appending a line to `edited`."""
    before = {r.name: r.inputs for r in render("dev")}
    assert before == {r.name: r.inputs for r in render("dev")}, "an unchanged context must change nothing"
    edited.write_text(edited.read_text() + "\n# a change\n")
    return before, {r.name: r.inputs for r in render("dev")}


def changed_names(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    assert before.keys() == after.keys()
    changed = sorted(name for name in before if before[name] != after[name])
    for name in changed:
        if "-blue-" in name:  # a replica changes by the image it runs, nothing else
            assert [key for key in before[name] if before[name][key] != after[name][key]] == ["image"], name
    return changed


def test_a_changed_build_context_replaces_exactly_the_containers_that_run_it(project_copy):
    # The serving platform: every model's serving image stands on it.
    assert changed_names(*inputs_changed_by(project_copy / "images" / "serving" / "Dockerfile")) == sorted([
        "dev-serving-oip-platform", *(f"dev-serving-{model}-{suffix}" for model in SHIPPED_MODELS
                                      for suffix in ("blue-0", "blue-secrets-writer", "image"))])
    # The training platform: every model's training image, and no container.
    assert changed_names(*inputs_changed_by(project_copy / "images" / "training" / "Dockerfile")) == sorted([
        "dev-training-platform", *(f"dev-{model}-training-image" for model in SHIPPED_MODELS)])
    # A model's project: both of its images, not the platforms'.
    assert changed_names(*inputs_changed_by(project_copy / "models" / "iris-classifier" / "iris_model" / "train.py")) == [
        "dev-iris-classifier-training-image", "dev-serving-iris-classifier-blue-0",
        "dev-serving-iris-classifier-blue-secrets-writer", "dev-serving-iris-classifier-image"]


def test_a_change_in_one_models_project_rebuilds_that_models_images_only(project_copy):
    before, after = inputs_changed_by(project_copy / "models" / "diabetes-regressor" / "diabetes_model" / "train.py")
    rebuilt = ["dev-diabetes-regressor-training-image", "dev-serving-diabetes-regressor-image"]
    assert changed_names(before, after) == sorted([*rebuilt, "dev-serving-diabetes-regressor-blue-0",
                                                   "dev-serving-diabetes-regressor-blue-secrets-writer"])
    for name in rebuilt:
        # A new content tag, in the same repository.
        (old_repository, old_tag), (new_repository, new_tag) = (
            inputs[name]["imageName"].rsplit(":", 1) for inputs in (before, after))
        assert old_repository == new_repository and old_tag != new_tag, name
        assert after[name]["build"]["context"] == "models/diabetes-regressor"
    # iris-classifier's images and replicas are the same bytes: nothing of it is rebuilt or replaced.
    untouched = [name for name in before if "iris-classifier" in name]
    assert len(untouched) == 6  # its training environment, its two images, its replica, its secret files' volume and writer
    assert {name: json.dumps(before[name], sort_keys=True) for name in untouched} \
        == {name: json.dumps(after[name], sort_keys=True) for name in untouched}


@pytest.mark.parametrize("models", [("iris-classifier",), SHIPPED_MODELS])
def test_the_platform_images_are_built_once_per_stage_whatever_the_number_of_models(environments, models):
    import yaml

    file = environments / "dev.yaml"
    data = yaml.safe_load(file.read_text())
    data["models"] = {model: {"release": {"version": "latest"}} for model in models}
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    resources = render("dev", environments)
    named = by_name(resources)
    platforms = {r.name: r for r in resources if r.type == IMAGE and r.name.endswith("-platform")}
    assert sorted(platforms) == ["dev-serving-oip-platform", "dev-training-platform"]
    assert {r.parent for r in platforms.values()} == {"dev"}
    model_images = [r for r in resources if r.type == IMAGE and r.inputs["build"]["context"].startswith("models/")]
    assert sorted(r.name for r in model_images) == sorted(
        image for model in models for image in (f"dev-{model}-training-image", f"dev-serving-{model}-image"))
    for image in model_images:
        platform = "dev-training-platform" if "-training-image" in image.name else "dev-serving-oip-platform"
        assert platform in image.dependencies, image.name
        assert image.inputs["build"]["args"]["PLATFORM_IMAGE"] == named[platform].inputs["imageName"], image.name


def test_the_pulumi_entry_point_declares_what_plan_renders():
    import runpy

    from mlops_spec.project import REPO_ROOT

    monitor = plan.mock_runtime("staging")

    @pulumi.runtime.test
    def program():
        runpy.run_path(str(REPO_ROOT / "__main__.py"))

    program()
    assert [(r.type, r.name) for r in monitor.planned()] == [(r.type, r.name) for r in render("staging")]


def test_the_pulumi_entry_point_reports_a_bad_spec_without_a_traceback(environments, monkeypatch):
    import runpy

    from mlops_spec import loading
    from mlops_spec.project import REPO_ROOT

    lines = (environments / "prod.yaml").read_text().splitlines()
    line = lines.index("  replicas: 3") + 1
    lines[line - 1] = "  replicas: 1"
    (environments / "prod.yaml").write_text("\n".join(lines) + "\n")
    # The entry point reads the shipped environments/; point its default at the broken copy.
    monkeypatch.setattr(loading.load_stages, "__defaults__", (environments,))
    plan.mock_runtime("prod")
    with pytest.raises(pulumi.RunError, match=rf"prod.yaml:{line}: serving.replicas: prod serves each model with at "
                                              r"least 2 replicas, got 1") as raised:
        runpy.run_path(str(REPO_ROOT / "__main__.py"))
    assert "Traceback" not in str(raised.value)


def declare_in_dev(environments, model: str, **settings) -> None:
    """dev.yaml with `settings` (replicas, sampling, batching, ...) added to `model`'s declaration."""
    import yaml

    file = environments / "dev.yaml"
    data = yaml.safe_load(file.read_text())
    data["models"][model] |= settings
    file.write_text(yaml.safe_dump(data, sort_keys=False))


def data_mounts(inputs: dict) -> list[dict]:
    """A container's volumes but the one its secret files are in."""
    return [mount for mount in inputs.get("volumes", []) if mount["containerPath"] != "/run/secrets"]


def serving_replicas(named: dict[str, plan.PlannedResource], model: str) -> list[plan.PlannedResource]:
    return [named[name] for name in sorted(named) if re.fullmatch(rf"dev-serving-{model}-blue-\d+", name)]


def test_the_datasets_volume_of_a_single_host_stage_and_the_samples_volume_when_sampling_is_declared(environments):
    declare_in_dev(environments, "iris-classifier", replicas=2, sampling={"fraction": 0.25, "max_mb": 3})
    named = by_name(render("dev", environments, reveal_secrets=True))
    for volume, physical in (("datasets", "dev-datasets"), ("samples", "dev-samples")):
        declared = named[f"dev-artifact-store-{volume}"]
        assert (declared.type, declared.inputs["name"], declared.parent) == (VOLUME, physical, "dev-artifact-store")
        assert declared.retain_on_delete and not declared.protect
        assert label_map(declared) == {"mlops.stack": "dev", "mlops.stage": "dev", "mlops.component": "artifact-store"}
    sampled = serving_replicas(named, "iris-classifier")
    assert [replica.name for replica in sampled] == ["dev-serving-iris-classifier-blue-0",
                                                     "dev-serving-iris-classifier-blue-1"]
    for index, replica in enumerate(sampled):
        inputs = replica.inputs
        # Mounted writable (no readOnly in the mount) on the read-only root: each replica appends to its own file.
        assert data_mounts(inputs) == [{"volumeName": "dev-samples", "containerPath": "/data/samples"}]
        assert (inputs["readOnly"], inputs["user"]) == (True, "10001:10001")
        assert {"SAMPLE_FRACTION=0.25", f"SAMPLES_FILE=/data/samples/dev-iris-classifier-blue-{index}.jsonl",
                f"SAMPLES_MAX_BYTES={3 * 1024 * 1024}"} <= set(inputs["envs"])
    # Sampling is the model's: the other model's replicas keep nothing, and the gateway mounts nothing.
    [unsampled] = serving_replicas(named, "diabetes-regressor")
    assert data_mounts(unsampled.inputs) == []
    assert not any(str(entry).startswith(("SAMPLE_FRACTION", "SAMPLES_")) for entry in unsampled.inputs["envs"])
    assert "volumes" not in named["dev-serving-gateway"].inputs


def test_declared_batching_reaches_every_replica_of_its_model_and_only_then(environments):
    declare_in_dev(environments, "diabetes-regressor", replicas=2,
                   batching={"max_batch_size": 32, "max_batch_time_ms": 2.5})
    batched = by_name(render("dev", environments, reveal_secrets=True))
    replicas = serving_replicas(batched, "diabetes-regressor")
    assert len(replicas) == 2
    for replica in replicas:
        assert {"MAX_BATCH_SIZE=32", "MAX_BATCH_TIME_MS=2.5"} <= set(replica.inputs["envs"]), replica.name
    for unbatched in (serving_replicas(batched, "iris-classifier")[0],
                      by_name(render("dev", reveal_secrets=True))["dev-serving-diabetes-regressor-blue-0"]):
        assert not any(str(entry).startswith("MAX_BATCH") for entry in unbatched.inputs["envs"]), unbatched.name


@pytest.mark.parametrize("stage", ["dev", "staging", "prod"])
def test_no_shipped_stage_samples_requests(stage, released_environments):
    spec = load_stages([stage], released_environments)[0]
    assert spec.models and all(deployment.sampling is None for deployment in spec.models.values())
    assert not spec.samples
    resources = render(stage, released_environments, reveal_secrets=True)
    assert not [r for r in resources if r.type == VOLUME and r.inputs["name"] == f"{stage}-samples"]
    assert [r.inputs["name"] for r in resources if r.type == VOLUME and r.name.endswith("-datasets")] == [f"{stage}-datasets"]
    replicas = [r for r in containers(resources) if label_map(r)["mlops.component"] == "model-serving"]
    assert replicas
    for replica in replicas:
        assert data_mounts(replica.inputs) == [], replica.name
        assert not any(str(entry).startswith(("SAMPLE_FRACTION", "SAMPLES_")) for entry in replica.inputs["envs"])


def test_every_replica_and_mlflow_get_the_stages_trusted_model_keys_and_nothing_to_sign_with(released_environments):
    spec = load_stages(["prod"], released_environments)[0]
    named = by_name(plan.render("prod", spec, config={"mlops:trustedModelKeys": TRUSTED_KEYS_PEM}, reveal_secrets=True))
    replicas = [resource for name, resource in named.items() if re.fullmatch(r"prod-serving-.+-blue-\d+", name)]
    assert replicas
    # MLflow takes a version's signature only if one of them made it.
    for replica in [*replicas, named["prod-model-registry-server"]]:
        assert f"MODEL_SIGNING_KEYS={TRUSTED_KEYS_PEM}" in replica.inputs["envs"], replica.name
    assert not [resource.name for resource in named.values()
                if SIGNING_KEY_PEM.splitlines()[1] in json.dumps(resource.inputs)], "no container holds the private key"


RSA_PUBLIC_KEY = """-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDrzLwthpSNmUHotVOA/svWxTp2
Ii/CX5IwRW8hwi0eJMyy54Izq2BxB37GhRG8wC6/+FeAsIJ162qw1C407z0Gl0ih
GYo0oTu4m9FmzXJ/RkEt+wtQczfOO3rdJ0fzqoA444RD94cPgpJqJlPjeii9Ierj
CFGuaY/M0MUtXnPn/wIDAQAB
-----END PUBLIC KEY-----
"""


@pytest.mark.parametrize("keys, message", [
    (None, "a stage that serves a model needs the public keys its replicas accept model signatures from: "
           "`openssl pkey -pubout < signing-key.pem | pulumi config set mlops:trustedModelKeys --stack prod`"),
    ("not a key", "the value holds no PEM public key"),
    (RSA_PUBLIC_KEY, "the value: PEM block 1 is not an Ed25519 public key"),
])
def test_a_serving_stage_without_usable_trusted_keys_fails_before_anything_is_declared(released_environments,
                                                                                         monkeypatch, keys, message):
    monkeypatch.setattr(loading.load_stages, "__defaults__", (released_environments,))
    plan.mock_runtime("prod")
    config = {key: value for key, value in plan.PLAN_SECRETS.items()}
    pulumi.runtime.set_all_config({**config, **({"mlops:trustedModelKeys": keys} if keys else {})},
                                  secret_keys=list(config))
    with pytest.raises(pulumi.RunError) as raised:
        runpy.run_path(str(REPO_ROOT / "__main__.py"))
    assert str(raised.value).startswith(f"Pulumi.prod.yaml: mlops:trustedModelKeys: {message}"), str(raised.value)
    assert "\n" not in str(raised.value)
