"""Reference models for the membership audit, built once per model lineage and dataset, not per request.

K models of the audited model's architecture, each trained with the model's own recipe on half of the train
split, in complementary pairs: reference 2i trains on a random half, reference 2i+1 on the other half. Every
train sample is in exactly one of each pair, so it has K/2 references that never saw it (its OUT references)
even at K = 4, and the first k references of a set (k even) are a set of their own. Only the masks and
each reference's score on every train and audit sample are kept; the reference weights are discarded once
scored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save

from worker.audit.scores import membership_scores, stable_logit_all_labels
from worker.engine.config import TrainingConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.models import build_model
from worker.engine.progress import CancellationToken, ProgressCallback, ProgressEvent
from worker.engine.runtime import CPU, Runtime
from worker.engine.spec import ModelSpec
from worker.engine.training import predict_logits, train

FORMAT = "lethe-audit-references/1"


@dataclass(frozen=True)
class LabelledRows:
    """Rows of one split with the labels the audit scores them at (the dataset's, or for a label-free
    dataset the base model's predictions)."""

    x: torch.Tensor  # (N, C, H, W) float32
    labels: np.ndarray  # int64 (N,)
    rows: np.ndarray  # int64 (N,): the rows in the dataset's array file


@dataclass(frozen=True)
class ReferenceSet:
    train_rows: np.ndarray  # int64 (N_t,), sorted: the train samples the references drew from
    train_labels: np.ndarray  # int64 (N_t,)
    audit_rows: np.ndarray  # int64 (N_a,), sorted: never-seen controls, trained on by no model
    audit_labels: np.ndarray  # int64 (N_a,)
    members: np.ndarray  # bool (K, N_t): reference k trained on train sample j
    train_scores: np.ndarray  # float64 (K, N_t): phi of reference k on train sample j at its label
    # float32 (K, N_a, C): every class's logit, so a control can be scored at any label (the membership
    # test compares a sample with controls scored at the sample's label, whatever their own class)
    audit_logits: np.ndarray
    recipe: TrainingConfig
    seed: int
    build_seconds: float
    # Wall time of each reference (training and scoring), so a prefix's cost is known (``first``).
    reference_seconds: tuple[float, ...] = ()
    # The last ``steering`` references (whole pairs) steer a calibrated method and are never read by the
    # audit: ``judging()`` is the audit's set, ``steering_set()`` the method's (docs/audit.md).
    steering: int = 0

    @functools.cached_property
    def audit_scores(self) -> np.ndarray:
        """(K, N_a, C) float64: phi of every reference on every control at every label."""
        return stable_logit_all_labels(self.audit_logits)

    @functools.cached_property
    def pooled_variance(self) -> float:
        """Mean over samples of the variance of their OUT scores at their own label (train: the references
        that never saw them; audit: every reference): the prior of each sample's spread."""
        out_scores = np.where(self.members, np.nan, self.train_scores)
        enough = (~self.members).sum(axis=0) >= 2
        train_var = np.nanvar(out_scores[:, enough], axis=0, ddof=1)
        own_label = self.audit_scores[:, np.arange(len(self.audit_rows)), self.audit_labels]
        return float(np.mean(np.r_[train_var, own_label.var(axis=0, ddof=1)]))

    @property
    def k(self) -> int:
        return int(self.members.shape[0])

    def train_columns(self, rows: np.ndarray) -> np.ndarray:
        """Positions of dataset ``rows`` among ``train_rows``; KeyError when a row is not covered."""
        columns = np.searchsorted(self.train_rows, rows)
        columns = np.clip(columns, 0, len(self.train_rows) - 1)
        missing = rows[self.train_rows[columns] != rows]
        if len(missing):
            raise KeyError(f"{len(missing)} rows are not in the reference set (first: {int(missing[0])})")
        return columns

    def without_train_rows(self, rows: np.ndarray) -> ReferenceSet:
        """The set with these train samples' columns removed (erased: their scores and labels go too)."""
        keep = ~np.isin(self.train_rows, rows)
        # C order: a column selection can come back Fortran-ordered, and safetensors writes the raw buffer.
        return dataclasses.replace(
            self, train_rows=self.train_rows[keep], train_labels=self.train_labels[keep],
            members=np.ascontiguousarray(self.members[:, keep]),
            train_scores=np.ascontiguousarray(self.train_scores[:, keep]),
        )  # fmt: skip

    def first(self, k: int) -> ReferenceSet:
        """The set of its first ``k`` judging references (``k`` even: whole complementary pairs), costed as
        theirs."""
        judging = self.k - self.steering
        if k % 2 or not 2 <= k <= judging:
            raise ValueError(f"k must be even and between 2 and {judging}, got {k}")
        return self._models(slice(0, k))

    def judging(self) -> ReferenceSet:
        """The references the audit reads: all but the steering ones."""
        return self.first(self.k - self.steering)

    def steering_set(self) -> ReferenceSet:
        """The steering references alone (ValueError when the set has none)."""
        if not self.steering:
            raise ValueError("the reference set has no steering references")
        return self._models(slice(self.k - self.steering, self.k))

    def targets(self, rows: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Per dataset row, the median score of the references that never trained on it (what a model that
        never saw it gives), plus ``margin`` times their pooled spread: a calibrated method's targets."""
        columns = self.train_columns(rows)
        out = np.where(self.members[:, columns], np.nan, self.train_scores[:, columns])
        return np.nanmedian(out, axis=0) + margin * np.sqrt(self.pooled_variance)

    def _models(self, chosen: slice) -> ReferenceSet:
        seconds = self.reference_seconds[chosen]
        count = len(range(self.k)[chosen])
        return dataclasses.replace(
            self, members=np.ascontiguousarray(self.members[chosen]),
            train_scores=np.ascontiguousarray(self.train_scores[chosen]),
            audit_logits=np.ascontiguousarray(self.audit_logits[chosen]),
            build_seconds=float(sum(seconds)) if seconds else self.build_seconds * count / self.k,
            reference_seconds=seconds, steering=0,
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "references": self.k - self.steering,
            "train_samples": len(self.train_rows),
            "audit_samples": len(self.audit_rows),
            "recipe": dataclasses.asdict(self.recipe),
            "seed": self.seed,
            "build_seconds": round(self.build_seconds, 2),
            "reference_seconds": [round(v, 3) for v in self.reference_seconds],
            "steering_references": self.steering,
        }

    def to_bytes(self) -> bytes:
        tensors = {  # safetensors writes raw C-ordered buffers
            "train_rows": self.train_rows,
            "train_labels": self.train_labels,
            "audit_rows": self.audit_rows,
            "audit_labels": self.audit_labels,
            "members": self.members.astype(np.uint8),
            "train_scores": self.train_scores,
            "audit_logits": self.audit_logits,
        }
        contiguous = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
        return safetensors_save(contiguous, metadata={"lethe": json.dumps(self.describe(), sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceSet:
        tensors = safetensors_load(data)
        meta = json.loads(_metadata(data)["lethe"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"not an audit reference set ({meta.get('format')!r})")
        return cls(
            train_rows=tensors["train_rows"],
            train_labels=tensors["train_labels"],
            audit_rows=tensors["audit_rows"],
            audit_labels=tensors["audit_labels"],
            members=tensors["members"].astype(bool),
            train_scores=tensors["train_scores"],
            audit_logits=tensors["audit_logits"],
            recipe=TrainingConfig(**meta["recipe"]),
            seed=int(meta["seed"]),
            build_seconds=float(meta["build_seconds"]),
            reference_seconds=tuple(float(v) for v in meta.get("reference_seconds", ())),
            steering=int(meta.get("steering_references", 0)),
        )


def _metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return dict(header.get("__metadata__", {}))


def balanced_masks(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(k, n) membership in complementary pairs: row 2i is a random half of the n samples, row 2i+1 the other
    half, so each column has exactly k // 2 members and any prefix of whole pairs stays balanced."""
    if k < 2 or k % 2:
        raise ValueError(f"the number of references must be even and at least 2, got {k}")
    halves = np.stack([rng.permutation(n) < n // 2 for _ in range(k // 2)])
    return np.stack([halves, ~halves], axis=1).reshape(k, n)


def build_reference_set(
    spec: ModelSpec,
    train_split: LabelledRows,
    audit_split: LabelledRows,
    recipe: TrainingConfig,
    *,
    k: int,
    seed: int,
    steering: int = 0,
    runtime: Runtime = CPU,
    progress: ProgressCallback | None = None,
    cancel: CancellationToken | None = None,
) -> ReferenceSet:
    """Train ``k`` references for the audit and ``steering`` more for a calibrated method (both even) on
    balanced random halves of ``train_split``, and score every train and audit sample under each.
    Progress: ``epoch`` is the reference being trained (1..k + steering), steps count over all."""
    if steering % 2:
        raise ValueError(f"the number of steering references must be even, got {steering}")
    started = time.monotonic()
    k += steering
    order = np.argsort(train_split.rows)
    train_rows, train_labels, x_train = train_split.rows[order], train_split.labels[order], train_split.x
    x_train = x_train[torch.from_numpy(order)]
    audit_order = np.argsort(audit_split.rows)
    audit_rows, audit_labels = audit_split.rows[audit_order], audit_split.labels[audit_order]
    x_audit = audit_split.x[torch.from_numpy(audit_order)]

    masks = balanced_masks(k, len(train_rows), np.random.default_rng(seed))
    train_scores = np.empty((k, len(train_rows)))
    audit_logits = np.empty((k, len(audit_rows), spec.num_classes), dtype=np.float32)
    steps_per_reference = recipe.epochs * -(-(len(train_rows) // 2) // recipe.batch_size)
    reference_seconds: list[float] = []
    for ref in range(k):
        reference_started = time.monotonic()
        members = torch.from_numpy(np.flatnonzero(masks[ref]))
        data = TensorSplit(x_train[members], torch.from_numpy(train_labels)[members])

        def on_step(event: ProgressEvent, ref: int = ref) -> None:
            if progress is not None:
                done = ref * steps_per_reference + event.step
                progress(ProgressEvent(done, k * steps_per_reference, ref + 1, k, event.losses))

        # Each reference has its own initialisation stream, independent of the audited model's.
        ref_seed = seed * 1_000_003 + 7_919 * (ref + 1)
        torch.manual_seed(ref_seed)
        model = build_model(spec)
        ctx = RunContext(runtime=runtime, progress=on_step, cancel=cancel, seed=ref_seed)
        train(model, data, recipe, ctx)
        train_scores[ref] = membership_scores(model, x_train, train_labels, runtime)
        audit_logits[ref] = predict_logits(model, x_audit, ctx).numpy()
        reference_seconds.append(time.monotonic() - reference_started)
    return ReferenceSet(
        train_rows=train_rows,
        train_labels=train_labels,
        audit_rows=audit_rows,
        audit_labels=audit_labels,
        members=masks,
        train_scores=train_scores,
        audit_logits=audit_logits,
        recipe=recipe,
        seed=seed,
        build_seconds=time.monotonic() - started,
        reference_seconds=tuple(reference_seconds),
        steering=steering,
    )
