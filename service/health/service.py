"""Readiness: can this API process do its work now? Each check is cheap and bounded in time; it names what is
wrong and never raises."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from sqlalchemy import text
from sqlalchemy.orm import Session

from service.core.database import head_revision
from service.core.settings import Settings
from service.storage import ObjectStore

BROKER_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


@cache
def _head() -> str:
    return head_revision()


def database(session: Session) -> Check:
    """Reachable, and at the migration head this code expects."""
    try:
        current = session.scalar(text("SELECT version_num FROM alembic_version"))
    except Exception as exc:  # unreachable, or never migrated
        return Check(False, f"unreachable or not migrated ({type(exc).__name__})")
    finally:
        session.rollback()
    if current != _head():
        return Check(False, f"at migration {current}, this code needs {_head()}: run lethe migrate")
    return Check(True, f"at migration head {current}")


def broker(settings: Settings) -> Check:
    """Redis answers a PING (with the in-process dispatcher there is no broker)."""
    if settings.dispatcher != "celery":
        return Check(True, "in-process dispatcher: no broker")
    import redis

    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=BROKER_TIMEOUT_S, socket_connect_timeout=BROKER_TIMEOUT_S
    )
    try:
        client.ping()
    except Exception as exc:
        return Check(False, f"no answer to PING ({type(exc).__name__})")
    finally:
        client.close()
    return Check(True, "answers PING")


def store(objects: ObjectStore) -> Check:
    """The object store takes (and drops) a probe object."""
    try:
        objects.check_writable()
    except Exception as exc:  # a directory's OSError, or an S3 client's error
        return Check(False, f"not writable ({getattr(exc, 'strerror', None) or type(exc).__name__})")
    return Check(True, "writable")
