"""The independent attacker's counts read only the versions the gate accepted, each attack at the audit's
level: the figure docs/audit.md compares between exact retrains and the fast path."""

from __future__ import annotations

from typing import Any

from worker.bench.audit_calibration import independent_summary


def _record(way: str, passed: bool, lira_p: float, rmia_p: float, independent_passed: bool) -> dict[str, Any]:
    def block(residual_p: float) -> dict[str, float]:
        return {"residual_p": residual_p, "over_forgetting_p": 1.0}

    after = {"lira": block(lira_p), "rmia": block(rmia_p)}
    return {
        "way": way,
        "audits": {"4": {"passed": passed}},
        "independent": {"passed": independent_passed, "membership": {"after": after}},
    }


def test_independent_counts_only_the_versions_the_gate_accepted() -> None:
    records = [
        _record("retrain", True, 0.5, 0.5, True),
        _record("retrain", True, 0.5, 0.2, True),
        _record("repair", True, 0.01, 0.001, False),  # accepted, then disputed by both attacks
        _record("repair", True, 0.5, 0.04, True),  # accepted, RMIA alone flags it at 0.05
        _record("repair", False, 0.001, 0.001, False),  # refused by the gate: not counted
    ]
    summary = independent_summary(records, "4")
    assert summary["retrain"] == {
        "accepted": 2, "independent_gate_passed": 2, "lira_residual": 0, "lira_over_forgetting": 0,
        "rmia_residual": 0, "rmia_over_forgetting": 0,
    }  # fmt: skip
    assert summary["repair"]["accepted"] == 2
    assert summary["repair"]["independent_gate_passed"] == 1
    assert (summary["repair"]["lira_residual"], summary["repair"]["rmia_residual"]) == (1, 2)
