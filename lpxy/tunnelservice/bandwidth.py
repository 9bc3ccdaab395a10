# -*- test-case-name: tests.test_bandwidth -*-
"""
An optional bandwidth limit per tunnel, applied by not reading, never by
buffering.

Both ends of a tunnel share one L{TokenBucket} of bytes (all streams and
both directions together, as AWS counts its 800 KB/s per tunnel). Each
read from a peer spends what it brought; when that puts the bucket in debt,
the peer is not read again until the debt is paid off. A read is never
held back or split: what is read is relayed at once, so what the service
holds does not grow with the limit.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from lpxy._ws import Clock, DelayedCall
from lpxy.tunnelservice.throttle import TokenBucket

__all__ = ["AWS_TUNNEL_RATE", "ReadPacer", "TunnelRates"]

AWS_TUNNEL_RATE = 800 * 1024
"""AWS IoT Secure Tunneling's bandwidth per tunnel, in bytes a second."""


class TunnelRates:
    """
    The bandwidth buckets of the tunnels that have an end connected: one
    per tunnel, kept while a L{ReadPacer} holds it.

    @param clock: the time source.
    @param rate: bytes a second per tunnel.
    @param burst: bytes a tunnel may move at once (a quarter of a second's
        worth unless given, at least one read of 64 KB).
    """

    def __init__(self, clock: Clock, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.clock = clock
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 4, 65536.0)
        self._buckets: weakref.WeakValueDictionary[str, TokenBucket] = (
            weakref.WeakValueDictionary()
        )

    def bucket(self, tunnel_id: str) -> TokenBucket:
        """The bucket of C{tunnel_id} (both its ends get the same one)."""
        bucket = self._buckets.get(tunnel_id)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, self.clock.seconds())
            self._buckets[tunnel_id] = bucket
        return bucket

    def pacer(self, tunnel_id: str, pause: Callable[[], None],
              resume: Callable[[], None]) -> ReadPacer:
        """A L{ReadPacer} for one end of C{tunnel_id}."""
        return ReadPacer(self.clock, self.bucket(tunnel_id), pause, resume)


class ReadPacer:
    """
    Paces the reading of one tunnel end: L{read} after each read; when the
    tunnel's bucket is in debt, C{pause} is called at once and C{resume}
    once the debt is paid.
    """

    def __init__(self, clock: Clock, bucket: TokenBucket, pause: Callable[[], None],
                 resume: Callable[[], None]) -> None:
        self._clock = clock
        self._bucket = bucket
        self._pause = pause
        self._resume = resume
        self._wait: DelayedCall | None = None

    def read(self, size: int) -> None:
        """C{size} bytes were read from this end."""
        delay = self._bucket.spend(size, self._clock.seconds())
        if delay > 0 and self._wait is None:
            self._pause()
            self._wait = self._clock.callLater(delay, self._paid)

    def _paid(self) -> None:
        self._wait = None
        # The partner's reads may have spent more meanwhile.
        delay = self._bucket.spend(0, self._clock.seconds())
        if delay > 0:
            self._wait = self._clock.callLater(delay, self._paid)
        else:
            self._resume()

    def stop(self) -> None:
        """The end is gone: no resume will come."""
        if self._wait is not None and self._wait.active():
            self._wait.cancel()
        self._wait = None
