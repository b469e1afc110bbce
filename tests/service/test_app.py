from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

import service.tables  # noqa: F401  (complete metadata)
from service.app import create_app
from service.core.database import Base, alembic_config, make_engine, make_session_factory, migrate
from service.core.settings import Settings
from service.jobs import service as jobs_service
from tests.service.conftest import (
    RecordingDispatcher,
    authorize,
    checkpoint_bytes,
    create_database,
    dataset_body,
    drop_database,
    job_of,
    spec,
    write_array,
)
from tests.service.test_datasets import assert_problem

ROOT = Path(__file__).resolve().parents[2]


def test_the_api_never_imports_torch() -> None:
    code = "import service.app, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_served_app_freezes_its_startup_heap_and_a_test_app_does_not(tmp_path: Path) -> None:
    # In a process of its own: a frozen heap is never collected again, which no test process should carry.
    code = f"""
import gc
from fastapi.testclient import TestClient
from service.app import create_app
from service.core.settings import Settings
settings = Settings(database_url="sqlite:///{tmp_path}/db.sqlite", data_dir="{tmp_path}")
with TestClient(create_app(settings)):
    assert gc.get_freeze_count() == 0
with TestClient(create_app(settings, freeze_startup_heap=True)) as client:
    assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()
    assert client.get("/healthz").status_code == 200
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_error_is_a_problem(client: TestClient) -> None:
    assert_problem(client.get("/nowhere"), 404, "not-found")
    assert_problem(client.delete("/jobs"), 405, "method-not-allowed")
    json_type = {"content-type": "application/json"}
    not_json = client.post("/deletion-requests", content=b"{not json", headers=json_type)
    assert assert_problem(not_json, 422, "invalid-request")["detail"] == "the body is not valid JSON"
    assert_problem(client.post("/deletion-requests", content=b"{not json"), 422, "invalid-request")
    # A value no schema checks and the database cannot compare: a NUL in a path or query parameter.
    assert_problem(client.get("/models/m%00"), 422, "invalid-value")
    assert_problem(client.get("/datasets/d%00"), 422, "invalid-value")


def test_unexpected_errors_are_logged_and_answered_without_a_trace(client: TestClient) -> None:
    def explode() -> None:
        raise RuntimeError("secret internals")

    client.app.add_api_route("/explode", explode)  # type: ignore[attr-defined]
    response = client.get("/explode")
    assert_problem(response, 500, "internal-error")
    assert "secret" not in response.text and "Traceback" not in response.text


def test_a_lost_race_on_a_unique_constraint_is_a_409(client: TestClient) -> None:
    def race() -> None:
        raise IntegrityError("INSERT ...", {}, Exception("duplicate key value violates unique constraint"))

    client.app.add_api_route("/race", race)  # type: ignore[attr-defined]
    assert_problem(client.get("/race"), 409, "conflict")


def _schema_drift(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))
    finally:
        engine.dispose()


def test_migrations_round_trip_and_match_the_models(tmp_path: Path) -> None:
    name = "lethe_test_migrations"
    postgres = create_database(name)
    sqlite = f"sqlite:///{tmp_path / 'lethe.db'}"
    try:
        for url in (postgres, sqlite):
            migrate(url)
            assert _schema_drift(url) == [], url
            command.downgrade(alembic_config(url), "base")
            engine = make_engine(url)
            assert set(inspect(engine).get_table_names()) <= {"alembic_version"}, url
            engine.dispose()
            migrate(url)
    finally:
        drop_database(name)


def test_the_same_api_runs_on_sqlite(tmp_path: Path) -> None:
    """The demo's database: foreign keys on, bulk insert and the claim without row locks."""
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    migrate(url)
    settings = Settings(database_url=url, storage_url=tmp_path / "store", batch_wait_s=0, data_dir=tmp_path)
    dispatcher = RecordingDispatcher()
    with TestClient(create_app(settings, dispatcher)) as client:
        authorize(client)
        dataset = client.post("/datasets", json=dataset_body(write_array(tmp_path / "x.npz", 10))).json()
        checkpoint = tmp_path / "m.safetensors"
        checkpoint.write_bytes(checkpoint_bytes())
        body = {"name": "m", "dataset_id": dataset["id"], "spec": spec(), "checkpoint_path": str(checkpoint)}
        assert client.post("/models", json=body).status_code == 201
        accepted = client.post("/deletion-requests", json={"model": "m", "subject_id": "alice"})
        job_id = job_of(accepted.json())
        assert accepted.status_code == 202 and dispatcher.dispatched == [job_id]
        assert client.get(f"/jobs/{job_id}").json()["state"] == "queued"
        # A second request joins the open job as a request on Postgres does (read unlocked, a guarded update).
        joined = client.post("/deletion-requests", json={"model": "m", "sample_ids": ["s3"]})
        assert joined.status_code == 202 and job_of(joined.json()) == job_id
        assert client.get(f"/jobs/{job_id}").json()["sample_count"] == 4
    engine = make_engine(url)
    with make_session_factory(engine).begin() as session:
        claimed = jobs_service.claim_job(session, job_id, "w1", timedelta(minutes=1))
    engine.dispose()
    assert isinstance(claimed, jobs_service.ClaimedJob)
    assert claimed.forget_sample_ids == ("s0", "s1", "s2", "s3")
