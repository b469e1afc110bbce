"""Files a request names on the server: only regular files inside the data root, read within a size limit.

A path in a request body (a checkpoint to import, a dataset's array file) is resolved against
``settings.data_dir`` (a relative path) or taken as given (an absolute one), with every symlink followed; the
real path must lie inside the data root. The file is then opened without following a final symlink and
without blocking (a FIFO swapped in cannot hang a worker thread), and checked on the open descriptor: a
regular file, at most ``max_bytes``. Every refusal is a 422 that names neither the resolved path nor whether
anything exists outside the root.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from service.core.problems import InvalidInput


def inside_root(root: Path, given: str, field: str) -> Path:
    """The real path ``given`` names, if it lies inside ``root``; else a 422 that says only that."""
    base = root.resolve()
    try:
        real = (base / given).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
        raise _outside(field) from exc
    if not real.is_relative_to(base):
        raise _outside(field)
    return real


def _outside(field: str) -> InvalidInput:
    return InvalidInput(
        "path-outside-data-root",
        "the path must name a file inside the server's data directory (LETHE_DATA_DIR), relative to it or "
        "absolute",
        field=field,
    )


@contextlib.contextmanager
def open_data_file(root: Path, given: str, field: str, max_bytes: int) -> Iterator[tuple[BinaryIO, int]]:
    """The regular file ``given`` names inside ``root``, open for reading, and its size."""
    real = inside_root(root, given, field)
    try:
        descriptor = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise InvalidInput("file-not-found", "no such file in the data directory", field=field) from exc
    except OSError as exc:  # a symlink swapped in after resolving, a permission, a socket
        raise InvalidInput("unreadable-file", "the file cannot be opened", field=field) from exc
    info = os.fstat(descriptor)  # before wrapping it: a directory's descriptor cannot become a file object
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        os.close(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInput(
                "not-a-regular-file", "the path names a device, FIFO or directory", field=field
            )
        raise InvalidInput(
            "file-too-large", f"the file is larger than the limit of {max_bytes} bytes",
            field=field, limit=max_bytes,
        )  # fmt: skip
    os.set_blocking(descriptor, True)
    with os.fdopen(descriptor, "rb") as handle:
        yield handle, info.st_size


def consume_data_file(root: Path, given: str) -> None:
    """Delete a file of the data directory once its bytes are stored (``LETHE_CONSUME_INPUTS``): Lethe keeps
    one copy of what it is given, in the store, so a purge has one place to reach."""
    with contextlib.suppress(FileNotFoundError):
        inside_root(root, given, "path").unlink()
