"""
Tests for L{tests.support.logged}: the one way the cluster and the
benchmarks start a child with its output in a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.support.logged import LoggedChild, spawn_logged


class _SpawningReactor:
    """Records C{spawnProcess}; the "child" writes C{output} to its standard output."""

    def __init__(self, output: bytes) -> None:
        self.output = output
        self.calls: list[dict[str, Any]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], *,
                     env: dict[str, str] | None, path: str,
                     childFDs: dict[int, Any]) -> None:
        self.calls.append({"executable": executable, "args": args, "env": env,
                           "path": path, "childFDs": childFDs})
        os.write(childFDs[1], self.output)


class SpawnLoggedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = Path(self.mktemp())
        self.log.write_bytes(b"before\n")

    def test_append(self) -> None:
        """With C{append}, the child's output follows what the log held."""
        reactor = _SpawningReactor(b"after\n")
        child = spawn_logged(LoggedChild("n", self.log), ["prog", "-x"], append=True,
                             env=None, cwd="/", reactor=reactor)
        self.assertEqual(child.output(), "before\nafter\n")

    def test_truncate(self) -> None:
        """Without C{append}, the log holds the child's output alone."""
        reactor = _SpawningReactor(b"after\n")
        child = spawn_logged(LoggedChild("n", self.log), ["prog"], append=False,
                             env=None, cwd="/", reactor=reactor)
        self.assertEqual(child.output(), "after\n")

    def test_options_passed(self) -> None:
        """
        The environment and working directory go to the reactor as given;
        standard output and error share the log's descriptor, standard
        input is a pipe.
        """
        reactor = _SpawningReactor(b"")
        spawn_logged(LoggedChild("n", self.log), ["prog", "-x"], append=False,
                     env={"A": "1"}, cwd=Path("/tmp"), reactor=reactor)
        [call] = reactor.calls
        self.assertEqual(call["executable"], "prog")
        self.assertEqual(call["args"], ["prog", "-x"])
        self.assertEqual(call["env"], {"A": "1"})
        self.assertEqual(call["path"], "/tmp")
        fds = call["childFDs"]
        self.assertEqual(fds[0], "w")
        self.assertEqual(fds[1], fds[2])
        self.assertIsInstance(fds[1], int)

    def test_status(self) -> None:
        """C{ended} fires with the exit code, or minus the signal that ended it."""
        done, killed = LoggedChild("a", self.log), LoggedChild("b", self.log)
        done.processEnded(Failure(ProcessDone(0)))
        killed.processEnded(Failure(ProcessTerminated(None, 9)))
        self.assertEqual(self.successResultOf(done.ended), 0)
        self.assertEqual(self.successResultOf(killed.ended), -9)
