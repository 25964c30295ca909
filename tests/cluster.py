"""A Docker Swarm cluster for the tests, every node an inner engine (tests/hosts.py).

The nodes sit on one user-defined bridge network of the outer engine at fixed addresses and advertise
those addresses, so the swarm's control traffic (2377), gossip (7946) and the overlay's VXLAN (4789)
run over that bridge. The outer engine is deliberately not a node: with it as manager and an inner
engine as worker, overlay traffic between tasks did not pass.

What this machine lacks shapes what services may declare: there is no IPVS, so no service VIPs and no
ingress routing mesh. Services use endpoint mode `dnsrr` and publish ports in `host` mode on the node
that runs the task, which allows one such task per node: with a node down, a task that publishes a port
the other nodes already use stays pending ("no suitable node (host-mode port already in use)").

Each node's engine answers over TLS only, as environments/cluster.yaml's manager must (`tls` in tests/hosts.py):
the tests, the program's provider and `mlops` reach it with the session's client certificate. The stage's image
registry runs as a service on the cluster itself, so each node's engine trusts registries on the bridge network
over plain HTTP (`trust_registries_on_network` in tests/hosts.py).

Everything is labelled with the session like the hosts are, and `remove_cluster(session)` removes it.

Run as a program, it does the same for a workflow (.github/workflows/idempotence.yml): `python -m tests.cluster up
--session NAME` starts the nodes environments/cluster.yaml places by, points the stage file at the manager and its
registry, and prints both as `url=…` and `registry_address=…` lines ($GITHUB_OUTPUT's format), with `cert_path=…`, the
folder of the client certificate the manager trusts (DOCKER_CERT_PATH's layout: ca.pem, cert.pem, key.pem); `python -m
tests.cluster down --session NAME` removes everything of the session, that folder included.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import docker

from mlops.promote import edited_text, write_atomically
from mlops_spec.errors import SpecError
from mlops_spec.loading import load_stage, stage_file
from mlops_spec.project import ENVIRONMENTS_DIR
from tests import hosts

SWARM_PORT = 2377
STAGE_NODE_LABELS = {
    "node-1": {"mlops.stateful": "true", "mlops.edge": "true"},
    "node-2": {"mlops.train": "true"},
    "node-3": {"mlops.train": "true"}}
"""The nodes environments/cluster.yaml places by: node-1, the manager, is the stateful and edge node (MLflow, the
registry, a gateway); node-2 and node-3 are workers that run serving replicas and training."""
SESSION_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")


@dataclass
class Cluster:
    manager: hosts.DockerHost
    workers: list[hosts.DockerHost]

    @property
    def nodes(self) -> list[hosts.DockerHost]:
        return [self.manager, *self.workers]

    @property
    def url(self) -> str:
        """The manager's engine: what a swarm stage's provider `host` points at."""
        return self.manager.url

    @property
    def client(self) -> docker.DockerClient:
        return self.manager.client

    def node(self, name: str) -> hosts.DockerHost:
        [node] = [node for node in self.nodes if node.name == name]
        return node

    def running_tasks(self, service: str) -> list[dict]:
        """The service's tasks that run now, on nodes the manager sees up."""
        up = {node.id for node in self.client.nodes.list() if node.attrs["Status"]["State"] == "ready"}
        return [task for task in self.client.api.tasks(filters={"service": service, "desired-state": "running"})
                if task["Status"]["State"] == "running" and task.get("NodeID") in up]

    def nodes_running(self, service: str) -> list[str]:
        """Hostnames of the nodes running the service's tasks, one entry per task."""
        names = {node.id: node.attrs["Description"]["Hostname"] for node in self.client.nodes.list()}
        return sorted(names[task["NodeID"]] for task in self.running_tasks(service))

    def wait_running(self, service: str, replicas: int, timeout_s: float, avoiding: str | None = None) -> list[str]:
        """Waits until exactly `replicas` tasks of the service run, none on the node `avoiding`; returns their nodes.

        A node that lost power still counts as ready until the manager misses its heartbeats (seconds), so
        waiting for a count alone would see the tasks it ran as running."""
        deadline = time.monotonic() + timeout_s
        while True:
            running = self.nodes_running(service)
            if len(running) == replicas and avoiding not in running:
                return running
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service}: {len(running)} of {replicas} tasks running after {timeout_s:.0f}s "
                                   f"(on {running}); tasks: {task_states(self.client, service)}")
            time.sleep(0.5)

    def wait_runs_tasks(self, node: str, image: str, network: str, timeout_s: float = 120) -> None:
        """Waits until `node` runs a task again: a one-shot job placed on it and attached to `network` completes.
        A node back from a power cut reports `ready` before it can start tasks, and a service created meanwhile
        gets every task on the other nodes (a spread preference is no constraint)."""
        job = self.client.services.create(
            image, command=["python3", "-c", "pass"], name=f"probe-{node}-{int(time.time())}",
            constraints=[f"node.hostname == {node}"], networks=[network],
            mode=docker.types.ServiceMode("replicated-job"),
            restart_policy=docker.types.RestartPolicy(condition="on-failure", delay=1_000_000_000))
        try:
            deadline = time.monotonic() + timeout_s
            while "complete" not in (states := [task["Status"]["State"] for task in job.tasks()]):
                if time.monotonic() > deadline:
                    raise hosts.HostError(f"{node} completed no task within {timeout_s:.0f}s: {states}")
                time.sleep(1)
        finally:
            job.remove()

    def wait_nodes_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            states = {node.attrs["Description"]["Hostname"]: node.attrs["Status"]["State"]
                      for node in self.client.nodes.list()}
            if len(states) == len(self.nodes) and set(states.values()) == {"ready"}:
                return
            if time.monotonic() > deadline:
                raise hosts.HostError(f"swarm nodes not all ready after {timeout_s:.0f}s: {states}")
            time.sleep(0.5)


def task_states(manager: docker.DockerClient, service: str) -> list[str]:
    """`slot@node:state(error or message)` of the service's last 12 tasks, for a failure message."""
    names = {node.id: node.attrs["Description"]["Hostname"] for node in manager.nodes.list()}
    return [f"{task.get('Slot', '')}@{names.get(task.get('NodeID'), '?')}:{task['Status']['State']}"
            f"({task['Status'].get('Err') or task['Status'].get('Message', '')})"
            for task in manager.api.tasks(filters={"service": service})][-12:]


def start_cluster(session: str, labels: dict[str, dict[str, str]]) -> Cluster:
    """Starts one inner engine per node named in `labels` and forms a swarm: the first is the manager, the
    rest workers; each node gets its labels (what the stage's placement constraints ask for)."""
    names = list(labels)
    nodes = hosts.start_hosts(names, network=f"mlops-swarm-{session}", session=session,
                              trust_registries_on_network=True, tls=True)
    manager, *workers = (nodes[name] for name in names)
    manager.client.swarm.init(advertise_addr=manager.ip, listen_addr=f"{manager.ip}:{SWARM_PORT}")
    token = manager.client.swarm.attrs["JoinTokens"]["Worker"]
    for worker in workers:
        worker.client.swarm.join(remote_addrs=[f"{manager.ip}:{SWARM_PORT}"], join_token=token,
                                 advertise_addr=worker.ip, listen_addr=f"{worker.ip}:{SWARM_PORT}")
    cluster = Cluster(manager, workers)
    cluster.wait_nodes_ready()
    for node in manager.client.nodes.list():
        spec = node.attrs["Spec"]
        node.update({**spec, "Labels": {**spec.get("Labels", {}), **labels[node.attrs["Description"]["Hostname"]]}})
    return cluster


def remove_cluster(session: str) -> None:
    hosts.remove_hosts(session)


def point_stage(file: Path, url: str, registry_address: str) -> None:
    """Points the swarm stage `file` at a cluster: `docker.url` at its manager and `swarm.registry_address` at
    the registry it runs, every other line of the file as it was."""
    write_atomically(file, edited_text(file.read_text(), {"docker": {"url": url},
                                                          "swarm": {"registry_address": registry_address}}))


def _session_name(text: str) -> str:
    if not SESSION_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: use 1-40 lowercase letters, digits and '-', starting with a "
                                         "letter or digit (it names the nodes' containers and network)")
    return text


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster",
                                     description="A swarm of inner engines for a swarm stage, outside the tests.")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the nodes and point the stage file at the manager and its registry")
    down = commands.add_parser("down", help="remove the session's nodes, volumes and network")
    for command in (up, down):
        command.add_argument("--session", required=True, type=_session_name, help="labels everything it starts")
    up.add_argument("--stage", default="cluster", help="the swarm stage to point at the cluster (default: cluster)")
    up.add_argument("--environments", type=Path, default=ENVIRONMENTS_DIR, help="the stage files' folder")
    return parser.parse_args(argv)


def _up(session: str, stage: str, environments: Path) -> int:
    try:
        spec = load_stage(stage, environments)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    port = spec.image_registry.port.host_port
    if spec.swarm is None or port is None:
        print(f"error: {stage_file(stage, environments)}: stage {stage} declares no swarm with a fixed "
              "image_registry.port.host_port: nothing to point at a cluster", file=sys.stderr)
        return 1
    try:
        cluster = start_cluster(session, STAGE_NODE_LABELS)
    except (hosts.HostError, docker.errors.DockerException) as error:
        remove_cluster(session)
        print(f"error: the cluster of session {session} did not start, nothing of it is left: {error}",
              file=sys.stderr)
        return 1
    registry_address = f"{cluster.manager.ip}:{port}"
    point_stage(stage_file(stage, environments), cluster.url, registry_address)
    assert cluster.manager.tls is not None
    print(f"url={cluster.url}")
    print(f"registry_address={registry_address}")
    print(f"cert_path={cluster.manager.tls.folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    arguments = _arguments(argv)
    if arguments.command == "down":
        remove_cluster(arguments.session)
        return 0
    return _up(arguments.session, arguments.stage, arguments.environments)


if __name__ == "__main__":
    sys.exit(main())
