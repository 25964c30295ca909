"""Two models in one stage on a real engine: the classifier and the regressor (whose pipeline holds a transformer
class of its project's own), each trained from its project, served through one gateway, monitored and released on
its own.

One stage (a private copy of dev with monitoring, one-second scrapes) serves both. Shown here: each model answers
with the predictions of its registered version, and an unknown model is a 404 at the gateway; 10,000 requests with
distinct predictions leave the regressor's series bounded; a failing canary of the regressor is rolled back while
the classifier loses no request; and a new release of one model replaces only that model's containers.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import pickle
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_diabetes, load_iris
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer

from mlops.modelstore import BasicAuth, MlflowStore
from mlops_spec.contract import (
    MLFLOW_PASSWORD,
    READER,
    SECRET_FILES_SUFFIX,
    TRAINER,
    derived_password,
    rollout_folder,
    secret_variable,
)
from mlops_spec.loading import load_stages
from mlops_spec.model_project import load_model_project
from mlops_spec.models import StageSpec
from mlops_spec.project import ENVIRONMENTS_DIR, REPO_ROOT
from tests.conftest import fetch_build_inputs, free_port, private_copy_of_dev
from tests.engine import StageOnEngine
from tests.test_end_to_end import http_json, train
from tests.test_gateway_failover import MlflowRest, PassThrough

pytestmark = pytest.mark.docker

CLASSIFIER, REGRESSOR = "iris-classifier", "diabetes-regressor"
BAKE_TIME_S = 15
POLICY = {"steps": [10, 50, 100], "bake_time_s": BAKE_TIME_S, "max_error_rate_increase": 0.05,
          "max_p99_latency_ratio": 50.0, "min_requests": 10, "check_interval_s": 1}
# The failing regressor raises on rows whose bmi (feature 2) is above 0.05, which the load below sends; the
# replica's test prediction (a row of zeros) still passes, so its green turns ready and fails only under traffic.
FAILS_ON = "lambda features: 1 / 0 if (features[:, 2] > 0.05).any() else features"


def infer_body(rows: np.ndarray) -> dict:
    return {"inputs": [{"name": "input-0", "shape": list(rows.shape), "datatype": "FP64", "data": rows.ravel().tolist()}]}


def write_stage(environments: Path, name: str, ports: dict[str, int], models: dict[str, dict]) -> StageSpec:
    """Stage `name`, a private copy of dev with monitoring and `models` (each model's entry), as loaded."""
    spec = private_copy_of_dev(name, ports, models=(CLASSIFIER, REGRESSOR))
    spec["monitoring"] = {"port": {"host_port": ports["prometheus"]}, "scrape_interval_s": 1,
                          "evaluation_interval_s": 1, "drift_window_rows": 200}
    spec["models"] = models
    (environments / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_stages([name], environments)[0]


@dataclass
class TwoModelStage:
    name: str
    environments: Path
    ports: dict[str, int]
    engine: StageOnEngine
    registered: dict[str, dict[str, str]] = field(default_factory=dict)
    """What `mlops train` registered of each model: name, version, sha256."""

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    def declare(self, models: dict[str, dict]) -> None:
        """The stage file with `models` (each model's entry), deployed as `pulumi up` of the edited file would."""
        self.engine.spec = write_stage(self.environments, self.name, self.ports, models)
        self.engine.deploy()

    def released(self, model: str) -> dict:
        return {"version": int(self.registered[model]["version"]), "sha256": self.registered[model]["sha256"]}

    def reader(self) -> MlflowStore:
        return MlflowStore(f"http://127.0.0.1:{self.ports['mlflow']}",
                           BasicAuth(READER, derived_password(self.engine.mlflow_password, READER)))

    def query(self, promql: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.ports['prometheus']}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        answer = http_json(url)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def model_containers(self) -> dict[str, str]:
        """Each serving container's name -> ID (not the writers of their secret files, which never run)."""
        listed = self.engine.client.containers.list(all=True, filters={"label": f"mlops.stack={self.name}"})
        return {container.name: container.id for container in listed if container.name.startswith(
            (f"{self.name}-{CLASSIFIER}-", f"{self.name}-{REGRESSOR}-"))
            and not container.name.endswith(SECRET_FILES_SUFFIX)}


@pytest.fixture(scope="module")
def stage(docker_engine, tmp_path_factory):
    fetch_build_inputs()
    environments = tmp_path_factory.mktemp("two-models") / "environments"
    shutil.copytree(ENVIRONMENTS_DIR, environments)
    name = f"t-two-{uuid.uuid4().hex[:6]}"
    ports = {role: free_port() for role in ("mlflow", "gateway", "prometheus")}
    following_latest = {model: {"release": {"version": "latest"}} for model in (CLASSIFIER, REGRESSOR)}
    engine = StageOnEngine(stack=name, spec=write_stage(environments, name, ports, following_latest),
                           registry_password=uuid.uuid4().hex)
    # `mlops train` reads the stage's MLflow secret as CI provides it.
    variable = secret_variable(MLFLOW_PASSWORD, name)
    os.environ[variable] = engine.mlflow_password
    created = TwoModelStage(name, environments, ports, engine)
    try:
        engine.deploy()
        for model in (CLASSIFIER, REGRESSOR):
            created.registered[model] = train(name, environments, "--model", model)
            assert created.registered[model]["name"] == model
        created.declare({model: {"release": created.released(model)} for model in (CLASSIFIER, REGRESSOR)})
        yield created
    finally:
        os.environ.pop(variable, None)
        engine.teardown()


def regressor_rows(count: int, seed: int = 0) -> np.ndarray:
    """Diabetes rows, each nudged so that every prediction differs from every other."""
    features = load_diabetes().data
    rows = features[np.arange(count) % len(features)]
    return rows + np.random.default_rng(seed).normal(0, 1e-4, rows.shape)


EXAMPLE_ROWS = {CLASSIFIER: load_iris().data[::10], REGRESSOR: load_diabetes().data[::40]}


def registered_pipeline(store: MlflowStore, model: str, version: int) -> Pipeline:
    """Version `version` of `model` as registered, unpickled with its project's code importable (the regressor's first
    step is a class of its project's own)."""
    project = str(REPO_ROOT / "models" / model)
    sys.path.insert(0, project)
    try:
        return pickle.loads(store.fetch(model, version).files["model.pkl"])
    finally:
        sys.path.remove(project)


def check_each_model_answers_as_registered(gateway: str, store: MlflowStore, versions: dict[str, int]) -> None:
    """Through the gateway at `gateway` (`http://host:port`), for the classifier and the regressor at the versions
    `versions` names: each answers its example rows with the predictions of that registered version, and its metadata
    names the model and its project's features as inputs; a model the stage does not serve is a 404 naming it."""
    assert set(versions) == {CLASSIFIER, REGRESSOR}
    pipelines = {model: registered_pipeline(store, model, version) for model, version in versions.items()}
    for model, pipeline in pipelines.items():
        rows = EXAMPLE_ROWS[model]
        served = http_json(f"{gateway}/v2/models/{model}/infer", infer_body(rows))["outputs"][0]["data"]
        assert np.allclose(served, pipeline.predict(rows)), model
        metadata = http_json(f"{gateway}/v2/models/{model}")
        assert metadata["name"] == model
        assert [tensor["name"] for tensor in metadata["inputs"]] == \
            [feature.name for feature in load_model_project(model).input_schema.features], metadata
    # The regressor's first step is its project's own class, which the replica unpickled to answer.
    assert type(pipelines[REGRESSOR].steps[0][1]).__module__.startswith("diabetes_model")
    with pytest.raises(urllib.error.HTTPError) as unknown:
        http_json(f"{gateway}/v2/models/fraud-detector/infer", infer_body(EXAMPLE_ROWS[CLASSIFIER][:1]))
    assert unknown.value.code == 404
    assert "fraud-detector" in json.loads(unknown.value.read())["error"]


def test_each_model_answers_through_one_gateway_with_its_registered_predictions(stage):
    check_each_model_answers_as_registered(stage.gateway, stage.reader(), {
        model: int(stage.registered[model]["version"]) for model in (CLASSIFIER, REGRESSOR)})


def test_the_classifier_is_served_from_its_signed_skops_form_and_the_regressor_from_its_pickle(stage):
    """The classifier's project asks for skops, so its replicas build it from model.skops and never unpickle; the
    regressor's first step is a class of its project's own, which its project leaves to pickle."""
    store = stage.reader()
    classifier = store.fetch(CLASSIFIER, int(stage.registered[CLASSIFIER]["version"]))
    skops_form = json.loads(classifier.files["manifest.json"])["outputs"]["skops"]
    assert skops_form == {"sha256": hashlib.sha256(classifier.files["model.skops"]).hexdigest(),
                          "trusted_types": ["sklearn.tree._tree.Tree"]}
    assert "model.skops" not in store.fetch(REGRESSOR, int(stage.registered[REGRESSOR]["version"])).files
    for model, source in ((CLASSIFIER, "model.skops, loaded without pickle"), (REGRESSOR, "model.pkl")):
        registered = stage.registered[model]
        replicas = [container for name, container in stage.model_containers().items()
                    if name.startswith(f"{stage.name}-{model}-")]
        assert replicas, model
        for container in replicas:
            log = stage.engine.client.containers.get(container).logs().decode()
            assert (f"serving model {model} v{registered['version']} sha256 {registered['sha256']}, signed by a "
                    f"trusted key, from {source}") in log, log[-2000:]


def post_all(url: str, bodies: list[bytes], connections: int = 4) -> Counter:
    """POST every body over `connections` keep-alive connections; returns the statuses."""
    statuses: Counter = Counter()
    host, port = url.removeprefix("http://").split("/", 1)[0].split(":")
    path = "/" + url.removeprefix("http://").split("/", 1)[1]
    lock = threading.Lock()

    def client(share: list[bytes]) -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        for body in share:
            connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            with lock:
                statuses[response.status] += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(bodies[index::connections],)) for index in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def series_of(stage: TwoModelStage, model: str) -> int:
    """How many series the stage's Prometheus holds of `model`'s replicas."""
    return len(stage.query(f'{{job="serving", model="{model}"}}'))


def test_ten_thousand_distinct_predictions_leave_the_regressors_series_bounded(stage):
    bins = stage.query(f'mlops_reference_prediction_share{{model="{REGRESSOR}"}}')
    assert 2 <= len(bins) <= 10, "a regressor's predictions are counted in the fixed bins of its training targets"
    rows = regressor_rows(10_000)
    url = f"{stage.gateway}/v2/models/{REGRESSOR}/infer"
    assert post_all(url, [json.dumps(infer_body(row[None, :])).encode() for row in rows]) == Counter({200: 10_000})
    time.sleep(3)  # two scrapes
    counted = stage.query(f'mlops_predictions_total{{model="{REGRESSOR}"}}')
    assert {result["metric"]["prediction"] for result in counted} <= {result["metric"]["prediction"] for result in bins}
    assert sum(float(result["value"][1]) for result in counted) >= 10_000
    # Every series of the regressor's replica: its own metrics, the drift scores per feature and the bins.
    assert series_of(stage, REGRESSOR) < 200, "series grew with the traffic"
    psi = stage.query(f'mlops_drift_psi{{model="{REGRESSOR}"}}')
    assert {result["metric"]["feature"] for result in psi} == {"age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4",
                                                                "s5", "s6"}


def failing_regressor(stage: TwoModelStage) -> dict:
    """A regressor version that raises on rows with a high bmi (a 422 at the gateway), registered with the real
    version's manifest (its schema and reference profile)."""
    features, targets = load_diabetes(return_X_y=True)
    payload = pickle.dumps(make_pipeline(FunctionTransformer(PassThrough(FAILS_ON)), Ridge()).fit(features, targets))
    manifest = json.loads(stage.reader().fetch(REGRESSOR, int(stage.registered[REGRESSOR]["version"]))
                          .files["manifest.json"])
    trainer = MlflowRest(f"http://127.0.0.1:{stage.ports['mlflow']}",
                         BasicAuth(TRAINER, derived_password(stage.engine.mlflow_password, TRAINER)))
    version, sha256 = trainer.register(REGRESSOR, payload, manifest)
    return {"version": int(version), "sha256": sha256}


def rollout_state(stage: TwoModelStage, model: str) -> dict | None:
    gateway = stage.engine.client.containers.get(f"{stage.name}-gateway")
    result = gateway.exec_run(["cat", f"{rollout_folder(model)}/state.json"])
    return json.loads(result.output) if result.exit_code == 0 else None


def test_a_failing_regressor_canary_is_rolled_back_while_the_classifier_loses_nothing(stage):
    green = failing_regressor(stage)
    stage.declare({CLASSIFIER: {"release": stage.released(CLASSIFIER)},
                   REGRESSOR: {"release": stage.released(REGRESSOR), "green": {**green, "rollout": POLICY}}})
    high_bmi = regressor_rows(400, seed=1)
    high_bmi[:, 2] = 0.1
    classifier_bodies = [json.dumps(infer_body(row[None, :])).encode() for row in load_iris().data]
    regressor_bodies = [json.dumps(infer_body(row[None, :])).encode() for row in high_bmi]
    classifier, regressor = Counter(), Counter()
    deadline = time.monotonic() + 6 * BAKE_TIME_S
    while time.monotonic() < deadline:
        state = rollout_state(stage, REGRESSOR)
        if state is not None and state["phase"] == "rolled back":
            break
        regressor += post_all(f"{stage.gateway}/v2/models/{REGRESSOR}/infer", regressor_bodies, connections=2)
        classifier += post_all(f"{stage.gateway}/v2/models/{CLASSIFIER}/infer", classifier_bodies, connections=2)
    state = rollout_state(stage, REGRESSOR)
    assert state is not None and (state["phase"], state["green_weight"]) == ("rolled back", 0), state
    assert state["green_release"] == f"{REGRESSOR}:{green['version']}:{green['sha256']}"
    assert 422 in regressor, "the canary answered its share of the regressor's requests with errors"
    assert set(classifier) == {200} and classifier[200] >= len(classifier_bodies), "the classifier lost requests"
    assert rollout_state(stage, CLASSIFIER) is None, "the classifier has no rollout of its own"
    # Rolled back: the regressor's blue answers all of it again.
    after = post_all(f"{stage.gateway}/v2/models/{REGRESSOR}/infer", regressor_bodies[:50], connections=1)
    assert after == Counter({200: 50})


def test_a_new_release_of_one_model_replaces_only_that_models_containers(stage):
    stage.declare({model: {"release": stage.released(model)} for model in (CLASSIFIER, REGRESSOR)})
    before, images = stage.model_containers(), {
        name: stage.engine.client.containers.get(name).attrs["Image"] for name in stage.model_containers()}
    newer = train(stage.name, stage.environments, "--model", CLASSIFIER, "--subset", "0.7")
    assert newer["version"] != stage.registered[CLASSIFIER]["version"]
    stage.declare({CLASSIFIER: {"release": {"version": int(newer["version"]), "sha256": newer["sha256"]}},
                   REGRESSOR: {"release": stage.released(REGRESSOR)}})
    after = stage.model_containers()
    changed = {name for name in before if after.get(name) != before[name]}
    assert changed and all(name.startswith(f"{stage.name}-{CLASSIFIER}-") for name in changed), changed
    regressor = {name for name in before if name.startswith(f"{stage.name}-{REGRESSOR}-")}
    assert regressor and all(after[name] == before[name] for name in regressor), "the regressor was touched"
    assert all(stage.engine.client.containers.get(name).attrs["Image"] == images[name] for name in regressor)
    served = http_json(f"{stage.gateway}/v2/models/{CLASSIFIER}/infer", infer_body(load_iris().data[:3]))
    assert len(served["outputs"][0]["data"]) == 3
