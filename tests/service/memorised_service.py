"""The API on a real Postgres with the memorised digits registered (tests/audit/memorised.py): what the
modules that run the worker pipeline in-process start from."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.core.database import make_engine, make_session_factory
from service.core.settings import Settings
from service.reports.keys import KeyRing
from service.storage import open_store
from tests.audit.memorised import RECIPE, SPEC, SUBJECT, MemorisedCase, memorised_case
from tests.service.conftest import RecordingDispatcher, authorize
from worker.checkpoints import state_dict_to_bytes
from worker.pipeline import run_job

CHECKPOINT = "initial.safetensors"


def memorised_dataset_body(case: MemorisedCase, array_path: Path) -> dict[str, Any]:
    """POST /datasets for the case: its 400 train rows (the subject's marked) and the held-out audit rows."""
    data = case.dataset
    subject = set(case.subject_rows.tolist())
    samples = [
        {"sample_id": data.sample_ids[r], "row": int(r), "label": int(data.y[r]), "split": "train",
         "subject_id": SUBJECT if int(r) in subject else None}
        for r in data.train_rows
    ] + [
        {"sample_id": data.sample_ids[r], "row": int(r), "label": int(data.y[r]), "split": "audit"}
        for r in data.heldout_rows
    ]  # fmt: skip
    return {"name": data.name, "array_path": str(array_path), "num_classes": 10, "samples": samples}


@dataclass
class MemorisedService:
    settings: Settings
    session_factory: sessionmaker[Session]
    client: TestClient
    dispatcher: RecordingDispatcher  # jobs are run by the test, through the worker pipeline
    case: MemorisedCase
    dataset_id: str
    tmp: Path  # where the dataset's array file and the initial checkpoint lie

    def register_model(self, name: str, **extra: Any) -> dict[str, Any]:
        """A model of the initial weights, with the recipe it was trained with. Each model gets its own
        checkpoint bytes (the weights, with its name in the file's metadata): a purge of one model's first
        version refuses those bytes at registration, and must not refuse another model's."""
        own = self.tmp / f"{name}.safetensors"
        own.write_bytes(self.model_checkpoint(name))
        body = {"name": name, "dataset_id": self.dataset_id, "spec": SPEC.to_dict(),
                "checkpoint_path": str(own), "training_recipe": asdict(RECIPE),
                **extra}  # fmt: skip
        answer = self.client.post("/models", json=body)
        assert answer.status_code == 201, answer.text
        return dict(answer.json())

    def model_checkpoint(self, name: str) -> bytes:
        """The checkpoint bytes :meth:`register_model` gives model ``name``."""
        initial = load_safetensors((self.tmp / CHECKPOINT).read_bytes())
        return save_safetensors(initial, metadata={"test_model": name})

    def run_job(self, job_id: str) -> str | None:
        """One message for ``job_id``, handled as a worker would (it may take a more urgent job)."""
        store = open_store(self.settings.storage_url)
        return run_job(job_id, session_factory=self.session_factory, store=store, settings=self.settings,
                       worker_id="test", dispatcher=self.dispatcher)  # fmt: skip


@contextlib.contextmanager
def memorised_service(tmp: Path, database_url: str, **settings: Any) -> Iterator[MemorisedService]:
    """The API with the memorised digits registered; ``settings`` override the service's for the module."""
    defaults = {"database_url": database_url, "storage_url": tmp / "checkpoints",
                "report_key_dir": tmp / "report-keys", "batch_wait_s": 0, "data_dir": tmp,
                "pseudonym_key_file": tmp / "pseudonym.key"}  # fmt: skip
    merged = Settings(**{**defaults, **settings})
    KeyRing(merged.report_key_dir).generate()
    case = memorised_case()
    np.savez(tmp / "digits.npz", x=case.dataset.x)
    (tmp / CHECKPOINT).write_bytes(state_dict_to_bytes(case.initial))
    engine = make_engine(database_url)
    dispatcher = RecordingDispatcher()
    try:
        factory = make_session_factory(engine)
        with TestClient(create_app(merged, dispatcher, session_factory=factory)) as client:
            authorize(client)
            dataset = client.post("/datasets", json=memorised_dataset_body(case, tmp / "digits.npz"))
            assert dataset.status_code == 201, dataset.text
            yield MemorisedService(merged, factory, client, dispatcher, case, dataset.json()["id"], tmp)
    finally:
        engine.dispose()
