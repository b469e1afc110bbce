"""Appending to the audit trail (in the caller's transaction: an event exists exactly when what it records
was committed) and verifying the chain. Never commits.

One global chain, in commit order. :func:`append` only queues an event on the session; when the session
commits, its queued events are chained after the head and written, with the head's move and the other rows
the commit writes (``core.database.commit_writer``), in one statement on Postgres. The head's row lock,
which serialises every writer of the chain, is so held from just before the commit to the commit, not from
the first event of a transaction to its end. Something that reads the transaction's own events before it
commits (a report's chain segment) writes them first (:func:`write_pending`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import event as orm_event
from sqlalchemy import select
from sqlalchemy.orm import Session, SessionTransaction

from service.core import canonical
from service.core.clock import utcnow
from service.core.database import Writes, commit_writer, select_after_required, write_together
from service.trail.tables import GENESIS, TrailEvent, TrailHead

_HEAD_ID = 1
_PAGE = 1000


@dataclass(slots=True)
class QueuedEvent:
    """An event appended in a transaction that has not committed: a plain object (a bulk call queues
    thousands; an ORM instance costs several times as much), a row of :class:`TrailEvent` once chained."""

    occurred_at: datetime
    actor: str
    kind: str
    request_id: str | None
    subject_type: str
    subject_id: str
    data: dict[str, Any]
    seq: int | None = None


def event_hash(prev_hash: str, event: TrailEvent | QueuedEvent) -> str:
    """SHA-256 of the previous hash and the RFC 8785 bytes of what the event says: a stored event or one
    still queued."""
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
    return hashlib.sha256(prev_hash.encode() + canonical.dumps(body)).hexdigest()


_PENDING = "lethe.trail.pending"  # the session's queued events (Session.info)
_HELD = "lethe.trail.head"  # the head as this transaction has moved it (its lock held), until the commit


def append(
    session: Session,
    kind: str,
    *,
    actor: str,
    subject_type: str,
    subject_id: str,
    request_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """Queue an event in the session's transaction; it gets its place in the chain (``seq``, hashes) when
    the transaction commits, and is discarded with a rollback."""
    event = QueuedEvent(utcnow(), actor, kind, request_id, subject_type, subject_id, data or {})
    session.info.setdefault(_PENDING, []).append(event)


def write_pending(session: Session) -> None:
    """Chain the session's queued events after the head and write them in one statement. The head is locked
    (until the transaction ends) and read by the first write of a transaction; later ones (a batch settling
    request after request, each report reading its chain segment) go on from where it left the head, which
    is written once, at the commit (with the commit's events and other rows, in one statement)."""
    write_together(session, [(TrailEvent, _chained(session))])


@commit_writer
def _at_commit(session: Session) -> Writes:
    rows = _chained(session)
    if _HELD not in session.info:
        return [], []
    seq, last = session.info.pop(_HELD)
    return [(TrailEvent, rows)], [(TrailHead, [{"id": _HEAD_ID, "seq": seq, "hash": last}])]


def _chained(session: Session) -> list[dict[str, Any]]:
    """The session's queued events chained after the head (locked and read by the transaction's first
    chaining, then where the last one left it), as rows."""
    events: list[QueuedEvent] = session.info.pop(_PENDING, None) or []
    if not events:
        return []
    seq, prev = session.info.get(_HELD) or _lock_head(session)
    rows = []
    for event in events:
        seq += 1
        event.seq = seq
        own = event_hash(prev, event)
        rows.append(
            {"seq": seq, "occurred_at": event.occurred_at, "actor": event.actor, "kind": event.kind,
             "request_id": event.request_id, "subject_type": event.subject_type,
             "subject_id": event.subject_id, "data": event.data, "prev_hash": prev, "hash": own}
        )  # fmt: skip
        prev = own
    session.info[_HELD] = (seq, prev)
    return rows


# Every commit that appends events takes the head by this statement: built once (and its cache key).
_LOCK_HEAD = select(TrailHead.seq, TrailHead.hash).where(TrailHead.id == _HEAD_ID).with_for_update()


def _lock_head(session: Session) -> tuple[int, str]:
    # Plain columns (no ORM execution), after (or with) the updates the commit requires.
    head = select_after_required(session, _LOCK_HEAD)
    if head is None:  # the first event of a database creates the head row
        session.add(TrailHead(id=_HEAD_ID, seq=0, hash=GENESIS))
        session.flush()
        return 0, GENESIS
    return head.seq, head.hash


@orm_event.listens_for(Session, "after_transaction_end")
def _discard_at_end(session: Session, transaction: SessionTransaction) -> None:
    # A transaction that ends without committing (rollback, close) takes its queued events with it; one
    # that commits has written them, and its hold on the head ends with it.
    if transaction.parent is None:
        session.info.pop(_PENDING, None)
        session.info.pop(_HELD, None)


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
    return request_segments(session, [request_id])[request_id]


def request_segments(session: Session, request_ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
    """:func:`request_segment` of many requests: the session's queued events written once, then one query."""
    write_pending(session)
    rows = session.execute(
        select(TrailEvent.request_id, TrailEvent.seq, TrailEvent.hash)
        .where(TrailEvent.request_id.in_(request_ids))
        .order_by(TrailEvent.seq)
    )
    segments: dict[str, dict[str, Any] | None] = dict.fromkeys(request_ids)
    for request_id, seq, hash_ in rows:
        segment = segments[str(request_id)]
        if segment is None:
            segments[str(request_id)] = {"events": 1, "first_seq": seq, "first_hash": hash_, "last_seq": seq,
                                    "last_hash": hash_}  # fmt: skip
        else:
            segment.update(events=segment["events"] + 1, last_seq=seq, last_hash=hash_)
    return segments
