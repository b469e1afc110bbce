"""Calibration of the per-sample membership audit on mnist5k: does it accept exact retraining, reject a
no-op where the base model memorised something, and what does it say of MixUnlearn?

One initial model, one reference set, then per data subject three unlearnings from the same initial model:
exact retrain (its own initialisation stream), a no-op (fine-tune at lr 1e-9 for one epoch) and MixUnlearn
(defaults). Subjects are random groups of train samples (they span classes, as real people's data does).
The "atypical" subjects carry a few wrong labels, the model trained with them: the realistic leak a no-op
leaves in place. A wrong label counts as memorised when the initial model predicts it.

    python -m worker.bench.audit_calibration --json docs/results/audit-calibration.json

Models are cached (--cache-dir): a second run with the same protocol re-scores the audit without retraining;
the unlearning times it reports are those measured when each model was trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.audit import AuditRules, LabelledRows, ReferenceSet, audit_unlearning, build_reference_set
from worker.checkpoints import load_state_dict, state_dict_to_bytes
from worker.datasets.builtin import DATASETS, load_dataset
from worker.engine.api import unlearn
from worker.engine.config import CalibratedConfig, TrainingConfig, make_config
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.methods import calibrated
from worker.engine.models import build_model
from worker.engine.runtime import CPU
from worker.engine.spec import ModelSpec, mnist_cnn_spec
from worker.engine.training import predict_logits, train
from worker.evaluation.metrics import ScoredModel

WAYS: dict[str, tuple[str, dict[str, Any]]] = {
    "retrain": ("retrain", {}),
    "noop": ("finetune", {"lr": 1e-9, "epochs": 1}),
    "mixunlearn": ("mixunlearn", {}),
    # Longer MixUnlearn schedules (the default's 40-step floor is 2 batches x 20 for a 50-sample subject).
    "mixunlearn-200": ("mixunlearn", {"min_steps": 200}),
    "mixunlearn-600": ("mixunlearn", {"min_steps": 600}),
    "mixunlearn-lr1e-3": ("mixunlearn", {"lr": 1e-3, "min_steps": 200}),
    "finetune": ("finetune", {}),
    "finetune-5": ("finetune", {"epochs": 5}),
    "neggrad": ("neggrad", {}),
    # The fast path (issue 20): damage then repair at its defaults, and the alternatives it was chosen against
    # on seed 0 (RepairConfig's docstring has their results; docs/results/fastpath-validation-seed0.json).
    "repair": ("repair", {}),
    "repair-1epoch": ("repair", {"epochs": 1, "min_steps": 0}),
    "repair-reinit1": ("repair", {"reinit_layers": 1, "epochs": 1, "min_steps": 0}),
    "repair-reinit2": ("repair", {"reinit_layers": 2, "epochs": 1, "min_steps": 0}),
    "repair-mixunlearn": ("repair", {"mixunlearn_steps": 40, "epochs": 1, "min_steps": 0}),
    "repair-distill": ("repair", {"distill": 1.0}),
    "repair-distill-half": ("repair", {"distill": 0.5}),
    # Longer repairs (on digits, past the 200-step floor: 8 epochs are 248 steps, as mnist5k's default 2).
    "repair-e8": ("repair", {"epochs": 8}),
    "repair-e12": ("repair", {"epochs": 12}),
    "repair-e16": ("repair", {"epochs": 16}),
    # The repair's learning rate and step floor (RepairConfig's lr: 2e-3 tried on held-out seeds, not kept).
    "repair-lr2": ("repair", {"lr": 2e-3}),
    "repair-lr3": ("repair", {"lr": 3e-3}),
    "repair-m100": ("repair", {"min_steps": 100}),
    "repair-lr3-m100": ("repair", {"lr": 3e-3, "min_steps": 100}),
    # Deeper damage: the last convolution too, or every layer (docs/audit.md, "Deeper damage"; unverifiable).
    "repair-reinit4": ("repair", {"reinit_layers": 4}),
    "repair-reinit5": ("repair", {"reinit_layers": 5}),
    "repair-reinit4-distill": ("repair", {"reinit_layers": 4, "distill": 1.0}),
    # Calibrated forgetting: steered by a reference set of its own (seed + STEERING_SEED_OFFSET), never the
    # gate's or the independent attacker's.
    "calibrated": ("calibrated", {}),
    # Its development alternatives (CalibratedConfig says why each was not kept).
    "calibrated-margin05": ("calibrated", {"margin": 0.5}),
    "calibrated-pull003": ("calibrated", {"pull": 0.03}),
    "calibrated-pull01": ("calibrated", {"pull": 0.1}),
}
STEERING_SEED_OFFSET = 4241
DEFAULT_WAYS = ("retrain", "noop", "mixunlearn", "repair", "calibrated")
# Audits read from the first k references of one set of 16 (whole complementary pairs): the cheaper sets
# (4 is the service's default) and the 16 it had, side by side on the same models.
DEFAULT_AUDIT_KS = (2, 4, 8, 16)


@dataclass(frozen=True)
class Study:
    """One protocol. Its models (initial, references' scores, every unlearned model) are cached under
    ``cache_dir`` by protocol, so the audit can be scored again without retraining (``--rescore``)."""

    subjects: int
    atypical: int
    wrong_labels: int
    samples_per_subject: int
    references: int
    recipe: TrainingConfig
    seed: int
    dataset: str = "mnist5k"

    def key(self) -> str:
        return (
            f"{self.dataset}-s{self.seed}-n{self.subjects}-a{self.atypical}-w{self.wrong_labels}-m{self.samples_per_subject}"
            f"-k{self.references}-e{self.recipe.epochs}"
        )


class ModelCache:
    def __init__(self, root: Path, study: Study) -> None:
        self.dir = root / study.key()
        self.dir.mkdir(parents=True, exist_ok=True)

    def model(
        self, name: str, spec: ModelSpec, make: Callable[[], nn.Module]
    ) -> tuple[nn.Module, float | None]:
        """The cached model, or ``make()``'s (timed, then cached); the seconds are None when cached."""
        path = self.dir / f"{name}.safetensors"
        if path.exists():
            return load_state_dict(path.read_bytes(), spec), None
        started = time.monotonic()
        model = make()
        seconds = time.monotonic() - started
        path.write_bytes(state_dict_to_bytes(model, metadata={"seconds": f"{seconds:.3f}"}))
        return model, seconds

    def seconds(self, name: str) -> float:
        data = (self.dir / f"{name}.safetensors").read_bytes()
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        return float(header["__metadata__"]["seconds"])


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_study(
    study: Study,
    ways: list[str],
    cache: ModelCache,
    only: set[int] | None = None,
    audit_ks: tuple[int, ...] = DEFAULT_AUDIT_KS,
    independent_attack: bool = False,
    steering_references: int = 4,
) -> dict[str, Any]:
    rng = np.random.default_rng(study.seed)
    data = load_dataset(study.dataset)
    spec = mnist_cnn_spec(data.num_classes, data.input_shape)
    x = torch.from_numpy(data.x)
    labels = data.y.copy()
    train_rows = data.train_rows
    order = rng.permutation(train_rows)
    groups = [
        np.sort(order[i * study.samples_per_subject : (i + 1) * study.samples_per_subject])
        for i in range(study.subjects)
    ]
    flipped: dict[int, np.ndarray] = {}
    for s in range(study.atypical):
        rows = rng.choice(groups[s], study.wrong_labels, replace=False)
        labels[rows] = (labels[rows] + rng.integers(1, data.num_classes, len(rows))) % data.num_classes
        flipped[s] = rows

    def split(rows: np.ndarray) -> TensorSplit:
        index = torch.from_numpy(rows)
        return TensorSplit(x[index], torch.from_numpy(labels[rows]), index)

    def train_initial() -> nn.Module:
        torch.manual_seed(study.seed)
        model: nn.Module = build_model(spec)
        return train(model, split(train_rows), study.recipe, RunContext(seed=study.seed))

    _log(f"initial model: {study.recipe}")
    initial, _ = cache.model("initial", spec, train_initial)
    timings = {"initial_training_s": cache.seconds("initial")}

    def reference_set(name: str, seed: int, k: int = study.references) -> ReferenceSet:
        path = cache.dir / f"{name}.safetensors"
        if path.exists():
            return ReferenceSet.from_bytes(path.read_bytes())
        _log(f"{name}: {k} models")
        built = build_reference_set(
            spec,
            LabelledRows(x[torch.from_numpy(train_rows)], labels[train_rows], train_rows),
            LabelledRows(
                x[torch.from_numpy(data.heldout_rows)], labels[data.heldout_rows], data.heldout_rows
            ),
            study.recipe,
            k=k,
            seed=seed,
        )
        path.write_bytes(built.to_bytes())
        return built

    refs = reference_set("references", study.seed + 1)
    # A second attacker: its own reference models (another seed, so other halves and initialisations),
    # never read by the gate, judging the versions the gate accepted.
    independent = reference_set("references-independent", study.seed + 7919) if independent_attack else None
    # The steering set's name and the steered models' cache names carry its size where it is not the default.
    steering_tag = "" if steering_references == 4 else f"-k{steering_references}"
    steering = (
        reference_set(
            f"references-steering{steering_tag}", study.seed + STEERING_SEED_OFFSET, steering_references
        )
        if any(WAYS[way][0] == "calibrated" for way in ways)
        else None
    )
    timings["reference_build_s"] = refs.build_seconds
    rules = AuditRules()
    audit_x = x[torch.from_numpy(refs.audit_rows)]
    forget_x = {s: x[torch.from_numpy(rows)] for s, rows in enumerate(groups)}
    sets = {k: refs.first(k) for k in audit_ks}
    base_predictions = predict_logits(initial, x, RunContext()).argmax(1).numpy()

    records: list[dict[str, Any]] = []
    for s, rows in enumerate(groups):
        if only is not None and s not in only:
            continue
        memorised = int((base_predictions[flipped[s]] == labels[flipped[s]]).sum()) if s in flipped else 0
        remaining = np.setdiff1d(train_rows, rows)
        held = (x[torch.from_numpy(remaining)], remaining)
        for way in ways:
            method, overrides = WAYS[way]
            if method == "retrain":  # exact retraining follows the model's own recipe
                overrides = {"epochs": study.recipe.epochs, "lr": study.recipe.lr}
            config = make_config(method, {**overrides, "seed": 10_000 + s})
            forget = split(rows)
            name = f"subject{s:02d}-{way}"
            if isinstance(config, CalibratedConfig):  # as the service runs it: its budget, its targets
                config = calibrated.with_retrain_budget(config, study.recipe, len(remaining))
                if steering is not None:
                    targets = steering.targets(rows, config.margin)
                    forget = dataclasses.replace(forget, targets=torch.from_numpy(targets))
                # The cache name carries what changes the model: the steering set's size, the step floor.
                name += f"{steering_tag}-floor{calibrated.step_floor(config)}"
            model, _ = cache.model(
                name,
                spec,
                functools.partial(unlearn, initial, spec, forget, split(remaining), config),
            )
            unlearn_s = cache.seconds(name)

            # The audit with a given reference set (a fresh base: a job scores its base model too).
            audit_with = functools.partial(
                audit_unlearning,
                ScoredModel(initial, CPU),
                ScoredModel(model, CPU),
                forget_x=forget_x[s],
                forget_rows=rows,
                forget_sample_ids=[data.sample_ids[r] for r in rows],
                forget_subjects=[f"subject-{s:02d}"] * len(rows),
                audit_x=audit_x,
                audit_rows=refs.audit_rows,
                rules=rules,
                runtime=CPU,
                held=held,
            )
            audits = {k: audit_with(sets[k]) for k in audit_ks}
            record = {
                "subject": s,
                "atypical": s in flipped,
                "memorised_wrong_labels": memorised,
                "way": way,
                "unlearn_seconds": round(unlearn_s, 3),
                "audits": {str(k): _audit_record(audit) for k, audit in audits.items()},
            }
            if independent is not None:
                record["independent"] = _audit_record(audit_with(independent))
            records.append(record)
            line = " ".join(
                f"k{k}:{'PASS' if a['gate']['passed'] else 'FAIL'} {a['verdict']:<20}"
                for k, a in audits.items()
            )
            _log(
                f"subject {s:2d} {'atypical' if s in flipped else 'clean   '} mem={memorised:2d} {way:<12} "
                f"{line} ({unlearn_s:.1f} s)"
            )
    return {
        "study": {
            **study.__dict__,
            "recipe": study.recipe.__dict__,
            "steering_references": steering_references,
        },
        "timings": timings,
        "reference_seconds": list(refs.reference_seconds),
        "rules": rules.to_dict(),
        "records": records,
        "summary": {str(k): summarise(records, str(k), sets[k].build_seconds) for k in audit_ks},
        **({"independent_attack": independent_summary(records, str(audit_ks[0]))} if independent else {}),
    }


def _audit_record(audit: dict[str, Any]) -> dict[str, Any]:
    """What the study keeps of one audit: the verdict, the gate, both attacks' p-values, the power check."""

    def attack(block: dict[str, Any]) -> dict[str, Any]:
        return {
            "residual_p": block["residual_membership_p"],
            "over_forgetting_p": block["over_forgetting_p"],
            "member_share": block["member_share"],
            "over_forgetting_share": block["over_forgetting_share"],
            "auc": block["auc"],
        }

    membership = {
        when: {
            "residual_p": block["combined"]["residual_membership_p"],
            "over_forgetting_p": block["combined"]["over_forgetting_p"],
            "lira": attack(block),
            "rmia": attack(block["rmia"]),
        }
        for when, block in audit["membership"].items()
    }
    return {
        "passed": audit["gate"]["passed"],
        "verdict": audit["verdict"],
        "failures": audit["gate"]["failures"],
        "audit_drop": audit["gate"]["audit_drop"],
        "membership": membership,
        "power": audit["power"],
        "seconds": audit["seconds"],
    }


def independent_summary(records: list[dict[str, Any]], k: str) -> dict[str, Any]:
    """Per way, of the versions the gate accepted at ``k`` references: how many the independent attacker
    (its own reference set) finds still member-like, or over-forgotten, by LiRA and by RMIA alone at the
    audit's level; and its own gate's verdict on them."""
    level = AuditRules().level
    out: dict[str, Any] = {}
    for way in dict.fromkeys(r["way"] for r in records):
        accepted = [r for r in records if r["way"] == way and r["audits"][k]["passed"]]
        after = [r["independent"]["membership"]["after"] for r in accepted]
        out[way] = {
            "accepted": len(accepted),
            "independent_gate_passed": sum(r["independent"]["passed"] for r in accepted),
            **{
                f"{attack}_{direction}": sum(a[attack][f"{direction}_p"] < level for a in after)
                for attack in ("lira", "rmia")
                for direction in ("residual", "over_forgetting")
            },
        }
    return out


def _rate(records: list[dict[str, Any]], k: str, accepted: bool) -> dict[str, Any]:
    n = len(records)
    hits = sum(r["audits"][k]["passed"] == accepted for r in records)
    return {"rate": round(hits / n, 3) if n else None, "hits": hits, "of": n}


def _attack_rates(group: list[dict[str, Any]], k: str) -> dict[str, Any]:
    """How often each attack alone (at the whole level) and the audit see residual membership or
    over-forgetting after unlearning, and a base signal before; the power check's detection rate."""
    level = AuditRules().level
    out: dict[str, Any] = {}
    for attack in ("lira", "rmia"):
        after = [r["audits"][k]["membership"]["after"][attack] for r in group]
        before = [r["audits"][k]["membership"]["before"][attack] for r in group]
        out[attack] = {
            "residual": round(float(np.mean([a["residual_p"] < level for a in after])), 3),
            "over_forgetting": round(float(np.mean([a["over_forgetting_p"] < level for a in after])), 3),
            "base_signal": round(float(np.mean([b["residual_p"] < level for b in before])), 3),
            "auc_after_median": round(float(np.median([a["auc"] for a in after])), 4),
        }
    power = [r["audits"][k]["power"] for r in group]
    out["power_detects"] = round(float(np.mean([p["detects_held_members"] for p in power])), 3)
    out["never_seen_flagged"] = round(
        float(np.mean([p["never_seen_residual_membership_p"] < level for p in power])), 3
    )
    return out


def _way_summary(group: list[dict[str, Any]], k: str) -> dict[str, Any]:
    """How often a way passes, its verdicts, and the audit's time against its unlearning's (one run)."""
    verdicts: dict[str, int] = {}
    for record in group:
        name = record["audits"][k]["verdict"]
        verdicts[name] = verdicts.get(name, 0) + 1
    unlearn = float(np.sum([r["unlearn_seconds"] for r in group]))
    audit = float(np.sum([r["audits"][k]["seconds"] for r in group]))
    return {
        "accepted": _rate(group, k, accepted=True),
        "verdicts": verdicts,
        "unlearn_seconds_mean": round(unlearn / len(group), 3),
        "audit_over_unlearn": round(audit / unlearn, 4),
        "attacks": _attack_rates(group, k),
    }


def summarise(records: list[dict[str, Any]], k: str, reference_build_s: float) -> dict[str, Any]:
    by_way: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_way.setdefault(record["way"], []).append(record)
        kind = "atypical" if record["atypical"] else "clean"
        by_way.setdefault(f"{record['way']}-{kind}", []).append(record)
    summary: dict[str, Any] = {"reference_build_s": round(reference_build_s, 2)}
    if "retrain" in by_way:
        summary["retrain_accepted"] = _rate(by_way["retrain"], k, accepted=True)
        retrain_s = float(np.mean([r["unlearn_seconds"] for r in by_way["retrain"]]))
        summary["reference_build_over_retrain"] = round(reference_build_s / retrain_s, 2)
    if "noop" in by_way:
        noop = by_way["noop"]
        summary["noop_rejected_memorised_5plus"] = _rate(
            [r for r in noop if r["memorised_wrong_labels"] >= 5], k, accepted=False
        )
        summary["noop_rejected_atypical"] = _rate([r for r in noop if r["atypical"]], k, accepted=False)
        summary["noop_rejected_clean"] = _rate([r for r in noop if not r["atypical"]], k, accepted=False)
    summary["ways"] = {way: _way_summary(group, k) for way, group in by_way.items()}
    summary["audit_seconds_mean"] = round(float(np.mean([r["audits"][k]["seconds"] for r in records])), 3)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="mnist5k", choices=DATASETS)
    parser.add_argument("--subjects", type=int, default=20)
    parser.add_argument("--atypical", type=int, default=10, help="subjects given wrong labels")
    parser.add_argument("--wrong-labels", type=int, default=15, help="wrong labels per atypical subject")
    parser.add_argument("--samples-per-subject", type=int, default=50)
    parser.add_argument("--references", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=20, help="the training recipe's epochs")
    parser.add_argument("--ways", default=",".join(DEFAULT_WAYS), help=f"comma list of {', '.join(WAYS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--subject-range",
        default=None,
        help="A:B[,C:D...], only subjects A..B-1 (and C..D-1) of the protocol (atypical ones come first)",
    )
    parser.add_argument(
        "--audit-k", default=",".join(map(str, DEFAULT_AUDIT_KS)),
        help="comma list: audit with the first k of the --references (whole pairs)",
    )  # fmt: skip
    parser.add_argument(
        "--independent-attack", action="store_true",
        help="also judge every version with a second reference set of its own seed (not the gate's)",
    )  # fmt: skip
    parser.add_argument(
        "--steering-references", type=int, default=4,
        help="models in the set that steers calibrated (even; the service's LETHE_AUDIT_STEERING_REFERENCES)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=Path("results/audit-cache"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    study = Study(
        subjects=args.subjects,
        atypical=args.atypical,
        wrong_labels=args.wrong_labels,
        samples_per_subject=args.samples_per_subject,
        references=args.references,
        recipe=TrainingConfig(epochs=args.epochs),
        seed=args.seed,
        dataset=args.dataset,
    )
    only: set[int] | None = None
    if args.subject_range:
        only = set()
        for part in args.subject_range.split(","):
            first, last = (int(v) for v in part.split(":"))
            only.update(range(first, last))
    audit_ks = tuple(int(k) for k in args.audit_k.split(","))
    result = run_study(
        study,
        args.ways.split(","),
        ModelCache(args.cache_dir, study),
        only,
        audit_ks,
        args.independent_attack,
        args.steering_references,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
