"""`mlops diff`: what changes between two renderings of a stage, resource by resource and field by field.

Either side is a stage of the work tree (`prod`) or a stage as committed at a git revision
(`prod@origin/main`). Both are rendered by `mlops.plan.render`, so a diff needs no Pulumi CLI, state
or credentials, and secrets show only as `[secret]`: safe to post on a pull request.

Each changed resource also says what the provider will do with it, by the tables of
`mlops.replacements`: update it in place or replace it, and which fields force the replacement. A
replaced or deleted data volume or protected resource is flagged, since replacing a Docker volume
deletes its data; so is a replacement that would fail on its own name: one created before the old resource
is deleted (not delete-before-replace, or a new URN) of a type whose names the engine keeps unique, under
the same fixed name.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from mlops import gitrepo
from mlops.plan import PlannedResource, flatten, render, update_policy
from mlops.replacements import RULES, VOLUME_TYPE, Rules, prefixes, schema_path
from mlops_spec.contract import SECRET_FILES_SUFFIX
from mlops_spec.errors import SpecError, excerpt
from mlops_spec.loading import check_stage_name, load_stage
from mlops_spec.project import environments_dir
from mlops_spec.yamlsource import load_yaml_source

Status = Literal["added", "removed", "changed"]
MARKS: dict[Status, str] = {"changed": "~", "added": "+", "removed": "-"}
# What `pulumi up` does with a resource: "none" is a declared change the provider reports as no change.
Action = Literal["create", "delete", "update", "replace", "none"]
CHANGED_ACTIONS: tuple[Action, ...] = ("replace", "update", "none")
MAX_GIT_REVISION = 255


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
        argument = f"'{excerpt(text)}'"
        if not stage or ("@" in text and not ref):
            raise SpecError(file=argument, field="", message="expected STAGE or STAGE@GITREF, e.g. prod or prod@origin/main")
        check_stage_name(stage, argument)
        # The revision goes to git as an argument: never an option, and no longer than any ref git accepts.
        if ref and (ref.startswith("-") or len(ref) > MAX_GIT_REVISION
                    or not all(char.isprintable() and not char.isspace() for char in ref)):
            raise SpecError(file=argument, field="",
                            message="GITREF must be a git revision such as origin/main, a tag or a commit")
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
    action: Action
    replace_fields: tuple[str, ...] = ()
    """The fields (or `opts.parent`) that force a replacement."""
    delete_before_replace: bool = False
    notes: tuple[str, ...] = ()
    data_risk: Optional[str] = None
    """Set when a data volume or a protected resource is replaced or deleted: what happens to it."""
    update_policy: Optional[str] = None
    """How Swarm rolls the change out (services only), per `mlops.plan.update_policy` of the new side."""
    collision: Optional[str] = None
    """Set when the replacement would be created while the old resource still holds its name: why it fails."""

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "type": self.type, "name": self.name,
                "fields": [change.to_json() for change in self.fields], "action": self.action,
                "replace_fields": list(self.replace_fields), "delete_before_replace": self.delete_before_replace,
                "notes": list(self.notes), "data_risk": self.data_risk, "update_policy": self.update_policy,
                "collision": self.collision}


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
    def actions(self) -> dict[str, int]:
        """What the provider does with the changed resources."""
        changed = [change for change in self.changes if change.status == "changed"]
        return {action: sum(change.action == action for change in changed) for action in CHANGED_ACTIONS}

    @property
    def at_risk(self) -> list[ResourceChange]:
        return [change for change in self.changes if change.data_risk]

    @property
    def colliding(self) -> list[ResourceChange]:
        return [change for change in self.changes if change.collision]

    @property
    def differs(self) -> bool:
        return bool(self.changes)

    def summary(self) -> str:
        if not self.differs:
            return f"no differences between {self.before} and {self.after} ({self.unchanged} resources)"
        counts = ", ".join(f"{count} {status}" for status, count in self.counts.items())
        actions = self.actions
        verdict = f"{actions['replace']} replace, {actions['update']} update in place"
        if actions["none"]:
            verdict += f", {actions['none']} no provider change"
        if self.colliding:
            verdict += f", {len(self.colliding)} would collide with itself: {', '.join(c.name for c in self.colliding)}"
        return f"{self.before} → {self.after}: {counts}, {self.unchanged} unchanged ({verdict})"

    def risk_summary(self) -> Optional[str]:
        """The line a reviewer must not miss, or None when no data volume or protected resource is at stake."""
        if not self.at_risk:
            return None
        items = ", ".join(f"{change.name} ({change.action})" for change in self.at_risk)
        return (f"DATA AT RISK: {len(self.at_risk)} data volume(s) or protected resource(s) would be replaced "
                f"or deleted: {items}")

    def to_json(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after, "differs": self.differs, "counts": self.counts,
                "unchanged": self.unchanged, "changes": [change.to_json() for change in self.changes],
                "actions": self.actions, "warning": self.risk_summary(),
                "data_at_risk": [{"name": change.name, "type": change.type, "status": change.status,
                                  "action": change.action, "risk": change.data_risk} for change in self.at_risk],
                "collisions": [{"name": change.name, "type": change.type, "collision": change.collision}
                               for change in self.colliding]}


def _stack_neutral(name: str, stack: str) -> str:
    """Resource names embed the stack; matching `staging-gateway` with `prod-gateway` needs them neutral."""
    return re.sub(rf"(^|-){re.escape(stack)}(-|$)", r"\1{stack}\2", name, count=1)


def resource_fields(resource: PlannedResource) -> dict[str, Any]:
    """Every comparable value of a resource by path; resource options sit under `opts.`."""
    return {**flatten(resource.inputs), "opts.parent": resource.parent, "opts.protect": resource.protect,
            "opts.retainOnDelete": resource.retain_on_delete,
            "opts.deleteBeforeReplace": resource.delete_before_replace}


def _field_changes(before: dict[str, Any], after: dict[str, Any], before_stack: str = "",
                   after_stack: str = "") -> tuple[FieldChange, ...]:
    def same(path: str) -> bool:
        old, new = before.get(path, ABSENT), after.get(path, ABSENT)
        if path == "opts.parent" and isinstance(old, str) and isinstance(new, str):
            return _stack_neutral(old, before_stack) == _stack_neutral(new, after_stack)
        return old == new

    paths = list(before) + [path for path in after if path not in before]
    return tuple(FieldChange(path, before.get(path, ABSENT), after.get(path, ABSENT)) for path in paths if not same(path))


def _under(fields: dict[str, Any], prefix: str) -> list[str]:
    """The paths of `fields` at or below the concrete path `prefix` (e.g. one list element)."""
    return [path for path in fields if path == prefix or path.startswith((f"{prefix}.", f"{prefix}["))]


def _kept(rules: Rules, path: str, after: dict[str, Any]) -> bool:
    """A field removed from the program that the provider keeps as it is (Optional+Computed)."""
    return any(field in rules.keep_when_unset and not _under(after, concrete) for field, concrete in prefixes(path))


def _forcing_block(rules: Rules, path: str, before: dict[str, Any], after: dict[str, Any]) -> Optional[str]:
    """A block whose change replaces even though the changed field itself is not replace-forcing."""
    for field, concrete in prefixes(path):
        kind = rules.blocks.get(field)
        element = _under(before, concrete) + _under(after, concrete)
        if kind == "set" and any(rules.forcing_field(inner) for inner in element):
            return field
        if kind == "defaulted" and not (_under(before, concrete) and _under(after, concrete)):
            return field
    return None


def _type_chain(resource: PlannedResource, by_name: dict[str, PlannedResource]) -> tuple[str, ...]:
    """The types of a resource's ancestors, which (with its own type and name) make its URN."""
    chain: list[str] = []
    parent = resource.parent
    while parent in by_name:
        chain.append(by_name[parent].type)
        parent = by_name[parent].parent
    return tuple(chain)


@dataclass(frozen=True)
class Verdict:
    action: Action
    replace_fields: tuple[str, ...]
    notes: tuple[str, ...]


def classify(resource_type: str, fields: tuple[FieldChange, ...], before: dict[str, Any], after: dict[str, Any],
             urn_changes: bool = False) -> Verdict:
    """Update in place or replace, as the provider decides for these changed fields (`resource_fields` paths)."""
    rules = RULES.get(resource_type)
    forcing: dict[str, None] = {}
    notes: dict[str, None] = {}
    effective = False
    for change in fields:
        path = change.path
        if path == "opts.parent" and urn_changes:
            forcing["opts.parent"] = None
            notes["opts.parent: the URN changes with the parent's type, so Pulumi creates the new resource and "
                  "deletes the old one"] = None
        elif path.startswith("opts."):
            effective = True  # Pulumi's own options: its state changes, the provider sees nothing.
        elif rules is None or not rules.knows(path):
            top = prefixes(path)[0][0] if prefixes(path) else path
            forcing[top] = None
            notes[f"{top}: not in mlops/replacements.py, assumed to replace"] = None
        elif rules.is_ignored(path):
            notes[f"{schema_path(path)}: the provider's diff ignores it"] = None
        elif change.after is ABSENT and _kept(rules, path, after):
            notes[f"{schema_path(path)}: removed from the program, the provider keeps its current value"] = None
        else:
            field = rules.forcing_field(path) or _forcing_block(rules, path, before, after)
            if field:
                forcing[field] = None
                continue
            effective = True
            note = rules.note(path)
            if note:
                notes[f"{prefixes(path)[0][0]}: {note}"] = None
    action: Action = "replace" if forcing else "update" if effective else "none"
    return Verdict(action, tuple(forcing), tuple(notes))


def _data_risk(resource_type: str, action: Action, old: PlannedResource, new: Optional[PlannedResource],
               delete_before_replace: bool) -> Optional[str]:
    """What a replacement or deletion does to a data volume or protected resource (None for anything else).

    Pulumi refuses to replace a resource protected on both sides, or to delete a protected one; it skips
    the provider's delete of a resource whose old state has retainOnDelete. Otherwise a replacement is
    create-before-delete unless delete-before-replace: the new Docker volume of the same name is the old
    one (Docker's volume create returns an existing volume), and the old resource's delete then removes it.
    """
    volume = resource_type == VOLUME_TYPE and not str(old.inputs.get("name", "")).endswith(SECRET_FILES_SUFFIX)
    if action not in ("replace", "delete") or not (volume or old.protect or (new is not None and new.protect)):
        return None
    what = f"{'data volume' if volume else 'protected resource'} {'replaced' if action == 'replace' else 'deleted'}"
    if old.protect and (new is None or new.protect):
        return f"{what}: pulumi up refuses, the resource is protected"
    if old.retain_on_delete:
        return f"{what}: retainOnDelete, so Pulumi does not delete the old one from Docker (its data stays on the host)"
    if not volume:
        return f"{what}: Pulumi deletes the old one"
    if action == "delete":
        return f"{what}: DATA LOSS, Pulumi deletes the volume and its data"
    if delete_before_replace:
        return f"{what}: DATA LOSS, Pulumi deletes the volume and its data, then creates an empty one"
    if new is not None and new.inputs.get("name") == old.inputs.get("name"):
        return (f"{what}: DATA LOSS, Pulumi creates the replacement first (Docker hands back the existing volume "
                f"of the same name), then deletes the old resource, which removes the volume and its data")
    return f"{what}: DATA LOSS, Pulumi creates a new empty volume, then deletes the old one and its data"


def _collision(rules: Optional[Rules], action: Action, old: PlannedResource, new: PlannedResource,
               delete_first: bool) -> Optional[str]:
    """Why a replacement fails on its own name, or None: it keeps a fixed name the engine holds unique, and Pulumi
    creates it while the old one exists (create-before-delete, as for any replacement not delete-before-replace
    and for a new URN)."""
    name = new.inputs.get("name")
    if action != "replace" or delete_first or rules is None or not rules.unique_name:
        return None
    if not isinstance(name, str) or name != old.inputs.get("name"):
        return None
    return (f"COLLIDES: Pulumi creates the replacement before it deletes the old one, and the engine refuses a "
            f"second object named {name}: `pulumi up` fails; declare it delete_before_replace")


def _delete_first_note(dependents: list[str]) -> str:
    # The engine replaces a delete-before-replace resource's dependents whose diff, with the inputs that
    # come from it unknown, asks for a replacement: the rendering knows the dependents, not which inputs.
    return (f"delete-before-replace: Pulumi also replaces those of its dependents ({', '.join(dependents)}) "
            f"that take a replace-forcing input from it")


def compare(before: list[PlannedResource], after: list[PlannedResource],
            before_stack: str, after_stack: str) -> tuple[list[ResourceChange], int]:
    """Resource changes keyed by type and (stack-neutral) name, in rendering order; and how many are unchanged."""
    old = {(r.type, _stack_neutral(r.name, before_stack)): r for r in before}
    new = {(r.type, _stack_neutral(r.name, after_stack)): r for r in after}
    old_by_name = {r.name: r for r in before}
    new_by_name = {r.name: r for r in after}
    changes: list[ResourceChange] = []
    unchanged = 0
    for key, resource in new.items():
        if key not in old:
            changes.append(ResourceChange("added", resource.type, resource.name,
                                          _field_changes({}, resource_fields(resource)), action="create",
                                          update_policy=update_policy(resource)))
            continue
        previous = old[key]
        old_fields, new_fields = resource_fields(previous), resource_fields(resource)
        fields = _field_changes(old_fields, new_fields, before_stack, after_stack)
        if not fields:
            unchanged += 1
            continue
        urn_changes = _type_chain(previous, old_by_name) != _type_chain(resource, new_by_name)
        verdict = classify(resource.type, fields, old_fields, new_fields, urn_changes)
        rules = RULES.get(resource.type)
        # A new URN is no replace step: Pulumi creates the new resource and deletes the old one last.
        delete_first = (verdict.action == "replace" and "opts.parent" not in verdict.replace_fields
                        and (resource.delete_before_replace or (rules is not None and rules.delete_before_replace)))
        dependents = [r.name for r in after if resource.name in r.dependencies]
        collision = _collision(rules, verdict.action, previous, resource, delete_first)
        notes = (verdict.notes + ((_delete_first_note(dependents),) if delete_first and dependents else ())
                 + ((collision,) if collision else ()))
        changes.append(ResourceChange(
            "changed", resource.type, resource.name, fields, action=verdict.action,
            replace_fields=verdict.replace_fields, delete_before_replace=delete_first, notes=notes,
            data_risk=_data_risk(resource.type, verdict.action, previous, resource, delete_first),
            update_policy=update_policy(resource), collision=collision))
    for key, resource in old.items():
        if key not in new:
            changes.append(ResourceChange("removed", resource.type, resource.name,
                                          _field_changes(resource_fields(resource), {}), action="delete",
                                          data_risk=_data_risk(resource.type, "delete", resource, None, False)))
    return changes, unchanged


def _declare_identity_of_today(revision: Path, stage: str, environments: Path) -> None:
    """Stage files committed before stages declared their `kind` take what the stage is from its file in the work
    tree, so a diff across that change compares what the stage runs. Appended, so that errors in the committed
    file keep their line numbers."""
    committed, today = revision / f"{stage}.yaml", environments / f"{stage}.yaml"
    if not committed.is_file() or not today.is_file() or "kind" in load_yaml_source(committed).data:
        return
    identity = {key: value for key, value in load_yaml_source(today).data.items() if key in ("kind", "promote_from")}
    committed.write_text(committed.read_text().rstrip("\n") + "\n" + "".join(f"{key}: {value}\n" for key, value in identity.items()))


def render_stage(side: StageRef, environments: Optional[Path] = None) -> list[PlannedResource]:
    """Render one side: from the work tree, or from `environments/` as committed at `side.ref`."""
    environments = environments or environments_dir()
    if side.ref is None:
        return render(side.stage, load_stage(side.stage, environments=environments))
    with tempfile.TemporaryDirectory(prefix="mlops-diff-") as scratch:
        folder = gitrepo.materialise(environments, side.ref, Path(scratch))
        _declare_identity_of_today(folder, side.stage, environments)
        try:
            spec = load_stage(side.stage, environments=folder)
        except SpecError as err:
            # Name the file as git does (`REF:environments/prod.yaml`), not by its temporary copy.
            err.file = f"{side.ref}:{Path(err.file).relative_to(scratch).as_posix()}"
            raise
    return render(side.stage, spec)


def diff_stages(before: StageRef, after: StageRef, environments: Optional[Path] = None) -> StackDiff:
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


def describe_action(change: ResourceChange) -> str:
    """`replace (delete-before-replace) forced by labels, cpus`, `update in place`, ..."""
    if change.action == "replace":
        order = (" (delete-before-replace)" if change.delete_before_replace else
                 " (create-before-delete: COLLIDES on its name)" if change.collision else "")
        return f"replace{order} forced by {', '.join(change.replace_fields)}"
    return {"update": "update in place", "none": "no provider change"}.get(change.action, change.action)


def to_markdown(diff: StackDiff) -> str:
    """A pull-request comment: the data-at-risk warning, a summary line, then one table per resource
    (added/removed folded)."""
    lines = [f"### `mlops diff {diff.before} {diff.after}`", ""]
    warning = diff.risk_summary()
    if warning:
        lines += ["> [!CAUTION]", f"> **⚠️ {warning}**", ""]
    lines.append(f"**{diff.summary()}**")
    for change in diff.changes:
        heading = f"#### {MARKS[change.status]} `{change.name}` ({change.status}, `{change.type}`)"
        if change.status == "changed":
            heading += f": **{describe_action(change)}**"
        lines += ["", heading, ""]
        if change.data_risk:
            lines += [f"**⚠️ {change.data_risk}**", ""]
        lines += [f"- {note}" for note in change.notes] + ([""] if change.notes else [])
        if change.update_policy:
            lines += [f"- update policy: {change.update_policy}", ""]
        table = ["| field | before | after |", "|---|---|---|"]
        table += [f"| `{fc.path}` | {_markdown_cell(fc.before)} | {_markdown_cell(fc.after)} |" for fc in change.fields]
        if change.status == "changed":
            lines += table
        else:
            lines += [f"<details><summary>{len(change.fields)} fields</summary>", "", *table, "", "</details>"]
    return "\n".join(lines) + "\n"
