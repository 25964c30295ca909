"""`mlops parity`: only the paths base.yaml's parity.may_differ lists may differ between stages."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mlops.cli import app
from mlops.parity import allowed_to_differ, check_parity
from mlops_spec.errors import SpecError
from tests.conftest import FIXTURE_SERVING_DIGEST, FIXTURE_SERVING_IMAGE

OTHER_SERVING_DIGEST = "sha256:" + "5" * 64
OTHER_SERVING_IMAGE = f"localhost:5201/prod/serving@{OTHER_SERVING_DIGEST}"


def invoke(*args):
    return CliRunner().invoke(app, ["parity", *args], catch_exceptions=False)


def test_prefix_match_is_by_whole_segment():
    rules = ["serving.port", "labels"]
    assert allowed_to_differ("serving.port", rules)
    assert allowed_to_differ("serving.port.host_port", rules)
    assert allowed_to_differ("labels[mlops.stage]", rules)
    assert not allowed_to_differ("serving.portal", rules)
    assert not allowed_to_differ("serving.replicas", rules)


def test_same_release_with_allowed_differences_passes(released_environments):
    differences = check_parity(["staging", "prod"], released_environments)
    assert differences and all(d.allowed for d in differences)
    assert {"serving.replicas", "serving.port.host_port", "artifact_store.protect"} <= {d.path for d in differences}
    result = invoke("staging", "prod", "--environments", str(released_environments))
    assert result.exit_code == 0, result.output
    assert "allowed   serving.replicas: staging=2, prod=3" in result.output
    assert "at parity" in result.output


def test_different_serving_image_fails_naming_path_and_values(released_environments):
    prod = released_environments / "prod.yaml"
    prod.write_text(prod.read_text().replace(FIXTURE_SERVING_IMAGE, OTHER_SERVING_IMAGE))
    offending = [d for d in check_parity(["staging", "prod"], released_environments) if not d.allowed]
    # Each stage pins its own registry's copy, so parity compares what runs: the digest.
    assert [(d.path, d.values) for d in offending] == [
        ("models.iris-classifier.release.images.serving", {"staging": FIXTURE_SERVING_DIGEST, "prod": OTHER_SERVING_DIGEST})]
    result = invoke("staging", "prod", "--environments", str(released_environments))
    assert result.exit_code == 1
    assert (f"differs   models.iris-classifier.release.images.serving: staging='{FIXTURE_SERVING_DIGEST}', prod='{OTHER_SERVING_DIGEST}'"
            in result.output)


def test_a_stage_cannot_widen_its_own_parity_rules(released_environments):
    prod = released_environments / "prod.yaml"
    prod.write_text(prod.read_text().replace(FIXTURE_SERVING_IMAGE, OTHER_SERVING_IMAGE)
                    + "parity:\n  may_differ: [models]\n")
    offending = {d.path for d in check_parity(["staging", "prod"], released_environments) if not d.allowed}
    assert "models.iris-classifier.release.images.serving" in offending
    assert any(path.startswith("parity.may_differ") for path in offending)


def test_stage_identity_is_never_compared(released_environments):
    paths = {d.path for d in check_parity(["staging", "prod"], released_environments)}
    assert not paths & {"stage", "kind", "experiment"}


def test_one_stage_is_bad_input(released_environments):
    with pytest.raises(SpecError, match="at least two different stages"):
        check_parity(["prod", "prod"], released_environments)
