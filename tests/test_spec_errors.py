"""Bad input ends in one message naming file, line, field and what is allowed; exit 2; nothing declared."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mlops import cli

DIGEST = "@sha256:" + "b" * 64


def run_cli(monkeypatch, capsys, *args: str) -> tuple[str | int | None, str, str]:
    monkeypatch.setattr(sys, "argv", ["mlops", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def append(file, text: str) -> None:
    file.write_text(file.read_text() + text)


def replace(file, old: str, new: str) -> None:
    content = file.read_text()
    assert old in content
    file.write_text(content.replace(old, new))


def prod_model(key: str, value: str):
    """prod.yaml with `key: value` in iris-classifier's entry, on line 32."""
    return lambda env: replace(env / "prod.yaml", "  iris-classifier:\n", f"  iris-classifier:\n    {key}: {value}\n")


def prod_samples(sampling: str):
    return prod_model("sampling", sampling)


def prod_batches(batching: str):
    return prod_model("batching", batching)


PINNED = "version: 1, sha256: " + "a" * 64


def mlserver_sampling(env) -> None:
    """dev on the mlserver runtime, iris-classifier sampling."""
    replace(env / "dev.yaml", "  build: images/serving\n", "  build: images/serving\n  runtime: mlserver\n")
    replace(env / "dev.yaml", "    release: {version: latest}\n  diabetes",
            "    release: {version: latest}\n    sampling: {fraction: 0.5}\n  diabetes")


BROKEN_SPECS = {
    "malformed YAML": (lambda env: append(env / "prod.yaml", "extra: [1\n"),
                       "prod.yaml:36: not valid YAML: expected ',' or ']', but got '<stream end>'"),
    "duplicate key": (lambda env: append(env / "prod.yaml", "serving:\n  replicas: 4\n"),
                      "prod.yaml:35: not valid YAML: found duplicate key \"serving\""),
    "unknown key": (lambda env: replace(env / "prod.yaml", "  replicas: 3", "  replica: 3"),
                    "prod.yaml:19: serving.replica: unknown key 'replica'; allowed here: build, gateway, health_check, "
                    "limits, port, replicas, runtime"),
    "wrong type": (lambda env: replace(env / "prod.yaml", "replicas: 3", "replicas: three"),
                   "prod.yaml:19: serving.replicas: Input should be a valid integer, unable to parse string as an "
                   "integer (got 'three')"),
    "out of range": (lambda env: replace(env / "prod.yaml", "cpus: 1.0", "cpus: -1"),
                     "prod.yaml:20: serving.limits.cpus: Input should be greater than 0 (got -1)"),
    "not an allowed value": (lambda env: replace(env / "base.yaml", "runtime: oip", "runtime: tensorflow"),
                             "base.yaml:32: serving.runtime: Input should be 'oip' or 'mlserver' (got 'tensorflow')"),
    "unknown top-level key": (lambda env: append(env / "base.yaml", "artifact_store_x: 1\n"),
                              "base.yaml:60: artifact_store_x: unknown key 'artifact_store_x'; allowed here: "
                             "artifact_store, docker, experiment, image_registry, kind, labels, model_registry, models, "
                             "monitoring, parity, promote_from, serving, stage, swarm, training"),
    "prod with one replica": (lambda env: replace(env / "prod.yaml", "replicas: 3", "replicas: 1"),
                              "prod.yaml:19: serving.replicas: prod serves each model with at least 2 replicas, got 1"),
    "a prod model with one replica": (prod_model("replicas", "1"),
                                      "prod.yaml:32: models.iris-classifier.replicas: prod serves each model with at "
                                      "least 2 replicas, got 1"),
    "unprotected prod volumes": (lambda env: replace(env / "prod.yaml", "protect: true", "protect: false"),
                                 "prod.yaml:10: artifact_store.protect: prod data volumes must be protected: set true"),
    "public bind without public": (lambda env: replace(env / "prod.yaml", "host_port: 8280}", "host_port: 8280, bind_address: 0.0.0.0}"),
                                   "prod.yaml:21: serving.port: bind_address 0.0.0.0 needs 'public: true'; only "
                                   "127.0.0.1 is allowed otherwise"),
    "bare tag in prod": (prod_model("release", "{" + PINNED + ", images: {training: 'x:latest', serving: 'y" + DIGEST + "'}}"),
                         "prod.yaml:32: models.iris-classifier.release.images.training: 'x:latest' is not pinned by "
                         "digest; use name@sha256:<64 hex> (no 'latest', no bare tag)"),
    "unpinned model in staging": (lambda env: replace(env / "staging.yaml", "  iris-classifier:\n",
                                                      "  iris-classifier:\n    release: {version: latest}\n"),
                                  "staging.yaml:25: models.iris-classifier.release: outside dev, pin the model "
                                  "by an integer version and its sha256"),
    "weights not 100": (prod_model("traffic", "{blue: 60, green: 30}"),
                        "prod.yaml:32: models.iris-classifier.traffic: blue (60) + green (30) must add up to 100"),
    "green weight without green": (prod_model("traffic", "{blue: 60, green: 40}"),
                                   "prod.yaml:32: models.iris-classifier.traffic.green: is above 0 but no green "
                                   "release of the model is declared to receive it"),
    "prod builds": (lambda env: append(env / "prod.yaml", "training:\n  build: images/training\n"),
                    "prod.yaml:36: training.build: prod never builds workload images (build once, promote by "
                    "digest); remove it"),
    "shared host port": (lambda env: replace(env / "prod.yaml", "host_port: 8280", "host_port: 8080"),
                         "prod.yaml:21: serving.port.host_port: host port 8080 on unix:///var/run/docker.sock is "
                         "already used by dev.serving.port; ports must be unique across stages sharing a Docker host"),
    "remote host scheme": (lambda env: replace(env / "base.yaml", "url: unix:///var/run/docker.sock", "url: http://host"),
                           "base.yaml:4: docker.url: must start with unix://, ssh:// or tcp://"),
    "pin in another stage's registry": (
        prod_model("release", "{" + PINNED + ", images: {training: 'localhost:5001/dev/training" + DIGEST + "', "
                   "serving: 'localhost:5201/prod/serving" + DIGEST + "'}}"),
        "prod.yaml:32: models.iris-classifier.release.images.training: 'localhost:5001/dev/training" + DIGEST + "' "
        "names another stage's registry; prod pulls only from its own (localhost:5201/prod/<image>@sha256:<digest>): "
        "promote with `mlops promote --to prod`, which copies the image there"),
    "cpus the provider reads back otherwise": (
        lambda env: replace(env / "prod.yaml", "cpus: 1.0", "cpus: 0.05"),
        "prod.yaml:20: serving.limits.cpus: 0.05 is read back by the Docker provider as \"0.1\", so every `pulumi up` "
        "would replace the container; use a value such as 0.1, 0.25, 0.5, 1 or 1.5"),
    "unknown platform": (lambda env: replace(env / "base.yaml", "url: unix:///var/run/docker.sock",
                                             "url: unix:///var/run/docker.sock\n  platform: linux/s390x"),
                         "base.yaml:5: docker.platform: Input should be 'linux/amd64' or 'linux/arm64' "
                         "(got 'linux/s390x')"),
    "sampling nothing": (prod_samples("{fraction: 0}"),
        "prod.yaml:32: models.iris-classifier.sampling.fraction: Input should be greater than 0 (got 0)"),
    "sampling more than every row": (prod_samples("{fraction: 1.5}"),
        "prod.yaml:32: models.iris-classifier.sampling.fraction: Input should be less than or equal to 1 (got 1.5)"),
    "sampling without a fraction": (prod_samples("{max_mb: 10}"),
        "prod.yaml:32: models.iris-classifier.sampling.fraction: Field required"),
    "unknown sampling key": (prod_samples("{fraction: 0.1, rate: 2}"),
        "prod.yaml:32: models.iris-classifier.sampling.rate: unknown key 'rate'; allowed here: fraction, max_mb"),
    "sampling cap of nothing": (prod_samples("{fraction: 0.1, max_mb: 0}"),
        "prod.yaml:32: models.iris-classifier.sampling.max_mb: Input should be greater than or equal to 1 (got 0)"),
    "sampling on the mlserver runtime": (
        mlserver_sampling,
        "dev.yaml:16: models.iris-classifier.sampling: the mlserver runtime does not sample requests; use "
        "serving.runtime oip, or remove sampling"),
    "batches of no rows": (prod_batches("{max_batch_size: 0, max_batch_time_ms: 2}"),
                           "prod.yaml:32: models.iris-classifier.batching.max_batch_size: Input should be greater than or equal to 2 "
                           "(got 0)"),
    "batches of one row": (prod_batches("{max_batch_size: 1, max_batch_time_ms: 2}"),
                           "prod.yaml:32: models.iris-classifier.batching.max_batch_size: Input should be greater than or equal to 2 "
                           "(got 1)"),
    "batches past any body": (prod_batches("{max_batch_size: 1000000, max_batch_time_ms: 2}"),
                              "prod.yaml:32: models.iris-classifier.batching.max_batch_size: Input should be less than or equal to "
                              "4096 (got 1000000)"),
    "a negative batch time": (prod_batches("{max_batch_size: 32, max_batch_time_ms: -1}"),
                              "prod.yaml:32: models.iris-classifier.batching.max_batch_time_ms: Input should be greater than 0 "
                              "(got -1)"),
    "a batch time of nothing": (prod_batches("{max_batch_size: 32, max_batch_time_ms: 0}"),
                                "prod.yaml:32: models.iris-classifier.batching.max_batch_time_ms: Input should be greater than 0 "
                                "(got 0)"),
    "batching without a time": (prod_batches("{max_batch_size: 32}"),
                                "prod.yaml:32: models.iris-classifier.batching.max_batch_time_ms: Field required"),
    "a batch time past the health check's timeout": (
        prod_batches("{max_batch_size: 32, max_batch_time_ms: 5000}"),
        "prod.yaml:32: models.iris-classifier.batching.max_batch_time_ms: 5000 ms is not below serving.health_check.timeout_s (3 s): "
        "a request would wait for company longer than a replica may take to answer at all; use a few milliseconds"),
    "a green naming a model": (
        prod_model("green", "{name: diabetes-regressor, " + PINNED + "}"),
        "prod.yaml:32: models.iris-classifier.green.name: unknown key 'name'; allowed here: rollout, serving_image, "
        "sha256, version"),
    "a green without a release": (
        prod_model("green", "{" + PINNED + "}"),
        "prod.yaml:32: models.iris-classifier.green: a green slot serves another version next to blue: declare the "
        "model's release first"),
    "a model name that is no DNS label": (
        lambda env: replace(env / "dev.yaml", "  diabetes-regressor:", "  Diabetes_Regressor:"),
        "dev.yaml:15: models.Diabetes_Regressor.[key]: 'Diabetes_Regressor' is not a model name: lowercase letters, "
        "digits and '-', starting with a letter, at most 40 characters (it names containers, services and images)"),
    "a model without a project": (
        lambda env: append(env / "dev.yaml", "  fraud-detector:\n    release: {version: latest}\n"),
        "dev.yaml:17: models.fraud-detector: dev stages build each model's images from its project, and "
        "models/fraud-detector/mlops-model.yaml does not exist; add the project (docs/models.md) or remove the model"),
    "missing build context": (lambda env: replace(env / "dev.yaml", "build: images/training", "build: images/nothing"),
                              "dev.yaml:5: training.build: build context 'images/nothing' has no Dockerfile"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_SPECS))
def test_each_broken_spec_gets_one_exact_message_and_exit_2(case, environments, monkeypatch, capsys):
    breaks, expected = BROKEN_SPECS[case]
    breaks(environments)
    code, out, err = run_cli(monkeypatch, capsys, "validate", "--environments", str(environments))
    assert code == 2
    assert err == f"error: {environments}/{expected}\n"
    assert "Traceback" not in err


def test_a_missing_stage_file_names_the_known_stages(environments, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "validate", "qa", "--environments", str(environments))
    assert code == 2
    assert err == f"error: {environments}/qa.yaml: no stage 'qa'; stages here: cluster, dev, prod, staging\n"


def test_a_missing_base_file_is_named(environments, monkeypatch, capsys):
    (environments / "base.yaml").unlink()
    code, _, err = run_cli(monkeypatch, capsys, "validate", "dev", "--environments", str(environments))
    assert (code, err) == (2, f"error: {environments}/base.yaml: file not found\n")


def test_plan_of_a_broken_spec_declares_nothing(environments):
    (environments / "prod.yaml").write_text((environments / "prod.yaml").read_text().replace("replicas: 3", "replicas: 1"))
    result = subprocess.run([sys.executable, "-m", "mlops", "plan", "prod", "--format", "json", "--environments",
                             str(environments)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {environments}/prod.yaml:19: serving.replicas:")
    assert "Traceback" not in result.stderr


def test_shipped_stages_validate(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "validate")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "ok dev: serving diabetes-regressor, newest version, 1 replica(s); iris-classifier, newest version, 1 replica(s)",
        "ok staging: nothing promoted yet: no serving",
        "ok prod: nothing promoted yet: no serving",
        "ok cluster: serving diabetes-regressor, newest version, 3 replica(s); iris-classifier, newest version, 3 "
        "replica(s)"]
