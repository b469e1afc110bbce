"""``lethe audit``: the membership audit as a command, on the registry's models and store.

    lethe audit build-references MODEL [--tenant T] [--references K] [--no-wait]
    lethe audit verify-chain
    lethe audit run --model M [--tenant T] (--version V | --checkpoint FILE) [--base-version B]
                    --forget-ids F --json OUT

``run`` audits a version of a model, or a safetensors checkpoint of it unlearned elsewhere, against a base
version (default: the version's parent; for a checkpoint, the active version) with the model's reference set
and the gate's rule from the settings. It exits 0 when the gate passes, 1 when it does not, 2 on bad input.

Imported to build the ``lethe`` parser, also where torch must never load: handlers import what they need.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from service.clients.service import DEFAULT_TENANT


def add_parser(subparsers: Any) -> None:
    audit = subparsers.add_parser("audit", help="the per-sample membership audit: reference sets, audits")
    commands = audit.add_subparsers(dest="audit_command", required=True, metavar="AUDIT_COMMAND")

    build = commands.add_parser(
        "build-references", help="(re)build a model's audit reference set: a worker job, with progress"
    )
    build.add_argument("model", help="the model's name")
    build.add_argument(
        "--tenant", default=DEFAULT_TENANT, help=f"the model's tenant (default {DEFAULT_TENANT})"
    )
    build.add_argument(
        "--references", type=int, default=None, help="K (even); default LETHE_AUDIT_REFERENCES"
    )
    build.add_argument("--no-wait", action="store_true", help="queue the job and return its id")
    build.set_defaults(handler=_build_references)

    chain = commands.add_parser(
        "verify-chain", help="recompute the audit trail's hash chain; exit 1 and name the first broken link"
    )
    chain.set_defaults(handler=_verify_chain)

    run = commands.add_parser(
        "run", help="audit version V of a model (or a checkpoint) against base version B"
    )
    run.add_argument("--model", required=True)
    run.add_argument(
        "--tenant", default=DEFAULT_TENANT, help=f"the model's tenant (default {DEFAULT_TENANT})"
    )
    audited = run.add_mutually_exclusive_group(required=True)
    audited.add_argument("--version", type=int, help="the version to audit (its number)")
    audited.add_argument("--checkpoint", type=Path, help="a .safetensors checkpoint unlearned elsewhere")
    run.add_argument(
        "--base-version", type=int, default=None, help="default: V's parent, or the active version"
    )
    run.add_argument(
        "--forget-ids",
        type=Path,
        required=True,
        help="the forgotten sample ids: one per line, or a JSON list",
    )
    run.add_argument("--json", type=Path, required=True, help="where to write the audit (JSON)")
    run.set_defaults(handler=_run)


def _verify_chain(_args: argparse.Namespace) -> int:
    from service.core.database import make_engine, make_session_factory
    from service.core.settings import Settings
    from service.trail.service import verify_chain

    with make_session_factory(make_engine(Settings().database_url))() as session:
        check = verify_chain(session)
    if check.valid:
        print(f"audit trail intact: {check.events} events, last hash {check.last_hash}")
        return 0
    print(
        f"audit trail BROKEN at event {check.first_broken_seq}: {check.reason} "
        f"({check.events} intact events before it)"
    )
    return 1


def _fail(message: str) -> int:
    print(f"lethe audit: {message}", file=sys.stderr)
    return 2


def _build_references(args: argparse.Namespace) -> int:
    from service.audit import service as audit_service
    from service.core.database import make_engine, make_session_factory
    from service.core.problems import ProblemError
    from service.core.settings import Settings
    from service.dispatch import build_dispatcher
    from service.jobs import repository as jobs_repository
    from service.models import service as models_service

    settings = Settings()
    session_factory = make_session_factory(make_engine(settings.database_url))
    try:
        with session_factory.begin() as session:
            model = models_service.get_model(session, args.model, args.tenant)
            job, created = audit_service.request_build(session, settings, model, args.references)
            job_id = job.id
    except ProblemError as exc:
        return _fail(exc.detail)
    dispatcher = build_dispatcher(settings, session_factory)
    if created:
        dispatcher.dispatch(job_id)
    print(f"job {job_id}: {'queued' if created else 'already queued or running'}")
    if args.no_wait:
        return 0
    last = ""
    while True:
        with session_factory() as session:
            found = jobs_repository.get(session, job_id)
            assert found is not None
            state, progress, error = found.state, found.progress or {}, found.error_detail
        line = f"  {state}" + (f": reference {progress['epoch']}/{progress['total_epochs']}" if progress.get(
            "total_epochs") else "")  # fmt: skip
        if line != last:
            print(line, flush=True)
            last = line
        if state in ("succeeded", "failed", "canceled", "rejected"):
            if error:
                print(f"  {error}")
            return 0 if state == "succeeded" else 1
        time.sleep(1.0)


def _read_ids(path: Path) -> list[str]:
    text = path.read_text()
    if text.lstrip().startswith("["):
        values = json.loads(text)
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError("a JSON forget-ids file must be a list of strings")
        return values
    return [line.strip() for line in text.splitlines() if line.strip()]


def _run(args: argparse.Namespace) -> int:
    from service.audit import service as audit_service
    from service.core.database import make_engine, make_session_factory
    from service.core.settings import Settings
    from service.datasets import repository as datasets_repository
    from service.models import repository as models_repository
    from service.purges import service as purges
    from service.storage import worker_store
    from worker.audit import ReferenceSet, audit_unlearning
    from worker.checkpoints import CheckpointMismatch, load_state_dict
    from worker.engine.runtime import Runtime
    from worker.engine.spec import ModelSpec
    from worker.pipeline import JobFailed, load_checkpoint, load_sets, read_verified, rules_from_settings

    try:
        forget_ids = _read_ids(args.forget_ids)
    except (OSError, ValueError) as exc:
        return _fail(f"{args.forget_ids}: {exc}")
    if not forget_ids:
        return _fail(f"{args.forget_ids} names no sample")
    settings = Settings()
    store = worker_store(settings.storage_url, settings.cache_dir, settings.cache_max_bytes)
    session_factory = make_session_factory(make_engine(settings.database_url))
    with session_factory() as session:
        model = models_repository.get_model_by_name(session, args.tenant, args.model)
        if model is None:
            return _fail(f"tenant {args.tenant!r} has no model named {args.model!r}")
        version = None
        if args.version is not None:
            version = models_repository.get_version_by_number(session, model.id, args.version)
            if version is None:
                return _fail(f"model {args.model!r} has no version {args.version}")
        if args.base_version is not None:
            base = models_repository.get_version_by_number(session, model.id, args.base_version)
        elif version is not None:
            base = models_repository.get_version(session, version.parent_id) if version.parent_id else None
        else:
            base = models_repository.active_version(session, model.id)
        if base is None:
            return _fail("no base version: give --base-version (version 1 has no parent)")
        for purged in (v for v in (version, base) if v is not None and v.status == "purged"):
            return _fail(f"version {purged.number} was purged (it held erased samples): it cannot be audited "
                         "again; the request's signed report is the evidence")  # fmt: skip
        dataset = datasets_repository.get_dataset(session, model.dataset_id)
        reference_row = audit_service.current_set(session, model.id)
        if dataset is None or reference_row is None:
            return _fail(f"model {args.model!r} has no audit reference set: lethe audit build-references")
        spec = ModelSpec.from_dict(model.spec)
        audited_at = (version.storage_uri, version.checkpoint_sha256) if version else None
        base_at = (base.storage_uri, base.checkpoint_sha256)
        references_at = (reference_row.storage_uri, reference_row.checkpoint_sha256)
        dataset_id, model_id, base_number = dataset.id, model.id, base.number
        if purges.purged_sample_count(session, dataset_id, forget_ids):
            return _fail("some of these samples' rows were purged: they cannot be audited again; the "
                         "request's signed report is the evidence")  # fmt: skip
    runtime = Runtime.detect()
    try:
        sets = load_sets(
            session_factory, store, dataset_id, model_id, forget_ids,
            eval_remaining_rows=settings.eval_remaining_rows, seed=0,
        )  # fmt: skip
        if audited_at is not None:
            audited = load_checkpoint(store, *audited_at, spec)
        else:
            audited = load_state_dict(args.checkpoint.read_bytes(), spec)
        base_model = load_checkpoint(store, *base_at, spec)
        refs = ReferenceSet.from_bytes(read_verified(store, *references_at))
        result = audit_unlearning(
            base_model, audited, refs,
            forget_x=sets.forget.x, forget_rows=sets.forget_rows,
            forget_sample_ids=sets.forget_sample_ids, forget_subjects=sets.forget_subject_ids,
            audit_x=sets.audit.x, audit_rows=sets.audit_rows,
            rules=rules_from_settings(settings), runtime=runtime,
        )  # fmt: skip
    except JobFailed as exc:
        return _fail(exc.detail)
    except (OSError, CheckpointMismatch) as exc:
        return _fail(f"{args.checkpoint}: {exc}")
    except KeyError as exc:
        return _fail(f"the reference set cannot audit these samples: {exc}")
    audited_name = f"v{args.version}" if args.version is not None else str(args.checkpoint)
    result = {"model": args.model, "audited": audited_name, "base_version": base_number, **result}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    gate = result["gate"]
    print(f"{args.model} {audited_name} against v{base_number}: {result['verdict']}; gate "
          f"{'passed' if gate['passed'] else 'FAILED'}")  # fmt: skip
    for failure in gate["failures"]:
        print(f"  - {failure}")
    return 0 if gate["passed"] else 1
