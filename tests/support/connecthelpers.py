"""
Small real-socket peers for connection tests: an echo server that
remembers how each of its connections ended, and a client that sends one
message and waits for it to come back.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure


class EchoServer(Protocol):
    """
    Sends back whatever it receives.  Under TLS it records the server name
    the client asked for (SNI) once the handshake is done.
    """

    def __init__(self, lost: Deferred[None]) -> None:
        self.lost = lost
        self.server_name: bytes | None = None

    def dataReceived(self, data: bytes) -> None:
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        get_servername = getattr(handle, "get_servername", None)
        if get_servername is not None:
            self.server_name = get_servername()
        self.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class EchoServerFactory(Factory):
    """
    Builds L{EchoServer}s and keeps them, so that a test can wait until
    every connection it caused has closed on the server side too.
    """

    def __init__(self) -> None:
        self.protocols: list[EchoServer] = []

    def buildProtocol(self, addr: IAddress | None) -> EchoServer:
        protocol = EchoServer(Deferred())
        self.protocols.append(protocol)
        return protocol

    def all_lost(self) -> Deferred[object]:
        """
        Fire when every connection accepted so far has been lost.
        """
        return DeferredList([p.lost for p in self.protocols])


class PingClient(Protocol):
    """
    Sends C{message} as soon as it is connected (under TLS it leaves with
    the first application data), fires C{answer} with the echo of it and
    closes; fires C{answer} with the connection's failure if it ends first.
    """

    def __init__(self, message: bytes = b"ping") -> None:
        self.message = message
        self.answer: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self._received = b""

    def connectionMade(self) -> None:
        self.transport.write(self.message)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        if len(self._received) >= len(self.message) and not self.answer.called:
            self.answer.callback(self._received)
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.answer.called:
            self.answer.errback(reason)
        self.lost.callback(None)


class PingClientFactory(Factory):
    """
    Builds one L{PingClient} per connection and keeps the last.
    """

    def __init__(self, message: bytes = b"ping") -> None:
        self.message = message
        self.protocols: list[PingClient] = []

    def buildProtocol(self, addr: IAddress | None) -> PingClient:
        protocol = PingClient(self.message)
        self.protocols.append(protocol)
        return protocol
