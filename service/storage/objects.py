"""Content-addressed object storage: checkpoints, dataset arrays, audit reference sets. Torch-free.

One store for everything a worker reads or writes, chosen by ``LETHE_STORAGE_URL``: a local directory (the
default and the demo's; one machine) or ``s3://bucket/prefix`` on any S3-compatible service (many machines:
the API and every worker reach the bucket, nothing shares a disk). An object's key is its SHA-256
(``sha256/ab/cdef...``), so a stored object never changes under a row that points at it, and every read
re-hashes the bytes and refuses them when they differ.

Memory stays bounded whatever the object's size: writes hash and copy in chunks (S3: multipart uploads), reads
go to a temporary file or, on a worker, to its local cache (:class:`CachedStore`, keyed by SHA-256, so a
model's checkpoint and dataset are fetched once per machine). Inputs (``inputs/...`` keys) are objects a
client put in the store itself, to register a dataset by key rather than by a server path.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO, Protocol, TypeVar
from urllib.parse import urlparse

LOCAL_SCHEME = "local:"
S3_SCHEME = "s3:"
INPUTS_PREFIX = "inputs/"
LEDGER_PREFIX = "ledger/"  # the erasure ledger: records outside the database (service.purges.ledger)
_CHUNK = 1 << 20
_RANGE_BUFFER = 256 << 10  # one ranged GET reads at least this much of an input
_Handle = TypeVar("_Handle", BinaryIO, IO[bytes])


@dataclass(frozen=True)
class StoredObject:
    sha256: str
    size: int
    uri: str  # what a row records; only a store of the same kind (and place) resolves it


class ObjectNotFound(LookupError):
    pass


class CorruptObject(RuntimeError):
    """The stored bytes no longer hash to their key."""


class InvalidInputKey(ValueError):
    """An input key that is not a plain relative key under ``inputs/``."""


class ObjectStore(Protocol):
    def put(self, data: bytes) -> StoredObject:
        """Store ``data`` (idempotent: the same bytes give the same object)."""
        ...

    def put_stream(self, handle: IO[bytes]) -> StoredObject:
        """Store the bytes of a seekable file, read in chunks (memory stays bounded)."""
        ...

    def read(self, uri: str) -> bytes:
        """The object's bytes, verified against its SHA-256 (for small objects)."""
        ...

    def open(self, uri: str) -> BinaryIO:
        """A seekable binary file at offset 0, verified against its SHA-256 before it is returned."""
        ...

    def local_path(self, uri: str) -> Path:
        """A local file holding the object, verified (a worker memory-maps datasets from it)."""
        ...

    def input_size(self, key: str) -> int:
        """The size of input ``key`` (``ObjectNotFound`` when absent)."""
        ...

    @contextmanager
    def open_input(self, key: str) -> Iterator[BinaryIO]:
        """A seekable reader of input ``key`` that fetches only what is read (a header, a zip directory)."""
        ...

    def adopt_input(self, key: str) -> StoredObject:
        """Hash input ``key`` (streaming) and store it as a content-addressed object."""
        ...

    def check_writable(self) -> None:
        """Write and delete a probe object; raises when the store cannot be written."""
        ...

    def delete(self, uri: str) -> bool:
        """Delete the object for good (on S3, every version of it); False when it was already gone."""
        ...

    def delete_input(self, key: str) -> bool:
        """Delete input ``key`` (every version); False when it was already gone."""
        ...

    def put_record(self, name: str, data: bytes) -> None:
        """Write ledger record ``name`` (a plain key under ``ledger/``, not content-addressed)."""
        ...

    def list_records(self) -> list[str]:
        """The names of every ledger record, sorted."""
        ...

    def read_record(self, name: str) -> bytes: ...


def object_key(sha256: str) -> str:
    return f"sha256/{sha256[:2]}/{sha256[2:]}"


def checked_input_key(key: str) -> str:
    """``key`` as a path under ``inputs/``: relative, no ``..``, no empty or dot parts (422 otherwise)."""
    path = PurePosixPath(key)
    if key.startswith("/") or not path.parts or any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidInputKey("the key must be a relative path without '..' (a key under inputs/)")
    return INPUTS_PREFIX + str(path)


def _parse_uri(uri: str, scheme: str) -> str:
    """The SHA-256 a well-formed URI of this scheme names."""
    if not uri.startswith(scheme):
        raise ObjectNotFound(f"{uri}: not a {scheme} store URI")
    key = uri.removeprefix(scheme)
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "sha256" or object_key(parts[1] + parts[2]) != key:
        raise ObjectNotFound(f"{uri}: malformed key")
    return parts[1] + parts[2]


def hash_file(handle: IO[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _verified(handle: _Handle, uri: str, expected: str) -> _Handle:
    actual, _size = hash_file(handle)
    if actual != expected:
        handle.close()
        raise CorruptObject(f"{uri}: stored bytes hash to {actual}")
    handle.seek(0)
    return handle


def _fsync_dir(directory: Path) -> None:
    # Makes a rename itself durable; not possible on every platform (Windows), where it is skipped.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_copy(source: IO[bytes], target: Path) -> None:
    """Temp file in the target directory, fsynced, then renamed: readers see all of the object or none."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as tmp:
            shutil.copyfileobj(source, tmp, _CHUNK)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


class LocalStore:
    """Objects under ``root/sha256/ab/cdef...``, inputs under ``root/inputs/``; URIs ``local:sha256/...``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def put(self, data: bytes) -> StoredObject:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.root / object_key(sha256)
        if not path.exists():
            _atomic_copy(io.BytesIO(data), path)
        return StoredObject(sha256=sha256, size=len(data), uri=LOCAL_SCHEME + object_key(sha256))

    def put_stream(self, handle: IO[bytes]) -> StoredObject:
        handle.seek(0)
        sha256, size = hash_file(handle)
        target = self.root / object_key(sha256)
        if not target.exists():
            handle.seek(0)
            _atomic_copy(handle, target)
        return StoredObject(sha256=sha256, size=size, uri=LOCAL_SCHEME + object_key(sha256))

    def read(self, uri: str) -> bytes:
        with self.open(uri) as handle:
            return handle.read()

    def open(self, uri: str) -> BinaryIO:
        expected = _parse_uri(uri, LOCAL_SCHEME)
        try:
            handle = (self.root / object_key(expected)).open("rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(uri) from exc
        return _verified(handle, uri, expected)

    def local_path(self, uri: str) -> Path:
        self.open(uri).close()
        return self.root / object_key(_parse_uri(uri, LOCAL_SCHEME))

    def _input(self, key: str) -> Path:
        path = self.root / checked_input_key(key)
        if not path.is_file():
            raise ObjectNotFound(f"no input {key!r}")
        return path

    def input_size(self, key: str) -> int:
        return self._input(key).stat().st_size

    @contextmanager
    def open_input(self, key: str) -> Iterator[BinaryIO]:
        with self._input(key).open("rb") as handle:
            yield handle

    def adopt_input(self, key: str) -> StoredObject:
        with self._input(key).open("rb") as handle:
            return self.put_stream(handle)

    def check_writable(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.root, prefix=".probe-")
        os.close(fd)
        os.unlink(name)

    def delete(self, uri: str) -> bool:
        return _unlink(self.root / object_key(_parse_uri(uri, LOCAL_SCHEME)))

    def delete_input(self, key: str) -> bool:
        return _unlink(self.root / checked_input_key(key))

    def put_record(self, name: str, data: bytes) -> None:
        _atomic_copy(io.BytesIO(data), self.root / LEDGER_PREFIX / _record_name(name))

    def list_records(self) -> list[str]:
        directory = self.root / LEDGER_PREFIX
        return sorted(p.name for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []

    def read_record(self, name: str) -> bytes:
        return (self.root / LEDGER_PREFIX / _record_name(name)).read_bytes()


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _fsync_dir(path.parent)
    return True


def _record_name(name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"{name!r}: a ledger record is a plain file name")
    return name


class _RangeReader(io.RawIOBase):
    """A read-only, seekable view of one S3 object that fetches the ranges read (zipfile, npy headers)."""

    def __init__(self, client: Any, bucket: str, key: str, size: int) -> None:
        super().__init__()
        self._client, self._bucket, self._key, self._size, self._pos = client, bucket, key, size, 0

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        answer = self._client.get_object(
            Bucket=self._bucket, Key=self._key, Range=f"bytes={self._pos}-{self._pos + n - 1}"
        )
        data: bytes = answer["Body"].read()
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


class S3Store:
    """Objects at ``s3://bucket/prefix/sha256/ab/cdef...``, inputs at ``s3://bucket/prefix/inputs/``; URIs
    ``s3:sha256/...`` (the bucket and prefix come from the configuration, so a bucket can move).

    boto3 finds the endpoint and credentials the usual way (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles, instance roles); its managed transfers split
    large objects into parts, so memory stays bounded."""

    def __init__(self, bucket: str, prefix: str = "", client: Any = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._client = client or boto3.client("s3")
        # Parts of 8 MB, at most 4 in flight and 4 read ahead: a transfer holds about 32 MB, whatever the
        # object's size (the library's defaults buffer 10 parts).
        self._transfer = TransferConfig(multipart_chunksize=8 << 20, max_concurrency=4)
        self._transfer.max_in_memory_upload_chunks = 4
        self._transfer.max_in_memory_download_chunks = 4

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _exists(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return int(self._client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def put(self, data: bytes) -> StoredObject:
        sha256 = hashlib.sha256(data).hexdigest()
        key = object_key(sha256)
        if self._exists(key) is None:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        return StoredObject(sha256=sha256, size=len(data), uri=S3_SCHEME + key)

    def put_stream(self, handle: IO[bytes]) -> StoredObject:
        handle.seek(0)
        sha256, size = hash_file(handle)
        key = object_key(sha256)
        if self._exists(key) is None:
            handle.seek(0)
            self._client.upload_fileobj(handle, self.bucket, self._key(key), Config=self._transfer)
        return StoredObject(sha256=sha256, size=size, uri=S3_SCHEME + key)

    def read(self, uri: str) -> bytes:
        with self.open(uri) as handle:
            return handle.read()

    def open(self, uri: str) -> BinaryIO:
        handle = tempfile.TemporaryFile()  # noqa: SIM115 - returned open, the caller closes it
        try:
            self.download(uri, handle)
        except BaseException:
            handle.close()
            raise
        return handle

    def download(self, uri: str, handle: IO[bytes]) -> None:
        """The object's bytes into ``handle`` (at its start afterwards), verified."""
        from botocore.exceptions import ClientError

        expected = _parse_uri(uri, S3_SCHEME)
        try:
            self._client.download_fileobj(
                self.bucket, self._key(object_key(expected)), handle, Config=self._transfer
            )
        except ClientError as exc:
            raise ObjectNotFound(uri) from exc
        handle.seek(0)
        _verified(handle, uri, expected)

    def local_path(self, uri: str) -> Path:
        raise ObjectNotFound(f"{uri}: an S3 store has no local files; workers read it through CachedStore")

    def input_size(self, key: str) -> int:
        size = self._exists(checked_input_key(key))
        if size is None:
            raise ObjectNotFound(f"no input {key!r}")
        return size

    @contextmanager
    def open_input(self, key: str) -> Iterator[BinaryIO]:
        size = self.input_size(key)
        raw = _RangeReader(self._client, self.bucket, self._key(checked_input_key(key)), size)
        with io.BufferedReader(raw, buffer_size=_RANGE_BUFFER) as reader:
            yield reader

    def adopt_input(self, key: str) -> StoredObject:
        source = self._key(checked_input_key(key))
        body = self._client.get_object(Bucket=self.bucket, Key=source)["Body"]
        digest, size = hashlib.sha256(), 0
        for chunk in iter(lambda: body.read(_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
        sha256 = digest.hexdigest()
        target = object_key(sha256)
        if self._exists(target) is None:  # a server-side copy: the bytes do not pass through here again
            self._client.copy(
                {"Bucket": self.bucket, "Key": source}, self.bucket, self._key(target), Config=self._transfer
            )
        return StoredObject(sha256=sha256, size=size, uri=S3_SCHEME + target)

    def check_writable(self) -> None:
        key = self._key(".probe")
        self._client.put_object(Bucket=self.bucket, Key=key, Body=b"")
        self._client.delete_object(Bucket=self.bucket, Key=key)

    def _delete_all_versions(self, key: str) -> bool:
        """Delete every version and delete marker of ``key``: on a versioned bucket a plain DELETE only hides
        the bytes behind a marker. Unversioned buckets list each object once, as version "null"."""
        full, found = self._key(key), False
        paginator = self._client.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            doomed = [
                {"Key": entry["Key"], "VersionId": entry["VersionId"]}
                for entry in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
                if entry["Key"] == full
            ]
            if doomed:
                found = True
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": doomed, "Quiet": True})
        return found

    def delete(self, uri: str) -> bool:
        return self._delete_all_versions(object_key(_parse_uri(uri, S3_SCHEME)))

    def delete_input(self, key: str) -> bool:
        return self._delete_all_versions(checked_input_key(key))

    def put_record(self, name: str, data: bytes) -> None:
        self._client.put_object(
            Bucket=self.bucket, Key=self._key(LEDGER_PREFIX + _record_name(name)), Body=data
        )

    def list_records(self) -> list[str]:
        names: list[str] = []
        prefix = self._key(LEDGER_PREFIX)
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            names += [entry["Key"].removeprefix(prefix) for entry in page.get("Contents", [])]
        return sorted(names)

    def read_record(self, name: str) -> bytes:
        answer = self._client.get_object(
            Bucket=self.bucket, Key=self._key(LEDGER_PREFIX + _record_name(name))
        )
        return bytes(answer["Body"].read())


class CachedStore:
    """A worker's view of a remote store: objects read through a local cache keyed by SHA-256, at most
    ``max_bytes`` (least recently used evicted), so each machine fetches a checkpoint or dataset once. A
    cached file was verified when it was fetched; reads of small objects re-verify it."""

    def __init__(self, inner: S3Store, directory: Path, max_bytes: int) -> None:
        self.inner, self.directory, self.max_bytes = inner, Path(directory), max_bytes

    # Writes and inputs go to the remote store as they are.
    def put(self, data: bytes) -> StoredObject:
        return self.inner.put(data)

    def put_stream(self, handle: IO[bytes]) -> StoredObject:
        return self.inner.put_stream(handle)

    def input_size(self, key: str) -> int:
        return self.inner.input_size(key)

    @contextmanager
    def open_input(self, key: str) -> Iterator[BinaryIO]:
        with self.inner.open_input(key) as handle:
            yield handle

    def adopt_input(self, key: str) -> StoredObject:
        return self.inner.adopt_input(key)

    def check_writable(self) -> None:
        self.inner.check_writable()

    def delete(self, uri: str) -> bool:
        self.evict([_parse_uri(uri, S3_SCHEME)])
        return self.inner.delete(uri)

    def delete_input(self, key: str) -> bool:
        return self.inner.delete_input(key)

    def put_record(self, name: str, data: bytes) -> None:
        self.inner.put_record(name, data)

    def list_records(self) -> list[str]:
        return self.inner.list_records()

    def read_record(self, name: str) -> bytes:
        return self.inner.read_record(name)

    def cached_digests(self) -> list[str]:
        """The SHA-256 of every object in this machine's cache."""
        if not self.directory.is_dir():
            return []
        return [p.name for p in self.directory.iterdir() if p.is_file() and not p.name.startswith(".")]

    def evict(self, sha256s: Iterable[str]) -> list[str]:
        """Drop these objects from the cache (purged: no job may read them again); returns those dropped."""
        return [sha256 for sha256 in sha256s if _unlink_quietly(self.directory / sha256)]

    def local_path(self, uri: str) -> Path:
        sha256 = _parse_uri(uri, S3_SCHEME)
        path = self.directory / sha256
        if path.exists():
            os.utime(path)  # recently used
            return path
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=".fetch-")
        try:
            with os.fdopen(fd, "w+b") as tmp:
                self.inner.download(uri, tmp)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        self._evict(keep=path)
        return path

    def open(self, uri: str) -> BinaryIO:
        return _verified(self.local_path(uri).open("rb"), uri, _parse_uri(uri, S3_SCHEME))

    def read(self, uri: str) -> bytes:
        with self.open(uri) as handle:
            return handle.read()

    def _evict(self, keep: Path) -> None:
        files = sorted(
            (p for p in self.directory.iterdir() if p.is_file() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
        )
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= self.max_bytes:
                break
            if path != keep:
                total -= path.stat().st_size
                path.unlink(missing_ok=True)


def _unlink_quietly(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def open_store(url: str) -> LocalStore | S3Store:
    """The store ``LETHE_STORAGE_URL`` names: ``s3://bucket/prefix``, else a local directory (a path or a
    ``file://`` URL)."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"{url!r}: an S3 store URL is s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme:
        raise ValueError(f"{url!r}: the store is a directory or s3://bucket/prefix")
    return LocalStore(Path(url))


def worker_store(url: str, cache_dir: Path, cache_max_bytes: int) -> ObjectStore:
    """The store as a worker uses it: a remote one through its local cache."""
    store = open_store(url)
    return CachedStore(store, cache_dir, cache_max_bytes) if isinstance(store, S3Store) else store
