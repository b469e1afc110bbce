"""Who may call what. A walk over the route table (so a new endpoint cannot be forgotten): every operation but
the public key list answers 401 without a token, 403 with a token lacking the operation's scope, and 404 (or
the same 422 an unknown name gets) for another tenant's objects, exactly as for ids that exist nowhere.
Then tokens' life (rotation, revocation, digests only), Idempotency-Keys per client, rate limits, the CLI."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.cli import main as lethe
from service.clients.service import ADMIN, SCOPES, create_client
from service.clients.tables import ApiClient
from service.core.settings import Settings
from tests.service.conftest import (
    RecordingDispatcher,
    checkpoint_bytes,
    dataset_body,
    issue_token,
    job_of,
    register_model,
    spec,
    write_array,
)
from tests.service.test_datasets import assert_problem

# The report keys: anyone handed a report must be able to fetch the keys that verify it. Health and metrics:
# probes and scrapers.
PUBLIC = {("GET", "/report-keys"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}


def _operations(client: TestClient) -> list[tuple[str, str, list[str]]]:
    """(method, path, scopes) of every route, the scopes as the OpenAPI document declares them."""
    document = client.get("/openapi.json").json()
    found = []
    for context in iter_route_contexts(client.app.routes):  # type: ignore[attr-defined]
        if not isinstance(context.original_route, APIRoute) or context.path is None:
            continue  # the OpenAPI document and its viewers
        for method in sorted(context.methods or ()):
            security = document["paths"][context.path][method.lower()].get("security", [])
            scopes = [scope for requirement in security for scope in requirement.get("bearer", [])]
            found.append((method, context.path, scopes))
    return found


@pytest.fixture
def owned(client: TestClient, tmp_path: Path, dataset: dict[str, Any]) -> dict[str, str]:
    """Tenant acme's objects: a dataset, a model with a version, a deletion request and its job."""
    register_model(client, tmp_path, dataset["id"], name="m")
    request = client.post("/deletion-requests", json={"model": "m", "subject_id": "alice"}).json()
    return {"dataset_id": dataset["id"], "name": "m", "number": "1", "request_id": request["id"],
            "job_id": job_of(request)}  # fmt: skip


def _path(template: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda match: values[match.group(1)], template)


def _call(client: TestClient, method: str, path: str, token: str | None, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {"Authorization": ""}
    return client.request(method, path, headers=headers, **kwargs)


def test_every_operation_needs_a_token_and_its_scope(
    client: TestClient, session_factory: sessionmaker[Session], owned: dict[str, str]
) -> None:
    operations = _operations(client)
    assert len(operations) >= 20
    for method, template, scopes in operations:
        if (method, template) in PUBLIC:
            assert scopes == [], template
            assert _call(client, method, template, None).status_code == 200
            continue
        assert len(scopes) == 1 and scopes[0] in SCOPES, f"{method} {template} declares scopes {scopes}"
        path = _path(template, owned)
        for token in (None, "lethe.not-a-client.secret", "Basic abc"):
            answer = _call(client, method, path, token)
            problem = assert_problem(answer, 401, "invalid-token" if token else "unauthenticated")
            assert answer.headers["www-authenticate"].startswith("Bearer"), problem
        others = [scope for scope in SCOPES if scope not in (scopes[0], ADMIN)]
        lacking = issue_token(session_factory, tenant="acme", scopes=others)
        problem = assert_problem(_call(client, method, path, lacking), 403, "insufficient-scope")
        assert problem["required_scope"] == scopes[0], (method, template)


def test_another_tenants_objects_are_as_unknown_as_missing_ones(
    client: TestClient, session_factory: sessionmaker[Session], owned: dict[str, str], tmp_path: Path
) -> None:
    intruder = issue_token(session_factory, tenant="other", scopes=[ADMIN])
    missing = {"dataset_id": str(uuid.uuid4()), "name": "nowhere", "number": "1",
               "request_id": str(uuid.uuid4()), "job_id": str(uuid.uuid4())}  # fmt: skip
    checked = 0
    for method, template, _scopes in _operations(client):
        if "{" not in template:
            continue
        theirs = _call(client, method, _path(template, owned), intruder)
        nowhere = _call(client, method, _path(template, missing), intruder)
        assert theirs.status_code == nowhere.status_code == 404, (method, template, theirs.text)
        assert theirs.json()["type"] == nowhere.json()["type"], (method, template)
        checked += 1
    assert checked >= 15
    # Ids and names in bodies: the answer an unknown one gets.
    (tmp_path / "c.safetensors").write_bytes(checkpoint_bytes())
    for body_of_owned, body_of_missing in (
        ({"model": owned["name"], "subject_id": "alice"}, {"model": "nowhere", "subject_id": "alice"}),
        ({"dataset_id": owned["dataset_id"], "subject_id": "alice"},
         {"dataset_id": missing["dataset_id"], "subject_id": "alice"}),
    ):  # fmt: skip
        theirs = _call(client, "POST", "/deletion-requests", intruder, json=body_of_owned)
        nowhere = _call(client, "POST", "/deletion-requests", intruder, json=body_of_missing)
        assert theirs.status_code == nowhere.status_code == 404  # names of nothing
        assert theirs.json()["type"] == nowhere.json()["type"]
    model_body = {"name": "x", "spec": spec(), "checkpoint_path": "c.safetensors"}
    theirs = _call(
        client, "POST", "/models", intruder, json={**model_body, "dataset_id": owned["dataset_id"]}
    )
    assert_problem(theirs, 422, "unknown-dataset")
    # Lists show the tenant's own objects only.
    assert _call(client, "GET", "/models", intruder).json()["items"] == []
    assert _call(client, "GET", "/jobs", intruder).json()["items"] == []
    assert [m["name"] for m in client.get("/models").json()["items"]] == ["m"]


def test_names_are_unique_within_a_tenant_only(
    client: TestClient, session_factory: sessionmaker[Session], tmp_path: Path, dataset: dict[str, Any]
) -> None:
    register_model(client, tmp_path, dataset["id"], name="shared-name")
    other = TestClient(client.app, raise_server_exceptions=False)
    other.headers["Authorization"] = f"Bearer {issue_token(session_factory, tenant='other')}"
    theirs = other.post("/datasets", json=dataset_body(write_array(tmp_path / "b.npz", 10)))
    assert theirs.status_code == 201, theirs.text  # the same dataset name "toy" as acme's
    mine = register_model(other, tmp_path, theirs.json()["id"], name="shared-name")
    assert mine["dataset_id"] == theirs.json()["id"]
    assert client.get("/models/shared-name").json()["dataset_id"] == dataset["id"]
    assert_problem(other.post("/datasets", json=dataset_body(tmp_path / "b.npz")), 409, "dataset-name-taken")


def test_rotation_and_revocation_end_a_token_and_only_digests_are_stored(
    client: TestClient, session: Session
) -> None:
    issued = create_client(session, "backend", "acme", ["jobs:read"])
    session.commit()
    first = issued.token
    assert _call(client, "GET", "/jobs", first).status_code == 200
    stored = session.scalar(select(ApiClient).where(ApiClient.name == "backend"))
    assert stored is not None and first.split(".")[2] not in repr(stored.__dict__)

    from service.clients.service import revoke, rotate

    second = rotate(session, "backend").token
    session.commit()
    assert_problem(_call(client, "GET", "/jobs", first), 401, "invalid-token")
    assert _call(client, "GET", "/jobs", second).status_code == 200
    forged = second[:-2] + ("AA" if not second.endswith("AA") else "BB")
    assert_problem(_call(client, "GET", "/jobs", forged), 401, "invalid-token")
    revoke(session, "backend")
    session.commit()
    assert_problem(_call(client, "GET", "/jobs", second), 401, "invalid-token")


def test_idempotency_keys_are_per_client(
    client: TestClient, session_factory: sessionmaker[Session], model: dict[str, Any]
) -> None:
    body = {"model": model["name"], "subject_id": "alice"}
    key = {"Idempotency-Key": "same-key"}
    first = client.post("/deletion-requests", json=body, headers=key)
    replay = client.post("/deletion-requests", json=body, headers=key)
    assert replay.headers.get("idempotent-replayed") == "true" and replay.json()["id"] == first.json()["id"]
    colleague = issue_token(session_factory, tenant="acme")
    theirs = client.post(
        "/deletion-requests", json=body, headers={**key, "Authorization": f"Bearer {colleague}"}
    )
    assert theirs.status_code == 202 and "idempotent-replayed" not in theirs.headers
    assert theirs.json()["id"] != first.json()["id"]


def test_posts_beyond_the_rate_limit_get_429_with_retry_after(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    limited = settings.model_copy(update={"rate_limit": "3/minute"})
    app = create_app(limited, RecordingDispatcher(), session_factory=session_factory)
    with TestClient(app, raise_server_exceptions=False) as client:
        token, other = (issue_token(session_factory) for _ in range(2))
        body = dataset_body(write_array(tmp_path / "x.npz", 10))
        answers = [
            _call(client, "POST", "/datasets", token, json={**body, "name": f"d{i}"}) for i in range(4)
        ]
        assert [a.status_code for a in answers] == [201, 201, 201, 429]
        problem = assert_problem(answers[-1], 429, "rate-limited")
        assert 0 < int(answers[-1].headers["retry-after"]) <= 60 and problem["limit"] == "3 per 1 minute"
        assert _call(client, "GET", "/jobs", token).status_code == 200  # reads are not limited
        assert _call(client, "POST", "/datasets", other, json={**body, "name": "d9"}).status_code == 201


def test_the_openapi_document_declares_the_bearer_scheme(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "lethe.<client id>.<secret>",
        "description": document["components"]["securitySchemes"]["bearer"]["description"],
    }  # fmt: skip
    assert document["paths"]["/deletion-requests"]["post"]["security"] == [{"bearer": ["deletions:write"]}]
    assert "429" in document["paths"]["/deletion-requests"]["post"]["responses"]


def test_lethe_clients_commands(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("LETHE_DATABASE_URL", database_url)
    name = f"cli-{uuid.uuid4().hex[:8]}"
    assert lethe(["clients", "create", name, "--tenant", "acme", "--scopes", "jobs:read,models:read",
                  "--token-only"]) == 0  # fmt: skip
    token = capsys.readouterr().out.strip()
    settings = Settings(database_url=database_url, storage_url=tmp_path / "s", data_dir=tmp_path)
    with TestClient(create_app(settings, RecordingDispatcher())) as client:
        assert _call(client, "GET", "/jobs", token).status_code == 200
        assert lethe(["clients", "list"]) == 0
        listing = capsys.readouterr().out
        assert name in listing and "jobs:read,models:read" in listing and token not in listing
        assert lethe(["clients", "rotate", name, "--token-only"]) == 0
        rotated = capsys.readouterr().out.strip()
        assert _call(client, "GET", "/jobs", token).status_code == 401
        assert _call(client, "GET", "/jobs", rotated).status_code == 200
        assert lethe(["clients", "revoke", name]) == 0
        assert _call(client, "GET", "/jobs", rotated).status_code == 401
    assert lethe(["clients", "create", "bad", "--scope", "everything"]) == 2
    assert "unknown scopes" in capsys.readouterr().err
