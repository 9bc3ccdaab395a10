"""
Tests for L{lpxy.writethrough}: the write-through TCP transports, on a fake
socket (what the kernel takes is scripted) and on a real socket pair, each
driven by hand as the reactor would drive it; the reactor wrapper on
loopback; and where the proxies and the service use it.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpxy.proxy.addresses import TcpTarget, TunnelEndpoint
from lpxy.proxy.channel import ServiceBinding
from lpxy.proxy.config import ProxyConfig
from lpxy.proxy.destination import AppConnector
from lpxy.proxy.endpoints import tunnel_client_endpoint
from lpxy.proxy.source import SourceListeners
from lpxy.tunnelservice.service import TunnelService
from lpxy.writethrough import (
    WriteThroughClient,
    WriteThroughPort,
    WriteThroughServer,
    write_through,
)
from tests.support.apps import AppFactory, ClientFactory, start_app
from tests.support.certs import make_test_pki


class FakeSocket:
    """
    A socket whose kernel takes C{room} more bytes (L{None}: any number),
    then answers C{EAGAIN}; C{error}, when set, is raised by every send.
    """

    def __init__(self) -> None:
        self.room: int | None = None
        self.error: OSError | None = None
        self.received = b""
        self.sends = 0
        self.shut: list[int] = []
        self.closed = False

    def setblocking(self, flag: bool) -> None:
        pass

    def fileno(self) -> int:
        return 42

    def send(self, data: Any) -> int:
        self.sends += 1
        if self.error is not None:
            raise self.error
        if self.room == 0:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        taken = len(data) if self.room is None else min(self.room, len(data))
        if self.room is not None:
            self.room -= taken
        self.received += bytes(data[:taken])
        return taken

    def shutdown(self, how: int) -> None:
        self.shut.append(how)

    def setsockopt(self, *args: object) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Recorder(Protocol):
    """Records how its connection ended."""

    lost: Failure | None = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class StreamingProducer:
    """Counts pauses and resumes."""

    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


def connection(skt: Any) -> tuple[WriteThroughServer, Recorder, MemoryReactorClock]:
    """A write-through transport on C{skt}, with a reactor that only records."""
    clock = MemoryReactorClock()
    protocol = Recorder()
    transport = WriteThroughServer(skt, protocol, ("127.0.0.1", 1234), None, 1, clock)  # type: ignore[arg-type]
    protocol.makeConnection(transport)
    return transport, protocol, clock


def reactor_turn(transport: WriteThroughServer) -> None:
    """What the reactor does when the socket is writable."""
    result = transport.doWrite()
    if result is not None:
        transport.connectionLost(Failure(result))


def buffered(transport: WriteThroughServer) -> int:
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class FakeSocketTests(SynchronousTestCase):
    """Writes on a fake socket."""

    def setUp(self) -> None:
        self.socket = FakeSocket()
        self.transport, self.protocol, self.reactor = connection(self.socket)

    def writing(self) -> bool:
        return self.transport in self.reactor.getWriters()

    def test_immediate(self) -> None:
        """A write with nothing buffered is sent at once; nothing waits for the reactor."""
        self.transport.write(b"hello")
        self.assertEqual(self.socket.received, b"hello")
        self.assertFalse(self.writing())
        self.assertEqual(buffered(self.transport), 0)

    def test_partial(self) -> None:
        """What the kernel did not take is buffered and sent, in order, when writable."""
        self.socket.room = 2
        self.transport.write(b"abcdef")
        self.assertEqual(self.socket.received, b"ab")
        self.assertTrue(self.writing())
        self.assertEqual(buffered(self.transport), 4)
        self.socket.room = None
        reactor_turn(self.transport)
        self.assertEqual(self.socket.received, b"abcdef")
        self.assertFalse(self.writing())

    def test_eagain(self) -> None:
        """A kernel buffer with no room: the whole write is buffered."""
        self.socket.room = 0
        self.transport.write(b"abc")
        self.assertEqual(self.socket.received, b"")
        self.assertTrue(self.writing())
        self.socket.room = None
        reactor_turn(self.transport)
        self.assertEqual(self.socket.received, b"abc")
        self.assertIsNone(self.protocol.lost)

    def test_error(self) -> None:
        """
        A send that fails leaves its data to the buffered path: the
        connection is not lost inside C{write}, but on the reactor's next
        send, which fails too.
        """
        self.socket.error = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        self.transport.write(b"abc")
        self.assertIsNone(self.protocol.lost)
        self.assertTrue(self.writing())
        self.socket.error = BrokenPipeError(errno.EPIPE, "Broken pipe")
        reactor_turn(self.transport)
        assert self.protocol.lost is not None
        self.protocol.lost.trap(ConnectionLost)
        self.assertTrue(self.socket.closed)

    def test_after_buffered(self) -> None:
        """A write behind buffered bytes joins the buffer: no send overtakes them."""
        self.socket.room = 0
        self.transport.write(b"one")
        self.socket.room = None
        sends = self.socket.sends
        self.transport.write(b"two")
        self.transport.writeSequence([b"three", b"four"])
        self.assertEqual(self.socket.sends, sends)
        reactor_turn(self.transport)
        self.assertEqual(self.socket.received, b"onetwothreefour")
        self.transport.write(b"five")
        self.assertEqual(self.socket.received, b"onetwothreefourfive")

    def test_write_sequence(self) -> None:
        """C{writeSequence} with nothing buffered is one send of the joined chunks."""
        self.transport.writeSequence([b"a", b"bc", b"d"])
        self.assertEqual((self.socket.received, self.socket.sends), (b"abcd", 1))
        self.assertFalse(self.writing())

    def test_not_bytes(self) -> None:
        """Only bytes are accepted, as Twisted's transports accept only bytes."""
        self.assertRaises(TypeError, self.transport.write, "text")
        self.assertRaises(TypeError, self.transport.writeSequence, [b"a", "b"])
        self.assertEqual(self.socket.received, b"")

    def test_producer_paused(self) -> None:
        """A streaming producer is paused once the buffered rest passes C{bufferSize}."""
        producer = StreamingProducer()
        self.transport.bufferSize = 4
        self.transport.registerProducer(producer, True)
        self.socket.room = 2
        self.transport.write(b"1234567")
        self.assertEqual(producer.paused, 1)
        self.socket.room = None
        reactor_turn(self.transport)
        self.assertEqual((producer.paused, producer.resumed), (1, 1))
        self.assertEqual(self.socket.received, b"1234567")

    def test_producer_not_paused(self) -> None:
        """A write larger than C{bufferSize} that the kernel takes whole pauses nothing."""
        producer = StreamingProducer()
        self.transport.bufferSize = 4
        self.transport.registerProducer(producer, True)
        self.transport.write(b"1234567")
        self.assertEqual(producer.paused, 0)
        self.socket.room = 3
        self.transport.write(b"abcd")
        self.assertEqual(producer.paused, 0, "the buffered rest is under bufferSize")

    def test_pull_producer(self) -> None:
        """
        With a pull producer every write is buffered: the drained buffer
        is what asks the producer for more.
        """
        transport = self.transport

        class Pull:
            asked = 0

            def resumeProducing(self) -> None:
                self.asked += 1
                transport.write(b"x")

            def stopProducing(self) -> None:
                pass

        pull = Pull()
        transport.registerProducer(pull, False)
        self.assertEqual((pull.asked, self.socket.received), (1, b""))
        reactor_turn(transport)
        self.assertEqual((pull.asked, self.socket.received), (2, b"x"))

    def test_lose_connection_after_write(self) -> None:
        """
        C{loseConnection} after an immediate write closes on the reactor's
        next turn; what is written meanwhile goes out before the end.
        """
        self.transport.write(b"bye")
        self.transport.loseConnection()
        self.transport.write(b" now")
        self.assertEqual(self.socket.received, b"bye")
        self.assertTrue(self.writing())
        reactor_turn(self.transport)
        self.assertEqual(self.socket.received, b"bye now")
        assert self.protocol.lost is not None
        self.protocol.lost.trap(ConnectionDone)
        self.assertTrue(self.socket.closed)

    def test_lose_write_connection(self) -> None:
        """A write after C{loseWriteConnection} is sent before the write side shuts."""
        self.transport.loseWriteConnection()
        self.transport.write(b"last")
        self.assertEqual(self.socket.received, b"")
        reactor_turn(self.transport)
        self.assertEqual((self.socket.received, self.socket.shut), (b"last", [1]))

    def test_aborted(self) -> None:
        """After C{abortConnection} nothing more is sent."""
        self.transport.abortConnection()
        self.transport.write(b"late")
        self.reactor.advance(0)
        self.assertEqual(self.socket.received, b"")
        assert self.protocol.lost is not None


class SocketPairTests(SynchronousTestCase):
    """Writes on a real non-blocking socket pair."""

    def setUp(self) -> None:
        ours, self.peer = socket.socketpair()
        self.addCleanup(self.peer.close)
        self.addCleanup(ours.close)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.peer.setblocking(False)
        self.transport, self.protocol, self.reactor = connection(ours)

    def read(self) -> bytes:
        got = b""
        while True:
            try:
                chunk = self.peer.recv(65536)
            except BlockingIOError:
                return got
            if not chunk:
                return got
            got += chunk

    def test_immediate(self) -> None:
        """The peer can read a write at once, before any reactor turn."""
        self.transport.write(b"ping")
        self.assertEqual(self.read(), b"ping")
        self.assertNotIn(self.transport, self.reactor.getWriters())

    def test_more_than_the_kernel_takes(self) -> None:
        """What the kernel cannot take waits for the reactor, and arrives whole and in order."""
        blob = bytes(range(256)) * 4096
        self.transport.write(blob)
        self.transport.write(b"end")
        self.assertIn(self.transport, self.reactor.getWriters())
        got = b""
        while self.transport in self.reactor.getWriters():
            got += self.read()
            reactor_turn(self.transport)
        got += self.read()
        self.assertEqual(got, blob + b"end")

    def test_lose_connection_after_write(self) -> None:
        """The peer reads the write, then the end."""
        self.transport.write(b"bye")
        self.transport.loseConnection()
        reactor_turn(self.transport)
        self.assertEqual(self.read(), b"bye")
        self.assertEqual(self.peer.recv(10), b"", "the end follows")


class ReactorTests(SynchronousTestCase):
    """What L{write_through} gives."""

    def test_other_reactors(self) -> None:
        """A reactor other than a POSIX one (a test's memory reactor) is given back."""
        memory = MemoryReactorClock()
        self.assertIs(write_through(memory), memory)

    def test_wrapped_once(self) -> None:
        wrapped = write_through(reactor)
        self.assertIs(write_through(wrapped), wrapped)

    def test_provides(self) -> None:
        """The wrapper provides what the reactor provides, and forwards the rest."""
        wrapped = write_through(reactor)
        self.assertTrue(IReactorTCP.providedBy(wrapped))
        self.assertTrue(IReactorTime.providedBy(wrapped))
        self.assertEqual(wrapped.callLater, reactor.callLater)  # type: ignore[attr-defined]


class LoopbackTests(TestCase):
    """The wrapper's ports and connections on loopback."""

    async def echo(self, server: Any, client: Any) -> tuple[Any, Any]:
        """
        Echo a message from a C{client(port)} endpoint through an
        application listening on the C{server} endpoint; the two
        connections' transports.
        """
        apps = AppFactory()
        port = await server.listen(apps)
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, WriteThroughPort)
        connected = await client(port.getHost().port).connect(ClientFactory(b"ping"))
        self.assertEqual(await connected.answer, b"ping")
        await connected.closed
        await apps.all_closed()
        return connected.transport, apps.accepted[0].transport

    async def test_tcp(self) -> None:
        """listenTCP and connectTCP make write-through transports that carry data."""
        wrapped = write_through(reactor)
        client, server = await self.echo(
            serverFromString(wrapped, "tcp:0:interface=127.0.0.1"),
            lambda port: TCP4ClientEndpoint(wrapped, "127.0.0.1", port),
        )
        self.assertIsInstance(client, WriteThroughClient)
        self.assertIsInstance(server, WriteThroughServer)

    async def test_tls(self) -> None:
        """Under TLS (listenSSL, wrapClientTLS) the TCP transports below write through."""
        directory = FilePath(self.mktemp())
        directory.makedirs()
        pki = make_test_pki(Path(directory.path))
        wrapped = write_through(reactor)
        trust = optionsForClientTLS("localhost", pki.ca_certificate())
        client, server = await self.echo(
            serverFromString(wrapped, pki.server_endpoint_string()),
            lambda port: wrapClientTLS(trust, TCP4ClientEndpoint(wrapped, "127.0.0.1", port)),
        )
        self.assertIsInstance(client.transport, WriteThroughClient)
        self.assertIsInstance(server.transport, WriteThroughServer)


class WhereUsedTests(TestCase):
    """
    The connections that carry a tunnel's data are write-through: the
    source's accepted clients, the destination's connections to its
    applications, the proxy's connection to the service and the service's
    accepted peers.
    """

    async def test_source_clients(self) -> None:
        made: Deferred[Protocol] = Deferred()

        class Accepted(Protocol):
            def connectionMade(self) -> None:
                made.callback(self)

        listeners = SourceListeners(reactor, "127.0.0.1", {"A": 0}, lambda b, a: Accepted())
        self.addCleanup(listeners.stop)
        ports = await listeners.start([ServiceBinding("A", "A")])
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", ports["A"]).connect(
            ClientFactory(b"")
        )
        accepted = await made
        self.assertIsInstance(accepted.transport, WriteThroughServer)
        assert accepted.transport is not None
        accepted.transport.loseConnection()
        await client.closed

    async def test_destination_connections(self) -> None:
        port, _ = await start_app(self)
        endpoint = AppConnector(reactor).endpoint_for(TcpTarget("127.0.0.1", port))
        client = await endpoint.connect(ClientFactory(b"ping"))
        self.assertIsInstance(client.transport, WriteThroughClient)
        self.assertEqual(await client.answer, b"ping")
        await client.closed

    async def test_proxy_to_service(self) -> None:
        port, _ = await start_app(self)
        config = ProxyConfig(
            mode="source",
            access_token="not-used",
            endpoint=TunnelEndpoint("127.0.0.1", port, False),
            source_ports={"": 5555},
        )
        client = await tunnel_client_endpoint(reactor, config).connect(ClientFactory(b"ping"))
        self.assertIsInstance(client.transport, WriteThroughClient)
        self.assertEqual(await client.answer, b"ping")
        await client.closed

    async def test_service_peers(self) -> None:
        service = TunnelService(reactor, ["tcp:0:interface=127.0.0.1"])
        with capturedLogs() as events:
            service.startService()
        self.addCleanup(service.stopService)
        [port] = [e["port"] for e in events if "listening on" in e.get("log_format", "")]
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            ClientFactory(b"GET /nothing HTTP/1.1\r\nHost: localhost\r\n\r\n")
        )
        await client.received(1)
        [channel] = list(service.connections)
        self.assertIsInstance(channel.transport, WriteThroughServer)
        assert client.transport is not None
        client.transport.loseConnection()
        await client.closed
