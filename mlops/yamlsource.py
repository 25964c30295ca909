"""YAML loading that remembers where every key was written, so errors can name the file and line."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from mlops.errors import SpecError

Path_ = tuple[str, ...]


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


def _plain(node: Any, path: Path_, lines: dict[Path_, int]) -> Any:
    if isinstance(node, CommentedMap):
        plain = {}
        for key, value in node.items():
            child = path + (str(key),)
            position = node.lc.key(key)
            if position is not None:
                lines[child] = position[0] + 1
            plain[str(key)] = _plain(value, child, lines)
        return plain
    if isinstance(node, CommentedSeq):
        return [_plain(item, path + (str(index),), lines) for index, item in enumerate(node)]
    if isinstance(node, str):
        return str(node)
    return node


def load_yaml_source(file: Path) -> YamlSource:
    if not file.is_file():
        raise SpecError(file=file, field="", message="file not found")
    try:
        document = YAML(typ="rt").load(file.read_text())
    except MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        # ruamel quotes whole mapping values in some problems; the first clause says all a user needs.
        problem = str(err.problem or err.context).split(" with value ")[0]
        raise SpecError(file=file, field="", message=f"not valid YAML: {problem}", line=line) from None
    except YAMLError as err:
        raise SpecError(file=file, field="", message=f"not valid YAML: {err}") from None
    if document is None:
        document = CommentedMap()
    if not isinstance(document, CommentedMap):
        raise SpecError(file=file, field="", message="the top level must be a mapping of spec keys", line=1)
    lines: dict[Path_, int] = {}
    return YamlSource(file=file, data=_plain(document, (), lines), lines=lines)


def deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key; any other value in `override` replaces the base value whole."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
