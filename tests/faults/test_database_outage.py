"""Postgres goes away under the API and comes back: during the outage every request is answered at once with a
503 problem carrying Retry-After (nothing recorded, no hang, no 500) and /readyz says the database is not
ready; afterwards the API works again without a restart, /readyz is 200, and what was accepted before the
outage is all there."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.core.database import make_engine, make_session_factory, migrate
from service.core.settings import Settings
from tests.faults.conftest import Cluster
from tests.service.conftest import (
    RecordingDispatcher,
    authorize,
    checkpoint_bytes,
    dataset_body,
    spec,
    write_array,
)
from tests.service.test_datasets import assert_problem


def test_a_database_restart_is_a_503_with_retry_after_then_service_resumes(
    cluster: Cluster, tmp_path: Path
) -> None:
    migrate(cluster.url)
    settings = Settings(
        database_url=cluster.url, storage_url=str(tmp_path / "store"), data_dir=tmp_path, batch_wait_s=0
    )
    engine = make_engine(cluster.url)
    dispatcher = RecordingDispatcher()
    try:
        with TestClient(
            create_app(settings, dispatcher, session_factory=make_session_factory(engine))
        ) as client:
            authorize(client)
            dataset = client.post(
                "/datasets", json=dataset_body(write_array(tmp_path / "toy.npz", 10))
            ).json()
            (tmp_path / "m.safetensors").write_bytes(checkpoint_bytes())
            body = {
                "name": "m",
                "dataset_id": dataset["id"],
                "spec": spec(),
                "checkpoint_path": "m.safetensors",
            }
            assert client.post("/models", json=body).status_code == 201
            before = client.post("/deletion-requests", json={"model": "m", "sample_ids": ["s1"]})
            assert before.status_code == 202

            assert client.get("/readyz").status_code == 200
            cluster.stop()
            down = client.get("/readyz")
            problem = assert_problem(down, 503, "not-ready")
            assert not problem["checks"]["database"]["ok"] and problem["checks"]["store"]["ok"]
            for attempt in (
                lambda: client.post("/deletion-requests", json={"model": "m", "sample_ids": ["s2"]}),
                lambda: client.get(f"/deletion-requests/{before.json()['id']}"),
                lambda: client.get("/jobs"),
            ):
                started = time.monotonic()
                answer = attempt()
                assert time.monotonic() - started < 5, "an outage must not hang a request"
                assert_problem(answer, 503, "database-unavailable")
                assert int(answer.headers["retry-after"]) == settings.retry_after_seconds

            cluster.start()
            assert client.get("/readyz").status_code == 200  # ready again, without a restart
            after = client.post("/deletion-requests", json={"model": "m", "sample_ids": ["s2"]})
            assert after.status_code == 202, after.text
            # Accepted before the outage: still there; both joined the same queued job (coalescing).
            request = client.get(f"/deletion-requests/{before.json()['id']}").json()
            assert request["state"] == "processing"
            job = client.get(f"/jobs/{request['erasures'][0]['job_id']}").json()
            assert sorted(job["request_ids"]) == sorted([before.json()["id"], after.json()["id"]])
    finally:
        engine.dispose()
