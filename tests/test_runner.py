"""
Tests for L{lpxy.proxy.runner}: log verbosity and how the process ends.
"""

from __future__ import annotations

import io
import signal
import sys
from typing import Any

from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, LogPublisher, PredicateResult
from twisted.trial.unittest import SynchronousTestCase

from lpxy.proxy import runner
from lpxy.proxy.config import ProxyConfig, TunnelEndpoint
from tests.support.entrypoints import FakeProxyService, keep_process_state

CONFIG = ProxyConfig(mode="source", access_token="t", endpoint=TunnelEndpoint("h"))


def event(level: LogLevel | None) -> dict[str, Any]:
    e: dict[str, Any] = {"log_format": "hello {who}", "who": "world", "log_namespace": "x"}
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
            [runner.level_for(v) for v in (0, 1, 2, 3, 4, 5, 6, 255)],
            [None, LogLevel.critical, LogLevel.error, LogLevel.warn, LogLevel.info,
             LogLevel.debug, LogLevel.debug, LogLevel.debug],
        )

    def test_filter(self) -> None:
        """
        The filter lets through events at or above the level; events
        without a level count as info; 0 lets nothing through.
        """
        def passes(verbosity: int, level: LogLevel | None) -> bool:
            result = runner.VerbosityFilter(verbosity)(event(level))
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
        L{runner.filtered} wraps an observer with a filter that can be
        changed afterwards.
        """
        seen: list[dict[str, Any]] = []
        predicate = runner.VerbosityFilter(3)
        observer = runner.filtered(seen.append, predicate)
        observer(event(LogLevel.info))
        observer(event(LogLevel.warn))
        predicate.verbosity = 5
        observer(event(LogLevel.debug))
        self.assertEqual(
            [e["log_level"] for e in seen], [LogLevel.warn, LogLevel.debug]
        )


class FakeBeginner:
    """Records what L{runner.start_console_logging} asks of the beginner."""

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

    def setUp(self) -> None:
        keep_process_state(self)

    def test_text(self) -> None:
        """
        Events at or above the level are written as text lines; others are
        not; standard I/O is left alone.
        """
        stream = io.StringIO()
        beginner = FakeBeginner()
        runner.start_console_logging(3, stream, beginner)  # type: ignore[arg-type]
        self.assertFalse(beginner.redirect)
        publisher = LogPublisher(*beginner.observers)
        publisher(event(LogLevel.info))
        publisher(event(LogLevel.error))
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertTrue(lines[0].endswith("[x#error] hello world"), lines[0])


class TwistdLoggingTests(SynchronousTestCase):
    """
    Under twistd, C{-v} reaches twistd's own observer through C{--logger}.
    """

    def setUp(self) -> None:
        keep_process_state(self)

    def test_setsLogger(self) -> None:
        """
        twistd's C{logger} option names L{runner.twistd_observer}, and the
        verbosity is the process's.
        """
        options = {"logger": None, "logfile": None, "nodaemon": 1, "syslog": 0}
        runner.filter_twistd_logging(options, 2)
        self.assertEqual(options["logger"], "lpxy.proxy.runner.twistd_observer")
        self.assertEqual(runner.PROCESS_FILTER.verbosity, 2)

    def test_syslogLeftAlone(self) -> None:
        """
        With C{--syslog}, twistd keeps its own observer.
        """
        options = {"logger": None, "logfile": None, "nodaemon": 0, "syslog": 1}
        runner.filter_twistd_logging(options, 5)
        self.assertIsNone(options["logger"])
        self.assertEqual(runner.PROCESS_FILTER.verbosity, 5)

    def test_stdoutObserver(self) -> None:
        """
        With C{-n} and no log file, the observer writes to standard output,
        filtered.
        """
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        runner.filter_twistd_logging({"logger": None, "logfile": None, "nodaemon": 1}, 3)
        observer = runner.twistd_observer()
        observer(event(LogLevel.info))
        observer(event(LogLevel.warn))
        self.assertEqual(len(stdout.getvalue().splitlines()), 1)
        self.assertIn("[x#warn] hello world", stdout.getvalue())

    def test_logFile(self) -> None:
        """
        C{--logfile} is honoured.
        """
        path = self.mktemp()
        runner.filter_twistd_logging({"logger": None, "logfile": path, "nodaemon": 1}, 4)
        observer = runner.twistd_observer()
        observer(event(LogLevel.info))
        observer(event(LogLevel.debug))
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertIn("[x#info] hello world", lines[0])

    def test_userLogger(self) -> None:
        """
        A C{--logger} the user gave is still used, behind the filter.
        """
        runner.filter_twistd_logging(
            {"logger": "tests.test_runner.recordingObserver", "logfile": None}, 3
        )
        observer = runner.twistd_observer()
        observer(event(LogLevel.info))
        observer(event(LogLevel.critical))
        self.assertEqual([e["log_level"] for e in RECORDED], [LogLevel.critical])
        RECORDED.clear()


RECORDED: list[dict[str, Any]] = []


def recordingObserver() -> Any:
    return RECORDED.append


class FakeReactor(MemoryReactor):
    """A L{MemoryReactor} that records C{callFromThread}."""

    def __init__(self) -> None:
        super().__init__()
        self.fromThread: list[tuple[Any, tuple[Any, ...]]] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.fromThread.append((f, args))


class SignalTests(SynchronousTestCase):
    """
    L{runner.exit_zero_on_signals} stops the reactor on SIGTERM and SIGINT
    without leaving a signal for twistd to re-raise.
    """

    def test_handlers(self) -> None:
        """
        Handlers go in for SIGTERM and SIGINT when the reactor owns them;
        each asks the reactor thread to stop the reactor.
        """
        installed: dict[int, Any] = {}
        reactor = FakeReactor()
        runner.exit_zero_on_signals(
            reactor, installed.__setitem__, lambda number: reactor.callFromThread
        )
        self.assertEqual(set(installed), {signal.SIGTERM, signal.SIGINT})
        installed[signal.SIGTERM](signal.SIGTERM, None)
        self.assertEqual(reactor.fromThread, [(runner.stop_reactor, (reactor,))])
        self.assertFalse(reactor.hasStopped)
        runner.stop_reactor(reactor)
        self.assertTrue(reactor.hasStopped)

    def test_othersLeftAlone(self) -> None:
        """
        An ignored or default handler, or a plain function (twistd
        C{--debug}'s), is not replaced.
        """
        installed: dict[int, Any] = {}
        handlers = {
            signal.SIGTERM: signal.SIG_IGN,
            signal.SIGINT: signal.default_int_handler,
        }
        runner.exit_zero_on_signals(FakeReactor(), installed.__setitem__, handlers.__getitem__)
        self.assertEqual(installed, {})
        handlers = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: lambda *a: None}
        runner.exit_zero_on_signals(FakeReactor(), installed.__setitem__, handlers.__getitem__)
        self.assertEqual(installed, {})

    def test_stopTwice(self) -> None:
        """
        Stopping a reactor that is stopping already is no error.
        """
        from twisted.internet.error import ReactorNotRunning

        class Stopping:
            def __init__(self, error: Exception | None) -> None:
                self.error = error
                self.stops = 0

            def stop(self) -> None:
                self.stops += 1
                if self.error is not None:
                    raise self.error

        running = Stopping(None)
        runner.stop_reactor(running)
        self.assertEqual(running.stops, 1)
        stopping = Stopping(ReactorNotRunning())
        runner.stop_reactor(stopping)
        self.assertEqual(stopping.stops, 1)
        # Only that error is expected; any other still shows.
        broken = Stopping(RuntimeError("boom"))
        self.assertRaises(RuntimeError, runner.stop_reactor, broken)


class ExitStatusTests(SynchronousTestCase):
    """
    L{runner.exit_at_interpreter_end} arranges a non-zero exit status.
    """

    def setUp(self) -> None:
        keep_process_state(self)
        runner._exitStatus.clear()
        self.registered: list[tuple[Any, ...]] = []

    def register(self, *args: Any) -> None:
        self.registered.append(args)

    def test_zero(self) -> None:
        """
        Status 0 needs nothing.
        """
        runner.exit_at_interpreter_end(0, self.register)
        self.assertEqual(self.registered, [])

    def test_nonZeroOnce(self) -> None:
        """
        The first non-zero status is registered to end the process; later
        ones change nothing.
        """
        runner.exit_at_interpreter_end(3, self.register)
        runner.exit_at_interpreter_end(2, self.register)
        self.assertEqual(self.registered, [(runner._exitNow, 3)])


class EndProcessTests(SynchronousTestCase):
    """
    L{runner.EndProcess} ends the process when the proxy service is done.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        self.proxy = FakeProxyService(CONFIG, self.reactor)
        self.statuses: list[int] = []
        self.signalled: list[Any] = []
        self.root = runner.EndProcess(
            self.proxy, self.reactor, self.statuses.append, self.signalled.append
        )

    def test_startStop(self) -> None:
        """
        The proxy starts and stops with the root service; the signal
        handlers go in once the reactor runs.
        """
        self.root.startService()
        self.assertEqual(self.proxy.starts, 1)
        self.assertEqual(self.signalled, [])
        self.reactor.run()
        self.assertEqual(self.signalled, [self.reactor])
        self.root.stopService()
        self.assertEqual(self.proxy.stops, 1)
        self.assertEqual(self.statuses, [])

    def test_doneBeforeRunning(self) -> None:
        """
        A status that comes before the reactor runs stops it as soon as it
        does.
        """
        self.root.startService()
        self.proxy.finish(3)
        self.assertEqual(self.statuses, [3])
        self.assertFalse(self.reactor.hasStopped)
        self.assertIn(
            (runner.stop_reactor, (self.reactor,), {}), self.reactor.whenRunningHooks
        )

    def test_doneWhileRunning(self) -> None:
        """
        A status while running stops the reactor at once.
        """
        self.root.startService()
        self.reactor.running = True
        self.reactor.hasRun = True
        self.proxy.finish(0)
        self.assertEqual(self.statuses, [0])
        self.assertTrue(self.reactor.hasStopped)

    def test_failure(self) -> None:
        """
        An unexpected failure is logged and ends the process with status 1.
        """
        self.root.startService()
        self.reactor.running = self.reactor.hasRun = True
        self.proxy.fail(RuntimeError("boom"))
        self.assertEqual(self.statuses, [1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.reactor.hasStopped)
