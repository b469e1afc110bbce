from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from service.storage import LocalStore, NotSafetensors, parse_safetensors_header
from tests.service.conftest import checkpoint_bytes


def test_the_local_layout_is_sha256_keyed_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    data = checkpoint_bytes()
    stored = store.put(data)
    assert stored.uri == f"local:sha256/{stored.sha256[:2]}/{stored.sha256[2:]}"
    assert (tmp_path / "sha256" / stored.sha256[:2] / stored.sha256[2:]).read_bytes() == data
    assert not list(tmp_path.rglob(".tmp-*"))


def test_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("service.storage.objects.os.replace", fail)
    with pytest.raises(OSError):
        LocalStore(tmp_path).put(b"data")
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
