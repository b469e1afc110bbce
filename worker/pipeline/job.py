"""One claimed job run through its stages (the package docstring lists them), and how it ends."""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta

import torch
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.audit.service import BUILD_KIND
from service.core.settings import Settings
from service.dispatch import JobDispatcher
from service.jobs import service as jobs_service
from service.jobs.service import ClaimedJob, InvalidTransition
from service.purges import service as purges
from service.purges.service import PURGE_KIND
from service.storage import ObjectStore
from worker.engine.api import treatment
from worker.engine.config import METHODS, CalibratedConfig, TrainingConfig, config_to_dict
from worker.engine.methods import calibrated
from worker.engine.progress import UnlearningCancelled
from worker.engine.runtime import Runtime
from worker.metrics import PhaseTimer
from worker.pipeline import audit, purge, references, register, unlearn
from worker.pipeline.data import JobSets, config_of, load_checkpoint, load_sets, spec_of
from worker.pipeline.errors import STEP_ERRORS, JobFailed
from worker.pipeline.heartbeat import Heartbeat

log = logging.getLogger(__name__)

SessionFactory = sessionmaker[Session]


class JobRun:
    """A claimed job and what its stages share: the database, the store, the settings, the device."""

    def __init__(
        self,
        claimed: ClaimedJob,
        session_factory: SessionFactory,
        store: ObjectStore,
        settings: Settings,
        runtime: Runtime,
        worker_id: str,
        dispatcher: JobDispatcher,
    ) -> None:
        self.claimed = claimed
        self.dispatcher = dispatcher
        self.session_factory = session_factory
        self.store = store
        self.settings = settings
        self.runtime = runtime
        self.worker_id = worker_id
        self.lease = timedelta(seconds=settings.job_lease_s)
        self.phases = PhaseTimer(claimed.kind, claimed.method)
        self.step = "load"

    @property
    def step(self) -> str:
        """The pipeline step the job is in: names the error if it breaks there, and times its phases."""
        return self._step

    @step.setter
    def step(self, name: str) -> None:
        self.phases.enter(name)
        self._step = name

    def run(self) -> str | None:
        outcome = "interrupted"  # the database went away: the lease lapses, the job resumes elsewhere
        try:
            state = self._run()
            outcome = state or "left_alone"
            return state
        finally:
            self.phases.ended(outcome)

    def _run(self) -> str | None:
        job_id = self.claimed.job_id
        try:
            with Heartbeat(self) as heartbeat:
                return self._stages(heartbeat)
        except UnlearningCancelled:
            return self._end("canceled", "canceled", "cancel requested while the job ran; nothing registered")
        except JobFailed as exc:
            log.warning("job %s failed: %s", job_id, exc)
            return self._end("failed", exc.reason, exc.detail)
        except InvalidTransition as exc:
            log.warning("job %s: %s; leaving it alone", job_id, exc)
            return None
        except (OperationalError, InterfaceError):
            raise  # the database is unreachable: the lease lapses and the job is resumed later
        except Exception as exc:
            # Anything else would fail again on every retry: end the job with the step it broke in.
            log.exception("job %s failed while in step %s", job_id, self.step)
            return self._end("failed", STEP_ERRORS[self.step], f"{type(exc).__name__}: {exc}")

    def _end(self, state: str, reason: str, detail: str) -> str | None:
        retry = None
        try:
            with self.session_factory.begin() as session:
                job = jobs_service.finish(
                    session, self.claimed.job_id, state, error_reason=reason, error_detail=detail,
                    worker_id=self.worker_id,
                )  # fmt: skip
                if job.kind == PURGE_KIND:  # its requests wait on a purge: another one takes them over
                    retry = purges.retry_failed(session, self.settings, job)
        except InvalidTransition as exc:  # finished meanwhile, or another worker took it over
            log.warning("job %s: not ending it %s: %s", self.claimed.job_id, state, exc)
            return None
        if retry is not None:
            self.dispatcher.dispatch(retry.id, delay_s=self.settings.purge_retry_s)
        return state

    def _stages(self, heartbeat: Heartbeat) -> str:
        if self.claimed.kind == BUILD_KIND:
            return references.build_job(self, heartbeat)
        if self.claimed.kind == PURGE_KIND:
            return purge.purge_job(self, heartbeat)
        return self._unlearn_job(heartbeat)

    def _unlearn_job(self, heartbeat: Heartbeat) -> str:
        """references -> unlearn -> audit -> register (each stage in its module)."""
        claimed = self.claimed
        if not claimed.forget_sample_ids:
            return register.nothing_left(self)
        spec = spec_of(claimed.spec)
        config = config_of(claimed.method, claimed.config)
        rules = register.pre_register_rules(self)
        base = load_checkpoint(
            self.store, claimed.base_version.storage_uri, claimed.base_version.sha256, spec
        )
        sets = self.load_sets(config.seed)
        self.step = "references"
        steered = METHODS[claimed.method].steered
        refs = references.references(self, heartbeat, spec, base, sets, steered=steered)
        # A steered method reads its targets from the steering references; the audit reads the others.
        forget = sets.forget
        if isinstance(config, CalibratedConfig):  # its budget: a share of a retrain with the model's recipe
            recipe = TrainingConfig(**(claimed.training_recipe or {}))
            config = calibrated.with_retrain_budget(config, recipe, len(sets.remaining))
        if steered:
            targets = refs.steering_set().targets(sets.forget_rows, config.margin)
            forget = dataclasses.replace(forget, targets=torch.from_numpy(targets))
        model, stored, unlearn_seconds = unlearn.unlearn_or_resume(
            self, heartbeat, spec, base, dataclasses.replace(sets, forget=forget), config, rules
        )
        self.step = "evaluate"
        heartbeat.phase = "auditing"
        metrics = audit.evaluate(
            self, heartbeat, base, model, sets, refs.judging(), rules, config.seed, unlearn_seconds
        )
        metrics["steering_references"] = refs.steering if steered else 0
        # A method that routes by the forget set's shape (calibrated) says which treatment ran, and why.
        metrics["treatment"] = treatment(sets.forget, sets.remaining, config)
        self.step = "register"
        labelled = sets.forget.y is not None
        return register.register(self, stored, config_to_dict(config), metrics, labelled=labelled)

    def load_sets(self, seed: int) -> JobSets:
        claimed = self.claimed
        return load_sets(
            self.session_factory, self.store, claimed.dataset_id, claimed.model_id, claimed.forget_sample_ids,
            eval_remaining_rows=self.settings.eval_remaining_rows, seed=seed,
        )  # fmt: skip
