"""`mlops train` on a swarm stage: the run as a one-shot Swarm job (`replicated-job`, never restarted) on a
node that has the declared resources, with the same hardening, labels and MLflow access as on one host.

The trainer's password reaches the task as a Swarm secret created for the run and removed with it, never as
a variable of the service: the training image reads MLFLOW_TRACKING_PASSWORD, so the task's shell exports it
from the secret file before it becomes the image's entrypoint (the same image runs on one host unchanged).
Nodes pull the training image from the stage's registry by digest, with credentials the CLI sends along
(`--with-registry-auth`) from a login kept in a throw-away Docker config folder.
"""
from __future__ import annotations

import shlex
import subprocess
import tempfile
import time
from typing import Callable

from components.services import SECRETS_DIR, TMP_BYTES
from mlops_spec.models import StageSpec

Docker = Callable[..., subprocess.CompletedProcess[str]]
PASSWORD_FILE = "mlflow-trainer-password"
TRAINING_ENTRYPOINT = ("python3", "-m", "mlops_training")
"""images/training/Dockerfile's ENTRYPOINT, which the task runs after exporting the password."""
FINISHED_STATES = ("complete", "failed", "rejected", "shutdown", "orphaned")
POLL_S = 2.0


def task_running(service_ps: str) -> bool:
    """Whether `docker service ps --format {{.CurrentState}}` shows a running task."""
    return any(line.startswith("Running") for line in service_ps.splitlines())


def job_arguments(spec: StageSpec, image: str, name: str, secret: str, shared_options: list[str],
                  training_args: list[str]) -> list[str]:
    assert spec.swarm is not None
    limits = spec.training.limits
    placement = spec.swarm.training
    export_password = (f'MLFLOW_TRACKING_PASSWORD="$(cat {SECRETS_DIR}/{PASSWORD_FILE})" '
                       f'exec {shlex.join(TRAINING_ENTRYPOINT)} "$@"')
    return [
        "service", "create", "--detach", "--with-registry-auth", "--name", name, *shared_options,
        "--mode", "replicated-job", "--restart-condition", "none",
        # Reserved as much as limited: the run lands only where its resources are free.
        "--limit-cpu", str(limits.cpus), "--limit-memory", f"{limits.memory_mb}M",
        "--reserve-cpu", str(limits.cpus), "--reserve-memory", f"{limits.memory_mb}M",
        *[option for kind, count in sorted(placement.generic_resources.items())
          for option in ("--generic-resource", f"{kind}={count}")],
        *[option for constraint in placement.constraints for option in ("--constraint", constraint)],
        "--mount", f"type=tmpfs,destination=/tmp,tmpfs-size={TMP_BYTES}",
        "--secret", f"source={secret},target={PASSWORD_FILE},uid=10001,gid=10001,mode=0400",
        "--env", f"TRAINING_IMAGE_DIGEST={image}",
        "--entrypoint", "sh",
        image, "-c", export_password, "mlops-train", *training_args,
    ]


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


def run_job(docker: Docker, spec: StageSpec, image: str, name: str, shared_options: list[str],
            training_args: list[str], password: str, registry_password: str,
            waiting: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run the job to its end and remove it with its secret; its exit code and log lines."""
    secret = f"{name}-password"
    assert spec.swarm is not None
    with tempfile.TemporaryDirectory(prefix="mlops-train-") as config:
        created = docker(spec, "secret", "create", secret, "-", stdin=password)
        if created.returncode != 0:
            return 1, [f"error: could not create the run's secret: {created.stderr.strip()}"]
        try:
            login = docker(spec, "--config", config, "login", "--username", spec.image_registry.username,
                           "--password-stdin", spec.swarm.registry_address, stdin=registry_password)
            if login.returncode != 0:
                return 1, [f"error: could not log in to {spec.swarm.registry_address}: {login.stderr.strip()}"]
            started = docker(spec, "--config", config, *job_arguments(spec, image, name, secret, shared_options, training_args))
            if started.returncode != 0:
                return 1, [f"error: could not start the training job: {started.stderr.strip()}"]
            _, exit_code = finished_task(docker, spec, name, waiting)
            logs = docker(spec, "service", "logs", "--raw", "--no-task-ids", name)
            return exit_code, (logs.stdout + logs.stderr).splitlines()
        finally:
            docker(spec, "service", "rm", name)
            docker(spec, "secret", "rm", secret)
