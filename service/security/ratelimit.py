"""Per-client rate limiting: a token bucket in each worker process.

Each client (by ``client_id``) has a bucket of ``burst`` requests that refills at
``per_minute / 60`` requests a second; a request finding it empty gets ``429`` with
``Retry-After`` (whole seconds until one request is available again).

Why in-process: a database counter would add a write to every request, serialising all
requests on SQLite. The cost of the choice: the limit holds per worker, so with N workers a
client may get up to N times the configured rate (set the per-worker numbers accordingly,
or put a shared limit in the reverse proxy); a restart refills every bucket.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, *, per_minute: int, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float | None:
        """Take one request from ``key``'s bucket: None when allowed, else the seconds to wait."""
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            return (1.0 - bucket.tokens) / self.rate

    @staticmethod
    def retry_after(wait: float) -> str:
        return str(max(1, math.ceil(wait)))
