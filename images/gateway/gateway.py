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
from typing import Mapping

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


def render(pools: list[Pool], addresses: Mapping[str, tuple[str, ...]]) -> str:
    """nginx.conf for `pools`, each replica at its addresses in `addresses` (unresolved ones left out)."""
    upstreams = ""
    for pool in pools:
        servers = [f"{address} max_fails=1 fail_timeout=5s"
                   for replica in pool.replicas for address in addresses.get(replica, ())] or [NO_REPLICA_YET]
        lines = "".join(f"    server {server};\n" for server in servers)
        upstreams += f"upstream {pool.name} {{\n{lines}{UPSTREAM_KEEPALIVE}}}\n"
    weighted = [pool for pool in pools if pool.weight > 0]
    split = "".join(f"        {pool.weight}% {pool.name};\n" for pool in weighted[:-1]) + f"        * {weighted[-1].name};\n"
    template = TEMPLATE.read_text()
    return template.replace("@@UPSTREAMS@@\n", indent(upstreams)).replace("@@SPLIT@@\n", split)


def indent(block: str) -> str:
    return "".join(f"    {line}" if line.strip() else line for line in block.splitlines(keepends=True))


class Gateway:
    def __init__(self, pools: list[Pool], runtime_dir: Path = RUNTIME_DIR) -> None:
        self.pools = pools
        self.config = runtime_dir / "nginx.conf"
        self.runtime_dir = runtime_dir
        self.addresses: dict[str, tuple[str, ...]] = {}
        self.reported_unresolved: set[str] = set()

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
        for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.runtime_dir / temp).mkdir(parents=True, exist_ok=True)
        self.config.write_text(render(self.pools, self.addresses))

    def run(self) -> int:
        self.refresh_addresses()
        self.write_config()
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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        pools = pools_from_env(os.environ)
    except GatewayConfigError as error:
        log.error("%s", error)
        sys.exit(2)
    log.info("routing %s", ", ".join(f"{pool.weight}% to {pool.name} ({len(pool.replicas)} replicas)" for pool in pools))
    sys.exit(Gateway(pools).run())


if __name__ == "__main__":
    main()
