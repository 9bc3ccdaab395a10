"""
More end-to-end wiring for the local proxy, beyond L{tests.support.proxyhelpers}:
a pair of proxies from any two configurations, the real socket under a
(TLS, web-proxy) transport, a fake HTTP CONNECT web proxy, a log recorder
and a per-connection round trip of random data.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer  # type: ignore[import-untyped]

from lpxy.frames import Message
from lpxy.proxy.config import ProxyConfig
from lpxy.proxy.service import LocalProxyService
from tests.support.proxyhelpers import ProxyPair, connect_client, start_proxy
from tests.support.wsframes import parse_request

__all__ = [
    "ConnectProxyFactory",
    "LogRecorder",
    "Pusher",
    "RecordTap",
    "echo_round_trip",
    "listener_ports",
    "no_delay",
    "start_configured_pair",
    "tcp_socket",
    "turns",
    "unused_port",
]


def listener_ports(source: LocalProxyService) -> dict[str, int]:
    """The port a source listens on, per service id."""
    listeners = source.connector.listeners
    assert listeners is not None
    ports = {}
    for binding in source.connector.session.bindings:
        port = listeners.port_for(binding.service_id)
        assert port is not None, binding
        ports[binding.service_id] = port
    return ports


async def start_configured_pair(
    case: TestCase, destination: ProxyConfig, source: ProxyConfig, tunnel_id: str = ""
) -> ProxyPair:
    """
    Start a destination then a source proxy from the two configurations;
    fire, once both are connected (the source listening), with the pair and
    the source's port per service id.
    """
    dst = await start_proxy(case, destination)
    src = await start_proxy(case, source)
    return ProxyPair(dst, src, listener_ports(src), tunnel_id)


def unused_port() -> int:
    """
    A loopback port that nothing listened on a moment ago, for a test that
    must name a fixed port (a C{--config-dir} mapping). The kernel hands
    out ephemeral ports in turn, so another taker in between is unlikely.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RecordTap:
    """
    Sees every record a proxy receives from the tunnel service, by
    standing in front of its connector's C{ws_records}.
    """

    def __init__(self, proxy: LocalProxyService) -> None:
        self.messages: list[Message] = []
        connector = proxy.connector
        original = connector.ws_records

        def ws_records(protocol: Any, messages: list[Message]) -> None:
            self.messages.extend(messages)
            original(protocol, messages)

        connector.ws_records = ws_records  # type: ignore[method-assign]

    def data_sizes(self) -> list[int]:
        """The payload size of each DATA record, in order."""
        return [len(m.payload) for m in self.messages if m.type == Message.DATA]


def tcp_socket(transport: Any) -> socket.socket:
    """
    The socket under C{transport}, through the TLS and web-proxy layers
    (each of which keeps the transport it runs over as C{.transport}).
    """
    for _ in range(6):
        handle = transport.getHandle()
        if isinstance(handle, socket.socket):
            return handle
        transport = transport.transport
    raise AssertionError(f"no socket under {transport!r}")


def no_delay(transport: Any) -> bool:
    """C{TCP_NODELAY} as the kernel has it on the socket under C{transport}."""
    sock = tcp_socket(transport)
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


@implementer(ILogObserver)
class LogRecorder:
    """Keeps every log event published while a test runs."""

    def __init__(self, case: TestCase) -> None:
        self.events: list[LogEvent] = []
        self._waiting: list[tuple[str, int, Deferred[None]]] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)
        waiting, self._waiting = self._waiting, []
        for containing, count, d in waiting:
            self._check(containing, count, d)

    def _check(self, containing: str, count: int, d: Deferred[None]) -> None:
        if len(self.texts(containing)) >= count:
            d.callback(None)
        else:
            self._waiting.append((containing, count, d))

    def when(self, containing: str, count: int = 1) -> Deferred[None]:
        """Fires once C{count} events contain C{containing}."""
        d: Deferred[None] = Deferred()
        self._check(containing, count, d)
        return d

    def texts(self, containing: str = "") -> list[str]:
        """The formatted events whose text contains C{containing}."""
        texts = [formatEvent(event) for event in self.events]
        return [text for text in texts if containing in text]

    def mentioning(self, secret: str) -> list[str]:
        """
        The events whose text, or any of whose fields, holds C{secret}.
        """
        found = []
        for event in self.events:
            text = formatEvent(event)
            fields = " ".join(repr(value) for value in event.values())
            if secret in text or secret in fields:
                found.append(text)
        return found


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


def turns(n: int) -> Deferred[None]:
    """Fires after C{n} turns of the reactor (no wall-clock wait)."""
    d: Deferred[None] = Deferred()

    def step(left: int) -> None:
        if left:
            reactor.callLater(0, step, left - 1)  # type: ignore[attr-defined]
        else:
            d.callback(None)

    step(n)
    return d


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


# --- a fake HTTP CONNECT web proxy ----------------------------------------


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
    Reads one CONNECT request head, checks C{Proxy-Authorization} when the
    factory wants it, then relays both ways to the target on loopback.
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
        request, headers, rest = parse_request(self.head)
        self.head = b""
        self.proxy.requests.append((request, headers))
        assert self.transport is not None
        method, target, _version = request.split(" ")
        wanted = self.proxy.authorization
        if method != "CONNECT":
            self._refuse(b"405 Method Not Allowed")
            return
        if wanted is not None and headers.get("proxy-authorization") != wanted:
            self._refuse(b"407 Proxy Authentication Required")
            return
        host, _, port = target.rpartition(":")
        self.transport.pauseProducing()
        self.outbound = _Outbound(self)
        connecting = connectProtocol(
            TCP4ClientEndpoint(reactor, host, int(port)), self.outbound
        )
        connecting.addCallbacks(self._opened, self._unreachable, (rest,))

    def _refuse(self, status: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 " + status + b"\r\n\r\n")
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
        self._refuse(b"502 Bad Gateway")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.proxy.live.discard(self)
        if self.outbound is not None and self.outbound.transport is not None:
            self.outbound.transport.loseConnection()
        self.lost.callback(None)


class ConnectProxyFactory(Factory):
    """
    A web proxy for tests. C{requests} holds each request line with its
    headers (lower-case names); C{opened} counts the tunnels it opened.

    @param authorization: the C{Proxy-Authorization} value it demands
        (407 otherwise), or L{None} to accept any request.
    """

    def __init__(self, authorization: str | None = None) -> None:
        self.authorization = authorization
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.opened = 0
        self.live: set[_ConnectProxy] = set()
        self.connections: list[_ConnectProxy] = []

    def buildProtocol(self, addr: Any) -> _ConnectProxy:
        protocol = _ConnectProxy(self)
        self.connections.append(protocol)
        return protocol

    async def listen(self, case: TestCase) -> int:
        """Listen on loopback for C{case}; return the port."""
        port = reactor.listenTCP(0, self, interface="127.0.0.1")  # type: ignore[attr-defined]

        async def stop() -> None:
            await port.stopListening()
            for protocol in list(self.live):
                await protocol.lost

        case.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return int(port.getHost().port)
