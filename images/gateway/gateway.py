"""The gateway's entrypoint: renders nginx's config from the environment, runs nginx, and keeps each
replica's address current.

Why addresses, not hostnames, in the config: nginx resolves the hostnames of an `upstream` block once,
at start, and refuses to start if any does not resolve yet (Docker's embedded DNS only knows running
containers). A `resolver` with a variable `proxy_pass` re-resolves but loses upstream pools, keepalive
and retries across replicas, and `server ... resolve` needs nginx 1.27.3 (bookworm ships 1.22). So this
process resolves the replicas itself, renders what resolves, and reloads nginx (gracefully) only when a
replica first resolves or comes back at a new address. A replica that stops resolving keeps its last
addresses: nginx's own failure handling skips them, and the retried requests never meet a reload.

On a swarm an entry names all tasks of a service, `tasks.<service>:<port>`, which Swarm's DNS answers with
every running task's address (endpoint mode dnsrr): the entry stands for that whole set, so a task
rescheduled onto another node, or added by scaling, joins its pool within RESOLVE_INTERVAL_S, and a task
that is gone leaves it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Optional

from canary import Controller, Policy, PolicyError, RolloutDeclaration, controllers_from_env
from metrics import GatewayMetrics, serve

log = logging.getLogger("gateway")

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
RUNTIME_DIR = Path("/tmp/nginx")
RESOLVE_INTERVAL_S = 2.0
POOLS = ("blue", "green")
MODELS_VARIABLE = "GATEWAY_MODELS"
# A model's name (mlops_spec/models.py ModelName, a DNS label): it names nginx upstreams and route folders too.
MODEL_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")
MODEL_KEYS = {"name", "blue", "green", "weights", "rollout"}
# Keep idle connections to each replica open longer than a request burst, shorter than the replicas'
# own keep-alive (75 s), so the gateway is always the side that closes them.
UPSTREAM_KEEPALIVE = "    keepalive 64;\n    keepalive_timeout 60s;\n"
NO_REPLICA_YET = "127.0.0.1:9 down"
READY_PROBE_TIMEOUT_S = 1.0


class GatewayConfigError(Exception):
    pass


@dataclass(frozen=True)
class Pool:
    name: str
    weight: int
    replicas: tuple[str, ...]
    """`host:port` of each replica, or `tasks.<service>:port` for all tasks of a swarm service."""


@dataclass(frozen=True)
class ServedModel:
    name: str
    pools: tuple[Pool, ...]
    """blue, then green."""
    rollout: Optional[RolloutDeclaration] = None

    @property
    def green_weight(self) -> int:
        return self.pools[1].weight


def models_from_env(env: Mapping[str, str]) -> list[ServedModel]:
    """The models GATEWAY_MODELS lists (mlops_spec/contract.py renders it): a JSON list with, per model, its
    name, the `host:port` of its blue and green replicas, their weights and, optionally, green's rollout."""
    if not env.get(MODELS_VARIABLE):
        raise GatewayConfigError(f"{MODELS_VARIABLE} is not set: it lists, as JSON, the models the gateway routes")
    try:
        declared = json.loads(env[MODELS_VARIABLE])
    except ValueError as error:
        raise GatewayConfigError(f"{MODELS_VARIABLE} is not JSON: {error}") from None
    if not isinstance(declared, list) or not declared or not all(isinstance(model, dict) for model in declared):
        raise GatewayConfigError(f"{MODELS_VARIABLE} must be a non-empty JSON list of models, got {declared!r:.100}")
    models = [served_model(model) for model in declared]
    names = [model.name for model in models]
    if len(set(names)) != len(names):
        raise GatewayConfigError(f"{MODELS_VARIABLE} lists a model twice: {', '.join(names)}")
    return models


def served_model(declared: dict) -> ServedModel:
    name = declared.get("name")
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise GatewayConfigError(f"{MODELS_VARIABLE}: {name!r} is not a model name (a letter, then at most 63 "
                                 "letters, digits, '_', '.' or '-')")
    where = f"{MODELS_VARIABLE} model {name}"
    if not MODEL_KEYS - {"rollout"} <= set(declared) <= MODEL_KEYS:
        raise GatewayConfigError(f"{where} must have exactly the keys {', '.join(sorted(MODEL_KEYS))} (rollout "
                                 f"optional), got {', '.join(sorted(declared))}")
    weights = declared["weights"]
    if not isinstance(weights, dict) or set(weights) != set(POOLS):
        raise GatewayConfigError(f"{where}: weights must name blue and green, got {weights!r}")
    pools = []
    for pool in POOLS:
        replicas, weight = declared[pool], weights[pool]
        if not isinstance(replicas, list) or not all(isinstance(replica, str) for replica in replicas):
            raise GatewayConfigError(f"{where}: {pool} must list `host:port` strings, got {replicas!r}")
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 100:
            raise GatewayConfigError(f"{where}: the {pool} weight must be an integer 0..100, got {weight!r}")
        if weight > 0 and not replicas:
            raise GatewayConfigError(f"{where}: the {pool} weight is {weight} but {pool} lists no replica")
        for replica in replicas:
            host, _, port = replica.rpartition(":")
            if not host or not port.isdigit():
                raise GatewayConfigError(f"{where}: {pool} replica {replica!r} is not host:port")
        pools.append(Pool(pool, weight, tuple(replicas)))
    if sum(pool.weight for pool in pools) != 100:
        raise GatewayConfigError(f"{where}: the blue and green weights must add up to 100, got "
                                 f"{' + '.join(str(pool.weight) for pool in pools)}")
    rollout = declared.get("rollout")
    if rollout is None:
        return ServedModel(name, tuple(pools))
    if not isinstance(rollout, dict) or set(rollout) != {"policy", "green_release"} or not rollout["green_release"]:
        raise GatewayConfigError(f"{where}: rollout must have a policy and a green_release, got {rollout!r:.200}")
    if not pools[1].replicas:
        raise GatewayConfigError(f"{where}: a rollout needs green replicas, and green lists none")
    return ServedModel(name, tuple(pools), RolloutDeclaration(Policy.from_fields(rollout["policy"], where),
                                                              str(rollout["green_release"])))


def resolve(replica: str) -> tuple[str, ...] | None:
    """Every IPv4 `address:port` the replica's name has, sorted, or None when it has none."""
    host, _, port = replica.rpartition(":")
    try:
        found = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        return None
    return tuple(sorted({f"{entry[4][0]}:{port}" for entry in found}))


def split(variable: str, green_weight: int) -> str:
    """A `split_clients` that sets `variable` to green for `green_weight` percent of requests, else blue."""
    shares = [("blue", 100 - green_weight), ("green", green_weight)]
    weighted = [(pool, weight) for pool, weight in shares if weight > 0]
    lines = "".join(f"        {weight}% {pool};\n" for pool, weight in weighted[:-1]) + f"        * {weighted[-1][0]};\n"
    return f'    split_clients "${{request_id}}" ${variable} {{\n{lines}    }}\n'


def route_file(runtime_dir: Path, model: str, green_weight: int) -> Path:
    return runtime_dir / "route" / model / f"green-{green_weight}"


def ready_file(runtime_dir: Path) -> Path:
    return runtime_dir / "ready"


def upstream(model: str, pool: str) -> str:
    return f"{model}-{pool}"


def render(models: list[ServedModel], addresses: Mapping[str, tuple[str, ...]],
           route_weights: Mapping[str, tuple[int, ...]] = MappingProxyType({}), runtime_dir: Path = RUNTIME_DIR) -> str:
    """nginx.conf for `models`, each replica at its addresses in `addresses` (unresolved ones left out). A
    model's requests go to its pools by its weights, chosen per request in `$slot_<index>` (nginx variable
    names take no '-' or '.'). With `route_weights` of a model (its rollout), green's weight follows whichever
    of its route files exists, checked per request, so the rollout moves traffic without reloading nginx (a
    reload closes idle keep-alive connections, and a request a client sends on one at that moment is lost)."""
    upstreams, splits, routes, pools_of_models = "", "", "", ""
    for index, model in enumerate(models):
        for pool in model.pools:
            servers = [f"{address} max_fails=1 fail_timeout=5s"
                       for replica in pool.replicas for address in addresses.get(replica, ())] or [NO_REPLICA_YET]
            lines = "".join(f"    server {server};\n" for server in servers)
            upstreams += f"upstream {upstream(model.name, pool.name)} {{\n{lines}{UPSTREAM_KEEPALIVE}}}\n"
        slot = f"slot_{index}"
        weights = route_weights.get(model.name, ())
        if not weights:
            splits += split(slot, model.green_weight)
        else:
            splits += "".join(split(f"{slot}_green_{weight}", weight) for weight in weights)
            routes += f"        set ${slot} ${slot}_green_{model.green_weight};\n" + "".join(
                f"        if (-f {route_file(runtime_dir, model.name, weight)}) {{ set ${slot} ${slot}_green_{weight}; }}\n"
                for weight in weights)
        # Regex keys: a map's plain strings match regardless of case, and model names are case-sensitive.
        pools_of_models += f'        "~^{re.escape(model.name)}$" ${slot};\n'
    names = ", ".join(model.name for model in models)
    template = TEMPLATE.read_text()
    return (template.replace("@@UPSTREAMS@@\n", indent(upstreams)).replace("@@SPLITS@@", splits)
            .replace("@@ROUTE@@", routes).replace("@@POOLS_OF_MODELS@@\n", pools_of_models)
            .replace("@@MODEL_NAMES@@", names).replace("@@READY_FILE@@", str(ready_file(runtime_dir))))


def indent(block: str) -> str:
    return "".join(f"    {line}" if line.strip() else line for line in block.splitlines(keepends=True))


def replica_ready(address: str, model: str) -> bool:
    """Whether the replica at `address` answers that `model` is ready to predict."""
    try:
        with urllib.request.urlopen(f"http://{address}/v2/models/{model}/ready", timeout=READY_PROBE_TIMEOUT_S) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


class Gateway:
    def __init__(self, models: list[ServedModel], runtime_dir: Path = RUNTIME_DIR,
                 rollouts: Mapping[str, Controller] = MappingProxyType({})) -> None:
        self.models = models
        self.config = runtime_dir / "nginx.conf"
        self.runtime_dir = runtime_dir
        self.addresses: dict[str, tuple[str, ...]] = {}
        self.reported_unresolved: set[str] = set()
        self.rollouts = rollouts
        self.route_weights = {model.name: tuple(sorted({0, model.green_weight, *rollouts[model.name].policy.steps}))
                              for model in models if model.name in rollouts}
        self.routed_green_weights: dict[str, int] = {}
        self.unready: Optional[set[str]] = None
        """The models without a ready replica in a pool that gets traffic, as last probed."""

    def refresh_addresses(self) -> bool:
        """Resolve every replica; True when one resolved for the first time or at other addresses."""
        changed = False
        for model in self.models:
            for pool in model.pools:
                for replica in pool.replicas:
                    address = resolve(replica)
                    if address is None:
                        if replica not in self.addresses and replica not in self.reported_unresolved:
                            log.warning("replica %s does not resolve yet; %s's %s pool goes without it", replica,
                                        model.name, pool.name)
                            self.reported_unresolved.add(replica)
                    elif self.addresses.get(replica) != address:
                        log.info("replica %s is at %s", replica, address)
                        self.addresses[replica] = address
                        changed = True
        return changed

    def write_config(self) -> None:
        for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", *(f"route/{name}" for name in self.route_weights)):
            (self.runtime_dir / temp).mkdir(parents=True, exist_ok=True)
        self.config.write_text(render(self.models, self.addresses, self.route_weights, self.runtime_dir))

    def route_green(self, model: str, weight: int) -> None:
        """Send `weight` percent of `model`'s requests to its green pool from the next request on: the new route
        file is in place before the old one goes, and while both exist nginx follows the one its config tests
        last, so no request goes unrouted."""
        if weight == self.routed_green_weights.get(model):
            return
        route_file(self.runtime_dir, model, weight).touch()
        for other in self.route_weights[model]:
            if other != weight:
                route_file(self.runtime_dir, model, other).unlink(missing_ok=True)
        log.info("routing %s%% of %s to green", weight, model)
        self.routed_green_weights[model] = weight

    def follow_rollouts(self) -> None:
        for model, rollout in self.rollouts.items():
            self.route_green(model, rollout.tick())

    def probe_readiness(self, probe: Callable[[str, str], bool] = replica_ready) -> None:
        """The stage is ready (`/v2/health/ready`) while every model has a ready replica in each pool that gets
        some of its traffic: nginx answers by whether the ready file exists."""
        unready = set()
        for model in self.models:
            green_weight = self.routed_green_weights.get(model.name, model.green_weight)
            for pool in model.pools:
                weight = green_weight if pool.name == "green" else 100 - green_weight
                if weight and not any(probe(address, model.name) for replica in pool.replicas
                                      for address in self.addresses.get(replica, ())):
                    unready.add(model.name)
        if unready == self.unready:
            return
        if unready:
            ready_file(self.runtime_dir).unlink(missing_ok=True)
            log.warning("not ready: no ready replica of %s in a pool that gets traffic", ", ".join(sorted(unready)))
        else:
            ready_file(self.runtime_dir).touch()
            log.info("ready: every model has a ready replica in each pool that gets traffic")
        self.unready = unready

    def run(self) -> int:
        self.refresh_addresses()
        self.write_config()
        for model, rollout in self.rollouts.items():
            self.route_green(model, rollout.green_weight)
        self.probe_readiness()
        nginx = subprocess.Popen(["nginx", "-e", "stderr", "-c", str(self.config)])
        for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            # SIGQUIT is nginx's graceful shutdown: in-flight requests finish.
            signal.signal(stop, lambda *_: nginx.send_signal(signal.SIGQUIT))
        while True:
            try:
                return nginx.wait(timeout=RESOLVE_INTERVAL_S)
            except subprocess.TimeoutExpired:
                pass
            if self.refresh_addresses():
                self.write_config()
                nginx.send_signal(signal.SIGHUP)
            self.follow_rollouts()
            self.probe_readiness()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        models = models_from_env(os.environ)
        rollouts = controllers_from_env(os.environ, {model.name: (model.rollout, model.green_weight)
                                                     for model in models if model.rollout is not None})
    except (GatewayConfigError, PolicyError) as error:
        log.error("%s", error)
        sys.exit(2)
    for model in models:
        log.info("routing %s: %s", model.name, ", ".join(f"{pool.weight}% to {pool.name} ({len(pool.replicas)} replicas)"
                                                          for pool in model.pools))
    serve(GatewayMetrics())
    sys.exit(Gateway(models, rollouts=rollouts).run())


if __name__ == "__main__":
    main()
