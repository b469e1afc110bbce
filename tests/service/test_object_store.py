"""The object store, local and S3 (an S3-compatible server of the test session's own)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from service.storage.objects import (
    CachedStore,
    CorruptObject,
    InvalidInputKey,
    LocalStore,
    ObjectNotFound,
    S3Store,
    open_store,
)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> LocalStore | S3Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return open_store(request.getfixturevalue("s3_url"))  # type: ignore[return-value]


def _put_input(store: LocalStore | S3Store, key: str, data: bytes) -> None:
    if isinstance(store, LocalStore):
        path = store.root / "inputs" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        store._client.put_object(Bucket=store.bucket, Key=f"{store.prefix}inputs/{key}", Body=data)


def test_objects_are_content_addressed_and_verified(store: LocalStore | S3Store, tmp_path: Path) -> None:
    data = b"checkpoint bytes" * 1000
    first, second = store.put(data), store.put(data)
    assert first == second and first.size == len(data)
    (tmp_path / "f.bin").write_bytes(data)
    with (tmp_path / "f.bin").open("rb") as handle:
        assert store.put_stream(handle) == first
    assert store.read(first.uri) == data
    with store.open(first.uri) as handle:
        assert handle.read() == data
    with pytest.raises(ObjectNotFound):
        store.read(first.uri.replace(first.sha256[2:6], "0000"))
    with pytest.raises(ObjectNotFound):
        store.read("local:sha256/../../etc/passwd")
    store.check_writable()


def test_a_changed_object_is_refused(store: LocalStore | S3Store) -> None:
    stored = store.put(b"original")
    key = stored.uri.split(":", 1)[1]
    if isinstance(store, LocalStore):
        (store.root / key).write_bytes(b"tampered")
    else:
        store._client.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=b"tampered")
    with pytest.raises(CorruptObject):
        store.read(stored.uri)


def test_inputs_are_read_by_range_and_adopted_by_content(store: LocalStore | S3Store) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.arange(1000, dtype=np.float32).reshape(10, 1, 10, 10))
    _put_input(store, "team/arrays.npz", buffer.getvalue())
    assert store.input_size("team/arrays.npz") == len(buffer.getvalue())
    with store.open_input("team/arrays.npz") as handle, zipfile.ZipFile(handle) as archive:
        assert archive.namelist() == ["x.npy"]
    adopted = store.adopt_input("team/arrays.npz")
    assert store.read(adopted.uri) == buffer.getvalue()
    for bad in ("../secret", "/abs", "a/../../b", "", "a//b"):
        with pytest.raises(InvalidInputKey):
            store.input_size(bad)
    with pytest.raises(ObjectNotFound):
        store.input_size("missing.npz")


def test_a_worker_fetches_each_object_once_into_a_bounded_cache(s3_url: str, tmp_path: Path) -> None:
    remote = open_store(s3_url)
    assert isinstance(remote, S3Store)
    cache = CachedStore(remote, tmp_path / "cache", max_bytes=2500)
    objects = [remote.put(bytes([i]) * 1000) for i in range(3)]
    downloads: list[str] = []
    original = remote.download

    def counting(uri: str, handle: object) -> None:
        downloads.append(uri)
        original(uri, handle)  # type: ignore[arg-type]

    remote.download = counting  # type: ignore[method-assign]
    first = cache.local_path(objects[0].uri)
    assert cache.local_path(objects[0].uri) == first and downloads == [objects[0].uri]
    assert cache.read(objects[0].uri) == bytes([0]) * 1000 and len(downloads) == 1
    cache.local_path(objects[1].uri)
    cache.local_path(objects[2].uri)  # 3,000 bytes > 2,500: the least recently used goes
    assert not first.exists() and len(list((tmp_path / "cache").iterdir())) == 2
