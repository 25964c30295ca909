"""Build inputs that do not depend on the machine: the content tag and the provider's context digest of a
clone are the same under any umask, and a rebuilt base image (a mutable tag) changes every image's inputs."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from components import images
from components.engine_facts import NO_ENGINE, DockerCli, NoEngine, reading_engines
from mlops import plan
from mlops.commands.train import training_image
from mlops_spec.errors import SpecError
from mlops_spec.loading import load_stages
from mlops_spec.models import DockerHost
from mlops_spec.project import ENVIRONMENTS_DIR

IMAGE = "docker:index/image:Image"
BASE_IMAGE = "mlops-base:bookworm"
AMD64 = images.BuildSettings(base_image="b", platform="linux/amd64")


def go_file_mode(mode: int) -> str:
    """Go's `fs.FileMode.String()` of a regular file or folder: a type letter, then rwx three times."""
    kind = "d" if stat.S_ISDIR(mode) else "-"
    return kind + "".join(letter if mode & (1 << (8 - index)) else "-" for index, letter in enumerate("rwxrwxrwx"))


def provider_context_digest(context: Path, dockerfile: Path) -> str:
    """The `contextDigest` pulumi-docker v5.1.0 gives a build (provider/provider.go, `hashContext` and
    `hashPath`): the Dockerfile as `Dockerfile` with mode 0, then every file the ignore rules let through, each
    as its relative name, its mode string and the SHA-256 of its content, then a NUL; the SHA-256 of it all."""
    def entry(name: str, mode: str, content: bytes) -> bytes:
        return name.encode() + mode.encode() + hashlib.sha256(content).digest() + b"\0"

    accumulated = entry("Dockerfile", "-" * 10, dockerfile.read_bytes())
    for path in images.context_files(context):
        accumulated += entry(path.relative_to(context).as_posix(), go_file_mode(path.stat().st_mode), path.read_bytes())
    return hashlib.sha256(accumulated).hexdigest()


def clone_under(umask: int, origin: Path, clone: Path) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(origin), str(clone)], check=True,
                   preexec_fn=lambda: os.umask(umask))
    return clone


@pytest.fixture
def origin(tmp_path) -> Path:
    """A repository with one build context: a Dockerfile, a script git records as executable, a nested file."""
    repo = tmp_path / "origin"
    context = repo / "ctx"
    (context / "app" / "lib").mkdir(parents=True)
    (context / "Dockerfile").write_text("ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nCOPY . /app\n")
    (context / "run.sh").write_text("#!/bin/sh\nexec python /app/app/main.py\n")
    (context / "run.sh").chmod(0o755)
    (context / "app" / "main.py").write_text("print('serving')\n")
    (context / "app" / "lib" / "util.py").write_text("ANSWER = 42\n")
    git = ["git", "-C", str(repo), "-c", "user.name=tests", "-c", "user.email=tests@example.invalid"]
    subprocess.run(["git", "init", "--quiet", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "context"], check=True)
    return repo


def test_clones_under_umask_002_and_022_get_the_same_content_tags_and_provider_digests(origin, tmp_path, monkeypatch):
    clones = {umask: clone_under(umask, origin, tmp_path / f"clone-{umask:03o}") for umask in (0o002, 0o022)}
    shared, private = (clones[umask] / "ctx" / "app" / "main.py" for umask in (0o002, 0o022))
    assert (stat.S_IMODE(shared.stat().st_mode), stat.S_IMODE(private.stat().st_mode)) == (0o664, 0o644), \
        "git gives each clone its umask's modes"
    digests = {umask: provider_context_digest(clone / "ctx", clone / "ctx" / "Dockerfile")
               for umask, clone in clones.items()}
    assert digests[0o002] != digests[0o022], "the provider hashes mode strings, so untouched clones differ"

    tags, normalised = {}, {}
    for umask, clone in clones.items():
        monkeypatch.setattr(images, "project_root", lambda clone=clone: clone)
        tags[umask] = images.content_tag("ctx", AMD64)
        images.normalise_modes(clone / "ctx")
        normalised[umask] = provider_context_digest(clone / "ctx", clone / "ctx" / "Dockerfile")
        assert images.content_tag("ctx", AMD64) == tags[umask], "normalising changes no content tag"
    assert tags[0o002] == tags[0o022]
    assert normalised[0o002] == normalised[0o022] == digests[0o022], "a 002 clone hashes as a 022 clone does"
    for clone in clones.values():
        assert stat.S_IMODE((clone / "ctx" / "run.sh").stat().st_mode) == 0o755, "the executable bit stays"
        assert stat.S_IMODE((clone / "ctx" / "app" / "lib").stat().st_mode) == 0o755


def test_the_executable_bit_changes_the_content_tag_and_group_write_does_not(origin, tmp_path, monkeypatch):
    clone = clone_under(0o022, origin, tmp_path / "clone")
    monkeypatch.setattr(images, "project_root", lambda: clone)
    script = clone / "ctx" / "app" / "main.py"
    first = images.content_tag("ctx", AMD64)
    script.chmod(0o664)
    assert images.content_tag("ctx", AMD64) == first
    script.chmod(0o755)
    assert images.content_tag("ctx", AMD64) != first


def test_the_program_normalises_each_context_before_the_provider_hashes_it(tmp_path, monkeypatch):
    import shutil

    from mlops_spec.project import REPO_ROOT

    for folder in ("images", "models"):
        shutil.copytree(REPO_ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("wheels"))
    monkeypatch.setattr(images, "project_root", lambda: tmp_path)
    group_writable = [tmp_path / "images" / "serving" / "Dockerfile", tmp_path / "models" / "iris-classifier" / "mlops-model.yaml"]
    for path in group_writable:
        path.chmod(0o664)
    (tmp_path / "images" / "gateway").chmod(0o775)
    plan.render("dev", load_stages(["dev"])[0])
    assert [oct(stat.S_IMODE(path.stat().st_mode)) for path in group_writable] == ["0o644", "0o644"]
    assert stat.S_IMODE((tmp_path / "images" / "gateway").stat().st_mode) == 0o755


class BaseImageEngine(NoEngine):
    """An engine holding the base image under `base_id`; asked for anything else it fails the test."""

    def __init__(self, base_id: str) -> None:
        self.base_id = base_id

    def image_id(self, image: str) -> str:
        assert image == BASE_IMAGE, image
        return self.base_id


def built(base_id: str) -> dict[str, dict]:
    return {resource.name: resource.inputs for resource in plan.render("dev", load_stages(["dev"])[0],
                                                                       engines=lambda spec: BaseImageEngine(base_id))
            if resource.type == IMAGE}


def test_a_rebuilt_base_image_changes_every_images_tag_and_build_arguments():
    first, rebuilt = built("sha256:" + "a" * 64), built("sha256:" + "b" * 64)
    assert first.keys() == rebuilt.keys() and len(first) >= 6
    for name, inputs in first.items():
        assert inputs["imageName"] != rebuilt[name]["imageName"], name
        args = inputs["build"]["args"]
        # A platform image gets the base's ID; a model's image gets its platform image's content-tagged name.
        assert args.get("BASE_IMAGE_ID") == "sha256:" + "a" * 64 or "PLATFORM_IMAGE" in args, name
        assert args != rebuilt[name]["build"]["args"], name


def test_without_an_engine_the_base_image_is_an_input_by_name_only():
    for inputs in built("").values():
        assert "BASE_IMAGE_ID" not in inputs["build"]["args"]
    assert images.BuildSettings.of(load_stages(["dev"])[0]) == images.BuildSettings(BASE_IMAGE, "linux/amd64")


def test_a_base_image_pinned_by_digest_is_never_looked_up():
    class Refuses(NoEngine):
        def image_id(self, image: str) -> str:
            raise AssertionError(f"looked up {image}")

    pinned = "python:3.11-slim@sha256:" + "c" * 64
    spec = load_stages(["dev"])[0].model_copy(update={"training": load_stages(["dev"])[0].training.model_copy(
        update={"base_image": pinned})})
    with reading_engines(lambda spec: Refuses()):
        assert images.BuildSettings.of(spec).build_args == {"BASE_IMAGE": pinned}


def test_mlops_train_runs_the_image_the_program_builds_on_the_same_base():
    spec = load_stages(["dev"])[0]
    base_id = "sha256:" + "d" * 64
    # dev keeps its images on its engine: one image per model and role, named as built.
    [name] = [inputs["imageName"] for inputs in built(base_id).values() if "/iris-classifier-training:" in inputs["imageName"]]
    with reading_engines(lambda spec: BaseImageEngine(base_id)):
        assert training_image(spec, "iris-classifier", ENVIRONMENTS_DIR) == name
    assert training_image(spec, "iris-classifier", ENVIRONMENTS_DIR) != name, "another base is another image"


@pytest.fixture
def fake_docker(tmp_path, monkeypatch):
    """A `docker` on PATH that answers from the files this fixture's caller writes."""
    script = tmp_path / "bin" / "docker"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""
        import os, pathlib, sys
        here = pathlib.Path(sys.argv[0]).parent
        (here / "called").write_text(" ".join([os.environ["DOCKER_HOST"], *sys.argv[1:]]))
        (here / "tls").write_text(" ".join(f"{key}={os.environ.get(key)}" for key in ("DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH")))
        sys.stdout.write((here / "stdout").read_text())
        sys.stderr.write((here / "stderr").read_text())
        sys.exit(int((here / "rc").read_text()))
        """))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(script.parent))

    def answer(stdout: str = "", stderr: str = "", rc: int = 0) -> Path:
        for name, text in (("stdout", stdout), ("stderr", stderr), ("rc", str(rc))):
            (script.parent / name).write_text(text)
        return script.parent / "called"

    return answer


def test_the_docker_cli_reads_the_stages_engine(fake_docker):
    engine = DockerCli("dev", DockerHost(url="ssh://builder@host"))
    called = fake_docker(stdout="sha256:" + "e" * 64 + "\n")
    assert engine.image_id(BASE_IMAGE) == "sha256:" + "e" * 64
    assert called.read_text().strip() == "ssh://builder@host image inspect --format {{.Id}} mlops-base:bookworm"
    fake_docker(stderr="Error: No such image: mlops-base:bookworm\n", rc=1)
    assert engine.image_id(BASE_IMAGE) == ""
    for answer, limits in (("true", True), ("false", False)):
        fake_docker(stdout=answer + "\n")
        assert engine.limits_swap() is limits


def test_an_engine_that_does_not_answer_is_one_line(fake_docker):
    fake_docker(stderr="Cannot connect to the Docker daemon at tcp://10.0.0.10:2375.\nIs the daemon running?\n", rc=1)
    with pytest.raises(SpecError) as raised:
        DockerCli("cluster", DockerHost(url="tcp://10.0.0.10:2375", insecure=True)).image_id(BASE_IMAGE)
    message = str(raised.value)
    assert message.startswith("stage cluster: docker.url: could not read the engine at tcp://10.0.0.10:2375")
    assert "Cannot connect to the Docker daemon" in message and "\n" not in message


def test_mlops_reads_a_tls_stages_engine_with_the_operators_certificates_not_the_stacks_config(fake_docker,
                                                                                               monkeypatch, tmp_path):
    """A stage that builds on a TLS host (the cluster stage): `mlops train` computes the training image's content tag
    from the base image's ID on that engine, with docker's DOCKER_CERT_PATH, as its other `docker` calls; outside a
    Pulumi program there is no stack config to take client material from."""
    from mlops import cli

    [spec] = load_stages(["cluster"], ENVIRONMENTS_DIR)
    assert spec.docker.uses_tls
    monkeypatch.setenv("DOCKER_CERT_PATH", str(tmp_path / "operator"))
    called = fake_docker(stdout="sha256:" + "c" * 64 + "\n")
    named = []
    monkeypatch.setattr(cli, "app", lambda: named.append(training_image(spec, "iris-classifier", ENVIRONMENTS_DIR)))
    cli.main()
    assert named and named[0].startswith("10.0.0.10:5301/cluster/iris-classifier-training:"), named
    assert called.read_text() == "tcp://10.0.0.10:2376 image inspect --format {{.Id}} mlops-base:bookworm"
    # The operator's folder, not one the program's reader writes from the stack's config (mlops-docker-tls-*).
    assert called.with_name("tls").read_text() == f"DOCKER_TLS_VERIFY=1 DOCKER_CERT_PATH={tmp_path / 'operator'}"


def test_renderings_without_an_engine_read_none():
    assert (NO_ENGINE.image_id(BASE_IMAGE), NO_ENGINE.limits_swap()) == ("", True)


@pytest.mark.docker
def test_the_docker_cli_reads_the_base_images_id_and_swap_accounting_from_the_engine(docker_engine):
    engine = DockerCli("dev", DockerHost(url=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")))
    inspected = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", BASE_IMAGE],
                               capture_output=True, text=True, check=True).stdout.strip()
    assert engine.image_id(BASE_IMAGE) == inspected
    assert engine.image_id("mlops-no-such-image:never-built") == ""
    info = subprocess.run(["docker", "info", "--format", "{{.SwapLimit}}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert engine.limits_swap() is (info == "true")
