# -*- test-case-name: tests.test_writethrough -*-
"""
TCP transports whose writes go to the socket at once.

Twisted's TCP transport buffers every write and asks the reactor to watch
the socket for writability (one C{epoll_ctl}); on the loop's next turn
C{doWrite} sends and stops watching (another C{epoll_ctl}), with a reactor
dispatch between. For a small message on a socket whose kernel buffer has
room that is three steps more than the C{send} itself, on every hop of a
round trip.

Here a write that finds nothing buffered is sent at once, and only what the
kernel did not take goes into Twisted's buffer. From there on everything is
Twisted's own:

  - order: a write never overtakes buffered bytes (it joins the buffer);
  - flow control: a registered streaming producer is paused when the
    buffer passes C{bufferSize}, and resumed when it drains;
  - ends: C{loseConnection} and C{loseWriteConnection} take effect once
    the buffer is drained;
  - errors: a send that fails here (other than C{EAGAIN}) queues its data
    like any other; the reactor's next C{doWrite} sends again, fails again
    and ends the connection, so C{connectionLost} never runs from inside
    C{write}.

A connection that is closing, half-closed or aborted, one that started TLS
on itself (C{startTLS}) and one with a pull producer (which C{doWrite}'s
drained buffer asks for more) keep Twisted's buffered writes.

L{write_through} wraps a reactor so that the endpoints given it listen and
connect with these transports; everything else goes to the reactor itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import tcp
from twisted.internet.posixbase import PosixReactorBase
from zope.interface import directlyProvides, providedBy  # type: ignore[import-untyped]

__all__ = [
    "WriteThroughClient",
    "WriteThroughConnector",
    "WriteThroughPort",
    "WriteThroughServer",
    "write_through",
]


class _WriteThrough(tcp.Connection):
    """C{write} and C{writeSequence} sending at once when nothing waits."""

    def _can_write_through(self) -> bool:
        return bool(
            not self.dataBuffer
            and not self._tempDataLen
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnecting
            and not self._aborting
            and not self.TLS
            and (self.producer is None or self.streamingProducer)
        )

    def write(self, data: bytes) -> None:
        if data and isinstance(data, bytes) and self._can_write_through():
            try:
                sent = self.socket.send(data)
            except OSError:
                # EAGAIN or ENOBUFS: the buffered path retries when the
                # socket is writable. Anything else: doWrite's send fails
                # the same way and ends the connection from the reactor.
                sent = 0
            if sent == len(data):
                return
            if sent:
                data = data[sent:]
        super().write(data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        chunks = list(iovec)
        if not self._can_write_through() or not all(isinstance(c, bytes) for c in chunks):
            super().writeSequence(chunks)
            return
        self.write(b"".join(chunks))


class WriteThroughServer(_WriteThrough, tcp.Server):
    """An accepted TCP connection whose writes go to the socket at once."""


class WriteThroughClient(_WriteThrough, tcp.Client):
    """An outgoing TCP connection whose writes go to the socket at once."""


class WriteThroughPort(tcp.Port):
    """A listening TCP port whose connections are L{WriteThroughServer}s."""

    transport = WriteThroughServer


class _TLSPort(WriteThroughPort):
    # What PosixReactorBase.listenSSL marks its ports with, for their logs.
    _type = "TLS"


class WriteThroughConnector(tcp.Connector):
    """A TCP connector whose connections are L{WriteThroughClient}s."""

    def _makeTransport(self) -> tcp.Client:
        return WriteThroughClient(self.host, self.port, self.bindAddress, self, self.reactor)


class _WriteThroughReactor:
    """
    A reactor whose C{listenTCP}, C{connectTCP}, C{listenSSL} and
    C{connectSSL} make write-through transports (TLS as the reactor's own
    does it, a memory-BIO TLS protocol over TCP); it provides what the
    reactor provides and hands every other attribute to it.
    """

    def __init__(self, reactor: PosixReactorBase) -> None:
        self._reactor = reactor
        directlyProvides(self, providedBy(reactor))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def __repr__(self) -> str:
        return f"<write-through {self._reactor!r}>"

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> tcp.Port:
        listening = WriteThroughPort(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        return listening

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: Any,
        timeout: float = 30.0,
        bindAddress: Any = None,
    ) -> tcp.Connector:
        connector = WriteThroughConnector(host, port, factory, timeout, bindAddress, self._reactor)
        connector.connect()
        return connector

    def listenSSL(
        self,
        port: int,
        factory: Any,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> tcp.Port:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        tls: Any = TLSMemoryBIOFactory(contextFactory, False, factory)
        listening = _TLSPort(port, tls, backlog, interface, self._reactor)
        listening.startListening()
        return listening

    def connectSSL(
        self,
        host: str,
        port: int,
        factory: Any,
        contextFactory: Any,
        timeout: float = 30.0,
        bindAddress: Any = None,
    ) -> tcp.Connector:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        tls = TLSMemoryBIOFactory(contextFactory, True, factory)
        return self.connectTCP(host, port, tls, timeout, bindAddress)


def write_through(reactor: Any) -> Any:
    """
    C{reactor} for endpoints whose TCP connections should write through:
    a wrapper around a POSIX reactor, any other (a test's memory reactor)
    itself.
    """
    if isinstance(reactor, _WriteThroughReactor) or not isinstance(reactor, PosixReactorBase):
        return reactor
    return _WriteThroughReactor(reactor)
