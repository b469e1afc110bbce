"""Service tests run against a real Postgres: one fresh database per test session, migrated to head, and
every test inside a transaction that is rolled back (the app's commits release SAVEPOINTs)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import save as save_safetensors
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.clients.service import create_client
from service.core.database import make_engine, migrate
from service.core.settings import Settings

ADMIN_DSN = os.environ.get("LETHE_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
SHAPE = (1, 4, 4)
NUM_CLASSES = 3


class RecordingDispatcher:
    def __init__(self) -> None:
        self.dispatched: list[str] = []
        self.delays: list[float] = []

    def dispatch(self, job_id: str, delay_s: float = 0.0) -> None:
        self.dispatched.append(job_id)
        self.delays.append(delay_s)


def issue_token(
    factory: sessionmaker[Session], *, tenant: str = "acme", scopes: Iterable[str] = ("admin",)
) -> str:
    """A new API client's bearer token (a client of its own per call)."""
    with factory() as session:
        issued = create_client(session, f"test-{uuid.uuid4().hex[:12]}", tenant, scopes)
        session.commit()
    return issued.token


def authorize(
    client: Any,
    factory: sessionmaker[Session] | None = None,
    *,
    tenant: str = "acme",
    scopes: Iterable[str] = ("admin",),
) -> str:
    """Make ``client`` (a TestClient or an httpx.Client) send a new client's token; returns the token."""
    token = issue_token(factory or client.app.state.session_factory, tenant=tenant, scopes=scopes)
    client.headers["Authorization"] = f"Bearer {token}"
    return token


def job_of(request: dict[str, Any], model: str | None = None) -> str:
    """The job that holds a deletion request's erasure from ``model`` (default: its only model)."""
    erasures = [e for e in request["erasures"] if model is None or e["model"] == model]
    assert len(erasures) == 1, request["erasures"]
    return str(erasures[0]["job_id"])


def sqlalchemy_url(database: str) -> str:
    base = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{database}"


def create_database(name: str) -> str:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    return sqlalchemy_url(name)


def drop_database(name: str) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def migrated_database(prefix: str) -> Iterator[str]:
    """A fresh database of this process, migrated to head, dropped afterwards; yields its URL."""
    name = f"{prefix}_{os.getpid()}"
    url = create_database(name)
    try:
        migrate(url)
        yield url
    finally:
        drop_database(name)


@pytest.fixture(scope="module")
def module_database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A database of the test module's own (for modules whose workers commit for real), migrated to head."""
    with migrated_database(f"lethe_{request.module.__name__.rsplit('.', 1)[-1]}") as url:
        yield url


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with migrated_database("lethe_test") as url:
        yield url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def connection(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        transaction.rollback()


@pytest.fixture
def session_factory(connection: Connection) -> sessionmaker[Session]:
    return sessionmaker(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    with session_factory() as session:
        yield session


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        storage_url=tmp_path / "checkpoints",
        report_key_dir=tmp_path / "report-keys",
        batch_wait_s=0,  # a job is ready at once; coalescing tests set their own wait
        data_dir=tmp_path,  # the files tests register are written under tmp_path
        webhook_allow_private_hosts=True,  # the tests' receivers listen on loopback
        pseudonym_key_file=tmp_path / "pseudonym.key",
    )


@pytest.fixture
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


@pytest.fixture
def client(
    settings: Settings, dispatcher: RecordingDispatcher, session_factory: sessionmaker[Session]
) -> Iterator[TestClient]:
    app = create_app(settings, dispatcher, session_factory=session_factory)
    with TestClient(app, raise_server_exceptions=False) as client:
        authorize(client)
        yield client


def count_rows(session: Session, table: Any) -> int:
    return int(session.scalar(select(func.count()).select_from(table)) or 0)


def write_array(path: Path, rows: int, shape: tuple[int, ...] = SHAPE, dtype: Any = np.float32) -> Path:
    np.savez(path, x=np.zeros((rows, *shape), dtype=dtype))
    return path


def checkpoint_bytes(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return save_safetensors({"fc.weight": rng.standard_normal((NUM_CLASSES, 16)).astype(np.float32)})


def spec(**overrides: Any) -> dict[str, Any]:
    return {
        "architecture": "mnist_cnn",
        "num_classes": NUM_CLASSES,
        "input_shape": list(SHAPE),
        "feature_layer": "features.block2",
        **overrides,
    }


def dataset_body(array_path: Path, *, labelled: bool = True, name: str = "toy") -> dict[str, Any]:
    """Ten samples: s0..s7 train (s0-s2 of subject alice), s8..s9 audit (s8 of alice too)."""
    samples = [
        {
            "sample_id": f"s{i}",
            "row": i,
            "label": i % NUM_CLASSES if labelled else None,
            "split": "train" if i < 8 else "audit",
            "subject_id": "alice" if i in (0, 1, 2, 8) else None,
        }
        for i in range(10)
    ]
    body: dict[str, Any] = {"name": name, "array_path": str(array_path), "samples": samples}
    if labelled:
        body["num_classes"] = NUM_CLASSES
    return body


@pytest.fixture
def dataset(client: TestClient, tmp_path: Path) -> dict[str, Any]:
    response = client.post("/datasets", json=dataset_body(write_array(tmp_path / "toy.npz", 10)))
    assert response.status_code == 201, response.text
    return dict(response.json())


def register_model(
    client: TestClient, tmp_path: Path, dataset_id: str, name: str = "toy-model"
) -> dict[str, Any]:
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(checkpoint_bytes())
    response = client.post(
        "/models", json={"name": name, "dataset_id": dataset_id, "spec": spec(), "checkpoint_path": str(path)}
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


@pytest.fixture
def model(client: TestClient, tmp_path: Path, dataset: dict[str, Any]) -> dict[str, Any]:
    return register_model(client, tmp_path, dataset["id"])
