"""Fuzzing the API against its own OpenAPI document (schemathesis): whatever a client sends that the schema
allows or not, no answer is a 5xx, and every answer matches what the document declares (status, media type,
body). Bounded: a few examples per operation, on a database of this module's own."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.core.failures import Failure
from schemathesis.generation import GenerationMode

from service.app import create_app
from service.core.database import make_engine, make_session_factory
from service.core.settings import Settings
from tests.service.conftest import (
    RecordingDispatcher,
    authorize,
    checkpoint_bytes,
    dataset_body,
    spec,
    write_array,
)

EXAMPLES_PER_OPERATION = 20
ACCEPTANCE = "Schema-valid request rejected"
# Operations whose document does not yet state everything they check (a schema-valid input answered 422),
# with what is missing. Only that check may fail on them; every other check holds everywhere.
SCHEMA_GAPS = {
    "POST /datasets": "the data directory's files (a path naming no file is 422 file-not-found)",
    "POST /models": "the data directory's files (a path naming no file is 422 file-not-found)",
    "POST /models/upload": "the spec form field's JSON",
    "POST /webhook-endpoints": "where the URL's host resolves to (a private, loopback or link-local address)",
}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory, module_database_url: str) -> Iterator[Any]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    app_settings = Settings(
        database_url=module_database_url, storage_url=tmp / "store", report_key_dir=tmp / "keys",
        data_dir=tmp, batch_wait_s=0, rate_limit="",  # rate limits have their own test
    )  # fmt: skip
    engine = make_engine(module_database_url)
    app = create_app(app_settings, RecordingDispatcher(), session_factory=make_session_factory(engine))
    with TestClient(app) as client:  # something to find: a dataset, a model, a request
        token = authorize(client)
        dataset = client.post("/datasets", json=dataset_body(write_array(tmp / "toy.npz", 10))).json()
        (tmp / "m.safetensors").write_bytes(checkpoint_bytes())
        client.post("/models", json={"name": "toy-model", "dataset_id": dataset["id"], "spec": spec(),
                                     "checkpoint_path": "m.safetensors"})  # fmt: skip
        client.post("/deletion-requests", json={"model": "toy-model", "subject_id": "alice"})
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)

    @schema.auth(refresh_interval=None)
    class AdminToken:
        """Every case carries the token (schemathesis's ignored_auth check probes without it)."""

        def get(self, case: Any, context: Any) -> str:
            return token

        def set(self, case: Any, data: str, context: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    yield schema
    engine.dispose()


def _fuzz(operation: Any, mode: GenerationMode, calls: dict[str, int], statuses: set[int]) -> None:
    label = f"{operation.method.upper()} {operation.path} ({mode.value})"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    def call(case: Any) -> None:
        calls[label] = calls.get(label, 0) + 1
        # Every check, positive_data_acceptance included: an input the document allows is never a 422 (a
        # name of nothing is 404; the document states enums, bounds, formats and one-of rules).
        response = case.call_and_validate()
        statuses.add(response.status_code)

    call()


def _titles(exc: BaseException) -> set[str]:
    """The titles of the check failures inside a schemathesis failure (group)."""
    if isinstance(exc, Failure):
        return {exc.title or ""}
    if isinstance(exc, BaseExceptionGroup):
        return set().union(*(_titles(inner) for inner in exc.exceptions))
    return {type(exc).__name__}


def test_no_server_error_and_every_answer_matches_the_schema(api_schema: Any) -> None:
    """Schema-valid (positive) and schema-violating (negative) examples for every operation, authenticated
    as an admin client of the tenant that owns the objects."""
    schema = api_schema
    failures: list[str] = []
    calls: dict[str, int] = {}
    statuses: set[int] = set()
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation, mode in itertools.product(operations, GenerationMode):
        try:
            _fuzz(operation, mode, calls, statuses)
        except Unsatisfiable:  # no negative example exists (e.g. an operation whose only input is a string)
            continue
        except (Exception, BaseExceptionGroup) as exc:  # one failing operation must not hide the others
            label = f"{operation.method.upper()} {operation.path}"
            if mode is GenerationMode.POSITIVE and label in SCHEMA_GAPS and _titles(exc) <= {ACCEPTANCE}:
                continue
            failures.append(f"{label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
    assert len(calls) >= 30 and sum(calls.values()) >= 5 * len(calls), calls  # the fuzzing did happen
    assert {200, 404, 422} <= statuses, statuses  # authenticated: the calls reached the routes
