"""
Local proxies in the test's reactor, joined by a
L{tests.support.tunnelservice} fixture: their configurations, starting one
or a destination and source pair, the ports a source listens on, and a tap
on the records a proxy receives.

Every proxy started here is stopped by a cleanup that also waits until its
relays' connections are closed, so tests leave a clean reactor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import TestCase

from lpxy.frames import Message
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
    "ProxyPair",
    "RecordTap",
    "listener_ports",
    "make_config",
    "start_configured_pair",
    "start_pair",
    "start_proxy",
    "tcp",
]


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


def tcp(port: int) -> TcpTarget:
    """The loopback application on C{port}."""
    return TcpTarget("127.0.0.1", port)


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


def listener_ports(
    source: LocalProxyService, by: Literal["service_id", "key"] = "service_id"
) -> dict[str, int]:
    """
    The port a source listens on, per service id (or, C{by="key"}, per key
    of its port mapping).
    """
    listeners = source.connector.listeners
    assert listeners is not None
    ports = {}
    for binding in source.connector.session.bindings:
        port = listeners.port_for(binding.service_id)
        name = getattr(binding, by)
        assert name is not None and port is not None, binding
        ports[name] = port
    return ports


def cut_tunnel(proxy: LocalProxyService) -> Any:
    """
    Abort C{proxy}'s connection to the tunnel service, as a network failure
    would (its streams die with it; the proxy reconnects); return the
    protocol of the connection cut.
    """
    protocol = proxy.connector.protocol
    assert protocol is not None
    protocol.transport.abortConnection()
    return protocol


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
    return ProxyPair(destination, source, listener_ports(source, by="key"), opened.tunnel_id)


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
