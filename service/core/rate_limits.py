"""Per-client rate limits on the POST endpoints (429 with Retry-After beyond them).

The ``limits`` library counts hits in a sliding window, in process memory (one API process, the demo) or in
Redis (several API processes share the counts). A counter store that cannot be reached lets requests through:
a limiter outage must not refuse deletion requests, which are legal obligations.
"""

from __future__ import annotations

import logging
import math
import time

from limits import RateLimitItem, parse_many
from limits.storage import storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

from service.core.problems import TooManyRequests

logger = logging.getLogger(__name__)
_NAMESPACE = "lethe-post"


class RateLimiter:
    def __init__(self, limits: str, storage_url: str) -> None:
        """``limits``: e.g. ``"20/second;600/minute"`` (empty: no limit); ``storage_url``: ``memory://`` or
        ``redis://host:port/db``."""
        self._items: list[RateLimitItem] = parse_many(limits) if limits.strip() else []
        self._strategy = SlidingWindowCounterRateLimiter(storage_from_string(storage_url))

    def hit(self, key: str) -> None:
        """Count one request of ``key``; raises the 429 problem when a limit is spent."""
        for item in self._items:
            try:
                allowed = self._strategy.hit(item, _NAMESPACE, key)
                if allowed:
                    continue
                reset_at = self._strategy.get_window_stats(item, _NAMESPACE, key).reset_time
            except Exception:  # the counter store is down: let the request through
                logger.warning("rate limiter unavailable; %s not limited", key, exc_info=True)
                return
            retry_after = max(1, math.ceil(reset_at - time.time()))
            raise TooManyRequests(
                "rate-limited",
                f"this client may send at most {item} POST requests; retry after {retry_after} s",
                headers={"Retry-After": str(retry_after)},
                limit=str(item),
                retry_after_seconds=retry_after,
            )
