"""Input drift in-process: the training run's reference profile, and a replica's PSI over its recent rows
against it, through the V2 app and its metrics as Prometheus scrapes them."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mlops_spec.project import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "images" / "serving"))
sys.path.insert(0, str(REPO_ROOT / "images" / "training"))
from mlops_training.profile import reference_profile  # noqa: E402
from mlops_training.project import load_project  # noqa: E402
from mlops_training.runner import TrainingRequest, train  # noqa: E402
from serving.app import InferenceApp  # noqa: E402
from serving.drift import MIN_ROWS, DriftMonitor, ProfileError  # noqa: E402
from serving.registry import MlflowRegistry, ModelPin  # noqa: E402

from tests.test_serving import call, infer_body, registry  # noqa: E402, F401 - registry is a fixture

WINDOW = 500
THRESHOLD = 0.2


@pytest.fixture(scope="module")
def iris():
    features, labels = load_iris(return_X_y=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(features, labels)
    return model, features, labels


@pytest.fixture
def monitored(iris):
    model, features, labels = iris
    drift = DriftMonitor(reference_profile(features, [str(label) for label in labels], load_iris().feature_names,
                                              "classification"), 4, WINDOW)
    return InferenceApp(model, name="iris-classifier", version="3", sha256="ab" * 32, drift=drift)


def scraped(app: InferenceApp) -> dict[str, dict[tuple, float]]:
    """Every sample of the app's metrics as Prometheus would read them: name -> {label values: value}."""
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(generate_latest(app.metrics).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def psi_by_feature(app: InferenceApp) -> dict[str, float]:
    return {dict(labels)["feature"]: value for labels, value in scraped(app).get("mlops_drift_psi", {}).items()}


def send(app: InferenceApp, rows: np.ndarray, batch: int = 50) -> None:
    for start in range(0, len(rows), batch):
        response = call(app, "POST", "/v2/models/iris-classifier/infer", infer_body(rows[start:start + batch].tolist(), "FP64"))
        assert response.status == 200, response.body


def test_a_training_run_records_the_reference_profile_in_its_manifest(tmp_path):
    project = load_project(REPO_ROOT / "models" / "iris-classifier")
    manifest = json.loads(train(project, TrainingRequest(), tmp_path).manifest_path.read_text())
    profile = manifest["reference_profile"]
    assert [feature["name"] for feature in profile["features"]] == load_iris().feature_names
    for feature in profile["features"]:
        assert feature["edges"] == sorted(set(feature["edges"]))
        assert len(feature["proportions"]) == len(feature["edges"]) + 1
        assert sum(feature["proportions"]) == pytest.approx(1, abs=1e-5)
    assert profile["rows"] == manifest["inputs"]["rows"]
    assert set(profile["class_shares"]) == {"0", "1", "2"}
    assert sum(profile["class_shares"].values()) == pytest.approx(1, abs=1e-5)


def test_rows_from_the_training_distribution_keep_every_score_low(monitored, iris):
    _, features, _ = iris
    rows = features[np.random.default_rng(0).integers(0, len(features), 2 * WINDOW)]
    send(monitored, rows)
    scores = psi_by_feature(monitored)
    assert set(scores) == {"0", "1", "2", "3"}
    assert max(scores.values()) < THRESHOLD / 2, scores
    assert scraped(monitored)["mlops_drift_window_rows"][()] == WINDOW


def test_one_feature_shifted_by_three_sigma_raises_that_score_alone(monitored, iris):
    _, features, _ = iris
    rng = np.random.default_rng(1)
    send(monitored, features[rng.integers(0, len(features), WINDOW)])
    shifted = features[rng.integers(0, len(features), WINDOW)].copy()
    shifted[:, 2] += 3 * features[:, 2].std()
    send(monitored, shifted)
    scores = psi_by_feature(monitored)
    assert scores["2"] > THRESHOLD * 5, scores
    assert max(scores[feature] for feature in ("0", "1", "3")) < THRESHOLD / 2, scores


def test_the_window_forgets_rows_older_than_its_size(monitored, iris):
    _, features, _ = iris
    rng = np.random.default_rng(2)
    shifted = features[rng.integers(0, len(features), WINDOW)].copy()
    shifted[:, 0] += 3 * features[:, 0].std()
    send(monitored, shifted)
    assert psi_by_feature(monitored)["0"] > THRESHOLD
    send(monitored, features[rng.integers(0, len(features), WINDOW)])
    assert psi_by_feature(monitored)["0"] < THRESHOLD / 2


def test_no_score_before_the_window_holds_enough_rows(monitored, iris):
    send(monitored, iris[1][:MIN_ROWS - 1])
    assert psi_by_feature(monitored) == {}
    send(monitored, iris[1][:1])
    assert set(psi_by_feature(monitored)) == {"0", "1", "2", "3"}


def test_predictions_are_counted_by_value_next_to_the_training_class_balance(monitored, iris):
    model, features, labels = iris
    send(monitored, features)
    samples = scraped(monitored)
    predicted = {dict(labels)["prediction"]: value for labels, value in samples["mlops_predictions_total"].items()}
    values, counts = np.unique(model.predict(features), return_counts=True)
    assert predicted == {str(value): count for value, count in zip(values.tolist(), counts.tolist())}
    reference = {dict(labels)["prediction"]: value for labels, value in samples["mlops_reference_prediction_share"].items()}
    assert reference == pytest.approx({"0": 1 / 3, "1": 1 / 3, "2": 1 / 3}, abs=1e-5)


def test_a_profile_that_does_not_fit_the_model_is_refused(iris):
    _, features, labels = iris
    profile = reference_profile(features[:, :3], [str(label) for label in labels], ["a", "b", "c"], "classification")
    with pytest.raises(ProfileError, match="describes 3 features, the model takes 4"):
        DriftMonitor(profile, 4, WINDOW)
    with pytest.raises(ProfileError, match="malformed"):
        DriftMonitor({"features": [{"edges": [1.0]}] * 4}, 4, WINDOW)


def test_without_drift_scoring_the_replica_exports_no_drift_series(iris):
    app = InferenceApp(iris[0], name="iris-classifier", version="3", sha256="ab" * 32)
    send(app, iris[1][:MIN_ROWS])
    assert not {"mlops_drift_psi", "mlops_predictions_total"} & set(scraped(app))


def test_the_scores_are_the_psi_of_exactly_the_last_window_rows(iris):
    _, features, labels = iris
    profile = reference_profile(features, [str(label) for label in labels], load_iris().feature_names,
                                              "classification")
    drift = DriftMonitor(profile, 4, WINDOW)
    rng = np.random.default_rng(3)
    rows = features[rng.integers(0, len(features), 2000)] + rng.normal(0, 0.3, (2000, 4)).cumsum(axis=0) / 100
    start = 0
    # Batches that end a partly filled window and wrap onto its oldest rows, then one larger than the window.
    for size in (70, 130, 450, 333, 2 * WINDOW // 3, 517):
        drift.observe(rows[start:start + size], np.zeros(size))
        start += size
    recent = rows[start - WINDOW:start]
    expected = []
    for feature, described in enumerate(profile["features"]):
        live = np.bincount(np.searchsorted(described["edges"], recent[:, feature], side="right"),
                           minlength=len(described["proportions"])) / WINDOW
        live, reference = np.maximum(live, 1e-4), np.maximum(described["proportions"], 1e-4)
        expected.append(((live - reference) * np.log(live / reference)).sum())
    assert drift.scores(drift.window()) == pytest.approx(expected)


def test_a_replica_reads_the_profile_from_the_manifest_signed_with_its_model(registry):
    server, payload, sha256 = registry
    server.register("11", payload, reference_profile={"rows": 1})
    fetched = MlflowRegistry(server.url, trusted=server.signer.trusted).fetch(ModelPin("iris-classifier", "11", sha256))
    assert fetched.manifest == {"outputs": {"model_sha256": sha256}, "reference_profile": {"rows": 1}}
