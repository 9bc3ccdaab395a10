"""
Tests for L{lpxy.proxy.relay}: bytes both ways and the flow-control
invariants, over C{StringTransport}s.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from lpxy.proxy.channel import Channel, ServiceBinding
from lpxy.proxy.relay import LocalRelay, TunnelFlow
from tests.support.recorders import FakeWebSocket, Sink


def channel(connection_id: int = 1) -> Channel:
    return Channel(ServiceBinding("S", "S"), "S", 1, connection_id, b"")


class ProducerAtClose(StringTransport):
    """Notes which producer is registered each time C{loseConnection} is called."""

    def __init__(self) -> None:
        super().__init__()
        self.producer_at_close: list[object] = []

    def loseConnection(self) -> None:
        self.producer_at_close.append(self.producer)
        super().loseConnection()


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ws = FakeWebSocket()
        self.flow = TunnelFlow()
        self.flow.attach(self.ws)
        self.sink = Sink()

    def relay(self, connect: bool = True, **kw: int) -> tuple[LocalRelay, StringTransport]:
        relay = LocalRelay(channel(), self.sink, self.flow, self.clock, **kw)
        transport = StringTransport()
        if connect:
            relay.makeConnection(transport)
        return relay, transport

    def test_reads_whole_records_worth(self) -> None:
        """
        The local transport reads (and holds) the largest multiple of the
        payload size within the buffer limit, so that reads fill records.
        """
        relay = LocalRelay(channel(), self.sink, self.flow, self.clock)
        transport = StringTransport()
        transport.bufferSize = 65536  # type: ignore[attr-defined]
        relay.makeConnection(transport)
        self.assertEqual(transport.bufferSize, 2 * 64512)  # type: ignore[attr-defined]

        relay = LocalRelay(
            channel(2), self.sink, self.flow, self.clock,
            max_payload_size=30000, buffer_limit=100000,
        )
        transport = StringTransport()
        transport.bufferSize = 4096  # type: ignore[attr-defined]
        relay.makeConnection(transport)
        self.assertEqual(transport.bufferSize, 90000)  # type: ignore[attr-defined]

    def test_never_reads_less_than_twisted_default(self) -> None:
        relay = LocalRelay(
            channel(), self.sink, self.flow, self.clock,
            max_payload_size=1000, buffer_limit=10000,
        )
        transport = StringTransport()
        transport.bufferSize = 65536  # type: ignore[attr-defined]
        relay.makeConnection(transport)
        self.assertEqual(transport.bufferSize, 65536)  # type: ignore[attr-defined]

    def test_registers_itself_as_producer(self) -> None:
        relay, transport = self.relay()
        self.assertIs(transport.producer, relay)
        self.assertTrue(transport.streaming)
        self.assertIs(self.ws.producer, self.flow)

    def test_cut_at_max_payload_without_copies(self) -> None:
        relay, _ = self.relay(max_payload_size=4)
        data = b"0123456789"
        relay.dataReceived(data)
        payloads = [p for _, p in self.sink.data]
        self.assertEqual([bytes(p) for p in payloads], [b"0123", b"4567", b"89"])
        self.assertTrue(all(isinstance(p, memoryview) and p.obj is data for p in payloads))
        relay.dataReceived(b"ab")
        self.assertIsInstance(self.sink.data[-1][1], bytes)
        self.assertEqual(relay.bytes_out, 12)

    def test_deliver(self) -> None:
        relay, transport = self.relay()
        relay.deliver(b"hello")
        self.assertEqual(transport.value(), b"hello")
        self.assertEqual(relay.bytes_in, 5)

    def test_full_websocket_holds_only_relays_that_read(self) -> None:
        """
        While the WebSocket's buffer is full, a relay forwards the read it
        has and then stops reading; a relay that reads nothing is not
        touched; the drained edge resumes only the held relays.
        """
        one, t1 = self.relay()
        _two, t2 = self.relay()
        self.flow.pauseProducing()
        self.assertEqual((t1.producerState, t2.producerState), ("producing", "producing"))
        one.dataReceived(b"abc")
        self.assertEqual(self.sink.data[-1][1], b"abc")
        self.assertEqual((t1.producerState, t2.producerState), ("paused", "producing"))
        self.assertEqual(self.flow.held, {one})
        self.flow.pauseProducing()  # Twisted repeats it on every write while full
        self.flow.resumeProducing()
        self.assertEqual((t1.producerState, t2.producerState), ("producing", "producing"))
        self.assertEqual(self.flow.held, frozenset())
        one.dataReceived(b"def")
        self.assertEqual(t1.producerState, "producing")

    def test_edges_cost_nothing_per_idle_relay(self) -> None:
        """
        Many full/drained edges with hundreds of idle relays pause and
        resume no transport at all (before: every relay on every edge).
        """
        transports = [self.relay()[1] for _ in range(300)]
        calls: list[str] = []
        for t in transports:
            t.pauseProducing = lambda: calls.append("pause")  # type: ignore[method-assign]
            t.resumeProducing = lambda: calls.append("resume")  # type: ignore[method-assign]
        for _ in range(10):
            self.flow.pauseProducing()
            self.flow.resumeProducing()
        self.assertEqual(calls, [])

    def test_held_relay_gone_is_forgotten(self) -> None:
        one, t1 = self.relay()
        self.flow.pauseProducing()
        one.dataReceived(b"x")
        t1.disconnecting = True
        one.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.flow.held, frozenset())
        self.flow.resumeProducing()

    def test_full_local_buffer_pauses_websocket(self) -> None:
        one, _t1 = self.relay()
        two, _t2 = self.relay()
        one.pauseProducing()
        two.pauseProducing()
        one.pauseProducing()
        self.assertEqual(self.ws.calls, ["pause"])
        self.assertTrue(self.flow.reading_paused)
        one.resumeProducing()
        self.assertEqual(self.ws.calls, ["pause"])
        two.resumeProducing()
        self.assertEqual(self.ws.calls, ["pause", "resume"])
        self.assertFalse(self.flow.reading_paused)

    def test_lost_connection_releases_its_pause(self) -> None:
        one, _t1 = self.relay()
        one.pauseProducing()
        one.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.ws.calls, ["pause", "resume"])
        self.assertEqual(self.sink.closed, [one.channel])

    def test_pause_survives_reconnect(self) -> None:
        one, _t1 = self.relay()
        one.pauseProducing()
        self.flow.detach()
        ws = FakeWebSocket()
        self.flow.attach(ws)
        self.assertEqual(ws.calls, ["pause"])

    def test_close_flushes_then_closes_without_reset(self) -> None:
        relay, transport = self.relay()
        relay.deliver(b"last words")
        relay.close()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"last words")
        relay.dataReceived(b"ignored")
        relay.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.sink.closed, [])
        self.assertEqual(self.sink.data, [])

    def test_closed_relay_releases_its_pause(self) -> None:
        relay, transport = self.relay()
        relay.pauseProducing()
        relay.close()
        self.assertEqual(self.ws.calls, ["pause", "resume"])
        relay.pauseProducing()
        self.assertEqual(self.ws.calls, ["pause", "resume"])
        self.assertTrue(transport.disconnecting)

    def test_close_while_paused_lets_go_of_transport_first(self) -> None:
        """
        A relay closed while its transport's buffer is over the mark stops
        being that transport's producer before asking it to close:
        C{loseConnection} waits for a registered producer to go.
        """
        relay, _ = self.relay(connect=False)
        transport = ProducerAtClose()
        relay.makeConnection(transport)
        relay.deliver(b"x" * 200_000)
        relay.pauseProducing()
        self.assertEqual(self.ws.calls, ["pause"])
        relay.close()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.producer_at_close, [None])
        self.assertEqual(self.ws.calls, ["pause", "resume"])

    def test_closed_before_connected_lets_go_of_transport(self) -> None:
        relay, _ = self.relay(connect=False)
        relay.abandon = lambda: None
        relay.close()
        transport = ProducerAtClose()
        relay.makeConnection(transport)
        self.assertEqual(transport.producer_at_close, [None])

    def test_pending_until_connected_bounded(self) -> None:
        relay, transport = self.relay(connect=False, buffer_limit=10)
        relay.deliver(b"12345")
        self.assertEqual(self.ws.calls, [])
        relay.deliver(b"678901")
        self.assertEqual(self.ws.calls, ["pause"])
        self.assertEqual(relay.pending_size, 11)
        relay.makeConnection(transport)
        self.assertEqual(transport.value(), b"12345678901")
        self.assertEqual(self.ws.calls, ["pause", "resume"])
        self.assertEqual(relay.pending_size, 0)

    def test_close_before_connected_abandons(self) -> None:
        relay, _ = self.relay(connect=False, buffer_limit=1)
        abandoned = []
        relay.abandon = lambda: abandoned.append(True)
        relay.deliver(b"xyz")
        relay.close()
        self.assertEqual(abandoned, [True])
        self.assertEqual(self.ws.calls, ["pause", "resume"])
        self.assertEqual(self.sink.closed, [])

    def test_connected_while_websocket_full(self) -> None:
        """
        A relay connected while the WebSocket is full forwards its first
        read and is then held; a detach (the WebSocket gone) releases it.
        """
        self.flow.pauseProducing()
        relay, transport = self.relay()
        self.assertEqual(transport.producerState, "producing")
        relay.dataReceived(b"first")
        self.assertEqual(transport.producerState, "paused")
        self.flow.detach()
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse(self.flow.ws_full)


class SocketlessTransport(FileDescriptor):
    """
    Twisted's own write buffering (C{FileDescriptor}) over a pretend socket
    that takes at most C{window} bytes per write, for a L{MemoryReactor}.
    """

    def __init__(self, reactor: MemoryReactor, window: int) -> None:
        super().__init__(reactor)
        self.connected = 1
        self.window = window
        self.sent = 0
        self.lost: list[Failure] = []

    def writeSomeData(self, data: bytes) -> int:
        taken = min(len(data), self.window)
        self.sent += taken
        return taken

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.lost.append(reason)
        self.protocol.connectionLost(reason)

    def write_ready(self) -> None:
        """What the reactor does each time the socket can take more, until it stops asking."""
        while self in self.reactor.getWriters():
            why = self.doWrite()
            if why:
                self.reactor.removeWriter(self)
                self.connectionLost(Failure(why))


class TwistedBufferTests(SynchronousTestCase):
    """The relay over Twisted's real write buffer, not a C{StringTransport}."""

    def test_end_reaches_application_after_paused_buffer_drains(self) -> None:
        """
        Closed while its transport has paused it (more than a buffer's worth
        waiting), the relay's local socket still closes once all is written.
        """
        flow = TunnelFlow()
        ws = FakeWebSocket()
        flow.attach(ws)
        relay = LocalRelay(channel(), Sink(), flow, Clock(), peer_description="app")
        transport = SocketlessTransport(MemoryReactor(), window=16384)
        transport.protocol = relay
        relay.makeConnection(transport)
        relay.deliver(b"x" * 300_000)
        self.assertEqual(ws.calls, ["pause"])
        relay.close()
        transport.write_ready()
        self.assertEqual(transport.sent, 300_000)
        self.assertEqual(len(transport.lost), 1)
        transport.lost[0].trap(ConnectionDone)


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["full", "drain", "pause", "resume", "close", "lost", "new",
                         "reconnect", "read"]),
        st.integers(0, 3),
    ),
    max_size=60,
)


class FlowPropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(_OPS)
    def test_invariants(self, ops: list[tuple[str, int]]) -> None:
        """
        Whatever happens, the WebSocket is read exactly when no live, open
        relay is over its mark; a live relay reads unless it read since the
        WebSocket became full, and so forwards at most one read while it is
        full; and no closed relay is still its transport's producer.
        """
        clock = Clock()
        flow = TunnelFlow()
        ws = FakeWebSocket()
        flow.attach(ws)
        sink = Sink()
        relays: list[tuple[LocalRelay, StringTransport]] = []
        over: set[LocalRelay] = set()
        closed: list[StringTransport] = []
        full = False
        reads_while_full: dict[LocalRelay, int] = {}

        def reading(fake: FakeWebSocket) -> bool:
            state = True
            for call in fake.calls:
                state = call == "resume"
            return state

        for op, index in ops:
            live = [(r, t) for r, t in relays if not t.disconnecting]
            if op == "new" or not live:
                relay = LocalRelay(channel(), sink, flow, clock)
                transport = StringTransport()
                relay.makeConnection(transport)
                relays.append((relay, transport))
                continue
            relay, transport = live[index % len(live)]
            if op == "full":
                flow.pauseProducing()
                full = True
            elif op == "drain":
                flow.resumeProducing()
                full = False
                reads_while_full.clear()
            elif op == "read":
                if transport.producerState == "producing":
                    relay.dataReceived(b"r")
                    if full:
                        reads_while_full[relay] = reads_while_full.get(relay, 0) + 1
            elif op == "pause":
                relay.pauseProducing()
                over.add(relay)
            elif op == "resume":
                relay.resumeProducing()
                over.discard(relay)
            elif op == "close":
                relay.close()
                over.discard(relay)
                closed.append(transport)
            elif op == "lost":
                transport.disconnecting = True
                relay.connectionLost(Failure(ConnectionDone()))
                over.discard(relay)
            elif op == "reconnect":
                flow.detach()
                full = False
                reads_while_full.clear()
                ws = FakeWebSocket()
                flow.attach(ws)
            live = [(r, t) for r, t in relays if not t.disconnecting]
            self.assertEqual(reading(ws), not over)
            for r, t in live:
                held = full and reads_while_full.get(r, 0) > 0
                self.assertEqual(t.producerState, "paused" if held else "producing")
            self.assertLessEqual(max(reads_while_full.values(), default=0), 1)
            for t in closed:
                self.assertIsNone(t.producer)
