"""
L{LogRecorder}: every log event published while a test runs, to search and
to wait for. L{SyslogCapture}: what twistd's C{--syslog} observer sends.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python import syslog
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer  # type: ignore[import-untyped]

__all__ = ["LogRecorder", "SyslogCapture"]


@implementer(ILogObserver)
class LogRecorder:
    """Keeps every log event published while a test runs."""

    def __init__(self, case: TestCase) -> None:
        self.events: list[LogEvent] = []
        self._waiting: list[tuple[str, int, Deferred[None]]] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)
        waiting, self._waiting = self._waiting, []
        for containing, count, d in waiting:
            self._check(containing, count, d)

    def _check(self, containing: str, count: int, d: Deferred[None]) -> None:
        if len(self.texts(containing)) >= count:
            d.callback(None)
        else:
            self._waiting.append((containing, count, d))

    def when(self, containing: str, count: int = 1) -> Deferred[None]:
        """Fires once C{count} events contain C{containing}."""
        d: Deferred[None] = Deferred()
        self._check(containing, count, d)
        return d

    def texts(self, containing: str = "") -> list[str]:
        """The formatted events whose text contains C{containing}."""
        texts = [formatEvent(event) for event in self.events]
        return [text for text in texts if containing in text]

    def mentioning(self, secret: str) -> list[str]:
        """
        The events whose text, or any of whose fields, holds C{secret}.
        """
        found = []
        for event in self.events:
            text = formatEvent(event)
            fields = " ".join(repr(value) for value in event.values())
            if secret in text or secret in fields:
                found.append(text)
        return found


class SyslogCapture:
    """
    Stands in for the system's syslog under twistd's C{--syslog} observer
    while a test runs: C{prefixes} it was opened with, C{lines} sent, each
    as (priority, text).
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.prefixes: list[str] = []
        self.lines: list[tuple[int, str]] = []
        case.patch(syslog.SyslogObserver, "openlog",
                   staticmethod(lambda prefix, *rest: self.prefixes.append(prefix)))
        case.patch(syslog.SyslogObserver, "syslog",
                   staticmethod(lambda priority, text: self.lines.append((priority, text))))

    def texts(self) -> list[str]:
        return [text for _, text in self.lines]
