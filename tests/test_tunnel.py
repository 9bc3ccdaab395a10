"""
Tests for L{lpxy.proxy.tunnel}: the WebSocket client protocol over a
C{StringTransport} and a C{Clock}.
"""

from __future__ import annotations

from typing import Any

import txaio
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from lpxy.frames import Message, ProtocolError, RecordDecoder, encode
from lpxy.proxy.tunnel import (
    CloseOutcome,
    TunnelFactory,
    TunnelProtocol,
    describe_rejection,
)
from tests.support.recorders import EdgeRecorder
from tests.support.wsframes import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    WebSocketTransport,
    accept_response,
    frame,
    parse_request,
    read_frames,
)

SUB = "aws.iot.securetunneling-3.0"
TOKEN = "secret-access-token"
CLIENT = "0123456789abcdef0123456789abcdef"


class Events:
    """Records what the protocol tells its connector."""

    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []

    def ws_open(self, protocol: TunnelProtocol) -> None:
        self.log.append(("open", protocol.channel_id))

    def ws_records(self, protocol: TunnelProtocol, messages: list[Message]) -> None:
        self.log.append(("records", list(messages)))

    def ws_error(self, protocol: TunnelProtocol, error: ProtocolError) -> None:
        self.log.append(("error", str(error)))

    def ws_close(self, protocol: TunnelProtocol, outcome: CloseOutcome) -> None:
        self.log.append(("close", outcome))


def source_factory(events: Events, clock: Clock, **options: Any) -> TunnelFactory:
    """A source's L{TunnelFactory} with the tests' token, client token and subprotocol."""
    return TunnelFactory(
        "ws://tunnel.example:8080/tunnel?local-proxy-mode=source",
        events,
        access_token=TOKEN,
        client_token=CLIENT,
        subprotocol=SUB,
        user_agent="lpxy/0.1.0",
        clock=clock,
        **options,
    )


class TunnelProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events = Events()
        self.factory = source_factory(self.events, self.clock, ping_period_ms=20000)
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        self.transport = WebSocketTransport()
        self.protocol.makeConnection(self.transport)

    def tearDown(self) -> None:
        if self.protocol.state != self.protocol.STATE_CLOSED:
            self.protocol.dropConnection(abort=True)
            self.protocol.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(60)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def open(self, subprotocol: str | None = SUB) -> None:
        request = self.transport.value()
        self.transport.clear()
        self.protocol.dataReceived(accept_response(request, subprotocol))

    def server_sends(self, data: bytes, opcode: int = BINARY) -> None:
        self.protocol.dataReceived(frame(opcode, data))

    def sent(self) -> list[tuple[int, bytes]]:
        frames = read_frames(self.transport.value())
        self.transport.clear()
        return frames

    def test_write_buffer_raised(self) -> None:
        """
        The WebSocket's transport holds four of the largest messages before
        it counts as full (relay.py, invariant 2).
        """
        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.testing import MemoryReactor

        class Socket(FileDescriptor):
            def getPeer(self) -> IPv4Address:
                return IPv4Address("TCP", "127.0.0.1", 8080)

            getHost = getPeer

            def writeSomeData(self, data: bytes) -> int:
                return len(data)

        socket = Socket(MemoryReactor())
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        protocol.makeConnection(socket)
        self.assertEqual(socket.bufferSize, 4 * 131076)
        protocol.dropConnection(abort=True)
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_handshake_headers(self) -> None:
        line, headers, _ = parse_request(self.transport.value())
        self.assertEqual(line, "GET /tunnel?local-proxy-mode=source HTTP/1.1")
        self.assertEqual(headers["access-token"], TOKEN)
        self.assertEqual(headers["client-token"], CLIENT)
        self.assertEqual(headers["user-agent"], "lpxy/0.1.0")
        self.assertEqual(headers["sec-websocket-protocol"], SUB)
        self.assertNotIn(TOKEN, repr(self.factory))

    def test_open_pings_at_once(self) -> None:
        self.clock.advance(1.5)
        self.open()
        self.assertEqual(self.events.log, [("open", "chan-1")])
        self.assertEqual(self.sent(), [(PING, b"1500")])
        self.clock.advance(20)
        self.assertEqual(self.sent(), [(PING, b"21500")])

    def test_subprotocol_required(self) -> None:
        with capturedLogs() as events:
            self.open(subprotocol=None)
        # Failed, not raised: Autobahn would log the exception's traceback.
        self.assertEqual([formatEvent(e) for e in events
                          if "Failure" in formatEvent(e) or "log_failure" in e], [])
        self.assertEqual(self.events.log, [])
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        (event,) = self.events.log
        self.assertEqual(event[0], "close")
        outcome = event[1]
        assert isinstance(outcome, CloseOutcome)
        self.assertFalse(outcome.opened)
        self.assertTrue(outcome.by_us)
        self.assertIsNone(outcome.http_status)
        self.assertEqual(
            outcome.reason,
            "the service answered without subprotocol 'aws.iot.securetunneling-3.0' (got None)",
        )

    def test_rejected(self) -> None:
        self.transport.clear()
        self.protocol.dataReceived(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 20\r\n\r\nInvalid access token"
        )
        self.protocol.connectionLost(Failure(ConnectionDone()))
        (event,) = self.events.log
        outcome = event[1]
        assert isinstance(outcome, CloseOutcome)
        self.assertEqual((outcome.opened, outcome.http_status), (False, 401))
        self.assertEqual(self.protocol.rejection_body, "Invalid access token")

    def test_records_span_messages(self) -> None:
        self.open()
        one = encode(Message(type=Message.DATA, streamId=1, payload=b"a" * 10))
        two = encode(Message(type=Message.STREAM_RESET, streamId=1))
        self.server_sends(one + two[:3])
        self.server_sends(two[3:])
        kinds = [
            [m.type for m in e[1]] for e in self.events.log if e[0] == "records"  # type: ignore[union-attr]
        ]
        self.assertEqual(kinds, [[Message.DATA], [Message.STREAM_RESET]])

    def test_control_frames_between_binary_frames(self) -> None:
        """
        Binary frames are read by lpxy, anything else by Autobahn, in the
        order they came: records before a ping, the pong, the records after
        it (in the same read and in the next) arrive as if read one by one.
        """
        self.open()
        self.sent()
        records = [encode(Message(type=Message.DATA, streamId=1, payload=b"%d" % i * 40))
                   for i in range(6)]
        both = records[2] + records[3]
        self.protocol.dataReceived(
            frame(BINARY, records[0]) + frame(BINARY, records[1] + both[:7])
            + frame(PING, b"hello") + frame(BINARY, both[7:])
        )
        self.assertEqual(self.sent(), [(PONG, b"hello")])
        self.protocol.dataReceived(frame(BINARY, records[4])[:3])
        self.protocol.dataReceived(frame(BINARY, records[4])[3:] + frame(BINARY, records[5]))
        payloads = [m.payload for e in self.events.log if e[0] == "records"
                    for m in e[1]]  # type: ignore[union-attr]
        self.assertEqual(payloads, [b"%d" % i * 40 for i in range(6)])

    def test_oversized_frame_fails_connection(self) -> None:
        """A binary frame over the frame limit drops the connection, as Autobahn does."""
        self.open()
        self.sent()
        self.protocol.dataReceived(frame(BINARY, b"\0" * 131077))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.protocol.state, self.protocol.STATE_CLOSED)
        self.assertNotIn("records", [e[0] for e in self.events.log])

    def test_bad_record(self) -> None:
        self.open()
        self.server_sends(b"\x00\x00")
        self.assertEqual(self.events.log[-1][0], "error")

    def test_text_ignored(self) -> None:
        self.open()
        self.server_sends(b"hello", opcode=1)
        self.assertEqual(self.events.log, [("open", "chan-1")])

    def test_batching(self) -> None:
        self.open()
        self.sent()
        header = Message(type=Message.DATA, streamId=1, serviceId="S",
                         connectionId=1).SerializeToString()
        self.protocol.send_data(header, b"abc")
        self.protocol.send_data(header, memoryview(b"xxdefxx")[2:5])
        self.protocol.send_message(Message(type=Message.STREAM_RESET, streamId=1, serviceId="S"))
        self.assertEqual(self.sent(), [])
        self.clock.advance(0)
        frames = self.sent()
        self.assertEqual(len(frames), 1)
        messages = RecordDecoder().feed(frames[0][1])
        self.assertEqual(
            [(m.type, m.payload, m.serviceId, m.connectionId) for m in messages],
            [(Message.DATA, b"abc", "S", 1), (Message.DATA, b"def", "S", 1),
             (Message.STREAM_RESET, b"", "S", 0)],
        )

    def test_hot_path_formats_no_debug_line(self) -> None:
        """
        Reading and writing messages formats none of Autobahn's debug lines
        (their arguments cost more than the rest of a small message's path);
        what is written is still counted as Autobahn counts it.
        """
        import autobahn.twisted.websocket
        import autobahn.websocket.protocol

        self.open()
        self.sent()
        formatted: list[object] = []

        def hltype(obj: object) -> str:
            formatted.append(obj)
            return ""

        self.patch(autobahn.twisted.websocket, "hltype", hltype)
        self.patch(autobahn.websocket.protocol, "hltype", hltype)
        counted = self.protocol.trafficStats.outgoingOctetsWireLevel
        record = encode(Message(type=Message.DATA, streamId=1, serviceId="S", connectionId=1,
                                payload=b"in"))
        self.server_sends(record)
        header = Message(type=Message.DATA, streamId=1, serviceId="S",
                         connectionId=1).SerializeToString()
        self.protocol.send_data(header, b"out")
        self.clock.advance(0)
        frames = self.sent()
        self.assertEqual([m.payload for m in RecordDecoder().feed(frames[0][1])], [b"out"])
        self.assertEqual(formatted, [])
        self.assertGreater(self.protocol.trafficStats.outgoingOctetsWireLevel, counted)
        self.assertEqual(self.events.log[-1][0], "records")

    def test_data_records_parse_at_every_length_size(self) -> None:
        self.open()
        self.sent()
        header = Message(type=Message.DATA, streamId=7, serviceId="S",
                         connectionId=3).SerializeToString()
        sizes = [1, 127, 128, 16383, 16384, 64512]
        for size in sizes:
            self.protocol.send_data(header, b"x" * size)
        self.clock.advance(0)
        decoder = RecordDecoder()
        messages = [m for _, p in self.sent() for m in decoder.feed(p)]
        self.assertEqual([len(m.payload) for m in messages], sizes)
        self.assertTrue(all((m.streamId, m.connectionId) == (7, 3) for m in messages))

    def test_data_records_are_what_protobuf_serializes(self) -> None:
        """
        What goes out for a channel header and a payload (a view, not
        copied before the message is joined) is exactly C{encode} of the
        whole message; L{tests.test_frames.DataRecordTests} covers the
        field values and varint lengths.
        """
        self.open()
        self.sent()
        messages = [
            Message(type=Message.DATA, streamId=2**31 - 1, serviceId="\u00e9t\u00e9",
                    connectionId=2**32 - 1, ignorable=True, payload=b"x" * 300),
            Message(type=Message.DATA, streamId=1, payload=b""),
            Message(type=Message.DATA, streamId=7, serviceId="HTTP", connectionId=3,
                    payload=bytes(range(256)) * 64),
        ]
        for message in messages:
            header = Message()
            header.CopyFrom(message)
            header.ClearField("payload")
            self.protocol.send_data(header.SerializeToString(), memoryview(message.payload))
        self.clock.advance(0)
        self.assertEqual(b"".join(p for _, p in self.sent()),
                         b"".join(encode(m) for m in messages))

    def test_batches_respect_frame_limit(self) -> None:
        self.open()
        self.sent()
        header = Message(type=Message.DATA, streamId=1).SerializeToString()
        chunk = bytes(range(256)) * 252  # 64512 bytes
        for _ in range(3):
            self.protocol.send_data(header, chunk)
        self.clock.advance(0)
        frames = self.sent()
        self.assertTrue(all(len(p) <= 131076 for _, p in frames))
        decoder = RecordDecoder()
        counts = [len(decoder.feed(p)) for _, p in frames]
        self.assertEqual(counts, [2, 1])

    def test_frames_handed_over_as_built(self) -> None:
        """
        A transport that takes any buffer (the batching TLS layer) gets each
        message's frame as built, a C{bytearray}, not a copy; any other
        transport gets C{bytes}.
        """
        self.open()
        self.sent()
        writes: list[object] = []
        self.transport.write = writes.append  # type: ignore[method-assign]
        header = Message(type=Message.DATA, streamId=1).SerializeToString()
        self.protocol.send_data(header, b"abc")
        self.clock.advance(0)
        self.transport.accepts_buffers = True  # type: ignore[attr-defined]
        self.protocol.send_data(header, b"def")
        self.clock.advance(0)
        self.assertEqual([type(w) for w in writes], [bytes, bytearray])
        payloads = [read_frames(bytes(w))[0] for w in writes]
        self.assertEqual(
            [(opcode, [m.payload for m in RecordDecoder().feed(p)]) for opcode, p in payloads],
            [(BINARY, [b"abc"]), (BINARY, [b"def"])],
        )

    def test_foreign_pong_ignored_dead_after_two_periods(self) -> None:
        self.open()
        self.server_sends(b"12345", opcode=PONG)
        self.clock.advance(20)
        self.assertEqual(self.events.log, [("open", "chan-1")])
        self.clock.advance(20)
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        outcome = self.events.log[-1][1]
        assert isinstance(outcome, CloseOutcome)
        self.assertTrue(outcome.dead)
        self.assertTrue(outcome.opened)

    def test_paused_reading_is_not_dead(self) -> None:
        self.open()
        self.protocol.pause_reading()
        self.assertEqual(self.transport.producerState, "paused")
        self.clock.advance(200)
        self.assertEqual(self.events.log, [("open", "chan-1")])
        self.protocol.resume_reading()
        self.clock.advance(20)
        self.assertEqual(self.events.log, [("open", "chan-1")])
        self.clock.advance(20)
        self.clock.advance(20)
        self.assertTrue(self.transport.disconnecting)

    def test_pong_keeps_alive(self) -> None:
        self.factory.trace = True
        self.open()
        with capturedLogs() as logged:
            for _ in range(5):
                (ping,) = [p for op, p in self.sent() if op == PING]
                self.server_sends(ping, opcode=PONG)
                self.clock.advance(20)
        self.assertEqual(self.events.log, [("open", "chan-1")])
        rtts = [e["rtt"] for e in logged if e.get("log_format") == "Pong after {rtt:.3f}s"]
        self.assertEqual(rtts, [0] * 5)

    def test_foreign_pong_logged(self) -> None:
        self.open()
        with capturedLogs() as logged:
            self.server_sends(b"12345", opcode=PONG)
        self.assertIn("Ignoring a pong that answers no ping of ours",
                      [e["log_format"] for e in logged])

    def test_answers_ping(self) -> None:
        self.open()
        self.sent()
        self.server_sends(b"42", opcode=PING)
        self.assertEqual(self.sent(), [(PONG, b"42")])

    def test_close_code(self) -> None:
        self.open()
        self.protocol.dataReceived(frame(8, b"\x03\xe8closed"))
        self.protocol.connectionLost(Failure(ConnectionDone()))
        outcome = self.events.log[-1][1]
        assert isinstance(outcome, CloseOutcome)
        self.assertEqual((outcome.code, outcome.by_us), (1000, False))


class SlowSocket(FileDescriptor):
    """
    Twisted's socket transport without the socket: what is written waits in
    its send buffer until the peer takes some (L{take}), with Twisted's own
    producer edges (paused above the high-water mark, resumed once empty).
    """

    def __init__(self, reactor: MemoryReactorClock) -> None:
        super().__init__(reactor)
        self.connected = True
        self.received = bytearray()
        self.written = 0
        self.aborted = False
        self.protocol: Any = None
        self._allowance = 0

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8080)

    getHost = getPeer

    def write(self, data: bytes) -> None:
        self.written += len(data)
        super().write(data)

    def writeSomeData(self, data: bytes) -> int:
        size = min(len(data), self._allowance)
        self._allowance -= size
        self.received += data[:size]
        return size

    def take(self, size: int) -> None:
        """The peer takes up to C{size} bytes (the reactor's write turn)."""
        self._allowance = size
        while self._allowance and self.unsent:
            self.doWrite()
        self._allowance = 0

    @property
    def unsent(self) -> int:
        return self.written - len(self.received)

    def abortConnection(self) -> None:
        self.aborted = True
        reason = Failure(ConnectionAborted())
        self.connectionLost(reason)
        self.protocol.connectionLost(reason)


class DrainBeforeCloseTests(SynchronousTestCase):
    """
    A close of ours sends its Close frame on the transport's drained edge
    (so Autobahn's close handshake timer cannot cut the tail off), at once
    when the socket holds nothing, and gives up on a peer that takes nothing
    for a whole L{DRAIN_STALL}.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.events = Events()
        self.factory = source_factory(self.events, self.clock, ping_period_ms=0, drain_stall=10.0)
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        self.transport = SlowSocket(self.clock)
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        self.transport.take(self.transport.unsent)
        request = bytes(self.transport.received)
        self.transport.received.clear()
        self.transport.written = 0
        self.protocol.dataReceived(accept_response(request, SUB))
        self.producer = EdgeRecorder()
        self.protocol.register_write_producer(self.producer)

    def tearDown(self) -> None:
        if self.protocol.state != self.protocol.STATE_CLOSED:
            self.protocol.dropConnection(abort=True)
        self.clock.advance(60)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def send(self, size: int) -> bytes:
        """Queue C{size} bytes of DATA records and flush them to the socket."""
        payload = bytes(i % 251 for i in range(size))
        header = Message(type=Message.DATA, streamId=1, serviceId="S",
                         connectionId=1).SerializeToString()
        for start in range(0, size, 60_000):
            self.protocol.send_data(header, payload[start : start + 60_000])
        self.protocol.flush()
        return payload

    def frames(self) -> list[tuple[int, bytes]]:
        return read_frames(bytes(self.transport.received))

    def received(self) -> bytes:
        decoder = RecordDecoder()
        got = b""
        for opcode, payload in self.frames():
            if opcode == BINARY:
                got += b"".join(m.payload for m in decoder.feed(payload))
        return got

    def test_close_at_once_over_string_transport(self) -> None:
        """
        Over a transport that is no socket transport (it never pauses, each
        write counts as taken), the Close is written by C{close} itself,
        with no wait of ours left behind.
        """
        clock = Clock()
        factory = source_factory(Events(), clock, ping_period_ms=0)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        transport = WebSocketTransport()
        protocol.makeConnection(transport)
        request = transport.value()
        transport.clear()
        protocol.dataReceived(accept_response(request, SUB))
        protocol.close(1000, "local proxy stopping")
        self.assertEqual([f[0] for f in read_frames(transport.value())], [CLOSE])
        # Only Autobahn's close handshake timer is pending, not a drain wait.
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual(clock.getDelayedCalls()[0].getTime(), 2)
        protocol.dropConnection(abort=True)
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_close_at_once_when_socket_empty(self) -> None:
        """
        With nothing held by the socket, the Close is written at once: no
        give-up timer, only Autobahn's close handshake timer.
        """
        self.protocol.close(1000, "local proxy stopping")
        [(opcode, body)] = read_frames(self._buffered())
        self.assertEqual((opcode, body[:2]), (CLOSE, b"\x03\xe8"))
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [2])
        self.assertEqual(self.producer.edges, [])

    def _buffered(self) -> bytes:
        """What the socket holds unsent (the test's own view of it)."""
        return b"".join([self.transport.dataBuffer[self.transport.offset:],
                         *self.transport._tempDataBuffer])

    def test_close_after_drained_edge(self) -> None:
        """
        With data held below the high-water mark, no Close is written while
        any of it is unsent; the drained edge brings it, right after the
        data; the tunnel's producer saw both edges.
        """
        payload = self.send(200_000)
        held = self.transport.unsent
        self.protocol.close(1000, "local proxy stopping")
        self.assertEqual(self.transport.unsent, held)  # the probe wrote nothing
        self.assertEqual(self.producer.edges, ["pause"])
        self.transport.take(held - 1)
        self.assertEqual(self.transport.unsent, 1)  # no Close written yet
        self.transport.take(1)  # the drained edge
        self.assertEqual(self.producer.edges, ["pause", "resume"])
        [(opcode, _)] = read_frames(self._buffered())
        self.assertEqual(opcode, CLOSE)
        self.transport.take(1000)
        self.assertEqual([f[0] for f in self.frames()][-2:], [BINARY, CLOSE])
        self.assertEqual(self.received(), payload)
        self.assertFalse(self.transport.aborted)

    def test_close_after_drained_edge_when_full(self) -> None:
        """
        Over the high-water mark already, the drained edge that comes
        anyway brings the Close.
        """
        payload = self.send(600_000)
        self.assertIn("pause", self.producer.edges)
        self.protocol.close(1000, "local proxy stopping")
        self.transport.take(self.transport.unsent - 1)
        self.assertEqual(self.transport.unsent, 1)  # no Close written yet
        self.transport.take(1)
        self.assertEqual([f[0] for f in read_frames(self._buffered())], [CLOSE])
        self.transport.take(1000)
        self.assertEqual([f[0] for f in self.frames()][-1], CLOSE)
        self.assertEqual(self.received(), payload)

    def test_close_waits_for_drain(self) -> None:
        """
        With half a megabyte still in the send buffer, a slow peer taking a
        little every few seconds gets all of it, then the Close; nothing is
        dropped meanwhile, though it lasts far beyond Autobahn's 2 s.
        """
        payload = self.send(500_000)
        self.protocol.close(1000, "local proxy stopping")
        queued = self.transport.unsent
        self.assertGreater(queued, 500_000)
        while self.transport.unsent:
            self.clock.advance(5)
            self.assertFalse(self.transport.aborted)
            # Nothing was added: no Close frame behind the data yet.
            self.assertEqual(len(self.transport.received) + self.transport.unsent, queued)
            self.transport.take(20_000)
        self.assertEqual(self.received(), payload)
        self.transport.take(1000)
        frames = self.frames()
        self.assertEqual(frames[-1][0], CLOSE)
        self.assertEqual(frames[-1][1][:2], b"\x03\xe8")
        self.assertFalse(self.transport.aborted)
        self.assertGreater(self.clock.seconds(), 100)

    def test_nothing_sent_after_close(self) -> None:
        """Records queued after the close are not sent."""
        self.send(500_000)
        self.protocol.close(1000, "local proxy stopping")
        queued = self.transport.unsent
        self.protocol.send_message(Message(type=Message.STREAM_RESET, streamId=1, serviceId="S"))
        self.protocol.flush()
        self.assertEqual(self.transport.unsent, queued)

    def test_stalled_peer_dropped(self) -> None:
        """
        A peer taking nothing for L{DRAIN_STALL} is dropped, Close unsent.
        """
        self.send(500_000)
        self.protocol.close(1000, "local proxy stopping")
        queued = self.transport.unsent
        self.clock.advance(9.9)
        self.assertFalse(self.transport.aborted)
        with capturedLogs() as events:
            self.clock.advance(0.1)
        self.assertTrue(self.transport.aborted)
        self.assertEqual(self.transport.written, queued)
        self.assertEqual(self.received(), b"")
        self.assertIn("took none", " ".join(formatEvent(e) or "" for e in events))

    def test_progress_resets_give_up(self) -> None:
        """
        Bytes taken within a L{DRAIN_STALL} start another: the peer is
        dropped only once a whole one passed with none taken.
        """
        self.send(500_000)
        self.protocol.close(1000, "local proxy stopping")
        queued = self.transport.unsent
        self.clock.advance(5)
        self.transport.take(1000)
        self.clock.advance(5)
        self.assertFalse(self.transport.aborted)  # 10 s: progress was seen
        self.clock.advance(9.9)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(0.1)  # 20 s: none since the last look
        self.assertTrue(self.transport.aborted)
        self.assertEqual(len(self.transport.received), 1000)
        self.assertEqual(self.transport.written, queued)

    def test_peer_close_ends_wait(self) -> None:
        """The service closing first ends the wait: no timer is left behind."""
        self.send(500_000)
        self.protocol.close(1000, "local proxy stopping")
        self.protocol.dataReceived(frame(CLOSE, b"\x03\xe8closed"))
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TokenNeverLoggedTests(SynchronousTestCase):
    def test_debug_logging(self) -> None:
        """
        Even with Autobahn's loggers at debug, no log event of a handshake
        carries the access token.
        """
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        txaio.set_global_log_level("debug")
        self.addCleanup(txaio.set_global_log_level, "info")
        case = TunnelProtocolTests("test_open_pings_at_once")
        case.setUp()
        case.open()
        case.protocol.close()
        case.tearDown()
        self.assertTrue(events)
        text = " ".join((formatEvent(e) or "") + repr(e) for e in events)
        self.assertNotIn(TOKEN, text)
        self.assertNotIn(CLIENT, text)


class HelpersTests(SynchronousTestCase):
    def test_describe_rejection(self) -> None:
        self.assertIn("token", describe_rejection(401, "Invalid access token"))
        self.assertIn("mode", describe_rejection(400))
