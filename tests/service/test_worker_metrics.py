"""A worker's own series: each phase a job passes through is timed, and its outcome counted."""

from __future__ import annotations

from prometheus_client import REGISTRY

from worker.metrics import PhaseTimer


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_phases_are_timed_and_the_outcome_counted() -> None:
    labels = {"kind": "unlearn", "method": "test-method"}
    timer = PhaseTimer(**labels)
    for step in ("load", "references", "unlearn", "evaluate", "register"):
        timer.enter(step)
    timer.ended("succeeded")
    for phase in ("load", "audit_references", "unlearn", "audit", "register"):
        assert _value("lethe_job_phase_seconds_count", **labels, phase=phase) == 1
    assert _value("lethe_worker_jobs_total", **labels, state="succeeded") == 1
    timer.ended("succeeded")  # nothing open: only the outcome counts
    assert _value("lethe_job_phase_seconds_count", **labels, phase="register") == 1
