"""Property-based tests of every parser of outside input, through the `mlops` command line.

Stage files (any bytes, any YAML feature), `--set`, stage and experiment names, STAGE@GITREF, `--param`,
`--ttl` and model names may come from a pull request or a command line. Whatever they hold, `mlops` answers
with exit 0 (or the command's own verdict for valid input) or exit 2 and one line on stderr naming the input,
within WALL_SECONDS per call and MEMORY_MB per process, without a traceback and without writing a file.

The commands run in-process in a throw-away copy of the project (a git repository with one commit, so
STAGE@GITREF reaches git); the worst cases also run in a child process under an address-space limit.
EXAMPLES is the number of generated cases per property and CI run; docs/reliability.md lists the same table.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mlops import cli
from mlops_spec.errors import excerpt, one_line
from mlops_spec.loading import load_stages
from mlops_spec.yamlsource import MAX_FILE_BYTES

CHECKOUT = Path(__file__).resolve().parent.parent
WALL_SECONDS = 5.0
MEMORY_MB = 256
EXAMPLES = {
    "stage file: any bytes": 60,
    "stage file: text in any encoding": 40,
    "stage file: YAML features (anchors, aliases, merge keys, tags, nesting)": 80,
    "stage file: edits of a shipped stage": 60,
    "stage file: model names": 50,
    "--set KEY.PATH=VALUE": 80,
    "stage names": 50,
    "experiment names": 50,
    "STAGE@GITREF": 60,
    "--param KEY=VALUE": 60,
    "--ttl": 60,
}
# No example database: the tests write nothing into the checkout. Our own wall-time bound replaces `deadline`.
# The function-scoped fixture is the reset of the stage files before each test, which examples do themselves.
FUZZ = settings(deadline=None, database=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
SHIPPED = ("base.yaml", "dev.yaml", "staging.yaml", "prod.yaml")
# What a valid `mlops exp up`/`exp down` meets next without a Pulumi CLI or passphrase: one line, exit 1.
DEV_MODELS = tuple(load_stages(["dev"])[0].models)
"""The models of dev, the stage experiments copy, as shipped."""
PULUMI_STEP = re.compile(r"error: (the Pulumi CLI is not installed|set PULUMI_CONFIG_PASSPHRASE)")

# Command-line arguments as a process receives them: any character but NUL, and undecodable bytes as the
# lone surrogates of Python's surrogateescape.
ARGUMENT_TEXT = st.text(st.one_of(st.characters(blacklist_characters="\x00"),
                                  st.sampled_from([chr(code) for code in range(0xDC80, 0xDD00)])), max_size=80)


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    seconds: float


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project, committed to its own git repository, as the current directory."""
    root = tmp_path_factory.mktemp("fuzz") / "project"
    root.mkdir()
    shutil.copy2(CHECKOUT / "Pulumi.yaml", root / "Pulumi.yaml")
    for folder in ("environments", "images", "models"):
        shutil.copytree(CHECKOUT / folder, root / folder, ignore=shutil.ignore_patterns("wheels", "__pycache__"))
    git = ["git", "-C", str(root), "-c", "user.name=fuzz", "-c", "user.email=fuzz@example.invalid"]
    subprocess.run([*git, "init", "--quiet"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "fuzz"], check=True)
    previous = Path.cwd()
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(previous)


@pytest.fixture(scope="module")
def shipped(project) -> dict[str, bytes]:
    return {name: (project / "environments" / name).read_bytes() for name in SHIPPED}


@pytest.fixture(autouse=True)
def shipped_stage_files(project, shipped) -> None:
    """Each test starts from the shipped stage files, whatever the one before left; the examples of a stage file
    property rewrite them each time."""
    for name, content in shipped.items():
        (project / "environments" / name).write_bytes(content)


def fuzz(surface: str) -> settings:
    return settings(FUZZ, max_examples=EXAMPLES[surface])


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {path.relative_to(folder).as_posix(): (path.lstat().st_size, path.lstat().st_mtime_ns)
            for path in folder.rglob("*")}


def run(project: Path, *args: str) -> Outcome:
    """`mlops ARGS` in this process, as a user runs it: exit code, stdout, stderr and wall time. Asserts that
    nothing in the project was written."""
    out, err = io.StringIO(), io.StringIO()
    environment = {"PULUMI_BACKEND_URL": f"file://{project.parent / 'no-backend'}", "USER": "fuzz"}
    before = snapshot(project)
    started = time.perf_counter()
    with mock.patch.object(sys, "argv", ["mlops", *args]), mock.patch.dict(os.environ, environment), \
            redirect_stdout(out), redirect_stderr(err):
        os.environ.pop("PULUMI_CONFIG_PASSPHRASE", None)
        os.environ.pop("PULUMI_CONFIG_PASSPHRASE_FILE", None)
        try:
            cli.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    seconds = time.perf_counter() - started
    assert snapshot(project) == before, "the command wrote into the project"
    assert not (project.parent / "no-backend").exists(), "the command created a Pulumi backend"
    return Outcome(code, out.getvalue(), err.getvalue(), seconds)


def assert_verdict(outcome: Outcome, *, names: str | re.Pattern, ok_codes: tuple[int, ...] = (0,)) -> None:
    """Exit with one of `ok_codes` and nothing on stderr, or exit 2 with one line on stderr that starts by
    naming the input; always within WALL_SECONDS and without a traceback."""
    assert outcome.seconds <= WALL_SECONDS, f"took {outcome.seconds:.1f} s"
    assert "Traceback" not in outcome.err
    if outcome.code in ok_codes:
        assert outcome.err == ""
        return
    assert outcome.code == 2, outcome
    assert outcome.err.endswith("\n") and outcome.err.count("\n") == 1, outcome.err
    if isinstance(names, str):
        assert outcome.err.startswith(names), outcome.err
    else:
        assert names.match(outcome.err), outcome.err


def write_stage_file(project: Path, shipped: dict[str, bytes], name: str, content: bytes) -> None:
    """The shipped stage files with `name` replaced by `content`."""
    for shipped_name, shipped_content in shipped.items():
        (project / "environments" / shipped_name).write_bytes(content if shipped_name == name else shipped_content)


def check_stage_file(project: Path, shipped: dict[str, bytes], name: str, content: bytes) -> None:
    write_stage_file(project, shipped, name, content)
    assert_verdict(run(project, "validate"), names=f"error: {project / 'environments'}/")


# --- stage files ------------------------------------------------------------------------------------------

def alias_bomb(levels: int, width: int) -> str:
    """Billion laughs: each level lists `width` aliases of the one before, so `levels` lines expand to
    width ** levels values."""
    lines = ["labels: &l0 [lol, lol]"]
    lines += [f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]" for level in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


WORST_STAGE_FILES = {
    "alias bomb: 9 levels of 9 aliases (387 million values)": alias_bomb(9, 9).encode(),
    "merge-key bomb": ("a0: &a0 {k0: 1}\n" + "".join(
        f"a{n}: &a{n} {{<<: [{', '.join([f'*a{n - 1}'] * 8)}], k{n}: 1}}\n" for n in range(1, 12))).encode(),
    "scalar just under the size cap": b"labels:\n  owner: " + b"x" * (MAX_FILE_BYTES - 64) + b"\n",
    "8 MiB scalar": b"labels:\n  owner: " + b"x" * (8 << 20) + b"\n",
    "100000 nested flow sequences": b"serving: " + b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "20000 nested flow mappings": b"serving: " + b"{a: " * 20_000 + b"1" + b"}" * 20_000 + b"\n",
    "600 nested block mappings": "".join(f"{'  ' * depth}k:\n" for depth in range(600)).encode(),
    "250000 list items": b"- 1\n" * 250_000,
    "80000 keys": "".join(f"k{n}: {n}\n" for n in range(80_000)).encode(),
    "integer of 100000 digits": b"serving:\n  replicas: " + b"9" * 100_000 + b"\n",
    "hex integer of 100000 digits": b"serving:\n  replicas: 0x" + b"f" * 100_000 + b"\n",
}

PLAIN_SCALARS = st.sampled_from([
    "1", "-1", "0", "3", "1.5", "0.05", "1e400", "-.inf", ".nan", "0x1F", "0o17", "1_000", "9" * 30, "true",
    "false", "yes", "on", "~", "null", "latest", "2001-12-14", "2001-13-45", "2001-12-14t21:59:43.10-05:00",
    "images/training", "../../etc", "/etc", "unix:///var/run/docker.sock", "ssh://", "tcp://[::1", "ssh://h:x",
    "tcp://h:99999",
    "localhost:5201/prod/serving@sha256:" + "a" * 64, "x" * 300, "a: b", "- x", "'", '"', "#", "&", "*", "!",
    "|", ">", "%", "@", "`", "[", "]", "{", "}", ",", "?", ":",
])
TAGS = st.sampled_from([
    "!!python/object/apply:os.system", "!!python/name:os.system", "!!binary", "!!set", "!!omap", "!!pairs",
    "!!timestamp", "!!str", "!!int", "!!float", "!!bool", "!!null", "!!map", "!!seq", "!foo", "!",
    "!<tag:yaml.org,2002:str>", "!e!x",
])
SPEC_KEYS = st.sampled_from([
    "serving", "replicas", "limits", "cpus", "memory_mb", "labels", "owner", "cost_centre", "release", "model",
    "name", "version", "sha256", "images", "training", "build", "docker", "url", "port", "host_port",
    "bind_address", "public", "image", "ref", "gates", "min_metrics", "parity", "may_differ", "traffic", "green",
    "blue", "artifact_store", "protect", "models", "iris-classifier", "sampling", "batching", "<<", "? x", "1",
    "null", "true", "", "é", "k\u2028",
])


def quoted(text: str) -> str:
    return json.dumps(text) if len(text) % 2 else "'" + text.replace("'", "''") + "'"


@st.composite
def yaml_documents(draw) -> bytes:
    """Stage-file-shaped YAML in flow style, so any feature composes anywhere: anchors and aliases (defined or
    not, recursive or not), merge keys, tags, quoting, deep nesting and long scalars."""
    anchors: list[str] = []

    def node(depth: int) -> str:
        kind = draw(st.sampled_from(["scalar", "scalar", "quoted", "seq", "map", "alias", "anchor", "tag",
                                     "merge", "deep", "long"]))
        if kind == "scalar" or (depth > 4 and kind in ("seq", "map", "anchor", "tag", "merge")):
            return draw(PLAIN_SCALARS)
        if kind == "quoted":
            return quoted(draw(st.text(max_size=20)))
        if kind == "seq":
            return "[" + ", ".join(node(depth + 1) for _ in range(draw(st.integers(0, 3)))) + "]"
        if kind == "map":
            return "{" + ", ".join(f"{draw(SPEC_KEYS)}: {node(depth + 1)}" for _ in range(draw(st.integers(0, 3)))) + "}"
        if kind == "alias":
            return "*" + (draw(st.sampled_from(anchors)) if anchors and draw(st.booleans()) else "nowhere")
        if kind == "anchor":
            name = f"a{len(anchors)}"
            value = node(depth + 1)
            anchors.append(name)
            return f"&{name} {value}"
        if kind == "tag":
            return f"{draw(TAGS)} {node(depth + 1)}"
        if kind == "merge":
            source = "*" + draw(st.sampled_from(anchors)) if anchors else "{replicas: 2}"
            return "{<<: " + source + f", {draw(SPEC_KEYS)}: {node(depth + 1)}}}"
        if kind == "deep":
            levels = draw(st.integers(1, 2000))
            return "[" * levels + "]" * levels
        return "x" * draw(st.integers(1000, 2 * MAX_FILE_BYTES))

    lines = [f"{draw(SPEC_KEYS)}: {node(0)}" for _ in range(draw(st.integers(1, 6)))]
    header = draw(st.sampled_from(["", "---\n", "%YAML 1.1\n---\n", "%TAG !e! tag:example.com,2000:\n---\n",
                                   "\ufeff", "--- !!map\n"]))
    footer = draw(st.sampled_from(["", "...\n", "---\nsecond: document\n", "# comment\n"]))
    return (header + "\n".join(lines) + "\n" + footer).encode()


@fuzz("stage file: any bytes")
@given(name=st.sampled_from(SHIPPED), content=st.binary(max_size=4000))
@example(name="prod.yaml", content=b"\xff\xfe")
@example(name="base.yaml", content=b"a: \x00")
def test_stage_file_of_any_bytes(project, shipped, name, content):
    check_stage_file(project, shipped, name, content)


@fuzz("stage file: text in any encoding")
@given(name=st.sampled_from(SHIPPED), encoding=st.sampled_from(["utf-16", "utf-32", "utf-8-sig", "latin-1", "cp1252"]),
       data=st.data())
def test_stage_file_in_any_encoding(project, shipped, name, encoding, data):
    text = shipped[name].decode() + data.draw(st.text(max_size=40))
    check_stage_file(project, shipped, name, text.encode(encoding, "replace"))


@fuzz("stage file: YAML features (anchors, aliases, merge keys, tags, nesting)")
@given(name=st.sampled_from(SHIPPED), content=yaml_documents())
@example(name="prod.yaml", content=alias_bomb(9, 9).encode())
@example(name="prod.yaml", content=b"serving: &s {replicas: *s}\n")
@example(name="prod.yaml", content=b"labels: !!python/object/apply:os.system ['touch pwned']\n")
@example(name="dev.yaml", content=b"defaults: &d {replicas: 2}\nserving: {<<: *d}\n")
def test_stage_file_with_any_yaml_feature(project, shipped, name, content):
    check_stage_file(project, shipped, name, content)


@fuzz("stage file: edits of a shipped stage")
@given(name=st.sampled_from(SHIPPED), data=st.data())
def test_stage_file_edited_anywhere(project, shipped, name, data):
    """Edits of a real spec reach the validators, not just the YAML reader: replace a span with bytes or with
    a YAML-meaningful token."""
    content = bytearray(shipped[name])
    for _ in range(data.draw(st.integers(1, 4))):
        start = data.draw(st.integers(0, len(content)))
        end = data.draw(st.integers(start, min(len(content), start + 20)))
        replacement = data.draw(st.one_of(st.binary(max_size=8), PLAIN_SCALARS.map(str.encode),
                                          TAGS.map(lambda tag: tag.encode() + b" ")))
        content[start:end] = replacement
    check_stage_file(project, shipped, name, bytes(content))


@fuzz("stage file: model names")
@given(model_name=st.one_of(st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,70}", fullmatch=True), ARGUMENT_TEXT))
@example(model_name="iris-classifier\n")
@example(model_name="x" * 40)
@example(model_name="x" * 41)
@example(model_name="Iris-classifier")
@example(model_name="iris_classifier")
@example(model_name="iris-classifier-")
@example(model_name="1-classifier")
@example(model_name="diabetes-regressor")
def test_model_names(project, shipped, model_name):
    dev = yaml.safe_load(shipped["dev.yaml"])
    dev["models"] = {model_name: {"release": {"version": "latest"}}}
    write_stage_file(project, shipped, "dev.yaml", yaml.safe_dump(dev, allow_unicode=False).encode())
    outcome = run(project, "validate", "dev")
    assert_verdict(outcome, names=f"error: {project / 'environments'}/dev.yaml")
    # A model name is a DNS label of at most 40 characters (mlops_spec.models.ModelName): it names containers,
    # services and images.
    well_formed = re.fullmatch(r"[a-z]([a-z0-9-]{0,38}[a-z0-9])?", model_name) is not None
    # dev builds the model's images from its project, so a well-formed name must also name a project.
    has_project = well_formed and (project / "models" / model_name / "mlops-model.yaml").is_file()
    assert (outcome.code == 0) == has_project, outcome.err
    if not well_formed:
        assert "is not a model name" in outcome.err
    elif not has_project:
        assert f"models/{model_name}/mlops-model.yaml does not exist" in outcome.err


# --- command-line arguments -------------------------------------------------------------------------------

SET_PATHS = st.sampled_from([
    "serving.replicas", "serving.limits.cpus", "serving.limits", "training.gpu", "release.model.name",
    "release.model.version", "serving.green", "gates.min_metrics.accuracy", "models.iris-classifier.release.version",
    "models.iris-classifier.green", "models.iris-classifier.gates.min_metrics.accuracy", "models.Iris.replicas",
    "models.iris-classifier.sampling.fraction", "labels.owner", "docker.url",
    "serving.port.host_port", "experiment.owner", "stage", "serving..replicas", ".", "", "serving.replicas.x",
])


@fuzz("--set KEY.PATH=VALUE")
@given(assignment=st.one_of(
    ARGUMENT_TEXT,
    st.tuples(SET_PATHS, st.one_of(PLAIN_SCALARS, ARGUMENT_TEXT, yaml_documents().map(bytes.decode))).map("=".join),
))
@example(assignment="serving.replicas=" + alias_bomb(9, 9).replace("\n", " "))
@example(assignment="serving.replicas=[" + "[" * 100_000 + "]" * 100_000 + "]")
@example(assignment="serving.replicas=" + "9" * 100_000)
@example(assignment="serving.replicas=2001-12-14")
@example(assignment="gates.min_metrics.accuracy=.nan")
@example(assignment="models.iris-classifier.gates.min_metrics.accuracy=.nan")
@example(assignment="serving.replicas=2")
def test_set_overrides(project, assignment):
    outcome = run(project, "exp", "up", "--ttl=8h", f"--set={assignment}", "--", "fuzz")
    if outcome.code == 1:
        assert PULUMI_STEP.match(outcome.err) and outcome.err.count("\n") == 1, outcome.err
        assert outcome.seconds <= WALL_SECONDS
        return
    assert_verdict(outcome, names=re.compile(rf"error: (--set |{re.escape(str(project))}/environments/)"))


@fuzz("stage names")
@given(stage=st.one_of(ARGUMENT_TEXT, st.from_regex(r"[a-z][a-z0-9-]{0,70}", fullmatch=True),
                       st.sampled_from(["dev", "staging", "prod", "base", "../environments/prod", "prod.yaml",
                                        "prod\n", "PROD", "exp-x"])))
def test_stage_names(project, stage):
    shipped_stage = stage in ("dev", "staging", "prod")
    validated = run(project, "validate", "--", stage)
    assert_verdict(validated, names=f"error: {project / 'environments'}")
    assert (validated.code == 0) == shipped_stage, validated
    # parity exits 1 when the stages differ beyond what base.yaml allows.
    compared = run(project, "parity", "--", stage, "dev" if stage != "dev" else "prod")
    assert_verdict(compared, names=f"error: {project / 'environments'}", ok_codes=(0, 1))
    assert (compared.code != 2) == shipped_stage, compared


@fuzz("experiment names")
@given(name=st.one_of(ARGUMENT_TEXT, st.from_regex(r"[a-z][a-z0-9-]{0,50}", fullmatch=True)))
@example(name="my-idea\n")
@example(name="../../tmp/x")
@example(name="a" + "0" * 31)  # of the right form, but the longer model's replica names would not fit
def test_experiment_names(project, name):
    valid = len(name) <= 42 and re.fullmatch(r"[a-z]([a-z0-9-]*[a-z0-9])?", name) is not None
    # A name of the right form still leaves too little room for the replica names of a long model name of dev,
    # the stage an experiment copies: `exp up` refuses it naming that model, `exp down` needs no spec.
    too_long = [model for model in DEV_MODELS if len(f"exp-{name}-{model}-green-15") > 63]
    for command in (["exp", "up", "--", name], ["exp", "down", "--", name]):
        outcome = run(project, *command)
        if valid and too_long and command[1] == "up":
            assert_verdict(outcome, names=re.compile(
                rf"error: {re.escape(str(project))}/environments/dev\.yaml:\d+: models\.({'|'.join(too_long)}): "
                r"replica names such as \S+ would be longer than 63 characters"))
        elif valid:
            assert outcome.code == 1 and PULUMI_STEP.match(outcome.err) and outcome.err.count("\n") == 1, outcome
        else:
            assert_verdict(outcome, names="error: experiment name: ")
    outcome = run(project, "train", f"--stage=exp-{name}")
    assert_verdict(outcome, names="error: experiment name: " if not valid else f"error: {project}/Pulumi.exp-")


GIT_REVISIONS = st.one_of(
    ARGUMENT_TEXT,
    st.sampled_from(["HEAD", "HEAD~1", "HEAD^", "HEAD^{commit}", "HEAD^{/fuzz}", "HEAD@{0}", "@{-1}", "main",
                     "--output=/tmp/pwned", "-h", "HEAD:environments", "HEAD..HEAD", "0" * 40, "x" * 300]),
)


@fuzz("STAGE@GITREF")
@given(text=st.one_of(ARGUMENT_TEXT, st.tuples(st.sampled_from(["prod", "dev", "", "base", "x/y"]),
                                               GIT_REVISIONS).map("@".join)))
@example(text="prod@HEAD")
@example(text="prod@--output=/tmp/pwned")
def test_stage_at_git_revision(project, text):
    outcome = run(project, "diff", "--format=json", "--", text, "prod")
    # Named: the argument itself, the repository git was asked about, or the file at that revision.
    revision = text.partition("@")[2]
    names = (f"error: '{one_line(excerpt(text))}'", f"error: {project}", f"error: {one_line(revision)}:")
    # The work tree is the commit, so prod at any revision that resolves is prod: identical, exit 0; dev differs.
    assert_verdict(outcome, names=re.compile("|".join(re.escape(name) for name in names)), ok_codes=(0, 1))


@fuzz("--param KEY=VALUE")
@given(params=st.lists(st.one_of(ARGUMENT_TEXT, st.tuples(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
                                                          ARGUMENT_TEXT).map("=".join)), max_size=3))
@example(params=["n_estimators=" + "9" * 200_000])
@example(params=["max_depth=3", "max_depth=4"])
def test_train_params(project, params):
    # A stage that does not exist: valid parameters get as far as loading it, and never reach Docker.
    outcome = run(project, "train", "--stage=nostage", *[f"--param={param}" for param in params])
    assert_verdict(outcome, names=re.compile(rf"error: (--param |{re.escape(str(project))}/environments/nostage)"),
                   ok_codes=())


TTL_TEXT = st.from_regex(r"([0-9]{1,12}d)?([0-9]{1,12}h)?([0-9]{1,12}m)?", fullmatch=True)


@fuzz("--ttl")
@given(ttl=st.one_of(ARGUMENT_TEXT, TTL_TEXT, st.tuples(TTL_TEXT, ARGUMENT_TEXT).map("".join)))
@example(ttl="9" * 100_000 + "d")
@example(ttl="８h")
@example(ttl="8h\n")
def test_ttls(project, ttl):
    outcome = run(project, "exp", "up", f"--ttl={ttl}", "--", "fuzz")
    if outcome.code == 1:
        assert PULUMI_STEP.match(outcome.err) and outcome.err.count("\n") == 1, outcome.err
        return
    assert_verdict(outcome, names="error: --ttl: ")


# --- the bounds, on the worst cases -------------------------------------------------------------------------

WORST_ARGUMENTS = {
    "--set alias bomb": ["exp", "up", "--set=serving.replicas=" + alias_bomb(9, 9).replace("\n", " "), "--", "x"],
    "--set 100000 nested lists": ["exp", "up", "--set=serving.replicas=" + "[" * 100_000 + "]" * 100_000, "--", "x"],
    "--set value over the size cap": ["exp", "up", "--set=labels.owner=" + "x" * (MAX_FILE_BYTES + 1), "--", "x"],
    "--ttl of 100000 digits": ["exp", "up", "--ttl=" + "9" * 100_000 + "d", "--", "x"],
    "--param of 100000 characters": ["train", "--stage=nostage", "--param=n=" + "9" * 100_000],
}


@pytest.mark.parametrize("case", sorted(WORST_STAGE_FILES))
def test_worst_stage_files_take_bounded_time(project, shipped, case):
    write_stage_file(project, shipped, "prod.yaml", WORST_STAGE_FILES[case])
    outcome = run(project, "validate", "prod")
    assert outcome.code == 2
    assert_verdict(outcome, names=f"error: {project / 'environments'}/")


MEMORY_PROBE = """
import json, resource, sys
limit = int(sys.argv[1]) << 20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from mlops import cli
for stage_file, target, arguments in json.load(open(sys.argv[2])):
    if stage_file:
        open(target, "wb").write(open(stage_file, "rb").read())
    sys.argv = ["mlops", *arguments]
    try:
        cli.main()
    except SystemExit:
        pass
"""


def test_worst_cases_stay_within_the_memory_bound(project, shipped, tmp_path):
    """Every worst case in one process limited to MEMORY_MB of address space: a MemoryError would end it with
    a traceback, an unbounded expansion would end it by the timeout."""
    cases = []
    for content in WORST_STAGE_FILES.values():
        (tmp_path / f"{len(cases)}.yaml").write_bytes(content)
        cases.append((str(tmp_path / f"{len(cases)}.yaml"), str(project / "environments" / "prod.yaml"),
                      ["validate", "prod"]))
    cases += [(None, None, arguments) for arguments in WORST_ARGUMENTS.values()]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PULUMI_CONFIG_PASSPHRASE")}
    probe = subprocess.run([sys.executable, "-P", "-c", MEMORY_PROBE, str(MEMORY_MB), str(tmp_path / "cases.json")],
                           check=False, cwd=project, capture_output=True, text=True, timeout=WALL_SECONDS * len(cases),
                           env={**environment, "PULUMI_BACKEND_URL": f"file://{tmp_path / 'no-backend'}"})
    assert probe.returncode == 0, probe.stderr[-2000:]
    lines = probe.stderr.splitlines()
    assert len(lines) == len(cases) and all(line.startswith("error: ") for line in lines), probe.stderr[-2000:]


@pytest.mark.parametrize("case", sorted(WORST_ARGUMENTS))
def test_worst_arguments_take_bounded_time(project, case):
    outcome = run(project, *WORST_ARGUMENTS[case])
    assert outcome.code == 2 and outcome.err.count("\n") == 1, outcome
    assert outcome.seconds <= WALL_SECONDS


def test_the_reliability_table_lists_these_case_counts():
    document = (CHECKOUT / "docs" / "reliability.md").read_text()
    section = document.split("\n## Input surfaces\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (.+?) \| (\d+) \|", section, re.MULTILINE))
    assert {surface: int(count) for surface, count in rows.items()} == EXAMPLES
