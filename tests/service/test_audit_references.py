"""The audit reference endpoints' validation and job creation (no worker: the recording dispatcher)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import RecordingDispatcher, checkpoint_bytes, spec


def test_no_reference_set_is_a_404_problem(client: TestClient, model: dict[str, Any]) -> None:
    answer = client.get(f"/models/{model['name']}/audit-references")
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["type"] == "/problems/reference-set-not-found"
    assert client.get("/models/nope/audit-references").json()["type"] == "/problems/model-not-found"


@pytest.mark.parametrize("references", [0, 1, 3, 66, -2, True, "8", 8.5])
def test_bad_reference_counts_are_refused_before_anything_is_written(
    client: TestClient, model: dict[str, Any], dispatcher: RecordingDispatcher, references: object
) -> None:
    answer = client.post(f"/models/{model['name']}/audit-references", json={"references": references})
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert dispatcher.dispatched == []
    assert client.get("/jobs").json()["items"] == []


def test_a_build_is_a_job_and_a_second_request_answers_the_unfinished_one(
    client: TestClient, model: dict[str, Any], dispatcher: RecordingDispatcher
) -> None:
    first = client.post(f"/models/{model['name']}/audit-references")
    assert first.status_code == 202 and first.headers["Location"] == f"/jobs/{first.json()['id']}"
    job = first.json()
    assert (job["kind"], job["state"], job["request_ids"]) == ("build_references", "queued", [])
    assert job["config"] == {"references": 4, "seed": 0}
    again = client.post(f"/models/{model['name']}/audit-references", json={"references": 4})
    assert again.status_code == 202 and again.json()["id"] == job["id"]
    assert dispatcher.dispatched == [job["id"]]
    assert client.post("/models/nope/audit-references").status_code == 404
    assert client.post(f"/models/{model['name']}/audit-references", json={"k": 4}).status_code == 422


def test_a_training_recipe_is_checked_at_registration(
    client: TestClient, dataset: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(checkpoint_bytes())
    body = {"name": "m", "dataset_id": dataset["id"], "spec": spec(), "checkpoint_path": str(path)}
    for recipe, fragment in [
        ({"epochs": 0}, "epochs"),
        ({"lr": "fast"}, "lr"),
        ({"momentum": 0.9}, "momentum"),
    ]:
        answer = client.post("/models", json={**body, "training_recipe": recipe})
        assert answer.status_code == 422 and answer.json()["type"] == "/problems/invalid-training-recipe"
        assert fragment in answer.json()["detail"]
    created = client.post("/models", json={**body, "training_recipe": {"epochs": 3}})
    assert created.status_code == 201
    assert created.json()["training_recipe"] == {
        "epochs": 3,
        "lr": 0.001,
        "batch_size": 32,
        "weight_decay": 0.0,
    }
