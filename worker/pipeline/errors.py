"""How a job stops early: a message to retry later, or a failure named by the step it happened in."""

from __future__ import annotations


class NothingReady(Exception):
    """The message's job is still in its coalescing wait (and no other job can be taken): retry the message
    in ``retry_in`` seconds (it must not be dropped)."""

    def __init__(self, retry_in: float) -> None:
        super().__init__(f"no job can be taken now; retry in {retry_in:.1f} s")
        self.retry_in = retry_in


# What a failure is called, by the step it happened in (jobs.error_reason).
STEP_ERRORS = {"load": "load_error", "references": "audit_references_error", "unlearn": "engine_error",
               "evaluate": "evaluation_error", "register": "registry_error",
               "purge": "purge_error"}  # fmt: skip


class JobFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason  # a slug stored in jobs.error_reason
        self.detail = detail
