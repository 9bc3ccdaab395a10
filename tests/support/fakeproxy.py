"""
A stand-in for L{lpxy.proxy.service.LocalProxyService}, for testing the
entry points (C{tap}, C{cli}, C{runner}) without a tunnel.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from lpxy.proxy.config import ProxyConfig


class FakeProxyService(Service):
    """
    Records its configuration and reactor, its start and stop; the test
    ends it with L{finish}.
    """

    def __init__(self, config: ProxyConfig, reactor: Any = None) -> None:
        self.config = config
        self.reactor = reactor
        self.starts = 0
        self.stops = 0
        self._done: Deferred[int] = Deferred()

    def startService(self) -> None:
        super().startService()
        self.starts += 1

    def stopService(self) -> None:
        super().stopService()
        self.stops += 1

    def whenDone(self) -> Deferred[int]:
        return self._done

    def finish(self, status: int) -> None:
        """End on its own with C{status}, as the real service does."""
        self._done.callback(status)

    def fail(self, reason: BaseException) -> None:
        """End with an unexpected error."""
        self._done.errback(reason)
