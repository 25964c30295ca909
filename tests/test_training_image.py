"""The training and MLflow images on a real Docker engine: hermetic cached builds, and `mlops train` registering
byte-identical models as consecutive versions in a hardened MLflow server."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from components.engine_facts import DockerCli
from components.images import MODEL_DOCKERFILE, BuildSettings, built_image_name, model_image_name, model_layer
from components.model_registry import mlflow_password_hashes
from components.workload import HttpHealth, http_probe
from mlops.modelstore import BasicAuth, MlflowStore, StoreError
from mlops_spec.contract import (
    ADMIN,
    IDENTITIES,
    MLFLOW_PASSWORD,
    MLFLOW_PORT,
    MODEL_SIGNING_KEY,
    PROMOTER,
    READER,
    TRAINER,
    derived_password,
    secret_variable,
)
from mlops_spec.models import DockerHost, HealthCheck
from mlops_spec.project import ENVIRONMENTS_DIR, REPO_ROOT
from mlops_spec.service_tls import server_tls
from tests.conftest import fetch_build_inputs
from tests.model_signing import SESSION_SIGNER, SIGNING_KEY_PEM, TRUSTED_KEYS_PEM, ModelSigner, manifest_of
from tests.test_secrets_in_argv import command_lines

sys.path.insert(0, str(REPO_ROOT / "images" / "serving"))
from serving.registry import MlflowRegistry, ModelPin, ModelRefused  # noqa: E402

pytestmark = pytest.mark.docker

BASE_IMAGE = "mlops-base:bookworm"
# The CLI of the code under test, as in the other tests (a console script would run its own install's code).
MLOPS = [sys.executable, "-m", "mlops"]
HARDENED = ["--read-only", "--tmpfs", "/tmp", "--user", "10001:10001",
            "--security-opt", "no-new-privileges:true", "--cap-drop", "ALL"]


def docker(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, env=env)


def build(context: Path, tag: str, *options: str, build_args: dict[str, str] | None = None) -> list[str]:
    """Build `context` as `tag`; return the steps that ran instead of coming from the build cache."""
    arguments = [f"--build-arg={key}={value}" for key, value in (build_args or {"BASE_IMAGE": BASE_IMAGE}).items()]
    built = subprocess.run(["docker", "build", *arguments, *options, "-t", tag, str(context)],
                           check=True, capture_output=True, text=True, env={**os.environ, "BUILDKIT_PROGRESS": "plain"})
    return uncached_steps(built.stdout + built.stderr)


def local_build_settings() -> BuildSettings:
    """What the program and `mlops train` build with on this engine: the base image by tag and by its ID here."""
    return BuildSettings(base_image=BASE_IMAGE, platform="linux/amd64",
                         base_image_id=DockerCli("tests", DockerHost()).image_id(BASE_IMAGE))


def build_model_image(stack: str, model: str, image: str, target: str | None = None) -> tuple[str, str]:
    """Platform image `image` (at `target`) and model `model`'s layer on it, as the stack builds them
    (components/images.py): returns (platform image, model image), both by their content-tagged names."""
    settings = local_build_settings()
    context = f"images/{image}"
    layer = model_layer(stack, image, context, settings, model, target)
    build(REPO_ROOT / context, layer.platform_image, *(["--target", target] if target else []),
          build_args=settings.build_args)
    model_image = model_image_name(stack, image, context, settings, model, target=target)
    build(REPO_ROOT / layer.context, model_image, "--file", str(REPO_ROOT / MODEL_DOCKERFILE),
          build_args=layer.build_args)
    return layer.platform_image, model_image


def stage_environments(environments: Path, stack: str, model: str) -> Path:
    """`environments` with test stage `stack`, which builds its images and trains and serves `model`."""
    shutil.copytree(ENVIRONMENTS_DIR, environments)
    (environments / f"{stack}.yaml").write_text(yaml.safe_dump({
        "kind": "dev",
        "model_registry": {"port": {"host_port": None}},
        "image_registry": {"enabled": False, "port": {"host_port": None}},
        "serving": {"build": "images/serving", "port": {"host_port": None}},
        "training": {"build": "images/training", "base_image": BASE_IMAGE},
        "models": {model: {"release": {"version": "latest"}}},
        "experiment": {"name": stack, "owner": "tests", "source_stage": "dev",
                       "created_at": "2026-01-01T00:00:00Z", "expires_at": "2099-01-01T00:00:00Z"},
    }))
    return environments


def uncached_steps(output: str) -> list[str]:
    """`Step n/m : X` blocks without `Using cache` (classic builder), `#n [stage i/k] X` steps without
    `#n CACHED` (BuildKit). Image IDs prove nothing here: other builds of the same context on the engine
    may be the cache a build reuses."""
    classic = [block.splitlines()[0] for block in re.split(r"^Step \d+/\d+ : ", output, flags=re.MULTILINE)[1:]
               if not block.startswith(("ARG", "FROM")) and "Using cache" not in block]
    buildkit = [step for number, step in re.findall(r"^#(\d+) \[[^\]]*\d+/\d+\] (.*)$", output, flags=re.MULTILINE)
                if not step.startswith("FROM") and f"#{number} CACHED" not in output]
    return classic + buildkit


def mlops_train(stack: TrainingStack, *args: str, secret: str | None = None,
                environments: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`mlops train` given the stage's MLflow secret as CI gives it (`secret`, default the stage's own), with the
    stage's files in `environments` (default: the stack's, which train iris-classifier)."""
    env = {**os.environ, secret_variable(MLFLOW_PASSWORD, stack.name): stack.mlflow_secret if secret is None else secret,
           secret_variable(MODEL_SIGNING_KEY, stack.name): SIGNING_KEY_PEM}
    return subprocess.run([*MLOPS, "train", "--stage", stack.name,
                           "--environments", str(environments or stack.environments), *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)


def get(url: str, auth: BasicAuth | None = None, tls: ssl.SSLContext | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": auth.header} if auth else {})
    with urllib.request.urlopen(request, timeout=10, context=tls) as response:
        return response.read()


def status(url: str, method: str, auth: BasicAuth | None, body: dict | bytes | None = None) -> int:
    """The HTTP status MLflow answers `method url` with, as `auth` (None: without credentials)."""
    headers = {"Authorization": auth.header} if auth else {}
    if isinstance(body, dict):
        body, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def wait_for_health(url: str, timeout_s: float = 180, tls: ssl.SSLContext | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            get(url, tls=tls)
            return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


@dataclass(frozen=True)
class TrainingStack:
    name: str
    environments: Path
    training_image: str
    """The platform's training image; the stage trains in iris-classifier's image on it."""
    mlflow_url: str
    mlflow_secret: str
    images: list[str]
    """Every image the stack built, removed at its end; a test that builds more adds them here."""

    def user(self, identity: str, password: str | None = None) -> BasicAuth:
        return BasicAuth(identity, derived_password(self.mlflow_secret, identity) if password is None else password)


@pytest.fixture(scope="module")
def training_stack(docker_engine, tmp_path_factory):
    """A test stage whose training image and hardened MLflow server run like the stack's, named t-train-*."""
    stack = f"t-train-{uuid.uuid4().hex[:6]}"
    environments = stage_environments(tmp_path_factory.mktemp("training") / "environments", stack, "iris-classifier")
    settings = local_build_settings()
    mlflow_image = built_image_name(stack, "mlflow", "images/mlflow", settings)
    images = [mlflow_image]
    labels = ["--label", f"mlops.stack={stack}"]
    mlflow_secret = uuid.uuid4().hex
    try:
        fetch_build_inputs()
        build(REPO_ROOT / "images" / "mlflow", mlflow_image)
        images += build_model_image(stack, "iris-classifier", "training")
        docker("network", "create", *labels, f"{stack}-net")
        for volume in ("mlflow-db", "artifacts"):
            docker("volume", "create", *labels, f"{stack}-{volume}")
        docker("run", "--detach", "--name", f"{stack}-model-registry", "--network", f"{stack}-net", *labels,
               *HARDENED, "--memory", "1024m", "--publish", f"127.0.0.1::{MLFLOW_PORT}",
               "--volume", f"{stack}-mlflow-db:/data/db", "--volume", f"{stack}-artifacts:/data/artifacts",
               "--env", "MLOPS_MLFLOW_PASSWORD_HASHES", "--env", "MODEL_SIGNING_KEYS", mlflow_image,
               env={**os.environ, "MLOPS_MLFLOW_PASSWORD_HASHES": mlflow_password_hashes(mlflow_secret, stack),
                    "MODEL_SIGNING_KEYS": TRUSTED_KEYS_PEM})
        host_port = docker("port", f"{stack}-model-registry", str(MLFLOW_PORT)).stdout.splitlines()[0].rsplit(":", 1)[1]
        mlflow_url = f"http://127.0.0.1:{host_port}"
        wait_for_health(f"{mlflow_url}/health")
        yield TrainingStack(stack, environments, images[1], mlflow_url, mlflow_secret, images)
    finally:
        containers = docker("ps", "--all", "--quiet", "--filter", f"label=mlops.stack={stack}").stdout.split()
        if containers:
            docker("rm", "--force", "--volumes", *containers, check=False)
        docker("network", "rm", f"{stack}-net", check=False)
        docker("volume", "rm", f"{stack}-mlflow-db", f"{stack}-artifacts", check=False)
        docker("rmi", *images, check=False)


def test_unchanged_inputs_rebuild_nothing(training_stack):
    assert build(REPO_ROOT / "images" / "training", training_stack.training_image) == []


def test_code_change_rebuilds_only_the_code_layer(training_stack, tmp_path):
    context = tmp_path / "training"
    shutil.copytree(REPO_ROOT / "images" / "training", context)
    with (context / "mlops_training" / "__init__.py").open("a") as code:
        code.write("# a code-only change\n")
    changed = f"{training_stack.name}-code-change:test"
    try:
        code_layer, *metadata = build(context, changed)
        assert code_layer.startswith("COPY mlops_training/")
        assert not [step for step in metadata if step.startswith(("COPY", "RUN"))]
    finally:
        docker("rmi", changed, check=False)


def test_mlflow_health_check_passes_inside_the_container(training_stack):
    probe = http_probe(HttpHealth(MLFLOW_PORT, "/health", HealthCheck()))[1:]
    docker("exec", f"{training_stack.name}-model-registry", *probe)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_mlflow_answers_the_host_by_loopback(training_stack, host):
    url = training_stack.mlflow_url.replace("127.0.0.1", host)
    assert json.loads(get(f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
                          training_stack.user(READER)))["experiments"]


def test_mlflow_refuses_foreign_host_headers(training_stack):
    request = urllib.request.Request(f"{training_stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers={"Host": "attacker.example:5000"})
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(request, timeout=10)


def test_train_registers_identical_models_as_consecutive_versions(training_stack):
    registered = []
    for _ in range(2):
        run = mlops_train(training_stack, "--subset", "0.5")
        assert run.returncode == 0, run.stdout + run.stderr
        assert "[training] trained: accuracy=" in run.stdout
        registered.append(run.stdout.strip().splitlines()[-1].split())
    first, second = registered
    assert first[:3] == ["REGISTERED", "name=iris-classifier", "version=1"]
    assert second[:3] == ["REGISTERED", "name=iris-classifier", "version=2"]
    assert first[3] == second[3]
    sha256 = first[3].removeprefix("sha256=")

    reader = training_stack.user(READER)
    version = json.loads(get(f"{training_stack.mlflow_url}/api/2.0/mlflow/model-versions/get"
                             "?name=iris-classifier&version=2", reader))["model_version"]
    tags = {tag["key"]: tag["value"] for tag in version["tags"]}
    assert tags["sha256"] == sha256 and float(tags["accuracy"]) > 0.5
    artifact = version["source"].removeprefix("mlflow-artifacts:/")
    artifacts = f"{training_stack.mlflow_url}/api/2.0/mlflow-artifacts/artifacts/{artifact}"
    assert hashlib.sha256(get(f"{artifacts}/model.pkl", reader)).hexdigest() == sha256
    manifest_bytes = get(f"{artifacts}/manifest.json", reader)
    manifest = json.loads(manifest_bytes)
    assert manifest["environment"]["image_digest"] and len(manifest["environment"]["lock_sha256"]) == 64
    # The hashes `mlops train` signs: the version's and its run's, the manifest's as logged.
    run = json.loads(get(f"{training_stack.mlflow_url}/api/2.0/mlflow/runs/get?run_id={version['run_id']}",
                         reader))["run"]
    run_tags = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
    assert tags["manifest_sha256"] == run_tags["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert run_tags["sha256"] == sha256
    # Each run trained in a container of its own, so skops named its files after other id()s: the skops forms
    # still match byte for byte, as the signed manifest says.
    skops_forms = []
    for number in ("1", "2"):
        source = json.loads(get(f"{training_stack.mlflow_url}/api/2.0/mlflow/model-versions/get"
                                f"?name=iris-classifier&version={number}", reader))["model_version"]["source"]
        skops_forms.append(get(f"{training_stack.mlflow_url}/api/2.0/mlflow-artifacts/artifacts/"
                               f"{source.removeprefix('mlflow-artifacts:/')}/model.skops", reader))
    assert skops_forms[0] == skops_forms[1]
    assert manifest["outputs"]["skops"]["sha256"] == hashlib.sha256(skops_forms[1]).hexdigest()

    leftovers = docker("ps", "--all", "--quiet", "--filter", f"label=mlops.stack={training_stack.name}",
                       "--filter", "label=mlops.component=training-run").stdout
    assert leftovers == ""


# Run in a model's image on the registered model.pkl (stdin): which class the pipeline's first step unpickles to,
# and its predictions for the first rows of the project's own data.
PREDICT = ("import json, pickle, sys, numpy; model = pickle.load(sys.stdin.buffer); "
           "rows = numpy.loadtxt('/opt/model/code/data/diabetes.csv', delimiter=',', skiprows=1)[:8, :-1]; "
           "step = type(model.steps[0][1]); "
           "print(json.dumps({'step': f'{step.__module__}.{step.__name__}', 'predictions': model.predict(rows).tolist()}))")


def predictions_in(image: str, model: bytes) -> dict:
    """PREDICT in `image` as its own user, offline, given `model` on stdin."""
    ran = subprocess.run(["docker", "run", "--rm", "--interactive", "--network", "none", "--entrypoint", "python",
                          image, "-c", PREDICT], input=model, capture_output=True, check=True, timeout=120)
    return json.loads(ran.stdout)


def test_a_project_with_its_own_transformer_trains_registers_and_unpickles_in_its_serving_image(training_stack, tmp_path):
    """The diabetes regressor's pipeline holds QuantileClipper, a class of its project: its training image trains
    and registers it with the project's schema and target bins, and its serving image (the project on the oip
    image) unpickles the registered bytes to the same predictions as the training image."""
    environments = stage_environments(tmp_path / "environments", training_stack.name, "diabetes-regressor")
    _, training_image = build_model_image(training_stack.name, "diabetes-regressor", "training")
    training_stack.images.append(training_image)
    run = mlops_train(training_stack, "--seed", "7", environments=environments)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "[training] trained: r2=" in run.stdout
    registered = run.stdout.strip().splitlines()[-1].split()
    assert registered[:3] == ["REGISTERED", "name=diabetes-regressor", "version=1"]
    sha256 = registered[3].removeprefix("sha256=")

    reader = training_stack.user(READER)
    version = json.loads(get(f"{training_stack.mlflow_url}/api/2.0/mlflow/model-versions/get"
                             "?name=diabetes-regressor&version=1", reader))["model_version"]
    assert {tag["key"]: tag["value"] for tag in version["tags"]}["sha256"] == sha256
    artifacts = (f"{training_stack.mlflow_url}/api/2.0/mlflow-artifacts/artifacts/"
                 f"{version['source'].removeprefix('mlflow-artifacts:/')}")
    model = get(f"{artifacts}/model.pkl", reader)
    assert hashlib.sha256(model).hexdigest() == sha256
    manifest = json.loads(get(f"{artifacts}/manifest.json", reader))
    project = yaml.safe_load((REPO_ROOT / "models" / "diabetes-regressor" / "mlops-model.yaml").read_text())
    assert manifest["task"] == "regression" and manifest["schema"] == project["schema"]
    assert manifest["outputs"]["model_sha256"] == sha256 and manifest["inputs"]["seed"] == 7
    profile = manifest["reference_profile"]
    assert [feature["name"] for feature in profile["features"]] == [column["name"] for column in
                                                                    project["schema"]["features"]]
    bins = profile["target_bins"]
    assert bins["edges"] == sorted(bins["edges"]) and len(bins["proportions"]) == len(bins["edges"]) + 1
    assert sum(bins["proportions"]) == pytest.approx(1, abs=1e-5) and "class_shares" not in profile

    platform_serving, serving_image = build_model_image(training_stack.name, "diabetes-regressor", "serving", "oip")
    training_stack.images.extend([serving_image, platform_serving])
    trained, served = predictions_in(training_image, model), predictions_in(serving_image, model)
    assert served["step"] == "diabetes_model.transformers.QuantileClipper"
    assert served == trained and len(served["predictions"]) == 8
    # Without the project on its path, the serving platform image cannot unpickle the model at all.
    bare = subprocess.run(["docker", "run", "--rm", "--interactive", "--network", "none", "--entrypoint", "python",
                           platform_serving, "-c", PREDICT], input=model, capture_output=True, timeout=120)
    assert bare.returncode != 0 and b"No module named 'diabetes_model'" in bare.stderr


def test_bad_param_is_one_error_line(training_stack):
    run = mlops_train(training_stack, "--param", "n_trees=3")
    assert run.returncode == 2
    assert run.stderr.startswith("error: unknown parameter(s) n_trees for RandomForestClassifier")
    assert "Traceback" not in run.stdout + run.stderr


def test_training_with_the_wrong_mlflow_secret_is_refused_in_one_line(training_stack):
    run = mlops_train(training_stack, "--subset", "0.5", secret="not-the-secret")
    assert run.returncode == 1
    assert "error: registering at http://" in run.stderr and "401" in run.stderr, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr


def test_neither_the_mlflow_container_nor_its_processes_hold_the_stages_secret_or_a_password(training_stack):
    """The container's configuration (`docker inspect`) and every process's environment (/proc/*/environ, the
    server's included) hold only the hashes MLflow checks logins with: no secret, no password, no key derived
    from them (the Flask key is new at every start)."""
    container = f"{training_stack.name}-model-registry"
    secret = training_stack.mlflow_secret
    derived = [derived_password(secret, purpose) for purpose in (ADMIN, *IDENTITIES, "flask-secret-key")]
    configured = docker("inspect", container).stdout
    server = docker("exec", container, "cat", "/proc/1/environ").stdout.split("\0")
    processes = docker("exec", container, "sh", "-c", "cat /proc/[0-9]*/environ 2>/dev/null; true").stdout
    assert "MLOPS_MLFLOW_PASSWORD_HASHES=" in configured
    assert [variable for variable in server if variable.startswith("MLFLOW_FLASK_SERVER_SECRET_KEY=")]
    assert not [variable for variable in server if variable.startswith(("MLOPS_MLFLOW", "MLFLOW_AUTH_ADMIN"))]
    assert not [value for value in (secret, *derived) if value in configured + processes]
    assert status(f"{training_stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1", "GET",
                  training_stack.user(ADMIN)) == 200


def test_the_runs_password_is_a_file_that_no_configuration_environment_or_command_line_holds(training_stack):
    """Caught while it trains (a forest big enough to take seconds): the run's password is a file of the app user's
    alone, and neither the run's configuration (`docker inspect`), nor any of its processes' environments, nor any
    command line on this host holds it. The run still registers, so its image read the file."""
    password = training_stack.user(TRAINER).password
    env = {**os.environ, secret_variable(MLFLOW_PASSWORD, training_stack.name): training_stack.mlflow_secret,
           secret_variable(MODEL_SIGNING_KEY, training_stack.name): SIGNING_KEY_PEM}
    seen: set[str] = set()
    with subprocess.Popen([*MLOPS, "train", "--stage", training_stack.name, "--environments",
                           str(training_stack.environments), "--param", "n_estimators=2000"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT) as train:
        running = ""
        while not running and train.poll() is None:
            seen.update(command_lines())
            running = docker("ps", "--quiet", "--filter", f"label=mlops.stack={training_stack.name}",
                             "--filter", "label=mlops.component=training-run", "--filter", "status=running").stdout.strip()
        assert running, "the run ended before it was seen running"
        configured = docker("inspect", running).stdout
        processes = docker("exec", running, "sh", "-c", "cat /proc/[0-9]*/environ 2>/dev/null; true").stdout
        secret_file = docker("exec", running, "stat", "--format", "%u:%g %a", "/run/secrets/mlflow-trainer-password")
        output, _ = train.communicate(timeout=600)
    assert train.returncode == 0 and output.splitlines()[-1].startswith("REGISTERED name=iris-classifier"), output
    assert "MLFLOW_TRACKING_PASSWORD_FILE=/run/secrets/mlflow-trainer-password" in configured
    assert "MLFLOW_TRACKING_PASSWORD_FILE=/run/secrets/mlflow-trainer-password" in processes, "the run's were read"
    assert secret_file.stdout.split() == ["10001:10001", "400"]
    for where, text in (("docker inspect", configured), ("/proc/*/environ", processes),
                        ("a command line", "\n".join(seen))):
        assert password not in text and training_stack.mlflow_secret not in text, f"the password is in {where}"


SERVER_ENVIRONMENTS = """
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        status = open(f"/proc/{pid}/status").read()
        if pid == "1" or "\\nPPid:\\t0\\n" not in status:
            print(open(f"/proc/{pid}/environ").read())
    except OSError:
        pass
"""


def test_mlflow_published_off_loopback_speaks_tls_that_only_its_stages_ca_verifies(training_stack):
    """The MLflow image as the stack runs it off loopback: its users log in over TLS, mlops and the replicas verify
    it with the stage's CA and refuse another at once, plain HTTP gets nowhere, and the key stays out of every
    process's environment."""
    stack = training_stack
    container = f"{stack.name}-tls-model-registry"
    tls = server_tls(stack.mlflow_secret, stack.name, "model-registry", (f"{stack.name}-model-registry",))
    foreign = server_tls("another-secret", stack.name, "model-registry", ()).ca_certificate
    docker("run", "--detach", "--name", container, "--label", f"mlops.stack={stack.name}", *HARDENED, "--memory", "1024m",
           "--publish", f"127.0.0.1::{MLFLOW_PORT}", "--env", "MLOPS_MLFLOW_PASSWORD_HASHES",
           *[option for folder in ("/data/db", "/data/artifacts") for option in ("--tmpfs", f"{folder}:uid=10001,gid=10001")],
           "--env", "MLOPS_TLS_CERTIFICATE", "--env", "MLOPS_TLS_KEY", stack.images[0],
           env={**os.environ, "MLOPS_MLFLOW_PASSWORD_HASHES": mlflow_password_hashes(stack.mlflow_secret, stack.name),
                "MLOPS_TLS_CERTIFICATE": tls.certificate, "MLOPS_TLS_KEY": tls.key})
    try:
        port = docker("port", container, str(MLFLOW_PORT)).stdout.splitlines()[0].rsplit(":", 1)[1]
        url = f"https://127.0.0.1:{port}"
        wait_for_health(f"{url}/health", tls=ssl.create_default_context(cadata=tls.ca_certificate))
        with pytest.raises(StoreError, match="has no registered version"):  # logged in: a refusal would be a 401
            MlflowStore(url, stack.user(TRAINER), ca_certificate=tls.ca_certificate).latest_version("nothing-yet")
        with pytest.raises(StoreError, match="is not the stage's: its certificate does not verify"):
            MlflowStore(url, stack.user(TRAINER), ca_certificate=foreign).latest_version("nothing-yet")
        replica = MlflowRegistry(url, trusted=[], username=READER, password=derived_password(stack.mlflow_secret, READER),
                                 ca_certificate=tls.ca_certificate, attempts=1)
        with pytest.raises(ModelRefused, match="has no registered version yet"):
            replica.fetch(ModelPin(name="nothing-yet", version="latest", sha256=""))
        with pytest.raises(ModelRefused, match="is not the stage's"):
            MlflowRegistry(url, trusted=[], ca_certificate=foreign, attempts=30).fetch(
                ModelPin(name="nothing-yet", version="latest", sha256=""))  # at once: 30 tries would take a minute
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            get(url.replace("https://", "http://") + "/health")
        docker("exec", container, *http_probe(HttpHealth(MLFLOW_PORT, "/health", HealthCheck(), tls=True))[1:])
        # The server's processes: PID 1 and what it started. What `docker exec` starts has no parent in the container
        # (PPid 0) and gets the container's configured environment, which on one host holds the key.
        servers = docker("exec", container, "python3", "-c", SERVER_ENVIRONMENTS).stdout
        assert "MLFLOW_FLASK_SERVER_SECRET_KEY=" in servers
        assert "PRIVATE KEY" not in servers and "MLOPS_TLS_" not in servers
    finally:
        docker("rm", "--force", container, check=False)


def test_mlflow_lets_only_its_users_in_the_reader_only_read_and_the_writers_only_add(training_stack):
    """Every request but /health needs a user; `reader` writes nothing, not even something new; the writers
    add runs, models, versions and tags, and neither removes nor redirects anything, even what they created."""
    api = f"{training_stack.mlflow_url}/api/2.0/mlflow"
    trainer, reader, promoter = (training_stack.user(identity) for identity in (TRAINER, READER, PROMOTER))
    name = f"auth-{uuid.uuid4().hex[:6]}"
    # What a training run leaves: an experiment, a run with model.pkl, a registered version tagged sha256.
    assert status(f"{api}/experiments/create", "POST", trainer, {"name": name}) == 200
    experiment = json.loads(get(f"{api}/experiments/get-by-name?experiment_name={name}", trainer))["experiment"]
    run = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{api}/runs/create", data=json.dumps({"experiment_id": experiment["experiment_id"]}).encode(), method="POST",
        headers={"Authorization": trainer.header, "Content-Type": "application/json"}), timeout=30).read())["run"]["info"]
    proxy = f"{training_stack.mlflow_url}/api/2.0/mlflow-artifacts/artifacts"
    location = run["artifact_uri"].removeprefix("mlflow-artifacts:").strip("/") + "/model"
    artifacts = f"{proxy}/{location}"
    assert status(f"{artifacts}/model.pkl", "PUT", trainer, b"model bytes") == 200
    assert status(f"{api}/registered-models/create", "POST", trainer, {"name": name}) == 200
    version = {"name": name, "source": f"{run['artifact_uri']}/model", "run_id": run["run_id"]}
    assert status(f"{api}/model-versions/create", "POST", trainer, version) == 200

    reads = {
        "get the experiment": (f"{api}/experiments/get?experiment_id={experiment['experiment_id']}", "GET", None),
        "search experiments": (f"{api}/experiments/search", "POST", {"max_results": 5}),
        "get the run": (f"{api}/runs/get?run_id={run['run_id']}", "GET", None),
        "search runs": (f"{api}/runs/search", "POST", {"experiment_ids": [experiment["experiment_id"]]}),
        "download model.pkl": (f"{artifacts}/model.pkl", "GET", None),
        "list the artifacts": (f"{proxy}?path={location}", "GET", None),
        "get the model": (f"{api}/registered-models/get?name={name}", "GET", None),
        "get the latest versions": (f"{api}/registered-models/get-latest-versions", "POST", {"name": name}),
        "get the version": (f"{api}/model-versions/get?name={name}&version=1", "GET", None),
    }
    def writes(owner: str) -> dict:
        return {
            "create a run": (f"{api}/runs/create", "POST", {"experiment_id": experiment["experiment_id"]}),
            "log metrics": (f"{api}/runs/log-batch", "POST",
                            {"run_id": run["run_id"], "metrics": [{"key": "accuracy", "value": 1.0, "timestamp": 0,
                                                                   "step": 0}]}),
            "set a run tag": (f"{api}/runs/set-tag", "POST", {"run_id": run["run_id"], "key": "k", "value": "v"}),
            "upload an artifact": (f"{artifacts}/{owner}.pkl", "PUT", b"other bytes"),
            "create a model version": (f"{api}/model-versions/create", "POST", version),
            "set the sha256 tag": (f"{api}/model-versions/set-tag", "POST",
                                   {"name": name, "version": "1", "key": "sha256", "value": "0" * 64}),
        }

    def creations(owner: str) -> dict:
        return {"create an experiment": (f"{api}/experiments/create", "POST", {"name": f"{name}-{owner}"}),
                "create a registered model": (f"{api}/registered-models/create", "POST", {"name": f"{name}-{owner}"})}

    removals = {
        "delete a version tag": (f"{api}/model-versions/delete-tag", "DELETE", {"name": name, "version": "1", "key": "sha256"}),
        "point an alias at a version": (f"{api}/registered-models/alias", "POST",
                                        {"name": name, "alias": "prod", "version": "1"}),
        "rename a model": (f"{api}/registered-models/rename", "POST", {"name": f"{name}-{TRAINER}",
                                                                      "new_name": f"{name}-moved"}),
        "delete an artifact": (f"{artifacts}/{TRAINER}.pkl", "DELETE", None),
        "delete the run": (f"{api}/runs/delete", "POST", {"run_id": run["run_id"]}),
        "delete the version": (f"{api}/model-versions/delete", "DELETE", {"name": name, "version": "1"}),
        "delete the model": (f"{api}/registered-models/delete", "DELETE", {"name": name}),
        "delete the experiment": (f"{api}/experiments/delete", "POST", {"experiment_id": experiment["experiment_id"]}),
    }

    def administration(owner: str) -> dict:
        return {"change its password": (f"{api}/users/update-password", "PATCH",
                                        {"username": owner, "password": uuid.uuid4().hex}),
                "grant the reader EDIT": (f"{api}/experiments/permissions/create", "POST",
                                          {"experiment_id": experiment["experiment_id"], "username": READER,
                                           "permission": "EDIT"})}

    def statuses(auth: BasicAuth | None, requests: dict) -> dict[str, int]:
        return {what: status(url, method, auth, body) for what, (url, method, body) in requests.items()}

    everything = reads | writes(READER) | creations("anonymous") | removals | administration(READER)
    for anonymous in (None, training_stack.user(READER, password="wrong")):
        assert statuses(anonymous, everything) == dict.fromkeys(everything, 401)
    assert statuses(reader, reads) == dict.fromkeys(reads, 200)
    refused = writes(READER) | creations(READER) | removals | administration(READER)
    assert statuses(reader, refused) == dict.fromkeys(refused, 403)
    # Each writer adds to what the other created, and removes nothing, not even what it created itself.
    for writer in (promoter, trainer):
        added = writes(writer.username) | creations(writer.username)
        assert statuses(writer, added) == dict.fromkeys(added, 200)
        refused = removals | administration(writer.username)
        assert statuses(writer, refused) == dict.fromkeys(refused, 403)
    # Refused by role, not broken: MLflow's administrator removes all of it.
    assert statuses(training_stack.user("admin"), removals) == dict.fromkeys(removals, 200)
    assert status(f"{training_stack.mlflow_url}/health", "GET", None) == 200
    # MLflow itself answers server-info to anyone; the stack's MLflow only to its users.
    for server_info in ("/api/3.0/mlflow/server-info", "/ajax-api/3.0/mlflow/server-info"):
        assert status(training_stack.mlflow_url + server_info, "GET", None) == 401
        assert status(training_stack.mlflow_url + server_info, "GET", training_stack.user(READER, password="wrong")) == 401
        assert status(training_stack.mlflow_url + server_info, "GET", reader) == 200


def answer(url: str, method: str, auth: BasicAuth, body: dict | bytes | None) -> dict:
    """What MLflow answers `method url`, as JSON (an error fails the test)."""
    headers = {"Authorization": auth.header}
    if isinstance(body, dict):
        body, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method=method, headers=headers),
                                timeout=30) as response:
        return json.loads(response.read() or b"{}")


def test_models_are_write_once_and_writers_only_log_and_register(training_stack):
    """What a leaked writer password did to a version a stage serves: upload other bytes over its model.pkl,
    then move its sha256 tag to them, so replicas unpickled the writer's bytes. Both are refused to every
    identity but MLflow's administrator, as is moving the manifest's hash or the signature (a version gets its
    signature once, after the run registered it) and everything else logging and registering never needs. A
    signature none of the stage's trusted keys made is refused before it could take a fresh version's one slot."""
    api = f"{training_stack.mlflow_url}/api/2.0/mlflow"
    trainer, promoter, reader, admin = (training_stack.user(identity) for identity in (TRAINER, PROMOTER, READER, "admin"))
    name = f"once-{uuid.uuid4().hex[:6]}"
    model, sha256 = b"the trained model", hashlib.sha256(b"the trained model").hexdigest()
    signer, manifest = SESSION_SIGNER, manifest_of(model)
    signed = signer.tags(name, model, manifest)
    signature = signed.pop("signature")
    hashes = [{"key": key, "value": value} for key, value in signed.items()]
    experiment_id = answer(f"{api}/experiments/create", "POST", trainer, {"name": name})["experiment_id"]
    run = answer(f"{api}/runs/create", "POST", trainer, {"experiment_id": experiment_id})["run"]["info"]
    model_pkl = (f"{training_stack.mlflow_url}/api/2.0/mlflow-artifacts/artifacts/"
                 f"{run['artifact_uri'].removeprefix('mlflow-artifacts:').strip('/')}/model/model.pkl")
    answer(model_pkl, "PUT", trainer, model)
    answer(model_pkl.replace("/model.pkl", "/manifest.json"), "PUT", trainer, manifest)
    answer(f"{api}/runs/log-batch", "POST", trainer, {"run_id": run["run_id"], "tags": hashes})
    answer(f"{api}/registered-models/create", "POST", trainer, {"name": name})
    answer(f"{api}/model-versions/create", "POST", trainer,
           {"name": name, "source": f"{run['artifact_uri']}/model", "run_id": run["run_id"], "tags": hashes})
    # `mlops train` signs the version once the run registered it.
    assert status(f"{api}/model-versions/set-tag", "POST", trainer,
                  {"name": name, "version": "1", "key": "signature", "value": signature}) == 200
    forged = "f" * 64
    refused = {
        "upload other bytes over model.pkl": (model_pkl, "PUT", b"forged bytes"),
        "move the version's sha256 tag": (f"{api}/model-versions/set-tag", "POST",
                                          {"name": name, "version": "1", "key": "sha256", "value": forged}),
        "move the run's sha256 tag": (f"{api}/runs/set-tag", "POST", {"run_id": run["run_id"], "key": "sha256", "value": forged}),
        "move it in a batch": (f"{api}/runs/log-batch", "POST",
                               {"run_id": run["run_id"], "tags": [{"key": "sha256", "value": forged}]}),
        "move the version's manifest_sha256 tag": (f"{api}/model-versions/set-tag", "POST",
                                                   {"name": name, "version": "1", "key": "manifest_sha256", "value": forged}),
        "move the run's manifest_sha256 tag": (f"{api}/runs/set-tag", "POST",
                                               {"run_id": run["run_id"], "key": "manifest_sha256", "value": forged}),
        "re-sign the version": (f"{api}/model-versions/set-tag", "POST",
                                {"name": name, "version": "1", "key": "signature",
                                 "value": base64.b64encode(b"f" * 64).decode()}),
        "rename the experiment": (f"{api}/experiments/update", "POST", {"experiment_id": experiment_id, "new_name": f"{name}-x"}),
        "rename the run": (f"{api}/runs/update", "POST", {"run_id": run["run_id"], "run_name": "renamed"}),
        "tag the registered model": (f"{api}/registered-models/set-tag", "POST", {"name": name, "key": "k", "value": "v"}),
        "create an AI-gateway secret": (f"{training_stack.mlflow_url}/api/3.0/mlflow/gateway/secrets/create", "POST",
                                        {"secret_name": name, "secret_value": {"api_key": "k"}, "provider": "openai"}),
        "list the users": (f"{api}/users/list", "GET", None),
    }
    for writer in (trainer, promoter):
        assert {what: status(url, method, writer, body) for what, (url, method, body) in refused.items()} == \
            dict.fromkeys(refused, 403)
    assert status(f"{api}/users/list", "GET", reader) == 403
    # A client's retry is no change, and ending the run is logging.
    assert status(f"{api}/model-versions/set-tag", "POST", promoter,
                  {"name": name, "version": "1", "key": "sha256", "value": sha256}) == 200
    assert status(f"{api}/model-versions/set-tag", "POST", trainer,
                  {"name": name, "version": "1", "key": "signature", "value": signature}) == 200
    assert status(f"{api}/runs/update", "POST", trainer, {"run_id": run["run_id"], "status": "FINISHED"}) == 200
    assert get(model_pkl, reader) == model
    version = answer(f"{api}/model-versions/get?name={name}&version=1", "GET", reader, None)["model_version"]
    tags = {tag["key"]: tag["value"] for tag in version["tags"]}
    assert {key: tags[key] for key in ("sha256", "manifest_sha256", "signature")} == {**signed, "signature": signature}
    # A replica trusting the key serves the signed version, and skips a newer one a writer registered unsigned.
    answer(f"{api}/model-versions/create", "POST", trainer,
           {"name": name, "source": f"{run['artifact_uri']}/model", "run_id": run["run_id"], "tags": hashes})
    replica = MlflowRegistry(training_stack.mlflow_url, trusted=signer.trusted, username=reader.username,
                             password=reader.password, attempts=1)
    fetched = replica.fetch(ModelPin(name, "latest", ""))
    assert (fetched.version, fetched.payload, fetched.manifest) == ("1", model, json.loads(manifest))
    with pytest.raises(ModelRefused, match=f"refusing model {name} v2: the version has no signature tag"):
        replica.fetch(ModelPin(name, "2", ""))
    # Nobody signs that version first with a key of their own, nor registers one signed so: 403, and it stays unsigned.
    foreign = ModelSigner().tags(name, model, manifest)["signature"]
    for writer in (trainer, promoter):
        assert status(f"{api}/model-versions/set-tag", "POST", writer,
                      {"name": name, "version": "2", "key": "signature", "value": foreign}) == 403
        assert status(f"{api}/model-versions/create", "POST", writer,
                      {"name": name, "source": f"{run['artifact_uri']}/model", "run_id": run["run_id"],
                       "tags": [*hashes, {"key": "signature", "value": foreign}]}) == 403
    assert "signature" not in {tag["key"] for tag in answer(f"{api}/model-versions/get?name={name}&version=2", "GET",
                                                            reader, None)["model_version"]["tags"]}
    # MLflow's administrator, which nothing of the stack logs in as, may still repair a version.
    assert status(model_pkl, "PUT", admin, b"repaired bytes") == 200
    assert status(f"{api}/users/list", "GET", admin) == 200
