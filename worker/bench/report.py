"""Tables from bench records: per method, mean ± std over seeds, the gap to Retrain's mean, the time ratio.

Pure Python (no torch), so an earlier run's JSON can be re-read anywhere. std is the sample std (n - 1).
Records of a renamed method (``lmix``) are reported under its new name.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from worker.engine.config import RENAMED_METHODS

METRICS: tuple[str, ...] = ("train_r", "train_f", "test", "test_r", "test_f", "asr", "shadow_asr")
# Column headers. "asr" is the paper's column name kept as the record key, but the attack behind it is the
# LAF-style population attack (worker.evaluation.metrics.population_attack), not the Shokri et al.
# shadow-model attack the paper cites; that one is "shadow_asr" (worker.evaluation.shadow), shown but not
# judged.
COLUMN_LABELS: dict[str, str] = {"asr": "pop-MIA ASR", "shadow_asr": "shadow-MIA ASR"}
# The metrics each setup is judged on (paper 5.3); "mean abs Δ" averages the gaps over these.
SETUP_METRICS: dict[str, tuple[str, ...]] = {
    "class": ("test_r", "test_f", "asr"),
    "data": ("train_r", "train_f", "test", "asr"),
    "noisy": ("train_r", "train_f", "test", "asr"),
    "random": ("train_r", "train_f", "test", "asr"),
}
RETRAIN = "retrain"


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass(frozen=True)
class MethodSummary:
    method: str
    seeds: int
    metrics: dict[str, Stat]  # only the metrics the records define (test_r / test_f are None without classes)
    gaps: dict[str, float]  # |mean - Retrain's mean| for the setup's metrics; empty without Retrain
    mean_gap: float | None
    time_ratio: Stat | None
    wall_s: Stat


@dataclass(frozen=True)
class GroupSummary:
    dataset: str
    setup: str
    forget_frac: float | None
    forget_size: Stat
    methods: list[MethodSummary]

    @property
    def title(self) -> str:
        frac = "" if self.forget_frac is None else f", forget_frac={self.forget_frac:g}"
        return f"{self.dataset} / {self.setup}{frac} (forget set: {self.forget_size.mean:.0f} samples)"

    @property
    def columns(self) -> list[str]:
        return [m for m in METRICS if any(m in s.metrics for s in self.methods)]


def summarise(records: Iterable[dict[str, Any]]) -> list[GroupSummary]:
    """Group by (dataset, setup, forget_frac), then by method, both in order of first appearance."""
    groups: dict[tuple[str, str, float | None], dict[str, list[dict[str, Any]]]] = {}
    for record in records:
        key = (record["dataset"], record["setup"], record.get("forget_frac"))
        groups.setdefault(key, {}).setdefault(method_name(record["method"]), []).append(record)
    return [_summarise_group(*key, by_method) for key, by_method in groups.items()]


def method_name(recorded: str) -> str:
    """A record's method under its current name (records written before a rename keep the old one)."""
    return RENAMED_METHODS[recorded][0] if recorded in RENAMED_METHODS else recorded


def column_label(metric: str) -> str:
    return COLUMN_LABELS.get(metric, metric)


def _summarise_group(
    dataset: str, setup: str, forget_frac: float | None, by_method: dict[str, list[dict[str, Any]]]
) -> GroupSummary:
    stats = {
        method: {
            name: Stat.of(values)
            for name in METRICS
            if (values := [r["metrics"][name] for r in rows if r["metrics"].get(name) is not None])
        }
        for method, rows in by_method.items()
    }
    reference = stats.get(RETRAIN)
    judged = SETUP_METRICS[setup]
    summaries = []
    for method, rows in by_method.items():
        gaps = (
            {
                m: abs(stats[method][m].mean - reference[m].mean)
                for m in judged
                if m in stats[method] and m in reference
            }
            if reference
            else {}
        )
        ratios = [r["time_ratio"] for r in rows if r.get("time_ratio") is not None]
        summaries.append(
            MethodSummary(
                method=method,
                seeds=len(rows),
                metrics=stats[method],
                gaps=gaps,
                mean_gap=statistics.fmean(gaps.values()) if gaps else None,
                time_ratio=Stat.of(ratios) if ratios else None,
                wall_s=Stat.of([r["wall_s"] for r in rows]),
            )
        )
    sizes = [r["forget_size"] for rows in by_method.values() for r in rows]
    return GroupSummary(dataset, setup, forget_frac, Stat.of(sizes), summaries)


def _cells(group: GroupSummary, summary: MethodSummary) -> list[str]:
    cells = [summary.method, str(summary.seeds)]
    for name in group.columns:
        stat = summary.metrics.get(name)
        gap = summary.gaps.get(name)
        cells.append("-" if stat is None else str(stat) + ("" if gap is None else f" (Δ{gap:.2f})"))
    cells.append("-" if summary.mean_gap is None else f"{summary.mean_gap:.2f}")
    cells.append("-" if summary.time_ratio is None else str(summary.time_ratio))
    cells.append(f"{summary.wall_s.mean:.1f}")
    return cells


def _header(group: GroupSummary) -> list[str]:
    return ["method", "seeds", *map(column_label, group.columns), "mean abs Δ", "time ratio", "wall s"]


def format_text(groups: Sequence[GroupSummary]) -> str:
    """Aligned plain-text tables; (Δx) is the absolute gap to Retrain's mean on the setup's metrics."""
    blocks = []
    for group in groups:
        rows = [_header(group), *(_cells(group, s) for s in group.methods)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        blocks.append("\n".join([group.title, *lines]))
    return "\n\n".join(blocks) + "\n"


def format_markdown(groups: Sequence[GroupSummary]) -> str:
    blocks = []
    for group in groups:
        header = _header(group)
        lines = [f"**{group.title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_cells(group, s)) + " |" for s in group.methods]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
