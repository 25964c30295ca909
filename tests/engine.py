"""Test fixture: a stand-in for the Docker provider's create, diff and delete on one engine per stage.

`StageOnEngine.deploy` takes what the real program declares under the mock runtime (`mlops.plan.render`,
secrets revealed) and makes it exist on the engine the stage's `pulumi:providers:docker` names (its
`host`: the local socket, or `tcp://…` for the test's inner engines), the way pulumi-docker v5 and its
bridged terraform-provider-docker would:

- images are built with BuildKit through the engine's API (`/build?version=2`, as provider/image.go
  does), with `build.platform`, args, target and the Dockerfile, from the context `.dockerignore`
  selects; pushed with the Image's `registry` credentials unless `skipPush`. Their `repoDigest` is the
  pushed `<repository>@sha256:…`, or the image ID for an image that is not pushed (provider/image.go);
- remote images are pulled by their digest reference with the provider's `registryAuth` for that
  registry and the platform; a pull the engine refuses (unknown digest, bad credentials, a blob that
  fails verification) fails the deploy with the engine's message. Like the provider, an image the
  engine already has under that reference is not pulled: the registry is not asked at all;
- containers run the real `repoDigest` or image ID their image resource produced, never a tag, and
  with `wait` the deploy waits up to `waitTimeout` for them to turn healthy; one with `start: false` is
  only created, and takes its `uploads` as the provider's create extracts them (at `/`, mode as declared);
- each resource is created as soon as the resources it depends on (`PlannedResource.dependencies`, the
  SDK's own graph) are done, in parallel like `pulumi up`;
- `state` (resource name -> the inputs it was created with and the engine object's ID) plays the part
  of the stack's state: deploying again keeps every resource whose inputs are unchanged, builds again
  an image whose inputs changed (its name carries the content tag, which stands in for the provider's
  context hash), replaces a changed container (delete, then create: its name is fixed) and deletes
  containers the rendering no longer declares;
- on a swarm stage (the provider's `host` is a manager), as terraform-provider-docker v4.5.0's
  resource_docker_service*, _secret and _config do: a Service is created with its whole ServiceSpec (task
  template, mode, update and rollback config, dnsrr or VIP endpoints and ports, placement, secrets and
  mounts) and the provider's `registryAuth` for its image's registry as X-Registry-Auth, so the nodes pull
  with it, after the Docker client's QueryRegistry resolved the image's platforms; a changed Service is UPDATED in place (ServiceUpdate at the engine's version index), so Swarm
  rolls its tasks by its update_config, unless a field mlops/replacements.py lists as replace-forcing
  changed: then it is replaced, deleted first as the program's `deleteBeforeReplace` asks. With `convergeConfig` the deploy
  waits as the provider's refresh functions do (slots running on nodes that are not down; on an update the
  UpdateStatus first, a rollback or pause failing it); a service that does not converge on create is
  deleted. Secrets and configs are immutable: any change creates the new one, moves the services over,
  and deletes the old one at the end (create-before-delete, unless `deleteBeforeReplace`), unless it is
  `retainOnDelete`: then, as Pulumi does, the state forgets it and the engine keeps it. Mock IDs in a
  service's inputs (secrets, networks, image digests) are replaced by the real ones. Overlay networks are
  created like bridges (with `attachable`).

It is not a deploy path (`pulumi up` is the only one) and does not model: in-place updates of containers
(a change of memory, restart policy or labels replaces the container), a service's own `auth` block, global
services with `convergeConfig` (the provider fails those too), the provider's Read after a create or update
(inputs are kept as rendered; tests/readback.py reads the live objects back as Read would and compares them with
the inputs), changes to volumes and networks (created when missing, never replaced or deleted, so no redeploy loses data), dependents replaced along with a
delete-before-replace, refresh (drift on the engine goes unnoticed), a state file (the state lives and
dies with the object), the provider's SSH options (engines are reached at `unix://` or `tcp://`), protect, and
`pulumi destroy` (`teardown` removes the services, secrets and configs in the state, everything labelled with the
stack and the images the fixture tagged or pulled).

A `tcp://` engine is reached as the provider reaches it: over TLS with the rendered `caMaterial`, `certMaterial`
and `keyMaterial` when the provider has them (the stack's config secrets, `docker_tls`), in plain text otherwise,
so a stage whose provider lacks the material does not reach a TLS engine here either.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import time
import uuid
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

import docker
import pulumi
from docker.tls import TLSConfig
from docker.types import EndpointConfig, Ulimit

from components.engine_facts import docker_cli
from components.images import context_files
from mlops import plan
from mlops.diff import ABSENT, FieldChange, classify
from mlops_spec.contract import MODEL_SIGNING_KEY, TRUSTED_MODEL_KEYS, secret_variable
from mlops_spec.encoding import parse_cpus
from mlops_spec.models import StageSpec
from mlops_spec.project import REPO_ROOT
from tests.hosts import tls_client
from tests.model_signing import SIGNING_KEY_PEM, TRUSTED_KEYS_PEM

PROVIDER = "pulumi:providers:docker"
IMAGE = "docker:index/image:Image"
REMOTE_IMAGE = "docker:index/remoteImage:RemoteImage"
CONTAINER = "docker:index/container:Container"
VOLUME = "docker:index/volume:Volume"
NETWORK = "docker:index/network:Network"
SERVICE = "docker:index/service:Service"
SECRET = "docker:index/secret:Secret"
SERVICE_CONFIG = "docker:index/serviceConfig:ServiceConfig"
MIB = 1024 * 1024
BUILDER_VERSIONS = {"BuilderV1": "1", "BuilderBuildKit": "2"}
# Inputs the fixture acts on; anything else in a rendering fails the deploy rather than being ignored.
BUILD_INPUTS = {"args", "builderVersion", "context", "dockerfile", "platform", "target"}
MODELLED_INPUTS = {
    IMAGE: {"build", "buildOnPreview", "imageName", "registry", "skipPush"},
    REMOTE_IMAGE: {"keepLocally", "name", "platform"},
    CONTAINER: {"capabilities", "command", "cpus", "envs", "healthcheck", "image", "ipcMode", "labels", "memory",
                "memorySwap", "mustRun", "name", "networkMode", "networksAdvanced", "ports", "readOnly", "restart",
                "securityOpts", "start", "tmpfs", "ulimits", "uploads", "user", "volumes", "wait", "waitTimeout"},
    VOLUME: {"labels", "name"},
    NETWORK: {"attachable", "driver", "labels", "name"},
    SERVICE: {"convergeConfig", "endpointSpec", "labels", "mode", "name", "rollbackConfig", "taskSpec", "updateConfig"},
    SECRET: {"data", "labels", "name"},
    SERVICE_CONFIG: {"data", "name"},
}
# The types whose changes the provider may answer with a replacement rather than an update in place; which
# changes replace comes from mlops/replacements.py, the one table of the provider's ForceNew fields.
REPLACEABLE = {SERVICE, SECRET, SERVICE_CONFIG}
GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
GO_UNIT_NS = {"h": 3600e9, "m": 60e9, "s": 1e9, "ms": 1e6, "us": 1e3, "µs": 1e3, "ns": 1}
LOG_LINES = 30


class DeployFailed(RuntimeError):
    """The engine refused a build, push or pull; the message is the engine's."""


@dataclass
class Created:
    """A state entry: what a resource was created with, and what the engine made of it."""

    type: str
    inputs: dict[str, Any]
    """The rendered inputs, a container's `image` resolved to what it runs."""
    id: str
    outputs: dict[str, str] = field(default_factory=dict)
    """Images: the rendering's mock output values -> the real ones, for the containers that run them."""
    retained: bool = False
    """`retain_on_delete`: Pulumi drops it from the state and never asks the provider to delete it."""


@dataclass
class StageOnEngine:
    stack: str
    spec: StageSpec
    """Assign another spec of the same stack and `deploy` again to update the stage."""
    registry_password: str
    mlflow_password: str = field(default_factory=lambda: uuid.uuid4().hex)
    """The stage's MLflow secret (Pulumi config mlops:mlflowPassword); `train` and `promote` need it too."""
    docker_tls: dict[str, str] = field(default_factory=dict)
    """The stack's Docker TLS config secrets (`mlops:dockerCaCert`, ...) for a stage whose host speaks TLS."""
    state: dict[str, Created] = field(default_factory=dict)
    references: list[str] = field(default_factory=list)
    """Image references the fixture tagged, pushed or pulled, removed by `teardown`."""

    def __post_init__(self) -> None:
        # The stack's model-signing config as `mlops train` and `mlops promote` read it where CI runs them.
        os.environ.setdefault(secret_variable(MODEL_SIGNING_KEY, self.stack), SIGNING_KEY_PEM)
        os.environ.setdefault(secret_variable(TRUSTED_MODEL_KEYS, self.stack), TRUSTED_KEYS_PEM)
        provider = self._provider(self.resources())
        self.host = provider["host"]
        self._provider_tls = tempfile.TemporaryDirectory(prefix="mlops-provider-tls-")
        tls = _provider_tls(provider, Path(self._provider_tls.name))
        self.client = (tls_client(self.host, tls, timeout=300) if tls
                       else docker.DockerClient(base_url=self.host, timeout=300))
        self._replaced: list[Created] = []

    def resources(self) -> list[plan.PlannedResource]:
        return plan.render(self.stack, self.spec, config={"mlops:registryPassword": self.registry_password,
                                                          "mlops:mlflowPassword": self.mlflow_password,
                                                          f"mlops:{TRUSTED_MODEL_KEYS}": TRUSTED_KEYS_PEM,
                                                          **self.docker_tls},
                           reveal_secrets=True, engines=docker_cli)

    def deploy(self) -> dict[str, docker.models.containers.Container]:
        """Bring the engine to what the rendering declares; returns every declared container by name."""
        resources = self.resources()
        provider = self._provider(resources)
        if provider["host"] != self.host:
            raise ValueError(f"{self.stack} moves from {self.host} to {provider['host']}: not modelled")
        self._registry_auth = json.loads(provider.get("registryAuth") or "[]")
        planned = {resource.name: resource for resource in resources if resource.type in MODELLED_INPUTS}
        for resource in planned.values():
            unknown = set(resource.inputs) - MODELLED_INPUTS[resource.type]
            unknown |= {f"build.{key}" for key in set(resource.inputs.get("build", {})) - BUILD_INPUTS}
            if unknown:
                raise NotImplementedError(f"{resource.name}: the fixture does not model {sorted(unknown)}")
        self._in_dependency_order(planned)
        # Pulumi deletes what was replaced (create-before-delete) and what is no longer declared last,
        # dependents first: services before the secrets they mount.
        gone = self._replaced + [self.state.pop(name) for name in [name for name in self.state if name not in planned]]
        self._replaced = []
        for entry in sorted(gone, key=lambda entry: entry.type != SERVICE):
            self._delete(entry)
        return {entry.inputs["name"]: self.client.containers.get(entry.id)
                for entry in self.state.values() if entry.type == CONTAINER}

    @staticmethod
    def _provider(resources: list[plan.PlannedResource]) -> dict[str, Any]:
        [provider] = [resource.inputs for resource in resources if resource.type == PROVIDER]
        return provider

    def _in_dependency_order(self, planned: dict[str, plan.PlannedResource]) -> None:
        """Start each resource once everything it depends on is done, as the engine walks the graph. On a
        failure, what already runs finishes and nothing new starts; the first failure is raised."""
        done: set[str] = set()
        running: dict[Future, str] = {}
        failure: BaseException | None = None
        with ThreadPoolExecutor(max_workers=max(len(planned), 1)) as pool:
            while True:
                if failure is None:
                    for name, resource in planned.items():
                        ready = all(dependency in done for dependency in resource.dependencies if dependency in planned)
                        if ready and name not in done and name not in running.values():
                            running[pool.submit(self._apply, resource)] = name
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    name = running.pop(future)
                    if future.exception() is None:
                        done.add(name)
                    else:
                        failure = failure or future.exception()
        if failure is not None:
            raise failure
        if len(done) < len(planned):
            raise RuntimeError(f"{self.stack}: dependency cycle among {sorted(set(planned) - done)}")

    def _apply(self, resource: plan.PlannedResource) -> None:
        inputs = resource.inputs
        if resource.type == CONTAINER:
            inputs = {**inputs, "image": self._runs(resource)}
        elif resource.type == SERVICE:
            inputs = self._resolved(resource)
        previous = self.state.get(resource.name)
        if previous is not None and previous.inputs == inputs:
            return
        if previous is not None and resource.type == SERVICE and not _replaced(SERVICE, previous.inputs, inputs):
            self._update_service(resource.name, previous, inputs)
            return
        if previous is not None and resource.type in REPLACEABLE and not resource.delete_before_replace:
            self._replaced.append(previous)
        elif previous is not None:
            self._delete(previous)
        if resource.type == IMAGE:
            created = self._build(inputs)
        elif resource.type == REMOTE_IMAGE:
            created = self._pull(inputs)
        elif resource.type == CONTAINER:
            created = self._run(resource.name, inputs)
        elif resource.type == VOLUME:
            created = self._volume(inputs)
        elif resource.type == SERVICE:
            created = self._create_service(resource.name, inputs)
        elif resource.type in (SECRET, SERVICE_CONFIG):
            created = self._swarm_object(resource.type, inputs)
        else:
            created = self._network(inputs)
        mock_id, mock_outputs = _mock_resource(resource)
        if resource.type in (IMAGE, REMOTE_IMAGE):
            created.outputs = {mock_outputs[key]: real for key, real in created.outputs.items()}
        else:
            created.outputs = {mock_id: created.id}
        created.retained = resource.retain_on_delete
        self.state[resource.name] = created

    def _resolved(self, resource: plan.PlannedResource) -> dict[str, Any]:
        """The inputs with every mock output of a dependency (image digests, secret and network IDs)
        replaced by the real one, as the engine passes resolved outputs to the provider."""
        real = {mock: value for name in resource.dependencies if name in self.state
                for mock, value in self.state[name].outputs.items()}
        return _replace_values(resource.inputs, real)

    def _runs(self, container: plan.PlannedResource) -> str:
        """The real image the container runs: its mock `image` input translated by the image resource it
        depends on."""
        mock = container.inputs["image"]
        [real] = [self.state[name].outputs[mock] for name in container.dependencies
                  if name in self.state and mock in self.state[name].outputs]
        return real

    def _delete(self, entry: Created) -> None:
        if not entry.retained:
            self._remove(entry)

    def _remove(self, entry: Created) -> None:
        # Images stay (Image deletes no tag, RemoteImage has keepLocally), and volumes and networks are never
        # deleted on a redeploy (see the module docstring).
        remove = {CONTAINER: lambda: self.client.containers.get(entry.id).remove(force=True, v=True),
                  SERVICE: lambda: self.client.api.remove_service(entry.id),
                  SECRET: lambda: self.client.api.remove_secret(entry.id),
                  SERVICE_CONFIG: lambda: self.client.api.remove_config(entry.id)}.get(entry.type)
        try:
            if remove:
                remove()
        except docker.errors.NotFound:
            pass  # removed behind the state's back: deleted all the same, as the provider sees it

    def _build(self, inputs: dict[str, Any]) -> Created:
        # The provider's own call: POST /build with `version=2` and the context as a tar. It needs nothing but
        # the engine, so it works on a CI machine that installed only Debian's docker.io (`.ci/run`) and on
        # the tests' inner engines alike. The Docker SDK's `images.build` has no `version` parameter, and the
        # CLI builds with BuildKit only where its client allows (20.10 does; 23+ needs the buildx plugin).
        build, name = inputs["build"], inputs["imageName"]
        context, dockerfile = REPO_ROOT / build["context"], REPO_ROOT / build["dockerfile"]
        # A Dockerfile outside the context goes into the tar under a name of its own, as the provider does
        # (provider/image.go: docker/cli's AddDockerfileToBuildContext, `.dockerfile.<random>`).
        in_context = dockerfile.is_relative_to(context)
        sent_dockerfile = (dockerfile.relative_to(context).as_posix() if in_context
                           else f".dockerfile.{hashlib.sha256(dockerfile.read_bytes()).hexdigest()[:20]}")
        params = {"t": name, "dockerfile": sent_dockerfile,
                  "version": BUILDER_VERSIONS[build.get("builderVersion", "BuilderBuildKit")],
                  "platform": build.get("platform"), "target": build.get("target"),
                  "buildargs": json.dumps(build.get("args", {}))}
        api = self.client.api

        def build_stream() -> Iterator[dict[str, Any]]:
            response = api._post(api._url("/build"), params=params, data=body, stream=True, timeout=1800,
                                 headers={"Content-Type": "application/x-tar"})
            api._raise_for_status(response)
            return api._stream_helper(response, decode=True)

        with _context_tar(context, None if in_context else (dockerfile, sent_dockerfile)) as body:
            for _ in _engine_stream(f"build of {name}", build_stream):
                pass
        self.references.append(name)
        image_id = self.client.images.get(name).id
        # The provider's repoDigest of an image it does not push is the image ID (provider/image.go).
        if inputs.get("skipPush"):
            return Created(IMAGE, inputs, image_id, {"repoDigest": image_id})
        return Created(IMAGE, inputs, image_id, {"repoDigest": self._push(name, inputs["registry"])})

    def _push(self, name: str, registry: dict[str, str]) -> str:
        """Push with the Image's own credentials, as the provider does (no login); returns the repo digest."""
        auth = {"username": registry["username"], "password": registry["password"], "serveraddress": registry["server"]}
        digests = []
        for message in _engine_stream(f"push of {name}", lambda: self.client.api.push(
                name, auth_config=auth, stream=True, decode=True)):
            digests += [message["aux"]["Digest"]] if "Digest" in message.get("aux", {}) else []
        if not digests:
            raise DeployFailed(f"push of {name} reported no digest")
        repo_digest = f"{_repository(name)}@{digests[-1]}"
        self.references.append(repo_digest)
        return repo_digest

    def _pull(self, inputs: dict[str, Any]) -> Created:
        """Like the provider's findImage (terraform-provider-docker, resource_docker_image_funcs.go): an image
        the engine already has under `name` is used as it is, without asking the registry; otherwise it is
        pulled with the provider's credentials for the registry `name` starts with."""
        name = inputs["name"]
        try:
            image_id = self.client.images.get(name).id
        except docker.errors.ImageNotFound:
            registry = name.split("/", 1)[0]
            auth = next(({"username": entry["username"], "password": entry["password"], "serveraddress": registry}
                         for entry in self._registry_auth if entry["address"] == registry), None)
            list(_engine_stream(f"pull of {name}", lambda: self.client.api.pull(
                name, stream=True, decode=True, auth_config=auth, platform=inputs.get("platform"))))
            self.references.append(name)
            image_id = self.client.images.get(name).id
        return Created(REMOTE_IMAGE, inputs, image_id, {"repoDigest": name, "imageId": image_id})

    def _run(self, name: str, inputs: dict[str, Any]) -> Created:
        if not inputs.get("start", True):
            return self._created_with_uploads(inputs)
        check = inputs["healthcheck"]
        [network] = inputs["networksAdvanced"]
        container = self.client.containers.create(
            inputs["image"], name=inputs["name"], user=inputs["user"], read_only=inputs["readOnly"],
            tmpfs=inputs.get("tmpfs"), security_opt=inputs["securityOpts"],
            cap_drop=inputs["capabilities"].get("drops"), cap_add=inputs["capabilities"].get("adds"),
            ipc_mode=inputs.get("ipcMode"), ulimits=[Ulimit(**limit) for limit in inputs.get("ulimits", [])],
            mem_limit=inputs["memory"] * MIB, memswap_limit=_megabytes_or_unlimited(inputs["memorySwap"]),
            nano_cpus=parse_cpus(inputs["cpus"]), labels=_labels(inputs), environment=inputs.get("envs"),
            command=inputs.get("command"), restart_policy={"Name": inputs["restart"]},
            ports={f"{port['internal']}/{port.get('protocol', 'tcp')}": (port["ip"], port.get("external"))
                   for port in inputs.get("ports", [])},
            volumes={volume["volumeName"]: {"bind": volume["containerPath"], "mode": "ro" if volume.get("readOnly") else "rw"}
                     for volume in inputs.get("volumes", [])},
            healthcheck={"test": check["tests"], "interval": _nanoseconds(check["interval"]),
                         "timeout": _nanoseconds(check["timeout"]), "retries": check["retries"],
                         "start_period": _nanoseconds(check["startPeriod"])},
            network=network["name"],
            networking_config={network["name"]: EndpointConfig(self.client.api._version, aliases=network.get("aliases"))},
        )
        # Until it is started (and healthy, with `wait`) it is in the state as tainted, with inputs no rendering
        # matches, so the next deploy replaces it, as Pulumi replaces a resource whose create failed midway.
        self.state[name] = Created(CONTAINER, {}, container.id)
        container.start()
        if inputs["wait"]:
            self.wait_healthy([container], inputs["waitTimeout"])
        return Created(CONTAINER, inputs, container.id)

    def _created_with_uploads(self, inputs: dict[str, Any]) -> Created:
        """A container created and never started (`start: false`) that takes `uploads`, as the provider's create
        does: each file a tar of its own, extracted at `/` with the declared mode and the owner left unset."""
        container = self.client.containers.create(
            inputs["image"], name=inputs["name"], labels=_labels(inputs), network_mode=inputs.get("networkMode"),
            user=inputs.get("user"), security_opt=inputs.get("securityOpts"), ipc_mode=inputs.get("ipcMode"),
            cap_drop=inputs.get("capabilities", {}).get("drops"),
            volumes={volume["volumeName"]: {"bind": volume["containerPath"], "mode": "ro" if volume.get("readOnly") else "rw"}
                     for volume in inputs.get("volumes", [])})
        for upload in inputs.get("uploads", []):
            content = upload["content"].encode()
            archive = io.BytesIO()
            with tarfile.open(fileobj=archive, mode="w") as tar:
                entry = tarfile.TarInfo(upload["file"])
                entry.size, entry.mode, entry.mtime = len(content), int(upload.get("permissions", "0644"), 8), time.time()
                tar.addfile(entry, io.BytesIO(content))
            container.put_archive("/", archive.getvalue())
        return Created(CONTAINER, inputs, container.id)

    def _volume(self, inputs: dict[str, Any]) -> Created:
        # Creating a volume that exists returns it unchanged, data included.
        return Created(VOLUME, inputs, self.client.volumes.create(inputs["name"], labels=_labels(inputs)).name)

    def _network(self, inputs: dict[str, Any]) -> Created:
        # The engine accepts duplicate network names, so look first.
        existing = [network for network in self.client.networks.list(names=[inputs["name"]])
                    if network.name == inputs["name"]]
        network = existing[0] if existing else self.client.networks.create(
            inputs["name"], driver=inputs.get("driver", "bridge"), labels=_labels(inputs),
            attachable=inputs.get("attachable"))
        return Created(NETWORK, inputs, network.id)

    def _swarm_object(self, kind: str, inputs: dict[str, Any]) -> Created:
        """A Swarm secret or config: immutable, so any change replaces it (mlops/replacements.py). `data` is
        base64 in the rendering, as the engine API takes it."""
        endpoint = "/secrets/create" if kind == SECRET else "/configs/create"
        body = {"Name": inputs["name"], "Data": inputs["data"], "Labels": _labels(inputs)}
        api = self.client.api
        try:
            created = api._result(api._post_json(api._url(endpoint), data=body), json=True)
        except docker.errors.APIError as error:
            raise DeployFailed(f"creating {inputs['name']} failed: {error.explanation or error}") from None
        return Created(kind, inputs, created["ID"])

    def _create_service(self, name: str, inputs: dict[str, Any]) -> Created:
        """ServiceCreate with the registry credentials for the image (`--with-registry-auth`) and QueryRegistry, as
        resourceDockerServiceCreate asks the Docker client; then, with a `convergeConfig`, wait until every replica
        runs; a service that does not converge is deleted and the create fails."""
        api = self.client.api
        spec = self._resolved_by_registry(_service_spec(inputs), inputs)
        try:
            service_id = api._result(api._post_json(api._url("/services/create"), data=spec,
                                                    headers=self._service_auth(inputs)), json=True)["ID"]
        except docker.errors.APIError as error:
            raise DeployFailed(f"creating service {inputs['name']} failed: {error.explanation or error}") from None
        converge = inputs.get("convergeConfig")
        if converge:
            self.state[name] = Created(SERVICE, {}, service_id)  # tainted until converged, as in _run
            try:
                self._converge(service_id, converge, _nanoseconds(converge["delay"]) / 1e9, update=False)
            except DeployFailed:
                self._delete(self.state.pop(name))
                raise
        return Created(SERVICE, inputs, service_id)

    def _update_service(self, name: str, previous: Created, inputs: dict[str, Any]) -> None:
        """ServiceUpdate of the spec at the version the engine has (resourceDockerServiceUpdate): Swarm
        rolls the tasks by the service's update_config. With a `convergeConfig`, wait 7 s (the provider's
        fixed delay), then until the update completes; a rollback or a pause fails the update. The state
        keeps the new inputs either way, as the plugin SDK saves the state of an update that failed."""
        api = self.client.api
        version = api.inspect_service(previous.id)["Version"]["Index"]
        try:
            api._raise_for_status(api._post_json(api._url("/services/{0}/update", previous.id), data=_service_spec(inputs),
                                                 params={"version": version}, headers=self._service_auth(inputs)))
        except docker.errors.APIError as error:
            raise DeployFailed(f"updating service {inputs['name']} failed: {error.explanation or error}") from None
        self.state[name] = Created(SERVICE, inputs, previous.id, previous.outputs)
        converge = inputs.get("convergeConfig")
        if converge:
            self._converge(previous.id, converge, delay_s=7, update=True)

    def _converge(self, service_id: str, converge: dict[str, str], delay_s: float, update: bool) -> None:
        """The provider's refresh functions for create and update: done when as many slots run as the service
        has replicas (counting only tasks on nodes that are not down); on an update, the UpdateStatus decides
        first: completed is done, rollback_completed and paused fail."""
        api = self.client.api
        timeout_s = _nanoseconds(converge["timeout"]) / 1e9
        deadline = time.monotonic() + delay_s + timeout_s
        time.sleep(delay_s)
        rolling_back = False
        while True:
            service = api.inspect_service(service_id)
            state = (service.get("UpdateStatus") or {}).get("State") if update else None
            message = (service.get("UpdateStatus") or {}).get("Message", "")
            if state == "completed":
                return
            if state in ("rollback_completed", "paused", "rollback_paused"):
                raise DeployFailed(f"service {service['Spec']['Name']}: {state.replace('_', ' ')}: {message}")
            rolling_back = state == "rollback_started" or (rolling_back and state is None)
            if _running_slots(api, service_id) == service["Spec"]["Mode"]["Replicated"]["Replicas"]:
                if rolling_back:
                    raise DeployFailed(f"service {service['Spec']['Name']}: rollback completed: {message}")
                return
            if time.monotonic() > deadline:
                raise DeployFailed(f"service {service['Spec']['Name']} did not converge after {converge['timeout']}")
            time.sleep(1)

    def _resolved_by_registry(self, spec: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        """The spec as the Docker client sends a create with QueryRegistry (docker/docker v28.5.2
        client/service_create.go, resolveContainerSpecImage and imageDigestAndPlatforms): the engine's distribution
        inspect of the image, then the image pinned to its digest unless it is by digest already, and the
        placement's platforms replaced by every platform the image's manifest (list) names, an `arm` architecture
        blanked. A registry that does not answer leaves the spec as given (the client only warns). An update does
        not ask (resourceDockerServiceUpdate sets no QueryRegistry)."""
        container = spec["TaskTemplate"]["ContainerSpec"]
        try:
            distribution = self.client.api.inspect_distribution(container["Image"], auth_config=self._image_auth(inputs))
        except docker.errors.APIError:
            return spec
        if "@" not in container["Image"]:
            container["Image"] = f"{container['Image']}@{distribution['Descriptor']['digest']}"
        platforms = [{"Architecture": "" if platform.get("architecture", "").lower() == "arm" else platform.get("architecture", ""),
                      "OS": platform.get("os", "")} for platform in distribution.get("Platforms") or []]
        if platforms:
            spec["TaskTemplate"].setdefault("Placement", {})["Platforms"] = platforms
        return spec

    def _image_auth(self, inputs: dict[str, Any]) -> dict[str, str]:
        """The provider's `registryAuth` entry for the registry the service's image names (fromRegistryAuth); none
        otherwise."""
        image = inputs["taskSpec"]["containerSpec"]["image"]
        registry = image.split("/", 1)[0] if "/" in image else None
        return next(({"username": entry["username"], "password": entry["password"], "serveraddress": registry}
                     for entry in self._registry_auth if entry["address"] == registry), {})

    def _service_auth(self, inputs: dict[str, Any]) -> dict[str, str]:
        """X-Registry-Auth with the image's registry credentials, so the nodes pull with them; an empty auth config
        otherwise."""
        return {"X-Registry-Auth": base64.urlsafe_b64encode(json.dumps(self._image_auth(inputs)).encode()).decode()}

    def wait_healthy(self, containers: list, timeout_s: float) -> None:
        """Polls each container until healthy, as the provider's `wait` does (through unhealthy phases too)."""
        deadline = time.monotonic() + timeout_s
        for container in containers:
            while True:
                container.reload()
                health = container.attrs["State"].get("Health", {}).get("Status")
                if health == "healthy":
                    break
                if time.monotonic() > deadline:
                    logs = container.logs(tail=LOG_LINES).decode(errors="replace")
                    raise TimeoutError(f"{container.name} is {health} after {timeout_s:.0f}s; last logs:\n{logs}")
                time.sleep(1)

    def host_port(self, container_name: str, internal: int) -> int:
        container = self.client.containers.get(container_name)
        return int(container.ports[f"{internal}/tcp"][0]["HostPort"])

    def teardown(self) -> None:
        selector = {"label": f"mlops.stack={self.stack}"}
        for entry in sorted(self.state.values(), key=lambda entry: entry.type != SERVICE):
            if entry.type in (SERVICE, SECRET, SERVICE_CONFIG):
                self._remove(entry)
        for container in self.client.containers.list(all=True, filters=selector):
            container.remove(force=True, v=True)
        for network in self.client.networks.list(filters=selector):
            network.remove()
        for volume in self.client.volumes.list(filters=selector):
            volume.remove(force=True)
        for reference in self.references:
            try:
                self.client.images.remove(reference, noprune=False)
            except docker.errors.APIError:
                pass  # gone already, or still used by another stack's container; the build cache keeps the layers
        self.state.clear()


def _provider_tls(provider: dict[str, Any], folder: Path) -> Optional[TLSConfig]:
    """docker-py's TLS settings from the provider's rendered materials, written into `folder` (docker-py reads
    files), as terraform-provider-docker's NewClient builds its client from them; None without materials."""
    materials: dict[str, str] = {name: provider.get(name) or "" for name in ("caMaterial", "certMaterial", "keyMaterial")}
    if not any(materials.values()):
        return None
    if not all(materials.values()):
        raise ValueError(f"the provider has only {sorted(name for name, value in materials.items() if value)}")
    for name, value in materials.items():
        (folder / f"{name}.pem").write_text(value)
        (folder / f"{name}.pem").chmod(0o600)
    return TLSConfig(client_cert=(str(folder / "certMaterial.pem"), str(folder / "keyMaterial.pem")),
                     ca_cert=str(folder / "caMaterial.pem"), verify=True)


def _mock_resource(resource: plan.PlannedResource) -> tuple[str, dict[str, Any]]:
    """The ID and outputs the rendering's dependents saw for `resource`: what the plan's mocks resolved."""
    return plan._PlanMocks().new_resource(pulumi.runtime.MockResourceArgs(
        typ=resource.type, name=resource.name, inputs=resource.inputs))


def _replace_values(value: Any, real: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {key: _replace_values(item, real) for key, item in value.items()}
    if isinstance(value, list):
        return [_replace_values(item, real) for item in value]
    return real.get(value, value) if isinstance(value, str) else value


# Task states in the order Swarm moves through them (resource_docker_service_funcs.go numberedStates).
TASK_STATES = {state: number for number, state in enumerate(
    ["new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting", "running",
     "complete", "shutdown", "failed", "rejected"], start=1)}


def _running_slots(api, service_id: str) -> int:
    """replicatedConsoleLogUpdater.update: per slot, the task with the lowest desired state (then the lowest
    observed one) on a node that is not down; the slots whose task should and does run."""
    active = {node["ID"] for node in api.nodes() if node["Status"]["State"] != "down"}
    by_slot: dict[int, dict] = {}
    for task in api.tasks(filters={"service": service_id, "desired-state": "running"}):
        desired, observed = TASK_STATES.get(task["DesiredState"], 0), TASK_STATES.get(task["Status"]["State"], 0)
        if not desired or not observed or (task.get("NodeID") and task["NodeID"] not in active):
            continue
        existing = by_slot.get(task.get("Slot", 0))
        if existing and (TASK_STATES[existing["DesiredState"]], TASK_STATES[existing["Status"]["State"]]) <= (desired, observed):
            continue
        by_slot[task.get("Slot", 0)] = task
    return sum(1 for task in by_slot.values()
               if TASK_STATES[task["DesiredState"]] <= TASK_STATES["running"] and task["Status"]["State"] == "running")


def _engine_stream(action: str, start: Callable[[], Iterator[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """The engine's progress messages of a build, push or pull; a refusal, at the start or midway, raises
    with the engine's message and the last lines of build output."""
    output: deque[str] = deque(maxlen=LOG_LINES)
    try:
        for message in start():
            if message.get("id") == "moby.buildkit.trace":
                output.extend(_buildkit_log_lines(message["aux"]))
            output.extend(message.get("stream", "").splitlines(keepends=True))
            if "error" in message:
                raise DeployFailed(f"{action} failed: {message['error']}" + (f"; last output:\n{''.join(output)}" if output else ""))
            yield message
    except docker.errors.APIError as error:
        raise DeployFailed(f"{action} failed: {error.explanation or error}") from None


def _context_tar(context, outside_dockerfile: Optional[tuple[Path, str]] = None) -> IO[bytes]:
    """The build context as the provider sends it: the files `.dockerignore` lets through (the same
    selection as the content tag), the Dockerfile and `.dockerignore` always, owned by root; a Dockerfile
    from outside the context added under the name given with it."""
    files = set(context_files(context)) | {path for path in (context / "Dockerfile", context / ".dockerignore")
                                          if path.is_file()}
    folders = {parent for path in files for parent in path.relative_to(context).parents if parent.name}
    body = tempfile.TemporaryFile()
    with tarfile.open(fileobj=body, mode="w") as tar:
        # Whole-second mtimes keep plain ustar headers: BuildKit sniffs the upload for a tar header and
        # would read a leading PAX header (which fractional mtimes need) as a Dockerfile.
        entries = [(context / relative, relative.as_posix())
                   for relative in sorted(folders) + sorted(path.relative_to(context) for path in files)]
        for source, arcname in entries + ([outside_dockerfile] if outside_dockerfile else []):
            info = tar.gettarinfo(source, arcname=arcname)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = int(info.mtime)
            if info.isfile():
                with source.open("rb") as content:
                    tar.addfile(info, content)
            else:
                tar.addfile(info)
    body.seek(0)
    return body


def _buildkit_log_lines(aux: str) -> list[str]:
    """The output lines of the build steps in a `moby.buildkit.trace` message: a base64 StatusResponse
    (moby/buildkit api/services/control/control.proto) whose `logs` (field 3) carry `msg` (field 4)."""
    lines = []
    for number, log in _protobuf_fields(base64.b64decode(aux)):
        if number == 3:
            lines += [msg.decode(errors="replace") for field_number, msg in _protobuf_fields(log) if field_number == 4]
    return "".join(lines).splitlines(keepends=True)


def _protobuf_fields(buffer: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) pairs of a protobuf message; length-delimited values as bytes."""
    position = 0
    while position < len(buffer):
        key, position = _varint(buffer, position)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == 0:
            value, position = _varint(buffer, position)
        elif wire_type == 2:
            length, position = _varint(buffer, position)
            value, position = buffer[position:position + length], position + length
        else:
            size = {1: 8, 5: 4}[wire_type]
            value, position = buffer[position:position + size], position + size
        yield number, value


def _varint(buffer: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def _repository(name: str) -> str:
    """`name` without its tag: `localhost:5001/dev/serving:abc` -> `localhost:5001/dev/serving`."""
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':')[0]}" if head else last.split(":")[0]


def _nanoseconds(duration: str) -> int:
    """A Go duration as the provider parses it ("5s", "1m0s", "1h2m3s", "500ms")."""
    parts = GO_DURATION.findall(duration)
    if "".join(number + unit for number, unit in parts) != duration:
        raise ValueError(f"not a Go duration: {duration!r}")
    return round(sum(float(number) * GO_UNIT_NS[unit] for number, unit in parts))


def _megabytes_or_unlimited(megabytes: int) -> int:
    """A container's `memory_swap` as createContainer sends it (resource_docker_container_funcs.go): MB when
    positive, -1 (unlimited) as is."""
    return megabytes * MIB if megabytes > 0 else megabytes


def _replaced(resource_type: str, before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether the provider replaces a resource whose inputs change from `before` to `after`, by the table of
    mlops/replacements.py (`mlops diff` decides by it too)."""
    old, new = plan.flatten(before), plan.flatten(after)
    changes = tuple(FieldChange(path, old.get(path, ABSENT), new.get(path, ABSENT))
                    for path in sorted({*old, *new}) if old.get(path, ABSENT) != new.get(path, ABSENT))
    return classify(resource_type, changes, old, new).action == "replace"


def _labels(inputs: dict[str, Any]) -> dict[str, str]:
    return {label["label"]: label["value"] for label in inputs.get("labels", [])}


def _service_spec(inputs: dict[str, Any]) -> dict[str, Any]:
    """The engine's ServiceSpec from a Service's inputs, as createServiceSpec builds it
    (resource_docker_service_structures.go): durations in nanoseconds, label lists as maps, placement
    preferences as spread descriptors, networks by ID or name; the update and rollback configs as given."""
    task = inputs["taskSpec"]
    container = task["containerSpec"]
    check = container.get("healthcheck")
    resources = task.get("resources", {})
    placement = task.get("placement", {})
    restart = task.get("restartPolicy")
    spec = {
        "Name": inputs["name"], "Labels": _labels(inputs),
        "TaskTemplate": {
            "ContainerSpec": _drop_none({
                "Image": container["image"], "Labels": _labels(container), "Command": container.get("commands"),
                "Args": container.get("args"), "Hostname": container.get("hostname"), "Dir": container.get("dir"),
                "Env": [f"{key}={value}" for key, value in container.get("env", {}).items()],
                "User": container.get("user"), "Groups": container.get("groups"),
                "ReadOnly": container.get("readOnly", False),
                "Mounts": [_mount(mount) for mount in container.get("mounts", [])],
                "StopSignal": container.get("stopSignal"),
                "StopGracePeriod": _nanoseconds(container["stopGracePeriod"]) if "stopGracePeriod" in container else None,
                "Healthcheck": None if check is None else {
                    "Test": check["tests"], "Interval": _nanoseconds(check.get("interval", "0s")),
                    "Timeout": _nanoseconds(check.get("timeout", "0s")), "Retries": check.get("retries", 0),
                    "StartPeriod": _nanoseconds(check.get("startPeriod", "0s"))},
                "Secrets": [_file_reference(secret, "Secret") for secret in container.get("secrets", [])],
                "Configs": [_file_reference(config, "Config") for config in container.get("configs", [])],
                "CapabilityAdd": container.get("capAdds"), "CapabilityDrop": container.get("capDrops"),
                "Sysctls": container.get("sysctl"), "Init": container.get("init")}),
            "Resources": {
                "Limits": _resources(resources.get("limits", {})),
                "Reservations": {**_resources(resources.get("reservation", {})), "GenericResources": [
                    {"DiscreteResourceSpec": {"Kind": kind, "Value": int(value)}}
                    for kind, value in (item.split("=") for item in resources.get("reservation", {}).get(
                        "genericResources", {}).get("discreteResourcesSpecs", []))]}},
            "RestartPolicy": None if restart is None else _drop_none({
                "Condition": restart.get("condition"),
                "Delay": _nanoseconds(restart["delay"]) if "delay" in restart else None,
                "MaxAttempts": restart.get("maxAttempts"),
                "Window": _nanoseconds(restart["window"]) if "window" in restart else None}),
            "Placement": _drop_none({
                "Constraints": placement.get("constraints"),
                "Preferences": [{"Spread": {"SpreadDescriptor": descriptor}} for descriptor in placement.get("prefs", [])],
                "MaxReplicas": placement.get("maxReplicas"),
                "Platforms": [{"Architecture": platform["architecture"], "OS": platform["os"]}
                              for platform in placement.get("platforms", [])]}),
            "Networks": [_drop_none({"Target": network.get("id") or network["name"], "Aliases": network.get("aliases")})
                         for network in task.get("networksAdvanceds", [])],
            "ForceUpdate": task.get("forceUpdate", 0),
        },
        "Mode": {"Global": {}} if inputs["mode"].get("global") else {
            "Replicated": {"Replicas": inputs["mode"]["replicated"]["replicas"]}},
        "EndpointSpec": {"Mode": inputs.get("endpointSpec", {}).get("mode", "vip"), "Ports": [
            _drop_none({"Name": port.get("name"), "Protocol": port.get("protocol"), "TargetPort": port["targetPort"],
                        "PublishedPort": port.get("publishedPort"), "PublishMode": port.get("publishMode")})
            for port in inputs.get("endpointSpec", {}).get("ports", [])]},
    }
    for key, config in (("UpdateConfig", inputs.get("updateConfig")), ("RollbackConfig", inputs.get("rollbackConfig"))):
        if config is not None:
            spec[key] = _drop_none({
                "Parallelism": config.get("parallelism"), "FailureAction": config.get("failureAction"),
                "Delay": _nanoseconds(config["delay"]) if "delay" in config else None,
                "Monitor": _nanoseconds(config["monitor"]) if "monitor" in config else None,
                "MaxFailureRatio": float(config["maxFailureRatio"]) if "maxFailureRatio" in config else None,
                "Order": config.get("order")})
    return spec


def _mount(mount: dict[str, Any]) -> dict[str, Any]:
    tmpfs = mount.get("tmpfsOptions")
    return _drop_none({"Type": mount["type"], "Target": mount["target"], "Source": mount.get("source"),
                       "ReadOnly": mount.get("readOnly"),
                       "TmpfsOptions": None if tmpfs is None else {"SizeBytes": tmpfs.get("sizeBytes"), "Mode": tmpfs.get("mode")}})


def _file_reference(reference: dict[str, Any], kind: str) -> dict[str, Any]:
    """A secret or config mounted as a file: `secretId`/`secretName` (or `config…`) and its file target."""
    prefix = kind.lower()
    return {f"{kind}ID": reference[f"{prefix}Id"], f"{kind}Name": reference.get(f"{prefix}Name"),
            "File": {"Name": reference["fileName"], "UID": reference.get("fileUid", "0"),
                     "GID": reference.get("fileGid", "0"), "Mode": reference.get("fileMode", 0o444)}}


def _resources(resources: dict[str, Any]) -> dict[str, int]:
    return {"NanoCPUs": resources.get("nanoCpus", 0), "MemoryBytes": resources.get("memoryBytes", 0)}


def _drop_none(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}
