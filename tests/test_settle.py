"""`mlops settle`: after `pulumi up`, a swarm stage's deploy ends when Swarm has finished every update it started,
and fails on one Swarm rolled back or paused. The engine test is in tests/test_swarm_cluster.py; here the rules,
with the services' states as the manager would report them."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mlops import settle as settling
from mlops.cli import app
from mlops.orphans import DockerError
from mlops_spec.loading import load_stage
from mlops_spec.project import ENVIRONMENTS_DIR

BLUE = "cluster-iris-classifier-blue"


def state(update: str, running: int = 2, desired: int = 2, name: str = BLUE, message: str = "") -> settling.ServiceState:
    return settling.ServiceState(name=name, component="model-serving", update=update, message=message,
                                 running=running, desired=desired)


class Manager:
    """The services' states the manager reports at each read, the last one from then on; and a clock that moves
    only when `settle` sleeps."""

    def __init__(self, *reads: list[settling.ServiceState]) -> None:
        self.reads = list(reads)
        self.now = 0.0
        self.slept: list[float] = []

    def read(self, _spec) -> list[settling.ServiceState]:
        return self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def settle_with(manager: Manager, timeout_s: float = 60) -> settling.Settled:
    return settling.settle(load_stage("cluster"), timeout_s, read=manager.read, clock=manager.clock,
                           sleep=manager.sleep)


def test_settle_waits_while_an_update_is_watched_and_ends_when_it_completed():
    gateway = state("completed", name="cluster-gateway", running=1, desired=1)
    manager = Manager([state("updating"), gateway], [state("updating"), gateway], [state("completed"), gateway])
    settled = settle_with(manager)
    assert settled.ok and not settled.timed_out
    assert manager.slept == [settling.POLL_S, settling.POLL_S]


def test_a_rollback_after_the_deploy_is_refused_and_a_rollback_under_way_is_waited_for():
    manager = Manager([state("updating")], [state("rollback_started", running=1)],
                      [state("rollback_completed", message="update rolled back due to failure")])
    settled = settle_with(manager)
    assert not settled.ok and not settled.timed_out
    assert [service.describe() for service in settled.services] == [
        f"{BLUE}: update rollback_completed (update rolled back due to failure), 2/2 tasks running"]
    for refused in ("paused", "rollback_paused"):
        assert not settle_with(Manager([state(refused)])).ok


def test_a_service_not_running_its_replicas_is_not_settled_even_without_an_update():
    # A service created by this deploy has no update status; unpinned serving is not waited for by the provider.
    manager = Manager([state("", running=1)], [state("", running=2)])
    assert settle_with(manager).ok and manager.slept == [settling.POLL_S]
    stuck = settle_with(Manager([state("", running=0)]), timeout_s=5)
    assert stuck.timed_out and not stuck.ok
    assert stuck.services[0].describe() == f"{BLUE}: created, 0/2 tasks running"


def test_the_default_wait_is_the_longest_rolling_update_the_provider_would_wait_for():
    spec = load_stage("cluster")
    check = spec.serving.health_check
    replicas = max(model.replicas for model in spec.served_models())
    healthy = check.start_period_s + (check.retries + 1) * (check.interval_s + check.timeout_s) + 30
    monitor = (check.retries + 1) * (check.interval_s + check.timeout_s)
    assert settling.longest_update_s(spec) == replicas * (healthy + monitor)


@pytest.mark.parametrize(("reads", "exit_code", "says"), [
    ([state("completed")], 0, "settled: every service of cluster finished its update and runs its tasks"),
    ([state("rollback_completed", message="task unhealthy")], 1,
     f"Swarm rolled back or paused {BLUE} after pulumi up returned: the cluster runs their previous spec and the "
     "Pulumi state does not know it; run `pulumi refresh --stack cluster`, fix the release and deploy again"),
    ([state("updating")], 1, f"{BLUE} did not settle within 1 s"),
    ([], 1, "no service of cluster runs on the swarm manager at tcp://10.0.0.10:2376: deploy it first "
            "(`pulumi up --stack cluster`)"),
])
def test_the_command_says_in_one_line_why_the_deploy_is_not_done(monkeypatch, reads, exit_code, says):
    result, said, _ = run_settle(monkeypatch, reads, removals=[])
    assert result.exit_code == exit_code, result.output
    assert says in said


def test_an_unreachable_manager_and_a_single_host_stage_each_get_one_line(monkeypatch):
    def unreachable(_spec):
        raise DockerError("`service ls` failed: Cannot connect to the Docker daemon")
    monkeypatch.setattr(settling, "service_states", unreachable)
    result = CliRunner().invoke(app, ["settle", "cluster", "--environments", str(ENVIRONMENTS_DIR)])
    assert result.exit_code == 1
    assert " ".join(result.output.split()) == ("error: cluster's swarm manager at tcp://10.0.0.10:2376 did not answer: "
                                               "`service ls` failed: Cannot connect to the Docker daemon")
    single = CliRunner().invoke(app, ["settle", "dev", "--environments", str(ENVIRONMENTS_DIR)])
    assert single.exit_code == 0 and "runs on a single host" in single.output


def service(spec_secrets: list[str], previous_secrets: list[str] | None = None) -> dict:
    def task_spec(ids: list[str]) -> dict:
        return {"TaskTemplate": {"ContainerSpec": {"Secrets": [{"SecretID": secret_id} for secret_id in ids]}}}
    inspected = {"Spec": task_spec(spec_secrets)}
    if previous_secrets is not None:
        inspected["PreviousSpec"] = task_spec(previous_secrets)
    return inspected


def test_a_secret_a_spec_or_a_previous_spec_mounts_stays_and_an_unmounted_one_goes():
    secrets = [settling.SwarmSecret(id=f"id-{name}", name=f"cluster-mlflow-{name}") for name in ("new", "old", "gone")]
    services = [service(["id-new"], previous_secrets=["id-old"]), service([]), {"Spec": {"TaskTemplate": {}}}]
    assert settling.unmounted(secrets, services) == [secrets[2]]
    # Rolled back: the spec mounts the old secret again and the previous spec the new one.
    assert settling.unmounted(secrets[:2], [service(["id-old"], previous_secrets=["id-new"])]) == []


class Docker:
    """The `docker` CLI at the manager: the stack's secrets, every service on the swarm, and what `rm` answers."""

    def __init__(self, refuse: frozenset[str] = frozenset()) -> None:
        self.refuse = refuse
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, environment, *args: str) -> str:
        self.calls.append(args)
        if args[:2] == ("secret", "ls"):
            return "s1 cluster-mlflow-aaa\ns2 cluster-mlflow-bbb\ns3 cluster-registry-ccc\n"
        if args[:2] == ("service", "ls"):
            return "svc-a\nsvc-b\n"
        if args[:2] == ("service", "inspect"):
            return json.dumps([service(["s1"], previous_secrets=["s2"]), service(["other-stacks-secret"])])
        if args[:2] == ("secret", "rm") and args[2] in self.refuse:
            raise DockerError(f"`secret rm` failed: secret {args[2]} is in use")
        return ""


def test_settle_lists_the_stacks_secrets_by_label_reads_every_service_and_removes_the_unmounted(monkeypatch):
    docker = Docker()
    monkeypatch.setattr(settling, "_docker", docker)
    removals = settling.remove_unmounted_secrets(load_stage("cluster"))
    assert [(removal.secret.name, removal.refused) for removal in removals] == [("cluster-registry-ccc", "")]
    assert ("secret", "ls", "--filter", "label=mlops.stack=cluster", "--format", "{{.ID}} {{.Name}}") in docker.calls
    assert ("service", "inspect", "svc-a", "svc-b") in docker.calls
    assert [call for call in docker.calls if call[:2] == ("secret", "rm")] == [("secret", "rm", "s3")]
    refused = Docker(refuse=frozenset({"s3"}))
    monkeypatch.setattr(settling, "_docker", refused)
    [kept] = settling.remove_unmounted_secrets(load_stage("cluster"))
    assert kept.refused == "`secret rm` failed: secret s3 is in use"


def run_settle(monkeypatch, reads, removals):
    """`mlops settle cluster --timeout 1` on a manager answering `reads`, removing `removals`: the result, its
    output on one line, and the stages whose secrets it was asked to remove."""
    monkeypatch.setattr(settling, "service_states", Manager(reads).read)
    monkeypatch.setattr(settling, "POLL_S", 0.1)
    asked: list[str] = []

    def remove(spec):
        asked.append(spec.stage)
        return removals
    monkeypatch.setattr(settling, "remove_unmounted_secrets", remove)
    result = CliRunner().invoke(app, ["settle", "cluster", "--timeout", "1", "--environments", str(ENVIRONMENTS_DIR)])
    return result, " ".join(result.output.split()), asked


def test_the_command_removes_unmounted_secrets_once_settled_and_never_while_an_update_runs(monkeypatch):
    gone = settling.Removal(settling.SwarmSecret("s3", "cluster-registry-ccc"), refused="")
    kept = settling.Removal(settling.SwarmSecret("s4", "cluster-mlflow-ddd"), refused="secret s4 is in use")
    result, said, asked = run_settle(monkeypatch, [state("completed")], [gone, kept])
    assert result.exit_code == 0 and asked == ["cluster"]
    assert "removed secret cluster-registry-ccc: no service mounts it or rolls back to it" in said
    assert "kept secret cluster-mlflow-ddd: secret s4 is in use" in said
    result, _, asked = run_settle(monkeypatch, [state("updating")], [gone])
    assert result.exit_code == 1 and asked == []
    # After a rollback the secrets of both specs are mounted; the unmounted rest still goes, and the deploy fails.
    result, said, asked = run_settle(monkeypatch, [state("rollback_completed")], [gone])
    assert result.exit_code == 1 and asked == ["cluster"] and "removed secret cluster-registry-ccc" in said


def test_after_pulumi_destroy_settle_removes_the_secrets_it_left(monkeypatch):
    gone = settling.Removal(settling.SwarmSecret("s3", "cluster-registry-ccc"), refused="")
    result, said, _ = run_settle(monkeypatch, [], [gone])
    assert result.exit_code == 0, said
    assert said.endswith("nothing of cluster runs on the swarm manager at tcp://10.0.0.10:2376; the secrets "
                         "`pulumi destroy` left are dealt with")
