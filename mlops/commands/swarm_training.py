"""`mlops train` on a swarm stage: the run as a one-shot Swarm job (`replicated-job`, never restarted) on a
node that has the declared resources, with the same hardening, labels and MLflow access as on one host.

The run is components/training_environment.py's `training_run`, rendered by components/runtimes.py's
`service_job_arguments`: the trainer's password reaches the task as a Swarm secret created for the run and
removed with it, never as a variable of the service.
Nodes pull the training image from the stage's registry by digest, with credentials the CLI sends along
(`--with-registry-auth`) from a login kept in a throw-away Docker config folder.
"""
from __future__ import annotations

import subprocess
import tempfile
import time
from typing import Callable

from components.runtimes import service_job_arguments
from components.workload import Run
from mlops_spec.models import StageSpec

Docker = Callable[..., subprocess.CompletedProcess[str]]
FINISHED_STATES = ("complete", "failed", "rejected", "shutdown", "orphaned")
POLL_S = 2.0


def task_running(service_ps: str) -> bool:
    """Whether `docker service ps --format {{.CurrentState}}` shows a running task."""
    return any(line.startswith("Running") for line in service_ps.splitlines())


def finished_task(docker: Docker, spec: StageSpec, name: str, waiting: Callable[[str], None]) -> tuple[str, int]:
    """Wait until the job's task ends; its state and exit code. Why the task waits to be scheduled (e.g. no
    node with the resources free) goes to `waiting`, once per reason: it may well be scheduled later."""
    reasons: set[str] = set()
    while True:
        listed = docker(spec, "service", "ps", "--no-trunc", "--format", "{{.ID}}", name)
        if listed.returncode != 0:
            return "removed", 1
        for task in listed.stdout.split():
            # A task not yet started has no container status.
            inspected = docker(spec, "inspect", "--format", "{{.Status.State}}|{{with .Status.ContainerStatus}}"
                                                            "{{.ExitCode}}{{end}}|{{.Status.Err}}", task)
            state, _, rest = inspected.stdout.strip().partition("|")
            exit_code, _, error = rest.partition("|")
            if state in FINISHED_STATES:
                return state, int(exit_code or 1)
            if state == "pending" and error and error not in reasons:
                reasons.add(error)
                waiting(error)
        time.sleep(POLL_S)


def run_job(docker: Docker, spec: StageSpec, run: Run, registry_password: str,
            waiting: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run the job to its end and remove it with its secrets; its exit code and log lines."""
    assert spec.swarm is not None and run.name is not None
    secrets = [secret.resource_name for secret in run.secrets().values()]
    with tempfile.TemporaryDirectory(prefix="mlops-train-") as config:
        try:
            for secret in run.secrets().values():
                created = docker(spec, "secret", "create", secret.resource_name, "-", stdin=str(secret.value))
                if created.returncode != 0:
                    return 1, [f"error: could not create the run's secret: {created.stderr.strip()}"]
            login = docker(spec, "--config", config, "login", "--username", spec.image_registry.username,
                           "--password-stdin", spec.swarm.registry_address, stdin=registry_password)
            if login.returncode != 0:
                return 1, [f"error: could not log in to {spec.swarm.registry_address}: {login.stderr.strip()}"]
            started = docker(spec, "--config", config, *service_job_arguments(run))
            if started.returncode != 0:
                return 1, [f"error: could not start the training job: {started.stderr.strip()}"]
            _, exit_code = finished_task(docker, spec, run.name, waiting)
            logs = docker(spec, "service", "logs", "--raw", "--no-task-ids", run.name)
            return exit_code, (logs.stdout + logs.stderr).splitlines()
        finally:
            docker(spec, "service", "rm", run.name)
            for secret_name in secrets:
                docker(spec, "secret", "rm", secret_name)
