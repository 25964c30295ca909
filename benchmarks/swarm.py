"""Figure 6: requests/s through the swarm stage's gateway with serving replicas on 1, 2 and 3 nodes.

The cluster stage (environments/cluster.yaml) runs on a three-node swarm of inner engines
(tests/cluster.py), deployed by the test fixture from the real rendering; one replica per node, so the
node count is the replica count. Only the replica count changes between the variants, which Swarm
applies by scaling, without a rolling update.
"""
from __future__ import annotations

import time
import uuid

from benchmarks import loadgen
from benchmarks.model import MODEL_NAME, MlflowRegistry, model_bytes, sample_rows
from benchmarks.report import Figure, median, ratio, rounds_text, spread
from benchmarks.serving import v2_body
from benchmarks.stage import serving_only, wait_ready
from mlops.modelstore import BasicAuth
from mlops_spec.contract import TRAINER, derived_password, serving_name
from mlops_spec.loading import load_stage
from tests import cluster
from tests.engine import StageOnEngine

STAGE = "cluster"
NODES = (1, 2, 3)
CONNECTIONS = 8
MLFLOW_CPUS = 0.5
MLFLOW_PORT, REGISTRY_PORT, GATEWAY_PORT = 5300, 5301, 8380
SERVING = serving_name(STAGE, MODEL_NAME, "blue")
LABELS = {"node-1": {"mlops.stateful": "true", "mlops.edge": "true"}, "node-2": {}, "node-3": {}}


def stage_on(swarm: cluster.Cluster, replicas: int) -> StageOnEngine:
    """The cluster stage serving iris alone, with `replicas` replicas allowed on every node (the shipped file
    keeps them off the manager), one per node by the stage's spread over hostnames. MLflow gets half a CPU: with
    its shipped one CPU, the registry's and the gateway's half, the manager's two CPUs are all reserved and no
    replica fits there."""
    spec = load_stage(STAGE, overrides={
        "docker": {"url": swarm.url},
        "swarm": {"registry_address": f"{swarm.manager.ip}:{REGISTRY_PORT}", "constraints": []},
        "model_registry": {"limits": {"cpus": MLFLOW_CPUS}},
        "serving": {"replicas": replicas}})
    return StageOnEngine(stack=STAGE, spec=serving_only(spec, (MODEL_NAME,)), registry_password=uuid.uuid4().hex)


def scale_to(stage: StageOnEngine, swarm: cluster.Cluster, replicas: int) -> None:
    stage.spec = stage_on(swarm, replicas).spec
    stage.deploy()
    nodes = swarm.wait_running(SERVING, replicas, timeout_s=300)
    if len(set(nodes)) != replicas:
        raise RuntimeError(f"{replicas} replicas should run on as many nodes, not on {nodes}")


def measure(rounds: int = 3, duration_s: int = 10, warmup_s: int = 2) -> Figure:
    session = f"bench-{uuid.uuid4().hex[:8]}"
    samples: dict[int, list[loadgen.LoadResult]] = {nodes: [] for nodes in NODES}
    try:
        swarm = cluster.start_cluster(session, labels=LABELS)
        stage = stage_on(swarm, replicas=1)
        stage.deploy()
        mlflow = f"http://{swarm.manager.ip}:{MLFLOW_PORT}"
        wait_ready(f"{mlflow}/health", 300)
        trainer = BasicAuth(TRAINER, derived_password(stage.mlflow_password, TRAINER))
        MlflowRegistry(mlflow, trainer).register(MODEL_NAME, model_bytes())
        url = f"http://{swarm.manager.ip}:{GATEWAY_PORT}/v2/models/{MODEL_NAME}/infer"
        body = v2_body(sample_rows(1))
        # Interleaved: 1, 2, 3 nodes in every round, so drift on the shared machine hits all alike.
        for _ in range(rounds):
            for nodes in NODES:
                scale_to(stage, swarm, nodes)
                time.sleep(3)  # the gateway re-resolves tasks.<service> every 2 s
                loadgen.post_load(url, body, CONNECTIONS, warmup_s)
                samples[nodes].append(loadgen.post_load(url, body, CONNECTIONS, duration_s))
    finally:
        cluster.remove_cluster(session)
    return table(samples, rounds, duration_s)


def table(samples: dict[int, list[loadgen.LoadResult]], rounds: int, duration_s: int) -> Figure:
    one_node = median(result.requests_per_s for result in samples[1])
    figure = Figure(
        title="Swarm: requests/s through the gateway with replicas on 1, 2 and 3 nodes",
        goal="none: this shows what spreading a stage over nodes costs or gains on this machine.",
        headers=["nodes with a replica", "requests/s: median (min–max)", "p50 ms", "p99 ms", "vs 1 node"])
    for nodes in NODES:
        results = samples[nodes]
        figure.rows.append([str(nodes), spread([r.requests_per_s for r in results]),
                            f"{median(r.p50_ms for r in results):.2f}", f"{median(r.p99_ms for r in results):.2f}",
                            ratio(median(r.requests_per_s for r in results), one_node)])
    figure.notes = [
        "On one 2-core machine this measures overhead, not scaling: the three nodes are inner Docker engines "
        "in containers of the same engine, sharing the same two cores (and the load generator's), so more "
        "nodes add overlay hops, DNS round-robin and scheduling, never CPUs.",
        "Cluster: three inner engines (tests/cluster.py) on one bridge network, node-1 the manager with the "
        f"gateway, MLflow and the registry; the cluster stage serving {MODEL_NAME} alone, deployed from its "
        "rendering by tests/engine.py, "
        "serving replicas allowed on every node and spread over hostnames, one per node (1 CPU limit, 0.25 "
        f"reserved each), MLflow limited to {MLFLOW_CPUS} CPU instead of 1 so that a replica fits beside it on "
        "the manager; the nodes pulled the serving and gateway images from the stage's registry.",
        f"Load: wrk, one thread pinned to CPU 0, {CONNECTIONS} keep-alive connections to the gateway's host-mode "
        f"port on node-1, one row per V2 request, {duration_s} s per cell after a warm-up, {rounds_text(rounds)} "
        "interleaved (1, 2, 3 nodes each round); the replica count changes by scaling the service.",
    ]
    return figure
