"""The audit on a real, small memorised-subject case (digits, a subject with wrong labels the model learnt):
a no-op is rejected, exact retraining is accepted, and the base model audited against itself fails."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.audit.memorised import RECIPE, REFERENCES, SPEC, SUBJECT, MemorisedCase, memorised_case
from worker.audit import AuditRules, LabelledRows, ReferenceSet, audit_unlearning, build_reference_set
from worker.engine.api import unlearn
from worker.engine.config import make_config
from worker.engine.runtime import CPU


@functools.cache
def _references() -> ReferenceSet:
    case = memorised_case()
    data = case.dataset
    x = torch.from_numpy(data.x)
    return build_reference_set(
        SPEC,
        LabelledRows(x[torch.from_numpy(data.train_rows)], data.y[data.train_rows], data.train_rows),
        LabelledRows(x[torch.from_numpy(data.heldout_rows)], data.y[data.heldout_rows], data.heldout_rows),
        RECIPE,
        k=REFERENCES,
        seed=1,
    )


def _audit(case: MemorisedCase, model: nn.Module) -> dict[str, Any]:
    data = case.dataset
    rows, held = case.subject_rows, case.remaining_rows
    return audit_unlearning(
        case.initial, model, _references(),
        forget_x=torch.from_numpy(data.x[rows]), forget_rows=rows,
        forget_sample_ids=[data.sample_ids[r] for r in rows], forget_subjects=[SUBJECT] * len(rows),
        audit_x=torch.from_numpy(data.x[data.heldout_rows]), audit_rows=data.heldout_rows,
        rules=AuditRules(), runtime=CPU, held=(torch.from_numpy(data.x[held]), held),
    )  # fmt: skip


@pytest.fixture(scope="module")
def case() -> MemorisedCase:
    case = memorised_case()
    assert case.memorised >= 5, (
        "the initial model must have learnt the wrong labels for this case to mean anything"
    )
    return case


def test_a_no_op_is_rejected_for_residual_membership(case: MemorisedCase) -> None:
    config = make_config("finetune", {"lr": 1e-9, "epochs": 1})
    noop = unlearn(case.initial, SPEC, case.split(case.subject_rows), case.split(case.remaining_rows), config)
    audit = _audit(case, noop)
    assert audit["verdict"] == "residual_membership"
    assert not audit["gate"]["passed"]
    assert any(failure.startswith("residual membership") for failure in audit["gate"]["failures"])
    # The base model's own signal is what gives the test its power here; the report shows it.
    assert audit["membership"]["before"]["residual_membership_p"] < 1e-3
    subject = audit["subjects"][SUBJECT]
    assert subject["verdict"] == "residual_membership" and subject["member_share_after"] > 0.2
    # The leak is the wrong labels: they score far more like members than the subject's other samples.
    flipped = {case.dataset.sample_ids[r] for r in case.flipped_rows}
    t_flipped = [s["t_after"] for s in audit["samples"] if s["sample_id"] in flipped]
    t_others = [s["t_after"] for s in audit["samples"] if s["sample_id"] not in flipped]
    assert np.median(t_flipped) > np.median(t_others) + 1.5


def test_exact_retraining_is_accepted_as_forgotten(case: MemorisedCase) -> None:
    config = make_config("retrain", {"epochs": RECIPE.epochs, "lr": RECIPE.lr, "seed": 12345})
    retrained = unlearn(
        case.initial, SPEC, case.split(case.subject_rows), case.split(case.remaining_rows), config
    )
    audit = _audit(case, retrained)
    assert audit["gate"]["passed"], audit["gate"]["failures"]
    assert audit["verdict"] == "forgotten"
    assert audit["subjects"][SUBJECT]["verdict"] == "forgotten"
    assert audit["rule"]["level"] == 0.05 and audit["rule"]["text"]


def test_the_base_model_audited_against_itself_fails(case: MemorisedCase) -> None:
    audit = _audit(case, case.initial)
    assert audit["verdict"] == "unchanged" and not audit["gate"]["passed"]
    assert audit["membership"]["after"] == audit["membership"]["before"]
    assert np.isclose(audit["membership"]["after"]["residual_membership_p"], 0, atol=1e-3)
