"""
End-to-end wiring for the local proxy: echo and sink applications, proxies
built against a L{tests.support.tunnelservice} fixture, and test clients.

Everything listens on 127.0.0.1 port 0 in the test's reactor, and every
helper registers a cleanup that waits until its connections are closed, so
tests leave a clean reactor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from lpxy.proxy.config import LocalTarget, ProxyConfig, TcpTarget, TunnelEndpoint
from lpxy.proxy.service import LocalProxyService
from lpxy.proxy.settings import ProxySettings, TcpSettings, WebSocketSettings
from tests.support.tunnelservice import ServiceFixture

V1 = "aws.iot.securetunneling-1.0"
V2 = "aws.iot.securetunneling-2.0"
V3 = "aws.iot.securetunneling-3.0"

__all__ = [
    "V1",
    "V2",
    "V3",
    "AppFactory",
    "Client",
    "ProxyPair",
    "buffered",
    "connect_client",
    "start_app",
    "start_pair",
    "start_proxy",
]


def buffered(transport: Any) -> int:
    """
    Bytes a Twisted socket transport holds, not yet written to its socket.

    Twisted has no public API for this, so for measurement only it reads
    C{FileDescriptor}'s buffer attributes.
    """
    if transport is None:
        return 0
    inner = getattr(transport, "transport", None)
    if inner is not None and not hasattr(transport, "dataBuffer"):
        return buffered(inner)
    return len(getattr(transport, "dataBuffer", b"")) + int(
        getattr(transport, "_tempDataLen", 0)
    )


class AppProtocol(Protocol):
    """An application: echoes (C{echo}) or counts what it reads (sink)."""

    factory: AppFactory

    def connectionMade(self) -> None:
        self.received = 0
        self.closed: Deferred[None] = Deferred()
        self.factory.connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.factory.echo:
            assert self.transport is not None
            self.transport.write(data)
        self.factory.on_data(self, data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.gone(self)
        self.closed.callback(None)


class AppFactory(Factory):
    """Tracks its connections so a cleanup can wait for them to close."""

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
    """A local client of a source proxy: collects what it reads."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: Deferred[None] = Deferred()
        self._want: list[tuple[int, Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def _check(self) -> None:
        still = []
        for size, d in self._want:
            if len(self.data) >= size:
                d.callback(bytes(self.data[:size]))
            else:
                still.append((size, d))
        self._want = still

    def received(self, size: int) -> Deferred[bytes]:
        """Fires with the first C{size} bytes once they arrived."""
        d: Deferred[bytes] = Deferred()
        self._want.append((size, d))
        self._check()
        return d

    def connectionLost(self, reason: Failure | None = None) -> None:
        for _, d in self._want:
            d.errback(Failure(AssertionError(f"closed after {len(self.data)} bytes")))
        self._want = []
        self.closed.callback(None)


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


class ProxyPair(NamedTuple):
    """A destination and a source proxy joined by one tunnel."""

    destination: LocalProxyService
    source: LocalProxyService
    ports: dict[str, int]
    tunnel_id: str


def make_config(
    fixture: ServiceFixture,
    token: str,
    mode: str,
    *,
    source_ports: Mapping[str, int] | None = None,
    destination_apps: Mapping[str, LocalTarget] | None = None,
    subprotocol: str = V3,
    client_type: str | None = None,
    client_token: str | None = None,
    retry_delay_ms: int = 100,
    connect_retry_count: int = -1,
    connection_retry_count: int = 0,
    max_active_connections: int = 128,
) -> ProxyConfig:
    """A configuration for a proxy talking to C{fixture} over plain ws://."""
    settings = ProxySettings(
        websocket=WebSocketSettings(
            subprotocol=subprotocol,
            retry_delay_ms=retry_delay_ms,
            connect_retry_count=connect_retry_count,
        ),
        tcp=TcpSettings(connection_retry_count=connection_retry_count,
                        connection_retry_delay_ms=50,
                        max_active_connections=max_active_connections),
    )
    return ProxyConfig(
        mode=mode,  # type: ignore[arg-type]
        access_token=token,
        client_token=client_token,
        endpoint=TunnelEndpoint("127.0.0.1", fixture.port, tls=False),
        source_ports=dict(source_ports or {}),
        destination_apps=dict(destination_apps or {}),
        bind_address="127.0.0.1",
        destination_client_type=client_type,  # type: ignore[arg-type]
        settings=settings,
    )


async def start_proxy(case: TestCase, config: ProxyConfig, wait: bool = True) -> LocalProxyService:
    """Start a proxy; fire once its tunnel connection is ready (C{wait})."""
    service = LocalProxyService(config, reactor)
    service.startService()

    async def stop() -> None:
        if service.running:
            await service.stopService()
        await _relays_gone(service)

    case.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    if wait:
        await service.client.whenConnected()
    return service


def _relays_gone(service: LocalProxyService) -> Deferred[Any]:
    waits = []
    for relay in service.connector.flow.relays:
        transport = relay.transport
        if transport is None:
            continue
        d: Deferred[None] = Deferred()
        original = relay.connectionLost

        def lost(reason: Any = None, d: Deferred[None] = d, original: Any = original) -> None:
            original(reason)
            d.callback(None)

        relay.connectionLost = lost  # type: ignore[method-assign]
        waits.append(d)
    return DeferredList(waits)


async def start_pair(
    case: TestCase,
    fixture: ServiceFixture,
    services: list[str] | None,
    apps: Mapping[str, LocalTarget],
    *,
    source_subprotocol: str = V3,
    destination_subprotocol: str = V3,
    client_type: str | None = None,
    max_active_connections: int = 128,
) -> ProxyPair:
    """
    Open a tunnel and start a destination (serving C{apps}) then a source
    (listening on random ports); fire with both, the source's port per map
    key, and the tunnel id.
    """
    opened = fixture.open_tunnel(services)
    destination = await start_proxy(case, make_config(
        fixture, opened.destination_token, "destination",
        destination_apps=apps, subprotocol=destination_subprotocol,
    ))
    source = await start_proxy(case, make_config(
        fixture, opened.source_token, "source",
        source_ports={key: 0 for key in apps}, subprotocol=source_subprotocol,
        client_type=client_type, max_active_connections=max_active_connections,
    ))
    listeners = source.connector.listeners
    assert listeners is not None
    ports = {}
    for binding in source.connector.session.bindings:
        port = listeners.port_for(binding.service_id)
        assert binding.key is not None and port is not None
        ports[binding.key] = port
    return ProxyPair(destination, source, ports, opened.tunnel_id)


def tcp(port: int) -> TcpTarget:
    """The loopback application on C{port}."""
    return TcpTarget("127.0.0.1", port)


def gather(*ds: Deferred[Any]) -> Deferred[list[Any]]:
    """All of C{ds}, failing on the first failure."""
    return gatherResults(list(ds), consumeErrors=True)
