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

import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from canary import Controller, PolicyError, controller_from_env
from metrics import GatewayMetrics, serve

log = logging.getLogger("gateway")

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
RUNTIME_DIR = Path("/tmp/nginx")
RESOLVE_INTERVAL_S = 2.0
POOLS = ("blue", "green")
# Keep idle connections to each replica open longer than a request burst, shorter than the replicas'
# own keep-alive (75 s), so the gateway is always the side that closes them.
UPSTREAM_KEEPALIVE = "    keepalive 64;\n    keepalive_timeout 60s;\n"
NO_REPLICA_YET = "127.0.0.1:9 down"


class GatewayConfigError(Exception):
    pass


@dataclass(frozen=True)
class Pool:
    name: str
    weight: int
    replicas: tuple[str, ...]
    """`host:port` of each replica, or `tasks.<service>:port` for all tasks of a swarm service."""


def pools_from_env(env: Mapping[str, str]) -> list[Pool]:
    pools = []
    for name in POOLS:
        replicas = tuple(entry.strip() for entry in env.get(f"UPSTREAM_{name.upper()}", "").split(",") if entry.strip())
        raw_weight = env.get(f"WEIGHT_{name.upper()}", "100" if name == "blue" else "0")
        if not raw_weight.isdigit():
            raise GatewayConfigError(f"WEIGHT_{name.upper()} must be an integer 0..100, got {raw_weight!r}")
        if int(raw_weight) > 0 and not replicas:
            raise GatewayConfigError(f"WEIGHT_{name.upper()} is {raw_weight} but UPSTREAM_{name.upper()} lists no replica")
        for replica in replicas:
            host, _, port = replica.rpartition(":")
            if not host or not port.isdigit():
                raise GatewayConfigError(f"UPSTREAM_{name.upper()} entry {replica!r} is not host:port")
        pools.append(Pool(name, int(raw_weight), replicas))
    if sum(pool.weight for pool in pools) != 100:
        raise GatewayConfigError(f"WEIGHT_BLUE + WEIGHT_GREEN must add up to 100, got "
                                 f"{' + '.join(str(pool.weight) for pool in pools)}")
    return pools


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


def route_file(runtime_dir: Path, green_weight: int) -> Path:
    return runtime_dir / "route" / f"green-{green_weight}"


def render(pools: list[Pool], addresses: Mapping[str, tuple[str, ...]], route_weights: tuple[int, ...] = (),
           runtime_dir: Path = RUNTIME_DIR) -> str:
    """nginx.conf for `pools`, each replica at its addresses in `addresses` (unresolved ones left out). With
    `route_weights` (a rollout), green's weight follows whichever route file exists, checked per request, so
    the rollout moves traffic without reloading nginx (a reload closes idle keep-alive connections, and a
    request a client sends on one at that moment is lost)."""
    upstreams = ""
    for pool in pools:
        servers = [f"{address} max_fails=1 fail_timeout=5s"
                   for replica in pool.replicas for address in addresses.get(replica, ())] or [NO_REPLICA_YET]
        lines = "".join(f"    server {server};\n" for server in servers)
        upstreams += f"upstream {pool.name} {{\n{lines}{UPSTREAM_KEEPALIVE}}}\n"
    declared = next(pool.weight for pool in pools if pool.name == "green")
    if not route_weights:
        splits, route = split("pool", declared), ""
    else:
        splits = "".join(split(f"pool_green_{weight}", weight) for weight in route_weights)
        route = f"        set $pool $pool_green_{declared};\n" + "".join(
            f"        if (-f {route_file(runtime_dir, weight)}) {{ set $pool $pool_green_{weight}; }}\n" for weight in route_weights)
    template = TEMPLATE.read_text()
    return (template.replace("@@UPSTREAMS@@\n", indent(upstreams)).replace("@@SPLITS@@", splits)
            .replace("@@ROUTE@@", route))


def indent(block: str) -> str:
    return "".join(f"    {line}" if line.strip() else line for line in block.splitlines(keepends=True))


class Gateway:
    def __init__(self, pools: list[Pool], runtime_dir: Path = RUNTIME_DIR, rollout: Optional[Controller] = None) -> None:
        self.pools = pools
        self.config = runtime_dir / "nginx.conf"
        self.runtime_dir = runtime_dir
        self.addresses: dict[str, tuple[str, ...]] = {}
        self.reported_unresolved: set[str] = set()
        self.rollout = rollout
        self.route_weights: tuple[int, ...] = ()
        self.routed_green_weight: Optional[int] = None
        if rollout is not None:
            declared = next(pool.weight for pool in pools if pool.name == "green")
            self.route_weights = tuple(sorted({0, declared, *rollout.policy.steps}))

    def refresh_addresses(self) -> bool:
        """Resolve every replica; True when one resolved for the first time or at other addresses."""
        changed = False
        for pool in self.pools:
            for replica in pool.replicas:
                address = resolve(replica)
                if address is None:
                    if replica not in self.addresses and replica not in self.reported_unresolved:
                        log.warning("replica %s does not resolve yet; the %s pool goes without it", replica, pool.name)
                        self.reported_unresolved.add(replica)
                elif self.addresses.get(replica) != address:
                    log.info("replica %s is at %s", replica, address)
                    self.addresses[replica] = address
                    changed = True
        return changed

    def write_config(self) -> None:
        for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "route"):
            (self.runtime_dir / temp).mkdir(parents=True, exist_ok=True)
        self.config.write_text(render(self.pools, self.addresses, self.route_weights, self.runtime_dir))

    def route_green(self, weight: int) -> None:
        """Send `weight` percent of requests to green from the next request on: the new route file is in place
        before the old one goes, and while both exist nginx follows the one its config tests last, so no
        request goes unrouted."""
        if weight == self.routed_green_weight:
            return
        route_file(self.runtime_dir, weight).touch()
        for other in self.route_weights:
            if other != weight:
                route_file(self.runtime_dir, other).unlink(missing_ok=True)
        log.info("routing %s%% to green", weight)
        self.routed_green_weight = weight

    def follow_rollout(self) -> None:
        if self.rollout is not None:
            self.route_green(self.rollout.tick())

    def run(self) -> int:
        self.refresh_addresses()
        self.write_config()
        if self.rollout is not None:
            self.route_green(self.rollout.green_weight)
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
            self.follow_rollout()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        pools = pools_from_env(os.environ)
        rollout = controller_from_env(os.environ, declared_green_weight=pools[1].weight)
    except (GatewayConfigError, PolicyError) as error:
        log.error("%s", error)
        sys.exit(2)
    log.info("routing %s", ", ".join(f"{pool.weight}% to {pool.name} ({len(pool.replicas)} replicas)" for pool in pools))
    serve(GatewayMetrics())
    sys.exit(Gateway(pools, rollout=rollout).run())


if __name__ == "__main__":
    main()
