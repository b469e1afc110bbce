"""Liveness and readiness: unauthenticated, cheap, and readiness names the dependency that is not ready."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.core.settings import Settings
from tests.service.conftest import RecordingDispatcher, create_database, drop_database
from tests.service.test_datasets import assert_problem
from worker.bench.common import free_port


def test_healthz_and_readyz_answer_without_a_token(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    with TestClient(create_app(settings, RecordingDispatcher(), session_factory=session_factory)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert {name: check["ok"] for name, check in ready.json()["checks"].items()} == {
            "database": True, "broker": True, "store": True,
        }  # fmt: skip


def test_readyz_names_what_is_not_ready(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    broken = settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{free_port()}/0", "storage_url": str(blocked / "store")}
    )
    with TestClient(create_app(broken, RecordingDispatcher(), session_factory=session_factory)) as client:
        answer = client.get("/readyz")
        problem = assert_problem(answer, 503, "not-ready")
        assert {name: check["ok"] for name, check in problem["checks"].items()} == {
            "database": True, "broker": False, "store": False,
        }  # fmt: skip
        assert answer.headers["retry-after"]


def test_readyz_refuses_a_database_behind_the_migration_head(tmp_path: Path) -> None:
    name = "lethe_test_unmigrated"
    url = create_database(name)
    try:
        settings = Settings(
            database_url=url, storage_url=tmp_path / "s", data_dir=tmp_path, dispatcher="inprocess"
        )
        with TestClient(create_app(settings, RecordingDispatcher())) as client:
            problem = assert_problem(client.get("/readyz"), 503, "not-ready")
            assert not problem["checks"]["database"]["ok"] and problem["checks"]["broker"]["ok"]
    finally:
        drop_database(name)
