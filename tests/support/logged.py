"""
Child processes whose output goes to a file, for the cluster's nodes and
HAProxy (L{tests.support.cluster}) and the benchmarks' processes
(C{bench/common.py}): reading a log file costs the parent nothing, where a
pipe would be read by its reactor.

It lives in C{tests/support/} because C{bench/} already draws on this
package (the installed copy, free ports, waiting for a listener) and tests
never import C{bench/}; it imports nothing test-only (no trial), so a
benchmark pays for no more than it uses.
"""

from __future__ import annotations

import os
import signal as signals
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

__all__ = ["LoggedChild", "spawn_logged"]


class LoggedChild(ProcessProtocol):
    """
    A child process with its standard output and error in the file C{log};
    C{ended} fires with its exit status (minus the signal number when a
    signal ended it).
    """

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.pid = 0
        """Its process id, kept after it ends."""
        self.ended: defer.Deferred[int] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid  # type: ignore[attr-defined]

    def processEnded(self, reason: Failure) -> None:
        value: Any = reason.value
        self.ended.callback(value.exitCode if value.exitCode is not None else -value.signal)

    def signal(self, name: str) -> None:
        """Send signal C{name} (C{"TERM"}, C{"USR2"}...), unless it has ended."""
        number = getattr(signals, f"SIG{name}")
        try:
            self.transport.signalProcess(number)  # type: ignore[union-attr]
        except ProcessExitedAlready:
            pass

    def output(self) -> str:
        """What it has written so far (with whatever the file held before, when appended)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


Child = TypeVar("Child", bound=LoggedChild)


def spawn_logged(
    child: Child,
    argv: list[str],
    *,
    append: bool,
    env: dict[str, str] | None,
    cwd: str | Path,
    reactor: Any = None,
) -> Child:
    """
    Start C{argv} for C{child}, its standard output and error in
    C{child.log}: appended to what the file holds when C{append}, else the
    file is emptied first. C{env}
    is the child's whole environment (L{None}: this process's); C{cwd} its
    working directory. Its standard input is a pipe nothing writes to.
    """
    if reactor is None:
        from twisted.internet import reactor
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(child.log, flags, 0o644)
    try:
        reactor.spawnProcess(
            child, argv[0], argv, env=env, path=str(cwd),
            childFDs={0: "w", 1: fd, 2: fd},
        )
    finally:
        os.close(fd)
    return child
