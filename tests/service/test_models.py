from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.models import service as models_service
from service.models.tables import Model, ModelVersion
from service.storage import StoredObject
from tests.service.conftest import checkpoint_bytes, count_rows, spec
from tests.service.test_datasets import assert_problem


def test_model_registration_imports_an_active_first_version(
    client: TestClient, model: dict[str, Any]
) -> None:
    version = model["active_version"]
    data = checkpoint_bytes()
    assert version["number"] == 1 and version["status"] == "active" and version["parent_id"] is None
    assert version["checkpoint_sha256"] == hashlib.sha256(data).hexdigest()
    assert version["checkpoint_size"] == len(data)
    assert client.get("/models/toy-model").json() == model
    assert [m["name"] for m in client.get("/models").json()["items"]] == ["toy-model"]
    download = client.get("/models/toy-model/versions/1/checkpoint")
    assert download.status_code == 200 and download.content == data
    assert download.headers["etag"] == f'"{version["checkpoint_sha256"]}"'


def test_multipart_upload(client: TestClient, dataset: dict[str, Any]) -> None:
    response = client.post(
        "/models/upload",
        data={"name": "uploaded", "dataset_id": dataset["id"], "spec": json.dumps(spec())},
        files={"checkpoint": ("model.safetensors", checkpoint_bytes(1), "application/octet-stream")},
    )
    assert response.status_code == 201, response.text
    assert response.headers["location"] == "/models/uploaded"
    assert client.get("/models/uploaded/versions/1/checkpoint").content == checkpoint_bytes(1)


def test_invalid_models_are_refused_and_write_nothing(
    client: TestClient, session: Session, dataset: dict[str, Any], settings: Any, tmp_path: Path
) -> None:
    good = tmp_path / "good.safetensors"
    good.write_bytes(checkpoint_bytes())
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(pickle.dumps({"fc.weight": [0.0] * 48}))
    base = {"name": "m", "dataset_id": dataset["id"], "spec": spec(), "checkpoint_path": str(good)}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"checkpoint_path": str(pickled)}, "invalid-checkpoint"),
        ({"checkpoint_path": str(tmp_path / "missing")}, "file-not-found"),
        ({"dataset_id": "nope"}, "unknown-dataset"),
        ({"spec": {"architecture": "mnist_cnn"}}, "invalid-spec"),
        ({"spec": spec(input_shape=[3, 32, 32])}, "spec-dataset-mismatch"),
        ({"spec": spec(num_classes=10)}, "spec-dataset-mismatch"),
        ({"name": "has space"}, "invalid-request"),
        ({"spec": spec(architecture="transformer")}, "unknown-architecture"),
        ({"dataset_id": "nul\x00"}, "invalid-request"),
    ]
    for change, slug in cases:
        assert_problem(client.post("/models", json={**base, **change}), 422, slug)
    upload = client.post(
        "/models/upload",
        data={"name": "m", "dataset_id": dataset["id"], "spec": json.dumps(spec())},
        files={"checkpoint": ("model.pt", pickled.read_bytes())},
    )
    assert_problem(upload, 422, "invalid-checkpoint")
    assert count_rows(session, Model) == 0 and count_rows(session, ModelVersion) == 0
    stored = [path for path in Path(settings.storage_url).rglob("*") if path.is_file()]
    assert [str(path) for path in stored] == [
        f"{settings.storage_url}/{dataset['array_uri'].removeprefix('local:')}"
    ]


def test_unknown_models_and_versions_are_404_problems(client: TestClient, model: dict[str, Any]) -> None:
    assert_problem(client.get("/models/nope"), 404, "model-not-found")
    assert_problem(client.get("/models/toy-model/versions/2"), 404, "version-not-found")
    assert_problem(client.get("/models/toy-model/versions/2/checkpoint"), 404, "version-not-found")


def test_a_corrupt_stored_checkpoint_is_never_served(
    client: TestClient, model: dict[str, Any], settings: Any
) -> None:
    uri = model["active_version"]["storage_uri"]
    (Path(settings.storage_url) / uri.removeprefix("local:")).write_bytes(b"tampered")
    response = client.get("/models/toy-model/versions/1/checkpoint")
    problem = assert_problem(response, 500, "checkpoint-unavailable")
    assert (
        "Traceback" not in response.text and problem["sha256"] == model["active_version"]["checkpoint_sha256"]
    )


def _register(
    session: Session, model_id: str, parent_id: str | None, *, activate: bool, seed: int
) -> ModelVersion:
    stored = StoredObject(sha256=f"{seed:064x}", size=1, uri=f"local:sha256/00/{seed:062x}")
    return models_service.register_version(
        session,
        model_id=model_id,
        parent_version_id=parent_id,
        stored=stored,
        method="finetune",
        config={"epochs": 1},
        metrics_before={"audit_accuracy": 90.0},
        metrics_after={"audit_accuracy": 89.5},
        activate=activate,
        rejection_reason=None if activate else "audit gate",
        job_id=None,
        request_ids=[],
    )


def test_register_version_builds_a_lineage_with_one_active_version(
    session: Session, client: TestClient, model: dict[str, Any]
) -> None:
    v1 = model["active_version"]["id"]
    v2 = _register(session, model["id"], v1, activate=True, seed=2)
    rejected = _register(session, model["id"], v2.id, activate=False, seed=3)
    v4 = _register(session, model["id"], v2.id, activate=True, seed=4)
    session.commit()
    versions = client.get("/models/toy-model/versions").json()["items"]
    assert [(v["number"], v["status"]) for v in versions] == [
        (1, "superseded"), (2, "superseded"), (3, "rejected"), (4, "active"),
    ]  # fmt: skip
    assert versions[2]["rejection_reason"] == "audit gate" and rejected.parent_id == v2.id
    assert v4.parent_id == v2.id and versions[3]["method"] == "finetune"
    assert client.get("/models/toy-model").json()["active_version"]["number"] == 4
    with pytest.raises(models_service.VersionConflict):  # v2 is no longer the active version
        _register(session, model["id"], v2.id, activate=True, seed=5)


def test_the_database_enforces_a_single_active_version(session: Session, model: dict[str, Any]) -> None:
    active = session.get(ModelVersion, model["active_version"]["id"])
    assert active is not None
    session.add(
        ModelVersion(
            model_id=model["id"], number=2, parent_id=active.id, checkpoint_sha256="0" * 64,
            checkpoint_size=1, storage_uri="local:x", status="active",
        )
    )  # fmt: skip
    with pytest.raises(IntegrityError):
        session.flush()
