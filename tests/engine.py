"""Test scaffolding: create on a real Docker engine what a stage's Pulumi program declares.

The resources come from the real program under the mock runtime (`mlops.plan.render`), with their
build contexts, environment, ports, mounts, commands and health checks, so the engine runs exactly
what `pulumi up` would ask the Docker provider for. This is not a deploy path: `pulumi up` is the only
one. Everything created is labelled `mlops.stack=<stack>` and removed by `teardown`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import docker
from docker.types import EndpointConfig

from mlops import plan
from mlops.spec import REPO_ROOT, StageSpec

NANOSECONDS = 1_000_000_000


def _seconds(duration: str) -> int:
    return int(float(duration.rstrip("s")) * NANOSECONDS)


@dataclass
class StageOnEngine:
    stack: str
    spec: StageSpec
    registry_password: str
    client: docker.DockerClient = field(default_factory=docker.from_env)
    images: dict[str, str] = field(default_factory=dict)
    """Mock-runtime image IDs -> the real image references built or pulled for them."""
    built_images: list[str] = field(default_factory=list)

    def resources(self) -> list[plan.PlannedResource]:
        return plan.render(self.stack, self.spec, config={"mlops:registryPassword": self.registry_password},
                           reveal_secrets=True)

    def deploy(self, timeout_s: float = 180) -> dict[str, docker.models.containers.Container]:
        """Networks and volumes, then images, then containers in dependency order; waits for health.

        Deploying again adds what the rendering declares anew and keeps what already exists by name,
        which is all the tests need to grow a stage (for example: serving once a model is pinned)."""
        resources = self.resources()
        of_type = lambda suffix: [r for r in resources if r.type.endswith(suffix)]  # noqa: E731
        existing_networks = {network.name for network in self.client.networks.list()}
        for network in of_type("network:Network"):
            if network.inputs["name"] not in existing_networks:
                self.client.networks.create(network.inputs["name"], driver=network.inputs.get("driver", "bridge"),
                                            labels=_labels(network))
        for volume in of_type("volume:Volume"):
            self.client.volumes.create(volume.inputs["name"], labels=_labels(volume))  # a no-op when it exists
        for remote in of_type("remoteImage:RemoteImage"):
            self.images[plan.fake_digest(remote.inputs["name"])] = remote.inputs["name"]

        running = {container.name for container in self.client.containers.list(all=True)}
        started: dict[str, docker.models.containers.Container] = {}
        pending = [c for c in of_type("container:Container") if c.inputs["name"] not in running]
        images = of_type("image:Image")
        # Images pushed to the stage's own registry wait until the first phase has it running.
        for phase in ([i for i in images if i.inputs.get("skipPush")], [i for i in images if not i.inputs.get("skipPush")]):
            for image in phase:
                self._build(image)
            runnable = [c for c in pending if c.inputs["image"] in self.images]
            for container in runnable:
                started[container.inputs["name"]] = self._run(container)
                pending.remove(container)
            self.wait_healthy(list(started.values()), timeout_s)
        if pending:
            raise RuntimeError(f"{self.stack}: no image for {[c.name for c in pending]}")
        return started

    def _build(self, image: plan.PlannedResource) -> None:
        build = image.inputs["build"]
        name = image.inputs["imageName"]
        self.client.images.build(path=str(REPO_ROOT / build["context"]), dockerfile="Dockerfile", tag=name,
                                 buildargs=build.get("args"), target=build.get("target"), rm=True)
        self.built_images.append(name)
        if not image.inputs.get("skipPush"):
            registry = image.inputs["registry"]
            self.client.login(username=registry["username"], password=registry["password"],
                              registry=registry["server"])
            for line in self.client.images.push(name, stream=True, decode=True):
                if "error" in line:
                    raise RuntimeError(f"push of {name} failed: {line['error']}")
        self.images[plan.fake_digest(name)] = name

    def _run(self, container: plan.PlannedResource) -> docker.models.containers.Container:
        spec = container.inputs
        check = spec["healthcheck"]
        network = spec["networksAdvanced"][0]
        ports = {f"{port['internal']}/tcp": (port["ip"], port.get("external")) for port in spec.get("ports", [])}
        volumes = {volume["volumeName"]: {"bind": volume["containerPath"], "mode": "rw"} for volume in spec.get("volumes", [])}
        return self.client.containers.run(
            self.images[spec["image"]], name=spec["name"], detach=True, user=spec["user"],
            read_only=spec["readOnly"], tmpfs=spec.get("tmpfs"), security_opt=spec["securityOpts"],
            cap_drop=spec["capabilities"]["drops"], mem_limit=f"{spec['memory']}m",
            nano_cpus=int(float(spec["cpus"]) * NANOSECONDS), labels=_labels(container),
            environment=spec.get("envs"), command=spec.get("command"), ports=ports, volumes=volumes,
            restart_policy={"Name": spec["restart"]},
            healthcheck={"test": check["tests"], "interval": _seconds(check["interval"]),
                         "timeout": _seconds(check["timeout"]), "retries": check["retries"],
                         "start_period": _seconds(check["startPeriod"])},
            network=network["name"],
            networking_config={network["name"]: EndpointConfig(self.client.api._version, aliases=network.get("aliases"))},
        )

    def wait_healthy(self, containers: list, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for container in containers:
            while True:
                container.reload()
                health = container.attrs["State"].get("Health", {}).get("Status")
                if health == "healthy":
                    break
                if time.monotonic() > deadline:
                    logs = container.logs(tail=30).decode(errors="replace")
                    raise TimeoutError(f"{container.name} is {health} after {timeout_s:.0f}s; last logs:\n{logs}")
                time.sleep(1)

    def host_port(self, container_name: str, internal: int) -> int:
        container = self.client.containers.get(container_name)
        return int(container.ports[f"{internal}/tcp"][0]["HostPort"])

    def teardown(self) -> None:
        selector = {"label": f"mlops.stack={self.stack}"}
        for container in self.client.containers.list(all=True, filters=selector):
            container.remove(force=True, v=True)
        for network in self.client.networks.list(filters=selector):
            network.remove()
        for volume in self.client.volumes.list(filters=selector):
            volume.remove(force=True)
        for image in self.built_images:
            try:
                self.client.images.remove(image, noprune=False)
            except docker.errors.APIError:
                pass  # still used by another tag of the same content; the next build reuses it


def _labels(resource: plan.PlannedResource) -> dict[str, str]:
    return {label["label"]: label["value"] for label in resource.inputs.get("labels", [])}
