"""Per-stage wall-clock timings of a generation, and how they are shown (markdown table, JSON).

A generation records each stage as it runs (``Timings.measure("transformer")``); repeated stages (one
transformer call per step) keep every duration, so a report can give totals, means and the spread.
The sampler's own cost is what a denoising step spends outside the transformer call
(``sampler_overhead``): the CFG combination, casts, noise drawing and the scheduler update. It should be
a rounding error next to the transformer; the benchmark tracks it.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from hidream_export.files import atomic_write_json

__all__ = ["Timings", "markdown_table", "write_json"]

# Stages in the order a generation runs them, for tables; unknown stages follow in insertion order.
STAGE_ORDER = ("load", "validate", "tokenize", "encode_clip_l", "encode_clip_g", "encode_t5", "encode_llama",
               "step", "transformer", "scheduler", "vae", "postprocess", "total")


class Timings:
    """Durations (seconds) per stage name, in the order they were first recorded.

    Not thread-safe by itself: each generation owns its Timings.
    """

    def __init__(self) -> None:
        self._stages: dict[str, list[float]] = {}

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        self._stages.setdefault(stage, []).append(float(seconds))

    def extend(self, other: "Timings") -> None:
        for stage, values in other._stages.items():
            self._stages.setdefault(stage, []).extend(values)

    def __contains__(self, stage: str) -> bool:
        return stage in self._stages

    def values(self, stage: str) -> list[float]:
        return list(self._stages.get(stage, []))

    def total(self, stage: str) -> float:
        return sum(self._stages.get(stage, []))

    def count(self, stage: str) -> int:
        return len(self._stages.get(stage, []))

    def mean(self, stage: str) -> float:
        values = self._stages.get(stage, [])
        return sum(values) / len(values) if values else 0.0

    @property
    def stages(self) -> list[str]:
        known = [s for s in STAGE_ORDER if s in self._stages]
        return known + [s for s in self._stages if s not in STAGE_ORDER]

    def sampler_overhead(self) -> float | None:
        """Fraction of the denoising steps' time spent outside the transformer call (None before any
        step was timed)."""
        steps = self.total("step")
        if not steps:
            return None
        return max(0.0, steps - self.total("transformer")) / steps

    def as_dict(self) -> dict[str, Any]:
        stages = {}
        for stage in self.stages:
            values = self._stages[stage]
            stages[stage] = {"calls": len(values), "total_s": round(sum(values), 6),
                             "mean_s": round(sum(values) / len(values), 6),
                             "min_s": round(min(values), 6), "max_s": round(max(values), 6)}
        overhead = self.sampler_overhead()
        return {"stages": stages, "sampler_overhead": None if overhead is None else round(overhead, 6)}

    def table(self) -> str:
        """A markdown table: stage, calls, total, mean (milliseconds)."""
        rows = []
        for stage in self.stages:
            values = self._stages[stage]
            rows.append([stage, len(values), f"{1e3 * sum(values):.1f}", f"{1e3 * sum(values) / len(values):.2f}"])
        text = markdown_table(["stage", "calls", "total ms", "mean ms"], rows)
        overhead = self.sampler_overhead()
        if overhead is not None:
            text += f"\n\nsampler overhead: {100 * overhead:.2f}% of the denoising steps"
        return text

    def __repr__(self) -> str:
        return "Timings(" + ", ".join(f"{s}={self.total(s):.3f}s" for s in self.stages) + ")"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w)
                                 for c, w, num in zip(row, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%x"))
    except ValueError:
        return False
    return True


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON, atomically and with normal permissions (hidream_export.files)."""
    return atomic_write_json(path, dict(data))
