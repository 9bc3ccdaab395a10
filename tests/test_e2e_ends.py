"""
End to end, a connection's end is never lost (issue 8, part 1): a client
writes into a source while the destination's application is not reading,
shuts down its writing side (C{SHUT_WR}) and waits; the application gets
every byte and then end-of-file. Real loopback sockets in the test's
reactor, through the tunnel service and both proxies.

The end used to be lost when it reached the destination while the
application's socket had more than a buffer's worth waiting: the relay
asked its transport to close while still registered as its producer, and
Twisted's C{loseConnection} waits for that producer to go.
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer  # type: ignore[import-untyped]

from tests.support.proxies import start_pair, tcp
from tests.support.tunnelservice import start_tunnelservice

REPETITIONS = 32
FIRST_PAYLOAD = 128 * 1024
PAYLOAD_STEP = 8 * 1024
END_WAIT = 10.0
"""Seconds after which an end not seen counts as lost (it takes milliseconds)."""


class StalledApp(Protocol):
    """
    The destination's application: reads nothing until L{resume}, then
    everything. C{ended} fires when its connection ends, C{reason} says how.
    """

    factory: StalledAppFactory

    def __init__(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()
        self.reason: Failure | None = None
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        waiting, self.factory.waiting = self.factory.waiting, []
        for d in waiting:
            d.callback(self)

    def resume(self) -> None:
        """Start reading."""
        assert self.transport is not None
        self.transport.resumeProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.ended.callback(None)


class StalledAppFactory(Factory):
    """Builds L{StalledApp}s; L{next_connection} fires with the next one."""

    protocol = StalledApp

    def __init__(self) -> None:
        self.waiting: list[Deferred[StalledApp]] = []

    def next_connection(self) -> Deferred[StalledApp]:
        d: Deferred[StalledApp] = Deferred()
        self.waiting.append(d)
        return d


@implementer(IHalfCloseableProtocol)
class HalfClosingClient(Protocol):
    """
    Writes C{payload}, then shuts down its writing side (C{SHUT_WR}) and
    waits; C{closed} fires once the source proxy has closed the connection,
    that is once the source has read the whole stream and its end.
    """

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()  # type: ignore[attr-defined]

    def writeConnectionLost(self) -> None:
        pass

    def readConnectionLost(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


def fired_within(d: Deferred[None], seconds: float) -> Deferred[bool]:
    """Fires with whether C{d} fired within C{seconds}; leaves C{d} alone."""
    result: Deferred[bool] = Deferred()
    timer = reactor.callLater(seconds, result.callback, False)  # type: ignore[attr-defined]

    def fired(value: object) -> object:
        if timer.active():
            timer.cancel()
            result.callback(True)
        return value

    d.addBoth(fired)
    return result


class StalledApplicationCloseTests(TestCase):
    """The end of a connection reaches an application that was stalled."""

    timeout = 120

    async def test_every_end_seen(self) -> None:
        """
        C{REPETITIONS} connections in a row through one tunnel. In each, the
        application is stalled (its transport paused) while the client
        writes its payload and shuts down its writing side; once the source
        has read all of it and closed the client's connection, the
        application reads. Every application gets every byte intact, then
        end-of-file.

        The payloads grow by C{PAYLOAD_STEP} from C{FIRST_PAYLOAD}, from
        about the destination relay's write-buffer mark (two payloads of
        64512) to about three times it, so that the end reaches the
        destination with that buffer both under and over its mark.
        """
        fixture = await start_tunnelservice(self)
        apps = StalledAppFactory()
        listening = reactor.listenTCP(0, apps, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        pair = await start_pair(self, fixture, ["SSH"], {"SSH": tcp(listening.getHost().port)})
        for repetition in range(REPETITIONS):
            size = FIRST_PAYLOAD + repetition * PAYLOAD_STEP
            payload = os.urandom(size)
            accepted = apps.next_connection()
            client = HalfClosingClient(payload)
            await connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", pair.ports["SSH"]), client
            )
            app = await accepted
            await client.closed
            app.resume()
            if not await fired_within(app.ended, END_WAIT):
                received = app.received
                assert app.transport is not None
                app.transport.abortConnection()  # type: ignore[attr-defined]
                await app.ended
                self.fail(
                    f"repetition {repetition} ({size} bytes): the application got "
                    f"{received} bytes but never end-of-file"
                )
            assert app.reason is not None
            app.reason.trap(ConnectionDone)
            self.assertEqual(app.received, size, f"repetition {repetition}")
            self.assertEqual(
                app.digest.digest(), hashlib.sha256(payload).digest(), f"repetition {repetition}"
            )
