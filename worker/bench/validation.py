"""MixUnlearn's defaults chosen on validation runs the reported tables never see (issue 11, item 4).

Validation protocol: forget class 3, forget class 7 (the tables forget class 0), the data setup and the
noisy-label setup, on seeds 5-7 (noisy: 5-6); every table in docs/benchmarks.md uses seeds 0-4. All
candidates run on the same seeds, so from the same cached initial models, and differ by their config alone.

Selection rule, written before the runs: a candidate qualifies if both modes forget on every class group
(Train_f and Test_f <= 1) and cost at most 0.4x Retrain on every class and data group; among those, the
lowest *score* wins: the gap to Retrain's mean over the accuracies the issue's bars name (class: Train_f,
Test_f, Test_r; data and noisy: Train_f, Test), averaged per group, then over the groups and the two modes
(the noisy setup is label-aware only). The time condition first covered the noisy group too; it was
narrowed to the setups the issue's time bar names once the first results showed 0.79x there (10 epochs
at 1e-4; the defaults ended at 0.44x; the noisy forget set is 30 % of the data), before candidates were
compared. The pop-MIA gap is printed beside the score but not scored: its seed-to-seed std (5-7 points on
3 seeds) is larger than the differences it would decide.

    python -m worker.bench.validation run --references --json results/val/references.json
    python -m worker.bench.validation run --candidates defaults,paper-schedule --json results/val/a.json
    python -m worker.bench.validation report results/val/*.json --json results/validation.json

Time ratios divide a candidate's wall time by Retrain's (same seed and group) from the references run; run
the parts one after another for ratios as trustworthy as the tables'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.bench.report import RETRAIN

MODES = ("mixunlearn", "mixunlearn-agnostic")
FIRST_SEED = 5
REFERENCES = "references"


@dataclass(frozen=True)
class Group:
    name: str
    setup: str
    seeds: int
    forget_class: int = 0
    label_agnostic_too: bool = True  # the noisy setup forgets mislabelled samples: label-aware only

    @property
    def scored(self) -> tuple[str, ...]:
        return ("train_f", "test_f", "test_r") if self.setup == "class" else ("train_f", "test")


GROUPS = (
    Group("class 3", "class", 3, forget_class=3),
    Group("class 7", "class", 3, forget_class=7),
    Group("data", "data", 3),
    Group("noisy", "noisy", 2, label_agnostic_too=False),
)

FEATURE_LAYER = "feature_layer"
# MixUnlearn config overrides, applied to both modes. The engine's defaults came from seed 0 of the reported
# protocol: their schedule (epochs x lr), omega and tau_real are the choices under test. Sharpen's T = 0.3 is
# stated by the paper (A.1) and alpha = 0.75 is its Table 3 value; tau_gen = 1 and tau_mix = 10 are values of
# A.1's grids that the paper does not pin for MNIST, not searched here. Schedules keep about the same
# lr x epochs (1.0e-3 to 1.2e-3) except the short and the long one, which bracket it.
CANDIDATES: dict[str, dict[str, Any]] = {
    "defaults": {},  # 6 epochs at 2e-4, omega 10
    "paper-schedule": {"epochs": 20, "lr": 5e-5},  # A.1
    "4x3e-4": {"epochs": 4, "lr": 3e-4},
    "10x1e-4": {"epochs": 10, "lr": 1e-4},
    "3x2e-4": {"epochs": 3, "lr": 2e-4},
    "10x2e-4": {"epochs": 10, "lr": 2e-4},
    "omega=1": {"omega": 1.0},
    "omega=3": {"omega": 3.0},
    "omega=30": {"omega": 30.0},
    # tau_real = 10 is a value of A.1's grid {2, 5, 10, 20, 40}, but the paper does not say which one it
    # used on MNIST: the grid's upper values are candidates too.
    "tau_real=20": {"tau_real": 20.0},
    "tau_real=40": {"tau_real": 40.0},
    # Item 7: the layer the MixBlock reads (not a config field: the bench plan's feature_layer). The initial
    # models train identically for every layer (the cache key includes the spec), so the references hold.
    "layer=block1": {FEATURE_LAYER: "features.block1"},  # 16 x 14 x 14
    "layer=fc256": {FEATURE_LAYER: "classifier.2"},  # 256 x 1 x 1, the paper's 66K-parameter block
}
MAX_TIME_RATIO = 0.4
MAX_FORGOTTEN_ACCURACY = 1.0


def run(candidates: Sequence[str], references: bool, json_path: Path | None, threads: int) -> None:
    import torch  # the engine only now: the report reads JSON without it

    from worker.bench.methods import ORIGINAL
    from worker.bench.runner import BenchPlan, ProgressPrinter, run_bench, write_records

    torch.set_num_threads(threads)
    jobs: list[tuple[str, tuple[str, ...], dict[str, Any]]] = (
        [(REFERENCES, (ORIGINAL, RETRAIN), {})] if references else []
    )
    jobs += [(name, MODES, CANDIDATES[name]) for name in candidates]
    records: list[dict[str, Any]] = []
    printer = ProgressPrinter()
    for candidate, methods, candidate_overrides in jobs:
        overrides = {k: v for k, v in candidate_overrides.items() if k != FEATURE_LAYER}
        for group in GROUPS:
            chosen = methods if group.label_agnostic_too or candidate == REFERENCES else methods[:1]
            plan = BenchPlan(
                dataset="mnist5k",
                setups=(group.setup,),
                methods=tuple(chosen),
                seeds=group.seeds,
                first_seed=FIRST_SEED,
                forget_class=group.forget_class,
                overrides={method: overrides for method in chosen if overrides},
                shadow_models=0,
                feature_layer=candidate_overrides.get(FEATURE_LAYER),
            )
            printer.note(f"validation: {candidate} on {group.name}")
            for record in run_bench(plan, printer):
                records.append({**record, "candidate": candidate, "group": group.name})
            if json_path is not None:
                write_records(json_path, records)


@dataclass(frozen=True)
class CandidateResult:
    candidate: str
    overrides: dict[str, Any]
    # group -> mode -> metric -> mean over seeds
    means: dict[str, dict[str, dict[str, float]]]
    group_gaps: dict[str, dict[str, float]]  # group -> mode -> gap over the group's scored metrics
    score: float  # mean gap over the scored metrics, groups and modes
    asr_gap: float  # the same average for the pop-MIA ASR (shown, not scored)
    max_forgotten: float  # the largest class-group Train_f / Test_f mean of either mode
    max_time_ratio: float  # the largest class- or data-group mean time ratio of either mode
    seeds_complete: bool

    @property
    def qualifies(self) -> bool:
        return (
            self.seeds_complete
            and self.max_forgotten <= MAX_FORGOTTEN_ACCURACY
            and self.max_time_ratio <= MAX_TIME_RATIO
        )


def _means(rows: list[dict[str, Any]], metric: str) -> float:
    return statistics.fmean(r["metrics"][metric] for r in rows)


def evaluate(records: Sequence[dict[str, Any]]) -> list[CandidateResult]:
    """One result per candidate found in ``records`` (the references must be among them)."""
    by_key: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for record in records:
        by_key.setdefault((record["candidate"], record["group"], record["method"]), []).append(record)
    results = []
    for candidate in dict.fromkeys(r["candidate"] for r in records if r["candidate"] != REFERENCES):
        gaps: list[float] = []
        asr_gaps: list[float] = []
        forgotten: list[float] = []
        ratios: list[float] = []
        means: dict[str, dict[str, dict[str, float]]] = {}
        group_gaps: dict[str, dict[str, float]] = {}
        complete = True
        for group in GROUPS:
            reference = by_key.get((REFERENCES, group.name, RETRAIN), [])
            if not reference:
                raise ValueError(f"no Retrain references for group {group.name!r}")
            retrain_wall = {r["seed"]: r["wall_s"] for r in reference}
            for mode in MODES if group.label_agnostic_too else MODES[:1]:
                rows = by_key.get((candidate, group.name, mode), [])
                complete &= len(rows) == group.seeds
                if not rows:
                    continue
                metrics = {m: _means(rows, m) for m in (*group.scored, "asr")}
                means.setdefault(group.name, {})[mode] = metrics
                gap = statistics.fmean(abs(metrics[m] - _means(reference, m)) for m in group.scored)
                group_gaps.setdefault(group.name, {})[mode] = gap
                gaps.append(gap)
                asr_gaps.append(abs(metrics["asr"] - _means(reference, "asr")))
                if group.setup == "class":
                    forgotten += [metrics["train_f"], metrics["test_f"]]
                if group.setup != "noisy":
                    ratios.append(statistics.fmean(r["wall_s"] / retrain_wall[r["seed"]] for r in rows))
        results.append(
            CandidateResult(
                candidate=candidate,
                overrides=CANDIDATES.get(candidate, {}),
                means=means,
                group_gaps=group_gaps,
                score=statistics.fmean(gaps),
                asr_gap=statistics.fmean(asr_gaps),
                max_forgotten=max(forgotten, default=0.0),
                max_time_ratio=max(ratios),
                seeds_complete=complete,
            )
        )
    return results


def chosen(results: Sequence[CandidateResult]) -> CandidateResult | None:
    qualifying = [r for r in results if r.qualifies]
    return min(qualifying, key=lambda r: r.score) if qualifying else None


def format_markdown(results: Sequence[CandidateResult]) -> str:
    winner = chosen(results)
    groups = [g.name for g in GROUPS]
    header = [
        "candidate", "score", *(f"{g} gap" for g in groups), "pop-MIA gap", "max Train_f/Test_f",
        "max time ratio",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in sorted(results, key=lambda r: r.score):
        per_group = [
            " / ".join(f"{gap:.2f}" for gap in result.group_gaps.get(group, {}).values()) or "-"
            for group in groups
        ]
        name = (
            result.candidate + (" (chosen)" if result is winner else "") + ("" if result.qualifies else " ✗")
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    f"{result.score:.2f}",
                    *per_group,
                    f"{result.asr_gap:.2f}",
                    f"{result.max_forgotten:.2f}",
                    f"{result.max_time_ratio:.2f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.bench.validation", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser(
        "run", help="run candidates (and/or the references) on the validation groups"
    )
    run_parser.add_argument("--candidates", default="", help=f"comma list of {', '.join(CANDIDATES)}")
    run_parser.add_argument("--references", action="store_true", help="also run original and Retrain")
    run_parser.add_argument("--json", type=Path)
    run_parser.add_argument("--threads", type=int, default=1)
    report_parser = commands.add_parser("report", help="score the candidates of one or more run files")
    report_parser.add_argument("files", nargs="+", type=Path)
    report_parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        names = [n for n in args.candidates.split(",") if n]
        unknown = [n for n in names if n not in CANDIDATES]
        if unknown or not (names or args.references):
            parser.error(f"unknown or no candidates {unknown}; known: {', '.join(CANDIDATES)}")
        run(names, args.references, args.json, args.threads)
        return 0
    records = [r for path in args.files for r in json.loads(path.read_text())]
    results = evaluate(records)
    sys.stdout.write(format_markdown(results))
    if args.json is not None:
        winner = chosen(results)
        summary = {
            "rule": __doc__.split("\n\n")[2],
            "chosen": None if winner is None else winner.candidate,
            "candidates": [{**dataclasses.asdict(r), "qualifies": r.qualifies} for r in results],
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
