from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from service.storage import (
    CheckpointNotFound,
    CorruptCheckpoint,
    LocalCheckpointStore,
    NotSafetensors,
    parse_safetensors_header,
)
from tests.service.conftest import checkpoint_bytes


def test_put_is_content_addressed_idempotent_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalCheckpointStore(tmp_path)
    data = checkpoint_bytes()
    first, second = store.put(data), store.put(data)
    assert first == second
    assert first.size == len(data)
    assert first.uri == f"local:sha256/{first.sha256[:2]}/{first.sha256[2:]}"
    assert (tmp_path / "sha256" / first.sha256[:2] / first.sha256[2:]).read_bytes() == data
    assert not list(tmp_path.rglob(".tmp-*"))
    assert store.read(first.uri) == data


def test_read_detects_corruption_and_missing_objects(tmp_path: Path) -> None:
    store = LocalCheckpointStore(tmp_path)
    stored = store.put(checkpoint_bytes())
    path = tmp_path / stored.uri.removeprefix("local:")
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CorruptCheckpoint):
        store.read(stored.uri)
    path.unlink()
    with pytest.raises(CheckpointNotFound):
        store.open(stored.uri)
    with pytest.raises(CheckpointNotFound):
        store.read("local:sha256/../../etc/passwd")


def test_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("service.storage.checkpoints.os.replace", fail)
    with pytest.raises(OSError):
        LocalCheckpointStore(tmp_path).put(b"data")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_safetensors_header_is_parsed_and_pickles_are_refused() -> None:
    header = parse_safetensors_header(checkpoint_bytes())
    assert header["fc.weight"]["dtype"] == "F32"
    for not_safetensors in (
        pickle.dumps({"fc.weight": [1.0, 2.0]}),
        b"PK\x03\x04" + b"\x00" * 100,  # torch.save's zip container
        b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]",
        b"short",
        checkpoint_bytes()[:-4],  # truncated payload
    ):
        with pytest.raises(NotSafetensors):
            parse_safetensors_header(not_safetensors)
