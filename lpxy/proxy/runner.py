# -*- test-case-name: tests.test_runner -*-
"""
The local proxy as a process: how loud it logs (C{-v}) and how it ends
(its exit status), under C{twistd localproxy} and the C{localproxy}
console script alike.

Exit statuses (protocol.md section 6): 0 when the tunnel was closed, on
SIGTERM or SIGINT; what L{LocalProxyService.whenDone} says otherwise.
C{twistd} knows no exit status of its own: after a signal it kills itself
with that signal again, and it always returns 0 otherwise. L{EndProcess}
therefore installs SIGTERM/SIGINT handlers that stop the reactor without
that, and L{exit_at_interpreter_end} ends the process with a non-zero status
once twistd has finished its own cleanup.

C{-v} applies to every log event of the process, Twisted's and Autobahn's
included, through one L{VerbosityFilter}. Under twistd that filter wraps
the observer twistd would have made: L{filter_twistd_logging} names
L{twistd_observer} as twistd's C{--logger}.
"""

from __future__ import annotations

import atexit
import inspect
import os
import signal
import sys
from collections.abc import Callable, Mapping, MutableMapping
from types import FrameType
from typing import IO, Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    LogBeginner,
    Logger,
    LogLevel,
    PredicateResult,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.python.reflect import namedAny
from zope.interface import implementer  # type: ignore[import-untyped]

_log = Logger()

DEFAULT_VERBOSITY = 4
TRACE = 6

_LEVELS = {
    1: LogLevel.critical,
    2: LogLevel.error,
    3: LogLevel.warn,
    4: LogLevel.info,
    5: LogLevel.debug,
}


def level_for(verbosity: int) -> LogLevel | None:
    """
    The lowest level C{-v verbosity} shows: 0 nothing (L{None}), 1
    critical, 2 error, 3 warn, 4 info, 5 and more debug (6 and more also
    trace, which is debug with per-record detail).
    """
    if verbosity <= 0:
        return None
    return _LEVELS.get(verbosity, LogLevel.debug)


@implementer(ILogFilterPredicate)
class VerbosityFilter:
    """
    Lets through the log events C{-v} asks for. Events without a level
    count as info.

    @ivar verbosity: C{-v} as given, 0..255.
    """

    def __init__(self, verbosity: int = DEFAULT_VERBOSITY) -> None:
        self.verbosity = verbosity

    def __call__(self, event: Mapping[str, Any]) -> PredicateResult:
        wanted = level_for(self.verbosity)
        if wanted is None:
            return PredicateResult.no
        level = event.get("log_level", LogLevel.info)
        return PredicateResult.maybe if level >= wanted else PredicateResult.no


# The process's verbosity: set once the options are parsed, read by every
# observer made below.
PROCESS_FILTER = VerbosityFilter()


def filtered(observer: Any, predicate: VerbosityFilter = PROCESS_FILTER) -> Any:
    """C{observer}, an L{ILogObserver}, seeing only what C{predicate} lets through."""
    predicates: list[Any] = [predicate]
    return FilteringLogObserver(observer, predicates)


def start_console_logging(
    verbosity: int,
    stream: IO[str] | None = None,
    beginner: LogBeginner = globalLogBeginner,
) -> None:
    """
    Log to C{stream} (standard error) as readable text, at C{verbosity}:
    what the console script does.
    """
    PROCESS_FILTER.verbosity = verbosity
    observer = textFileLogObserver(sys.stderr if stream is None else stream)
    beginner.beginLoggingTo([filtered(observer)], redirectStandardIO=False)


# What twistd's own options said about logging, for twistd_observer.
_twistd: dict[str, Any] = {}


def filter_twistd_logging(server_options: MutableMapping[str, Any], verbosity: int) -> None:
    """
    Make twistd's log observer honour C{verbosity}: set twistd's
    C{--logger} to L{twistd_observer}, which builds the observer twistd
    would have built (from C{--logger}, C{--logfile} and C{-n}) behind the
    process's L{VerbosityFilter}. Call it from the subcommand's
    C{postOptions}, before twistd resolves C{--logger}. With C{--syslog}
    twistd's observer is left alone.
    """
    PROCESS_FILTER.verbosity = verbosity
    if server_options.get("syslog") or "logger" not in server_options:
        return
    _twistd.update(
        logger=server_options.get("logger"),
        logfile=server_options.get("logfile"),
        nodaemon=bool(server_options.get("nodaemon")),
    )
    server_options["logger"] = f"{__name__}.twistd_observer"


def twistd_observer() -> Any:
    """
    The observer twistd would make, behind L{PROCESS_FILTER}; a C{--logger}
    factory (see L{filter_twistd_logging}).
    """
    factory = _twistd.get("logger")
    if factory:
        return filtered(namedAny(factory)())
    logfile = _twistd.get("logfile")
    if logfile == "-" or (_twistd.get("nodaemon") and not logfile):
        return filtered(textFileLogObserver(sys.stdout))
    return filtered(textFileLogObserver(LogFile.fromFullPath(logfile or "twistd.log")))


# --- ending the process ------------------------------------------------------


def stop_reactor(reactor: Any) -> None:
    """Stop C{reactor} unless it is stopping already."""
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def exit_zero_on_signals(
    reactor: Any,
    install: Callable[[int, Callable[[int, FrameType | None], None]], object] = signal.signal,
    current: Callable[[int], object] = signal.getsignal,
) -> None:
    """
    Replace the reactor's SIGTERM and SIGINT handlers (call this once it
    runs) with ones that stop it the same way but leave no signal for
    twistd to re-raise, so the process exits 0.

    Only handlers the reactor installed (bound methods) are replaced: an
    ignored SIGINT (a background job), Python's default one and twistd
    C{--debug}'s debugger hook stay as they are.
    """

    def handler(number: int, frame: FrameType | None) -> None:
        _log.info("Received {signal}, shutting down.", signal=signal.Signals(number).name)
        reactor.callFromThread(stop_reactor, reactor)

    for number in (signal.SIGTERM, signal.SIGINT):
        if inspect.ismethod(current(number)):
            install(number, handler)


_exitStatus: list[int] = []


def exit_at_interpreter_end(
    status: int, register: Callable[..., object] = atexit.register
) -> None:
    """
    Make the process exit with C{status} once the interpreter finishes
    (after twistd's own cleanup: pid file, last log lines). Nothing is
    needed for 0.
    """
    if status == 0 or _exitStatus:
        return
    _exitStatus.append(status)
    register(_exitNow, status)


def _exitNow(status: int) -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


class EndProcess(MultiService):
    """
    The root service under twistd: runs the proxy service and ends the
    process when the proxy says it is done, with its exit status.

    @param proxy: the proxy service (an L{IService} with C{whenDone}).
    @param reactor: the reactor to stop.
    @param exit_with: called with the exit status before the reactor stops.
    @param signals: called with the reactor once it runs, to take over
        SIGTERM and SIGINT (see L{exit_zero_on_signals}).
    """

    def __init__(
        self,
        proxy: Any,
        reactor: Any,
        exit_with: Callable[[int], None] = exit_at_interpreter_end,
        signals: Callable[[Any], None] | None = exit_zero_on_signals,
    ) -> None:
        super().__init__()
        self._proxy = proxy
        self._reactor = reactor
        self._exitWith = exit_with
        self._signals = signals
        proxy.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        if self._signals is not None:
            self._reactor.callWhenRunning(self._signals, self._reactor)
        done: Deferred[int] = self._proxy.whenDone()
        done.addCallbacks(self._done, self._failed)

    def _done(self, status: int) -> None:
        _log.info("The local proxy is done; exiting with status {status}", status=status)
        self._exitWith(status)
        self._reactor.callWhenRunning(stop_reactor, self._reactor)

    def _failed(self, reason: Failure) -> None:
        _log.failure("The local proxy failed", reason)
        self._done(1)
