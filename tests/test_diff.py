"""`mlops diff` across git revisions of a temporary repository, in every output format."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tests.conftest import FIXTURE_SERVING_IMAGE
from mlops.cli import app
from mlops.diff import StageRef, diff_stages, to_markdown
from mlops.errors import SpecError

NEW_SERVING_IMAGE = "localhost:5201/prod/serving@sha256:" + "4" * 64


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def committed(released_environments):
    """A git repository whose HEAD holds environments/ with a release promoted to staging and prod."""
    repo = released_environments.parent
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "environments")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "release")
    return released_environments


def change_serving_image(environments):
    prod = environments / "prod.yaml"
    prod.write_text(prod.read_text().replace(FIXTURE_SERVING_IMAGE, NEW_SERVING_IMAGE))


def invoke(*args):
    return CliRunner().invoke(app, ["diff", *args], catch_exceptions=False)


def test_identical_revisions_exit_0(committed):
    result = invoke("prod@HEAD", "prod", "--environments", str(committed))
    assert result.exit_code == 0, result.output
    assert "no differences between prod@HEAD and prod" in result.output


def test_changed_serving_image_shows_exactly_the_serving_resources(committed):
    change_serving_image(committed)
    result = diff_stages(StageRef.parse("prod@HEAD"), StageRef.parse("prod"), committed)
    assert {(c.status, c.name) for c in result.changes} == {
        ("changed", "prod-serving-image"),
        ("changed", "prod-serving-blue-0"), ("changed", "prod-serving-blue-1"), ("changed", "prod-serving-blue-2"),
    }
    pulled = next(c for c in result.changes if c.name == "prod-serving-image")
    assert [(f.path, f.before, f.after) for f in pulled.fields] == [("name", FIXTURE_SERVING_IMAGE, NEW_SERVING_IMAGE)]
    replica = next(c for c in result.changes if c.name == "prod-serving-blue-0")
    assert [f.path for f in replica.fields] == ["image"]

    cli = invoke("prod@HEAD", "prod", "--environments", str(committed), "--format", "json")
    assert cli.exit_code == 1
    assert json.loads(cli.output)["counts"] == {"changed": 4, "added": 0, "removed": 0}


def test_markdown_is_a_pr_comment(committed):
    change_serving_image(committed)
    result = invoke("prod@HEAD", "prod", "--environments", str(committed), "--format", "markdown")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == "### `mlops diff prod@HEAD prod`"
    assert "**prod@HEAD → prod: 4 changed, 0 added, 0 removed," in result.output
    assert f"| `name` | `{FIXTURE_SERVING_IMAGE}` | `{NEW_SERVING_IMAGE}` |" in lines


def test_added_and_removed_resources_when_a_release_appears(committed):
    staging = committed / "staging.yaml"
    staging.write_text(staging.read_text().split("release:")[0])  # staging as before anything was promoted
    result = diff_stages(StageRef.parse("staging"), StageRef.parse("staging@HEAD"), committed)
    added = {c.name for c in result.changes if c.status == "added"}
    assert {"staging-serving", "staging-serving-gateway", "staging-serving-blue-0", "staging-training"} <= added
    assert not [c for c in result.changes if c.status == "removed"]
    markdown = to_markdown(result)
    assert "#### + `staging-serving-gateway` (added, `docker:index/container:Container`)" in markdown
    assert "<details><summary>" in markdown


def test_secrets_never_appear(committed):
    result = diff_stages(StageRef.parse("dev@HEAD"), StageRef.parse("staging"), committed)
    assert "plan-placeholder-password" not in json.dumps(result.to_json(), default=str)


@pytest.mark.parametrize(("before", "message"), [
    ("prod@no-such-ref", "'no-such-ref' is not a git revision"),
    ("qa", "no stage 'qa'; stages here: dev, prod, staging"),
    ("qa@HEAD", "HEAD:environments/qa.yaml: no stage 'qa'"),
    ("prod@", "expected STAGE or STAGE@GITREF"),
])
def test_bad_input_is_one_message_and_exit_2(committed, before, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        diff_stages(StageRef.parse(before), StageRef.parse("prod"), committed)
    cli = subprocess.run([sys.executable, "-m", "mlops", "diff", before, "prod", "--environments", str(committed)],
                         capture_output=True, text=True)
    assert cli.returncode == 2
    assert cli.stderr.startswith("error: ") and "Traceback" not in cli.stderr
    assert message in cli.stderr


def test_different_stages_match_resources_by_stack_neutral_name(committed):
    result = diff_stages(StageRef.parse("staging"), StageRef.parse("prod"), committed)
    assert result.counts["added"] == 1 and result.counts["removed"] == 0  # prod's third serving replica
    assert [c.name for c in result.changes if c.status == "added"] == ["prod-serving-blue-2"]
    gateway = next(c for c in result.changes if c.name == "prod-serving-gateway")
    assert ("ports[0].external", 8180, 8280) in [(f.path, f.before, f.after) for f in gateway.fields]
    assert "opts.parent" not in [f.path for f in gateway.fields]  # staging-serving and prod-serving are the same parent
