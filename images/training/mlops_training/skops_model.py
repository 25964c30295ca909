"""`model.skops`: the fitted model in skops's format, which a replica loads without unpickling (docs/contracts.md).

skops writes a zip whose entries are named after the `id()` of each array (and a uuid4 for raw bytes), which
`schema.json` refers to, and stamps each entry with the current time: two dumps of one model never match. A
model's bytes are its identity here (the same inputs give the same bytes, and the manifest signs their sha256),
so `canonical` renames every id, and every file, by the order of first appearance in the schema, then rewrites
the zip with sorted entries and a fixed time. Objects that shared an id still share one, and distinct ones stay
distinct, so the model loads as skops wrote it.
"""
from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np
import skops.io

SCHEMA_ENTRY = "schema.json"
ID_KEY = "__id__"
FILE_KEY = "file"
# The zip format's earliest time, as reproducible archives (wheels, SOURCE_DATE_EPOCH builds) use.
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


class SkopsRefused(ValueError):
    """The model cannot be served from skops as its project declares; one line."""


def canonical(dumped: bytes) -> bytes:
    """The same archive as `dumped` with ids, entry names, entry order and times that depend on the model alone."""
    with zipfile.ZipFile(io.BytesIO(dumped)) as source:
        schema = json.loads(source.read(SCHEMA_ENTRY))
        ids: dict[int, int] = {}
        files: dict[str, str] = {}
        renumbered = _renumber(schema, ids, files)
        entries = {files[name]: source.read(name) for name in files}
        compression = source.getinfo(SCHEMA_ENTRY).compress_type
    entries[SCHEMA_ENTRY] = json.dumps(renumbered, indent=2).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.compress_type = compression
            info.external_attr = 0o644 << 16
            archive.writestr(info, entries[name])
    return out.getvalue()


def _renumber(node: Any, ids: dict[int, int], files: dict[str, str]) -> Any:
    if isinstance(node, list):
        return [_renumber(item, ids, files) for item in node]
    if not isinstance(node, dict):
        return node
    renumbered = {}
    for key, value in node.items():
        if key == ID_KEY and isinstance(value, int):
            value = ids.setdefault(value, len(ids))
        elif key == FILE_KEY and isinstance(value, str):
            value = files.setdefault(value, f"{len(files)}{value[value.rfind('.'):]}")
        else:
            value = _renumber(value, ids, files)
        renumbered[key] = value
    return renumbered


def skops_bytes(model: Any, trusted_types: list[str], rows: np.ndarray) -> bytes:
    """`model` as canonical skops bytes that load trusting skops's defaults and exactly `trusted_types`, and predict
    `rows` as `model` does; SkopsRefused names what stands in the way."""
    data = canonical(skops.io.dumps(model))
    found = set(skops.io.get_untrusted_types(data=data))
    declared = set(trusted_types)
    if undeclared := sorted(found - declared):
        raise SkopsRefused(f"the model holds types skops does not trust by default: {', '.join(undeclared)}; list "
                           "the ones you reviewed under skops.trusted_types in mlops-model.yaml, or drop skops "
                           "(docs/contracts.md)")
    if unused := sorted(declared - found):
        raise SkopsRefused(f"skops.trusted_types in mlops-model.yaml lists {', '.join(unused)}, which the model "
                           "does not hold or skops trusts already: remove it, so replicas trust no more than they "
                           "load")
    loaded = skops.io.loads(data, trusted=sorted(declared))
    if not np.array_equal(np.asarray(loaded.predict(rows)), np.asarray(model.predict(rows))):
        raise SkopsRefused("the model loaded from skops predicts differently from the pickled one on the training "
                           "rows, so it cannot be served from skops: drop skops from mlops-model.yaml")
    return data
