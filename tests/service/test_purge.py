"""Erasure reaches every copy: after a completed erasure of one data subject, Lethe holds none of it.

Real Postgres, the worker pipeline in-process, the local store and an S3 store (moto, a versioned bucket, a
worker cache). One subject of the memorised digits: a first attempt (fine-tuning at lr 1e-9) is rejected,
exact retraining passes; the purge then runs after its grace window. Checked after the purge, and again after
the database is restored from a dump taken before the purge and the ledger replayed:
- no object in the store (every version of every key) contains any of the subject's rows, byte for byte;
- the pre-erasure and the rejected checkpoints answer 410 and their bytes are refused at registration;
- no row of any table holds the subject id in plain text; the worker's cache holds no purged object.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

import worker.pipeline.purge as purge_stage
from service.app import create_app
from service.cli import main as lethe
from service.core.database import make_engine, make_session_factory
from service.jobs.tables import Job
from service.purges.service import evict_purged, replay
from service.storage import CachedStore, LocalStore, ObjectStore, S3Store, open_store, worker_store
from tests.audit.memorised import RECIPE, SPEC, SUBJECT
from tests.service.conftest import ADMIN_DSN, authorize, create_database
from tests.service.memorised_service import MemorisedService, memorised_service
from worker.pipeline import run_job

pytestmark = pytest.mark.slow

RETRAIN = {"method": "retrain", "config": {"epochs": RECIPE.epochs, "lr": RECIPE.lr, "seed": 7}}
NO_OP = {"method": "finetune", "config": {"lr": 1e-9, "epochs": 1}}


def _objects(store: ObjectStore) -> Iterator[tuple[str, bytes]]:
    """Every object the store holds, every version of it on S3, and a worker's cached copies."""
    if isinstance(store, CachedStore):
        for path in sorted(store.directory.glob("*")):
            yield str(path), path.read_bytes()
        store = store.inner
    if isinstance(store, LocalStore):
        for path in sorted(store.root.rglob("*")):
            if path.is_file():
                yield str(path), path.read_bytes()
        return
    assert isinstance(store, S3Store)
    client = boto3.client("s3")
    for page in client.get_paginator("list_object_versions").paginate(Bucket=store.bucket):
        for entry in page.get("Versions", []):
            body = client.get_object(Bucket=store.bucket, Key=entry["Key"], VersionId=entry["VersionId"])
            yield f"{entry['Key']}@{entry['VersionId']}", body["Body"].read()


def _rows_held(store: ObjectStore, rows: list[bytes], extra: list[Path]) -> list[str]:
    """Names of the objects (and extra files) in which any of ``rows`` occurs."""
    held = [name for name, data in _objects(store) if any(row in data for row in rows)]
    return held + [str(p) for p in extra if p.is_file() and any(row in p.read_bytes() for row in rows)]


def _plain_subject_rows(factory: sessionmaker[Session], subject: str) -> list[str]:
    """``table: row`` for every row of every table whose text contains the subject id."""
    found = []
    with factory() as session:
        tables = session.execute(
            text("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        ).scalars()
        for table in list(tables):
            rows = session.execute(text(f'SELECT t::text FROM "{table}" t')).scalars()
            found += [f"{table}: {row[:120]}" for row in rows if subject in row]
    return found


@contextlib.contextmanager
def _api(service: MemorisedService, factory: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(service.settings, service.dispatcher, session_factory=factory)) as client:
        authorize(client)
        yield client


def _check_nothing_left(
    service: MemorisedService,
    factory: sessionmaker[Session],
    store: ObjectStore,
    versions: dict[str, Any],
    rows: list[bytes],
) -> None:
    input_file = service.tmp / "digits.npz"
    assert _rows_held(store, rows, [input_file]) == []
    assert _plain_subject_rows(factory, SUBJECT) == []
    with _api(service, factory) as client:
        for number in (versions["pre_erasure"], versions["rejected"]):
            gone = client.get(f"/models/model/versions/{number}/checkpoint")
            assert gone.status_code == 410, gone.text
            assert gone.json()["type"].endswith("checkpoint-purged")
            again = client.post(
                "/models/upload",
                data={"name": f"again-{uuid.uuid4().hex[:6]}", "dataset_id": service.dataset_id,
                      "spec": json.dumps(SPEC.to_dict())},
                files={"checkpoint": ("again.safetensors", versions["bytes"][number])},
            )  # fmt: skip
            assert again.status_code == 409 and again.json()["type"].endswith("checkpoint-purged"), again.text
        live = client.get(f"/models/model/versions/{versions['erased']}/checkpoint")
        assert live.status_code == 200
        samples = client.get(f"/datasets/{service.dataset_id}/samples", params={"limit": 500}).json()
        assert all(s["subject_id"] != SUBJECT for s in samples["items"])


@pytest.fixture(params=["local", "s3"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_a_completed_erasure_leaves_no_copy_of_the_subject(
    tmp_path: Path, store_kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"lethe_test_purge_{store_kind}_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    storage: Any = tmp_path / "store"
    if store_kind == "s3":
        storage = request.getfixturevalue("s3_url")
        bucket = storage.removeprefix("s3://").split("/", 1)[0]
        boto3.client("s3").put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    from service.core.database import migrate

    migrate(url)
    # A grace window, so the test can dump the database between the erasure and its purge. Locally the
    # inputs are consumed at registration (the default); on S3 they stay, and the purge deletes them.
    consume = store_kind == "local"
    with memorised_service(
        tmp_path, url, storage_url=storage, purge_after_s=3600, consume_inputs=consume
    ) as service:
        case = service.case
        rows = [np.ascontiguousarray(case.dataset.x[r]).tobytes() for r in case.subject_rows]
        store = worker_store(service.settings.storage_url, tmp_path / "cache", 1 << 30)

        def work(job_id: str) -> str | None:
            return run_job(
                job_id, session_factory=service.session_factory, store=store, settings=service.settings,
                worker_id="test", dispatcher=service.dispatcher,
            )  # fmt: skip

        first_bytes = service.model_checkpoint("model")
        service.register_model("model")
        assert (tmp_path / "digits.npz").exists() != consume
        subject = {"model": "model", "subject_id": SUBJECT, "reason": "Art. 17"}
        rejected = service.client.post("/deletion-requests", json={**subject, **NO_OP}).json()
        assert work(rejected["erasures"][0]["job_id"]) == "rejected"
        erased = service.client.post("/deletion-requests", json={**subject, **RETRAIN}).json()
        assert work(erased["erasures"][0]["job_id"]) == "succeeded"

        answer = service.client.get(f"/deletion-requests/{erased['id']}").json()
        assert answer["state"] == "processing"  # completed only once every copy is gone
        [erasure] = answer["erasures"]
        assert erasure["state"] == "completed" and erasure["purge"]["state"] == "scheduled"
        versions_list = service.client.get("/models/model/versions").json()["items"]
        by_status = {v["status"]: v["number"] for v in versions_list}
        versions = {"pre_erasure": 1, "rejected": by_status["rejected"], "erased": by_status["active"]}
        versions["bytes"] = {
            1: first_bytes,
            versions["rejected"]: service.client.get(
                f"/models/model/versions/{versions['rejected']}/checkpoint"
            ).content,
        }

        # Rollback is an operator's operation, and never to a version that holds the erased subject.
        back = service.client.post("/models/model/versions/1/activate")
        assert back.status_code == 409 and back.json()["type"].endswith("version-holds-erased-samples")

        # A job whose metrics predate committed evidence (written by an earlier release) names the subject.
        with service.session_factory.begin() as session:
            legacy = session.get(Job, rejected["erasures"][0]["job_id"])
            assert legacy is not None and legacy.metrics is not None
            [(request_id, audit)] = legacy.metrics["audits"].items()
            [outcome] = audit["subjects"].values()
            plain = {**audit, "committed": False, "subjects": {SUBJECT: outcome},
                     "samples": [{**s, "sample_id": f"s{i}", "subject_id": SUBJECT}
                                 for i, s in enumerate(audit["samples"])]}  # fmt: skip
            legacy.metrics = {**legacy.metrics, "audits": {request_id: plain}}

        # Another worker (S3: a machine of its own) has the pre-erasure checkpoint in its cache.
        other_worker = worker_store(service.settings.storage_url, tmp_path / "other-cache", 1 << 30)
        if isinstance(other_worker, CachedStore):
            with service.session_factory() as session:
                first = session.scalars(text("SELECT storage_uri FROM model_versions WHERE number = 1")).one()
            other_worker.local_path(first)
            assert other_worker.cached_digests()

        dump = tmp_path / "before-purge.dump"
        subprocess.run(["pg_dump", "-Fc", "-f", str(dump), _libpq(url)], check=True)

        # The grace window passes: the purge job is ready, and runs.
        with service.session_factory.begin() as session:
            session.execute(text("UPDATE jobs SET ready_at = now() WHERE kind = 'purge'"))
            purge_job = session.scalars(text("SELECT id FROM jobs WHERE kind = 'purge'")).one()
        assert work(purge_job) == "succeeded"

        done = service.client.get(f"/deletion-requests/{erased['id']}").json()
        assert done["state"] == "completed" and done["subject_id"] is None
        record = done["erasures"][0]["purge"]
        assert record["state"] == "done"
        purged = {c["number"] for c in record["record"]["checkpoints"]}
        assert purged == {1, versions["rejected"]}
        assert record["record"]["dataset_rows_purged"] == len(case.subject_rows)
        report = service.client.get(f"/deletion-requests/{erased['id']}/report.json").json()
        assert report["request"]["state"] == "completed" and report["erasures"][0]["purge"]["state"] == "done"
        trail = service.client.get(f"/deletion-requests/{erased['id']}/trail").json()["items"]
        assert [e for e in trail if e["kind"] == "erasure.purged"]
        _check_nothing_left(service, service.session_factory, store, versions, rows)
        assert service.client.post("/models/model/versions/1/activate").status_code == 410
        if isinstance(store, CachedStore) and isinstance(other_worker, CachedStore):
            purged_digests = {v["sha256"] for v in record["record"]["checkpoints"]}
            assert not purged_digests & set(store.cached_digests())  # the purging worker's own cache
            # Every other worker drops it before its next job and on every sweep.
            assert evict_purged(other_worker, service.session_factory)
            assert not purged_digests & set(other_worker.cached_digests())

        # A restore from before the purge brings the names and the references back; the replay undoes it.
        restored = f"{name}_restored"
        restored_url = create_database(restored)
        subprocess.run(["pg_restore", "--no-owner", "-d", _libpq(restored_url), str(dump)], check=True)
        engine = make_engine(restored_url)
        try:
            factory = make_session_factory(engine)
            assert _plain_subject_rows(factory, SUBJECT) != []  # the restore did bring it back
            outcome = replay(factory, open_store(service.settings.storage_url), service.settings)
            assert outcome["records"] == 1
            _check_nothing_left(service, factory, store, versions, rows)
            with factory() as session:
                state = session.scalar(
                    text(f"SELECT state FROM deletion_requests WHERE id = '{erased['id']}'")
                )
                assert state == "completed"
                assert session.get(Job, purge_job) is not None
            # Idempotent, and the operator's command is the same code.
            monkeypatch.setenv("LETHE_DATABASE_URL", restored_url)
            monkeypatch.setenv("LETHE_STORAGE_URL", str(service.settings.storage_url))
            monkeypatch.setenv("LETHE_PSEUDONYM_KEY_FILE", str(service.settings.pseudonym_key_file))
            assert lethe(["purge", "replay"]) == 0
            _check_nothing_left(service, factory, store, versions, rows)
        finally:
            engine.dispose()
            _drop(restored)
    _drop(name)


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _drop(database: str) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_an_array_generation_zeroes_the_erased_rows_and_keeps_every_other_byte(
    tmp_path: Path, save: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(purge_stage, "_CHUNK_BYTES", 100)  # many blocks, and a last short one
    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 1, 3, 3)).astype(np.float32)
    y = rng.integers(0, 10, 23)
    save(tmp_path / "a.npz", x=x, y=y, note=np.array(7))
    rows = np.array([0, 5, 6, 22])
    with (tmp_path / "b.npz").open("w+b") as out:
        purge_stage.rewrite_array(tmp_path / "a.npz", rows, out)
    new = np.load(tmp_path / "b.npz")
    kept = np.setdiff1d(np.arange(23), rows)
    assert new["x"].shape == x.shape and not new["x"][rows].any() and np.array_equal(new["x"][kept], x[kept])
    assert not new["y"][rows].any() and np.array_equal(new["y"][kept], y[kept]) and int(new["note"]) == 7
