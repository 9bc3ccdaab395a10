"""
Tests for the tunnel service's flow control (L{lpxy.tunnelservice.websocket}),
on C{StringTransport}s whose producer state shows when the service reads a
peer: a peer whose buffer is full holds its partner's reading, and, once
the service's own answers to it pile up past the mark, its own.
"""

from __future__ import annotations

import gc
import socket
import weakref

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpxy.frames import Message, encode
from lpxy.tunnelservice.broker import Broker
from lpxy.tunnelservice.dataplane import TunnelServerFactory
from lpxy.tunnelservice.flow import OWN_OUTPUT, PARTNER_BEHIND
from lpxy.tunnelservice.service import Connections
from lpxy.tunnelservice.store import DESTINATION, SOURCE
from lpxy.tunnelservice.websocket import TunnelServerProtocol
from tests.support.sockets import buffered, tcp_socket
from tests.support.tunnelservice import start_tunnelservice
from tests.support.wsframes import (
    BINARY,
    PING,
    WebSocketTransport,
    client_frame,
    read_frames,
)

V3 = "aws.iot.securetunneling-3.0"
MARK = 4096


class BufferingTransport(WebSocketTransport):
    """
    Tells its producer to pause on every write while L{fill} says its
    buffer is past the high-water mark, as Twisted's socket transports do,
    until L{drain}.
    """

    full = False

    def fill(self) -> None:
        self.full = True
        self.producer.pauseProducing()

    def drain(self) -> None:
        self.full = False
        self.producer.resumeProducing()

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.full and self.producer is not None:
            self.producer.pauseProducing()


def upgrade(mode: str, token: str) -> bytes:
    return (
        f"GET /tunnel?local-proxy-mode={mode} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {V3}\r\n"
        f"access-token: {token}\r\n\r\n"
    ).encode()


def start(stream: int) -> bytes:
    return encode(Message(type=Message.STREAM_START, streamId=stream, serviceId="SSH"))


class OutputBoundTests(SynchronousTestCase):
    """
    Each peer's transport has the service's output watch as its producer:
    Twisted pausing it (the buffer passed the high-water mark) stops the
    partner's reading, and more than the mark written afterwards stops the
    peer's own; both resume when the buffer drains.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.broker = Broker(self.reactor)
        self.factory = TunnelServerFactory(
            self.broker, Connections(), reactor=self.reactor, clock=self.reactor,
            output_mark=MARK,
        )
        self.tunnel = self.broker.open_tunnel(services=["SSH"], lifetime_minutes=60)

    def connect(self, mode: str) -> tuple[TunnelServerProtocol, BufferingTransport]:
        token = self.tunnel.source_token if mode == SOURCE else self.tunnel.destination_token
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = BufferingTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(upgrade(mode, token))
        self.assertEqual(protocol.state, protocol.STATE_OPEN)
        self.assertIs(transport.producer, protocol._output)
        self.addCleanup(protocol.connectionLost)
        transport.clear()
        return protocol, transport

    def test_pings_unread(self) -> None:
        """
        A peer that pings and reads no pong is read until the pongs
        written after its buffer filled pass the mark; once it drains, it
        is read again.
        """
        peer, transport = self.connect(SOURCE)
        ping = client_frame(PING, b"x" * 100)
        for _ in range(100):
            peer.dataReceived(ping)
        self.assertEqual(transport.producerState, "producing")
        transport.fill()
        for _ in range(MARK // 102):
            peer.dataReceived(ping)
        self.assertEqual(transport.producerState, "producing")
        for _ in range(2):
            peer.dataReceived(ping)
        self.assertEqual(transport.producerState, "paused")
        self.assertTrue(peer._pausers)
        transport.drain()
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse(peer._pausers)

    def test_starts_without_partner_unread(self) -> None:
        """The resets answering starts with no partner count against the same mark."""
        peer, transport = self.connect(SOURCE)
        transport.fill()
        sent = 0
        while transport.producerState == "producing":
            peer.dataReceived(client_frame(BINARY, start(sent + 1) * 50))
            sent += 1
            self.assertLess(sent, 1000, "never stopped reading")
        resets = b"".join(p for _, p in read_frames(transport.value()))
        self.assertGreater(len(resets), MARK)
        self.assertLess(len(resets), MARK + len(start(1)) * 60)

    def test_partner_held_by_full_buffer(self) -> None:
        """A full buffer stops the partner's reading; a drained one resumes it."""
        _, source_transport = self.connect(SOURCE)
        _, destination_transport = self.connect(DESTINATION)
        destination_transport.fill()
        self.assertEqual(source_transport.producerState, "paused")
        self.assertEqual(destination_transport.producerState, "producing")
        destination_transport.drain()
        self.assertEqual(source_transport.producerState, "producing")

    def test_relayed_data_never_holds_the_reader(self) -> None:
        """
        Relayed records up to the mark written after the buffer filled (what
        the partner's last read brings) stop the partner, not the peer.
        """
        source, source_transport = self.connect(SOURCE)
        _, destination_transport = self.connect(DESTINATION)
        destination_transport.fill()
        record = encode(Message(type=Message.DATA, streamId=1, serviceId="SSH",
                                payload=b"d" * 1000))
        source.dataReceived(client_frame(BINARY, start(1) + record * 3))
        self.assertEqual(destination_transport.producerState, "producing")
        self.assertEqual(source_transport.producerState, "paused")

    def test_partner_joining_a_full_buffer(self) -> None:
        """A peer paired with one whose buffer is full is not read; parted, it is again."""
        destination, destination_transport = self.connect(DESTINATION)
        destination_transport.fill()
        _, source_transport = self.connect(SOURCE)
        self.assertEqual(source_transport.producerState, "paused")
        destination.dropConnection(abort=True)
        destination.connectionLost()
        self.assertEqual(source_transport.producerState, "producing")

    def test_closing_unregisters(self) -> None:
        """
        Closing lets go of the producer first: a transport with a paused
        producer would wait for it and never close.
        """
        peer, transport = self.connect(SOURCE)
        transport.fill()
        peer.dropConnection(abort=False)
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)


class ClosingHandshakeTimerTests(SynchronousTestCase):
    """
    Autobahn's closing-handshake timeout runs on the service's clock, not
    on the global reactor (where txaio would put it): a test's clock
    decides when it fires, and none is left behind in the reactor.
    """

    def test_on_the_service_clock(self) -> None:
        clock = MemoryReactorClock()
        self.closed_on(
            clock, TunnelServerFactory(Broker(clock), Connections(), reactor=clock, clock=clock)
        )

    def test_on_the_service_reactor(self) -> None:
        """Without a clock of its own, the service's reactor is its clock."""
        clock = MemoryReactorClock()
        self.closed_on(clock, TunnelServerFactory(Broker(clock), Connections(), reactor=clock))

    def closed_on(self, clock: MemoryReactorClock, factory: TunnelServerFactory) -> None:
        broker = factory.broker
        tunnel = broker.open_tunnel(services=["SSH"], lifetime_minutes=60)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = BufferingTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(upgrade(SOURCE, tunnel.source_token))
        self.addCleanup(protocol.connectionLost)
        in_reactor = set(reactor.getDelayedCalls())
        broker.close_tunnel(tunnel.tunnel_id)
        self.assertEqual(protocol.state, protocol.STATE_CLOSING)
        self.assertEqual(set(reactor.getDelayedCalls()), in_reactor)
        clock.advance(protocol.closeHandshakeTimeout - 0.01)
        self.assertFalse(transport.disconnecting)
        # The peer never answered the close: dropped on the clock's time.
        clock.advance(0.01)
        self.assertTrue(transport.disconnecting)


class PingFlood(Protocol):
    """
    Upgrades, then never reads again and sends C{total} bytes of pings as
    fast as its transport takes them.
    """

    def __init__(self, request: bytes, total: int) -> None:
        self._request = request
        self._left = total
        self._paused = False
        self.opened: defer.Deferred[None] = defer.Deferred()
        self.sent_all: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if not self.opened.called:
            self.assert_switched(data)
            self.transport.pauseProducing()  # reads nothing from now on
            self.transport.registerProducer(self, True)
            self.opened.callback(None)
            self.resumeProducing()

    def assert_switched(self, data: bytes) -> None:
        if not data.startswith(b"HTTP/1.1 101"):
            raise AssertionError(data[:200])

    def resumeProducing(self) -> None:
        self._paused = False
        chunk = client_frame(PING, b"p" * 125) * 500
        while not self._paused and self._left > 0:
            self._left -= len(chunk)
            self.transport.write(chunk)
        if self._left <= 0 and not self.sent_all.called:
            self.sent_all.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class WatchedServerProtocol(TunnelServerProtocol):
    """
    The service's side of a connection, telling a test when it stops
    reading for its own output, when it has read C{total} bytes, and when
    its connection is gone.
    """

    total = 0

    def connectionMade(self) -> None:
        self.held: defer.Deferred[None] = defer.Deferred()
        self.read_all: defer.Deferred[None] = defer.Deferred()
        self.gone: defer.Deferred[None] = defer.Deferred()
        self.received = 0
        super().connectionMade()

    def pause_reading(self, reason: str = PARTNER_BEHIND) -> None:
        super().pause_reading(reason)
        if reason == OWN_OUTPUT and not self.held.called:
            self.held.callback(None)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.received += len(data)
        if self.received >= self.total and not self.read_all.called:
            self.read_all.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.gone.callback(None)


class OutputBoundLoopbackTests(TestCase):
    """A peer that pings and never reads on a real socket: the service's buffer stays bounded."""

    async def test_ping_flood(self) -> None:
        fixture = await start_tunnelservice(self)
        total = 8 * 1024 * 1024
        protocol = type("Watched", (WatchedServerProtocol,), {"total": total})
        fixture.service.websocket_factory.protocol = protocol
        opened = fixture.open_tunnel(["SSH"])
        flood = PingFlood(upgrade(SOURCE, opened.source_token), total)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", fixture.port)
        await endpoint.connect(Factory.forProtocol(lambda: flood))
        await flood.opened
        server = fixture.server_side(opened.tunnel_id, SOURCE)
        assert isinstance(server, WatchedServerProtocol)
        # Small kernel buffers, so that what piles up does so in the service.
        tcp_socket(flood.transport).setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        tcp_socket(server.transport).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        # Unbounded, the service would read every ping and buffer a pong for each.
        await defer.DeferredList([server.held, server.read_all], fireOnOneCallback=True)
        self.assertTrue(server.held.called, "the service read every ping")
        self.assertLess(buffered(server.transport), 1024 * 1024)
        # Leaving, the peer takes what was buffered for it with it.
        gone = server.gone
        transport = weakref.ref(server.transport)
        del server
        flood.transport.abortConnection()
        await flood.lost
        await gone
        await deferLater(reactor, 0, lambda: None)  # the reactor lets go of it
        gc.collect()
        self.assertIsNone(transport(), "the connection's buffer outlived it")
        self.assertFalse(fixture.broker.describe(opened.tunnel_id).source.connected)
