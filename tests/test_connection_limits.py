"""
Tests for the tunnel service's connection limits: per client address and
in all, refused before anything is read, released on disconnect, logged at
most once per interval; on StringTransports and a MemoryReactorClock, then
on loopback sockets.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpxy.tunnelservice.admission import Admission
from lpxy.tunnelservice.http import HEADER_DEADLINE
from lpxy.tunnelservice.service import REFUSAL_LOG_INTERVAL, Connections, TunnelService
from tests.support.logs import LogRecorder
from tests.support.tunnelservice import ListeningEndpoint

REQUEST = (
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"X-Amz-Target: IoTSecuredTunneling.ListTunnels\r\n\r\n{}"
)


class LimitTests(SynchronousTestCase):
    """The limits on a service's port, driven without sockets."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.service = TunnelService(
            self.reactor, [], max_connections=3, max_connections_per_address=2
        )
        self.logs = LogRecorder(self)  # type: ignore[arg-type]
        self.channels: list[Any] = []
        self.addCleanup(self.disconnect_all)

    def connect(self, host: str) -> tuple[Any, StringTransport]:
        address = IPv4Address("TCP", host, 40000 + len(self.channels))
        channel = self.service.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        self.channels.append((channel, transport))
        return channel, transport

    def disconnect(self, channel: Any) -> None:
        channel.connectionLost(Failure(ConnectionDone()))

    def disconnect_all(self) -> None:
        for channel, _ in self.channels:
            if channel in set(self.service.connections):
                self.disconnect(channel)

    def assertRefused(self, channel: Any, transport: StringTransport) -> None:
        self.assertTrue(transport.disconnecting)
        self.assertNotIn(channel, set(self.service.connections))
        channel.dataReceived(REQUEST)  # what a socket closed at once can no longer send
        self.assertEqual(transport.value(), b"")

    def assertAccepted(self, channel: Any, transport: StringTransport) -> None:
        self.assertFalse(transport.disconnecting)
        self.assertIn(channel, set(self.service.connections))
        channel.dataReceived(REQUEST)
        self.assertIn(b"200 OK", transport.value())

    def refusal_lines(self) -> list[str]:
        return self.logs.texts("Refused")

    def test_per_address(self) -> None:
        """The third connection from one address is refused, others accepted."""
        first = self.connect("10.0.0.1")
        second = self.connect("10.0.0.1")
        third = self.connect("10.0.0.1")
        other = self.connect("10.0.0.2")
        self.assertRefused(*third)
        for accepted in (first, second, other):
            self.assertAccepted(*accepted)
        self.assertEqual(self.service.admission.count("10.0.0.1"), 2)

    def test_total(self) -> None:
        accepted = [self.connect(f"10.0.0.{n}") for n in range(3)]
        self.assertRefused(*self.connect("10.0.0.9"))
        for connection in accepted:
            self.assertAccepted(*connection)

    def test_released_on_disconnect(self) -> None:
        (first, _), _ = self.connect("10.0.0.1"), self.connect("10.0.0.1")
        self.assertRefused(*self.connect("10.0.0.1"))
        self.disconnect(first)
        self.assertEqual(self.service.admission.count("10.0.0.1"), 1)
        self.assertAccepted(*self.connect("10.0.0.1"))

    def test_refused_connection_lost(self) -> None:
        """A refused connection's end releases nothing it did not hold."""
        self.connect("10.0.0.1")
        self.connect("10.0.0.1")
        refused, _ = self.connect("10.0.0.1")
        self.disconnect(refused)
        self.assertEqual(self.service.admission.count("10.0.0.1"), 2)

    def test_logged_once_per_interval(self) -> None:
        self.connect("10.0.0.1")
        self.connect("10.0.0.1")
        for _ in range(5):
            self.connect("10.0.0.1")
        lines = self.refusal_lines()
        self.assertEqual(len(lines), 1)
        self.assertIn("Refused 1 connection(s)", lines[0])
        self.assertIn("2 connections open from 10.0.0.1", lines[0])
        self.reactor.advance(REFUSAL_LOG_INTERVAL)
        self.assertEqual(len(self.refusal_lines()), 2)
        self.assertIn("Refused 4 connection(s)", self.refusal_lines()[1])
        self.reactor.advance(REFUSAL_LOG_INTERVAL * 3)
        self.assertEqual(len(self.refusal_lines()), 2)

    def test_silent_connection_deadline(self) -> None:
        """A connection that sends nothing is closed the header deadline after its accept."""
        _, transport = self.connect("10.0.0.1")
        self.reactor.advance(HEADER_DEADLINE - 0.5)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.5)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408"))
        self.assertTrue(transport.disconnecting)


class HandoverTests(SynchronousTestCase):
    """The count follows a connection from its HTTP channel to its WebSocket."""

    def test_released_by_last_holder(self) -> None:
        admission = Admission(max_connections=5, max_per_address=5)
        connections = Connections(admission)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1))
        channel, websocket = Holder(transport), Holder(transport)
        self.assertTrue(connections.admit(transport))
        connections.add(channel)
        connections.add(websocket)
        channel.transport = None  # taken over by the WebSocket
        connections.discard(channel)
        self.assertEqual(admission.count("10.0.0.1"), 1)
        connections.discard(websocket)
        self.assertEqual(admission.count("10.0.0.1"), 0)


class Holder:
    """A connection as L{Connections} sees one."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport


def open_sockets(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def refused(port: int) -> bool:
    """
    Whether the service closes a new connection (reset, or end of stream)
    before it answers a request.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(REQUEST)
            return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def ask(s: socket.socket) -> bytes:
    s.sendall(REQUEST)
    return s.recv(65536)


class LoopbackTests(TestCase):
    """The per-address limit on a real loopback port."""

    async def test_per_address(self) -> None:
        endpoint = ListeningEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
        service = TunnelService(reactor, [endpoint], max_connections_per_address=2)
        service.startService()
        self.addCleanup(service.stopService)
        port = (await endpoint.listening).getHost().port
        sockets = await deferToThread(open_sockets, port, 2)
        self.addCleanup(lambda: [s.close() for s in sockets])
        for s in sockets:
            self.assertIn(b"200 OK", await deferToThread(ask, s))
        self.assertTrue(await deferToThread(refused, port))
        for s in sockets:
            self.assertIn(b"200 OK", await deferToThread(ask, s))

        released: Deferred[None] = Deferred()
        release = service.admission.release

        def release_and_tell(key: Any) -> None:
            release(key)
            if not released.called:
                released.callback(None)
        self.patch(service.admission, "release", release_and_tell)
        sockets[0].close()
        await released
        self.assertEqual(service.admission.count("127.0.0.1"), 1)
        (again,) = await deferToThread(open_sockets, port, 1)
        sockets.append(again)
        self.assertIn(b"200 OK", await deferToThread(ask, again))
