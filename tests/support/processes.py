"""
Child processes for process tests: spawned in the test's reactor from the
installed copy (L{tests.support.installed}), with Deferreds for "this text
appeared in its output" and "it ended, with this status".
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.support.installed import ROOT, installed_env, outside_dir


class ChildProcess(ProcessProtocol):
    """
    Collects a child's standard output and error; L{wait_for} fires when a
    text appears in either, L{ended} with the exit status (minus the signal
    number when a signal killed it), also kept as L{status}.
    """

    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.ended: Deferred[int] = Deferred()
        self.status: int | None = None
        self._waiting: list[tuple[bytes, int, Deferred[None]]] = []

    @property
    def output(self) -> str:
        """Everything the child wrote, standard output then error."""
        return (bytes(self.stdout) + bytes(self.stderr)).decode("utf-8", "replace")

    def wait_for(self, text: str, times: int = 1) -> Deferred[None]:
        """
        Fire when C{text} has appeared (C{times} times); fail if the child
        ends first.
        """
        d: Deferred[None] = Deferred()
        self._waiting.append((text.encode(), times, d))
        self._check()
        if self.status is not None and not d.called:
            self._waiting.clear()
            d.errback(AssertionError(
                f"ended with {self.status} before {text!r} appeared:\n{self.output}"
            ))
        return d

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        (self.stdout if childFD == 1 else self.stderr).extend(data)
        self._check()

    def _check(self) -> None:
        seen = bytes(self.stdout) + b"\n" + bytes(self.stderr)
        for item in list(self._waiting):
            if seen.count(item[0]) >= item[1]:
                self._waiting.remove(item)
                item[2].callback(None)

    def processEnded(self, reason: Failure) -> None:
        value: Any = reason.value
        status = value.exitCode if value.exitCode is not None else -value.signal
        self.status = status
        waiting, self._waiting = self._waiting, []
        for text, _, d in waiting:
            d.errback(AssertionError(
                f"ended with {status} before {text!r} appeared:\n{self.output}"
            ))
        self.ended.callback(status)

    def signal(self, name: str) -> None:
        """Send the child a signal (C{"TERM"}, C{"INT"}, C{"KILL"})."""
        assert self.transport is not None
        self.transport.signalProcess(name)


def spawn(
    case: TestCase,
    argv: list[str],
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    reactor: Any = None,
) -> ChildProcess:
    """
    Start C{argv} (whose first item is the interpreter) from the installed
    copy, in a directory outside the source tree. A cleanup kills it if the
    test left it running.
    """
    if reactor is None:
        from twisted.internet import reactor
    child = ChildProcess()
    reactor.spawnProcess(
        child, argv[0], argv, env=installed_env(env), path=cwd or outside_dir()
    )

    kill_at_cleanup(case, child)
    return child


def kill_at_cleanup(case: TestCase, child: ChildProcess) -> None:
    """Kill C{child} when C{case} ends, if it is still running, and wait for it."""

    def cleanup() -> Deferred[int] | None:
        if child.ended.called:
            return None
        try:
            child.signal("KILL")
        except ProcessExitedAlready:
            pass
        return child.ended

    case.addCleanup(cleanup)


def run_bench(module: str, *args: str) -> Deferred[tuple[bytes, bytes, int]]:
    """
    Run C{python -m bench.MODULE ARGS} from the source tree (a benchmark
    installs its own copy of lpxy), without an access token in its
    environment; fire with its output, error output and exit status.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("AWSIOT_TUNNEL_ACCESS_TOKEN", None)
    return getProcessOutputAndValue(
        sys.executable, ["-m", f"bench.{module}", *args], env=env, path=str(ROOT),
        reactor=reactor,
    )
