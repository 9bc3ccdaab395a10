"""
Tests for L{lpxy._process}: how a twistd process ends (signals, exit
status) and its log observer.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.error import ReactorNotRunning
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.logfile import LogFile
from twisted.python.reflect import namedAny
from twisted.trial.unittest import SynchronousTestCase

from lpxy import _process
from lpxy._process import TWISTD_LOG, ProcessEnd, ProcessService, TwistdLog, reopen_on_sighup
from lpxy.proxy.config import ProxyConfig, TunnelEndpoint
from tests.support.entrypoints import FakeProxyService
from tests.support.logs import SyslogCapture

CONFIG = ProxyConfig(mode="source", access_token="t", endpoint=TunnelEndpoint("h"))


def event(level: LogLevel) -> dict[str, Any]:
    return {"log_format": "hello {who}", "who": "world", "log_namespace": "x",
            "log_level": level}


class FakeReactor(MemoryReactor):
    """A L{MemoryReactor} that records C{callFromThread}."""

    def __init__(self) -> None:
        super().__init__()
        self.fromThread: list[tuple[Any, tuple[Any, ...]]] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.fromThread.append((f, args))


class SignalTests(SynchronousTestCase):
    """
    L{ProcessEnd.exit_zero_on_signals} stops the reactor on SIGTERM and
    SIGINT without leaving a signal for twistd to re-raise.
    """

    def test_handlers(self) -> None:
        """
        Handlers go in for SIGTERM and SIGINT when the reactor owns them;
        each asks the reactor thread to stop the reactor.
        """
        installed: dict[int, Any] = {}
        reactor = FakeReactor()
        ending = ProcessEnd(
            reactor, install=installed.__setitem__, current=lambda number: reactor.callFromThread
        )
        ending.exit_zero_on_signals()
        self.assertEqual(set(installed), {signal.SIGTERM, signal.SIGINT})
        installed[signal.SIGTERM](signal.SIGTERM, None)
        self.assertEqual(reactor.fromThread, [(_process.stop_reactor, (reactor,))])
        self.assertFalse(reactor.hasStopped)
        _process.stop_reactor(reactor)
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
        ProcessEnd(
            FakeReactor(), install=installed.__setitem__, current=handlers.__getitem__
        ).exit_zero_on_signals()
        self.assertEqual(installed, {})
        handlers = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: lambda *a: None}
        ProcessEnd(
            FakeReactor(), install=installed.__setitem__, current=handlers.__getitem__
        ).exit_zero_on_signals()
        self.assertEqual(installed, {})

    def test_stopTwice(self) -> None:
        """
        Stopping a reactor that is stopping already is no error.
        """

        class Stopping:
            def __init__(self, error: Exception | None) -> None:
                self.error = error
                self.stops = 0

            def stop(self) -> None:
                self.stops += 1
                if self.error is not None:
                    raise self.error

        running = Stopping(None)
        _process.stop_reactor(running)
        self.assertEqual(running.stops, 1)
        stopping = Stopping(ReactorNotRunning())
        _process.stop_reactor(stopping)
        self.assertEqual(stopping.stops, 1)
        # Only that error is expected; any other still shows.
        broken = Stopping(RuntimeError("boom"))
        self.assertRaises(RuntimeError, _process.stop_reactor, broken)


class ExitStatusTests(SynchronousTestCase):
    """
    L{ProcessEnd.exit_with} arranges a non-zero exit status.
    """

    def setUp(self) -> None:
        self.registered: list[tuple[Any, ...]] = []
        self.ending = ProcessEnd(MemoryReactor(), at_exit=self.register)

    def register(self, *args: Any) -> None:
        self.registered.append(args)

    def test_zero(self) -> None:
        """
        Status 0 needs nothing.
        """
        self.ending.exit_with(0)
        self.assertEqual(self.registered, [])
        self.assertIsNone(self.ending.status)

    def test_nonZeroOnce(self) -> None:
        """
        The first non-zero status is registered to end the process; later
        ones change nothing.
        """
        self.ending.exit_with(3)
        self.ending.exit_with(2)
        self.assertEqual(self.registered, [(_process._flush_and_exit, 3)])
        self.assertEqual(self.ending.status, 3)

    def test_ownState(self) -> None:
        """
        Each L{ProcessEnd} keeps its own status: one that has arranged an
        exit leaves another free to arrange its own.
        """
        self.ending.exit_with(3)
        other: list[tuple[Any, ...]] = []
        ProcessEnd(MemoryReactor(), at_exit=lambda *a: other.append(a)).exit_with(2)
        self.assertEqual(other, [(_process._flush_and_exit, 2)])


class RecordingEnd(ProcessEnd):
    """A L{ProcessEnd} that records what it is asked instead of doing it."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.signalled = 0
        self.statuses: list[int] = []

    def exit_zero_on_signals(self) -> None:
        self.signalled += 1

    def exit_with(self, status: int) -> None:
        self.statuses.append(status)


class ProcessServiceTests(SynchronousTestCase):
    """
    L{ProcessService} takes over the signals once the reactor runs and
    ends the process when its service is done.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        self.proxy = FakeProxyService(CONFIG, self.reactor)
        self.ending = RecordingEnd(self.reactor)
        self.root = ProcessService(
            self.proxy, self.reactor, done=self.proxy.whenDone, name="The local proxy",
            ending=self.ending,
        )

    def test_startStop(self) -> None:
        """
        The service starts and stops with the root service; the signal
        handlers go in once the reactor runs.
        """
        self.root.startService()
        self.assertEqual(self.proxy.starts, 1)
        self.assertEqual(self.ending.signalled, 0)
        self.reactor.run()
        self.assertEqual(self.ending.signalled, 1)
        self.root.stopService()
        self.assertEqual(self.proxy.stops, 1)
        self.assertEqual(self.ending.statuses, [])

    def test_signalsFirst(self) -> None:
        """
        The signal handlers go in before anything the service asks to run
        once the reactor runs.
        """
        order: list[str] = []

        class Ready(Service):
            def startService(inner) -> None:
                super().startService()
                self.reactor.callWhenRunning(order.append, "ready")

        ending = RecordingEnd(self.reactor)
        ending.exit_zero_on_signals = lambda: order.append("signals")  # type: ignore[method-assign]
        ProcessService(Ready(), self.reactor, ending=ending).startService()
        self.reactor.run()
        self.assertEqual(order, ["signals", "ready"])

    def test_defaultEnding(self) -> None:
        """
        Without an L{ProcessEnd} given, the root service makes its own for
        the reactor.
        """
        root = ProcessService(Service(), self.reactor)
        self.assertIsInstance(root.ending, ProcessEnd)
        self.assertIsNone(root.ending.status)

    def test_doneBeforeRunning(self) -> None:
        """
        A status that comes before the reactor runs stops it as soon as it
        does.
        """
        self.root.startService()
        self.proxy.finish(3)
        self.assertEqual(self.ending.statuses, [3])
        self.assertFalse(self.reactor.hasStopped)
        self.assertIn(
            (_process.stop_reactor, (self.reactor,), {}), self.reactor.whenRunningHooks
        )

    def test_doneWhileRunning(self) -> None:
        """
        A status while running stops the reactor at once, and is logged.
        """
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.root.startService()
        self.reactor.running = True
        self.reactor.hasRun = True
        self.proxy.finish(0)
        self.assertEqual(self.ending.statuses, [0])
        self.assertTrue(self.reactor.hasStopped)
        self.assertIn(
            "The local proxy is done; exiting with status 0", [formatEvent(e) for e in logged]
        )

    def test_failure(self) -> None:
        """
        An unexpected failure is logged and ends the process with status 1.
        """
        self.root.startService()
        self.reactor.running = self.reactor.hasRun = True
        self.proxy.fail(RuntimeError("boom"))
        self.assertEqual(self.ending.statuses, [1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.reactor.hasStopped)

    def test_noDone(self) -> None:
        """
        Without C{done}, the process ends only when stopped: nothing
        arranges a status.
        """
        root = ProcessService(Service(), self.reactor, ending=self.ending)
        root.startService()
        self.reactor.run()
        self.assertEqual(self.ending.signalled, 1)
        self.assertEqual(self.ending.statuses, [])


class TwistdLogTests(SynchronousTestCase):
    """
    L{TwistdLog} passes the observer twistd makes through a wrapper.
    """

    def setUp(self) -> None:
        # Making twistd's log file observer installs SIGUSR1 and SIGHUP
        # handlers when there are none; this process must get its own back.
        for signum in (signal.SIGUSR1, signal.SIGHUP):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
            signal.signal(signum, signal.SIG_DFL)
        self.log = TwistdLog("tests.test_process.SOME_LOG")
        self.wrapped: list[Any] = []

    def wrapper(self, observer: Any) -> Any:
        self.wrapped.append(observer)

        def only_errors(e: dict[str, Any]) -> None:
            if e["log_level"] >= LogLevel.error:
                observer(e)

        return only_errors

    def test_logFile(self) -> None:
        """
        With C{--logfile}, the observer writes that file, through the
        wrapper, and SIGUSR1 now has twistd's rotating handler instead of
        its default action (ending the process).
        """
        path = self.mktemp()
        options = {"logger": None, "logfile": path, "nodaemon": 1, "syslog": 0}
        self.log.wrap(options, self.wrapper)
        self.assertEqual(options["logger"], "tests.test_process.SOME_LOG.observer")
        self.assertEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_DFL)
        observer = self.log.observer()
        self.assertEqual(len(self.wrapped), 1)
        self.assertTrue(callable(signal.getsignal(signal.SIGUSR1)))
        observer(event(LogLevel.info))
        observer(event(LogLevel.error))
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertIn("[x#error] hello world", lines[0])

    def test_stdout(self) -> None:
        """
        With C{-n} and no log file, the observer writes to standard output;
        SIGUSR1 is left alone (there is no file to rotate).
        """
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        options = {"logger": None, "logfile": None, "nodaemon": 1, "syslog": 0}
        self.log.wrap(options, self.wrapper)
        observer = self.log.observer()
        observer(event(LogLevel.warn))
        observer(event(LogLevel.critical))
        self.assertEqual(len(stdout.getvalue().splitlines()), 1)
        self.assertIn("[x#critical] hello world", stdout.getvalue())
        self.assertEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_DFL)

    def test_userLogger(self) -> None:
        """
        A C{--logger} the user gave makes the observer, behind the wrapper.
        """
        options = {"logger": "tests.test_process.recordingObserver", "logfile": None}
        self.log.wrap(options, self.wrapper)
        observer = self.log.observer()
        observer(event(LogLevel.info))
        observer(event(LogLevel.error))
        self.assertEqual([e["log_level"] for e in RECORDED], [LogLevel.error])
        RECORDED.clear()

    def test_syslog(self) -> None:
        """
        With C{--syslog}, the observer sends to syslog with twistd's
        C{--prefix}, through the wrapper.
        """
        syslog = SyslogCapture(self)
        options = {"logger": None, "logfile": None, "nodaemon": 0, "syslog": 1,
                   "prefix": "lpxy"}
        self.log.wrap(options, self.wrapper)
        self.assertEqual(options["logger"], "tests.test_process.SOME_LOG.observer")
        observer = self.log.observer()
        self.assertEqual(len(self.wrapped), 1)
        self.assertEqual(syslog.prefixes, ["lpxy"])
        observer({**event(LogLevel.info), "log_time": 0})
        observer({**event(LogLevel.error), "log_time": 0})
        self.assertEqual(syslog.texts(), ["[-] hello world"])

    def test_noLoggerOption(self) -> None:
        """Options without C{logger} (not twistd's) are left alone."""
        options = {"logfile": None}
        self.log.wrap(options, self.wrapper)
        self.assertEqual(options, {"logfile": None})

    def test_processName(self) -> None:
        """
        The name L{TWISTD_LOG} gives twistd resolves to its observer.
        """
        self.assertEqual(namedAny(f"{TWISTD_LOG.name}.observer"), TWISTD_LOG.observer)


RECORDED: list[dict[str, Any]] = []


def recordingObserver() -> Any:
    return RECORDED.append


class ReopenOnSighupTests(SynchronousTestCase):
    """
    L{reopen_on_sighup}: what logrotate's C{postrotate} signal does to a
    C{--logfile}.
    """

    def setUp(self) -> None:
        self.handlers: dict[int, Any] = {}
        self.scheduled: list[Any] = []
        self.path = self.mktemp()
        self.log_file = LogFile.fromFullPath(self.path)
        self.addCleanup(self.log_file.close)

    def install(self, current: Any = signal.SIG_DFL) -> None:
        reopen_on_sighup(
            self.log_file,
            call=self.scheduled.append,
            install=self.handlers.__setitem__,
            current=lambda signum: self.handlers.get(signum, current),
        )

    def test_reopensUnderItsName(self) -> None:
        """
        After the file was moved away, SIGHUP schedules a reopening (in the
        reactor's thread); once it ran, lines go to a new file under the
        name, and the moved file keeps what was written before.
        """
        self.install()
        self.log_file.write("before\n")
        os.rename(self.path, self.path + "-20261130")
        self.handlers[signal.SIGHUP](signal.SIGHUP, None)
        self.log_file.write("still the moved file\n")
        self.assertEqual(len(self.scheduled), 1)
        self.scheduled[0]()
        self.log_file.write("after\n")
        with open(self.path + "-20261130") as moved, open(self.path) as new:
            self.assertEqual(moved.read(), "before\nstill the moved file\n")
            self.assertEqual(new.read(), "after\n")

    def test_handlerOfTheProcessKept(self) -> None:
        """A SIGHUP handler the process has already is left in place."""
        own = object()
        self.install(current=own)
        self.assertEqual(self.handlers, {})

    def test_twistdLogFile(self) -> None:
        """
        The observer L{TwistdLog} makes for C{--logfile} installs it; for
        standard output it does not (nothing to reopen).
        """
        for signum in (signal.SIGUSR1, signal.SIGHUP):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
            signal.signal(signum, signal.SIG_DFL)
        log = TwistdLog("tests.test_process.SOME_LOG")
        options = {"logger": None, "logfile": None, "nodaemon": 1, "syslog": 0}
        log.wrap(options, lambda observer: observer)
        log.observer()
        self.assertEqual(signal.getsignal(signal.SIGHUP), signal.SIG_DFL)
        options = {"logger": None, "logfile": self.mktemp(), "nodaemon": 1, "syslog": 0}
        log.wrap(options, lambda observer: observer)
        log.observer()
        self.assertTrue(callable(signal.getsignal(signal.SIGHUP)))
