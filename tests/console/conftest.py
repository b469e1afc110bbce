"""One populated service per test module: two tenants, each with an operator (admin) and a compliance officer
(``deletions:read,reports:read``); acme has a rejected request (subject alice, with its audit's evidence), a
canceled one, and two open ones in a running job (one due within three days); globex has one open request.
Real commits on a database of the module's own: the console reads what the API wrote."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.clients.service import create_client
from service.core.clock import utcnow
from service.core.database import make_engine, make_session_factory
from service.core.settings import Settings
from service.reports.keys import KeyRing
from tests.console import seed
from tests.service.conftest import (
    RecordingDispatcher,
    checkpoint_bytes,
    dataset_body,
    job_of,
    migrated_database,
    spec,
    write_array,
)

OFFICER_SCOPES = ("deletions:read", "reports:read")


@dataclass
class Tenant:
    name: str
    operator: str  # tokens
    officer: str
    requests: dict[str, str] = field(default_factory=dict)  # label -> request id


@dataclass
class Env:
    app: FastAPI
    settings: Settings
    factory: sessionmaker[Session]
    acme: Tenant
    globex: Tenant
    key_id: str
    running_job: str


def _token(factory: sessionmaker[Session], name: str, tenant: str, scopes: tuple[str, ...]) -> str:
    with factory.begin() as session:
        return create_client(session, name, tenant, scopes).token


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _register(http: TestClient, token: str, data_dir: Path, tenant: str) -> None:
    array = write_array(data_dir / f"{tenant}.npz", 10)
    answer = http.post("/datasets", json=dataset_body(array), headers=_bearer(token))
    assert answer.status_code == 201, answer.text
    checkpoint = data_dir / f"{tenant}.safetensors"
    checkpoint.write_bytes(checkpoint_bytes())
    body = {"name": "toy-model", "dataset_id": answer.json()["id"], "spec": spec(),
            "checkpoint_path": str(checkpoint)}  # fmt: skip
    assert http.post("/models", json=body, headers=_bearer(token)).status_code == 201


def _request(http: TestClient, token: str, **body: Any) -> dict[str, Any]:
    if "due_at" in body:
        body["due_at"] = body["due_at"].isoformat()
    answer = http.post("/deletion-requests", json={"model": "toy-model", **body}, headers=_bearer(token))
    assert answer.status_code == 202, answer.text
    return dict(answer.json())


def _populate(app: FastAPI, settings: Settings, factory: sessionmaker[Session]) -> Env:
    tenants = {
        name: Tenant(name, _token(factory, f"{name}-operator", name, ("admin",)),
                     _token(factory, f"{name}-dpo", name, OFFICER_SCOPES))
        for name in ("acme", "globex")
    }  # fmt: skip
    acme, globex = tenants["acme"], tenants["globex"]
    http = TestClient(app)
    for tenant in tenants.values():
        _register(http, tenant.operator, settings.data_dir, tenant.name)
    canceled = _request(http, acme.operator, sample_ids=["s4"])  # settled at once: a report, no evidence
    assert http.post(f"/jobs/{job_of(canceled)}/cancel", headers=_bearer(acme.operator)).status_code == 202
    rejected = _request(http, acme.operator, subject_id="alice", reason="GDPR Art. 17")
    seed.reject(factory, job_of(rejected))
    acme.requests.update(canceled=canceled["id"], alice=rejected["id"])
    now = utcnow()
    soon = _request(http, acme.operator, sample_ids=["s5"], due_at=now + timedelta(days=2))
    later = _request(http, acme.operator, sample_ids=["s6"], due_at=now + timedelta(days=20))
    acme.requests.update(soon=soon["id"], later=later["id"])
    running = seed.claim(factory, job_of(soon)).job_id
    seed.report_progress(factory, running, 3, 10)
    globex.requests["open"] = _request(
        http, globex.operator, sample_ids=["s5"], due_at=now + timedelta(days=5)
    )["id"]
    key_id = KeyRing(settings.report_key_dir).active().key_id
    return Env(app, settings, factory, acme, globex, key_id, running)


@pytest.fixture(scope="module")
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("console")
    with migrated_database(f"lethe_console_{request.module.__name__.rsplit('.', 1)[-1]}") as url:
        settings = Settings(
            database_url=url,
            storage_url=tmp / "store",
            report_key_dir=tmp / "report-keys",
            batch_wait_s=0,
            data_dir=tmp,
        )
        KeyRing(settings.report_key_dir).generate()  # before the app: console sessions are keyed from it
        engine = make_engine(url)
        factory = make_session_factory(engine)
        app = create_app(settings, RecordingDispatcher())
        try:
            yield _populate(app, settings, factory)
        finally:
            engine.dispose()
