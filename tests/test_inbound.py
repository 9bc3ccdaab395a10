"""
Tests for L{lpxy.tunnelservice.inbound}: a client's frames cut, unmasked
and checked as Autobahn's reader would, whatever the reads' sizes; and, on
the service's protocol over a C{StringTransport}, what a malformed frame
does to the connection.
"""

from __future__ import annotations

import itertools
import random
import struct

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from lpxy.frames import Message, RecordDecoder, encode
from lpxy.tunnelservice import inbound
from lpxy.tunnelservice.broker import Broker
from lpxy.tunnelservice.dataplane import TunnelServerFactory
from lpxy.tunnelservice.inbound import ClientFrames
from lpxy.tunnelservice.service import Connections
from lpxy.tunnelservice.store import DESTINATION, SOURCE
from lpxy.tunnelservice.websocket import TunnelServerProtocol
from tests.support.wsframes import BINARY, CLOSE, PING, PONG, TEXT, WebSocketTransport, read_frames

CONTINUATION = 0
LIMIT = 1000


def masked(opcode: int, payload: bytes, key: bytes | None = None, fin: bool = True,
           rsv: int = 0, long_form: int | None = None) -> bytes:
    """A client frame masked with C{key} (random unless given); C{long_form}: 126 or 127."""
    if key is None:
        key = random.randbytes(4)
    size = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    form = long_form or (size if size < 126 else 126 if size < 65536 else 127)
    if form == 126:
        head += struct.pack("!BH", 0x80 | 126, size)
    elif form == 127:
        head += struct.pack("!BQ", 0x80 | 127, size)
    else:
        head += bytes([0x80 | size])
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + body


def unmasked(opcode: int, payload: bytes) -> bytes:
    return bytes([0x80 | opcode, len(payload)]) + payload


class Recorder:
    """A L{inbound.FrameSink} that records what it is told, and can say stop."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.go_on = True

    def frame_message(self, payload: bytes, binary: bool) -> bool:
        self.events.append(("message", payload, binary))
        return self.go_on

    def frame_control(self, opcode: int, payload: bytes, rsv: int, mask: bytes | None) -> bool:
        self.events.append(("control", opcode, payload))
        return self.go_on

    def frame_violation(self, reason: str) -> bool:
        self.events.append(("violation", reason))
        return self.go_on

    def frame_too_big(self, size: int, limit: int, reason: str) -> bool:
        self.events.append(("too big", size, limit, reason))
        return self.go_on


def read(data: bytes, cuts: list[int] | None = None) -> list[tuple[object, ...]]:
    """What a reader reports for C{data} fed in pieces cut at C{cuts}."""
    sink = Recorder()
    frames = ClientFrames(sink, LIMIT, LIMIT)
    for start, stop in itertools.pairwise([0, *(cuts or []), len(data)]):
        frames.feed(data[start:stop])
    return sink.events


class UnmaskTests(SynchronousTestCase):
    """L{inbound.unmask} XORs in place, as Autobahn's maskers do."""

    def test_matches_definition(self) -> None:
        rng = random.Random(7)
        for size in (1, 3, 4, 5, 15, 16, 17, 127, 128, 129, 4096, 70001):
            data = rng.randbytes(size + 10)
            key = rng.randbytes(4)
            expected = bytearray(data)
            for i in range(size):
                expected[5 + i] ^= key[i % 4]
            buf = bytearray(data)
            inbound.unmask(buf, 5, 5 + size, key)
            self.assertEqual(buf, expected, size)


class ClientFramesTests(SynchronousTestCase):
    """L{ClientFrames} cuts, unmasks and checks a client's frames."""

    def stream(self) -> tuple[bytes, list[tuple[object, ...]]]:
        """Frames of every kind a client sends, and what they are read as."""
        rng = random.Random(11)
        big = rng.randbytes(LIMIT)
        parts = [rng.randbytes(n) for n in (300, 1, 0, 299)]
        data = (
            masked(BINARY, b"first")
            + masked(BINARY, big)
            + masked(BINARY, parts[0], fin=False)
            + masked(PING, b"ping!")
            + masked(CONTINUATION, parts[1], fin=False)
            + masked(CONTINUATION, parts[2], fin=False)
            + masked(PONG, b"")
            + masked(CONTINUATION, parts[3])
            + masked(BINARY, b"")
            + masked(TEXT, b"text")
            + masked(BINARY, b"x" * 200, long_form=126)
            + masked(CLOSE, struct.pack("!H", 1000) + b"bye")
        )
        events = [
            ("message", b"first", True),
            ("message", big, True),
            ("control", PING, b"ping!"),
            ("control", PONG, b""),
            ("message", b"".join(parts), True),
            ("message", b"", True),
            ("message", b"text", False),
            ("message", b"x" * 200, True),
            ("control", CLOSE, struct.pack("!H", 1000) + b"bye"),
        ]
        return data, events

    def test_whole(self) -> None:
        data, events = self.stream()
        self.assertEqual(read(data), events)

    def test_byte_by_byte(self) -> None:
        data, events = self.stream()
        self.assertEqual(read(data, list(range(1, len(data)))), events)

    def test_any_cuts(self) -> None:
        data, events = self.stream()
        rng = random.Random(3)
        for _ in range(200):
            cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 12)))
            self.assertEqual(read(data, cuts), events, cuts)

    def test_every_single_cut(self) -> None:
        data, events = self.stream()
        for cut in range(1, len(data)):
            self.assertEqual(read(data, [cut]), events, cut)

    def test_violations(self) -> None:
        """Each of Autobahn's checks, with its reason."""
        cases = [
            (masked(BINARY, b"a", rsv=4), "RSV = 4 and no extension negotiated"),
            (unmasked(BINARY, b"a"), "unmasked client-to-server frame"),
            (masked(PING, b"a", fin=False), "fragmented control frame"),
            (masked(PING, b"a" * 126), "control frame with payload length > 125 octets"),
            (masked(11, b"a"), "control frame using reserved opcode 11"),
            (masked(CLOSE, b"a"), "received close control frame with payload len 1"),
            (masked(3, b"a"), "data frame using reserved opcode 3"),
            (masked(CONTINUATION, b"a"),
             "received continuation data frame outside fragmented message"),
            (masked(BINARY, b"a", fin=False) + masked(BINARY, b"b"),
             "received non-continuation data frame while inside fragmented message"),
            (masked(BINARY, b"a", long_form=126),
             "invalid data frame length (not using minimal length encoding)"),
            (masked(BINARY, b"a", long_form=127),
             "invalid data frame length (not using minimal length encoding)"),
        ]
        for data, reason in cases:
            events = read(data)
            self.assertEqual(events[0], ("violation", reason), reason)
            # data is dropped; a control frame is answered unless over 125 bytes
            self.assertEqual([e for e in events[1:] if e[0] != "control"], [], reason)
        self.assertEqual(read(masked(PING, b"a" * 126)),
                         [("violation", "control frame with payload length > 125 octets")])
        self.assertEqual(read(masked(PING, b"a", fin=False)),
                         [("violation", "fragmented control frame"), ("control", PING, b"a")])

    def test_too_big(self) -> None:
        frame = masked(BINARY, b"a" * (LIMIT + 1))
        reason = (f"received WebSocket message size {LIMIT + 1} exceeds payload limit "
                  f"of {LIMIT} octets")
        self.assertEqual(read(frame), [("too big", LIMIT + 1, LIMIT, reason)])
        # a message of frames each within the limit
        frames = masked(BINARY, b"a" * 600, fin=False) + masked(CONTINUATION, b"b" * 600)
        reason = f"received WebSocket message size 1200 exceeds payload limit of {LIMIT} octets"
        self.assertEqual(read(frames), [("too big", 1200, LIMIT, reason)])
        # a frame over its own limit, in a message within its limit
        sink = Recorder()
        ClientFrames(sink, 10, 100).feed(masked(BINARY, b"c" * 11))
        reason = "received WebSocket frame size 11 exceeds payload limit of 10 octets"
        self.assertEqual(sink.events, [("too big", 11, 10, reason)])

    def test_after_a_violation(self) -> None:
        """
        Data is dropped and nothing more is checked, but control frames
        (the peer's answer to the close) are still read.
        """
        close = masked(CLOSE, struct.pack("!H", 1002))
        data = (
            masked(BINARY, b"kept")
            + unmasked(BINARY, b"dropped")
            + masked(BINARY, b"dropped too")
            + unmasked(PONG, b"pong")
            + masked(3, b"unchecked")
            + close
        )
        self.assertEqual(read(data, list(range(1, len(data)))), [
            ("message", b"kept", True),
            ("violation", "unmasked client-to-server frame"),
            ("control", PONG, b"pong"),
            ("control", CLOSE, struct.pack("!H", 1002)),
        ])
        # the payload of a frame over the limit is skipped, not held, and so
        # is that of a control frame over 125 bytes
        for huge in (masked(BINARY, b"z" * 100_000), masked(PING, b"z" * 100_000)):
            sink = Recorder()
            frames = ClientFrames(sink, LIMIT, LIMIT)
            frames.feed(huge[:60_000])
            self.assertEqual(frames._pieces, [])
            self.assertTrue(frames.failed)
            frames.feed(huge[60_000:] + close)
            self.assertEqual(sink.events[1:], [("control", CLOSE, struct.pack("!H", 1002))])

    def test_stop(self) -> None:
        """Once the sink says stop (the connection is closed), nothing more is read."""
        data = masked(BINARY, b"one") + masked(BINARY, b"two")
        for cuts in ([], [len(masked(BINARY, b"one")) + 3]):
            sink = Recorder()
            sink.go_on = False
            frames = ClientFrames(sink, LIMIT, LIMIT)
            for start, stop in itertools.pairwise([0, *cuts, len(data)]):
                frames.feed(data[start:stop])
            self.assertEqual(sink.events, [("message", b"one", True)])

    def test_incomplete_header_kept(self) -> None:
        """Only the bytes of an incomplete header wait for the next read."""
        frame = masked(BINARY, b"q" * 70000)
        sink = Recorder()
        frames = ClientFrames(sink, 100_000, 100_000)
        frames.feed(frame[:13])
        self.assertEqual(frames._head, frame[:13])
        frames.feed(frame[13:])
        self.assertEqual(sink.events, [("message", b"q" * 70000, True)])
        self.assertEqual(frames._head, b"")


def upgrade(mode: str, token: str) -> bytes:
    return (
        f"GET /tunnel?local-proxy-mode={mode} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: aws.iot.securetunneling-3.0\r\n"
        f"access-token: {token}\r\n\r\n"
    ).encode()


class ServiceFramesTests(SynchronousTestCase):
    """The service's protocol reads its peers' frames with L{ClientFrames}."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.broker = Broker(self.clock)
        self.factory = TunnelServerFactory(
            self.broker, Connections(), reactor=self.clock, clock=self.clock
        )
        self.tunnel = self.broker.open_tunnel(services=["SSH"], lifetime_minutes=60)
        self.source, self.source_transport = self.connect(SOURCE, self.tunnel.source_token)
        self.destination, self.destination_transport = self.connect(
            DESTINATION, self.tunnel.destination_token
        )

    def connect(self, mode: str, token: str) -> tuple[TunnelServerProtocol, WebSocketTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = WebSocketTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(upgrade(mode, token))
        self.assertEqual(protocol.state, protocol.STATE_OPEN)
        self.addCleanup(protocol.connectionLost)
        transport.clear()
        return protocol, transport

    def relayed(self) -> list[Message]:
        decoder = RecordDecoder()
        frames = read_frames(self.destination_transport.value())
        return [m for opcode, payload in frames if opcode == BINARY for m in decoder.feed(payload)]

    def test_relayed_in_order(self) -> None:
        """Many small messages, in reads cut anywhere, are relayed in order, with pings answered."""
        sent = [Message(type=Message.STREAM_START, streamId=1, serviceId="SSH")] + [
            Message(type=Message.DATA, streamId=1, serviceId="SSH", payload=bytes([i]) * 4000)
            for i in range(30)
        ]
        data = b"".join(masked(BINARY, encode(m)) for m in sent[:10])
        data += masked(PING, b"are you there")
        data += b"".join(masked(BINARY, encode(m)) for m in sent[10:])
        rng = random.Random(5)
        cuts = sorted(rng.sample(range(1, len(data)), 40))
        for start, stop in zip([0, *cuts], [*cuts, len(data)], strict=True):
            self.source.dataReceived(data[start:stop])
        self.assertEqual(self.relayed(), sent)
        pongs = [p for opcode, p in read_frames(self.source_transport.value()) if opcode == PONG]
        self.assertEqual(pongs, [b"are you there"])

    def test_malformed_frame(self) -> None:
        """A frame breaking RFC 6455 closes its sender with 1002; nothing after it is relayed."""
        start = encode(Message(type=Message.STREAM_START, streamId=1, serviceId="SSH"))
        later = encode(Message(type=Message.DATA, streamId=1, serviceId="SSH", payload=b"late"))
        self.source.dataReceived(
            masked(BINARY, start) + unmasked(BINARY, later) + masked(BINARY, later)
        )
        self.assertEqual(self.relayed(), [Message(type=Message.STREAM_START, streamId=1,
                                                  serviceId="SSH")])
        ((opcode, payload),) = read_frames(self.source_transport.value())
        self.assertEqual(opcode, CLOSE)
        self.assertEqual(payload, struct.pack("!H", 1002) + b"unmasked client-to-server frame")
        self.assertEqual(self.source.state, self.source.STATE_CLOSING)
        # the peer's answer completes the closing handshake
        self.source.dataReceived(masked(CLOSE, struct.pack("!H", 1002)))
        self.assertTrue(self.source_transport.disconnecting)
        self.source.connectionLost()
        self.assertFalse(self.broker.describe(self.tunnel.tunnel_id).source.connected)

    def test_oversized_message(self) -> None:
        """A message over the wire's limit, in frames each within it, closes with 1009."""
        limit = self.factory.maxMessagePayloadSize
        self.source.dataReceived(masked(BINARY, b"\x00\x05" * (limit // 4), fin=False))
        self.source.dataReceived(masked(CONTINUATION, b"\x00\x05" * (limit // 4 + 1)))
        ((opcode, payload),) = read_frames(self.source_transport.value())
        self.assertEqual((opcode, payload[:2]), (CLOSE, struct.pack("!H", 1009)))
        self.assertEqual(self.relayed(), [])
