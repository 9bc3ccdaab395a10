"""
A fake HTTP CONNECT web proxy on loopback, the one web proxy tests use.

It reads one request head, records it, answers 405 to anything but
C{CONNECT ... HTTP/1.1}, 407 (with C{Proxy-Authenticate}) when it demands
credentials and the request lacks them, 502 when the target cannot be
reached, and otherwise C{200} and relays both ways. It listens plain or
under TLS (an C{https://} web proxy) and reaches IPv4 and IPv6 targets.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import (
    HostnameEndpoint,
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.support.certs import TestPKI
from tests.support.wsframes import parse_request

__all__ = ["ConnectProxyFactory", "ConnectRequest"]


@frozen
class ConnectRequest:
    """
    One request head as the web proxy read it: C{head} its bytes as sent
    (without the blank line ending it), C{line} its request line and
    C{headers} its headers (lower-case names).
    """

    head: bytes
    line: str
    headers: dict[str, str]


class _Outbound(Protocol):
    """The web proxy's leg to the target: passes bytes back to the client."""

    def __init__(self, inbound: _ConnectProxy) -> None:
        self.inbound = inbound

    def dataReceived(self, data: bytes) -> None:
        assert self.inbound.transport is not None
        self.inbound.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.inbound.transport is not None:
            self.inbound.transport.loseConnection()


class _ConnectProxy(Protocol):
    """
    One client connection: reads the request head, checks it, then relays
    both ways to the target.
    """

    def __init__(self, factory: ConnectProxyFactory) -> None:
        self.proxy = factory
        self.head = b""
        self.outbound: _Outbound | None = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.proxy.live.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self.outbound is not None:
            assert self.outbound.transport is not None
            self.outbound.transport.write(data)
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        head = self.head.partition(b"\r\n\r\n")[0]
        line, headers, rest = parse_request(self.head)
        self.head = b""
        self.proxy.requests.append(ConnectRequest(head, line, headers))
        method, target, version = line.split(" ")
        if (method, version) != ("CONNECT", "HTTP/1.1"):
            self._refuse(b"405 Method Not Allowed\r\n")
            return
        wanted = self.proxy.authorization
        # The header exactly as lpxy writes it, name case included.
        if wanted is not None and f"Proxy-Authorization: {wanted}" not in _lines(head):
            self._refuse(b"407 Proxy Authentication Required\r\n"
                         b'Proxy-Authenticate: Basic realm="test"\r\n')
            return
        host, _, port = target.rpartition(":")
        assert self.transport is not None
        self.transport.pauseProducing()
        self.outbound = _Outbound(self)
        connecting = connectProtocol(
            HostnameEndpoint(reactor, host.strip("[]"), int(port)), self.outbound
        )
        connecting.addCallbacks(self._opened, self._unreachable, (rest,))

    def _refuse(self, status_and_headers: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 " + status_and_headers + b"\r\n")
        self.transport.loseConnection()

    def _opened(self, outbound: _Outbound, rest: bytes) -> None:
        assert self.transport is not None and outbound.transport is not None
        self.proxy.opened += 1
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            outbound.transport.write(rest)
        self.transport.resumeProducing()

    def _unreachable(self, reason: Failure) -> None:
        self.outbound = None
        self._refuse(b"502 Bad Gateway\r\n")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.proxy.live.discard(self)
        if self.outbound is not None and self.outbound.transport is not None:
            self.outbound.transport.loseConnection()
        self.lost.callback(None)


def _lines(head: bytes) -> list[str]:
    return head.decode("latin-1").split("\r\n")


class ConnectProxyFactory(Factory):
    """
    The web proxy. C{requests} holds each request head it read
    (L{ConnectRequest}); C{opened} counts the tunnels it opened; C{live}
    holds its open client connections.

    @param authorization: the C{Proxy-Authorization} value it demands
        (407 otherwise), or L{None} to accept any request.
    """

    def __init__(self, authorization: str | None = None) -> None:
        self.authorization = authorization
        self.requests: list[ConnectRequest] = []
        self.opened = 0
        self.live: set[_ConnectProxy] = set()
        self.connections: list[_ConnectProxy] = []

    def buildProtocol(self, addr: Any) -> _ConnectProxy:
        protocol = _ConnectProxy(self)
        self.connections.append(protocol)
        return protocol

    async def listen(self, case: TestCase, tls: TestPKI | None = None) -> int:
        """
        Listen on loopback for C{case}, under TLS with C{tls}'s server
        certificate if given; return the port. A cleanup stops listening
        and waits until every connection is closed.
        """
        if tls is None:
            endpoint: Any = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        else:
            endpoint = SSL4ServerEndpoint(
                reactor, 0, tls.server_context_factory(), interface="127.0.0.1"
            )
        port = await endpoint.listen(self)

        async def stop() -> None:
            await port.stopListening()
            await self.all_closed()

        case.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return int(port.getHost().port)

    def all_closed(self) -> Deferred[Any]:
        """Fires once every connection accepted so far is closed."""
        return DeferredList([protocol.lost for protocol in self.connections])
