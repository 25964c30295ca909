"""`mlops train` without a Docker engine: which image it runs, how it runs it, and its input errors."""
from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import tarfile

import pytest
from typer.testing import CliRunner

from components.runtimes import docker_create_arguments, docker_run_arguments, secret_files_archive
from mlops import cli
from mlops import plan as planning
from mlops.cli import app
from mlops.commands.train import run_of, stage_model, training_image
from mlops.modelstore import ModelVersion
from mlops.signing import check_signed, public_keys
from mlops_spec.contract import SIGNATURE_TAG
from mlops_spec.errors import SpecError
from mlops_spec.loading import load_stage, load_stages
from mlops_spec.project import ENVIRONMENTS_DIR
from tests.conftest import FIXTURE_TRAINING_DIGEST, pinned_image
from tests.model_signing import SESSION_SIGNER, SIGNING_KEY_PEM, TRUSTED_KEYS_PEM, manifest_of

PASSWORD = "the-trainer-password"


def run_arguments(spec, image, digest, name, training_args, with_datasets=False):
    arguments = docker_create_arguments(run_of(spec, image, digest, name, PASSWORD, None, training_args, with_datasets))
    assert not any(PASSWORD in argument for argument in arguments), "the password is no argument"
    return arguments


@pytest.mark.parametrize("model", ["iris-classifier", "diabetes-regressor"])
def test_dev_runs_each_models_training_image_the_program_builds(model):
    spec = load_stages(["dev"])[0]
    built = [resource.inputs["imageName"] for resource in planning.render("dev", spec)
             if resource.type == "docker:index/image:Image"
             and f"/{model}-training:" in resource.inputs["imageName"]]
    # The model's training image as dev built it on its engine, which train runs by that name.
    assert built == [training_image(spec, model, ENVIRONMENTS_DIR)]
    assert built[0].startswith(f"mlops-dev/{model}-training:")


def test_promoted_stages_run_the_models_promoted_digest(released_environments):
    spec = load_stage("staging", released_environments)
    assert training_image(spec, "iris-classifier", released_environments) == pinned_image(
        "staging", "iris-classifier-training", FIXTURE_TRAINING_DIGEST)
    with pytest.raises(SpecError, match="staging.yaml: models.diabetes-regressor.release.images.training: no training "
                                        "image of diabetes-regressor is promoted to staging yet"):
        training_image(spec, "diabetes-regressor", released_environments)


def test_nothing_promoted_is_a_spec_error():
    with pytest.raises(SpecError, match="no training image of iris-classifier is promoted to staging yet"):
        training_image(load_stages(["staging"])[0], "iris-classifier", ENVIRONMENTS_DIR)


def cli_error(monkeypatch, capsys, *arguments: str) -> tuple[int | str | None, str]:
    """Exit code and stderr of `mlops ARGUMENTS`, with neither a secret nor a Pulumi CLI nor an engine to ask."""
    monkeypatch.delenv("MLOPS_MLFLOW_PASSWORD_DEV", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "argv", ["mlops", *arguments])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return exited.value.code, capsys.readouterr().err.strip()


def test_a_stage_of_several_models_needs_model_before_any_secret_or_engine(monkeypatch, capsys):
    code, error = cli_error(monkeypatch, capsys, "train", "--stage", "dev")
    assert (code, error) == (2, "error: dev declares 2 models (diabetes-regressor, iris-classifier): name one with "
                                "--model")


def test_a_model_the_stage_does_not_declare_is_one_line_naming_the_stage_file(monkeypatch, capsys):
    code, error = cli_error(monkeypatch, capsys, "train", "--stage", "dev", "--model", "wine-classifier")
    assert code == 2 and len(error.splitlines()) == 1
    assert error == (f"error: {ENVIRONMENTS_DIR}/dev.yaml: models: dev declares no model 'wine-classifier'; its "
                     "models: diabetes-regressor, iris-classifier (add models.<name> for a project under models/, "
                     "docs/models.md)")


def test_the_one_model_of_a_stage_needs_no_model_option(environments):
    base = environments / "base.yaml"
    base.write_text(base.read_text().replace("  diabetes-regressor: {}\n", ""))
    for stage in ("dev", "cluster", "prod", "staging"):
        file = environments / f"{stage}.yaml"
        file.write_text(re.sub(r"  diabetes-regressor:\n(    .*\n)+", "", file.read_text()))
    spec = load_stage("dev", environments)
    assert stage_model(spec, None, environments) == "iris-classifier"


class Engine:
    """An engine where the stack is up and each image is there: what `mlops train` asks before it runs."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, ...]] = []

    def __call__(self, spec, *args: str, stdin=None) -> subprocess.CompletedProcess[str]:
        self.asked.append(args)
        answer = {"image": '[] sha256:' + "e" * 64, "container": "true"}.get(args[0], "")
        return subprocess.CompletedProcess(["docker", *args], 0, answer, "")


REGISTERED_FILES = {"model.pkl": b"the model's bytes", "manifest.json": manifest_of(b"the model's bytes")}
REGISTERED_SHA256 = hashlib.sha256(REGISTERED_FILES["model.pkl"]).hexdigest()


class RegisteredStore:
    """dev's MLflow as `mlops train` finds it after the run: the version the run registered, tagged by the run."""

    def __init__(self, url: str, auth, tags: dict[str, str]) -> None:
        self.url, self.auth, self.tags = url, auth, tags
        self.set_tags: list[tuple[str, int, str, str]] = []

    def fetch(self, name: str, version: int) -> ModelVersion:
        return ModelVersion(name=name, version=version, files=REGISTERED_FILES, tags=dict(self.tags))

    def set_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        self.set_tags.append((name, version, key, value))


def train_with_a_registered_version(monkeypatch, tags: dict[str, str]):
    """`mlops train --model diabetes-regressor` whose run registers v3 of REGISTERED_FILES; returns the CLI's result,
    the runs started, the engine and the stores `mlops train` opened."""
    from mlops.commands import train as train_command

    monkeypatch.setenv("MLOPS_MLFLOW_PASSWORD_DEV", PASSWORD)
    monkeypatch.setenv("MLOPS_MODEL_SIGNING_KEY_DEV", SIGNING_KEY_PEM)
    engine = Engine()
    monkeypatch.setattr(train_command, "docker", engine)
    runs, stores = [], []

    def stream_run(spec, run):
        runs.append(run)
        return 0, train_command.REGISTERED.match(f"REGISTERED name=diabetes-regressor version=3 sha256={REGISTERED_SHA256}")
    monkeypatch.setattr(train_command, "stream_run", stream_run)

    def open_store(url: str, auth, ca_certificate=None) -> RegisteredStore:
        stores.append(RegisteredStore(url, auth, tags))
        return stores[-1]
    monkeypatch.setattr(train_command, "MlflowStore", open_store)
    result = CliRunner().invoke(app, ["train", "--stage", "dev", "--model", "diabetes-regressor", "--data", "latest"])
    return result, runs, engine, stores


def test_the_run_trains_the_named_model_in_its_own_image_and_signs_what_it_registered(monkeypatch):
    tags = SESSION_SIGNER.tags("diabetes-regressor", *REGISTERED_FILES.values())
    result, runs, engine, [store] = train_with_a_registered_version(
        monkeypatch, {key: value for key, value in tags.items() if key != SIGNATURE_TAG})
    assert result.exit_code == 0, result.output
    [run] = runs
    spec = load_stages(["dev"])[0]
    assert run.image == training_image(spec, "diabetes-regressor", ENVIRONMENTS_DIR)
    assert run.image.startswith("mlops-dev/diabetes-regressor-training:")
    assert list(run.args) == ["--subset", "1.0", "--seed", "0", "--data", "latest", "--model-name", "diabetes-regressor"]
    assert ("image", "inspect", "--format", "{{json .RepoDigests}} {{.Id}}", run.image) in engine.asked
    assert result.output.splitlines()[-1] == f"REGISTERED name=diabetes-regressor version=3 sha256={REGISTERED_SHA256}"
    # Signed from here, as trainer, at dev's published MLflow port: the key never went into the run.
    assert (store.url, store.auth.username) == ("http://127.0.0.1:5000", "trainer")
    [(name, version, key, value)] = store.set_tags
    assert (name, version, key) == ("diabetes-regressor", 3, SIGNATURE_TAG)
    check_signed(name, version, {**tags, SIGNATURE_TAG: value}, public_keys(TRUSTED_KEYS_PEM, "dev's"), "dev")
    assert SIGNING_KEY_PEM.splitlines()[1] not in str([(run.args, run.env) for run in runs])


@pytest.mark.parametrize("tags, why", [
    ({"sha256": "f" * 64}, f"is tagged sha256 {'f' * 64}, but the training run registered {REGISTERED_SHA256}"),
    ({"sha256": REGISTERED_SHA256, "manifest_sha256": "0" * 64}, "manifest.json has sha256"),
    ({"sha256": REGISTERED_SHA256, "signature": "c2lnbmVk"}, "its signature verifies with none of the 1 keys"),
])
def test_a_registered_version_that_is_not_what_the_run_reported_is_not_signed(monkeypatch, tags, why):
    result, _, _, [store] = train_with_a_registered_version(monkeypatch, tags)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith(
        "error: diabetes-regressor v3 is registered but not signed, so no replica will load it:"), result.output
    assert why in result.output
    assert store.set_tags == []


def test_a_stage_without_its_signing_key_is_one_line_before_anything_runs(monkeypatch):
    from mlops.commands import train as train_command

    monkeypatch.setenv("MLOPS_MLFLOW_PASSWORD_DEV", PASSWORD)
    monkeypatch.delenv("MLOPS_MODEL_SIGNING_KEY_DEV", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    engine = Engine()
    monkeypatch.setattr(train_command, "docker", engine)
    result = CliRunner().invoke(app, ["train", "--stage", "dev", "--model", "diabetes-regressor"])
    assert result.exit_code == 1 and engine.asked == [], "no engine was asked"
    assert result.output.strip() == (
        "error: no model signing key for dev: set MLOPS_MODEL_SIGNING_KEY_DEV, or run where the Pulumi CLI reads "
        "stack dev's secret mlops:modelSigningKey (make one with `openssl genpkey -algorithm ed25519 | pulumi config "
        "set --secret mlops:modelSigningKey --stack dev`)")


def test_the_run_is_hardened_limited_labelled_and_on_the_stage_network(environments):
    gpu_training = {"training": {"gpu": True, "limits": {"cpus": 1.5, "memory_mb": 768}}}
    spec = load_stage("dev", environments, overrides=gpu_training)
    arguments = run_arguments(spec, "image:tag", "sha256:abc", "dev-train-1", ["--seed", "3"])
    pairs = set(zip(arguments, arguments[1:]))
    assert {("--network", "dev-net"), ("--user", "10001:10001"), ("--cpus", "1.5"), ("--memory", "768m"),
            ("--gpus", "all"), ("--security-opt", "no-new-privileges:true"), ("--cap-drop", "ALL"),
            ("--label", "mlops.component=training-run"), ("--label", "mlops.stage=dev"),
            ("--label", "mlops.stack=dev"), ("--env", "MLFLOW_TRACKING_URI=http://dev-model-registry:5000"),
            ("--env", "TRAINING_IMAGE_DIGEST=sha256:abc"), ("--ipc", "none"), ("--ulimit", "nproc=4096:4096"),
            ("--env", "MLFLOW_TRACKING_USERNAME=trainer"), ("--volume", "/run/secrets"),
            ("--env", "MLFLOW_TRACKING_PASSWORD_FILE=/run/secrets/mlflow-trainer-password")} <= pairs
    assert "--rm" in arguments and "--read-only" in arguments
    assert arguments[0] == "create" and arguments[-5:] == ["image:tag", "-m", "mlops_training", "--seed", "3"]


def test_the_runs_password_is_a_file_only_the_app_user_reads_and_never_a_variable():
    run = run_of(load_stages(["dev"])[0], "image:tag", "sha256:abc", "dev-train-1", PASSWORD, None, [])
    with tarfile.open(fileobj=io.BytesIO(secret_files_archive(run))) as archive:
        [entry] = archive.getmembers()
        assert (entry.name, entry.uid, entry.gid, entry.mode) == ("mlflow-trainer-password", 10001, 10001, 0o400)
        assert archive.extractfile(entry).read() == PASSWORD.encode()
    assert not any(key.endswith("PASSWORD") for key in docker_create_arguments(run)), "only the file's path is given"
    # `docker run` could only pass it as a variable: a run with a secret is created, given its file, then started.
    with pytest.raises(ValueError, match="training-run has secrets"):
        docker_run_arguments(run)


def test_a_missing_mlflow_secret_is_one_line_and_exit_1(monkeypatch, tmp_path):
    monkeypatch.delenv("MLOPS_MLFLOW_PASSWORD_DEV", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no Pulumi CLI to read the stack's secret either
    result = CliRunner().invoke(app, ["train", "--stage", "dev", "--model", "iris-classifier"])
    assert result.exit_code == 1
    assert result.output.strip() == ("error: no password for dev's MLflow: set MLOPS_MLFLOW_PASSWORD_DEV, or run where "
                                     "the Pulumi CLI reads stack dev's secret mlops:mlflowPassword")


def test_no_gpu_unless_asked():
    assert "--gpus" not in run_arguments(load_stages(["dev"])[0], "image:tag", "sha256:abc", "dev-train-1", [])


@pytest.mark.parametrize(("arguments", "message"), [
    (["--subset", "0"], "error: --subset must be a fraction in (0, 1], got 0.0"),
    (["--subset", "1.5"], "error: --subset must be a fraction in (0, 1], got 1.5"),
    (["--param", "n_estimators"], "error: --param 'n_estimators' is not key=value"),
])
def test_bad_input_is_one_line_and_exit_2(arguments, message):
    result = CliRunner().invoke(app, ["train", "--stage", "dev", *arguments])
    assert result.exit_code == 2
    assert result.output.strip() == message


def test_an_experiment_trains_in_its_own_image_network_and_registry(tmp_path):
    """`mlops exp up` leaves the settings in Pulumi.exp-NAME.yaml; train reads them without the Pulumi CLI."""
    import json

    from mlops.experiments import ExperimentSettings, experiment_spec_from_stack_file

    settings = ExperimentSettings(name="lr-sweep", owner="alice", created_at="2026-11-25T20:00:00Z",
                                  expires_at="2026-11-26T04:00:00Z", source="dev",
                                  overrides={"training.limits.cpus": 1.5})
    (tmp_path / "Pulumi.exp-lr-sweep.yaml").write_text(
        "config:\n  mlops:experiment: " + json.dumps(json.dumps(settings.to_config())) + "\n")
    spec = experiment_spec_from_stack_file("exp-lr-sweep", project_dir=tmp_path)
    assert (spec.stage, spec.kind, spec.experiment.owner) == ("exp-lr-sweep", "experiment", "alice")
    assert spec.training.limits.cpus == 1.5
    arguments = run_arguments(spec, "img", "sha256:" + "0" * 64, "exp-lr-sweep-train-1", [])
    assert arguments[arguments.index("--network") + 1] == "exp-lr-sweep-net"
    assert "MLFLOW_TRACKING_URI=http://exp-lr-sweep-model-registry:5000" in arguments


def test_training_in_an_experiment_that_does_not_exist_says_how_to_create_it():
    result = CliRunner().invoke(app, ["train", "--stage", "exp-nothing-here"])
    assert isinstance(result.exception, SpecError), "cli.main turns a SpecError into one line and exit 2"
    assert "no experiment 'exp-nothing-here' here; create it with `mlops exp up nothing-here`" in str(result.exception)


def test_with_data_the_run_mounts_the_datasets_volume_read_only():
    spec = load_stages(["dev"])[0]
    arguments = run_arguments(spec, "image:tag", "sha256:abc", "dev-train-1", ["--data", "latest"], with_datasets=True)
    assert ("--volume", "dev-datasets:/data/datasets:ro") in set(zip(arguments, arguments[1:]))
    assert arguments[-5:] == ["image:tag", "-m", "mlops_training", "--data", "latest"]
    without = run_arguments(spec, "image:tag", "sha256:abc", "dev-train-1", [])
    assert [value for option, value in zip(without, without[1:]) if option == "--volume"] == ["/run/secrets"]


def test_a_data_run_has_no_network_and_only_its_volume():
    from mlops.commands.data import data_run_arguments

    arguments = data_run_arguments(load_stages(["dev"])[0], "image:tag", "datasets", "/data/datasets", False, ["add"])
    pairs = set(zip(arguments, arguments[1:]))
    assert {("--network", "none"), ("--user", "10001:10001"), ("--cap-drop", "ALL"), ("--ipc", "none"),
            ("--security-opt", "no-new-privileges:true"), ("--label", "mlops.component=data-run"),
            ("--volume", "dev-datasets:/data/datasets"), ("--entrypoint", "python3")} <= pairs
    assert "--read-only" in arguments and arguments[-4:] == ["image:tag", "-m", "mlops_training.datasets", "add"]
    assert [argument for argument in arguments if argument.startswith("--env")] == [], "no secret, no MLflow"


@pytest.mark.parametrize("arguments", [
    ["train", "--stage", "cluster", "--model", "iris-classifier", "--data", "latest"],
    ["data", "list", "--stage", "cluster", "--model", "iris-classifier"],
    ["data", "add", "--stage", "cluster", "--model", "iris-classifier", "any.csv"],
])
def test_datasets_are_refused_on_a_swarm_stage_in_one_line(arguments, monkeypatch):
    monkeypatch.setenv("MLOPS_MLFLOW_PASSWORD_CLUSTER", "x")
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: cluster is a swarm stage: its datasets")
    assert "work on single-host stages only" in result.output or "works on single-host stages only" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["newest", "abc", "../x.csv", "0123456789abcdeg"])
def test_a_data_name_that_names_no_dataset_is_one_line_and_exit_2(name):
    result = CliRunner().invoke(app, ["train", "--stage", "dev", "--data", name])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: --data '{name}' is no dataset name: give 'latest', or a dataset's sha256 "
                                     "or at least its first 8 hex characters (`mlops data list`)")


def test_samples_of_a_model_the_stage_does_not_sample_are_refused(tmp_path):
    result = CliRunner().invoke(app, ["data", "samples", "--stage", "dev", "--model", "iris-classifier",
                                      "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: dev does not sample iris-classifier's requests: declare "
                                     "models.iris-classifier.sampling (docs/contracts.md says what it keeps)")
    assert list(tmp_path.iterdir()) == []


def test_a_training_run_is_hardened_as_the_stacks_containers_are():
    spec = load_stages(["dev"])[0]
    [registry] = [r for r in planning.render("dev", spec) if r.name == "dev-model-registry-server"]
    container = registry.inputs
    arguments = run_arguments(spec, "image:tag", "sha256:abc", "dev-train-1", [])
    pairs = set(zip(arguments, arguments[1:]))
    ulimit = container["ulimits"][0]
    assert {("--user", container["user"]), ("--tmpfs", f"/tmp:{container['tmpfs']['/tmp']}"),
            ("--ipc", container["ipcMode"]), ("--ulimit", f"{ulimit['name']}={ulimit['soft']}:{ulimit['hard']}"),
            *[("--security-opt", option) for option in container["securityOpts"]],
            *[("--cap-drop", capability) for capability in container["capabilities"]["drops"]],
            ("--memory", f"{spec.training.limits.memory_mb}m"),
            ("--memory-swap", f"{spec.training.limits.memory_mb}m")} <= pairs
