"""
Tests for L{lpxy.proxy.verbosity}: the proxy's C{-v}, on the console and
under twistd.
"""

from __future__ import annotations

import io
import sys
from typing import Any

from twisted.logger import LogLevel, LogPublisher, PredicateResult
from twisted.trial.unittest import SynchronousTestCase

from lpxy._process import TwistdLog
from lpxy.proxy import verbosity
from tests.support.logs import SyslogCapture

# The reference's log line, messages.md section 3.
REFERENCE_LINE = (
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\] \(0x[0-9a-f]{16}\) "
    r"\[(trace|debug|info|warning|error|fatal)\] (.*)$"
)
# twistd's timestamp, to the microsecond.
TWISTD_SUBSECOND = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d{4} "


def event(level: LogLevel | None) -> dict[str, Any]:
    e: dict[str, Any] = {"log_format": "hello {who}", "who": "world", "log_namespace": "x",
                         "log_time": 1764460000.25}
    if level is not None:
        e["log_level"] = level
    return e


class VerbosityTests(SynchronousTestCase):
    """
    C{-v} maps to a lowest log level.
    """

    def test_levels(self) -> None:
        """
        0 off, 1 critical, 2 error, 3 warn, 4 info, 5 and above debug.
        """
        self.assertEqual(
            [verbosity.level_for(v) for v in (0, 1, 2, 3, 4, 5, 6, 255)],
            [None, LogLevel.critical, LogLevel.error, LogLevel.warn, LogLevel.info,
             LogLevel.debug, LogLevel.debug, LogLevel.debug],
        )

    def test_filter(self) -> None:
        """
        The filter lets through events at or above the level; events
        without a level count as info; 0 lets nothing through.
        """
        def passes(level_given: int, level: LogLevel | None) -> bool:
            result = verbosity.VerbosityFilter(level_given)(event(level))
            return result is PredicateResult.maybe

        self.assertTrue(passes(4, LogLevel.info))
        self.assertFalse(passes(4, LogLevel.debug))
        self.assertTrue(passes(3, LogLevel.error))
        self.assertFalse(passes(3, LogLevel.info))
        self.assertTrue(passes(1, LogLevel.critical))
        self.assertFalse(passes(1, LogLevel.error))
        self.assertTrue(passes(6, LogLevel.debug))
        self.assertTrue(passes(4, None))
        self.assertFalse(passes(3, None))
        self.assertFalse(passes(0, LogLevel.critical))

    def test_filtered(self) -> None:
        """
        L{verbosity.filtered} wraps an observer with a filter that can be
        changed afterwards.
        """
        seen: list[dict[str, Any]] = []
        predicate = verbosity.VerbosityFilter(3)
        observer = verbosity.filtered(seen.append, predicate)
        observer(event(LogLevel.info))
        observer(event(LogLevel.warn))
        predicate.verbosity = 5
        observer(event(LogLevel.debug))
        self.assertEqual(
            [e["log_level"] for e in seen], [LogLevel.warn, LogLevel.debug]
        )


class FakeBeginner:
    """Records what L{verbosity.start_console_logging} asks of the beginner."""

    def __init__(self) -> None:
        self.observers: list[Any] = []
        self.redirect: bool | None = None

    def beginLoggingTo(self, observers: list[Any], redirectStandardIO: bool = True) -> None:
        self.observers = observers
        self.redirect = redirectStandardIO


class ConsoleLoggingTests(SynchronousTestCase):
    """
    The console script logs readable text to standard error at C{-v}.
    """

    def test_text(self) -> None:
        """
        Events at or above the level are written as text lines; others are
        not; standard I/O is left alone.
        """
        stream = io.StringIO()
        beginner = FakeBeginner()
        verbosity.start_console_logging(3, stream, beginner)  # type: ignore[arg-type]
        self.assertFalse(beginner.redirect)
        publisher = LogPublisher(*beginner.observers)
        publisher(event(LogLevel.info))
        publisher(event(LogLevel.error))
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertRegex(lines[0], REFERENCE_LINE)
        self.assertTrue(lines[0].endswith(") [error] hello world"), lines[0])

    def test_portChatter(self) -> None:
        """
        Twisted's legacy lines about a port starting and stopping to listen
        are left out at the default level, shown at debug (C{-v 5}); other
        legacy lines stay.
        """
        publisher = LogPublisher()
        seen = {4: [], 5: []}  # type: dict[int, list[Any]]
        for level, events in seen.items():
            publisher.addObserver(
                verbosity.filtered(events.append, verbosity.VerbosityFilter(level))
            )
        for text in (
            "ServiceListenerFactory starting on 5555",
            "(TCP Port 5555 Closed)",
            "something else starting soon",
        ):
            publisher({"log_namespace": "log_legacy", "log_level": LogLevel.info,
                       "log_format": "{log_text}", "log_text": text})
        self.assertEqual([e["log_text"] for e in seen[4]], ["something else starting soon"])
        self.assertEqual(len(seen[5]), 3)

    def test_namedPortLinesStay(self) -> None:
        """
        Only the legacy log's port lines count as chatter: an lpxy line
        worded alike is kept.
        """
        self.assertFalse(verbosity.is_noise(
            {"log_namespace": "lpxy.x", "log_format": "(TCP Port 5 Closed)"}
        ))


class TwistdLoggingTests(SynchronousTestCase):
    """
    Under twistd, C{-v} reaches twistd's own observer through C{--logger}
    (a L{TwistdLog} of the test's, not the process's).
    """

    def setUp(self) -> None:
        self.log = TwistdLog("tests.test_verbosity.SOME_LOG")

    def test_setsLogger(self) -> None:
        """
        twistd's C{logger} option names the L{TwistdLog}'s observer, which
        writes where twistd would (standard output with C{-n} and no log
        file) only what the verbosity lets through.
        """
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        options = {"logger": None, "logfile": None, "nodaemon": 1, "syslog": 0}
        verbosity.filter_twistd_logging(options, 2, self.log)
        self.assertEqual(options["logger"], "tests.test_verbosity.SOME_LOG.observer")
        observer = self.log.observer()
        observer(event(LogLevel.warn))
        observer(event(LogLevel.error))
        self.assertEqual(len(stdout.getvalue().splitlines()), 1)
        self.assertIn("[x#error] hello world", stdout.getvalue())
        self.assertRegex(stdout.getvalue(), TWISTD_SUBSECOND)

    def test_syslog(self) -> None:
        """
        With C{--syslog}, syslog gets only what the verbosity lets through.
        """
        syslog = SyslogCapture(self)
        options = {"logger": None, "logfile": None, "nodaemon": 0, "syslog": 1,
                   "prefix": "twisted"}
        verbosity.filter_twistd_logging(options, 2, self.log)
        self.assertEqual(options["logger"], "tests.test_verbosity.SOME_LOG.observer")
        observer = self.log.observer()
        observer({**event(LogLevel.warn), "log_time": 0})
        observer({**event(LogLevel.error), "log_time": 0})
        self.assertEqual(syslog.texts(), ["[-] hello world"])

    def test_userLogger(self) -> None:
        """
        A C{--logger} the user gave is still used, behind the filter.
        """
        verbosity.filter_twistd_logging(
            {"logger": "tests.test_verbosity.recordingObserver", "logfile": None}, 3, self.log
        )
        observer = self.log.observer()
        observer(event(LogLevel.info))
        observer(event(LogLevel.critical))
        self.assertEqual([e["log_level"] for e in RECORDED], [LogLevel.critical])
        RECORDED.clear()


RECORDED: list[dict[str, Any]] = []


def recordingObserver() -> Any:
    return RECORDED.append
