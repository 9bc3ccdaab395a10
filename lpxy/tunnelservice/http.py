# -*- test-case-name: tests.test_http_bounds -*-
"""
An HTTP connection whose cost is bounded whatever its client does.

L{BoundedHTTPChannel} is Twisted's C{HTTPChannel} with these limits:
  - Pipelined input is held, unparsed, in one buffer of at most
    L{MAX_UNPARSED} bytes plus one read: once a request is being answered
    (or its answers are unsent) and that much waits, the channel stops
    reading the socket, and reads again when the backlog is parsed. Twisted
    keeps reading into C{_dataBuffer} and then parses the whole backlog in
    one go when a request finishes; here requests are parsed one at a time.
  - At most one pipelined request is parsed per reactor turn: the next one
    waits for the next turn (C{callLater(0)}), so that a client sending
    thousands of requests in one burst cannot hold the event loop while
    other clients wait.
  - It stops parsing while its answers are unsent. Twisted pauses the socket
    when the send buffer fills, but keeps answering the pipelined requests it
    already read, so a client that sends many requests and reads none grows
    the send buffer without end.
  - A request's whole header block (request line included) must arrive
    within L{HEADER_DEADLINE} seconds of its first byte (of the connection,
    for the first request); Twisted's idle timer restarts on every byte, so
    a client sending one byte at a time was never cut off. Late: 408.
  - An over-long request line answers 414 and an over-large header block
    431, instead of a bare 400 or a silent close.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from zope.interface import implementer  # type: ignore[import-untyped]

__all__ = ["HEADER_DEADLINE", "MAX_UNPARSED", "BoundedHTTPChannel"]

HEADER_DEADLINE = 10.0
# Unparsed input held before the socket is no longer read.
MAX_UNPARSED = 16384
# Input is handed to Twisted's line parser this much at a time, so that what
# it holds past a request (and copies on every line) stays small.
_FEED = 4096


def _answer(status: bytes, text: str) -> bytes:
    body = (text + "\n").encode()
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


@implementer(IPushProducer)
class _Reading:
    """
    The transport as the channel's network producer: the socket is read
    only while no reason to pause holds, whether Twisted's channel gave it
    (C{pauseProducing}) or the held input did (L{hold}).
    """

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        self._reasons: set[str] = set()

    def hold(self, reason: str, paused: bool) -> None:
        was = bool(self._reasons)
        if paused:
            self._reasons.add(reason)
        else:
            self._reasons.discard(reason)
        if was != bool(self._reasons):
            if self._reasons:
                self._producer.pauseProducing()
            else:
                self._producer.resumeProducing()

    def pauseProducing(self) -> None:
        self.hold("http", True)

    def resumeProducing(self) -> None:
        self.hold("http", False)

    def stopProducing(self) -> None:
        self._producer.stopProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._producer.unregisterProducer()


class BoundedHTTPChannel(HTTPChannel):
    """
    C{HTTPChannel} that holds a bounded amount of unparsed input, parses at
    most one pipelined request per reactor turn, stops parsing while its
    output is unsent, enforces a header deadline, and answers 414/431 for
    oversized request lines and headers.
    """

    header_deadline = HEADER_DEADLINE
    max_unparsed = MAX_UNPARSED
    _deadline: Any = None
    _turn: Any = None
    _refused = False

    def __init__(self) -> None:
        super().__init__()
        self._held = bytearray()

    @property
    def unparsed(self) -> int:
        """Bytes read from the client and not parsed yet."""
        return len(self._held) + len(self._buffer) + sum(map(len, self._dataBuffer))

    def connectionMade(self) -> None:
        super().connectionMade()
        self._reading = _Reading(self._networkProducer)
        # HTTPChannel's own pauses and resumes now go through the gate too.
        gate: Any = self._reading
        self._networkProducer = gate
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        if self._deadline is None and self.header_deadline:
            self._deadline = self.callLater(self.header_deadline, self._headers_too_slow)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        self._refuse(b"408 Request Timeout",
                     f"Request headers not received within {self.header_deadline:g} s")

    def _refuse(self, status: bytes, text: str) -> None:
        if self._refused or self.transport is None:
            return
        self._refused = True
        self.paused = True
        self._held.clear()
        self._disarm_deadline()
        transport: Any = self.transport
        transport.write(_answer(status, text))
        self.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        self.resetTimeout()
        if data and not self._handlingRequest:
            # the first byte of a request (a later one, on a kept-alive connection)
            self._arm_deadline()
        self._held += data
        self._parse()
        self._limit_reading()

    def _blocked(self) -> bool:
        """Whether parsing must wait: a request is being answered, its answers are unsent, ..."""
        return (self._handlingRequest or self._waitingForTransport or self._turn is not None
                or self._refused or self.transport is None or self._busyReceiving)

    def _parse(self) -> None:
        """Hand held input to the parser until it has a request to answer."""
        while not self._blocked():
            self.paused = False
            chunk = bytes(self._held[:_FEED])
            del self._held[:_FEED]
            LineReceiver.dataReceived(self, chunk)
            if not self._held:
                break

    def _reads(self) -> bool:
        """Whether this channel still decides when its transport is read."""
        return (self.transport is not None and not self._refused
                and not getattr(self.transport, "disconnecting", False))

    def _limit_reading(self) -> None:
        if self._reads():
            # Only input that waits counts: a parser short of bytes must get them.
            waiting = self._handlingRequest or self._waitingForTransport or self._turn is not None
            self._reading.hold("input", waiting and self.unparsed >= self.max_unparsed)

    def _next_turn(self) -> None:
        if self._turn is None and self.transport is not None:
            self._turn = self.callLater(0, self._take_turn)

    def _take_turn(self) -> None:
        self._turn = None
        if (self._held or self._buffer) and not self._handlingRequest:
            # the next request's first bytes are here: its deadline runs
            self._arm_deadline()
        self._parse()
        self._limit_reading()

    def _in_request_line(self) -> bool:
        return bool(getattr(self, "_HTTPChannel__first_line", 0))

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._too_large()
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._too_large()

    def _too_large(self) -> None:
        if self._in_request_line():
            self._refuse(b"414 URI Too Long", "Request line too long")
        else:
            self._refuse(b"431 Request Header Fields Too Large", "Request headers too large")

    def allHeadersReceived(self) -> None:
        self._disarm_deadline()
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        # One request at a time: the parser stops here, what follows stays held.
        self.paused = True
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # What Twisted's parser kept past this request goes back in front of
        # the held input, to be parsed on the next turn rather than now.
        self._held[:0] = b"".join(self._dataBuffer) + self._buffer
        self._dataBuffer = []
        self._buffer = b""
        super().requestDone(request)
        if self.persistent:
            self._next_turn()
        self._limit_reading()

    def pauseProducing(self) -> None:
        super().pauseProducing()
        # Stop parsing what is already read, and stop reading, even while a
        # request is being handled: its answer is what fills the buffer.
        self.paused = True
        if self._reads():
            self._reading.hold("output", True)

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if self._reads():
            self._reading.hold("output", False)
            # Parse what was left read but unparsed, on the next turn.
            self._next_turn()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm_deadline()
        if self._turn is not None:
            if self._turn.active():
                self._turn.cancel()
            self._turn = None
        self._held.clear()
        super().connectionLost(reason)
