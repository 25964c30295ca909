"""YAML loading that remembers where every key was written, so errors can name the file and line.

Stage files are outside input: a pull request may carry any bytes. Loading is bounded before anything is
built from them: the file's size, how deep it nests and how many values it holds once aliases are
expanded (a few anchors can otherwise stand for billions of values), and no tags, so text never turns
into another kind of object.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    Event,
    MappingStartEvent,
    NodeEvent,
    ScalarEvent,
)
from ruamel.yaml.reader import ReaderError
from ruamel.yaml.scalarbool import ScalarBoolean

from mlops_spec.errors import SpecError, excerpt

Path_ = tuple[str, ...]

# A stage file is a few kB and nests four levels deep; these bounds leave room for any honest spec while
# keeping a hostile one to a fraction of a second and a few megabytes.
MAX_FILE_BYTES = 256 << 10
MAX_DEPTH = 32
MAX_VALUES = 10_000
MIN_INTEGER, MAX_INTEGER = -(1 << 63), (1 << 63) - 1


@dataclass
class YamlSource:
    file: Path
    data: dict
    lines: dict[Path_, int] = field(default_factory=dict)
    fallback: Optional["YamlSource"] = None

    def under(self, override: "YamlSource") -> "YamlSource":
        """A locator that looks in `override` first and falls back to this source."""
        return YamlSource(file=override.file, data=override.data, lines=override.lines, fallback=self)

    def locate(self, path: Path_) -> tuple[Path, Optional[int]]:
        """The file and line that defines `path`, or its nearest defined ancestor."""
        for depth in range(len(path), 0, -1):
            prefix = tuple(path[:depth])
            if prefix in self.lines:
                return self.file, self.lines[prefix]
            if self.fallback is not None and prefix in self.fallback.lines:
                return self.fallback.file, self.fallback.lines[prefix]
        return self.file, None


@dataclass
class _Node:
    """A collection being parsed: its anchor, its entries so far, and the values and levels it holds once its
    aliases are expanded."""

    anchor: Optional[str]
    is_mapping: bool
    entries: int = 0
    values: int = 1
    levels: int = 1


def _check_shape(file: Path | str, events: Any) -> None:
    """Refuse tags, keys that are not plain scalars, recursive aliases, nesting beyond MAX_DEPTH and more than
    MAX_VALUES values after alias expansion, from the parser's events: before anything is composed, and without
    recursion."""
    open_nodes = [_Node(anchor=None, is_mapping=False, levels=0)]
    anchored: dict[str, tuple[int, int]] = {}
    event: Event
    for event in events:
        line = event.start_mark.line + 1
        if isinstance(event, NodeEvent):
            parent = open_nodes[-1]
            if parent.is_mapping and parent.entries % 2 == 0 and not isinstance(event, ScalarEvent):
                raise SpecError(file=file, field="", line=line,
                                message="a key that is a mapping, a list or an alias; spec keys are plain strings")
            parent.entries += 1
            if getattr(event, "tag", None) is not None:
                tag = event.tag.replace("tag:yaml.org,2002:", "!!")
                raise SpecError(file=file, field="", line=line,
                                message=f"tag {tag} is not allowed: stage files are plain YAML (quote a value to make "
                                        "it a string)")
        if isinstance(event, CollectionStartEvent):
            open_nodes.append(_Node(anchor=event.anchor, is_mapping=isinstance(event, MappingStartEvent)))
            if len(open_nodes) - 1 > MAX_DEPTH:
                raise SpecError(file=file, field="", line=line, message=f"nests deeper than {MAX_DEPTH} levels")
            continue
        if isinstance(event, CollectionEndEvent):
            done = open_nodes.pop()
            values, levels, anchor = done.values, done.levels, done.anchor
        elif isinstance(event, AliasEvent):
            if any(node.anchor == event.anchor for node in open_nodes):
                raise SpecError(file=file, field="", line=line, message=f"alias *{event.anchor} refers to a value "
                                                                        "that contains it")
            # An undefined alias is left to the composer, which names it.
            values, levels = anchored.get(event.anchor, (1, 0))
            anchor = None
        elif isinstance(event, ScalarEvent):
            values, levels, anchor = 1, 0, event.anchor
        else:
            continue
        if anchor is not None:
            anchored[anchor] = (values, levels)
        parent = open_nodes[-1]
        parent.values += values
        parent.levels = max(parent.levels, levels + 1)
        if any(node.values > MAX_VALUES for node in open_nodes):
            raise SpecError(file=file, field="", line=line,
                            message=f"holds more than {MAX_VALUES} values once its aliases are expanded")
        if len(open_nodes) - 1 + levels > MAX_DEPTH:
            raise SpecError(file=file, field="", line=line,
                            message=f"nests deeper than {MAX_DEPTH} levels once its aliases are expanded")


def _plain(node: Any, file: Path | str, path: Path_, lines: dict[Path_, int]) -> Any:
    if isinstance(node, CommentedMap):
        plain = {}
        for key, value in node.items():
            # Keys a merge (`<<: *defaults`) brought in have no position of their own.
            position = (node.lc.data or {}).get(key)
            line = position[0] + 1 if position is not None else None
            if not isinstance(key, str):
                raise SpecError(file=file, field=".".join(path), line=line,
                                message=f"a key that is a {type(key).__name__}, not a string; quote it")
            child = path + (str(key),)
            if line is not None:
                lines[child] = line
            plain[str(key)] = _plain(value, file, child, lines)
        return plain
    if isinstance(node, CommentedSeq):
        return [_plain(item, file, path + (str(index),), lines) for index, item in enumerate(node)]
    # ruamel's round-trip scalars subclass str, int and float (an anchored boolean is an int); the spec sees
    # plain values.
    if isinstance(node, ScalarBoolean):
        return bool(node)
    for plain_type in (str, bool, int, float):
        if isinstance(node, plain_type):
            node = plain_type(node)
            break
    if type(node) is int and not MIN_INTEGER <= node <= MAX_INTEGER:
        # Python cannot even print an integer of more than 4300 digits in an error message.
        raise SpecError(file=file, field=".".join(path), line=lines.get(path),
                        message="integer out of range: spec numbers fit in 64 bits")
    return node


def _read_text(file: Path) -> str:
    try:
        with file.open("rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise SpecError(file=file, field="", message=f"cannot be read: {err.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError(file=file, field="", message=f"is larger than {MAX_FILE_BYTES // 1024} KiB; stage files are "
                                                     "a few kB of YAML")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(file=file, field="", line=raw.count(b"\n", 0, err.start) + 1,
                        message=f"not UTF-8 text (byte 0x{raw[err.start]:02x}); save it as UTF-8") from None


def _load(text: str, file: Path | str) -> Any:
    """The document in `text`, within the bounds of a stage file; every failure is a `SpecError` naming `file`."""
    try:
        _check_shape(file, YAML(typ="rt").parse(text))
        return YAML(typ="rt").load(text)
    except MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        # ruamel quotes whole mapping values in some problems; the first clause says all a user needs.
        problem = str(err.problem or err.context).split(" with value ")[0]
        raise SpecError(file=file, field="", message=f"not valid YAML: {problem}", line=line) from None
    except ReaderError as err:
        raise SpecError(file=file, field="", line=text.count("\n", 0, err.position) + 1,
                        message=f"not valid YAML: character {chr(err.character)!r} is not allowed") from None
    except YAMLError as err:
        raise SpecError(file=file, field="", message=f"not valid YAML: {err}") from None
    except ValueError as err:
        # A scalar YAML accepts but Python cannot hold, e.g. an integer of more than 4300 digits or 2024-13-45.
        raise SpecError(file=file, field="", message=f"not valid YAML: a value cannot be read "
                                                     f"({str(err).split(':')[0]})") from None


def load_yaml_source(file: Path) -> YamlSource:
    if not file.is_file():
        raise SpecError(file=file, field="", message="file not found")
    document = _load(_read_text(file), file)
    if document is None:
        document = CommentedMap()
    if not isinstance(document, CommentedMap):
        raise SpecError(file=file, field="", message="the top level must be a mapping of spec keys", line=1)
    lines: dict[Path_, int] = {}
    return YamlSource(file=file, data=_plain(document, file, (), lines), lines=lines)


def load_yaml_scalar(text: str, where: str) -> Any:
    """A value given on the command line, read as YAML (`2` an integer, `true` a boolean, `null` None) within the
    bounds of a stage file; mappings and lists come back as such for the caller to refuse."""
    if len(text) > MAX_FILE_BYTES:
        raise SpecError(file=where, field="", message=f"the value is longer than {MAX_FILE_BYTES // 1024} KiB")
    value = _plain(_load(text, where), where, (), {})
    if not isinstance(value, (str, int, float, bool, dict, list, type(None))):
        raise SpecError(file=where, field="", message=f"'{excerpt(text)}' reads as a {type(value).__name__}; quote it "
                                                      "to pass a string")
    return value


def deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key; any other value in `override` replaces the base value whole."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
