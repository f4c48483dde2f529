"""
Per-key sliding-window rate limiter: at most max_requests in any window_seconds span.

A deque of request timestamps per key; timestamps older than the window are dropped on each check,
and a key whose deque empties is removed, so memory is bounded by the keys active in the last window.
"""

import math
import threading
import time
from collections import deque


class SlidingWindowRateLimiter:
    def __init__(self, max_requests, window_seconds, clock=time.monotonic):
        if max_requests <= 0 or window_seconds <= 0:
            raise ValueError("max_requests and window_seconds must be positive")
        self.max_requests = max_requests
        self.window_seconds = window_seconds
        self.clock = clock
        self._buckets = {}  # key -> deque of timestamps, oldest first
        self._lock = threading.Lock()
        self._last_sweep = clock()

    def check(self, key):
        """Record a request for key if allowed. Returns (allowed, retry_after_seconds); retry_after is 0 if allowed."""
        with self._lock:
            now = self.clock()
            self._maybe_sweep(now)
            bucket = self._buckets.setdefault(key, deque())
            wait = self._wait(bucket, now)
            if wait == 0:  # rejected requests are not recorded
                bucket.append(now)
            return wait == 0, wait

    def retry_after(self, key):
        """Seconds until key may be recorded again (0: now), recording nothing."""
        with self._lock:
            bucket = self._buckets.get(key)
            return 0.0 if bucket is None else self._wait(bucket, self.clock())

    def _wait(self, bucket, now):
        """Seconds until the bucket has a free slot: when its oldest request in the window ages out (0: now)."""
        self._expire(bucket, now)
        return 0.0 if len(bucket) < self.max_requests else bucket[0] + self.window_seconds - now

    def _expire(self, bucket, now):
        cutoff = now - self.window_seconds
        while bucket and bucket[0] <= cutoff:
            bucket.popleft()

    def _maybe_sweep(self, now):
        """Once per window, drop buckets of keys that have gone quiet (otherwise one-off keys would pile up)."""
        if now - self._last_sweep < self.window_seconds:
            return
        self._last_sweep = now
        for key in list(self._buckets):
            self._expire(self._buckets[key], now)
            if not self._buckets[key]:
                del self._buckets[key]

    def __len__(self):
        """Number of keys currently tracked."""
        with self._lock:
            return len(self._buckets)


def retry_after_header(seconds):
    """Retry-After takes whole seconds; round up so a client that obeys it is not refused again. At least 1."""
    return str(max(1, math.ceil(seconds)))
