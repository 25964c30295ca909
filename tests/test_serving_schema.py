"""A model whose manifest records its schema, in-process: a regressor pipeline with a team's own transformer,
pickled, served by the V2 app; requests as one [N, features] tensor or one named input per feature, checked
against the schema by the code both runtimes share; metadata naming the schema's inputs; drift naming its
features and counting a regressor's predictions in the profile's fixed target bins."""
from __future__ import annotations

import json
import logging
import pickle
import sys

import numpy as np
import pytest
import tritonclient.http
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mlops_spec.project import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "images" / "serving"))
from prometheus_client import generate_latest  # noqa: E402
from serving.app import InferenceApp  # noqa: E402
from serving.drift import DriftMonitor, ProfileError  # noqa: E402
from serving.protocol import decode_infer_request, json_infer_request  # noqa: E402
from serving.registry import FetchedModel  # noqa: E402
from serving.schema import ModelSchema, SchemaError  # noqa: E402
from serving.startup import model_schema  # noqa: E402

from tests.team_transformers import BmiTimesPressure  # noqa: E402
from tests.test_serving import call  # noqa: E402

NAME = "diabetes-regressor"
INFER = f"/v2/models/{NAME}/infer"
INT_FEATURES = {"age", "sex"}
DECILES = np.linspace(0.1, 0.9, 9)


def binned(values: np.ndarray) -> dict:
    """Decile edges (ties collapsed) and the share of `values` in each bin, as the manifest contract states."""
    edges = np.unique(np.round(np.quantile(values, DECILES), 6))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return {"edges": edges.tolist(), "proportions": (counts / len(values)).tolist()}


@pytest.fixture(scope="module")
def diabetes():
    data = load_diabetes(scaled=False)
    model = make_pipeline(BmiTimesPressure(), StandardScaler(), Ridge()).fit(data.data, data.target)
    names = list(data.feature_names)
    manifest = {
        "model_name": NAME, "task": "regression", "outputs": {"model_sha256": "ab" * 32},
        "schema": {"features": [{"name": name, "type": "int" if name in INT_FEATURES else "float"} for name in names],
                   "label": {"name": "progression", "type": "float"}},
        "reference_profile": {"rows": len(data.target),
                              "features": [{"name": name, **binned(column)} for name, column in zip(names, data.data.T)],
                              "target_bins": binned(data.target)},
    }
    # What serving gets: the pickled bytes, unpickled where the team's module is importable.
    return pickle.loads(pickle.dumps(model)), data.data, names, manifest


@pytest.fixture
def app(diabetes):
    model, _, _, manifest = diabetes
    return InferenceApp(model, name=NAME, version="2", sha256="ab" * 32, schema=ModelSchema.of(manifest, 10))


def columns(rows: np.ndarray, names: list[str], order=None, shape=lambda n: [n], **extra) -> bytes:
    """One input per feature, in `order` (indices into `names`; default the schema's)."""
    inputs = []
    for index in order if order is not None else range(len(names)):
        integer = names[index] in INT_FEATURES
        values = rows[:, index].astype(np.int64 if integer else np.float64)
        inputs.append({"name": names[index], "datatype": "INT64" if integer else "FP64",
                       "shape": shape(len(rows)), "data": values.tolist()})
    return json.dumps({"inputs": inputs, **extra}).encode()


def tensor(rows: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input-0", "datatype": "FP64", "shape": list(rows.shape),
                                   "data": rows.tolist()}]}).encode()


def predicted(answer) -> list[float]:
    assert answer.status == 200, answer.body
    return answer.json()["outputs"][0]["data"]


def test_tensor_and_columnar_requests_get_the_models_predictions(app, diabetes):
    model, features, names, _ = diabetes
    rows = features[::37]
    expected = model.predict(rows).tolist()
    assert predicted(call(app, "POST", INFER, tensor(rows))) == expected
    assert predicted(call(app, "POST", INFER, columns(rows, names))) == expected
    shuffled = list(np.random.default_rng(0).permutation(len(names)))
    assert predicted(call(app, "POST", INFER, columns(rows, names, order=shuffled, shape=lambda n: [n, 1]))) == expected


def test_columnar_binary_inputs_as_tritonclient_sends_them(app, diabetes):
    model, features, names, _ = diabetes
    rows = features[5:12]
    inputs = []
    for index in reversed(range(len(names))):
        # Mixed: integers binary as INT32, one float column as JSON, the others binary.
        datatype = "INT32" if names[index] in INT_FEATURES else "FP64"
        column = tritonclient.http.InferInput(names[index], [len(rows)], datatype)
        column.set_data_from_numpy(rows[:, index].astype(np.int32 if datatype == "INT32" else np.float64),
                                   binary_data=names[index] != "bmi")
        inputs.append(column)
    body, json_size = tritonclient.http.InferenceServerClient.generate_request_body(inputs)
    answer = call(app, "POST", INFER, body, ((b"inference-header-content-length", str(json_size).encode()),))
    assert answer.status == 200, answer.body
    result = tritonclient.http.InferResult.from_response_body(
        answer.body, header_length=int(answer.headers[b"inference-header-content-length"]))
    assert result.as_numpy("predict").tolist() == model.predict(rows).tolist()


def test_what_the_mlserver_layer_hands_mlserver_is_the_one_tensor_in_schema_order(diabetes):
    _, features, names, manifest = diabetes
    schema = ModelSchema.of(manifest, 10)
    rows = features[:3]
    request = decode_infer_request(columns(rows, names, order=list(reversed(range(10)))), None, schema)
    assert not request.json_tensor
    forwarded = decode_infer_request(json_infer_request(request), None, schema)
    assert forwarded.json_tensor
    np.testing.assert_array_equal(forwarded.features, rows)


EXPECTED = ("expected one input per feature: age, sex, bmi, bp, s1, s2, s3, s4, s5, s6 "
            "(or one FP32 or FP64 tensor [N, 10])")


def edited(body: bytes, edit) -> bytes:
    request = json.loads(body)
    edit(request["inputs"])
    return json.dumps(request).encode()


@pytest.mark.parametrize("edit, error", [
    (lambda inputs: inputs[2].update(name="BMI"), "no feature is named 'BMI'; missing 'bmi'"),
    (lambda inputs: inputs.pop(3), "missing 'bp'"),
    (lambda inputs: inputs.append(dict(inputs[0])), "'age' given more than once"),
    (lambda inputs: inputs[4].update(shape=[2], data=[1.0, 2.0]),
     "input 's1' has 2 rows and input 'age' 3: every feature needs the same N"),
    (lambda inputs: inputs[4].update(datatype="BYTES", data=["1", "2", "3"]),
     "input 's1' has datatype 'BYTES'; a feature of type float takes INT8, INT16, INT32, INT64, UINT8, UINT16, "
     "UINT32, UINT64, FP16, FP32, FP64;"),
    (lambda inputs: inputs[4].update(datatype="BOOL", data=[True, False, True]),
     "input 's1' has datatype 'BOOL'; a feature of type float takes"),
    (lambda inputs: inputs[4].update(shape=[3, 2]), "input 's1' must have shape [N] or [N, 1], got [3, 2]"),
    (lambda inputs: inputs.clear(), "expected exactly one input tensor, got 0"),
    (lambda inputs: inputs.__delitem__(slice(1, None)), "missing 'sex', 'bmi', 'bp', 's1', 's2', 's3', 's4', 's5', 's6'"),
    (lambda inputs: (inputs.__delitem__(slice(1, None)), inputs[0].update(name="input-0", datatype="FP64")),
     "input 'input-0' must have shape [N, features], got [3]"),
])
def test_other_inputs_get_400_naming_the_expected_ones(app, diabetes, edit, error):
    _, features, names, _ = diabetes
    answer = call(app, "POST", INFER, edited(columns(features[:3], names), edit))
    assert answer.status == 400
    assert answer.json()["error"].startswith(error) and answer.json()["error"].endswith(f"; {EXPECTED}"), answer.body


@pytest.mark.parametrize("edit, error", [
    (lambda inputs: inputs[0].update(data=[50, 60.5, 70]), "input 'age' data must be INT64 numbers"),
    (lambda inputs: inputs[0].update(datatype="INT8", data=[50, 600, 70]), "input 'age' has values outside the range of INT8"),
    (lambda inputs: inputs[1].update(datatype="BOOL", data=[1, 0, 1]), "input 'sex' data must be BOOL booleans"),
    (lambda inputs: inputs[2].update(data=[1.0, float("inf"), 2.0]), "request body is not valid JSON"),
    (lambda inputs: inputs[2].update(data=["1", "2", "3"]), "input 'bmi' data must be FP64 numbers"),
])
def test_bad_values_in_a_column_get_400(app, diabetes, edit, error):
    _, features, names, _ = diabetes
    answer = call(app, "POST", INFER, edited(columns(features[:3], names), edit))
    assert answer.status == 400 and answer.json()["error"].startswith(error), answer.body


def test_an_int_feature_takes_bool_columns(app, diabetes):
    model, features, names, _ = diabetes
    rows = features[:4].copy()
    rows[:, 1] = [0, 1, 1, 0]
    body = edited(columns(rows, names), lambda inputs: inputs[1].update(datatype="BOOL", data=[False, True, True, False]))
    assert predicted(call(app, "POST", INFER, body)) == model.predict(rows).tolist()


def test_metadata_lists_the_schemas_inputs_in_order(app, diabetes):
    names = diabetes[2]
    for path in (f"/v2/models/{NAME}", f"/v2/models/{NAME}/versions/2"):
        metadata = call(app, "GET", path).json()
        assert metadata["inputs"] == [{"name": name, "datatype": "INT64" if name in INT_FEATURES else "FP64",
                                       "shape": [-1]} for name in names]
        assert metadata["outputs"] == [{"name": "predict", "datatype": "FP64", "shape": [-1]}]


def test_a_manifest_without_schema_is_served_as_before(diabetes):
    model, features, names, manifest = diabetes
    legacy = {key: value for key, value in manifest.items() if key not in ("schema", "task")}
    app = InferenceApp(model, name=NAME, version="2", sha256="ab" * 32, schema=ModelSchema.of(legacy, 10))
    assert call(app, "GET", f"/v2/models/{NAME}").json()["inputs"] == [{"name": "input-0", "datatype": "FP64",
                                                                          "shape": [-1, 10]}]
    assert predicted(call(app, "POST", INFER, tensor(features[:3]))) == model.predict(features[:3]).tolist()
    answer = call(app, "POST", INFER, columns(features[:3], names))
    assert answer.status == 400
    assert answer.json()["error"] == ("expected exactly one input tensor, got 10; "
                                      "expected one FP32 or FP64 tensor [N, 10]")


@pytest.mark.parametrize("change, error", [
    (lambda manifest: manifest["schema"]["features"].pop(), "the manifest's schema lists 9 features, the model takes 10"),
    (lambda manifest: manifest["schema"]["features"][0].update(type="date"),
     "the manifest's schema has feature types date; expected float or int"),
    (lambda manifest: manifest.update(task="ranking"), "the manifest's task is 'ranking'"),
    (lambda manifest: manifest["schema"].pop("features"), "the manifest's schema is malformed"),
])
def test_a_schema_that_does_not_fit_refuses_the_model_in_one_line(diabetes, change, error, caplog):
    manifest = json.loads(json.dumps(diabetes[3]))
    change(manifest)
    with pytest.raises(SchemaError, match=error):
        ModelSchema.of(manifest, 10)
    fetched = FetchedModel(name=NAME, version="2", sha256="ab" * 32, payload=b"", manifest=manifest)
    with caplog.at_level(logging.ERROR, logger="serving"), pytest.raises(SystemExit) as exited:
        model_schema(fetched, 10)
    assert exited.value.code == 1
    [line] = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert line.startswith(f"refusing model {NAME} v2: {error}")


def scraped(app: InferenceApp) -> dict[str, dict[str, float]]:
    """name -> {the one label's value: sample value}."""
    samples: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(generate_latest(app.metrics).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[",".join(sample.labels.values())] = sample.value
    return samples


def monitored(diabetes, window_rows: int = 200) -> InferenceApp:
    model, _, names, manifest = diabetes
    schema = ModelSchema.of(manifest, 10)
    drift = DriftMonitor(manifest["reference_profile"], 10, window_rows, feature_names=schema.names, task=schema.task)
    return InferenceApp(model, name=NAME, version="2", sha256="ab" * 32, schema=schema, drift=drift)


def test_drift_names_features_by_the_schema_and_bins_a_regressors_predictions(diabetes):
    model, features, names, manifest = diabetes
    app = monitored(diabetes)
    for start in range(0, 400, 40):
        predicted(call(app, "POST", INFER, columns(features[start:start + 40], names)))
    samples = scraped(app)
    assert list(samples["mlops_drift_psi"]) == names
    target = manifest["reference_profile"]["target_bins"]
    edges = ["-inf", *map(repr, target["edges"]), "+inf"]
    labels = [f"[{low},{high})" for low, high in zip(edges, edges[1:])]
    assert samples["mlops_reference_prediction_share"] == pytest.approx(dict(zip(labels, target["proportions"])))
    counts = np.bincount(np.searchsorted(target["edges"], model.predict(features[:400]), side="right"),
                         minlength=len(labels))
    assert samples["mlops_predictions_total"] == dict(zip(labels, counts.astype(float).tolist()))


def test_a_regressors_prediction_series_stay_bounded_whatever_the_traffic(diabetes):
    manifest = diabetes[3]
    drift = DriftMonitor(manifest["reference_profile"], 10, 500, task="regression")
    predictions = np.random.default_rng(1).normal(150, 300, 10_000)
    assert len(np.unique(predictions)) == 10_000
    for batch in np.split(predictions, 100):
        drift.observe(np.zeros((len(batch), 10)), batch)
    [counted] = [family for family in drift.collect() if family.name == "mlops_predictions"]
    assert len(counted.samples) <= len(manifest["reference_profile"]["target_bins"]["edges"]) + 1
    assert sum(sample.value for sample in counted.samples) == 10_000


def test_a_regressors_profile_needs_target_bins_and_the_schemas_feature_names(diabetes):
    profile = dict(diabetes[3]["reference_profile"])
    with pytest.raises(ProfileError, match="the reference profile describes features"):
        DriftMonitor(profile, 10, 500, feature_names=[f"x{index}" for index in range(10)])
    profile.pop("target_bins")
    with pytest.raises(ProfileError, match="a regressor's reference profile needs target_bins"):
        DriftMonitor(profile, 10, 500, task="regression")
