# -*- test-case-name: tests.test_throttle -*-
"""
API rate limits: one token bucket per caller.

A caller is whoever the API recognised (an access key id, or a client
address when the API is open). Each bucket holds up to C{burst} tokens and
refills at C{rate} tokens a second; a request takes one token or, when none
is left, is refused. Buckets of callers that are full again are forgotten,
and at most C{max_callers} are kept, so callers a hostile client makes up
cannot fill memory.
"""

from __future__ import annotations

from collections import OrderedDict

from lpxy._ws import Clock

__all__ = ["DEFAULT_API_RATE", "Throttle", "TokenBucket"]

DEFAULT_API_RATE = 20.0
"""Requests a second per caller, as AWS allows for the busiest operations."""


class TokenBucket:
    """
    C{burst} tokens, refilled at C{rate} a second, spent one per request.

    @param rate: tokens added a second.
    @param burst: the most tokens held (and the start).
    @param now: the time of creation, in the clock's seconds.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; whether there was."""
        self._refill(now)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def spend(self, amount: float, now: float) -> float:
        """
        Spend C{amount} tokens, going into debt if there are fewer: the
        seconds until the debt is paid off (0 when there was no debt).
        """
        self._refill(now)
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    def full(self, now: float) -> bool:
        """Whether the bucket is back at C{burst} (and can be forgotten)."""
        self._refill(now)
        return self._tokens >= self._burst


class Throttle:
    """
    Per-caller token buckets on an injected clock.

    @param clock: the time source (C{seconds()}).
    @param rate: requests a second each caller may make, on average.
    @param burst: requests a caller may make at once (twice C{rate} unless given).
    @param max_callers: the most buckets kept; past it, the callers not seen
        for longest are forgotten (they start again with a full bucket).
    """

    def __init__(
        self,
        clock: Clock,
        rate: float = DEFAULT_API_RATE,
        burst: float | None = None,
        max_callers: int = 10000,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._clock = clock
        self.rate = rate
        self.burst = max(1.0, 2 * rate if burst is None else burst)
        self._max_callers = max_callers
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, caller: str) -> bool:
        """Whether C{caller} may make a request now (spending a token if so)."""
        now = self._clock.seconds()
        bucket = self._buckets.pop(caller, None)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
        allowed = bucket.take(now)
        self._buckets[caller] = bucket
        self._prune(now)
        return allowed

    def _prune(self, now: float) -> None:
        # Oldest first: drop the least recently seen while full or too many.
        while self._buckets:
            caller, bucket = next(iter(self._buckets.items()))
            if len(self._buckets) > self._max_callers or bucket.full(now):
                del self._buckets[caller]
            else:
                break

    def __len__(self) -> int:
        return len(self._buckets)
