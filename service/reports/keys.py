"""Ed25519 report-signing keys (the ``cryptography`` package), kept in one directory.

One PKCS#8 PEM file per key, ``<created, UTC>-<key id>.pem``; the newest is the active key. Rotation is
``lethe report keygen``: a new key becomes active, the old ones stay so their public keys are still served
and the reports they signed still verify. A key id is the first 16 hex digits of the SHA-256 of the raw
public key (the fingerprint is all 64). The directory is configuration (``LETHE_REPORT_KEY_DIR``), never
committed.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "Ed25519"


class NoSigningKey(LookupError):
    pass


def fingerprint(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()


def key_id_of(public_raw: bytes) -> str:
    return fingerprint(public_raw)[:16]


@dataclass(frozen=True)
class SigningKey:
    key_id: str
    created: str
    private: Ed25519PrivateKey

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def public_info(self, active: bool) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "algorithm": ALGORITHM,
            "public_key": base64.b64encode(self.public_raw).decode(),
            "fingerprint_sha256": fingerprint(self.public_raw),
            "created": self.created,
            "active": active,
        }


class KeyRing:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def generate(self) -> SigningKey:
        """A new key, written with owner-only permissions; it is the active one from now on."""
        private = Ed25519PrivateKey.generate()
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        created = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{created}-{key_id_of(raw)}.pem"
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        return SigningKey(key_id_of(raw), created, private)

    def signing_keys(self) -> list[SigningKey]:
        """Every key, oldest first."""
        found = []
        for path in sorted(self.directory.glob("*.pem")) if self.directory.is_dir() else []:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(private, Ed25519PrivateKey):
                raise ValueError(f"{path.name} is not an Ed25519 key")
            created = path.stem.split("-", 1)[0]
            raw = private.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            found.append(SigningKey(key_id_of(raw), created, private))
        return found

    def active(self) -> SigningKey:
        keys = self.signing_keys()
        if not keys:
            raise NoSigningKey(f"no report-signing key in {self.directory}: run `lethe report keygen`")
        return keys[-1]

    def public_keys(self) -> list[dict[str, Any]]:
        keys = self.signing_keys()
        return [key.public_info(active=i == len(keys) - 1) for i, key in enumerate(keys)]


def sign(key: SigningKey, data: bytes) -> dict[str, str]:
    """The detached signature document of ``data``."""
    return {
        "algorithm": ALGORITHM,
        "key_id": key.key_id,
        "signature": base64.b64encode(key.private.sign(data)).decode(),
    }


def verify(public_raw: bytes, data: bytes, signature: dict[str, str]) -> bool:
    if signature.get("algorithm") != ALGORITHM:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(base64.b64decode(signature["signature"]), data)
    except (InvalidSignature, ValueError, KeyError):
        return False
    return True
