"""`mlops diff` across git revisions of a temporary repository, in every output format: what changes, what
the provider does with it (update in place or replace), and the data-loss warning."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from mlops.cli import app
from mlops.diff import StageRef, compare, diff_stages, to_markdown
from mlops.plan import PlannedResource
from mlops_spec.errors import SpecError
from tests.conftest import FIXTURE_SERVING_IMAGE

SECRET_TYPE = "docker:index/secret:Secret"
NEW_SERVING_IMAGE = "localhost:5201/prod/iris-classifier-serving@sha256:" + "4" * 64


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
        ("changed", "prod-serving-iris-classifier-image"), ("changed", "prod-serving-iris-classifier-blue-0"),
        ("changed", "prod-serving-iris-classifier-blue-1"), ("changed", "prod-serving-iris-classifier-blue-2"),
        # The writer of the replicas' secret files is created from their image, and writes the same files again.
        ("changed", "prod-serving-iris-classifier-blue-secrets-writer"),
    }
    pulled = next(c for c in result.changes if c.name == "prod-serving-iris-classifier-image")
    assert [(f.path, f.before, f.after) for f in pulled.fields] == [("name", FIXTURE_SERVING_IMAGE, NEW_SERVING_IMAGE)]
    replica = next(c for c in result.changes if c.name == "prod-serving-iris-classifier-blue-0")
    assert [f.path for f in replica.fields] == ["image"]

    cli = invoke("prod@HEAD", "prod", "--environments", str(committed), "--format", "json")
    assert cli.exit_code == 1
    assert json.loads(cli.output)["counts"] == {"changed": 5, "added": 0, "removed": 0}


def test_markdown_is_a_pr_comment(committed):
    change_serving_image(committed)
    result = invoke("prod@HEAD", "prod", "--environments", str(committed), "--format", "markdown")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == "### `mlops diff prod@HEAD prod`"
    assert "**prod@HEAD → prod: 5 changed, 0 added, 0 removed," in result.output
    assert f"| `name` | `{FIXTURE_SERVING_IMAGE}` | `{NEW_SERVING_IMAGE}` |" in lines


def test_added_and_removed_resources_when_a_release_appears(committed):
    staging = committed / "staging.yaml"
    data = yaml.safe_load(staging.read_text())
    del data["models"]["iris-classifier"]["release"]  # staging as before anything was promoted
    staging.write_text(yaml.safe_dump(data, sort_keys=False))
    result = diff_stages(StageRef.parse("staging"), StageRef.parse("staging@HEAD"), committed)
    added = {c.name for c in result.changes if c.status == "added"}
    assert {"staging-serving", "staging-serving-gateway", "staging-serving-iris-classifier-blue-0",
            "staging-serving-iris-classifier-blue-1", "staging-serving-iris-classifier-image",
            "staging-iris-classifier-training", "staging-iris-classifier-training-image"} <= added
    assert not [name for name in added if "diabetes-regressor" in name]
    assert not [c for c in result.changes if c.status == "removed"]
    markdown = to_markdown(result)
    assert "#### + `staging-serving-gateway` (added, `docker:index/container:Container`)" in markdown
    assert "<details><summary>" in markdown


def test_secrets_never_appear(committed):
    result = diff_stages(StageRef.parse("dev@HEAD"), StageRef.parse("staging"), committed)
    assert "plan-placeholder-password" not in json.dumps(result.to_json(), default=str)


@pytest.mark.parametrize(("before", "message"), [
    ("prod@no-such-ref", "'no-such-ref' is not a git revision"),
    ("qa", "no stage 'qa'; stages here: cluster, dev, prod, staging"),
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
    assert [c.name for c in result.changes if c.status == "added"] == ["prod-serving-iris-classifier-blue-2"]
    gateway = next(c for c in result.changes if c.name == "prod-serving-gateway")
    assert ("ports[0].external", 8180, 8280) in [(f.path, f.before, f.after) for f in gateway.fields]
    assert "opts.parent" not in [f.path for f in gateway.fields]  # staging-serving and prod-serving are the same parent


def test_serving_replicas_are_replaced_delete_first_and_the_pulled_image_too(committed):
    change_serving_image(committed)
    result = diff_stages(StageRef.parse("prod@HEAD"), StageRef.parse("prod"), committed)
    replica = next(c for c in result.changes if c.name == "prod-serving-iris-classifier-blue-0")
    # `image` is ForceNew (resource_docker_container.go) and pulumi-docker deletes containers first.
    assert (replica.action, replica.replace_fields, replica.delete_before_replace) == ("replace", ("image",), True)
    pulled = next(c for c in result.changes if c.name == "prod-serving-iris-classifier-image")
    assert (pulled.action, pulled.replace_fields) == ("replace", ("name",))
    assert not result.at_risk and result.risk_summary() is None


def test_json_keeps_its_keys_and_adds_the_verdicts(committed):
    change_serving_image(committed)
    cli = invoke("prod@HEAD", "prod", "--environments", str(committed), "--format", "json")
    output = json.loads(cli.output)
    assert {"before", "after", "differs", "counts", "unchanged", "changes"} <= output.keys()
    assert output["actions"] == {"replace": 5, "update": 0, "none": 0}
    assert output["warning"] is None and output["data_at_risk"] == []
    change = next(c for c in output["changes"] if c["name"] == "prod-serving-iris-classifier-blue-0")
    assert {"status", "type", "name", "fields"} <= change.keys()
    assert (change["action"], change["replace_fields"], change["delete_before_replace"]) == ("replace", ["image"], True)


def resource(resource_type="docker:index/volume:Volume", name="dev-artifact-store-artifacts",
             labels=(("mlops.stage", "dev"),), parent=None, protect=False, **options):
    """A rendered resource as `mlops.plan.render` records it; `options` are retain_on_delete and the like."""
    inputs = {"name": "dev-artifacts", "labels": [{"label": key, "value": value} for key, value in labels]}
    return PlannedResource(type=resource_type, name=name, parent=parent, inputs=inputs, protect=protect, **options)


def only_change(before, after):
    changes, _ = compare(before, after, "dev", "dev")
    assert len(changes) == 1
    return changes[0]


@pytest.mark.parametrize(("before", "after", "risk"), [
    ({}, {}, ("data volume replaced: DATA LOSS, Pulumi creates the replacement first (Docker hands back the "
              "existing volume of the same name), then deletes the old resource, which removes the volume and its data")),
    ({"delete_before_replace": True}, {"delete_before_replace": True},
     "data volume replaced: DATA LOSS, Pulumi deletes the volume and its data, then creates an empty one"),
    ({"retain_on_delete": True}, {"retain_on_delete": True},
     "data volume replaced: retainOnDelete, so Pulumi does not delete the old one from Docker (its data stays on the host)"),
    ({"protect": True, "retain_on_delete": True}, {"protect": True, "retain_on_delete": True},
     "data volume replaced: pulumi up refuses, the resource is protected"),
])
def test_a_relabelled_volume_is_replaced_and_flagged(before, after, risk):
    change = only_change([resource(**before)], [resource(labels=(("mlops.stage", "dev"), ("mlops.owner", "x")), **after)])
    assert (change.action, change.replace_fields, change.data_risk) == ("replace", ("labels",), risk)


def test_a_removed_volume_and_a_removed_protected_resource_are_flagged():
    network = resource("docker:index/network:Network", "dev-network", protect=True)
    changes, _ = compare([resource(), network], [], "dev", "dev")
    assert [(c.status, c.action, c.data_risk) for c in changes] == [
        ("removed", "delete", "data volume deleted: DATA LOSS, Pulumi deletes the volume and its data"),
        ("removed", "delete", "protected resource deleted: pulumi up refuses, the resource is protected")]


def test_a_new_parent_type_changes_the_urn_and_replaces():
    store = PlannedResource("mlops:artifact_store:ArtifactStore", "dev-artifact-store", None, {}, False)
    vault = PlannedResource("mlops:vault:Vault", "dev-vault", None, {}, False)
    changes, _ = compare([store, resource(parent="dev-artifact-store")], [vault, resource(parent="dev-vault")],
                         "dev", "dev")
    moved = next(c for c in changes if c.name == "dev-artifact-store-artifacts")
    assert (moved.action, moved.replace_fields) == ("replace", ("opts.parent",))
    assert moved.data_risk.startswith("data volume replaced: DATA LOSS")


def test_only_protect_changing_is_an_update_of_pulumi_state():
    change = only_change([resource()], [resource(protect=True)])
    assert (change.action, change.data_risk) == ("update", None)


def test_the_data_loss_warning_leads_every_format(committed):
    """staging → prod renames every volume: each is replaced (retained, since the stages keep their data)."""
    text = invoke("staging", "prod", "--environments", str(committed))
    assert text.exit_code == 1
    assert text.output.splitlines()[0].startswith(
        "⚠ DATA AT RISK: 6 data volume(s) or protected resource(s) would be replaced or deleted: "
        "prod-artifact-store-artifacts (replace)")
    assert "    ⚠ data volume replaced: retainOnDelete" in text.output

    markdown = invoke("staging", "prod", "--environments", str(committed), "--format", "markdown").output.splitlines()
    assert markdown[2:4] == ["> [!CAUTION]", (
        "> **⚠️ DATA AT RISK: 6 data volume(s) or protected resource(s) would be replaced or deleted: "
        "prod-artifact-store-artifacts (replace), prod-artifact-store-datasets (replace), "
        "prod-artifact-store-metrics (replace), prod-artifact-store-mlflow-db (replace), prod-artifact-store-registry-data (replace), "
        "prod-artifact-store-rollout (replace)**")]
    assert ("#### ~ `prod-artifact-store-artifacts` (changed, `docker:index/volume:Volume`): "
            "**replace forced by labels, name**") in markdown
    assert any(line.startswith("**⚠️ data volume replaced: retainOnDelete") for line in markdown)

    output = json.loads(invoke("staging", "prod", "--environments", str(committed), "--format", "json").output)
    assert output["warning"].startswith("DATA AT RISK: 6 data volume(s)")
    assert [(r["name"], r["action"]) for r in output["data_at_risk"]] == [
        ("prod-artifact-store-artifacts", "replace"), ("prod-artifact-store-datasets", "replace"),
        ("prod-artifact-store-metrics", "replace"),
        ("prod-artifact-store-mlflow-db", "replace"), ("prod-artifact-store-registry-data", "replace"),
        ("prod-artifact-store-rollout", "replace")]


def test_fail_on_data_loss_exits_3_only_when_data_is_at_risk(committed):
    assert invoke("staging", "prod", "--environments", str(committed), "--fail-on-data-loss").exit_code == 3
    change_serving_image(committed)
    assert invoke("prod@HEAD", "prod", "--environments", str(committed), "--fail-on-data-loss").exit_code == 1
    assert invoke("prod@HEAD", "prod@HEAD", "--environments", str(committed), "--fail-on-data-loss").exit_code == 0


@pytest.mark.parametrize("stage", ["dev", "staging", "prod"])
def test_a_new_owner_replaces_no_volume_and_no_network(committed, stage):
    """Volumes and networks carry only identity labels, so a routine edit of `labels.owner` never touches
    them (their `labels` are ForceNew); containers, relabelled, are replaced without losing anything."""
    base = committed / "base.yaml"
    base.write_text(base.read_text().replace("owner: ml-platform", "owner: ml-research"))
    result = diff_stages(StageRef(stage, "HEAD"), StageRef(stage), committed)
    untouchable = ("docker:index/volume:Volume", "docker:index/network:Network")
    assert [(c.name, c.action) for c in result.changes if c.type in untouchable] == []
    assert result.at_risk == []
    relabelled = [c for c in result.changes if c.type == "docker:index/container:Container"]
    assert relabelled and all(c.replace_fields == ("labels",) for c in relabelled)


def test_a_rendering_leaves_no_event_loop_open(committed):
    """An open loop is closed by the garbage collector at exit, which can print a traceback after `mlops diff`
    has answered (seen once in CI): every loop a rendering opens, on any thread, is closed when it returns."""
    import asyncio
    import gc

    from mlops.plan import render
    from mlops_spec.loading import load_stage

    def open_loops():
        gc.collect()
        return {id(obj): obj for obj in gc.get_objects()
                if isinstance(obj, asyncio.AbstractEventLoop) and not obj.is_closed()}

    open_before = open_loops()
    render("prod", load_stage("prod", environments=committed))
    assert [loop for key, loop in open_loops().items() if key not in open_before] == []


SERVICE = "docker:index/service:Service"


def relabelled(service: PlannedResource, **options) -> PlannedResource:
    """`service` with one more container label (ForceNew: `labelSchema` in resource_docker_service.go)."""
    container = service.inputs["taskSpec"]["containerSpec"]
    labels = [*container["labels"], {"label": "mlops.extra", "value": "x"}]
    inputs = {**service.inputs, "taskSpec": {**service.inputs["taskSpec"], "containerSpec": {**container, "labels": labels}}}
    return dataclasses.replace(service, inputs=inputs, **options)


def test_a_services_replacement_deletes_it_first_so_it_never_collides_with_itself():
    from mlops.plan import render
    from mlops_spec.loading import load_stage

    cluster = render("cluster", load_stage("cluster"))
    services = [r for r in cluster if r.type == SERVICE]
    assert len(services) == 6 and all(service.delete_before_replace for service in services)
    blue = next(service for service in services if service.name == "cluster-serving-iris-classifier-blue")
    changes, _ = compare(cluster, [relabelled(r) if r is blue else r for r in cluster], "cluster", "cluster")
    [change] = changes
    assert (change.action, change.delete_before_replace, change.collision) == ("replace", True, None)
    assert "taskSpec.containerSpec.labels.label" in change.replace_fields


def test_a_replacement_created_first_under_the_same_name_is_flagged_in_every_format():
    from rich.console import Console

    from mlops.commands.diff import _print_text
    from mlops.diff import StackDiff, describe_action

    base = PlannedResource(SERVICE, "dev-serving-blue", None, {
        "name": "dev-serving-blue", "taskSpec": {"containerSpec": {"image": "i", "labels": []}}}, False)
    change = only_change([base], [relabelled(base)])
    assert (change.action, change.delete_before_replace) == ("replace", False)
    assert change.collision.startswith("COLLIDES: Pulumi creates the replacement before it deletes the old one, "
                                       "and the engine refuses a second object named dev-serving-blue")
    assert describe_action(change).startswith("replace (create-before-delete: COLLIDES on its name) forced by ")
    result = StackDiff(before="dev@HEAD", after="dev", changes=[change])
    assert "1 would collide with itself: dev-serving-blue" in result.summary()
    output = result.to_json()
    assert output["collisions"] == [{"name": "dev-serving-blue", "type": SERVICE, "collision": change.collision}]
    assert output["changes"][0]["collision"] == change.collision
    console = Console(record=True, width=400, highlight=False)
    _print_text(result, console)
    text = console.export_text()
    assert "COLLIDES on its name" in text and f"note: {change.collision}" in text
    assert change.collision in to_markdown(result)


@pytest.mark.parametrize(("before", "after", "collides"), [
    # A new name (a content-named secret's new content) never meets the old one.
    (resource(SECRET_TYPE, "dev-secret"), dataclasses.replace(resource(SECRET_TYPE, "dev-secret"),
                                                              inputs={"name": "dev-secret-2", "labels": []}), False),
    (resource(SECRET_TYPE, "dev-secret"), resource(SECRET_TYPE, "dev-secret", labels=()), True),
    (resource(SECRET_TYPE, "dev-secret", delete_before_replace=True),
     resource(SECRET_TYPE, "dev-secret", labels=(), delete_before_replace=True), False),
    # Docker hands back the existing volume of a name: no collision (its data risk is flagged instead).
    (resource(), resource(labels=()), False),
])
def test_only_a_unique_name_kept_by_a_replacement_created_first_collides(before, after, collides):
    change = only_change([before], [after])
    assert change.action == "replace"
    assert (change.collision is not None) is collides
