# -*- test-case-name: tests.test_http_bounds -*-
"""
An HTTP connection whose cost is bounded whatever its client does.

L{BoundedHTTPChannel} is Twisted's C{HTTPChannel} with three limits:
  - It stops reading while its answers are unsent. Twisted pauses the socket
    when the send buffer fills, but keeps answering the pipelined requests it
    already read, so a client that sends many requests and reads none grows
    the send buffer without end; here parsing stops too until the buffer drains.
  - A request's whole header block (request line included) must arrive
    within L{HEADER_DEADLINE} seconds of its first byte (of the connection,
    for the first request); Twisted's idle timer restarts on every byte, so
    a client sending one byte at a time was never cut off. Late: 408.
  - An over-long request line answers 414 and an over-large header block
    431, instead of a bare 400 or a silent close.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

__all__ = ["HEADER_DEADLINE", "BoundedHTTPChannel"]

HEADER_DEADLINE = 10.0


def _answer(status: bytes, text: str) -> bytes:
    body = (text + "\n").encode()
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class BoundedHTTPChannel(HTTPChannel):
    """
    C{HTTPChannel} that stops parsing while its output is unsent, enforces a
    header deadline, and answers 414/431 for oversized request lines and
    headers.
    """

    header_deadline = HEADER_DEADLINE
    _deadline: Any = None
    _refused = False

    def connectionMade(self) -> None:
        super().connectionMade()
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
        self._disarm_deadline()
        transport: Any = self.transport
        transport.write(_answer(status, text))
        self.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if data and not self._handlingRequest:
            # the first byte of a request (a later one, on a kept-alive connection)
            self._arm_deadline()
        super().dataReceived(data)

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

    def pauseProducing(self) -> None:
        super().pauseProducing()
        # Stop parsing what is already read, and stop reading, even while a
        # request is being handled: its answer is what fills the buffer.
        self.paused = True
        producer: Any = self._networkProducer
        producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        super().resumeProducing()
        if not self._refused and self.transport is not None:
            # Parse what was left read but unparsed.
            super().dataReceived(b"")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm_deadline()
        super().connectionLost(reason)
