"""Loading stages: base.yaml under a stage file, validated whole, every stage of the project checked against the
others. Loading never half-succeeds: it returns fully validated specs or raises `SpecError` naming the file, the
field path, the line and what is allowed."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, get_origin

from pydantic import BaseModel, ValidationError

from mlops_spec.errors import SpecError, excerpt
from mlops_spec.models import DECLARED_KINDS, DNS_LABEL, KIND_RANK, MAX_DNS_LABEL, StageSpec
from mlops_spec.project import environments_dir, project_of, working_on
from mlops_spec.rules import check_invariants
from mlops_spec.yamlsource import YamlSource, deep_merge, load_yaml_source

BASE_FILE = "base.yaml"


def spec_error_from_validation(err: ValidationError, source: YamlSource, root: type[BaseModel] = StageSpec) -> SpecError:
    """The first problem pydantic found in `source`'s data, validated as `root`, as one SpecError."""
    first = err.errors(include_url=False)[0]
    path = tuple(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        parent = first["loc"][:-1]
        message = f"unknown key '{excerpt(path[-1])}'; allowed here: {', '.join(_allowed_keys(root, parent))}"
    elif first["type"] == "literal_error" or "Input should be" in message:
        message = f"{message} (got {excerpt(repr(first.get('input')))})"
    file, line = source.locate(path)
    return SpecError(file=file, field=".".join(excerpt(part) for part in path), message=message, line=line)


def _keys(model: type[BaseModel]) -> dict[str, Any]:
    """A model's fields by the key a file writes them as: the alias where there is one."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _allowed_keys(root: type[BaseModel], parent_loc: tuple) -> list[str]:
    model: Any = root
    names_a_key = False
    for part in parent_loc:
        # A list index, or a key of a mapping such as `models.<name>`, names an entry, not a field.
        if isinstance(part, int) or names_a_key:
            names_a_key = False
            continue
        field = _keys(model).get(part)
        if field is None:
            break
        annotation = field.annotation
        names_a_key = get_origin(annotation) is dict
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
    return sorted(_keys(model))


def build_spec(stage: str, data: dict, source: YamlSource) -> StageSpec:
    """Validate merged spec data; every failure becomes one `SpecError`."""
    try:
        spec = StageSpec.model_validate({**data, "stage": stage})
    except ValidationError as err:
        raise spec_error_from_validation(err, source) from None
    broken = check_invariants(spec)
    if broken:
        path, message = broken[0]
        file, line = source.locate(tuple(path.split(".")))
        raise SpecError(file=file, field=path, message=message, line=line)
    return spec


def check_stage_name(stage: str, where: Path | str) -> None:
    """Stage names become file names and resource names: a DNS label, never a path."""
    if len(stage) > MAX_DNS_LABEL or not DNS_LABEL.fullmatch(stage):
        raise SpecError(file=where, field="", message=f"'{excerpt(stage)}' is not a stage name: lowercase letters, "
                                                      f"digits and '-', starting with a letter, at most {MAX_DNS_LABEL} "
                                                      "characters")
    if stage == "base":
        raise SpecError(file=where, field="", message="'base' is not a stage: base.yaml holds the defaults every stage "
                                                      "shares")


def stage_names(environments: Optional[Path] = None) -> list[str]:
    """Every stage of the project: each file in environments/ but base.yaml is one, named by its file."""
    environments = environments or environments_dir()
    return sorted(path.stem for path in environments.glob("*.yaml") if path.name != BASE_FILE)


def stage_file(stage: str, environments: Optional[Path] = None) -> Path:
    environments = environments or environments_dir()
    check_stage_name(stage, environments)
    file = environments / f"{stage}.yaml"
    if not file.is_file():
        raise SpecError(file=file, field="", message=f"no stage '{stage}'; stages here: "
                                                     f"{', '.join(stage_names(environments)) or 'none'}")
    return file


def _stage_identity(base: YamlSource, own: YamlSource) -> None:
    """A stage's name is its file's, and its kind is said in its own file, never inherited from base.yaml."""
    for key in ("stage", "kind", "promote_from"):
        if key in base.data:
            raise SpecError(file=base.file, field=key, line=base.lines.get((key,)),
                            message="each stage says what it is in its own file; remove it from base.yaml")
    if "stage" in own.data:
        raise SpecError(file=own.file, field="stage", line=own.lines.get(("stage",)),
                        message="a stage is named by its file; remove this key")
    kind = own.data.get("kind")
    if kind not in DECLARED_KINDS:
        got = "missing" if "kind" not in own.data else f"got {excerpt(repr(kind))}"
        raise SpecError(file=own.file, field="kind", line=own.lines.get(("kind",)),
                        message=f"say what this stage is: dev, staging or prod ({got}; experiments are made by "
                                "`mlops exp up`, never declared)")


def load_stage(stage: str, environments: Optional[Path] = None, overrides: Optional[dict] = None,
               source_stage: Optional[str] = None) -> StageSpec:
    """Load `base.yaml` merged under the stage file, plus optional overrides; with `source_stage`, experiment
    `stage` copied from that stage's file. Build contexts are those of the project `environments` belongs to."""
    environments = environments or environments_dir()
    base = load_yaml_source(environments / BASE_FILE)
    own = load_yaml_source(stage_file(source_stage or stage, environments))
    _stage_identity(base, own)
    source = base.under(own)
    data = deep_merge(base.data, own.data)
    if source_stage is not None:
        data |= {"kind": "experiment", "promote_from": None}
    if overrides:
        data = deep_merge(data, overrides)
    with working_on(project_of(environments)):
        return build_spec(stage, data, source)


def check_promotions(specs: dict[str, StageSpec], environments: Path) -> None:
    """Every `promote_from` names a stage of this project, of the same kind or an earlier one, and following them
    from any stage ends at a stage that builds: no cycle."""
    def refuse(stage: str, problem: str) -> SpecError:
        own = load_yaml_source(stage_file(stage, environments))
        return SpecError(file=own.file, field="promote_from", line=own.lines.get(("promote_from",)), message=problem)

    for spec in specs.values():
        source = spec.promote_from
        if source is not None and source not in specs:
            raise refuse(spec.stage, f"'{excerpt(source)}' names no stage; stages here: {', '.join(sorted(specs))}")
        if source is not None and KIND_RANK[specs[source].kind] > KIND_RANK[spec.kind]:
            raise refuse(spec.stage, f"{source} is a {specs[source].kind} stage; a {spec.kind} stage is promoted from "
                                     "a stage of its own kind or an earlier one (dev, then staging, then prod)")
    for spec in specs.values():
        chain = [spec.stage]
        while (source := specs[chain[-1]].promote_from) is not None:
            if source in chain:
                raise refuse(spec.stage, f"promotions go round in a circle: {' -> '.join([*chain, source])}")
            chain.append(source)


def check_shared_host_ports(specs: list[StageSpec], environments: Optional[Path] = None) -> None:
    """Host ports must be unique across every stage that shares a Docker host."""
    environments = environments or environments_dir()
    claimed: dict[tuple[str, str, int], str] = {}
    for spec in specs:
        for path, port in spec.published_ports().items():
            if port.host_port is None:
                continue
            key = (spec.docker.url, port.bind_address, port.host_port)
            owner = claimed.get(key)
            if owner is not None:
                source = load_yaml_source(environments / "base.yaml").under(load_yaml_source(stage_file(spec.stage, environments)))
                field = f"{path}.host_port"
                file, line = source.locate(tuple(field.split(".")))
                raise SpecError(file=file, field=field, line=line,
                                message=f"host port {port.host_port} on {spec.docker.url} is already used by {owner}; "
                                        "ports must be unique across stages sharing a Docker host")
            claimed[key] = f"{spec.stage}.{path}"


def load_all_stages(environments: Optional[Path] = None) -> dict[str, StageSpec]:
    """Every stage of the project, checked against each other: promotions and host ports."""
    environments = environments or environments_dir()
    specs = {stage: load_stage(stage, environments) for stage in stage_names(environments)}
    check_promotions(specs, environments)
    check_shared_host_ports(list(specs.values()), environments)
    return specs


def load_stages(stages: list[str], environments: Optional[Path] = None) -> list[StageSpec]:
    """Load the named stages, after checking every stage of the project against the others."""
    environments = environments or environments_dir()
    for stage in stages:
        stage_file(stage, environments)
    specs = load_all_stages(environments)
    return [specs[stage] for stage in stages]
