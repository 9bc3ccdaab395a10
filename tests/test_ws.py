"""
Tests for L{lpxy._ws}: the keepalive watch over a C{Clock}, Nagle, and
Autobahn's logger and timers.
"""

from __future__ import annotations

import txaio
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from lpxy._ws import (
    ANYTHING,
    PONGS,
    Keepalive,
    QuietHotPath,
    ReadingPauses,
    cancel_autobahn_timers,
    pause_if_unsent,
    quiet_autobahn_log,
    raise_buffer_size,
    set_no_delay,
    unsent_bytes,
)
from tests.support.recorders import EdgeRecorder


class Watch:
    """A L{Keepalive} on a C{Clock}, with what it sent and decided."""

    def __init__(self, life: str, interval: float, timeout: float) -> None:
        self.clock = Clock()
        self.pings: list[bytes] = []
        self.dead: list[float] = []
        self.keepalive = Keepalive(
            self.clock, interval=interval, timeout=timeout,
            send_ping=self.pings.append, on_dead=self.dead.append,
            life=life,  # type: ignore[arg-type]
        )

    def advance(self, seconds: float) -> list[bytes]:
        """Advance the clock; return the pings sent meanwhile."""
        sent = len(self.pings)
        self.clock.advance(seconds)
        return self.pings[sent:]


class PongsTests(SynchronousTestCase):
    """The proxy's watch: a ping every period, dead when one is unanswered for two."""

    def setUp(self) -> None:
        self.watch = Watch(PONGS, 20, 40)
        self.keepalive = self.watch.keepalive

    def tearDown(self) -> None:
        self.keepalive.stop()
        self.assertEqual(self.watch.clock.getDelayedCalls(), [])

    def test_pings_at_start_and_every_interval(self) -> None:
        self.watch.advance(1.5)
        self.keepalive.start()
        self.assertEqual(self.watch.pings, [b"1500"])
        self.assertEqual(self.watch.advance(20), [b"21500"])
        self.assertTrue(self.keepalive.running)

    def test_pings_whatever_arrives(self) -> None:
        self.keepalive.start()
        for _ in range(5):
            self.keepalive.heard()
            (ping,) = self.watch.advance(20)
            self.keepalive.pong(ping)
        self.assertEqual(len(self.watch.pings), 6)

    def test_dead_after_two_periods(self) -> None:
        self.keepalive.start()
        self.assertEqual(self.watch.advance(20), [b"20000"])
        self.assertEqual(self.watch.dead, [])
        self.assertEqual(self.watch.advance(20), [])
        self.assertEqual(self.watch.dead, [40])
        self.assertFalse(self.keepalive.running)
        self.assertEqual(self.watch.clock.getDelayedCalls(), [])

    def test_anything_else_is_no_answer(self) -> None:
        """Bytes and foreign pongs do not answer a ping."""
        self.keepalive.start()
        self.assertIsNone(self.keepalive.pong(b"12345"))
        self.watch.advance(20)
        self.keepalive.heard()
        self.watch.advance(20)
        self.assertEqual(self.watch.dead, [40])

    def test_pong_answers_its_ping_and_earlier_ones(self) -> None:
        self.keepalive.start()
        self.watch.advance(20)
        self.watch.advance(0.25)
        self.assertEqual(self.keepalive.pong(b"20000"), 0.25)
        # b"0" is answered too: no ping is owed now
        self.assertIsNone(self.keepalive.pong(b"0"))
        self.watch.advance(19.75)
        self.watch.advance(20)
        self.assertEqual(self.watch.dead, [])
        self.watch.advance(20)
        self.assertEqual(self.watch.dead, [40])  # the ping at 40, unanswered at 80

    def test_late_pong_keeps_alive(self) -> None:
        """A ping answered within two periods, even after the next ping, is enough."""
        self.keepalive.start()
        for ping in (b"0", b"20000", b"40000", b"60000"):
            self.watch.advance(20)
            self.assertEqual(self.keepalive.pong(ping), 20)
        self.assertEqual(self.watch.dead, [])
        self.assertEqual(len(self.watch.pings), 5)

    def test_paused_reading_is_not_dead(self) -> None:
        self.keepalive.start()
        self.keepalive.pause()
        self.assertEqual(self.watch.advance(200), [])
        self.assertEqual(self.watch.advance(20), [])
        self.keepalive.resume()
        self.assertEqual(self.watch.dead, [])
        self.assertEqual(self.watch.advance(20), [b"240000"])
        self.watch.advance(20)
        self.assertEqual(self.watch.dead, [])
        self.watch.advance(20)
        self.assertEqual(self.watch.dead, [40])

    def test_resume_forgets_pings(self) -> None:
        """A ping sent before reading paused is not held against the peer after."""
        self.keepalive.start()
        self.watch.advance(10)
        self.keepalive.pause()
        self.keepalive.resume()
        self.watch.advance(10)  # pings at 20, owed since 20
        self.watch.advance(20)
        self.assertEqual(self.watch.dead, [])
        self.assertIsNone(self.keepalive.pong(b"0"))
        self.watch.advance(20)
        self.assertEqual(self.watch.dead, [40])

    def test_stop(self) -> None:
        self.keepalive.start()
        self.keepalive.stop()
        self.assertFalse(self.keepalive.running)
        self.assertEqual(self.watch.advance(100), [])
        self.assertEqual(self.watch.dead, [])
        self.keepalive.stop()


class AnythingTests(SynchronousTestCase):
    """The tunnel service's watch: a ping after silence, dead after more of it."""

    def setUp(self) -> None:
        self.watch = Watch(ANYTHING, 30, 90)
        self.keepalive = self.watch.keepalive

    def tearDown(self) -> None:
        self.keepalive.stop()
        self.assertEqual(self.watch.clock.getDelayedCalls(), [])

    def test_pings_only_when_silent(self) -> None:
        self.keepalive.start()
        self.assertEqual(self.watch.pings, [])
        for _ in range(5):
            self.watch.advance(29)
            self.keepalive.heard()
            self.assertEqual(self.watch.advance(1), [])
        self.assertEqual(self.watch.pings, [])

    def test_silent_peer_pinged_then_dead(self) -> None:
        self.watch.advance(2)
        self.keepalive.start()
        self.assertEqual(self.watch.advance(30), [b"32000"])
        self.assertEqual(self.watch.advance(30), [b"62000"])
        self.assertEqual(self.watch.dead, [])
        self.assertEqual(self.watch.advance(30), [])
        self.assertEqual(self.watch.dead, [90])

    def test_dead_after_exactly_timeout(self) -> None:
        """Checks come sooner when the timeout falls between two of them."""
        self.keepalive.start()
        self.watch.advance(10)
        self.keepalive.heard()
        self.watch.advance(20)  # check at 30: silent 20
        self.watch.advance(30)  # check at 60: silent 50, ping
        self.watch.advance(30)  # check at 90: silent 80, ping; next in 10
        self.assertEqual(self.watch.dead, [])
        self.watch.advance(10)
        self.assertEqual(self.watch.dead, [90])
        self.assertEqual(self.watch.pings, [b"60000", b"90000"])

    def test_pong_is_not_tracked(self) -> None:
        """Pongs count as whatever the owner reports with heard()."""
        self.keepalive.start()
        (ping,) = self.watch.advance(30)
        self.assertIsNone(self.keepalive.pong(ping))

    def test_not_reading_is_not_silence(self) -> None:
        self.keepalive.start()
        self.keepalive.pause()
        for _ in range(10):
            self.assertEqual(self.watch.advance(30), [])
        self.assertEqual(self.watch.dead, [])
        self.keepalive.resume()
        self.assertEqual(self.watch.advance(30), [b"330000"])
        self.watch.advance(30)
        self.watch.advance(30)
        self.assertEqual(self.watch.dead, [90])


class ArgumentTests(SynchronousTestCase):
    def test_interval_below_timeout(self) -> None:
        for interval, timeout in ((0, 10), (10, 10), (20, 10), (-1, 10)):
            with self.assertRaises(ValueError):
                Keepalive(Clock(), interval=interval, timeout=timeout,
                          send_ping=print, on_dead=print)

    def test_life(self) -> None:
        with self.assertRaises(ValueError):
            Keepalive(Clock(), interval=1, timeout=2, send_ping=print, on_dead=print,
                      life="bytes")  # type: ignore[arg-type]


class NoDelayTests(SynchronousTestCase):
    def test_no_delay_reaches_socket(self) -> None:
        calls = []

        class Socket:
            def setTcpNoDelay(self, enabled: bool) -> None:
                calls.append(enabled)

        class Wrapper:
            transport = Socket()

        self.assertTrue(set_no_delay(Wrapper()))
        self.assertEqual(calls, [True])

    def test_not_tcp(self) -> None:
        """A transport without the option, or refusing it, is left alone."""

        class Unix:
            def setTcpNoDelay(self, enabled: bool) -> None:
                raise OSError(95, "Operation not supported")

        self.assertFalse(set_no_delay(object()))
        self.assertFalse(set_no_delay(None))
        self.assertFalse(set_no_delay(Unix()))

    def test_four_layers_at_most(self) -> None:
        calls = []

        class Socket:
            def setTcpNoDelay(self, enabled: bool) -> None:
                calls.append(enabled)

        class Layer:
            def __init__(self, below: object) -> None:
                self.transport = below

        self.assertTrue(set_no_delay(Layer(Layer(Layer(Socket())))))
        self.assertFalse(set_no_delay(Layer(Layer(Layer(Layer(Socket()))))))
        self.assertEqual(calls, [True])


class ForwardingLayer:
    """Like TLS (a C{ProtocolWrapper}): answers for the transport below."""

    def __init__(self, below: object) -> None:
        self.transport = below

    def __getattr__(self, name: str) -> object:
        return getattr(self.transport, name)


class BufferSizeTests(SynchronousTestCase):
    def test_reaches_socket_transport_under_tls(self) -> None:
        """
        The high-water mark is raised on the socket transport (the one that
        writes), a layer or two under TLS, and never lowered.
        """
        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.testing import MemoryReactor

        class Layer:
            bufferSize = 1  # not a socket transport: no doWrite

            def __init__(self, below: object) -> None:
                self.transport = below

        socket = FileDescriptor(MemoryReactor())
        self.assertEqual(socket.bufferSize, 65536)
        self.assertTrue(raise_buffer_size(Layer(Layer(socket)), 524304))
        self.assertEqual(socket.bufferSize, 524304)
        self.assertTrue(raise_buffer_size(socket, 1000))
        self.assertEqual(socket.bufferSize, 524304)
        self.assertFalse(raise_buffer_size(Layer(None), 524304))
        self.assertFalse(raise_buffer_size(None, 524304))

    def test_raise_buffer_size_under_forwarding_layer(self) -> None:
        """
        Under TLS the layer above the socket answers for the socket's
        attributes (a L{ProtocolWrapper} passes them on): the mark must be
        set on the socket transport itself, not on the layer.
        """
        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.testing import MemoryReactor

        socket = FileDescriptor(MemoryReactor())
        layer = ForwardingLayer(socket)
        self.assertTrue(raise_buffer_size(layer, 524304))
        self.assertEqual(socket.bufferSize, 524304)
        self.assertNotIn("bufferSize", vars(layer))


class UnsentBytesTests(SynchronousTestCase):
    def test_counts_socket_buffer_under_layers(self) -> None:
        """
        What the socket transport under TLS-like layers holds unwritten,
        across both its buffers and after a partial write; C{None} where no
        socket transport is found.
        """
        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.testing import MemoryReactor

        class Socket(FileDescriptor):
            connected = True

            def writeSomeData(self, data: bytes) -> int:
                return 3

        class Layer:
            def __init__(self, below: object) -> None:
                self.transport = below

        socket = Socket(MemoryReactor())
        stack = Layer(Layer(socket))
        self.assertEqual(unsent_bytes(stack), 0)
        socket.write(b"0123456789")
        socket.write(b"abcde")
        self.assertEqual(unsent_bytes(stack), 15)
        socket.doWrite()
        self.assertEqual(unsent_bytes(stack), 12)
        socket.write(b"fgh")
        self.assertEqual(unsent_bytes(stack), 15)
        self.assertIsNone(unsent_bytes(Layer(None)))
        self.assertIsNone(unsent_bytes(None))


class PauseIfUnsentTests(SynchronousTestCase):
    """The zero-byte probe of what a socket transport under TLS-like layers holds."""

    def setUp(self) -> None:
        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.testing import MemoryReactor

        class Socket(FileDescriptor):
            connected = True

            def __init__(self, reactor: MemoryReactor) -> None:
                super().__init__(reactor)
                self.sent = b""

            def writeSomeData(self, data: bytes) -> int:
                self.sent += bytes(data)
                return len(data)

        self.socket = Socket(MemoryReactor())
        self.socket.bufferSize = 524304
        self.producer = EdgeRecorder()
        self.socket.registerProducer(self.producer, True)
        self.stack = ForwardingLayer(ForwardingLayer(self.socket))

    def test_held_bytes_pause_then_drain(self) -> None:
        """
        Bytes held, far under the usual mark, pause the producer; the socket
        taking them resumes it; nothing was added; the mark is restored.
        """
        self.socket.write(b"earlier")
        self.assertEqual(self.producer.edges, [])
        self.assertTrue(pause_if_unsent(self.stack))
        self.assertEqual(self.producer.edges, ["pause"])
        self.assertEqual(self.socket.bufferSize, 524304)
        self.socket.doWrite()
        self.assertEqual(self.producer.edges, ["pause", "resume"])
        self.assertEqual(self.socket.sent, b"earlier")

    def test_nothing_held(self) -> None:
        """An empty socket transport does not pause its producer."""
        self.assertTrue(pause_if_unsent(self.stack))
        self.assertEqual(self.producer.edges, [])
        self.assertEqual(self.socket.bufferSize, 524304)

    def test_no_socket_transport(self) -> None:
        from twisted.internet.testing import StringTransport

        self.assertFalse(pause_if_unsent(None))
        self.assertFalse(pause_if_unsent(StringTransport()))
        self.assertFalse(pause_if_unsent(self.stack.__class__(None)))


class QuietHotPathTests(SynchronousTestCase):
    """The mixin's writes, on both products' protocol classes."""

    def test_both_products_use_it(self) -> None:
        from autobahn.websocket.protocol import WebSocketProtocol

        from lpxy.proxy.tunnel import TunnelProtocol
        from lpxy.tunnelservice.websocket import TunnelServerProtocol

        for cls in (TunnelProtocol, TunnelServerProtocol):
            # Before Autobahn's, so that its dataReceived and sendData are reached.
            self.assertLess(cls.__mro__.index(QuietHotPath),
                            cls.__mro__.index(WebSocketProtocol))

    def test_writes_and_counts_or_leaves_it_to_autobahn(self) -> None:
        from autobahn.twisted.websocket import WebSocketServerProtocol
        from twisted.internet.testing import StringTransport

        class Server(QuietHotPath, WebSocketServerProtocol):  # type: ignore[misc]
            pass

        server = Server()
        server.transport = StringTransport()
        server.send_queue = __import__("collections").deque()
        server.logOctets = False
        server.trafficStats = __import__(
            "autobahn.websocket.protocol", fromlist=["TrafficStats"]).TrafficStats()
        server.state = Server.STATE_OPEN
        server.sendData(b"abc")
        self.assertEqual(server.transport.value(), b"abc")
        self.assertEqual(server.trafficStats.outgoingOctetsWireLevel, 3)
        server.state = Server.STATE_CONNECTING
        server.sendData(b"de")
        self.assertEqual(server.trafficStats.preopenOutgoingOctetsWireLevel, 2)
        queued: list[tuple[bytes, bool]] = []
        server.send_queue.append((b"first", False))
        server._trigger = lambda: queued.append(server.send_queue[-1])  # type: ignore[method-assign]
        server.sendData(b"later")
        self.assertEqual(queued, [(b"later", False)])
        self.assertEqual(server.transport.value(), b"abcde")


class AutobahnTests(SynchronousTestCase):
    def test_quiet_log(self) -> None:
        """
        The logger stays at info when txaio's global level goes to debug, and
        is named after the class it is made in, as txaio's own would be.
        """

        class Protocol:
            log = quiet_autobahn_log()

        txaio.use_twisted()
        txaio.set_global_log_level("debug")
        self.addCleanup(txaio.set_global_log_level, "info")
        with capturedLogs() as events:
            Protocol.log.debug("upgrade request {headers}", headers={"access-token": "x"})
            Protocol.log.info("dropping connection")
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["log_namespace"], f"{__name__}.Protocol")

    def test_timers_cancelled(self) -> None:
        clock = Clock()

        class Protocol:
            closeHandshakeTimeoutCall = clock.callLater(2, print)
            serverConnectionDropTimeoutCall = clock.callLater(1, print)

        protocol = Protocol()
        clock.advance(1)  # the drop timer fired already
        cancel_autobahn_timers(protocol)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertIsNone(protocol.closeHandshakeTimeoutCall)
        self.assertIsNone(protocol.serverConnectionDropTimeoutCall)

    def test_timers_missing(self) -> None:
        """A server protocol has no serverConnectionDropTimeoutCall."""

        class Protocol:
            closeHandshakeTimeoutCall = None

        cancel_autobahn_timers(Protocol())


class ReadingPausesTests(SynchronousTestCase):
    """
    L{ReadingPauses} stops reading at the first reason and reads again
    when the last one goes.
    """

    def test_first_and_last(self) -> None:
        calls: list[str] = []
        pauses = ReadingPauses(lambda: calls.append("pause"), lambda: calls.append("resume"))
        self.assertFalse(pauses)
        pauses.add("partner")
        pauses.add("partner")
        pauses.add("own")
        self.assertTrue(pauses)
        self.assertEqual(calls, ["pause"])
        pauses.discard("partner")
        self.assertEqual(calls, ["pause"])
        pauses.discard("own")
        pauses.discard("own")
        self.assertFalse(pauses)
        self.assertEqual(calls, ["pause", "resume"])
