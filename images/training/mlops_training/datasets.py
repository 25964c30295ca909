"""Labelled training data on the artifact store's datasets volume, and the serving samples to label next.

A dataset is a CSV file named by the sha256 of its bytes (`<sha256>.csv`): the header of the model's schema (its
features, then its label, mlops-model.yaml), then one row per example, every feature a finite number (a whole one
for an `int` feature) and every label a class of the project's default data (classification) or a finite number
(regression).
Each model's datasets are in a folder of their own on the volume, `<volume>/<model>/` (`model_folder`): a model's
training image adds to, lists and trains on its own model's folder only.
`mlops data add` pipes a file to `add`, which checks it whole before anything is written, writes it in its
canonical form (a `prediction` column, as `samples` exports, is dropped) to a temporary name on the volume
and renames it, so a dataset is either complete under its name or absent. The file's modification time is
when it was added; `latest` is the newest.

Command line (run by `mlops data` in the model's training image; bad input: one `error:` line on stderr, exit 2):
`add` (the CSV on stdin; prints `ADDED name=... rows=...` or `EXISTS name=... rows=...`), `list` (one JSON
object per dataset), `samples POOL...` (every row sampled by the replicas of the pools named, `<pool>-<index>.jsonl`
on the samples volume, as CSV with an empty label column; on stderr, `skipped N unreadable lines (first:
FILE:LINE: why)` when some were).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np

from mlops_training.project import Project, ProjectError, load_project

DATASETS_DIR = Path("/data/datasets")
SAMPLES_DIR = Path("/data/samples")
LATEST = "latest"
PREDICTION = "prediction"
MAX_BYTES = 16 * 1024 * 1024
MIN_NAME_PREFIX = 8
# A number as numpy reads it back when training: ASCII decimal, optional exponent. Python's float() alone would
# also take "1_0", "nan" and digits of other scripts.
DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
WHOLE = re.compile(r"[+-]?[0-9]+")
BAD_INPUT_EXIT = 2
# What a spreadsheet takes for the start of a formula (OWASP, CSV injection): such a cell gets a leading ' and
# is shown as the text it is. A number is left alone: it is read as a number even when it starts with - or +.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class DatasetError(ValueError):
    """A file that is no dataset, or a dataset name that names none; one line saying what is wrong."""


@dataclass(frozen=True)
class Dataset:
    path: Path
    sha256: str
    features: np.ndarray
    labels: list[str]
    """As written in the file: a classifier's classes are the text of its labels."""

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class RowRules:
    """What each row of a project's data must hold."""

    project: Project
    classes: tuple[str, ...]
    """A classifier's known classes, those of its default data; empty for a regressor."""

    @classmethod
    def of(cls, project: Project) -> "RowRules":
        if project.task != "classification":
            return cls(project, ())
        with open(project.default_data, encoding="utf-8", newline="") as stream:
            rows = list(csv.reader(stream))[1:]
        return cls(project, tuple(sorted({row[-1].strip() for row in rows if row}, key=_class_order)))


def _class_order(label: str) -> tuple[int, float | str]:
    return (0, int(label)) if WHOLE.fullmatch(label) else (1, label)


def canonical_dataset(payload: bytes, rules: RowRules) -> tuple[bytes, int]:
    """The dataset `payload` holds, in canonical form, and its row count; DatasetError names the first problem."""
    if len(payload) > MAX_BYTES:
        raise DatasetError(f"is more than {MAX_BYTES // (1024 * 1024)} MiB, the most a dataset may be")
    try:
        text = payload.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"is not UTF-8 text (byte {err.start})") from None
    rows = csv.reader(io.StringIO(text, newline=""))
    expected = rules.project.header
    try:
        header = [column.strip() for column in next(rows)]
    except StopIteration:
        raise DatasetError(f"is empty; the first line must be the header {','.join(expected)}") from None
    except csv.Error as err:
        raise DatasetError(f"header: {err}") from None
    if [column for column in header if column != PREDICTION] != expected:
        raise DatasetError(f"the header must be {','.join(expected)} (a '{PREDICTION}' column is allowed and dropped), "
                           f"got {_shown(','.join(header), 200)}")
    kept = [index for index, column in enumerate(header) if column != PREDICTION]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(expected)
    count = 0
    try:
        for row in rows:
            if not row:
                continue  # a blank line
            count += 1
            where = f"row {count} (line {rows.line_num})"
            if len(row) != len(header):
                raise DatasetError(f"{where} has {len(row)} values, the header {len(header)}")
            writer.writerow(_checked_row(where, [row[index].strip() for index in kept], rules))
    except csv.Error as err:
        raise DatasetError(f"line {rows.line_num}: {err}") from None
    if count == 0:
        raise DatasetError("has a header but no rows")
    return out.getvalue().encode(), count


def _shown(value: str, limit: int = 40) -> str:
    """The start of a value as an error line quotes it: a quoted CSV cell may hold a line break or any control
    character, which would split or garble the one line."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in value[:limit])


def _checked_row(where: str, values: list[str], rules: RowRules) -> list[str]:
    *features, label = values
    for column, value in zip(rules.project.features, features):
        if not DECIMAL.fullmatch(value) or not math.isfinite(float(value)):
            raise DatasetError(f"{where}, column '{column.name}': '{_shown(value)}' is not a finite number")
        if column.type == "int" and not WHOLE.fullmatch(value):
            raise DatasetError(f"{where}, column '{column.name}': '{_shown(value)}' is not a whole number")
    if not label:
        raise DatasetError(f"{where} has no label; label every row (or delete it) first")
    if rules.classes and label not in rules.classes:
        raise DatasetError(f"{where}: label '{_shown(label)}' is not a known class "
                           f"({', '.join(rules.classes)})")
    if not rules.classes and (not DECIMAL.fullmatch(label) or not math.isfinite(float(label))):
        raise DatasetError(f"{where}: label '{_shown(label)}' is not a finite number")
    return values


def model_folder(project: Project, volume: Path) -> Path:
    """Where `project`'s datasets are on the datasets volume mounted at `volume`."""
    return volume / project.name


def add(payload: bytes, rules: RowRules, directory: Path) -> tuple[str, int, bool]:
    """Check `payload` and store its canonical form as `<sha256>.csv`; its name, rows and whether it is new."""
    canonical, rows = canonical_dataset(payload, rules)
    name = f"{hashlib.sha256(canonical).hexdigest()}.csv"
    target = directory / name
    if target.exists():
        return name, rows, False
    directory.mkdir(exist_ok=True)
    temporary = directory / f".{name}.{os.getpid()}.tmp"
    try:
        with open(temporary, "xb") as handle:
            handle.write(canonical)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return name, rows, True


def stored(directory: Path) -> list[Path]:
    """Every dataset, oldest first (by when it was added, then name)."""
    return sorted(directory.glob("*.csv"), key=lambda path: (path.stat().st_mtime_ns, path.name))


def resolve(name: str, directory: Path) -> Path:
    """The dataset `name` designates: `latest`, `<sha256>.csv`, or a unique prefix of a sha256."""
    datasets = stored(directory)
    if name == LATEST:
        if not datasets:
            raise DatasetError(f"no dataset of {directory.name} on the datasets volume yet; add one with `mlops data add`")
        return datasets[-1]
    sha = name.removesuffix(".csv")
    matches = [path for path in datasets if path.stem.startswith(sha)] if len(sha) >= MIN_NAME_PREFIX else []
    if len(matches) != 1:
        how = "matches several" if matches else "names no dataset"
        raise DatasetError(f"--data '{name[:80]}' {how} on the datasets volume; give 'latest', a dataset's sha256 or "
                           f"at least {MIN_NAME_PREFIX} of its first characters (`mlops data list`)")
    return matches[0]


def load(name: str, rules: RowRules, directory: Path) -> Dataset:
    """Dataset `name` of the volume, after checking its bytes still match the sha256 it is named by."""
    path = resolve(name, directory)
    payload = path.read_bytes()
    sha256 = hashlib.sha256(payload).hexdigest()
    if path.name != f"{sha256}.csv":
        raise DatasetError(f"dataset {path.name} holds bytes of sha256 {sha256}: it was changed after it was added")
    return read(path, payload, rules)


def read(path: Path, payload: bytes, rules: RowRules) -> Dataset:
    """The features and labels of a dataset's bytes, checked against the project's schema."""
    canonical, _ = canonical_dataset(payload, rules)
    rows = list(csv.reader(io.StringIO(canonical.decode())))[1:]
    return Dataset(path=path, sha256=hashlib.sha256(payload).hexdigest(),
                   features=np.array([[float(value) for value in row[:-1]] for row in rows], dtype=np.float64),
                   labels=[row[-1] for row in rows])


def listing(directory: Path) -> list[dict]:
    return [{"name": path.name, "sha256": path.stem, "rows": path.read_bytes().count(b"\n") - 1,
             "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))}
            for path in stored(directory)]


@dataclass(frozen=True)
class SamplesExport:
    written: int
    skipped: int
    first_skipped: str
    """Where and why the first unreadable line was skipped (`FILE:LINE: why`)."""


def spreadsheet_text(value: object) -> str:
    text = str(value)
    return f"'{text}" if text.startswith(FORMULA_STARTS) and not DECIMAL.fullmatch(text) else text


def _sample_row(line: str, width: int) -> list[str]:
    sample = json.loads(line)
    features = [float(value) for value in sample["features"]]
    if len(features) != width or not all(map(math.isfinite, features)):
        raise ValueError(f"{len(features)} features, not the model's {width} finite numbers")
    return [*map(repr, features), spreadsheet_text(sample["prediction"]), ""]


def replica_files(directory: Path, pools: Sequence[str]) -> list[Path]:
    """The samples files of the replicas of `pools`, `<pool>-<index>.jsonl`: a pool's own, never those of another
    model whose pool name merely starts the same (`s-iris-blue` and `s-iris-v2-blue`)."""
    return sorted(file for file in directory.glob("*.jsonl")
                  if any(file.stem.startswith(f"{pool}-") and file.stem[len(pool) + 1:].isdecimal() for pool in pools))


def export_samples(out: TextIO, project: Project, pools: Sequence[str], directory: Path = SAMPLES_DIR) -> SamplesExport:
    """Every row the replicas of `pools` sampled, as CSV ready for labelling, every cell quoted; a line that is no
    sample (a replica's file damaged, or written by something else) is skipped and counted, not the export."""
    writer = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL)
    *features, label = project.header
    writer.writerow([*features, PREDICTION, label])
    written, skipped, first_skipped = 0, 0, ""
    for file in replica_files(directory, pools):
        with open(file, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.endswith("\n"):
                    break  # a replica is writing it right now; the next export has it whole
                try:
                    writer.writerow(_sample_row(line, len(features)))
                except (ValueError, KeyError, TypeError) as err:
                    skipped += 1
                    first_skipped = first_skipped or f"{file.name}:{number}: {type(err).__name__}: {err}"[:300]
                else:
                    written += 1
    return SamplesExport(written, skipped, first_skipped)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    try:
        if command == "add":
            project = load_project()
            name, rows, new = add(sys.stdin.buffer.read(MAX_BYTES + 1), RowRules.of(project),
                                model_folder(project, DATASETS_DIR))
            print(f"{'ADDED' if new else 'EXISTS'} name={name} rows={rows}")
        elif command == "list":
            for entry in listing(model_folder(load_project(), DATASETS_DIR)):
                print(json.dumps(entry))
        elif command == "samples" and argv[1:]:
            export = export_samples(sys.stdout, load_project(), argv[1:], SAMPLES_DIR)
            if export.skipped:
                print(f"skipped {export.skipped} unreadable lines (first: {export.first_skipped})", file=sys.stderr)
        else:
            print("error: give add, list or samples POOL...", file=sys.stderr)
            return BAD_INPUT_EXIT
    except (DatasetError, ProjectError) as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT_EXIT
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
