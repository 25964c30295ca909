"""`mlops diff`: what changes between two renderings of a stage, resource by resource and field by field.

Either side is a stage of the work tree (`prod`) or a stage as committed at a git revision
(`prod@origin/main`). Both are rendered by `mlops.plan.render`, so a diff needs no Pulumi CLI, state
or credentials, and secrets show only as `[secret]`: safe to post on a pull request.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from mlops import gitrepo
from mlops.errors import SpecError
from mlops.plan import PlannedResource, flatten, render
from mlops.spec import ENVIRONMENTS_DIR, load_stage

Status = Literal["added", "removed", "changed"]
MARKS: dict[Status, str] = {"changed": "~", "added": "+", "removed": "-"}


class _Absent:
    """The value of a field on the side of a diff that lacks it (distinct from a field set to null)."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT: Any = _Absent()


@dataclass(frozen=True)
class StageRef:
    """`STAGE` (the work tree) or `STAGE@GITREF` (as committed at a revision)."""

    stage: str
    ref: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "StageRef":
        stage, _, ref = text.partition("@")
        if not stage or ("@" in text and not ref):
            raise SpecError(file=text, field="", message="expected STAGE or STAGE@GITREF, e.g. prod or prod@origin/main")
        return cls(stage=stage, ref=ref or None)

    def __str__(self) -> str:
        return f"{self.stage}@{self.ref}" if self.ref else self.stage


@dataclass(frozen=True)
class FieldChange:
    path: str
    before: Any
    after: Any

    def to_json(self) -> dict[str, Any]:
        sides = {"before": self.before, "after": self.after}
        return {"path": self.path, **{side: value for side, value in sides.items() if value is not ABSENT}}


@dataclass(frozen=True)
class ResourceChange:
    status: Status
    type: str
    name: str
    fields: tuple[FieldChange, ...]

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "type": self.type, "name": self.name,
                "fields": [change.to_json() for change in self.fields]}


@dataclass(frozen=True)
class StackDiff:
    before: str
    after: str
    changes: list[ResourceChange]
    unchanged: int = 0

    @property
    def counts(self) -> dict[str, int]:
        return {status: sum(change.status == status for change in self.changes) for status in MARKS}

    @property
    def differs(self) -> bool:
        return bool(self.changes)

    def summary(self) -> str:
        if not self.differs:
            return f"no differences between {self.before} and {self.after} ({self.unchanged} resources)"
        counts = ", ".join(f"{count} {status}" for status, count in self.counts.items())
        return f"{self.before} → {self.after}: {counts}, {self.unchanged} unchanged"

    def to_json(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after, "differs": self.differs, "counts": self.counts,
                "unchanged": self.unchanged, "changes": [change.to_json() for change in self.changes]}


def _stack_neutral(name: str, stack: str) -> str:
    """Resource names embed the stack; matching `staging-gateway` with `prod-gateway` needs them neutral."""
    return re.sub(rf"(^|-){re.escape(stack)}(-|$)", r"\1{stack}\2", name, count=1)


def resource_fields(resource: PlannedResource) -> dict[str, Any]:
    """Every comparable value of a resource by path; resource options sit under `opts.`."""
    return {**flatten(resource.inputs), "opts.parent": resource.parent, "opts.protect": resource.protect}


def _field_changes(before: dict[str, Any], after: dict[str, Any], before_stack: str = "",
                   after_stack: str = "") -> tuple[FieldChange, ...]:
    def same(path: str) -> bool:
        old, new = before.get(path, ABSENT), after.get(path, ABSENT)
        if path == "opts.parent" and isinstance(old, str) and isinstance(new, str):
            return _stack_neutral(old, before_stack) == _stack_neutral(new, after_stack)
        return old == new

    paths = list(before) + [path for path in after if path not in before]
    return tuple(FieldChange(path, before.get(path, ABSENT), after.get(path, ABSENT)) for path in paths if not same(path))


def compare(before: list[PlannedResource], after: list[PlannedResource],
            before_stack: str, after_stack: str) -> tuple[list[ResourceChange], int]:
    """Resource changes keyed by type and (stack-neutral) name, in rendering order; and how many are unchanged."""
    old = {(r.type, _stack_neutral(r.name, before_stack)): r for r in before}
    new = {(r.type, _stack_neutral(r.name, after_stack)): r for r in after}
    changes: list[ResourceChange] = []
    unchanged = 0
    for key, resource in new.items():
        if key not in old:
            changes.append(ResourceChange("added", resource.type, resource.name,
                                          _field_changes({}, resource_fields(resource))))
            continue
        fields = _field_changes(resource_fields(old[key]), resource_fields(resource), before_stack, after_stack)
        if fields:
            changes.append(ResourceChange("changed", resource.type, resource.name, fields))
        else:
            unchanged += 1
    for key, resource in old.items():
        if key not in new:
            changes.append(ResourceChange("removed", resource.type, resource.name,
                                          _field_changes(resource_fields(resource), {})))
    return changes, unchanged


def render_stage(side: StageRef, environments: Path = ENVIRONMENTS_DIR) -> list[PlannedResource]:
    """Render one side: from the work tree, or from `environments/` as committed at `side.ref`."""
    if side.ref is None:
        return render(side.stage, load_stage(side.stage, environments=environments))
    with tempfile.TemporaryDirectory(prefix="mlops-diff-") as scratch:
        folder = gitrepo.materialise(environments, side.ref, Path(scratch))
        try:
            spec = load_stage(side.stage, environments=folder)
        except SpecError as err:
            # Name the file as git does (`REF:environments/prod.yaml`), not by its temporary copy.
            err.file = f"{side.ref}:{Path(err.file).relative_to(scratch).as_posix()}"
            raise
    return render(side.stage, spec)


def diff_stages(before: StageRef, after: StageRef, environments: Path = ENVIRONMENTS_DIR) -> StackDiff:
    # `render` drives the SDK's global mock runtime, so the sides render one after the other.
    before_resources = render_stage(before, environments)
    after_resources = render_stage(after, environments)
    changes, unchanged = compare(before_resources, after_resources, before.stage, after.stage)
    return StackDiff(before=str(before), after=str(after), changes=changes, unchanged=unchanged)


def _markdown_cell(value: Any) -> str:
    if value is ABSENT:
        return ""
    text = str(value).replace("\n", " ⏎ ").replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def to_markdown(diff: StackDiff) -> str:
    """A pull-request comment: a summary line, then one table per resource (added/removed folded)."""
    lines = [f"### `mlops diff {diff.before} {diff.after}`", "", f"**{diff.summary()}**"]
    for change in diff.changes:
        lines += ["", f"#### {MARKS[change.status]} `{change.name}` ({change.status}, `{change.type}`)", ""]
        table = ["| field | before | after |", "|---|---|---|"]
        table += [f"| `{fc.path}` | {_markdown_cell(fc.before)} | {_markdown_cell(fc.after)} |" for fc in change.fields]
        if change.status == "changed":
            lines += table
        else:
            lines += [f"<details><summary>{len(change.fields)} fields</summary>", "", *table, "", "</details>"]
    return "\n".join(lines) + "\n"
