"""Evaluation shared by the benchmark and the service worker (no HTTP or database imports)."""

from worker.evaluation.metrics import accuracy, attack_success_rate, paper_metrics

__all__ = ["accuracy", "attack_success_rate", "paper_metrics"]
