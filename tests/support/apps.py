"""
The applications at either end of a tunnel, on real loopback sockets: an
echo or sink server (L{AppFactory}, the one server tests use, plain or
under TLS) and a client (L{Client}, the one client), with helpers that
start them for a test and a writer that pushes bulk data.

Every helper that listens or connects registers a cleanup that waits until
its connections are closed, so tests leave a clean reactor.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IAddress, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer  # type: ignore[import-untyped]

__all__ = [
    "AppFactory",
    "AppProtocol",
    "Client",
    "ClientFactory",
    "Pusher",
    "connect_client",
    "echo_round_trip",
    "start_app",
]


class AppProtocol(Protocol):
    """
    An application's side of one connection: echoes what it reads (the
    factory's C{echo}) or only counts it (a sink). Under TLS it records the
    server name the client asked for (SNI) as C{server_name}.
    """

    factory: AppFactory

    def connectionMade(self) -> None:
        self.received = 0
        self.server_name: bytes | None = None
        self.closed: Deferred[None] = Deferred()
        self.factory.connected(self)

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        # The handshake is done once application data arrives.
        handle = getattr(self.transport, "getHandle", lambda: None)()
        get_servername = getattr(handle, "get_servername", None)
        if get_servername is not None:
            self.server_name = get_servername()
        self.received += len(data)
        if self.factory.echo:
            self.transport.write(data)
        self.factory.on_data(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.gone(self)
        self.closed.callback(None)


class AppFactory(Factory):
    """
    Builds L{AppProtocol}s: C{accepted} lists every connection in order,
    C{live} those still open, so a cleanup can wait for them to close.
    """

    protocol = AppProtocol

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.live: set[AppProtocol] = set()
        self.accepted: list[AppProtocol] = []
        self._waiting: list[Deferred[None]] = []
        self._accept_waiting: list[Deferred[AppProtocol]] = []

    def connected(self, protocol: AppProtocol) -> None:
        self.live.add(protocol)
        self.accepted.append(protocol)
        waiting, self._accept_waiting = self._accept_waiting, []
        for d in waiting:
            d.callback(protocol)

    def next_connection(self) -> Deferred[AppProtocol]:
        """Fires with the next connection accepted."""
        d: Deferred[AppProtocol] = Deferred()
        self._accept_waiting.append(d)
        return d

    def on_data(self, protocol: AppProtocol, data: bytes) -> None:
        """Hook for tests."""

    def gone(self, protocol: AppProtocol) -> None:
        self.live.discard(protocol)
        if not self.live:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def all_closed(self) -> Deferred[None]:
        """Fires once no connection is left."""
        d: Deferred[None] = Deferred()
        if self.live:
            self._waiting.append(d)
        else:
            d.callback(None)
        return d


async def start_app(case: TestCase, echo: bool = True,
                    factory: AppFactory | None = None) -> tuple[int, AppFactory]:
    """Start an application on loopback; fire with its port and factory."""
    factory = factory or AppFactory(echo)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]

    async def stop() -> None:
        await port.stopListening()
        await factory.all_closed()

    case.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    return port.getHost().port, factory


class Client(Protocol):
    """
    A client of an application (or of a source proxy in front of one):
    collects what it reads in C{data}; L{received} waits for a number of
    bytes. Given a C{message}, it sends it as soon as it is connected
    (under TLS it leaves with the first application data), fires C{answer}
    with what came back once that is as long as the message, and closes;
    C{answer} fails with the connection's failure if it ends first.
    """

    def __init__(self, message: bytes = b"") -> None:
        self.message = message
        self.data = bytearray()
        self.answer: Deferred[bytes] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self._want: list[tuple[int, Deferred[bytes]]] = []

    def connectionMade(self) -> None:
        if self.message:
            assert self.transport is not None
            self.transport.write(self.message)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()
        if self.message and not self.answer.called and len(self.data) >= len(self.message):
            self.answer.callback(bytes(self.data))
            assert self.transport is not None
            self.transport.loseConnection()

    def _check(self) -> None:
        # Taken first: a waiter called back may ask for more at once.
        want, self._want = self._want, []
        still = []
        for size, d in want:
            if len(self.data) >= size:
                d.callback(bytes(self.data[:size]))
            else:
                still.append((size, d))
        self._want = still + self._want

    def received(self, size: int) -> Deferred[bytes]:
        """Fires with the first C{size} bytes once they arrived."""
        d: Deferred[bytes] = Deferred()
        self._want.append((size, d))
        self._check()
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for _, d in self._want:
            d.errback(Failure(AssertionError(f"closed after {len(self.data)} bytes")))
        self._want = []
        if self.message and not self.answer.called:
            self.answer.errback(reason)
        self.closed.callback(None)


class ClientFactory(Factory):
    """
    Builds a L{Client} sending C{message} per connection, for endpoints'
    C{connect}; keeps them in C{clients}.
    """

    def __init__(self, message: bytes = b"ping") -> None:
        self.message = message
        self.clients: list[Client] = []

    def buildProtocol(self, addr: IAddress | None) -> Client:
        client = Client(self.message)
        client.factory = self
        self.clients.append(client)
        return client


async def connect_client(case: TestCase, port: int) -> Client:
    """Connect a L{Client} to 127.0.0.1:C{port}."""
    client = Client()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)

    async def close() -> None:
        if client.transport is not None and not client.closed.called:
            client.transport.loseConnection()
        await client.closed

    case.addCleanup(lambda: Deferred.fromCoroutine(close()))
    return client


async def echo_round_trip(case: TestCase, port: int, size: int = 100_000) -> bytes:
    """
    Connect a client to 127.0.0.1:C{port} (a source's listener in front of
    an echo application), send C{size} random bytes, check they come back
    intact, close, and return them.
    """
    client = await connect_client(case, port)
    payload = os.urandom(size)
    assert client.transport is not None
    client.transport.write(payload)
    got = await client.received(size)
    case.assertEqual(got, payload)
    client.transport.loseConnection()
    await client.closed
    return payload


@implementer(IPushProducer)
class Pusher:
    """
    Writes C{total} bytes of one random chunk, repeated, to a transport as
    fast as the transport lets it; C{done} fires once all is written.
    """

    def __init__(self, transport: Any, total: int, chunk: int = 65536) -> None:
        self.transport = transport
        self.total = total
        self.sent = 0
        self.paused = False
        self.chunk = os.urandom(chunk)
        self.done: Deferred[None] = Deferred()
        transport.registerProducer(self, True)

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < self.total:
            self.transport.write(self.chunk)
            self.sent += len(self.chunk)
        if self.sent >= self.total and not self.done.called:
            self.transport.unregisterProducer()
            self.done.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True
