"""Experiments: short-lived stacks `exp-NAME` copied from a stage, with overrides and a time to live.

An experiment's settings live in its stack's Pulumi config `mlops:experiment`, so every `pulumi up`
rebuilds the same spec: the source stage's files (base + stage) deep-merged with the `--set`
overrides, every host port left to Docker (experiments never collide with each other or with a
stage; endpoints come back as stack outputs), unprotected volumes (experiments are disposable), and
the experiment's name, owner and expiry, which label everything it creates. Experiments are validated like stages; prod-only rules do not apply.

Names: physical names are `exp-NAME<suffix>`, and container names are also DNS hostnames on the stack
network, so they must fit a DNS label of 63 characters. The longest suffixes are a model's replicas,
`-<model>-green-15` (16 replicas at most), which the stage rules check for each model the experiment copies
(mlops_spec/rules.py); a name leaves room for the longest fixed suffix of 17 characters:
63 - len("exp-") - 17 = 42.
"""
from __future__ import annotations

import json
import math
import re
import types
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping, Optional, Union, get_args, get_origin

from pydantic import BaseModel

from mlops_spec.errors import SpecError, excerpt
from mlops_spec.loading import load_stage, stage_names
from mlops_spec.models import DNS_LABEL, ExperimentInfo, StageSpec
from mlops_spec.project import project_root
from mlops_spec.yamlsource import deep_merge, load_yaml_scalar, load_yaml_source

EXPERIMENT_CONFIG_KEY = "experiment"
"""Where an experiment's settings live: the Pulumi config key `mlops:experiment` of its stack."""

EXPERIMENT_PREFIX = "exp-"
MAX_NAME_LENGTH = 42
DEFAULT_SOURCE = "dev"
DEFAULT_TTL = "8h"
MIN_TTL = timedelta(minutes=10)
MAX_TTL = timedelta(days=7)
TTL_PATTERN = re.compile(r"(?:(?P<days>[0-9]+)d)?(?:(?P<hours>[0-9]+)h)?(?:(?P<minutes>[0-9]+)m)?")
# No time to live within MAX_TTL needs more digits; int() of thousands of digits would not even finish.
MAX_TTL_DIGITS = 6
RESERVED_KEYS = ("stage", "kind", "promote_from", "experiment")
PUBLISHED_PORTS = ("model_registry.port", "image_registry.port", "serving.port")
UNPROTECTED = "artifact_store.protect"


def experiment_stack(name: str) -> str:
    return f"{EXPERIMENT_PREFIX}{name}"


def check_name(name: str) -> None:
    if len(name) > MAX_NAME_LENGTH or not DNS_LABEL.fullmatch(name):
        raise SpecError(file="experiment name", field="",
                        message=f"'{excerpt(name)}' must be a DNS label of at most {MAX_NAME_LENGTH} characters: lowercase "
                                "letters, digits and '-', starting with a letter and not ending with '-'")


def parse_ttl(text: str) -> timedelta:
    """`30m`, `8h`, `2d` or combinations in that order such as `1h30m`, between 10 minutes and 7 days."""
    match = TTL_PATTERN.fullmatch(text.strip())
    if not text.strip() or match is None:
        raise SpecError(file="--ttl", field="", message=f"'{excerpt(text)}' is not a duration; use e.g. 30m, 8h, 2d "
                                                        "or 1h30m")
    amounts = match.groupdict(default="0")
    if any(len(amount.lstrip("0")) > MAX_TTL_DIGITS for amount in amounts.values()):
        ttl = None
    else:
        ttl = timedelta(**{unit: int(amount) for unit, amount in amounts.items()})
    if ttl is None or not MIN_TTL <= ttl <= MAX_TTL:
        raise SpecError(file="--ttl", field="", message=f"'{excerpt(text)}' is outside the allowed range of 10m to 7d")
    return ttl


def format_utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(text: str, where: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        moment = None
    if moment is None or moment.tzinfo is None:
        raise SpecError(file=where, field="", message=f"'{text}' is not an ISO-8601 time with a UTC offset")
    return moment.astimezone(timezone.utc)


def is_expired(info: ExperimentInfo, now: datetime) -> bool:
    return parse_utc(info.expires_at, "expires_at") <= now


def _model_in(annotation: Any) -> Optional[type[BaseModel]]:
    """The spec model an annotation holds (`Limits`, `Optional[GreenRelease]`), if any."""
    for candidate in get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _why_managed(parts: list[str]) -> Optional[str]:
    """Why `mlops exp` decides this setting itself, or None when an override may set it."""
    if parts[0] in RESERVED_KEYS:
        return "stage, kind and experiment are set by `mlops exp`"
    if parts[-1] == "host_port":
        return "experiments let Docker choose host ports, so they never collide"
    if ".".join(parts) == UNPROTECTED:
        return "experiment volumes are never protected, so `mlops exp down` and `gc` can always delete them"
    return None


def check_override_path(path: str, value: Any) -> None:
    """`path` must name a setting of the stage spec; groups of settings may only be cleared (null)."""
    where = f"--set {excerpt(path)}"
    parts = path.split(".")
    if "" in parts:
        raise SpecError(file=where, field="", message="empty key in the path; use dotted keys like serving.replicas")
    reason = _why_managed(parts)
    if reason is not None:
        raise SpecError(file=where, field="", message=f"not settable: {reason}")
    node: Any = StageSpec
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth])
        if isinstance(node, type) and issubclass(node, BaseModel):
            allowed = [key for key in sorted(node.model_fields) if depth or key not in RESERVED_KEYS]
            if part not in node.model_fields:
                under = f" under {here}" if here else ""
                raise SpecError(file=where, field="", message=f"unknown key '{excerpt(part)}'{under}; allowed: "
                                                              f"{', '.join(allowed)}")
            annotation = node.model_fields[part].annotation
        elif get_origin(node) is dict:
            annotation = get_args(node)[1]
        else:
            raise SpecError(file=where, field="", message=f"{here} is a single value; it has no key '{excerpt(part)}'")
        node = _model_in(annotation) or annotation
    if isinstance(node, type) and issubclass(node, BaseModel) and value is not None:
        raise SpecError(file=where, field="", message=f"{path} is a group of settings; set one of its keys "
                                                      f"({', '.join(sorted(node.model_fields))}) or clear it with null")


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """`key.path=value` pairs, each value read as a YAML scalar (`2` an integer, `1.5` a float, `null`)."""
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        path, equals, text = assignment.partition("=")
        path = path.strip()
        if not equals or not path:
            raise SpecError(file=f"--set {excerpt(assignment)}", field="",
                            message="expected key.path=value, e.g. serving.replicas=2")
        where = f"--set {excerpt(path)}"
        value = load_yaml_scalar(text, where) if text.strip() else None
        if isinstance(value, (dict, list)):
            raise SpecError(file=where, field="", message=f"'{excerpt(text)}' is not a single value; use a number, "
                                                          "a string, true/false or null")
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(file=where, field="", message=f"'{excerpt(text)}' is not a finite number")
        check_override_path(path, value)
        overrides[path] = value
    return overrides


def _nest(overrides: Mapping[str, Any]) -> dict:
    nested: dict = {}
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(file=f"--set {path}", field="", message=f"conflicts with --set {part}=null")
        if isinstance(node.get(leaf), dict):
            raise SpecError(file=f"--set {path}", field="", message="conflicts with a --set of one of its keys")
        node[leaf] = value
    return nested


@dataclass(frozen=True)
class ExperimentSettings:
    """What `mlops exp up` stores in the stack config `mlops:experiment` (a JSON object)."""

    name: str
    owner: str
    created_at: str
    expires_at: str
    ttl: str = DEFAULT_TTL
    source: str = DEFAULT_SOURCE
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, name: str, owner: str, now: datetime, ttl: str = DEFAULT_TTL, source: str = DEFAULT_SOURCE,
            assignments: Optional[list[str]] = None) -> "ExperimentSettings":
        settings = cls(name=name, owner=owner.strip(), created_at=format_utc(now),
                       expires_at=format_utc(now + parse_ttl(ttl)), ttl=ttl, source=source,
                       overrides=parse_overrides(assignments or []))
        settings.check()
        return settings

    @classmethod
    def from_config(cls, stack: str, raw: Any) -> "ExperimentSettings":
        where = f"Pulumi.{stack}.yaml"
        kinds = {item.name: dict if item.name == "overrides" else str for item in fields(cls)}
        required = {"name", "owner", "created_at", "expires_at"}
        if not isinstance(raw, dict) or not required <= raw.keys():
            raise SpecError(file=where, field="mlops:experiment",
                            message="must be a JSON object with name, owner, created_at and expires_at "
                                    "(written by `mlops exp up`)")
        for key, value in raw.items():
            if key not in kinds:
                raise SpecError(file=where, field=f"mlops:experiment.{key}",
                                message=f"unknown key; allowed: {', '.join(sorted(kinds))}")
            if not isinstance(value, kinds[key]):
                raise SpecError(file=where, field=f"mlops:experiment.{key}",
                                message=f"must be a {'JSON object' if kinds[key] is dict else 'string'}, got {value!r}")
        settings = cls(**raw)
        if stack != experiment_stack(settings.name):
            raise SpecError(file=where, field="mlops:experiment.name",
                            message=f"names experiment '{settings.name}', but the stack is '{stack}'")
        settings.check()
        return settings

    def check(self) -> None:
        check_name(self.name)
        if not self.owner or any(not char.isprintable() for char in self.owner):
            raise SpecError(file="--owner", field="", message=f"{self.owner!r} is not a usable owner; use a name or email")
        if self.source not in stage_names():
            raise SpecError(file="--from", field="", message=f"'{excerpt(self.source)}' is not a stage; use one of "
                                                             f"{', '.join(stage_names())}")
        parse_ttl(self.ttl)
        if parse_utc(self.expires_at, "expires_at") <= parse_utc(self.created_at, "created_at"):
            raise SpecError(file="expires_at", field="", message=f"{self.expires_at} is not after created_at {self.created_at}")
        for path, value in self.overrides.items():
            check_override_path(path, value)

    def info(self) -> ExperimentInfo:
        return ExperimentInfo(name=self.name, owner=self.owner, source_stage=self.source,
                              created_at=self.created_at, expires_at=self.expires_at)

    def to_config(self) -> dict[str, Any]:
        return asdict(self)


def _blame_override(err: SpecError, overrides: Mapping[str, Any]) -> SpecError:
    """Name the `--set` a failure comes from: the override sharing the longest path with the failing field."""
    failing = err.field.split(".") if err.field else []

    def shared(path: str) -> int:
        count = 0
        for mine, theirs in zip(path.split("."), failing):
            if mine != theirs:
                break
            count += 1
        return count

    culprit = max(overrides, key=shared, default=None)
    if culprit is None or shared(culprit) == 0:
        return err
    return SpecError(file=f"--set {culprit}", field="" if err.field == culprit else err.field, message=err.message)


def experiment_spec(stack: str, settings: Any, environments: Optional[Path] = None) -> StageSpec:
    """The validated spec of experiment stack `stack` from its `mlops:experiment` config."""
    parsed = ExperimentSettings.from_config(stack, settings)
    managed = _nest({**{f"{port}.host_port": None for port in PUBLISHED_PORTS}, UNPROTECTED: False})
    managed["experiment"] = parsed.info().model_dump()
    try:
        return load_stage(stack, environments, overrides=deep_merge(_nest(parsed.overrides), managed),
                          source_stage=parsed.source)
    except SpecError as err:
        raise _blame_override(err, parsed.overrides) from None


def settings_from_json(where: str, text: str) -> Any:
    """The settings `exp up` stored as a JSON string (Pulumi config values are strings)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        # Besides malformed JSON: integers of more than 4300 digits, and nesting deeper than Python recurses.
        reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err).split(":")[0]
        raise SpecError(file=where, field=f"mlops:{EXPERIMENT_CONFIG_KEY}",
                        message=f"not the JSON object `mlops exp up` writes ({reason})") from None


def experiment_spec_from_stack_file(stack: str, project_dir: Optional[Path] = None,
                                    environments: Optional[Path] = None) -> StageSpec:
    """The spec of an experiment from the stack config file `mlops exp up` wrote (`Pulumi.exp-NAME.yaml`),
    so commands that work beside a running experiment, like `mlops train`, need no Pulumi CLI."""
    check_name(stack.removeprefix(EXPERIMENT_PREFIX))
    file = (project_dir or project_root()) / f"Pulumi.{stack}.yaml"
    if not file.is_file():
        raise SpecError(file=file, field="", message=f"no experiment '{stack}' here; create it with "
                                                     f"`mlops exp up {stack.removeprefix('exp-')}`")
    config = load_yaml_source(file).data.get("config")
    settings = config.get(f"mlops:{EXPERIMENT_CONFIG_KEY}") if isinstance(config, dict) else None
    if settings is None:
        raise SpecError(file=file, field=f"config.mlops:{EXPERIMENT_CONFIG_KEY}",
                        message="missing: this stack was not created by `mlops exp up`")
    return experiment_spec(stack, settings_from_json(str(file), settings) if isinstance(settings, str) else settings,
                           environments)
