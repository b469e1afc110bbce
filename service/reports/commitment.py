"""A SHA-256 Merkle commitment to a request's sample ids, so a report need not list them.

Leaf = SHA-256(0x00 || salt || id), the leaves sorted; a node = SHA-256(0x01 || left || right), an odd node
carried up. The salt (32 random bytes, kept by the service) stops anyone holding the report from testing
guessed ids; with the salt and a leaf's path, a specific id can be proven included.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

ALGORITHM = "merkle-sha256(leaf = sha256(0x00 || salt || sample_id), node = sha256(0x01 || left || right))"


def new_salt() -> bytes:
    return secrets.token_bytes(32)


def leaf(salt: bytes, sample_id: str) -> bytes:
    return hashlib.sha256(b"\x00" + salt + sample_id.encode()).digest()


def merkle_root(salt: bytes, sample_ids: Sequence[str]) -> str:
    level = sorted(leaf(salt, sample_id) for sample_id in sample_ids)
    if not level:
        return hashlib.sha256(b"").hexdigest()
    while len(level) > 1:
        level = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() if i + 1 < len(level) else level[i]
            for i in range(0, len(level), 2)
        ]
    return level[0].hex()


def inclusion_proof(salt: bytes, sample_ids: Sequence[str], sample_id: str) -> list[tuple[str, str]]:
    """The sibling hashes from ``sample_id``'s leaf to the root, each with its side ("left" | "right")."""
    level = sorted(leaf(salt, s) for s in sample_ids)
    position = level.index(leaf(salt, sample_id))
    proof: list[tuple[str, str]] = []
    while len(level) > 1:
        sibling = position ^ 1
        if sibling < len(level):
            proof.append(("left" if sibling < position else "right", level[sibling].hex()))
        level = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() if i + 1 < len(level) else level[i]
            for i in range(0, len(level), 2)
        ]
        position //= 2
    return proof


def verify_inclusion(salt: bytes, sample_id: str, proof: Sequence[tuple[str, str]], root: str) -> bool:
    node = leaf(salt, sample_id)
    for side, sibling in proof:
        other = bytes.fromhex(sibling)
        node = hashlib.sha256(b"\x01" + (other + node if side == "left" else node + other)).digest()
    return node.hex() == root
