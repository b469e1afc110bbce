from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.core.clock import utcnow
from service.core.problems import InvalidInput
from service.core.settings import Settings
from service.datasets import repository as datasets_repository
from service.datasets import service as datasets_service
from service.datasets.tables import Dataset, Sample
from service.erasures import repository as erasures_repository
from service.storage import S3Store, open_store
from tests.service.conftest import (
    RecordingDispatcher,
    authorize,
    count_rows,
    dataset_body,
    register_model,
    write_array,
)


def assert_problem(response: Any, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = dict(response.json())
    assert problem["type"] == f"/problems/{slug}"
    assert problem["status"] == status and problem["title"] and problem["detail"]
    return problem


def test_register_and_read_dataset(client: TestClient, dataset: dict[str, Any]) -> None:
    assert dataset["num_rows"] == 10 and dataset["sample_shape"] == [1, 4, 4] and dataset["labelled"]
    assert dataset["samples"] == {"train": 8, "audit": 2, "models": 0, "erased_from_every_model": 0}
    assert client.get(f"/datasets/{dataset['id']}").json() == dataset


def test_samples_are_paginated_by_cursor(client: TestClient, dataset: dict[str, Any]) -> None:
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 4, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/datasets/{dataset['id']}/samples", params=params).json()
        seen += [sample["sample_id"] for sample in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"s{i}" for i in range(10)]
    bad = client.get(f"/datasets/{dataset['id']}/samples", params={"cursor": "not-a-cursor"})
    assert_problem(bad, 422, "invalid-request")  # the document states the cursor's form
    past_the_end = client.get(f"/datasets/{dataset['id']}/samples", params={"cursor": "999999999"})
    assert past_the_end.json() == {"items": [], "next_cursor": None}


def _mutations(tmp_path: Path) -> list[tuple[str, Any, str, str | None]]:
    """(case, how to break a valid body, problem slug, the key naming the offenders)."""

    def sample(body: dict[str, Any], i: int, **changes: Any) -> dict[str, Any]:
        body["samples"][i].update(changes)
        return body

    return [
        ("duplicate ids", lambda b: sample(b, 1, sample_id="s0"), "duplicate-sample-ids", "sample_ids"),
        ("duplicate rows", lambda b: sample(b, 1, row=0), "duplicate-rows", "rows"),
        ("row out of range", lambda b: sample(b, 9, row=10), "rows-out-of-range", "sample_ids"),
        ("label out of range", lambda b: sample(b, 2, label=3), "labels-out-of-range", "sample_ids"),
        ("some labels missing", lambda b: sample(b, 2, label=None), "missing-labels", "sample_ids"),
        ("labels without num_classes", lambda b: b.pop("num_classes") and b, "missing-num-classes", None),
        (
            "no train sample",
            lambda b: [s.update(split="audit") for s in b["samples"]] and b,
            "no-train-samples",
            None,
        ),
        (
            "missing array",
            lambda b: b.update(array_path=str(tmp_path / "nope.npz")) or b,
            "file-not-found",
            None,
        ),
        (
            "float64 array",
            lambda b: b.update(array_path=str(write_array(tmp_path / "f64.npz", 10, dtype=np.float64))) or b,
            "invalid-array-file",
            None,
        ),
        (
            "not an npz",
            lambda b: b.update(array_path=str(tmp_path / "toy.npz.txt")) or b,
            "invalid-array-file",
            None,
        ),
        ("bad split", lambda b: sample(b, 0, split="test"), "invalid-request", None),
        ("negative row", lambda b: sample(b, 0, row=-1), "invalid-request", None),
        ("no samples", lambda b: b.update(samples=[]) or b, "invalid-request", None),
        # PostgreSQL text cannot hold NUL: refused by the schema, not by the database.
        ("NUL in a sample id", lambda b: sample(b, 0, sample_id="s\x000"), "invalid-request", None),
        ("NUL in the name", lambda b: b.update(name="toy\x00") or b, "invalid-request", None),
    ]


def test_invalid_datasets_are_refused_and_write_nothing(
    client: TestClient, session: Session, tmp_path: Path
) -> None:
    array = write_array(tmp_path / "toy.npz", 10)
    (tmp_path / "toy.npz.txt").write_text("not an archive")
    for case, mutate, slug, key in _mutations(tmp_path):
        response = client.post("/datasets", json=mutate(dataset_body(array)))
        problem = assert_problem(response, 422, slug)
        if key is not None:
            assert problem[key] and problem["count"] == len(problem[key]), case
    assert count_rows(session, Dataset) == 0 and count_rows(session, Sample) == 0


def test_dataset_names_are_unique(client: TestClient, dataset: dict[str, Any], tmp_path: Path) -> None:
    response = client.post("/datasets", json=dataset_body(tmp_path / "toy.npz"))
    assert_problem(response, 409, "dataset-name-taken")


def test_unknown_dataset_is_a_404_problem(client: TestClient) -> None:
    assert_problem(client.get("/datasets/nope"), 404, "dataset-not-found")


def test_resolve_sets_leaves_out_what_the_model_erased(
    session: Session, client: TestClient, tmp_path: Path, model: dict[str, Any]
) -> None:
    dataset_id, model_id = model["dataset_id"], model["id"]
    sets = datasets_service.resolve_sets(session, dataset_id, model_id, ["s3", "s1"])
    assert sets.forget.sample_ids == ("s1", "s3") and sets.forget.rows.tolist() == [1, 3]
    assert sets.forget.labels is not None and sets.forget.labels.tolist() == [1, 0]
    assert sets.remaining.sample_ids == ("s0", "s2", "s4", "s5", "s6", "s7")
    assert sets.audit.sample_ids == ("s8", "s9")
    with pytest.raises(InvalidInput):
        datasets_service.resolve_sets(
            session, dataset_id, model_id, ["s8"]
        )  # audit samples: never trained on
    request_id = client.post(
        "/deletion-requests", json={"model": model["name"], "sample_ids": ["s1", "s3"]}
    ).json()["id"]
    pks = [s.id for s in datasets_repository.find_samples(session, dataset_id, ["s1", "s3"])]
    version_id = model["active_version"]["id"]
    assert erasures_repository.add_erased(session, model_id, pks, version_id, request_id, utcnow()) == 2
    assert erasures_repository.add_erased(session, model_id, pks[:1], version_id, request_id, utcnow()) == 0
    session.commit()
    later = datasets_service.resolve_sets(session, dataset_id, model_id, ["s0"])
    assert later.remaining.sample_ids == ("s2", "s4", "s5", "s6", "s7")  # what the model erased stays out
    assert client.get(f"/datasets/{dataset_id}").json()["samples"]["erased_from_every_model"] == 2
    # A second model on the dataset still holds them: erased from the dataset's point of view no more.
    other = register_model(client, tmp_path, dataset_id, name="second")
    assert client.get(f"/datasets/{dataset_id}").json()["samples"]["erased_from_every_model"] == 0
    assert datasets_service.resolve_sets(session, dataset_id, other["id"], ["s0"]).remaining.sample_ids == (
        "s1",
        "s2",
        "s3",
        "s4",
        "s5",
        "s6",
        "s7",
    )


def test_bulk_registration_of_100k_samples(client: TestClient, session: Session, tmp_path: Path) -> None:
    rows = 100_000
    array = tmp_path / "big.npz"
    np.savez(array, x=np.zeros((rows, 1, 1, 1), dtype=np.float32))
    body = {
        "name": "big",
        "array_path": str(array),
        "num_classes": 10,
        "samples": [
            {"sample_id": f"u{i}", "row": i, "label": i % 10, "split": "train" if i % 10 else "audit",
             "subject_id": f"person{i // 5}"}
            for i in range(rows)
        ],
    }  # fmt: skip
    started = time.perf_counter()
    response = client.post("/datasets", json=body)
    elapsed = time.perf_counter() - started
    assert response.status_code == 201, response.text
    assert response.json()["samples"] == {
        "train": 90_000,
        "audit": 10_000,
        "models": 0,
        "erased_from_every_model": 0,
    }
    print(f"\nregistered {rows} samples over HTTP in {elapsed:.2f} s")
    assert count_rows(session, Sample) == rows


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_dataset_registered_by_its_key_in_the_store(
    store: str,
    request: pytest.FixtureRequest,
    settings: Settings,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    """The client puts the array in the store under inputs/ and names its key; the API reads the header by
    range, then adopts the object under its SHA-256. Keys are held to the data-root rule."""
    storage_url = request.getfixturevalue("s3_url") if store == "s3" else str(tmp_path / "objects")
    app_settings = settings.model_copy(update={"storage_url": storage_url, "max_array_bytes": 10_000})
    objects = open_store(storage_url)
    array = write_array(tmp_path / "toy.npz", 10)
    if isinstance(objects, S3Store):
        objects._client.upload_file(str(array), objects.bucket, f"{objects.prefix}inputs/team/toy.npz")
    else:
        (tmp_path / "objects" / "inputs" / "team").mkdir(parents=True)
        shutil.copy(array, tmp_path / "objects" / "inputs" / "team" / "toy.npz")
    with TestClient(
        create_app(app_settings, RecordingDispatcher(), session_factory=session_factory)
    ) as client:
        authorize(client)
        body = {k: v for k, v in dataset_body(array).items() if k != "array_path"}
        answer = client.post("/datasets", json={**body, "array_object": "team/toy.npz"})
        assert answer.status_code == 201, answer.text
        registered = answer.json()
        assert registered["num_rows"] == 10 and registered["sample_shape"] == [1, 4, 4]
        assert objects.read(registered["array_uri"]) == array.read_bytes()
        for key, slug in (("../outside.npz", "invalid-object-key"), ("/abs.npz", "invalid-object-key"),
                          ("team/missing.npz", "object-not-found")):  # fmt: skip
            problem = assert_problem(
                client.post("/datasets", json={**body, "name": "other", "array_object": key}), 422, slug
            )
            assert problem["field"] == "array_object"
        both = {**body, "name": "other", "array_object": "team/toy.npz", "array_path": str(array)}
        assert_problem(client.post("/datasets", json=both), 422, "array-path-or-object")
        small = app_settings.model_copy(update={"max_array_bytes": 100})
        with TestClient(create_app(small, RecordingDispatcher(), session_factory=session_factory)) as tight:
            tight.headers["Authorization"] = client.headers["Authorization"]
            answer = tight.post("/datasets", json={**body, "name": "big", "array_object": "team/toy.npz"})
            assert_problem(answer, 422, "file-too-large")
