"""The service benchmarks' load client (httpx, asyncio), and the ledger that checks the database against what
the client was told.

Two shapes of load: :func:`open_loop` sends on a fixed schedule and times each request from its scheduled
send (no coordinated omission: a slow server cannot hide its queueing); :func:`closed_loop` keeps a fixed
number of connections busy back to back (``wrk -c N``'s shape): the server's saturation throughput. Every
POST carries its own ``Idempotency-Key`` and is sent again with that key after a transport error, a 503 or a
429 (after the server's ``Retry-After``), at most :data:`MAX_ATTEMPTS` times.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx

MAX_ATTEMPTS = 5  # sends of one POST (same Idempotency-Key) before it counts as lost

BodyOf = Callable[[int], dict[str, Any]]


class _Tally:
    def __init__(self, key_prefix: str) -> None:
        self.key_prefix = key_prefix
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.accepted: dict[int, str] = {}
        self.retries = 0

    async def post(
        self, client: httpx.AsyncClient, path: str, body: dict[str, Any], i: int, started: float
    ) -> None:
        answer = None
        for attempt in range(MAX_ATTEMPTS):
            try:
                answer = await client.post(
                    path, json=body, headers={"Idempotency-Key": f"{self.key_prefix}{i}"}
                )
            except httpx.TransportError:
                answer = None
            if answer is not None and answer.status_code not in (429, 503):
                break
            self.retries += 1
            # As a client should: the server's Retry-After when it gives one, else a growing pause.
            hint = answer.headers.get("retry-after") if answer is not None else None
            await asyncio.sleep(float(hint) if hint else 0.5 * (attempt + 1))
        self.latencies.append(time.perf_counter() - started)
        code = answer.status_code if answer is not None else 0
        self.statuses[code] = self.statuses.get(code, 0) + 1
        if answer is not None and answer.status_code in (200, 202):
            self.accepted[i] = answer.json()["id"]

    def result(self, elapsed: float, **extra: Any) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {
            **extra,
            "requests": len(ordered),
            "statuses": {str(code): n for code, n in sorted(self.statuses.items())},
            "retried_sends": self.retries,
            "accepted_ids": self.accepted,
            "elapsed_s": round(elapsed, 3),
            "throughput_per_s": round(len(ordered) / elapsed, 1),
            "latency_ms": {
                "p50": round(1000 * ordered[len(ordered) // 2], 1),
                "p99": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
                "max": round(1000 * ordered[-1], 1),
                "mean": round(1000 * statistics.fmean(ordered), 1),
            },
        }


def _client(url: str, headers: dict[str, str]) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, headers=headers, timeout=60, limits=httpx.Limits(max_connections=64)
    )


async def open_loop(
    url: str,
    headers: dict[str, str],
    path: str,
    body_of: BodyOf,
    rate: float,
    count: int,
    key_prefix: str = "load-",
) -> dict[str, Any]:
    """``count`` POSTs at ``rate``/s; the accepted ids (by index) are what the database must hold."""
    tally = _Tally(key_prefix)
    async with _client(url, headers) as client:
        start = time.perf_counter()
        tasks = []
        for i in range(count):
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            tasks.append(asyncio.create_task(tally.post(client, path, body_of(i), i, scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return tally.result(elapsed, offered_rate_per_s=rate)


async def closed_loop(
    url: str,
    headers: dict[str, str],
    path: str,
    body_of: BodyOf,
    connections: int,
    duration: float,
    key_prefix: str = "load-",
) -> dict[str, Any]:
    """``connections`` senders, each POSTing back to back for ``duration`` seconds."""
    tally = _Tally(key_prefix)
    counter = iter(range(10**9))

    async def sender(client: httpx.AsyncClient, deadline: float) -> None:
        while time.perf_counter() < deadline:
            i = next(counter)
            await tally.post(client, path, body_of(i), i, time.perf_counter())

    async with _client(url, headers) as client:
        start = time.perf_counter()
        await asyncio.gather(*(sender(client, start + duration) for _ in range(connections)))
        elapsed = time.perf_counter() - start
    return tally.result(elapsed, connections=connections)


def ledger(
    database_url: str, model: str, accepted: dict[int, str], sent: int, key_prefix: str = "load-"
) -> dict[str, int]:
    """What the database holds for ``model`` against what the client was told, for the requests numbered
    0 to ``sent`` - 1. Lost: a 2xx answer whose request is not in the database. Duplicated: requests beyond
    one per key (each has its own Idempotency-Key, whose stored answer names its request). Unanswered:
    requests the client gave up on after its retries, and how many of those the service recorded anyway (a
    retry with the same key would be answered with them)."""
    from sqlalchemy import select

    from service.core.database import make_engine, make_session_factory
    from service.deletion_requests.tables import DeletionRequest
    from service.idempotency.tables import IdempotencyRecord
    from service.models.tables import Model

    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            rows = set(session.scalars(
                select(DeletionRequest.id).join(Model, Model.id == DeletionRequest.model_id)
                .where(Model.name == model)
            ))  # fmt: skip
            keyed = {
                record.key: record.body["id"]
                for record in session.scalars(
                    select(IdempotencyRecord).where(IdempotencyRecord.key.like(f"{key_prefix}%"))
                )
                if record.body.get("model") == model
            }
    finally:
        engine.dispose()
    unanswered = [i for i in range(sent) if i not in accepted]
    return {
        "sent": sent,
        "accepted": len(accepted),
        "requests_in_database": len(rows),
        "lost": sum(1 for request_id in accepted.values() if request_id not in rows),
        "duplicated": len(rows) - len(set(keyed.values()) & rows),
        "accepted_not_matching_their_key": sum(
            1 for i, rid in accepted.items() if keyed.get(f"{key_prefix}{i}") != rid
        ),
        "unanswered": len(unanswered),
        "unanswered_but_recorded": sum(1 for i in unanswered if f"{key_prefix}{i}" in keyed),
    }
