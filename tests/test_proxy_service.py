"""
Tests for L{lpxy.proxy.service}: the retry policy, readiness and the exit
statuses, with a C{Clock}, a fake endpoint and C{StringTransport}s.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from attrs import evolve
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    CannotListenError,
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionRefusedError,
)
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from lpxy.frames import Message, encode
from lpxy.proxy.config import ProxyConfig, TcpTarget, TunnelEndpoint
from lpxy.proxy.service import LocalProxyService
from lpxy.proxy.settings import ProxySettings, TcpSettings, WebSocketSettings
from lpxy.proxy.statedir import client_token_file
from tests.support.wsframes import (
    BINARY,
    WebSocketTransport,
    accept_response,
    frame,
    parse_request,
)

TOKEN = "the-access-token"


class FakeEndpoint:
    """Connection attempts completed by the test."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Deferred[Any], Any]] = []
        self.connections: list[tuple[Any, WebSocketTransport]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        # Cancelled as a HostnameEndpoint's attempt is.
        d: Deferred[Any] = Deferred(
            lambda d: d.errback(ConnectingCancelledError(IPv4Address("TCP", "127.0.0.1", 8080)))
        )
        self.attempts.append((d, factory))
        return d

    def succeed(self) -> tuple[Any, WebSocketTransport]:
        d, factory = self.attempts[-1]
        protocol = factory.buildProtocol(None)
        transport = WebSocketTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        d.callback(protocol)
        return protocol, transport

    def fail(self) -> None:
        d, _ = self.attempts[-1]
        d.errback(ConnectionRefusedError())


def config(mode: str = "destination", retries: int = -1, **websocket: Any) -> ProxyConfig:
    settings = ProxySettings(
        websocket=WebSocketSettings(retry_delay_ms=2500, connect_retry_count=retries,
                                    **websocket),
        tcp=TcpSettings(connection_retry_count=0),
    )
    maps: dict[str, Any] = (
        {"destination_apps": {"SSH": TcpTarget("127.0.0.1", 22)}}
        if mode == "destination" else {"source_ports": {"SSH": 5555}}
    )
    return ProxyConfig(
        mode=mode,  # type: ignore[arg-type]
        access_token=TOKEN,
        endpoint=TunnelEndpoint("127.0.0.1", 8080, tls=False),
        settings=settings,
        **maps,
    )


class BusyReactor(MemoryReactor):
    """A reactor on which every port is in use."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                  interface: str = "") -> Any:
        raise CannotListenError(
            interface, port, OSError(errno.EADDRINUSE, "Address already in use")
        )


class ServiceTestBase(SynchronousTestCase):
    def build(self, cfg: ProxyConfig) -> LocalProxyService:
        self.clock = Clock()
        self.reactor = MemoryReactor()
        self.endpoint = FakeEndpoint()
        self.service = LocalProxyService(
            cfg, self.reactor, endpoint=self.endpoint, clock=self.clock
        )
        self.done = self.service.whenDone()
        self.service.startService()
        return self.service

    def tearDown(self) -> None:
        if self.service.running:
            self.service.stopService()
            for protocol, transport in self.endpoint.connections:
                if transport.disconnecting and not getattr(transport, "lost", False):
                    transport.lost = True
                    protocol.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(100)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def handshake(self, status: bytes | None = None,
                  ids: list[str] | None = None) -> tuple[Any, WebSocketTransport]:
        protocol, transport = self.endpoint.succeed()
        request = transport.value()
        transport.clear()
        if status is not None:
            protocol.dataReceived(status)
            protocol.connectionLost(Failure(ConnectionDone()))
            transport.lost = True
            return protocol, transport
        protocol.dataReceived(accept_response(request, "aws.iot.securetunneling-3.0"))
        if ids is not None:
            protocol.dataReceived(
                frame(BINARY, encode(Message(type=Message.SERVICE_IDS, availableServiceIds=ids)))
            )
        return protocol, transport

    def lose(self, protocol: Any, transport: WebSocketTransport) -> None:
        transport.lost = True
        protocol.connectionLost(Failure(ConnectionDone()))


class ServiceTests(ServiceTestBase):
    def test_ready_after_service_ids(self) -> None:
        self.build(config())
        self.assertEqual(len(self.endpoint.attempts), 1)
        protocol, _ = self.handshake()
        connected = self.service.client.whenConnected()
        self.assertNoResult(connected)
        protocol.dataReceived(
            frame(BINARY, encode(Message(type=Message.SERVICE_IDS, availableServiceIds=["SSH"])))
        )
        self.successResultOf(connected)

    def test_client_token_generated_once(self) -> None:
        self.build(config())
        protocol, transport = self.handshake(ids=["SSH"])
        first = self.service.client_token
        self.assertRegex(first, r"^[a-zA-Z0-9-]{32,128}$")
        self.lose(protocol, transport)
        self.clock.advance(2.5)
        self.assertEqual(len(self.endpoint.attempts), 2)
        _, transport2 = self.endpoint.succeed()
        _, headers2, _ = parse_request(transport2.value())
        self.assertEqual(headers2["client-token"], first)
        self.assertEqual(headers2["access-token"], TOKEN)

    def test_client_token_kept_in_state_dir(self) -> None:
        """
        With a state directory, the client token is the one kept there for
        the access token: a second service (a restarted process) sends the
        same one.
        """
        state = self.mktemp()
        self.build(evolve(config(), state_dir=state))
        first = self.service.client_token
        self.assertEqual(
            client_token_file(Path(state), TOKEN).read_text().strip(), first
        )
        self.service.stopService()
        self.clock.advance(100)
        self.build(evolve(config(), state_dir=state))
        _, transport = self.endpoint.succeed()
        _, headers, _ = parse_request(transport.value())
        self.assertEqual(headers["client-token"], first)

    def test_rejected_is_final(self) -> None:
        self.build(config())
        self.handshake(b"HTTP/1.1 401 Unauthorized\r\n\r\nInvalid access token")
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(self.done), 2)
        self.clock.advance(60)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_server_error_retries(self) -> None:
        self.build(config())
        self.handshake(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
        self.clock.advance(2.4)
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.endpoint.attempts), 2)
        self.assertNoResult(self.done)

    def test_retries_exhausted(self) -> None:
        self.build(config(retries=2))
        for _ in range(3):
            self.endpoint.fail()
            self.clock.advance(2.5)
        self.assertEqual(self.successResultOf(self.done), 3)
        self.assertEqual(len(self.endpoint.attempts), 3)

    def test_no_retry(self) -> None:
        self.build(config(retries=0))
        self.endpoint.fail()
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(self.done), 3)

    def test_no_retry_after_loss(self) -> None:
        self.build(config(retries=0))
        protocol, transport = self.handshake(ids=["SSH"])
        self.lose(protocol, transport)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(self.done), 3)

    def test_budget_rearmed_after_loss(self) -> None:
        self.build(config(retries=1))
        self.endpoint.fail()
        self.clock.advance(2.5)
        protocol, transport = self.handshake(ids=["SSH"])
        # The failure before the connection does not count after it: the
        # loss allows one retry again.
        self.lose(protocol, transport)
        self.clock.advance(2.5)
        self.assertNoResult(self.done)
        self.endpoint.fail()
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(self.done), 3)
        self.assertEqual(len(self.endpoint.attempts), 3)

    def test_close_1000_exits_zero(self) -> None:
        self.build(config())
        protocol, transport = self.handshake(ids=["SSH"])
        protocol.dataReceived(frame(8, b"\x03\xe8tunnel closed"))
        self.lose(protocol, transport)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(self.done), 0)
        self.clock.advance(60)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_close_1001_reconnects_at_once(self) -> None:
        """
        1001 (the service node is going away): the proxy reconnects without
        the retry delay, once; if that attempt fails, the next one waits.
        """
        self.build(config())
        protocol, transport = self.handshake(ids=["SSH"])
        protocol.dataReceived(frame(8, b"\x03\xe9going away"))
        self.lose(protocol, transport)
        self.clock.advance(0)
        self.assertEqual(len(self.endpoint.attempts), 2)
        self.assertNoResult(self.done)
        self.endpoint.fail()
        self.clock.advance(2.4)
        self.assertEqual(len(self.endpoint.attempts), 2)
        self.clock.advance(0.1)
        self.assertEqual(len(self.endpoint.attempts), 3)

    def test_lost_waits(self) -> None:
        """A connection lost without 1001 is retried after the retry delay."""
        self.build(config())
        protocol, transport = self.handshake(ids=["SSH"])
        protocol.dataReceived(frame(8, b"\x03\xf3internal error"))
        self.lose(protocol, transport)
        self.clock.advance(2.4)
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.endpoint.attempts), 2)

    def test_protocol_error_reconnects(self) -> None:
        self.build(config())
        protocol, transport = self.handshake(ids=["SSH"])
        protocol.dataReceived(frame(BINARY, encode(Message(type=Message.UNKNOWN, streamId=1))))
        self.assertTrue(transport.disconnecting)
        self.lose(protocol, transport)
        self.clock.advance(2.5)
        self.assertEqual(len(self.endpoint.attempts), 2)

    def test_protocol_error_final(self) -> None:
        self.build(config(reconnect_on_data_error=False))
        protocol, transport = self.handshake(ids=["SSH"])
        protocol.dataReceived(frame(BINARY, b"\x00\x00"))
        self.lose(protocol, transport)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(self.done), 3)

    def test_service_mismatch(self) -> None:
        self.build(config())
        protocol, transport = self.handshake(ids=["HTTP"])
        self.lose(protocol, transport)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(self.done), 1)

    def test_source_binds_before_connecting_and_listens_once(self) -> None:
        """
        A source binds its configured port before it connects; until
        SERVICE_IDS has settled the service (and while disconnected), the
        port closes its clients at once; reconnecting listens on nothing
        more.
        """
        self.build(config("source"))
        self.assertEqual(
            [(port, interface) for port, _, _, interface in self.reactor.tcpServers],
            [(5555, "localhost")],
        )
        factory = self.reactor.tcpServers[0][1]
        self.assertIsNone(factory.buildProtocol(None))
        protocol, transport = self.handshake()
        self.assertIsNone(factory.buildProtocol(None))
        protocol.dataReceived(
            frame(BINARY, encode(Message(type=Message.SERVICE_IDS, availableServiceIds=["SSH"])))
        )
        self.assertEqual(len(self.reactor.tcpServers), 1)
        self.assertEqual(factory.binding.service_id, "SSH")
        self.assertIsNotNone(factory.buildProtocol(None))
        self.lose(protocol, transport)
        self.assertIsNone(factory.buildProtocol(None))
        self.clock.advance(2.5)
        self.handshake(ids=["SSH"])
        self.assertEqual(len(self.reactor.tcpServers), 1)

    def test_source_binds_while_privileged(self) -> None:
        """
        Under twistd, the ports are bound in C{privilegedStartService},
        before twistd drops privileges, and only there.
        """
        self.clock = Clock()
        self.reactor = MemoryReactor()
        self.endpoint = FakeEndpoint()
        self.service = LocalProxyService(
            config("source"), self.reactor, endpoint=self.endpoint, clock=self.clock
        )
        self.done = self.service.whenDone()
        self.service.privilegedStartService()
        self.assertEqual([port for port, _, _, _ in self.reactor.tcpServers], [5555])
        self.assertEqual(self.endpoint.attempts, [])
        self.service.startService()
        self.assertEqual(len(self.reactor.tcpServers), 1)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_source_port_busy(self) -> None:
        """
        A configured port that cannot be listened on ends the source at
        once with status 1, in the reference's words, before any
        connection attempt.
        """
        with capturedLogs() as events:
            self.clock = Clock()
            self.reactor = BusyReactor()
            self.endpoint = FakeEndpoint()
            self.service = LocalProxyService(
                config("source"), self.reactor, endpoint=self.endpoint, clock=self.clock
            )
            self.done = self.service.whenDone()
            self.service.startService()
            self.clock.advance(0)
        self.assertEqual(self.successResultOf(self.done), 1)
        self.assertEqual(self.endpoint.attempts, [])
        errors = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.error]
        self.assertEqual(
            errors, ["Could not bind to address: localhost:5555 -- Address already in use"]
        )
        self.clock.advance(60)
        self.assertEqual(self.endpoint.attempts, [])

    def test_stop_closes_websocket(self) -> None:
        self.build(config())
        protocol, transport = self.handshake(ids=["SSH"])
        transport.clear()
        self.service.stopService()
        self.assertTrue(transport.value().startswith(b"\x88"))
        self.lose(protocol, transport)
        self.assertNoResult(self.done)


class FinalOutcomeLogTests(ServiceTestBase):
    """
    A final outcome stops the C{ClientService} before it schedules a retry:
    no "Scheduling retry" line contradicts ours, and Autobahn's routine drop
    is no warning.
    """

    def scheduled(self, events: list[Any]) -> list[str]:
        return [formatEvent(e) for e in events if "Scheduling retry" in e.get("log_format", "")]

    def warnings(self, events: list[Any]) -> list[str]:
        return [formatEvent(e) for e in events
                if e.get("log_level", LogLevel.info) >= LogLevel.warn]

    def test_rejected(self) -> None:
        with capturedLogs() as events:
            self.build(config())
            self.handshake(b"HTTP/1.1 401 Unauthorized\r\n\r\nInvalid access token")
            self.clock.advance(60)
        self.assertEqual(self.successResultOf(self.done), 2)
        self.assertEqual(self.scheduled(events), [])
        self.assertEqual(len(self.warnings(events)), 1, self.warnings(events))
        self.assertIn("refused the connection", self.warnings(events)[0])
        self.assertIn("not retrying", self.warnings(events)[0])
        dropped = [e for e in events if formatEvent(e).startswith("dropping connection")]
        self.assertTrue(dropped, "Autobahn's line is kept")
        self.assertEqual({e["log_level"] for e in dropped}, {LogLevel.debug})
        failing = [e for e in events if formatEvent(e).startswith("failing WebSocket")]
        self.assertEqual({e["log_level"] for e in failing}, {LogLevel.debug})

    def test_close_1000(self) -> None:
        with capturedLogs() as events:
            self.build(config())
            protocol, transport = self.handshake(ids=["SSH"])
            protocol.dataReceived(frame(8, b"\x03\xe8tunnel closed"))
            self.lose(protocol, transport)
            self.clock.advance(60)
        self.assertEqual(self.successResultOf(self.done), 0)
        self.assertEqual(self.scheduled(events), [])
        self.assertEqual(self.warnings(events), [])

    def test_retries_exhausted(self) -> None:
        with capturedLogs() as events:
            self.build(config(retries=2))
            for _ in range(3):
                self.endpoint.fail()
                self.clock.advance(2.5)
        self.assertEqual(self.successResultOf(self.done), 3)
        self.assertEqual(len(self.scheduled(events)), 2)
        self.assertIn("Giving up", self.warnings(events)[-1])

    def test_handshake_retries_exhausted(self) -> None:
        with capturedLogs() as events:
            self.build(config(retries=1))
            self.handshake(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
            self.clock.advance(2.5)
            self.handshake(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
            self.clock.advance(60)
        self.assertEqual(self.successResultOf(self.done), 3)
        self.assertEqual(len(self.endpoint.attempts), 2)
        self.assertEqual(len(self.scheduled(events)), 1)
        warnings = self.warnings(events)
        self.assertEqual(len([w for w in warnings if "retrying in" in w]), 1, warnings)
        self.assertIn("Giving up", warnings[-1])

    def test_stopped_while_connecting(self) -> None:
        """A cancelled attempt is no failure: stopping says nothing at warning."""
        with capturedLogs() as events:
            self.build(config())
            self.service.stopService()
        self.assertEqual(self.warnings(events), [])

    def test_protocol_error_one_line(self) -> None:
        """A protocol error is told once, with the reconnection that follows."""
        with capturedLogs() as events:
            self.build(config())
            protocol, transport = self.handshake(ids=["SSH"])
            protocol.dataReceived(frame(BINARY, b"\x00\x03\xff\xff\xff"))
            self.lose(protocol, transport)
        (line,) = self.warnings(events)
        self.assertTrue(line.startswith("Protocol error from the tunneling service: record body"),
                        line)
        self.assertTrue(line.endswith("; reconnecting in 2.5s"), line)

    def test_protocol_error_keeps_warning(self) -> None:
        with capturedLogs() as events:
            self.build(config())
            protocol, transport = self.handshake(ids=["SSH"])
            protocol.dataReceived(frame(BINARY, encode(Message(type=Message.UNKNOWN, streamId=1))))
            self.lose(protocol, transport)
        self.assertTrue(any("Protocol error" in w for w in self.warnings(events)))


class UnusedSettingsLogTests(ServiceTestBase):
    """
    A non-default value for a setting without effect in lpxy is told once,
    at info, with the reason; defaults say nothing.
    """

    def unused(self, events: list[Any]) -> list[Any]:
        return [e for e in events if "is not used" in e.get("log_format", "")]

    def test_defaults_silent(self) -> None:
        with capturedLogs() as events:
            self.build(config())
        self.assertEqual(self.unused(events), [])

    def test_each_once_at_info(self) -> None:
        cfg = config()
        settings = cfg.settings
        settings = evolve(
            settings,
            message=evolve(settings.message, max_size=1000, data_frame_max_size=1002),
            tcp=evolve(settings.tcp, read_buffer_size=3000),
            websocket=evolve(settings.websocket, read_buffer_size=4000,
                             write_buffer_size=5000),
        )
        with capturedLogs() as events:
            self.build(evolve(cfg, settings=settings))
            protocol, transport = self.handshake(ids=["SSH"])
            self.lose(protocol, transport)
            self.clock.advance(2.5)
        unused = self.unused(events)
        self.assertEqual(
            sorted(formatEvent(e).split(" is not used")[0] for e in unused),
            [
                "tunneling.proxy.message.data_frame_max_size 1002",
                "tunneling.proxy.message.max_size 1000",
                "tunneling.proxy.tcp.read_buffer_size 3000",
                "tunneling.proxy.websocket.read_buffer_size 4000",
                "tunneling.proxy.websocket.write_buffer_size 5000",
            ],
        )
        self.assertEqual({e["log_level"] for e in unused}, {LogLevel.info})
