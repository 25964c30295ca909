"""Figure 2: wall time of `mlops plan prod` against the same command on an empty Pulumi program."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import Figure, alternate, median, ratio, rounds_text, spread
from mlops_spec.project import REPO_ROOT

GOAL_RATIO = 1.5
OURS, IMPORTS_ONLY, FLOOR = "ours", "imports only", "floor"


def commands(stage: str) -> dict[str, list[str]]:
    python = sys.executable
    return {
        OURS: [str(Path(python).with_name("mlops")), "plan", stage],
        IMPORTS_ONLY: [python, "-m", "benchmarks.empty_plan", "--import-program", "plan", stage],
        FLOOR: [python, "-m", "benchmarks.empty_plan", "plan", stage],
    }


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    # stderr is kept for failures only: the mock runtime's event loop now and then complains at exit.
    finished = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{finished.stderr}")
    return seconds


def shown(command: list[str]) -> str:
    """The command as typed from the repository root."""
    return " ".join(os.path.relpath(part, REPO_ROOT) if os.path.isabs(part) else part for part in command)


def measure(stage: str = "prod", rounds: int = 15) -> Figure:
    runs = commands(stage)
    samples = alternate({name: functools.partial(_timed, command) for name, command in runs.items()}, rounds)
    medians = {name: median(values) for name, values in samples.items()}
    floor = medians[FLOOR]
    descriptions = {
        OURS: f"`mlops plan {stage}`",
        IMPORTS_ONLY: "the same CLI with everything `mlops` imports, declaring nothing",
        FLOOR: "empty program (the floor)",
    }
    overhead_ratio = medians[OURS] / floor
    return Figure(
        title="Program overhead: `mlops plan` against an empty program",
        goal=f"`mlops plan {stage}` takes at most {GOAL_RATIO}× the floor.",
        headers=["command", "wall time, s: median (min–max)", "ratio to floor"],
        rows=[[descriptions[name], spread(samples[name]), ratio(medians[name], floor)] for name in runs],
        notes=[
            f"Ratio {overhead_ratio:.2f}: goal {'met' if overhead_ratio <= GOAL_RATIO else 'missed'}. Of the "
            f"{medians[OURS] - floor:.2f} s above the floor, importing the stack's code (the `mlops` commands, "
            f"components, the Docker provider SDK) takes {medians[IMPORTS_ONLY] - floor:.2f} s and declaring and "
            f"recording its resources under the mocks {medians[OURS] - medians[IMPORTS_ONLY]:.2f} s.",
            f"{rounds_text(rounds)}, the three commands alternating; each is a fresh process, stdout discarded.",
            "Floor: the same `plan` command function, spec loading and validation, mock runtime and output, with "
            "the stack's program replaced by one that declares nothing and none of the stack's code imported "
            "(`benchmarks/empty_plan.py`).",
            "Commands, from the repository root: " + "; ".join(f"`{shown(command)}`" for command in runs.values()) + ".",
        ],
    )
