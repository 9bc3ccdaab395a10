# -*- test-case-name: tests.test_acceptlog -*-
"""
Twisted's lines about failed C{accept()}s, folded into one line per
interval with a count.

When the process runs out of file descriptors, Twisted's listening port
logs on every failed C{accept()} ("Could not accept new connection
(EMFILE)"), and around its EMFILE recovery ("EMFILE encountered; ...",
"EMFILE recovery: Closed socket from ...", "Re-reserving ..."): under an
attack that is a log line per connection attempt. L{FoldedAcceptErrors}
sits in front of the process's log observer, keeps those events from it
and counts them into a L{RateLimitedLog}, which writes "Could not accept
N connection(s) in the last 10 s: too many open files" at most once per
interval. Every other event passes unchanged.

twistd makes its log observer after the service is built, so the folding
is set up in two parts: L{AcceptLogService.wrap} is the wrapper twistd's
observer factory calls (whatever the route: C{--logfile}, C{--syslog},
standard output or a C{--logger}), and the service, a child of the
process's root service, stops what it made when the process stops: the
last count is written and no timer is left behind.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from typing import Any, cast

from twisted.application.service import Service
from twisted.logger import ILogObserver, Logger

from lpxy.tunnelservice.ratelog import RateLimitedLog

__all__ = ["ACCEPT_LOG_INTERVAL", "AcceptLogService", "FoldedAcceptErrors"]

#: Seconds between two lines about failed accepts, at least.
ACCEPT_LOG_INTERVAL = 10.0

# Twisted's texts (twisted.internet.tcp._accept), matched exactly.
_COULD_NOT_ACCEPT = "Could not accept new connection ({acceptError})"
_RECOVERY_CLOSED = "EMFILE recovery: Closed socket from {address}"
_RECOVERY_CHATTER = frozenset({
    "EMFILE encountered; releasing reserved file descriptor.",
    "Re-reserving EMFILE recovery file descriptor.",
})
# Out of descriptors (EMFILE, ENFILE; ENOBUFS on the BSDs) or of kernel
# memory for one; ECONNABORTED (a peer gone before accept) is not folded.
_EXHAUSTION = frozenset({"EMFILE", "ENFILE", "ENOBUFS", "ENOMEM"})


def _reason(name: str) -> str:
    """C{"EMFILE"} -> C{"too many open files"}."""
    return os.strerror(getattr(errno, name)).lower()


class FoldedAcceptErrors:
    """
    A log observer that passes events on to C{observer}, except Twisted's
    lines about accepts failed for want of descriptors (or memory), which
    it counts: the first is reported at once, the rest at most once per
    C{interval} seconds, at warn level, with their count and the latest
    reason. Once stopped, it passes everything on.

    @param observer: the observer shown everything else, and the reports.
    @param clock: an C{IReactorTime} provider timing the reports.
    @param interval: seconds between two reports, at least.
    """

    def __init__(
        self,
        observer: Callable[[Mapping[str, Any]], None],
        clock: Any,
        interval: float = ACCEPT_LOG_INTERVAL,
    ) -> None:
        self._observer = observer
        self._log = Logger(namespace=__name__, observer=cast(ILogObserver, observer))
        self._interval = interval
        self._reports = RateLimitedLog(clock, interval, self._report)
        self._stopped = False

    def __call__(self, event: Mapping[str, Any]) -> None:
        failed = None if self._stopped else self._failed_accept(event)
        if failed is None:
            self._observer(event)
        elif failed:
            self._reports.event(failed)

    @staticmethod
    def _failed_accept(event: Mapping[str, Any]) -> str | None:
        """
        For one of Twisted's failed-accept events, the errno name to count
        (C{""}: part of one, not counted); L{None} for any other event.
        """
        if not str(event.get("log_namespace", "")).startswith("twisted.internet."):
            return None
        text = event.get("log_format")
        if text == _COULD_NOT_ACCEPT and event.get("acceptError") in _EXHAUSTION:
            return str(event["acceptError"])
        if text == _RECOVERY_CLOSED:
            return "EMFILE"
        if text in _RECOVERY_CHATTER:
            return ""
        return None

    def _report(self, count: int, name: str) -> None:
        self._log.warn(
            "Could not accept {count} connection(s) in the last {interval} s: {reason}",
            count=count, interval=f"{self._interval:g}", reason=_reason(name),
        )

    def stop(self) -> None:
        """
        Report what is counted now, and schedule nothing more: later events
        reach the observer as they are.
        """
        self._stopped = True
        self._reports.stop()


class AcceptLogService(Service):
    """
    Folds the failed-accept lines of the observers it L{wrap}s, and stops
    the folding (the last count written, the timer cancelled) when it
    stops.

    @param clock: an C{IReactorTime} provider timing the reports.
    @param interval: seconds between two reports, at least.
    """

    def __init__(self, clock: Any, interval: float = ACCEPT_LOG_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._folds: list[FoldedAcceptErrors] = []

    def wrap(self, observer: Callable[[Mapping[str, Any]], None]) -> FoldedAcceptErrors:
        """C{observer} behind a L{FoldedAcceptErrors} that this service stops."""
        fold = FoldedAcceptErrors(observer, self._clock, self._interval)
        self._folds.append(fold)
        return fold

    def stopService(self) -> None:
        super().stopService()
        for fold in self._folds:
            fold.stop()
