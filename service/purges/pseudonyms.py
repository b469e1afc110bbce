"""Keyed hashes of data subjects, under a key kept outside the database.

A subject id hashed without a key can be recomputed by anyone who guesses it; an HMAC under a key the
database never holds cannot (GDPR Recital 26: pseudonymised data whose key sits beside it is still personal
data). The API needs the key to find an erased subject's samples again (a repeated request); the purge to
pseudonymise them. Destroying the key (crypto-shredding) makes every pseudonym unlinkable at once.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from service.core.settings import Settings


def pseudonym_key(settings: Settings) -> bytes:
    """:func:`load_key`, read once per process for each configuration (the API needs it on every request
    that names a subject)."""
    secret = settings.pseudonym_key.get_secret_value() if settings.pseudonym_key is not None else None
    return _cached_key(secret, str(settings.pseudonym_key_file))


@functools.lru_cache(maxsize=8)
def _cached_key(secret: str | None, key_file: str) -> bytes:
    return _load(secret, Path(key_file))


def _load(secret: str | None, path: Path) -> bytes:
    """The pseudonym key: ``LETHE_PSEUDONYM_KEY`` (hex), else the key file, created on first use (0600)."""
    if secret is not None:
        key = bytes.fromhex(secret)
        if len(key) < 32:
            raise ValueError("LETHE_PSEUDONYM_KEY must be at least 32 bytes of hex")
        return key
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            return bytes.fromhex(path.read_text().strip())
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def subject_hash(key: bytes, dataset_id: str, subject_id: str) -> str:
    """HMAC-SHA256 of a subject within its dataset (the same person in two datasets is two pseudonyms)."""
    return hmac.new(key, f"subject\x00{dataset_id}\x00{subject_id}".encode(), hashlib.sha256).hexdigest()
