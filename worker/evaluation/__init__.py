"""Evaluation shared by the benchmark and the service worker (no HTTP or database imports)."""

from worker.evaluation.metrics import (
    MembershipAttack,
    accuracy,
    membership_attack,
    paper_metrics,
    population_attack,
)

__all__ = ["MembershipAttack", "accuracy", "membership_attack", "paper_metrics", "population_attack"]
