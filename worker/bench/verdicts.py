"""The issue's bars, and each attack's two halves, computed from bench records instead of read off tables.

    python -m worker.bench.verdicts docs/results/bench-tables.json docs/results/bench-noisy.json
    python -m worker.bench.verdicts --methods mixunlearn,repair docs/results/bench-paper-repair.json

prints two Markdown tables: every bar for the methods judged (both MixUnlearn modes unless ``--methods`` names
others; met / not met, with the numbers it compares, or "not measured" where a run did not record a metric),
and, per setup and method, each attack's ASR with the share of D_f it calls members and of held-out data it
calls non-members (the ASR is their mean). Pure Python, like ``report``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.bench.report import RETRAIN, method_name

MODES = ("mixunlearn", "mixunlearn-agnostic")
Records = list[dict[str, Any]]


@dataclass(frozen=True)
class Bar:
    setup: str  # "class", "data", "noisy" or "random 0.02"
    text: str
    # (mode's mean metrics, Retrain's mean metrics, mode's mean time ratio) -> (met, the numbers shown); met
    # is None where the runs did not record the metric (the shadow-model attack with --shadow-models 0)
    check: Callable[[dict[str, float], dict[str, float], float], tuple[bool | None, str]]


def _at_most(
    metric: str, limit: float
) -> Callable[[dict[str, float], dict[str, float], float], tuple[bool | None, str]]:
    return lambda m, _r, _t: (m[metric] <= limit, f"{m[metric]:.2f}")


def _within(
    metric: str, limit: float
) -> Callable[[dict[str, float], dict[str, float], float], tuple[bool | None, str]]:
    def check(m: dict[str, float], r: dict[str, float], _t: float) -> tuple[bool | None, str]:
        if metric not in m or metric not in r:
            return None, "not measured"
        gap = abs(m[metric] - r[metric])
        return gap <= limit, f"{gap:.2f}: {m[metric]:.2f} vs {r[metric]:.2f}"

    return check


def _time(limit: float) -> Callable[[dict[str, float], dict[str, float], float], tuple[bool | None, str]]:
    return lambda _m, _r, t: (t <= limit, f"{t:.2f}")


BARS = (
    Bar("class", "Train_f <= 1 %", _at_most("train_f", 1.0)),
    Bar("class", "Test_f <= 1 %", _at_most("test_f", 1.0)),
    Bar("class", "Test_r within 1.0 of Retrain", _within("test_r", 1.0)),
    Bar("class", "wall <= 40 % of Retrain", _time(0.4)),
    # The earlier engine issue's ASR bar, for both attacks (the paper's cited one is the shadow-model attack).
    Bar("class", "pop-MIA ASR within 5 of Retrain", _within("asr", 5.0)),
    Bar("class", "shadow-MIA ASR within 5 of Retrain", _within("shadow_asr", 5.0)),
    Bar("data", "Train_f within 1.5 of Retrain", _within("train_f", 1.5)),
    Bar("data", "Test within 1.0 of Retrain", _within("test", 1.0)),
    Bar("data", "wall <= 40 % of Retrain", _time(0.4)),
    Bar("noisy", "Train_f within 3 of Retrain", _within("train_f", 3.0)),
    Bar("noisy", "Test within 1.5 of Retrain", _within("test", 1.5)),
    Bar("random 0.02", "Test within 1.0 of Retrain", _within("test", 1.0)),
    Bar("random 0.02", "wall <= 10 % of Retrain", _time(0.1)),
)


def _group(record: dict[str, Any]) -> str:
    frac = record.get("forget_frac")
    return record["setup"] if frac is None else f"{record['setup']} {frac:g}"


def _by_group_method(records: Records) -> dict[tuple[str, str], Records]:
    grouped: dict[tuple[str, str], Records] = {}
    for record in records:
        grouped.setdefault((_group(record), method_name(record["method"])), []).append(record)
    return grouped


def _mean_metrics(rows: Records) -> dict[str, float]:
    names = {k for r in rows for k, v in r["metrics"].items() if v is not None}
    return {k: statistics.fmean(r["metrics"][k] for r in rows) for k in names}


def bars_markdown(records: Records, modes: Sequence[str] = MODES) -> str:
    grouped = _by_group_method(records)
    lines = ["| setup | bar | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for bar in BARS:
        reference = grouped.get((bar.setup, RETRAIN))
        if reference is None:
            continue
        cells = []
        for mode in modes:
            rows = grouped.get((bar.setup, mode))
            if rows is None:
                cells.append("(not run)")
                continue
            ratio = statistics.fmean(r["time_ratio"] for r in rows)
            met, shown = bar.check(_mean_metrics(rows), _mean_metrics(reference), ratio)
            if met is None:
                cells.append(f"({shown})")
                continue
            cells.append(f"{'met' if met else '**not met**'} ({shown}; {len(rows)} seeds)")
        lines.append(f"| {bar.setup} | {bar.text} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def attack_halves_markdown(records: Records, methods: Sequence[str] | None = None) -> str:
    """Per setup and method: each attack's ASR mean and the means of its two halves."""
    halves = "D_f member | held-out non-member"
    header = f"| setup | method | pop-MIA ASR | {halves} | shadow-MIA ASR | {halves} |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for (group, method), rows in _by_group_method(records).items():
        if methods is not None and method not in methods:
            continue
        cells = [group, method]
        for key, parts in (("asr", "asr_parts"), ("shadow_asr", "shadow_asr_parts")):
            values = [r["metrics"].get(key) for r in rows]
            if any(v is None for v in values) or any(r.get(parts) is None for r in rows):
                cells += ["-", "-", "-"]
                continue
            member = statistics.fmean(r[parts]["forget_called_member"] for r in rows)
            nonmember = statistics.fmean(r[parts]["heldout_called_nonmember"] for r in rows)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells += [f"{statistics.fmean(values):.2f} ± {spread:.2f}", f"{member:.1f}", f"{nonmember:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.bench.verdicts", description=__doc__)
    parser.add_argument("records", nargs="+", type=Path, help="JSON records of `lethe bench --json`")
    parser.add_argument("--methods", default=",".join(MODES), help="comma list of the methods to judge")
    args = parser.parse_args(argv)
    modes = tuple(args.methods.split(","))
    records: Records = [r for path in args.records for r in json.loads(path.read_text())]
    sys.stdout.write(bars_markdown(records, modes) + "\n")
    sys.stdout.write(attack_halves_markdown(records, ("original", RETRAIN, *modes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
