"""What a figure hands to the report, and the arithmetic every figure shares: alternating rounds, medians, ratios."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Mapping, Sequence, TypeVar

Measured = TypeVar("Measured")
Variant = TypeVar("Variant", bound=Hashable)


@dataclass
class Figure:
    title: str
    goal: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """How it was measured and anything the table cannot say: pinning, formats, what was not measured and why."""

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", f"Goal: {self.goal}", "",
                 "| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def alternate(variants: Mapping[Variant, Callable[[], Measured]], rounds: int) -> dict[Variant, list[Measured]]:
    """Run every variant once per round, in the same order each round, and collect what each returns.

    Interleaving spreads drift on a shared machine (other builds, thermal limits) over all variants
    alike, which consecutive batches would not.
    """
    samples: dict[Variant, list[Measured]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, measure in variants.items():
            samples[name].append(measure())
    return samples


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def number(value: float) -> str:
    """Three significant digits or more, never in exponent notation: 1234, 56.7, 0.89."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def spread(values: Sequence[float]) -> str:
    """Median with the range of the rounds, so a reader sees how noisy the machine was."""
    return f"{number(median(values))} ({number(min(values))}–{number(max(values))})"


def rounds_text(rounds: int) -> str:
    return f"{rounds} round" + ("" if rounds == 1 else "s")


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×" if reference else "n/a"
