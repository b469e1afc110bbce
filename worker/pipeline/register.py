"""Stage 5, register: ONE transaction registers the version (active when at least one request's gate passed,
else rejected), records the passing requests' samples as erased from the model since that version, settles
their targets (a completed target queues its purge: stage 6), retries or rejects the others, and finishes the
job. Nothing of it exists if any part fails. The audit rule is written before any number it judges exists."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from service.core.settings import Settings
from service.erasures import service as erasures_service
from service.erasures.service import Dispatch
from service.erasures.tables import ALREADY_ERASED
from service.jobs import service as jobs_service
from service.models import service as models_service
from service.storage import StoredObject
from worker.audit import AuditRules
from worker.engine.config import METHODS, ConfigError, config_to_dict, make_config
from worker.pipeline.errors import JobFailed

if TYPE_CHECKING:
    from worker.pipeline.job import JobRun

log = logging.getLogger(__name__)


def rules_from_settings(settings: Settings) -> AuditRules:
    return AuditRules(
        level=settings.audit_level, max_audit_drop=settings.gate_max_audit_drop,
        max_class_drop=settings.gate_max_class_drop, min_samples=settings.audit_min_samples,
    )  # fmt: skip


def pre_register_rules(job: JobRun) -> AuditRules:
    """The rule this job is judged by: written into its metrics before any number exists; a job claimed
    again keeps the rule it started with, whatever the settings say now."""
    stored = job.claimed.resume.get("rule")
    if stored is not None:
        return AuditRules(
            **{f.name: stored[f.name] for f in dataclasses.fields(AuditRules) if f.name in stored}
        )
    rules = rules_from_settings(job.settings)
    with job.session_factory.begin() as session:
        jobs_service.record_metrics(session, job.claimed.job_id, {"rule": rules.to_dict()}, job.worker_id)
    return rules


def nothing_left(job: JobRun) -> str:
    """Every request of the job was erased from the model meanwhile (another request named the same
    samples): settle them as already erased, with the active version, and register nothing."""
    claimed = job.claimed
    with job.session_factory.begin() as session:
        for target in erasures_service.targets_of_job(session, claimed.job_id):
            erasures_service.settle(
                session, target, "completed", job.worker_id, verdict=ALREADY_ERASED,
                version_id=claimed.base_version.id,
            )  # fmt: skip
        jobs_service.finish(
            session, claimed.job_id, "succeeded", result_version_id=claimed.base_version.id,
            worker_id=job.worker_id,
        )  # fmt: skip
    return "succeeded"


def escalation(job: JobRun, labelled: bool) -> tuple[str, dict[str, Any]] | None:
    """The method (and full configuration) failures of a batch are retried with; None: alone, as they
    were."""
    method = job.settings.escalation_method
    if not method or (method in METHODS and METHODS[method].label_aware and not labelled):
        return None
    recipe = job.claimed.training_recipe or {}
    try:
        fields = {f.name for f in dataclasses.fields(make_config(method))}
        overrides = {key: value for key, value in recipe.items() if key in fields}
        # A fresh draw, not the original model's initialisation stream.
        seed = int(job.claimed.config.get("seed", 0)) + 1
        return method, config_to_dict(make_config(method, {**overrides, "seed": seed}))
    except ConfigError:
        log.warning("escalation method %r is not usable; retrying alone", method, exc_info=True)
        return None


def register(
    job: JobRun, stored: StoredObject, config: dict[str, Any], metrics: dict[str, Any], *, labelled: bool
) -> str:
    """One version for the whole job; each request settled by its own audit (see the module docstring)."""
    claimed = job.claimed
    audits = metrics["audits"]
    passed = [t for t in claimed.targets if t.request_id in audits and audits[t.request_id]["gate"]["passed"]]
    activate = bool(passed)
    state = "succeeded" if activate else "rejected"
    failures = sorted({f for audit in audits.values() for f in audit["gate"]["failures"]})
    rejection = None if activate else "; ".join(failures)
    alone = len(claimed.targets) == 1
    follow_ups: list[Dispatch] = []
    failed: list[tuple[Any, dict[str, Any]]] = []
    try:
        with job.session_factory.begin() as session:
            version = models_service.register_version(
                session,
                model_id=claimed.model_id,
                parent_version_id=claimed.base_version.id,
                stored=stored,
                method=claimed.method,
                config=config,
                metrics_before=metrics["before"],
                metrics_after=metrics["after"],
                activate=activate,
                rejection_reason=rejection,
                job_id=claimed.job_id,
                request_ids=[t.request_id for t in (passed if activate else claimed.targets)],
                actor=job.worker_id,
            )
            # First: the reports generated as requests settle below read the audits from the job.
            jobs_service.record_metrics(session, claimed.job_id, metrics, job.worker_id)
            rows = {t.id: t for t in erasures_service.targets_of_job(session, claimed.job_id)}
            attempts = {
                t.target_id: {"job_id": claimed.job_id, "method": claimed.method,
                              "verdict": audits[t.request_id]["verdict"],
                              "passed": audits[t.request_id]["gate"]["passed"], "version_id": version.id,
                              "requests_in_job": len(claimed.targets)}
                for t in claimed.targets if t.request_id in audits
            }  # fmt: skip
            failed = [
                (rows[t.target_id], attempts[t.target_id])
                for t in claimed.targets
                if t.target_id in attempts and not attempts[t.target_id]["passed"]
                and not (alone or rows[t.target_id].attempts)  # alone, or already retried once: rejected
            ]  # fmt: skip
            # Retried first: the retry joins the model's open job (locking its row) before the requests
            # settled below write the trail (taking its head). A deletion request takes a job's row, then
            # the head; the other order here could deadlock with it.
            if failed:
                follow_ups += erasures_service.retry(
                    session, job.settings, failed, job.worker_id, escalate_to=escalation(job, labelled)
                )
            retried = {row.id for row, _attempt in failed}
            for target in claimed.targets:
                row = rows[target.target_id]
                attempt = attempts.get(target.target_id)
                if attempt is None:  # erased meanwhile by another request: nothing of it was left to audit
                    erasures_service.settle(
                        session, row, "completed", job.worker_id, verdict=ALREADY_ERASED,
                        version_id=claimed.base_version.id,
                    )  # fmt: skip
                elif attempt["passed"]:
                    purge = erasures_service.complete(
                        session, job.settings, row, dataset_id=claimed.dataset_id,
                        sample_ids=target.sample_ids, version_id=version.id, attempt=attempt,
                        actor=job.worker_id,
                    )  # fmt: skip
                    if purge not in follow_ups:  # the job's requests share their model's purge job
                        follow_ups.append(purge)
                elif row.id not in retried:
                    erasures_service.settle(session, row, "rejected", job.worker_id, attempt=attempt)
            jobs_service.finish(
                session, claimed.job_id, state,
                metrics=metrics,
                result_version_id=version.id,
                error_reason=None if activate else "audit_gate", error_detail=rejection,
                worker_id=job.worker_id,
            )  # fmt: skip
    except models_service.VersionConflict as exc:
        raise JobFailed("stale_base_version", exc.detail) from exc
    for follow_up in follow_ups:  # committed: if the queue is down, the sweeper finds them
        try:
            job.dispatcher.dispatch(follow_up.job_id, delay_s=follow_up.delay_s)
        except Exception:
            log.exception("dispatch of job %s failed; it stays queued for the sweeper", follow_up.job_id)
    log.info(
        "job %s %s: version %s of %s; %d of %d requests erased, %d retried",
        claimed.job_id, state, version.number, claimed.model_name, len(passed), len(claimed.targets),
        len(failed),
    )  # fmt: skip
    return state
