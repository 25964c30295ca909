"""Measure the figures and write BENCHMARKS.md: `python -m benchmarks.run [--only NAME ...] [--output FILE]`.

Figures run one after another, never overlapping, cheapest first; the report lists them in the issue's
order. A figure that fails is reported as not produced, with the reason, and the others still run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import time
import traceback
from pathlib import Path
from typing import Callable

from benchmarks import binary, gateway_hop, machine, overhead, rebuilds, serving, spinup, swarm, telemetry
from benchmarks.report import Figure
from mlops_spec.project import REPO_ROOT

# Report order (the issue's) -> how to measure each; `make bench` runs them in RUN_ORDER.
FIGURES: dict[str, tuple[str, Callable[[], Figure]]] = {
    "serving": ("Serving", serving.measure),
    "overhead": ("Program overhead", overhead.measure),
    "rebuilds": ("Rebuilds", rebuilds.measure),
    "spinup": ("Spin-up and image sizes", spinup.measure),
    "binary": ("Binary tensor data against JSON", binary.measure),
    "telemetry": ("Telemetry: input drift scoring", telemetry.measure),
    "swarm": ("Swarm: requests/s on 1, 2 and 3 nodes", swarm.measure),
    "hop": ("The gateway hop", gateway_hop.measure),
}
# Rebuilds first: its builds leave every image in the cache that spin-up and serving then build from.
RUN_ORDER = ("overhead", "rebuilds", "spinup", "serving", "hop", "binary", "telemetry", "swarm")


def git_revision() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                           capture_output=True, text=True)
    return head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def render(sections: list[str], started: str, load_before: str, elapsed_s: float) -> str:
    machine_rows = "\n".join(f"| {name} | {value} |" for name, value in machine.describe())
    commands = "\n".join(f".venv/bin/python -m benchmarks.run --only {name} --output BENCHMARKS-{name}.md"
                         for name in FIGURES)
    return f"""# Benchmarks

Written by `make bench` on {started} UTC from revision {git_revision()}, in {elapsed_s / 60:.1f} minutes.
Every comparison ran side by side in this one run, alternating its variants; medians and ratios are
what to compare (absolute times drift on a shared machine).

## Machine

| | |
|---|---|
{machine_rows}
| load average (1, 5, 15 min) | {load_before} at the start, {load_average()} at the end |

## Reproduce

```bash
make bench      # venv, base image, wheels, then every figure below; writes BENCHMARKS.md
```

One figure at a time, after `make venv base-image wheels` (and `wrk` from Debian for serving):

```bash
{commands}
```

{chr(10).join(sections)}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(FIGURES), default=list(FIGURES),
                        help="figures to measure (default: all)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    args = parser.parse_args()

    started, load_before, clock = time.strftime("%Y-%m-%d %H:%M", time.gmtime()), load_average(), time.monotonic()
    sections: dict[str, str] = {}
    for name in (name for name in RUN_ORDER if name in args.only):
        title, measure = FIGURES[name]
        print(f"measuring {name} ...", flush=True)
        try:
            sections[name] = measure().markdown()
        except Exception as error:  # the report says which figure is missing and why; the rest still runs
            traceback.print_exc()
            sections[name] = f"## {title}\n\nNot produced in this run: {type(error).__name__}: {error}\n"
    # Numbered as in the issue, whichever figures ran.
    numbered = [sections[name].replace("## ", f"## {number}. ", 1)
                for number, name in enumerate(FIGURES, start=1) if name in sections]
    args.output.write_text(render(numbered, started, load_before, time.monotonic() - clock))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
