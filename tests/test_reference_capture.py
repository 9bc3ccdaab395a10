"""
Interoperability with the reference local proxy, without the reference: its
bytes, captured once (L{tests.support.refcapture}), replayed against lpxy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpxy.frames import Message, RecordDecoder
from lpxy.proxy.session import Session
from tests.support.recorders import Recorder
from tests.support.refcapture import (
    REFERENCE_ACCESS_TOKEN,
    REFERENCE_FIRST_PAYLOAD,
    REFERENCE_SECOND_PAYLOAD,
    REFERENCE_SOURCE_FRAMES,
    REFERENCE_SOURCE_REQUEST,
)
from tests.support.tunnelservice import start_tunnelservice
from tests.support.wsframes import BINARY, PING, PONG, parse_request, read_frames

V3 = "aws.iot.securetunneling-3.0"


def reference_records() -> list[Message]:
    """The records of the reference's binary messages, in order."""
    stream = b"".join(
        payload for opcode, payload in read_frames(REFERENCE_SOURCE_FRAMES)
        if opcode in (BINARY, 0)
    )
    return RecordDecoder().feed(stream)


def summary(messages: Sequence[Message]) -> list[tuple[str, int, str, int, bytes]]:
    return [
        (Message.Type.Name(m.type), m.streamId, m.serviceId, m.connectionId, m.payload)
        for m in messages
    ]


EXPECTED = [
    ("STREAM_START", 1, "", 1, b""),
    ("DATA", 1, "", 1, REFERENCE_FIRST_PAYLOAD),
    ("CONNECTION_START", 1, "", 2, b""),
    ("DATA", 1, "", 2, REFERENCE_SECOND_PAYLOAD),
    ("CONNECTION_RESET", 1, "", 1, b""),
    ("CONNECTION_RESET", 1, "", 2, b""),
]


class CaptureTests(SynchronousTestCase):
    def test_capture_reads_as_described(self) -> None:
        """
        The capture holds what its docstring says: a ping, then one record
        per message, the big one cut into a frame and a continuation.
        """
        frames = read_frames(REFERENCE_SOURCE_FRAMES)
        self.assertEqual([opcode for opcode, _ in frames], [PING, 2, 2, 0, 2, 2, 2, 2])
        self.assertEqual(len(frames[2][1]), 4096)
        self.assertTrue(frames[0][1].isdigit())
        self.assertEqual(summary(reference_records()), EXPECTED)


class DestinationSessionTests(SynchronousTestCase):
    def test_reference_source_records(self) -> None:
        """
        A V3 destination opens, feeds and closes both of the reference's
        connections from its exact records, and sends nothing back.
        """
        actions = Recorder()
        session = Session("destination", [""], actions)
        session.connected()
        session.received(Message(type=Message.SERVICE_IDS))
        for message in reference_records():
            session.received(message)
        first, second = actions.opened
        self.assertEqual(
            [(c.stream_id, c.connection_id) for c in (first, second)], [(1, 1), (1, 2)]
        )
        self.assertEqual(
            actions.delivered,
            [(first, REFERENCE_FIRST_PAYLOAD), (second, REFERENCE_SECOND_PAYLOAD)],
        )
        self.assertEqual(actions.closed, [first, second])
        self.assertEqual(actions.sent, [])


class OlderSubprotocolTests(SynchronousTestCase):
    def test_reference_source_offering_an_older_subprotocol(self) -> None:
        """
        The reference's C{websocket.subprotocol} setting changes only its
        handshake header: offering 2.0 or 1.0 it still sends these very
        records, connection ids included, and drops DATA without its
        connection id. A destination that offered the same older
        subprotocol answers with the ids the source used.
        """
        for subprotocol in ("aws.iot.securetunneling-2.0", "aws.iot.securetunneling-1.0"):
            actions = Recorder()
            session = Session("destination", [""], actions, subprotocol=subprotocol)
            session.connected()
            if session.version > 1:
                session.received(Message(type=Message.SERVICE_IDS))
            stream_start, first_data = reference_records()[:2]
            session.received(stream_start)
            session.received(first_data)
            (channel,) = actions.opened
            self.assertEqual(actions.delivered, [(channel, REFERENCE_FIRST_PAYLOAD)])
            reply = Message.FromString(channel.header + b"\x22\x01y")
            self.assertEqual(
                (reply.type, reply.streamId, reply.connectionId), (Message.DATA, 1, 1)
            )
            session.local_closed(channel)
            self.assertEqual(
                summary(actions.sent), [("CONNECTION_RESET", 1, "", 1, b"")]
            )


class _RawPeer(Protocol):
    """
    A WebSocket client written by hand: sends a request, then whatever it
    is told, and parses the service's (unmasked) frames.
    """

    transport: Any

    def __init__(self, request: bytes) -> None:
        self._request = request
        self.received = b""
        self.head: bytes | None = None
        self.frames: list[tuple[int, bytes]] = []
        self._decoder = RecordDecoder()
        self.records: list[Message] = []
        self._waiting: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.head is None:
            if b"\r\n\r\n" not in self.received:
                return
            self.head, _, self.received = self.received.partition(b"\r\n\r\n")
        self.received = self._parse(self.received)
        self._check()

    def _parse(self, data: bytes) -> bytes:
        while len(data) >= 2:
            size = data[1] & 0x7F
            start = 2 + {126: 2, 127: 8}.get(size, 0)
            if len(data) < start:
                break
            if size >= 126:
                size = int.from_bytes(data[2:start], "big")
            if len(data) < start + size:
                break
            [(opcode, payload)] = read_frames(data[:start + size])
            data = data[start + size:]
            self.frames.append((opcode, payload))
            if opcode in (BINARY, 0):
                self.records.extend(self._decoder.feed(payload))
        return data

    def when(self, condition: Callable[[], bool]) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((condition, d))
        self._check()
        return d

    def _check(self) -> None:
        for entry in list(self._waiting):
            if entry[0]():
                self._waiting.remove(entry)
                entry[1].callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.errback(AssertionError(f"connection lost first; received {self.head!r}"))
        self.lost.callback(None)


def _request(mode: str, token: str) -> bytes:
    lines = [
        f"GET /tunnel?local-proxy-mode={mode} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Protocol: {V3}",
        f"access-token: {token}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class ServiceReplayTests(TestCase):
    async def _connect(self, port: int, request: bytes) -> _RawPeer:
        peer = _RawPeer(request)
        endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        await endpoint.connect(Factory.forProtocol(lambda: peer))

        async def close() -> None:
            peer.transport.loseConnection()
            await peer.lost

        self.addCleanup(defer.Deferred.fromCoroutine, close())
        await peer.when(lambda: peer.head is not None and len(peer.records) >= 1)
        return peer

    async def test_reference_source_through_tunnelservice(self) -> None:
        """
        The tunnel service accepts the reference's exact upgrade request
        (C{Host} without the port, lower-case C{Connection: upgrade} and
        C{access-token}), answers with its subprotocol, a C{channel-id},
        SERVICE_IDS and a pong to its ping, and relays its fragmented,
        one-record-per-message stream to the destination record for record.
        """
        fixture = await start_tunnelservice(self)
        opened = fixture.open_tunnel()
        destination = await self._connect(
            fixture.port, _request("destination", opened.destination_token)
        )
        request = REFERENCE_SOURCE_REQUEST.replace(
            REFERENCE_ACCESS_TOKEN.encode(), opened.source_token.encode()
        )
        source = await self._connect(fixture.port, request)

        assert source.head is not None
        status, headers, _ = parse_request(source.head + b"\r\n\r\n")
        self.assertEqual(status.split(" ")[1], "101")
        self.assertEqual(headers["sec-websocket-protocol"], V3)
        self.assertTrue(headers["channel-id"])
        self.assertEqual(summary(source.records), [("SERVICE_IDS", 0, "", 0, b"")])

        source.transport.write(REFERENCE_SOURCE_FRAMES)
        ping = read_frames(REFERENCE_SOURCE_FRAMES)[0][1]
        await source.when(lambda: (PONG, ping) in source.frames)
        await destination.when(lambda: len(destination.records) >= 1 + len(EXPECTED))
        self.assertEqual(summary(destination.records[1:]), EXPECTED)
        self.assertEqual(summary(source.records), [("SERVICE_IDS", 0, "", 0, b"")])
