"""
Tests for L{lpxy.proxy.connector}: what the connector makes of the tunnel's
events and the session's decisions, with a stand-in tunnel protocol, a
C{MemoryReactor}, a C{Clock} and C{StringTransport}s.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError, ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from lpxy.frames import Message
from lpxy.proxy.config import ProxyConfig, TcpTarget, TunnelEndpoint
from lpxy.proxy.connector import (
    EXIT_CLOSED,
    EXIT_CONFIG,
    EXIT_GAVE_UP,
    EXIT_REJECTED,
    ProxyConnector,
    TunnelConnectionFailed,
)
from lpxy.proxy.settings import ProxySettings, TcpSettings, WebSocketSettings
from lpxy.proxy.tunnel import CloseOutcome
from tests.support.recorders import FakeWebSocket

CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)


class FakeTunnel(FakeWebSocket):
    """
    A tunnel protocol as the connector sees it: records the records and
    data it is asked to send, and how it is closed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ready: Deferred[None] = Deferred()
        self.channel_id = "the-channel"
        self.factory = SimpleNamespace(subprotocol="aws.iot.securetunneling-3.0")
        self.rejection_body = ""
        self.status_line = ""
        self.messages: list[Message] = []
        self.data: list[tuple[bytes, bytes]] = []
        self.aborted = 0
        self.closed: list[tuple[int, str]] = []

    def send_message(self, message: Message) -> None:
        self.messages.append(message)

    def send_data(self, header: bytes, payload: bytes | memoryview) -> None:
        self.data.append((header, bytes(payload)))

    def abort(self) -> None:
        self.aborted += 1

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def kinds(self) -> list[tuple[str, int, int]]:
        return [(Message.Type.Name(m.type), m.streamId, m.connectionId) for m in self.messages]


class Listener:
    """A L{ConnectorListener} that records what it hears and answers C{retry}."""

    def __init__(self, retry: bool = True) -> None:
        self.retry = retry
        self.finished_with: list[int] = []
        self.lost: list[str] = []
        self.at_once: list[bool] = []
        self.failed: list[str] = []

    def finished(self, status: int) -> None:
        self.finished_with.append(status)

    def connection_lost(self, reason: str, at_once: bool = False) -> bool:
        self.lost.append(reason)
        self.at_once.append(at_once)
        return self.retry

    def attempt_failed(self, reason: str) -> bool:
        self.failed.append(reason)
        return self.retry


class RefusingReactor(MemoryReactor):
    """A reactor on which every port is taken."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                  interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError("address in use"))


def config(mode: str = "destination", reconnect_on_data_error: bool = True) -> ProxyConfig:
    settings = ProxySettings(
        websocket=WebSocketSettings(reconnect_on_data_error=reconnect_on_data_error),
        tcp=TcpSettings(connection_retry_count=0),
    )
    maps: dict[str, Any] = (
        {"destination_apps": {"SSH": TcpTarget("127.0.0.1", 22)}}
        if mode == "destination" else {"source_ports": {"SSH": 5555}}
    )
    return ProxyConfig(
        mode=mode,  # type: ignore[arg-type]
        access_token="t",
        endpoint=TunnelEndpoint("127.0.0.1", 8080, tls=False),
        settings=settings,
        **maps,
    )


def record(kind: int, stream_id: int = 0, connection_id: int = 0, **fields: Any) -> Message:
    return Message(type=kind, streamId=stream_id, serviceId="SSH",
                   connectionId=connection_id, **fields)


def service_ids(*ids: str) -> Message:
    return Message(type=Message.SERVICE_IDS, availableServiceIds=list(ids))


class ConnectorTestBase(SynchronousTestCase):
    def build(self, cfg: ProxyConfig, reactor: MemoryReactor | None = None,
              retry: bool = True) -> ProxyConnector:
        self.reactor = reactor if reactor is not None else MemoryReactor()
        self.clock = Clock()
        self.listener = Listener(retry)
        self.connector = ProxyConnector(cfg, self.reactor, self.clock, self.listener)
        return self.connector

    def open(self, *ids: str) -> FakeTunnel:
        """A tunnel connection opens and, given C{ids}, announces them."""
        tunnel = FakeTunnel()
        self.connector.ws_open(tunnel)  # type: ignore[arg-type]
        if ids:
            self.connector.ws_records(tunnel, [service_ids(*ids)])  # type: ignore[arg-type]
        return tunnel

    def records(self, tunnel: FakeTunnel, *messages: Message) -> None:
        self.connector.ws_records(tunnel, list(messages))  # type: ignore[arg-type]

    def close(self, tunnel: FakeTunnel, outcome: CloseOutcome) -> None:
        self.connector.ws_close(tunnel, outcome)  # type: ignore[arg-type]


class DestinationTests(ConnectorTestBase):
    """
    A destination connects a relay to the application for each stream the
    session opens, and carries bytes both ways through it.
    """

    def setUp(self) -> None:
        self.build(config())

    def connect_app(self) -> tuple[Any, StringTransport]:
        """The pending application connection succeeds."""
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 22))
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_ready_after_service_ids(self) -> None:
        """
        The connection is ready once SERVICE_IDS has settled the services.
        """
        tunnel = self.open()
        self.assertNoResult(tunnel.ready)
        self.records(tunnel, service_ids("SSH"))
        self.successResultOf(tunnel.ready)
        self.assertIs(self.connector.protocol, tunnel)
        self.assertIs(tunnel.producer, self.connector.flow)

    def test_relay_both_ways(self) -> None:
        """
        STREAM_START connects a relay to the application; DATA that came
        before the connection is written once it is up, later DATA at once;
        what the application says goes out with the channel's header.
        """
        tunnel = self.open("SSH")
        self.records(tunnel, record(Message.STREAM_START, 1, 1))
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.records(tunnel, record(Message.DATA, 1, 1, payload=b"early "))
        protocol, transport = self.connect_app()
        self.records(tunnel, record(Message.DATA, 1, 1, payload=b"late"))
        self.assertEqual(transport.value(), b"early late")
        protocol.dataReceived(b"answer")
        [(header, payload)] = tunnel.data
        self.assertEqual(payload, b"answer")
        sent = Message.FromString(header)
        self.assertEqual(
            (sent.type, sent.streamId, sent.serviceId, sent.connectionId),
            (Message.DATA, 1, "SSH", 1),
        )

    def test_reset_closes_relay(self) -> None:
        """
        STREAM_RESET closes the application connection; the channel's relay
        is forgotten, so later records for the old stream reach nothing.
        """
        tunnel = self.open("SSH")
        self.records(tunnel, record(Message.STREAM_START, 1, 1))
        protocol, transport = self.connect_app()
        self.records(tunnel, record(Message.STREAM_RESET, 1))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.connector._relays, {})
        self.records(tunnel, record(Message.DATA, 1, 1, payload=b"stale"))
        self.assertEqual(transport.value(), b"")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(tunnel.kinds(), [])

    def test_application_closes(self) -> None:
        """
        The application closing its connection resets it in the tunnel and
        forgets the relay.
        """
        tunnel = self.open("SSH")
        self.records(tunnel, record(Message.STREAM_START, 1, 1))
        protocol, _ = self.connect_app()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(tunnel.kinds(), [("CONNECTION_RESET", 1, 1)])
        self.assertEqual(self.connector._relays, {})

    def test_application_unreachable(self) -> None:
        """
        An application that cannot be reached (no retries configured) resets
        the stream and leaves no relay behind.
        """
        tunnel = self.open("SSH")
        self.records(tunnel, record(Message.STREAM_START, 1, 1))
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(tunnel.kinds(), [("CONNECTION_RESET", 1, 1)])
        self.assertEqual(self.connector._relays, {})

    def test_disconnect_closes_every_relay(self) -> None:
        """
        Losing the tunnel connection closes every local connection.
        """
        tunnel = self.open("SSH")
        self.records(tunnel, record(Message.STREAM_START, 1, 1))
        _, transport = self.connect_app()
        self.close(tunnel, CloseOutcome(opened=True, code=1001, reason="going away"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.connector._relays, {})
        self.assertIsNone(self.connector.protocol)

    def test_service_mismatch(self) -> None:
        """
        Services the map cannot serve end the proxy with status 1.
        """
        tunnel = self.open("OTHER")
        self.assertEqual(tunnel.aborted, 1)
        self.assertEqual(self.listener.finished_with, [EXIT_CONFIG])
        self.assertTrue(self.connector.ending)


class SourceTests(ConnectorTestBase):
    """
    A source listens once the services are known and carries each accepted
    client through a relay.
    """

    def setUp(self) -> None:
        self.build(config("source"))

    def accept(self) -> Any:
        """A client connects to the SSH port; the relay, or L{None}."""
        [(port, factory, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (5555, "localhost"))
        return factory.buildProtocol(CLIENT)

    def test_ready_after_listening(self) -> None:
        """
        The connection is ready once the ports listen.
        """
        tunnel = self.open()
        self.assertEqual(self.reactor.tcpServers, [])
        self.records(tunnel, service_ids("SSH"))
        self.successResultOf(tunnel.ready)
        self.assertEqual(len(self.reactor.tcpServers), 1)

    def test_refused_while_disconnected(self) -> None:
        """
        A client that comes while no tunnel connection is up is refused.
        """
        tunnel = self.open("SSH")
        self.close(tunnel, CloseOutcome(opened=True, code=1001, reason="going away"))
        with capturedLogs() as events:
            self.assertIsNone(self.accept())
        self.assertIn(
            "Refusing a client of service 'SSH': the tunnel is not connected",
            [formatEvent(e) for e in events],
        )

    def test_relay_both_ways(self) -> None:
        """
        An accepted client starts a stream; its bytes go out with the
        channel's header, DATA for the stream comes back to it, and its
        leaving resets the stream.
        """
        tunnel = self.open("SSH")
        relay = self.accept()
        self.assertEqual(tunnel.kinds(), [("STREAM_START", 1, 1)])
        transport = StringTransport()
        relay.makeConnection(transport)
        relay.dataReceived(b"hello")
        self.assertEqual([payload for _, payload in tunnel.data], [b"hello"])
        self.assertEqual(tunnel.data[0][0], relay.channel.header)
        self.records(tunnel, record(Message.DATA, 1, 1, payload=b"world"))
        self.assertEqual(transport.value(), b"world")
        relay.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(tunnel.kinds()[-1], ("CONNECTION_RESET", 1, 1))
        self.assertEqual(self.connector._relays, {})

    def test_cannot_listen(self) -> None:
        """
        A port that cannot be listened on ends the proxy with status 1.
        """
        self.build(config("source"), RefusingReactor())
        tunnel = self.open("SSH")
        self.assertNoResult(tunnel.ready)
        self.assertEqual(tunnel.aborted, 1)
        self.assertEqual(self.listener.finished_with, [EXIT_CONFIG])

    def test_shutdown(self) -> None:
        """
        Stopping resets every stream, closes the WebSocket with 1000, stops
        listening and refuses clients; the loss that follows is not judged;
        the result fires once the WebSocket is gone.
        """
        tunnel = self.open("SSH")
        relay = self.accept()
        transport = StringTransport()
        relay.makeConnection(transport)
        gone = self.connector.shutdown()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(tunnel.closed, [(1000, "local proxy stopping")])
        self.assertIsNone(self.accept())
        self.assertNoResult(gone)
        self.close(tunnel, CloseOutcome(opened=True, code=1000, by_us=True))
        self.successResultOf(gone)
        self.assertEqual(
            (self.listener.finished_with, self.listener.lost, self.listener.failed),
            ([], [], []),
        )

    def test_shutdown_without_connection(self) -> None:
        """
        Stopping with no tunnel connection is done at once.
        """
        self.successResultOf(self.connector.shutdown())
        self.assertTrue(self.connector.ending)


class OutcomeTests(ConnectorTestBase):
    """
    How a tunnel connection ended decides what the connector tells its
    listener.
    """

    def setUp(self) -> None:
        self.build(config())

    def warnings(self, events: list[Any]) -> list[str]:
        return [formatEvent(e) for e in events
                if e.get("log_level", LogLevel.info) >= LogLevel.warn]

    def failures(self, tunnel: FakeTunnel) -> list[Failure]:
        """How C{tunnel.ready} fails, as C{ClientService}'s C{prepareConnection} sees it."""
        failures: list[Failure] = []
        tunnel.ready.addErrback(failures.append)
        return failures

    def test_rejected(self) -> None:
        """
        A 4xx answer to the handshake ends the proxy with status 2; the
        attempt fails C{ready} with the reason.
        """
        tunnel = FakeTunnel()
        failures = self.failures(tunnel)
        with capturedLogs() as events:
            self.close(tunnel, CloseOutcome(opened=False, http_status=401))
        self.assertEqual(self.listener.finished_with, [EXIT_REJECTED])
        self.assertEqual(self.listener.failed, [])
        [failure] = failures
        self.assertIsInstance(failure.value, TunnelConnectionFailed)
        self.assertEqual(str(failure.value), "HTTP status 401")
        [line] = self.warnings(events)
        self.assertIn("refused the connection", line)

    def test_closed_by_service(self) -> None:
        """
        Close 1000 from the service ends the proxy with status 0.
        """
        tunnel = self.open("SSH")
        self.close(tunnel, CloseOutcome(opened=True, code=1000, reason="tunnel closed"))
        self.assertEqual(self.listener.finished_with, [EXIT_CLOSED])

    def test_lost(self) -> None:
        """
        A usable connection lost is reported with its reason; the warning
        follows only when a reconnection does.
        """
        tunnel = self.open("SSH")
        with capturedLogs() as events:
            self.close(tunnel, CloseOutcome(opened=True, code=1001, reason="going away"))
        self.assertEqual(self.listener.lost, ["close code 1001: going away"])
        self.assertEqual(self.listener.finished_with, [])
        [line] = self.warnings(events)
        self.assertTrue(line.startswith("Lost the tunnel connection (close code 1001"), line)

        self.listener.retry = False
        tunnel = self.open("SSH")
        with capturedLogs() as events:
            self.close(tunnel, CloseOutcome(opened=True, dead=True))
        self.assertEqual(self.listener.lost[-1], "no pong in two ping periods")
        self.assertEqual(self.warnings(events), [])

    def test_attempt_failed(self) -> None:
        """
        A connection that ends before it is usable is a failed attempt.
        """
        tunnel = FakeTunnel()
        failures = self.failures(tunnel)
        with capturedLogs() as events:
            self.close(tunnel, CloseOutcome(opened=False, reason="connection lost"))
        self.assertEqual(self.listener.failed, ["connection lost"])
        self.assertEqual([f.type for f in failures], [TunnelConnectionFailed])
        [line] = self.warnings(events)
        self.assertIn("Could not connect to the tunneling service (connection lost)", line)

    def test_protocol_error_reconnects(self) -> None:
        """
        A broken record aborts the connection (a reconnection follows).
        """
        tunnel = self.open("SSH")
        self.records(tunnel, Message(type=Message.UNKNOWN))
        self.assertEqual(tunnel.aborted, 1)
        self.assertEqual(self.listener.finished_with, [])

    def test_protocol_error_final(self) -> None:
        """
        With C{reconnect_on_data_error} false, a broken record ends the
        proxy with status 3, and the loss that follows is not judged.
        """
        self.build(config(reconnect_on_data_error=False))
        tunnel = self.open("SSH")
        self.records(tunnel, Message(type=Message.UNKNOWN))
        self.assertEqual(tunnel.aborted, 1)
        self.assertEqual(self.listener.finished_with, [EXIT_GAVE_UP])
        self.close(tunnel, CloseOutcome(opened=True, by_us=True))
        self.assertEqual((self.listener.lost, self.listener.failed), ([], []))
