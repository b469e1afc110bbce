"""Idempotency-Key handling (IETF draft): the first answer to a key is stored with the work it describes.

Answers are kept for ``idempotency_ttl_s`` (default a day; the workers' housekeeping deletes older ones).
The record is written in the same transaction as the resources it answers for, so a key is either unused or
bound to a committed answer. Two concurrent requests with one key race on the primary key: the loser's commit
fails, and it replays the winner's answer (see ``deletion_requests.routes``). Never commits.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from service.core.clock import utcnow
from service.core.database import write_at_commit
from service.core.problems import InvalidInput
from service.idempotency import repository
from service.idempotency.tables import IdempotencyRecord


def fingerprint(method: str, path: str, payload: Any) -> str:
    """SHA-256 of the operation and its canonical JSON body (key order and whitespace do not matter)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def find_answer(
    session: Session, client_id: str, key: str, request_fingerprint: str
) -> IdempotencyRecord | None:
    """The client's stored answer for ``key``; a key reused with a different request is a 422."""
    record = repository.get(session, client_id, key)
    if record is not None and record.fingerprint != request_fingerprint:
        raise InvalidInput(
            "idempotency-key-reused",
            "this Idempotency-Key was used with a different request",
            idempotency_key=key,
        )
    return record


def remember_answer(
    session: Session,
    client_id: str,
    key: str,
    request_fingerprint: str,
    status_code: int,
    body: Any,
    headers: dict[str, str],
) -> None:
    """Store the first answer to ``key``, written with the transaction's commit (in its one statement: see
    ``core.database.write_at_commit``); a key answered meanwhile makes that commit fail (its primary key)."""
    # resource_id: what the answer created: the purge of a deletion request drops the answers that echoed it.
    resource_id = body.get("id") if isinstance(body, dict) else None
    row = {"client_id": client_id, "key": key, "fingerprint": request_fingerprint, "status_code": status_code,
           "body": body, "headers": headers, "resource_id": resource_id, "created_at": utcnow()}  # fmt: skip
    write_at_commit(session, [(IdempotencyRecord, [row])])


def expire(session: Session, ttl_s: float) -> int:
    """Delete the answers older than ``ttl_s`` (``LETHE_IDEMPOTENCY_TTL_S``): a key is a retry window, not
    a record; returns how many went."""
    return repository.delete_older_than(session, utcnow() - timedelta(seconds=ttl_s))
