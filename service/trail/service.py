"""Appending to the audit trail (in the caller's transaction: an event exists exactly when what it records
was committed) and verifying the chain. Never commits."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import rfc8785
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.clock import utcnow
from service.trail.tables import GENESIS, TrailEvent, TrailHead

_HEAD_ID = 1
_PAGE = 1000


def event_hash(prev_hash: str, event: TrailEvent) -> str:
    body: dict[str, Any] = {
        "seq": event.seq,
        "occurred_at": event.occurred_at.isoformat(),
        "actor": event.actor,
        "kind": event.kind,
        "request_id": event.request_id,
        "subject_type": event.subject_type,
        "subject_id": event.subject_id,
        "data": event.data,
    }
    return hashlib.sha256(prev_hash.encode() + rfc8785.dumps(body)).hexdigest()


def append(
    session: Session,
    kind: str,
    *,
    actor: str,
    subject_type: str,
    subject_id: str,
    request_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> TrailEvent:
    head = session.get(TrailHead, _HEAD_ID, with_for_update=True, populate_existing=True)
    if head is None:
        head = TrailHead(id=_HEAD_ID, seq=0, hash=GENESIS)
        session.add(head)
    event = TrailEvent(
        seq=head.seq + 1, occurred_at=utcnow(), actor=actor, kind=kind, request_id=request_id,
        subject_type=subject_type, subject_id=subject_id, data=data or {}, prev_hash=head.hash,
    )  # fmt: skip
    event.hash = event_hash(head.hash, event)
    session.add(event)
    head.seq, head.hash = event.seq, event.hash
    session.flush()
    return event


@dataclass(frozen=True)
class ChainCheck:
    valid: bool
    events: int
    first_broken_seq: int | None
    reason: str | None
    last_hash: str

    def to_dict(self) -> dict[str, Any]:
        return {"valid": self.valid, "events": self.events, "first_broken_seq": self.first_broken_seq,
                "reason": self.reason, "last_hash": self.last_hash}  # fmt: skip


def _events(session: Session) -> Iterator[TrailEvent]:
    after = 0
    while True:
        page = session.scalars(
            select(TrailEvent).where(TrailEvent.seq > after).order_by(TrailEvent.seq).limit(_PAGE)
        ).all()
        yield from page
        if len(page) < _PAGE:
            return
        after = page[-1].seq


def verify_chain(session: Session) -> ChainCheck:
    """Recompute every link; the first event whose sequence, previous hash or own hash does not match is
    named. The head row must match the last event (a deleted tail is a break too)."""
    prev, expected_seq, count = GENESIS, 1, 0
    for event in _events(session):
        reason = None
        if event.seq != expected_seq:
            reason = f"sequence jumps from {expected_seq - 1} to {event.seq}: events are missing"
        elif event.prev_hash != prev:
            reason = "its previous hash is not the hash of the event before it"
        elif event_hash(prev, event) != event.hash:
            reason = "its content does not hash to its recorded hash: it was edited"
        if reason:
            return ChainCheck(False, count, event.seq, reason, prev)
        prev, expected_seq, count = event.hash, event.seq + 1, count + 1
    head = session.get(TrailHead, _HEAD_ID)
    if head is not None and (head.seq, head.hash) != (count, prev):
        return ChainCheck(False, count, count + 1, "the chain's head names events that are missing", prev)
    return ChainCheck(True, count, None, None, prev)


def request_segment(session: Session, request_id: str) -> dict[str, Any] | None:
    """The request's events so far: how many, and the first and last hash (a report carries these)."""
    events = session.scalars(
        select(TrailEvent).where(TrailEvent.request_id == request_id).order_by(TrailEvent.seq)
    ).all()
    if not events:
        return None
    return {"events": len(events), "first_seq": events[0].seq, "first_hash": events[0].hash,
            "last_seq": events[-1].seq, "last_hash": events[-1].hash}  # fmt: skip
