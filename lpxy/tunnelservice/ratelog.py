# -*- test-case-name: tests.test_ratelog -*-
"""
A log line for a repeated event at most once per interval, with a count.

A flood of refused connections must not become a flood of log lines: the
first occurrence is reported at once, the ones that follow within the
interval are counted and reported together when it ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """
    Calls C{emit(count, detail)} at most once per C{interval} seconds, with
    how many events happened since the last call and the latest's detail.

    @param clock: an C{IReactorTime} provider.
    @param interval: seconds between two reports, at least.
    @param emit: writes the report.
    """

    def __init__(
        self, clock: Any, interval: float, emit: Callable[[int, str], None]
    ) -> None:
        self._clock = clock
        self._interval = interval
        self._emit = emit
        self._count = 0
        self._detail = ""
        self._window: Any = None

    def event(self, detail: str = "") -> None:
        """Something happened: report it now, or count it for the next report."""
        self._count += 1
        self._detail = detail
        if self._window is None:
            self._report()

    def _report(self) -> None:
        self._window = None
        if not self._count:
            return
        count, self._count = self._count, 0
        self._emit(count, self._detail)
        self._window = self._clock.callLater(self._interval, self._report)

    def stop(self) -> None:
        """Report what is counted and schedule nothing more."""
        if self._window is not None and self._window.active():
            self._window.cancel()
        self._window = None
        if self._count:
            count, self._count = self._count, 0
            self._emit(count, self._detail)
