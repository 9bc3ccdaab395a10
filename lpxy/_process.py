# -*- test-case-name: tests.test_process -*-
"""
A twistd process's end and its log, the same for C{twistd localproxy} and
C{twistd tunnelservice}.

C{twistd} knows no exit status of its own: after SIGTERM or SIGINT it kills
itself with that signal again, and otherwise it always returns 0.
L{ProcessEnd} therefore replaces the reactor's SIGTERM/SIGINT handlers with
ones that stop it without that (exit status 0), and ends the process with a
non-zero status only once twistd has finished its own cleanup (pid file,
last log lines). L{ProcessService}, the root service, puts both to work.

An application that wants to see log events before twistd's observer does
(the proxy's C{-v}) wraps that observer with L{TwistdLog} rather than
replacing it, so C{--logfile}, C{-n} and SIGUSR1's log rotation stay
twistd's.
"""

from __future__ import annotations

import atexit
import inspect
import os
import signal
import sys
from collections.abc import Callable, MutableMapping
from types import FrameType
from typing import Any, cast

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.logger import (
    FileLogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    Logger,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.failure import Failure
from twisted.python.logfile import BaseLogFile
from twisted.python.reflect import namedAny

__all__ = [
    "SUBSECOND_TIME_FORMAT",
    "TWISTD_LOG",
    "Observer",
    "ProcessEnd",
    "ProcessService",
    "TwistdLog",
]

_log = Logger()

SignalHandler = Callable[[int, FrameType | None], None]
#: A log observer (an L{ILogObserver}).
Observer = Callable[[LogEvent], None]
#: twistd's time format (RFC 3339) with microseconds.
SUBSECOND_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f%z"


def subsecond_classic_text(event: LogEvent) -> str | None:
    """twistd's classic log line, its timestamp to the microsecond."""
    return formatEventAsClassicLogText(
        event, formatTime=lambda when: formatTime(when, SUBSECOND_TIME_FORMAT)
    )


def stop_reactor(reactor: Any) -> None:
    """Stop C{reactor} unless it is stopping already."""
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def _flush_and_exit(status: int) -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


class ProcessEnd:
    """
    How one process ends: SIGTERM and SIGINT stop the reactor and leave
    exit status 0; a non-zero status becomes the exit status once the
    interpreter has finished (after twistd's cleanup).

    @param reactor: the reactor the signals stop.
    @param install: installs a signal handler (L{signal.signal}).
    @param current: the handler installed for a signal (L{signal.getsignal}).
    @param at_exit: registers a call for the interpreter's end
        (L{atexit.register}).
    @ivar status: the non-zero exit status arranged, if any.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        install: Callable[[int, SignalHandler], object] = signal.signal,
        current: Callable[[int], object] = signal.getsignal,
        at_exit: Callable[..., object] = atexit.register,
    ) -> None:
        self._reactor = reactor
        self._install = install
        self._current = current
        self._at_exit = at_exit
        self.status: int | None = None

    def exit_zero_on_signals(self) -> None:
        """
        Replace the reactor's SIGTERM and SIGINT handlers (call this once
        it runs) with ones that stop it the same way but leave no signal
        for twistd to re-raise, so the process exits 0.

        Only handlers the reactor installed (bound methods) are replaced:
        an ignored SIGINT (a background job, nohup), Python's default one
        and twistd C{--debug}'s debugger hook stay as they are.
        """

        def handler(number: int, frame: FrameType | None) -> None:
            _log.info("Received {signal}, shutting down.", signal=signal.Signals(number).name)
            self._reactor.callFromThread(stop_reactor, self._reactor)

        for number in (signal.SIGTERM, signal.SIGINT):
            if inspect.ismethod(self._current(number)):
                self._install(number, handler)

    def exit_with(self, status: int) -> None:
        """
        Make the process exit with C{status} once the interpreter finishes.
        Nothing is needed for 0; after one non-zero status, later ones
        change nothing.
        """
        if status == 0 or self.status is not None:
            return
        self.status = status
        self._at_exit(_flush_and_exit, status)


class ProcessService(MultiService):
    """
    The root service under twistd: runs the application's service, takes
    over SIGTERM and SIGINT once the reactor runs (before anything the
    application's service asked to run then), and, given C{done}, ends the
    process with the status C{done} fires with.

    @param service: the application's service.
    @param reactor: the reactor to stop.
    @param done: called once the service has started; returns a Deferred
        firing with the exit status when the service has ended on its own
        (L{None}: the service ends only when stopped).
    @param name: what the log lines call the application.
    @param ending: the L{ProcessEnd} to use (one for C{reactor} by default).
    """

    def __init__(
        self,
        service: Any,
        reactor: Any,
        done: Callable[[], Deferred[int]] | None = None,
        name: str = "The application",
        ending: ProcessEnd | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._done = done
        self._name = name
        self.ending = ProcessEnd(reactor) if ending is None else ending
        service.setServiceParent(self)

    def startService(self) -> None:
        self._reactor.callWhenRunning(self.ending.exit_zero_on_signals)
        super().startService()
        if self._done is not None:
            self._done().addCallbacks(self._ended, self._failed)

    def _ended(self, status: int) -> None:
        _log.info("{name} is done; exiting with status {status}", name=self._name, status=status)
        self.ending.exit_with(status)
        self._reactor.callWhenRunning(stop_reactor, self._reactor)

    def _failed(self, reason: Failure) -> None:
        _log.failure("{name} failed", reason, name=self._name)
        self._ended(1)


def reopen_on_sighup(
    log_file: BaseLogFile,
    *,
    call: Callable[[Callable[[], object]], object] | None = None,
    install: Callable[[int, SignalHandler], object] = signal.signal,
    current: Callable[[int], object] = signal.getsignal,
) -> None:
    """
    Make SIGHUP reopen C{--logfile} under its name, the convention of
    logrotate and newsyslog (they move the file, then signal the process),
    unless the process has a SIGHUP handler of its own. SIGUSR1 still
    rotates it as twistd does. The reopening happens in the reactor's
    thread (C{call}, by default its C{callFromThread}), not in the middle
    of a write.
    """
    if not hasattr(signal, "SIGHUP") or current(signal.SIGHUP) not in (signal.SIG_DFL, None):
        return
    if call is None:
        from twisted.internet import reactor

        call = reactor.callFromThread
    schedule = call

    def reopen(signum: int, frame: FrameType | None) -> None:
        schedule(log_file.reopen)

    install(signal.SIGHUP, reopen)


class TwistdLog:
    """
    The log observer twistd makes from its own options (C{--logfile},
    C{-n}, or a C{--logger} the user gave), passed through a wrapper of
    the application's.

    twistd makes the observer itself, so C{--logfile} stays a file that
    SIGUSR1 rotates, as under any twistd application (and that SIGHUP
    reopens, L{reopen_on_sighup}): replacing the
    observer outright (through C{--logger}) would lose that handler, and
    SIGUSR1's default action ends the process. twistd takes a wrapper only
    as the dotted name of an observer factory, its C{--logger}; L{wrap}
    sets that name to this object's L{observer}, which must be reachable
    as C{name}. Every route twistd offers is kept: C{--logfile}, standard
    output, C{--syslog} (with its C{--prefix}) and a C{--logger} of the
    user's. The file observer twistd makes writes its timestamps to the
    microsecond (L{SUBSECOND_TIME_FORMAT}); one from the user's C{--logger}
    is used as it is.

    @ivar name: the dotted name of this object (see L{TWISTD_LOG}).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._options: dict[str, Any] = {}
        self._wrapper: Callable[[Observer], Observer] | None = None

    def wrap(
        self,
        server_options: MutableMapping[str, Any],
        wrapper: Callable[[Observer], Observer],
    ) -> None:
        """
        Make twistd log through C{wrapper(its own observer)}. Call it from
        the subcommand's C{postOptions}, before twistd resolves its
        C{--logger}.
        """
        if "logger" not in server_options:
            return
        self._options = {
            "logger": server_options.get("logger"),
            "logfile": server_options.get("logfile"),
            "nodaemon": bool(server_options.get("nodaemon")),
            "syslog": bool(server_options.get("syslog")),
            "prefix": server_options.get("prefix", "twisted"),
        }
        self._wrapper = wrapper
        server_options["logger"] = f"{self.name}.observer"

    def observer(self) -> Observer:
        """
        twistd's observer behind the wrapper; twistd's C{--logger} factory
        after L{wrap}.
        """
        factory = self._options.get("logger")
        if factory:
            made: Observer = namedAny(factory)()
        else:
            # The observer twistd makes when no --logger is given, by twistd's
            # own (private) method: making it installs the SIGUSR1 handler
            # that rotates the log file.
            from twisted.scripts._twistd_unix import UnixAppLogger

            made = UnixAppLogger(
                {key: self._options.get(key) for key in ("logfile", "nodaemon", "syslog", "prefix")}
            )._getLogObserver()
            if isinstance(made, FileLogObserver):
                made.formatEvent = subsecond_classic_text
                log_file = getattr(made, "_outFile", None)
                if isinstance(log_file, BaseLogFile):
                    reopen_on_sighup(log_file)
            elif self._options.get("syslog"):
                # --syslog's observer takes legacy events: twistd wraps it so too.
                made = LegacyLogObserverWrapper(cast(Any, made))
        return made if self._wrapper is None else self._wrapper(made)


#: The L{TwistdLog} twistd's C{--logger} names.
TWISTD_LOG = TwistdLog(f"{__name__}.TWISTD_LOG")
