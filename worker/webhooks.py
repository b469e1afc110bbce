"""Webhook delivery: the outbox (``webhook_deliveries``) sent by the workers, signed as Standard Webhooks
specifies (``service.webhooks.service``).

Started by the ``worker_ready`` signal as a daemon thread of each worker, beside the sweeper
(``worker/tasks.py``). Every ``webhook_poll_interval_s`` it claims the due deliveries (``FOR UPDATE SKIP
LOCKED`` on Postgres, and a lease on each: several workers never send one attempt at once), up to
``webhook_concurrency`` in flight, fairly across endpoints; POSTs them from a thread pool with httpx and a
short timeout, outside any transaction (a receiver that never answers holds one slot for one timeout, and
nothing else); and records each attempt as it ends, scheduling the next with exponential backoff and jitter
until the retry window ends. One worker per ``webhook_due_soon_interval_s`` (a Redis lock) writes the
``deletion_request.due_soon`` events.

``deliver_due(session_factory, settings, now=...)`` runs one round to the end, for tests and tools: every
attempt due at ``now`` is sent and recorded, with the clock as given.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime

import httpx
import redis
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.core.clock import utcnow
from service.core.database import make_engine, make_session_factory
from service.core.settings import Settings
from service.webhooks import service
from service.webhooks.service import Claim, Outcome

log = logging.getLogger(__name__)

DUE_SOON_LOCK = "lethe:webhooks:due-soon"


def send(http: httpx.Client, settings: Settings, claim: Claim, now: datetime | None = None) -> Outcome:
    """POST one attempt (signed at ``now``, default the current time); never raises."""
    started_at = now or utcnow()
    clock = time.monotonic()
    status_code: int | None = None
    excerpt: str | None = None
    error: str | None = None
    try:
        # Checked again at each send: a name may resolve elsewhere now than when it was registered.
        address = None if settings.webhook_allow_private_hosts else service.private_address(claim.url)
        if address is not None:
            raise PermissionError(f"the host resolves to {address}, not a public address: not sent")
        headers = service.signed_headers(claim.secret, claim.webhook_id, started_at, claim.body)
        with http.stream(
            "POST", claim.url, content=claim.body.encode(), headers=headers,
            timeout=settings.webhook_timeout_s, follow_redirects=False,
        ) as response:  # fmt: skip
            status_code = response.status_code
            excerpt = _excerpt(response)
        if not 200 <= status_code < 300:
            error = f"answered HTTP {status_code}"
    except httpx.TimeoutException as exc:
        error = f"no answer within {settings.webhook_timeout_s:g} s ({type(exc).__name__})"
    except Exception as exc:  # refused, reset, bad TLS, an invalid URL...: the receiver's, recorded
        error = f"{type(exc).__name__}: {exc}".replace("\x00", "")[:500]
    duration_ms = round((time.monotonic() - clock) * 1000)
    return Outcome(started_at, duration_ms, status_code, error, excerpt)


def _excerpt(response: httpx.Response) -> str | None:
    """The answer's first bytes as text (a receiver's error message helps whoever reads the attempts)."""
    buffer = b""
    try:
        for chunk in response.iter_bytes():
            buffer += chunk
            if len(buffer) >= service.RESPONSE_EXCERPT:
                break
    except httpx.HTTPError:
        pass  # the status is what counts
    text = buffer[: service.RESPONSE_EXCERPT].decode("utf-8", "replace").replace("\x00", "")
    return text or None


@dataclass(frozen=True)
class Attempted:
    claim: Claim
    outcome: Outcome
    state: str | None  # the delivery's state after it; None when the record was dropped (see service.record)


class Deliverer:
    """Claims due attempts into a thread pool and records them as they end (DB work on the calling thread
    only; the pool only sends)."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        settings: Settings,
        *,
        http: httpx.Client | None = None,
        rng: random.Random | None = None,
        actor: str | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self.rng = rng or random.Random()
        self.actor = actor or f"webhooks {socket.gethostname()}"
        self._own_http = http is None
        self.http = http or httpx.Client(
            limits=httpx.Limits(max_connections=2 * settings.webhook_concurrency), follow_redirects=False
        )
        self.pool = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="lethe-webhook")
        self.in_flight: dict[Future[Outcome], Claim] = {}

    def submit_due(self, now: datetime | None = None) -> int:
        """Claim what is due into the free slots (committed before anything is sent); how many."""
        free = self.settings.webhook_concurrency - len(self.in_flight)
        if free <= 0:
            return 0
        with self.session_factory.begin() as session:
            claims = service.claim_due(session, self.settings, now or utcnow(), free)
        for claim in claims:
            self.in_flight[self.pool.submit(send, self.http, self.settings, claim, now)] = claim
        return len(claims)

    def collect(self, timeout: float | None, now: datetime | None = None) -> list[Attempted]:
        """Wait up to ``timeout`` (None: until one ends) for attempts to end, and record those that did."""
        if not self.in_flight:
            return []
        done, _ = wait(list(self.in_flight), timeout=timeout, return_when=FIRST_COMPLETED)
        attempted = []
        for future in done:
            claim = self.in_flight.pop(future)
            outcome = future.result()
            try:
                with self.session_factory.begin() as session:
                    delivery = service.record(
                        session, self.settings, claim, outcome, now or utcnow(), self.rng, self.actor
                    )
                    state = delivery.state if delivery is not None else None
            except Exception:
                # Unrecorded, the attempt is retried when its lease lapses: at least once, never lost.
                log.exception("webhooks: recording attempt %s of %s failed", claim.number, claim.delivery_id)
                state = None
            attempted.append(Attempted(claim, outcome, state))
        return attempted

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self._own_http:
            self.http.close()


def deliver_due(
    session_factory: sessionmaker[Session],
    settings: Settings,
    *,
    now: datetime | None = None,
    http: httpx.Client | None = None,
    rng: random.Random | None = None,
) -> list[Attempted]:
    """Send every attempt due at ``now`` (default: the current time), up to ``webhook_concurrency`` at once,
    record each as it ends, and return them. The next attempts it schedules lie after ``now``."""
    attempted: list[Attempted] = []
    running = Deliverer(session_factory, settings, http=http, rng=rng)
    try:
        while running.submit_due(now) or running.in_flight:
            attempted += running.collect(None, now)
    finally:
        running.close()
    return attempted


def check_due_soon(
    session_factory: sessionmaker[Session], settings: Settings, *, now: datetime | None = None
) -> int:
    """Write the due-soon events of open requests near their due date; the deliveries added."""
    try:
        with session_factory.begin() as session:
            return service.enqueue_due_soon(session, settings, now or utcnow())
    except IntegrityError:  # another worker wrote the same event first: its deliveries stand
        log.warning("webhooks: a concurrent due-soon check won; the next one completes what is left")
        return 0


def run_forever(settings: Settings) -> None:
    # Its own engine and connections, as the sweeper's: this thread lives in the worker's parent process.
    session_factory = make_session_factory(make_engine(settings.database_url, pool_size=2))
    client = redis.Redis.from_url(settings.redis_url)
    running = Deliverer(session_factory, settings)
    next_check = 0.0
    while True:
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + settings.webhook_due_soon_interval_s
            try:
                lock_for = max(1, settings.webhook_due_soon_interval_s - 1)
                if client.set(DUE_SOON_LOCK, socket.gethostname(), nx=True, ex=lock_for):
                    check_due_soon(session_factory, settings)
            except Exception:
                log.exception("webhooks: the due-soon check failed; trying again in its next interval")
        try:
            running.submit_due()
            if running.in_flight:
                running.collect(settings.webhook_poll_interval_s)
            else:
                time.sleep(settings.webhook_poll_interval_s)
        except Exception:
            log.exception("webhooks: a delivery round failed; trying again shortly")
            time.sleep(settings.webhook_poll_interval_s)


def start(settings: Settings) -> threading.Thread:
    thread = threading.Thread(target=run_forever, args=(settings,), name="lethe-webhooks", daemon=True)
    thread.start()
    return thread
