"""``lethe bench``: the paper's benchmarks on the built-in datasets.

This module is imported to build the ``lethe`` parser, also in processes that must never load torch: it
imports only argparse and torch-free modules; the runner (torch) is imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from worker.bench.methods import (
    ABLATIONS,
    DEFAULT_METHODS,
    INITIAL,
    KNOWN_METHODS,
    ORIGINAL,
    initial_training_config,
    method_config,
)
from worker.bench.report import format_markdown, format_text, summarise
from worker.bench.setups import DEFAULT_FORGET_FRAC, SETUPS
from worker.datasets import DATASETS
from worker.engine.config import RENAMED_METHODS, ConfigError, renamed_message
from worker.engine.spec import MNIST_CNN_FEATURE_LAYER, MNIST_CNN_FEATURE_LAYERS

# Both built-in datasets have ten classes.
_NUM_CLASSES = 10


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="run the paper's unlearning benchmarks on a built-in dataset",
        description=(
            "Train the initial model once per seed (cached under --cache-dir), run each method from it, and "
            "report mean ± std over seeds with the gap to Retrain. Progress goes to stderr, tables to stdout."
        ),
    )
    parser.add_argument("--dataset", choices=DATASETS, default="mnist5k")
    parser.add_argument(
        "--setup", default="class", help=f"comma list of {', '.join(SETUPS)} (default: class)"
    )
    parser.add_argument(
        "--methods",
        default="all",
        help=f"comma list, or 'all' ({', '.join(DEFAULT_METHODS)}); ablations: {', '.join(ABLATIONS)}",
    )
    parser.add_argument("--seeds", type=int, default=5, help="how many seeds to run (default: 5)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="run seeds K..K+N-1 (default: 0); a validation study takes seeds the reported runs do not",
    )
    parser.add_argument(
        "--forget-class", type=int, default=None, help="class setup: the class to forget (default: 0)"
    )
    parser.add_argument(
        "--forget-frac",
        default=None,
        help=f"random setup: comma list of training-set fractions in (0, 1) (default: {DEFAULT_FORGET_FRAC})",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="write the records here (rewritten after each setup)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="METHOD.FIELD=VALUE",
        help=f"repeatable config override, e.g. mixunlearn.omega=10 ('{INITIAL}.epochs=2': initial model)",
    )
    parser.add_argument(
        "--shadow-models",
        type=int,
        default=8,
        help="shadow models of the shadow-model attack (the shadow-MIA ASR column), trained once per seed on "
        "half of the held-out set; 0 skips that attack (default: 8)",
    )
    parser.add_argument(
        "--steering-references",
        type=int,
        default=4,
        help="reference models a steered method (calibrated) aims by, trained once per seed and label set "
        "outside its timing, as the service's reference set is (even, at least 2; default: 4)",
    )
    parser.add_argument(
        "--feature-layer",
        choices=MNIST_CNN_FEATURE_LAYERS,
        default=None,
        help=f"the CNN layer MixUnlearn's MixBlock reads (default: {MNIST_CNN_FEATURE_LAYER}); changing it "
        "also retrains (identically) the cached initial models, whose cache key includes the spec",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--cache-dir", type=Path, default=Path("results/cache"), help="initial-model cache")
    parser.add_argument(
        "--report", type=Path, default=None, help="only print the tables of an earlier --json file"
    )
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.set_defaults(handler=lambda args: _main(args, parser))


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_value(text: str) -> Any:
    """JSON scalars (10, 0.5, true, "x"), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_overrides(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        method, dot, name = target.partition(".")
        if not (sep and dot and method and name):
            raise ValueError(f"--set expects METHOD.FIELD=VALUE, got {item!r}")
        if method != INITIAL and method not in methods:
            raise ValueError(f"--set {item!r}: {method!r} is not among --methods ({', '.join(methods)})")
        if name == "seed":
            raise ValueError("--set cannot change a seed: see --seeds and --first-seed")
        overrides.setdefault(method, {})[name] = _parse_value(value)
    # Build every config now so a bad field fails before any training starts.
    initial_training_config(overrides.get(INITIAL, {}))
    for method in methods:
        if method != ORIGINAL:
            try:
                method_config(method, overrides.get(method, {}), seed=0)
            except ConfigError as exc:
                raise ConfigError(f"invalid config for {method}: {exc}") from exc
    return overrides


def _methods(text: str) -> list[str]:
    methods = list(DEFAULT_METHODS) if text.strip() == "all" else _comma_list(text)
    renamed = [m for m in methods if m in RENAMED_METHODS]
    if renamed:
        raise ValueError("; ".join(renamed_message(m) for m in renamed))
    unknown = [m for m in methods if m not in KNOWN_METHODS]
    if unknown or not methods:
        raise ValueError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(KNOWN_METHODS)}"
        )
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods lists a method twice: {text}")
    return methods


def _fractions(text: str | None, setups: list[str]) -> tuple[float, ...]:
    if text is None:
        return (DEFAULT_FORGET_FRAC,)
    if "random" not in setups:
        raise ValueError("--forget-frac applies to --setup random only")
    try:
        fracs = tuple(float(item) for item in _comma_list(text))
    except ValueError as exc:
        raise ValueError(f"--forget-frac expects numbers, got {text!r}") from exc
    if not fracs or not all(0.0 < f < 1.0 for f in fracs):
        raise ValueError(f"--forget-frac values must be in (0, 1), got {text!r}")
    return fracs


def _plan_args(args: argparse.Namespace) -> dict[str, Any]:
    setups = _comma_list(args.setup)
    unknown = [s for s in setups if s not in SETUPS]
    if unknown or not setups:
        raise ValueError(
            f"unknown setup(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(SETUPS)}"
        )
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.first_seed < 0:
        raise ValueError(f"--first-seed must be at least 0, got {args.first_seed}")
    if args.shadow_models < 0:
        raise ValueError(f"--shadow-models must be at least 0, got {args.shadow_models}")
    if args.steering_references < 2 or args.steering_references % 2:
        raise ValueError(f"--steering-references must be even and at least 2, got {args.steering_references}")
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.forget_class is not None:
        if "class" not in setups:
            raise ValueError("--forget-class applies to --setup class only")
        if not 0 <= args.forget_class < _NUM_CLASSES:
            raise ValueError(f"--forget-class must be in 0..{_NUM_CLASSES - 1}, got {args.forget_class}")
    methods = _methods(args.methods)
    return {
        "dataset": args.dataset,
        "setups": tuple(setups),
        "methods": tuple(methods),
        "seeds": args.seeds,
        "first_seed": args.first_seed,
        "forget_class": args.forget_class or 0,
        "forget_fracs": _fractions(args.forget_frac, setups),
        "overrides": _parse_overrides(args.overrides, methods),
        "cache_dir": args.cache_dir,
        "shadow_models": args.shadow_models,
        "steering_references": args.steering_references,
        "feature_layer": args.feature_layer,
    }


def _main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    render = format_markdown if args.markdown else format_text
    if args.report is not None:
        if not args.report.is_file():
            parser.error(f"--report: no such file {args.report}")
        sys.stdout.write(render(summarise(json.loads(args.report.read_text()))))
        return 0
    try:
        plan_args = _plan_args(args)
    except (ValueError, ConfigError) as exc:
        parser.error(str(exc))

    import torch  # the engine only now: building the parser must stay torch-free

    from worker.bench.runner import BenchPlan, ProgressPrinter, run_bench, write_records

    torch.set_num_threads(args.threads)
    json_path: Path | None = args.json

    def save(records: list[dict[str, Any]]) -> None:
        if json_path is not None:
            write_records(json_path, records)

    records = run_bench(BenchPlan(**plan_args), ProgressPrinter(), on_records=save)
    sys.stdout.write(render(summarise(records)))
    return 0
