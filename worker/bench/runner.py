"""Runs a benchmark plan: per seed, one initial model (cached on disk), then every method from it.

Timing covers the ``unlearn`` call only (evaluation excluded); ``time_ratio`` divides it by Retrain's wall
clock in the same seed and setup, so it is null when Retrain is not among the methods.

Two membership attacks score every model: ``asr``, the LAF-style population attack the engine and the
service report (``worker.evaluation.metrics.population_attack``; the key keeps the paper's column name), and
``shadow_asr``, Shokri et al.'s shadow-model attack (``worker.evaluation.shadow``; its shadow models train
once per seed on half of the held-out set, with the initial model's recipe). ``shadow_models=0`` skips the
latter (``shadow_asr`` is then null).

A steered method (``calibrated``) aims each forget sample at the median score of reference models that never
trained on it. Its bench runs build those steering references as the service does (``steering_references``
models on balanced random halves of the training rows, with the initial model's recipe and labels; once per
seed and label set, cached) and, like the service's reference set, outside the timed call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from worker.audit.references import LabelledRows, ReferenceSet, build_reference_set
from worker.bench.methods import (
    INITIAL,
    ORIGINAL,
    engine_method,
    initial_training_config,
    is_label_aware,
    method_config,
)
from worker.bench.report import RETRAIN, column_label
from worker.bench.setups import DEFAULT_FORGET_FRAC, Setup, build_setup
from worker.checkpoints import load_state_dict, state_dict_to_bytes
from worker.datasets import BuiltinDataset, load_dataset
from worker.engine.api import treatment, unlearn
from worker.engine.config import METHODS, CalibratedConfig, TrainingConfig, config_to_dict
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.methods import calibrated
from worker.engine.methods.calibrated import MATCHING
from worker.engine.models import build_model
from worker.engine.progress import ProgressCallback, ProgressEvent
from worker.engine.runtime import Runtime
from worker.engine.spec import ModelSpec, mnist_cnn_spec
from worker.engine.training import train
from worker.evaluation.metrics import (
    MembershipAttack,
    confidence_profile,
    paper_metrics,
    population_attack,
)
from worker.evaluation.shadow import ShadowAttack, fit_shadow_attack, shadow_seed

Record = dict[str, Any]

# The steering references' seed is the run's seed plus this (as in the audit's calibration study), so their
# halves and initialisations are not the initial model's.
STEERING_SEED_OFFSET = 4241


@dataclass(frozen=True)
class BenchPlan:
    dataset: str
    setups: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: int
    # Seeds first_seed .. first_seed + seeds - 1: a validation run takes seeds disjoint from a reported one.
    first_seed: int = 0
    forget_class: int = 0
    forget_fracs: tuple[float, ...] = (DEFAULT_FORGET_FRAC,)
    # bench method name (or "initial") -> config field overrides
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache_dir: Path = Path("results/cache")
    # Shadow models of the shadow-model attack (shadow_asr), trained once per seed; 0 skips that attack.
    shadow_models: int = 8
    # The layer MixUnlearn's MixBlock reads (None: the spec's default, features.block1, 16 x 14 x 14).
    feature_layer: str | None = None
    # Steering references of a steered method, trained once per seed and label set (even, at least 2).
    steering_references: int = 4

    def variants(self) -> list[tuple[str, float | None]]:
        """(setup, forget_frac) pairs: the random setup once per fraction, the others once."""
        return [
            (setup, frac)
            for setup in self.setups
            for frac in (self.forget_fracs if setup == "random" else (None,))
        ]


class ProgressPrinter:
    """Status lines on a stream (stderr): at most one per ``interval`` seconds per run, plus its last step."""

    def __init__(self, stream: TextIO = sys.stderr, interval: float = 1.0) -> None:
        self.stream = stream
        self.interval = interval

    def note(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def callback(self, prefix: str) -> ProgressCallback:
        last = -math.inf

        def on_event(event: ProgressEvent) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < self.interval and event.step != event.total_steps:
                return
            last = now
            losses = " ".join(f"{name}={value:.4f}" for name, value in event.losses.items())
            steps = f"step {event.step}/{event.total_steps} epoch {event.epoch}/{event.total_epochs}"
            self.note(f"{prefix}: {steps} {losses}")

        return on_event


def _split(x: torch.Tensor, rows: np.ndarray, labels: np.ndarray | None) -> TensorSplit:
    index = torch.from_numpy(rows)
    return TensorSplit(x[index], None if labels is None else torch.from_numpy(labels[rows]), index)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def write_records(path: Path, records: list[Record]) -> None:
    """Atomically (re)write the JSON list, so a run killed midway leaves every finished seed readable."""
    _atomic_write(path, (json.dumps(records, indent=1) + "\n").encode())


def _labels_hash(spec: ModelSpec, rows: np.ndarray, labels: np.ndarray, config: TrainingConfig) -> str:
    """Everything the initial model depends on besides the seed: the architecture, the training rows, the
    labels it trains with (the noisy setup changes them) and its training config."""
    digest = hashlib.sha256(json.dumps([spec.to_dict(), dataclasses.asdict(config)], sort_keys=True).encode())
    digest.update(rows.astype(np.int64).tobytes())
    digest.update(labels[rows].astype(np.int64).tobytes())
    return digest.hexdigest()[:12]


def untrained_initial_model(spec: ModelSpec, seed: int) -> nn.Module:
    """The initial model before training: built right after ``torch.manual_seed(seed)`` (the run's seed, on
    the global RNG). Retrain's fresh model comes from its own stream derived from the same seed
    (``worker.engine.methods.retrain.retrain_seed``), so it never starts from these weights."""
    torch.manual_seed(seed)
    return build_model(spec)


@dataclass
class _Run:
    """What every (seed, setup) of one plan shares."""

    plan: BenchPlan
    dataset: BuiltinDataset
    x: torch.Tensor
    spec: ModelSpec
    initial_config: TrainingConfig
    runtime: Runtime
    printer: ProgressPrinter
    shadows: dict[int, ShadowAttack] = field(default_factory=dict)
    steering: dict[str, ReferenceSet] = field(default_factory=dict)

    def _cache_path(self, setup: Setup, seed: int, kind: str = "") -> Path:
        key = _labels_hash(self.spec, self.dataset.train_rows, setup.train_labels, self.initial_config)
        return self.plan.cache_dir / f"{self.dataset.name}-{key}-seed{seed}{kind}.safetensors"

    def initial_model(self, setup: Setup, seed: int) -> nn.Module:
        """The model trained on every training row with the setup's labels; cached as safetensors (never
        pickle) because the class, data and random setups share it."""
        path = self._cache_path(setup, seed)
        if path.exists():
            self.printer.note(f"initial model: cached {path}")
            return load_state_dict(path.read_bytes(), self.spec).to(self.runtime.device)
        model = untrained_initial_model(self.spec, seed)
        progress = self.printer.callback(f"initial model seed {seed}")
        ctx = RunContext(runtime=self.runtime, progress=progress, seed=seed)
        train(model, _split(self.x, self.dataset.train_rows, setup.train_labels), self.initial_config, ctx)
        _atomic_write(path, state_dict_to_bytes(model))
        self.printer.note(f"initial model: trained and cached at {path}")
        return model

    def steering_set(self, setup: Setup, seed: int) -> ReferenceSet:
        """The steering references of this seed and the setup's training labels, built on first use and
        cached (the class, data and random setups share one; the noisy setup's labels differ)."""
        count = self.plan.steering_references
        path = self._cache_path(setup, seed, f"-steering{count}")
        if str(path) in self.steering:
            return self.steering[str(path)]
        if path.exists():
            built = ReferenceSet.from_bytes(path.read_bytes())
            self.printer.note(f"steering references: cached {path}")
        else:

            def rows(split: np.ndarray, labels: np.ndarray) -> LabelledRows:
                return LabelledRows(self.x[torch.from_numpy(split)], labels[split], split)

            built = build_reference_set(
                self.spec,
                rows(self.dataset.train_rows, setup.train_labels),
                rows(self.dataset.heldout_rows, self.dataset.y),
                self.initial_config,
                k=0,
                steering=count,
                seed=seed + STEERING_SEED_OFFSET,
                runtime=self.runtime,
                progress=self.printer.callback(f"steering references seed {seed}"),
            )
            _atomic_write(path, built.to_bytes())
            self.printer.note(f"steering references: {count} trained in {built.build_seconds:.1f} s: {path}")
        self.steering[str(path)] = built
        return built

    def shadow_attack(self, seed: int, test: TensorSplit) -> ShadowAttack | None:
        """The shadow-model attack of this seed (``test``: the held-out split), fitted on first use; every
        setup and method of the seed is scored with it (it depends on the held-out data and recipe only)."""
        if self.plan.shadow_models < 1:
            return None
        if seed not in self.shadows:
            started = time.perf_counter()

            def train_shadow(data: TensorSplit, index: int) -> nn.Module:
                own = shadow_seed(seed, index)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(own)
                    model = build_model(self.spec)
                return train(model, data, self.initial_config, RunContext(runtime=self.runtime, seed=own))

            self.shadows[seed] = fit_shadow_attack(
                test, train_shadow, num_shadows=self.plan.shadow_models, seed=seed, runtime=self.runtime
            )
            elapsed = time.perf_counter() - started
            count = self.plan.shadow_models
            self.printer.note(f"shadow attack seed {seed}: {count} shadow models trained in {elapsed:.1f} s")
        return self.shadows[seed]

    def _unlearn(
        self, initial: nn.Module, setup: Setup, method: str, seed: int, prefix: str
    ) -> tuple[nn.Module, float, dict[str, Any]]:
        config = method_config(method, self.plan.overrides.get(method, {}), seed)
        if isinstance(config, CalibratedConfig):  # its budget as the job sets it: a share of a retrain
            config = calibrated.with_retrain_budget(config, self.initial_config, len(setup.retain_rows))
        # A label-agnostic method gets no labels at all, so it cannot use them by accident.
        labels = setup.train_labels if is_label_aware(method) else None
        forget = _split(self.x, setup.forget_rows, labels)
        retain = _split(self.x, setup.retain_rows, labels)
        # A method that routes by the forget set's shape says which treatment runs; the steering references
        # are built only where the steered one does.
        chosen = treatment(forget, retain, config)
        if METHODS[engine_method(method)].steered and (chosen is None or chosen["name"] == MATCHING):
            margin = config.margin if isinstance(config, CalibratedConfig) else 0.0
            targets = self.steering_set(setup, seed).steering_set().targets(setup.forget_rows, margin)
            forget = dataclasses.replace(forget, targets=torch.from_numpy(targets))
        progress = self.printer.callback(f"{prefix} {method}")
        torch.manual_seed(seed)
        start = time.perf_counter()
        model = unlearn(initial, self.spec, forget, retain, config, progress=progress, runtime=self.runtime)
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        described = config_to_dict(config)
        if forget.targets is not None:
            described["steering_references"] = self.plan.steering_references
        if chosen is not None:
            described["treatment"] = chosen["name"]
        return model, wall, described

    def run_setup(self, setup: Setup, seed: int, prefix: str) -> list[Record]:
        initial = self.initial_model(setup, seed)
        # Train_r / Train_f use the labels the initial model trained with; Test uses the true labels.
        forget = _split(self.x, setup.forget_rows, setup.train_labels)
        retain = _split(self.x, setup.retain_rows, setup.train_labels)
        test = _split(self.x, self.dataset.heldout_rows, self.dataset.y)
        shadow = self.shadow_attack(seed, test)
        records: list[Record] = []
        for method in self.plan.methods:
            if method == ORIGINAL:
                model, wall, config = initial, 0.0, dataclasses.asdict(self.initial_config)
            else:
                model, wall, config = self._unlearn(initial, setup, method, seed, prefix)
            attack = population_attack(model, forget, retain, test, seed=seed, runtime=self.runtime)
            shadow_attack = None if shadow is None else shadow.evaluate(model, forget, test, self.runtime)
            metrics: dict[str, float | None] = paper_metrics(
                model,
                train_retain=retain,
                train_forget=forget,
                test=test,
                forget_classes=None if setup.forget_classes is None else set(setup.forget_classes),
                asr_seed=seed,
                runtime=self.runtime,
                attack=attack,
            )
            metrics["shadow_asr"] = None if shadow_attack is None else shadow_attack.asr
            shown = " ".join(f"{column_label(k)}={v:.2f}" for k, v in metrics.items() if v is not None)
            self.printer.note(f"{prefix} {method}: {wall:.1f} s, {shown}")
            records.append(
                {
                    "method": method,
                    "setup": setup.name,
                    "seed": seed,
                    "dataset": self.dataset.name,
                    "forget_frac": setup.forget_frac,
                    "forget_size": len(setup.forget_rows),
                    "feature_layer": self.spec.feature_layer,
                    "metrics": metrics,
                    # Why each attack's ASR moves: the share of D_f it calls members, and of held-out data
                    # it calls non-members (the ASR is their mean).
                    "asr_parts": _parts(attack),
                    "shadow_asr_parts": None if shadow_attack is None else _parts(shadow_attack),
                    # What both attacks read: how confident the model is on D_f, D_r and held-out data.
                    "confidence": {
                        name: confidence_profile(model, split, self.runtime)
                        for name, split in (("forget", forget), ("retain", retain), ("heldout", test))
                    },
                    "wall_s": wall,
                    "time_ratio": None,
                    "config": config,
                }
            )
        retrain_wall = next((r["wall_s"] for r in records if r["method"] == RETRAIN), None)
        if retrain_wall:
            for record in records:
                record["time_ratio"] = record["wall_s"] / retrain_wall
        return records


def _spec(plan: BenchPlan, dataset: BuiltinDataset) -> ModelSpec:
    spec = mnist_cnn_spec(dataset.num_classes, dataset.input_shape)
    return spec if plan.feature_layer is None else dataclasses.replace(spec, feature_layer=plan.feature_layer)


def _parts(attack: MembershipAttack) -> dict[str, float]:
    return {
        "forget_called_member": attack.forget_called_member,
        "heldout_called_nonmember": attack.heldout_called_nonmember,
    }


def run_bench(
    plan: BenchPlan,
    printer: ProgressPrinter | None = None,
    on_records: Callable[[list[Record]], None] | None = None,
) -> list[Record]:
    """Every (seed, setup, forget_frac, method) of ``plan``; ``on_records`` sees the growing list after each
    setup finishes (the CLI rewrites its JSON there)."""
    dataset = load_dataset(plan.dataset)
    run = _Run(
        plan=plan,
        dataset=dataset,
        x=torch.from_numpy(dataset.x),
        spec=_spec(plan, dataset),
        initial_config=initial_training_config(plan.overrides.get(INITIAL, {})),
        runtime=Runtime.detect(),
        printer=printer or ProgressPrinter(),
    )
    records: list[Record] = []
    for count, seed in enumerate(range(plan.first_seed, plan.first_seed + plan.seeds), start=1):
        for setup_name, frac in plan.variants():
            setup = build_setup(
                setup_name,
                dataset.y,
                dataset.train_rows,
                dataset.num_classes,
                seed=seed,
                forget_class=plan.forget_class,
                forget_frac=frac or DEFAULT_FORGET_FRAC,
            )
            label = setup_name if frac is None else f"{setup_name} F={frac:g}"
            records += run.run_setup(setup, seed, f"[seed {seed}, {count}/{plan.seeds}] {label}")
            if on_records is not None:
                on_records(records)
    return records
