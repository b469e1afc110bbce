"""Content-addressed checkpoint storage. Torch-free: it stores and verifies bytes.

An object's key is its SHA-256 (``sha256/ab/cdef...``), so a stored checkpoint can never change under a
version that points at it, and every read re-hashes the bytes to catch corruption on disk.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

LOCAL_SCHEME = "local:"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredObject:
    sha256: str
    size: int
    uri: str  # what a version row records; only the store that wrote it can resolve it


class CheckpointNotFound(LookupError):
    pass


class CorruptCheckpoint(RuntimeError):
    """The stored bytes no longer hash to their key."""


class CheckpointStore(Protocol):
    def put(self, data: bytes) -> StoredObject:
        """Store ``data`` (idempotent: the same bytes give the same object)."""
        ...

    def read(self, uri: str) -> bytes:
        """The object's bytes, verified against its SHA-256."""
        ...

    def open(self, uri: str) -> BinaryIO:
        """A binary file at offset 0, verified against its SHA-256 before it is returned (for streaming)."""
        ...


class LocalCheckpointStore:
    """Objects under ``root/sha256/ab/cdef...``; URIs are ``local:sha256/ab/cdef...`` (root-relative)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def put(self, data: bytes) -> StoredObject:
        sha256 = hashlib.sha256(data).hexdigest()
        key = _key(sha256)
        path = self.root / key
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Temp file in the target directory, fsynced, then renamed: readers see all of the object or none.
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as tmp:
                    tmp.write(data)
                    tmp.flush()
                    os.fsync(tmp.fileno())
                os.replace(tmp_name, path)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)
        return StoredObject(sha256=sha256, size=len(data), uri=LOCAL_SCHEME + key)

    def read(self, uri: str) -> bytes:
        with self.open(uri) as handle:
            return handle.read()

    def open(self, uri: str) -> BinaryIO:
        path, expected = self._resolve(uri)
        try:
            handle = path.open("rb")
        except FileNotFoundError as exc:
            raise CheckpointNotFound(uri) from exc
        digest = hashlib.sha256()
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
        if digest.hexdigest() != expected:
            handle.close()
            raise CorruptCheckpoint(f"{uri}: stored bytes hash to {digest.hexdigest()}")
        handle.seek(0)
        return handle

    def _resolve(self, uri: str) -> tuple[Path, str]:
        if not uri.startswith(LOCAL_SCHEME):
            raise CheckpointNotFound(f"{uri}: not a local store URI")
        key = uri.removeprefix(LOCAL_SCHEME)
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "sha256" or _key(parts[1] + parts[2]) != key:
            raise CheckpointNotFound(f"{uri}: malformed key")
        return self.root / key, parts[1] + parts[2]


def _key(sha256: str) -> str:
    return f"sha256/{sha256[:2]}/{sha256[2:]}"


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows), where it is skipped.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
