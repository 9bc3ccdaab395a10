"""
Tests for L{lpxy.tunnelservice.acceptlog.FoldedAcceptErrors}: on a L{Clock}
with a list of events, and with the events Twisted's own C{tcp.Port.doRead}
logs when C{accept()} fails with EMFILE.
"""

from __future__ import annotations

import os
import socket
from errno import EAGAIN, EMFILE, ENFILE
from typing import Any

from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from lpxy.tunnelservice.acceptlog import AcceptLogService, FoldedAcceptErrors


def could_not_accept(name: str = "EMFILE") -> dict[str, Any]:
    """Twisted's event for one accept failed with errno C{name}."""
    return {"log_format": "Could not accept new connection ({acceptError})",
            "acceptError": name, "log_level": LogLevel.info,
            "log_namespace": "twisted.internet.tcp.Port"}


def other(text: str, namespace: str = "lpxy.tunnelservice.service") -> dict[str, Any]:
    return {"log_format": text, "log_level": LogLevel.info, "log_namespace": namespace}


class FoldingTests(SynchronousTestCase):
    """A burst of failed accepts: one line at once, then one per interval with the count."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.seen: list[dict[str, Any]] = []
        self.fold = FoldedAcceptErrors(self.seen.append, self.clock)

    def texts(self) -> list[str]:
        return [formatEvent(event) for event in self.seen]

    def test_burst(self) -> None:
        for _ in range(1000):
            self.fold(could_not_accept())
            self.clock.advance(0.015)  # 15 s in all
        self.assertEqual(self.texts(), [
            "Could not accept 1 connection(s) in the last 10 s: too many open files",
            "Could not accept 666 connection(s) in the last 10 s: too many open files",
        ])
        self.clock.advance(10)
        self.assertEqual(
            self.texts()[2],
            "Could not accept 333 connection(s) in the last 10 s: too many open files",
        )
        self.assertEqual([e["log_level"] for e in self.seen], [LogLevel.warn] * 3)
        self.assertEqual(sum(e["count"] for e in self.seen), 1000)
        self.clock.advance(10)
        self.assertEqual(len(self.seen), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_others_untouched(self) -> None:
        """Every other event reaches the observer as it is, in order, at once."""
        events = [other("Refused tunnel handshake"),
                  could_not_accept("ECONNABORTED"),
                  other("Could not accept new connection ({acceptError})", "some.thing"),
                  other("EMFILE encountered; releasing reserved file descriptor.", "x")]
        events[2]["acceptError"] = "EMFILE"
        self.fold(events[0])
        self.fold(could_not_accept())
        self.fold(could_not_accept())
        for event in events[1:]:
            self.fold(event)
        self.assertIs(self.seen[0], events[0])
        self.assertEqual(self.seen[2:], events[1:])
        self.assertEqual(len(self.seen), 5)
        self.assertIn("Could not accept 1 connection(s)", formatEvent(self.seen[1]))

    def test_recovery_lines(self) -> None:
        """
        Twisted's EMFILE recovery: each socket it closes counts, its
        other lines are kept from the log.
        """
        for text, fields in [
            ("EMFILE encountered; releasing reserved file descriptor.", {}),
            ("EMFILE recovery: Closed socket from {address}", {"address": ("10.0.0.1", 4)}),
            ("EMFILE recovery: Closed socket from {address}", {"address": ("10.0.0.2", 5)}),
            ("Re-reserving EMFILE recovery file descriptor.", {}),
        ]:
            self.fold({**other(text, "twisted.internet.tcp.Port"), **fields})
        self.clock.advance(10)
        self.assertEqual(self.texts(), [
            "Could not accept 1 connection(s) in the last 10 s: too many open files",
            "Could not accept 1 connection(s) in the last 10 s: too many open files",
        ])

    def test_latest_reason(self) -> None:
        self.fold(could_not_accept("EMFILE"))
        self.fold(could_not_accept("EMFILE"))
        self.fold(could_not_accept("ENFILE"))
        self.clock.advance(10)
        self.assertEqual(self.texts()[1], "Could not accept 2 connection(s) in the last 10 s: "
                         f"{os.strerror(ENFILE).lower()}")

    def test_stop(self) -> None:
        """Stopping reports what is counted and leaves nothing scheduled."""
        self.fold(could_not_accept())
        self.fold(could_not_accept())
        self.fold.stop()
        self.assertEqual([e["count"] for e in self.seen], [1, 1])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_after_stop(self) -> None:
        """Once stopped, Twisted's lines pass as they are: nothing is counted or scheduled."""
        self.fold.stop()
        event = could_not_accept()
        self.fold(event)
        self.assertEqual(self.seen, [event])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class AcceptLogServiceTests(SynchronousTestCase):
    """L{AcceptLogService}: the folds it makes are stopped with it."""

    def test_stop(self) -> None:
        clock = Clock()
        service = AcceptLogService(clock)
        seen: list[dict[str, Any]] = []
        fold = service.wrap(seen.append)
        service.startService()
        for _ in range(4):
            fold(could_not_accept())
        self.assertEqual([e["count"] for e in seen], [1])
        service.stopService()
        self.assertEqual([e["count"] for e in seen], [1, 3])
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertFalse(service.running)


class _Listener:
    """A listening socket's stand-in: C{accept} answers from a list."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers

    def accept(self) -> Any:
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


class TwistedEventTests(SynchronousTestCase):
    """
    What C{tcp.Port.doRead} logs when C{accept()} fails with EMFILE,
    through the fold: one line.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.seen: list[dict[str, Any]] = []
        self.fold = FoldedAcceptErrors(self.seen.append, self.clock)
        globalLogPublisher.addObserver(self.fold)
        self.addCleanup(globalLogPublisher.removeObserver, self.fold)
        self.port = tcp.Port(0, Factory.forProtocol(Protocol), reactor=MemoryReactor())
        self.port.numberAccepts = 100  # as startListening sets it

    def read(self, *answers: Any) -> list[dict[str, Any]]:
        """C{doRead} with C{accept} giving C{answers}; the fold's output of Twisted's events."""
        self.port.socket = _Listener(list(answers))  # type: ignore[assignment]
        self.port.doRead()
        return [e for e in self.seen if e["log_namespace"].startswith(
            ("twisted.internet", "lpxy.tunnelservice.acceptlog"))]

    def test_no_reserve(self) -> None:
        """Without Twisted's reserved descriptor: its 'Could not accept' line, folded."""
        self.patch(tcp, "_reservedFD", tcp._NullFileDescriptorReservation())
        [event] = self.read(OSError(EMFILE, "Too many open files"))
        self.assertEqual(formatEvent(event),
                         "Could not accept 1 connection(s) in the last 10 s: too many open files")
        self.read(OSError(EMFILE, "Too many open files"))
        self.read(OSError(EMFILE, "Too many open files"))
        self.assertEqual(len(self.seen), 1)
        self.clock.advance(10)
        self.assertEqual([e["count"] for e in self.seen], [1, 2])

    def test_recovery(self) -> None:
        """
        With Twisted's reserved descriptor: it frees it, accepts and closes
        the waiting connection, reserves it again; the fold shows one line.
        """
        reserve = tcp._FileDescriptorReservation(lambda: open(os.devnull))
        reserve.reserve()
        self.addCleanup(lambda: reserve._fileDescriptor and reserve._fileDescriptor.close())
        self.patch(tcp, "_reservedFD", reserve)
        client, peer = socket.socketpair()
        self.addCleanup(peer.close)
        [event] = self.read(OSError(EMFILE, "Too many open files"),
                            (client, ("192.0.2.1", 4321)), OSError(EAGAIN, "again"))
        self.assertEqual(formatEvent(event),
                         "Could not accept 1 connection(s) in the last 10 s: too many open files")
        self.assertEqual(client.fileno(), -1)  # Twisted closed it
        self.assertTrue(reserve.available())
