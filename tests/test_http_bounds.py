"""
Tests for L{lpxy.tunnelservice.http.BoundedHTTPChannel}: pipelined requests
against a client that reads nothing, 414/431, and the header deadline, on a
L{StringTransport} and a L{Clock}.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.resource import Resource

from lpxy.tunnelservice.api import ManagementAPI, SizeLimitedRequest
from lpxy.tunnelservice.broker import Broker
from lpxy.tunnelservice.http import HEADER_DEADLINE, MAX_UNPARSED, BoundedHTTPChannel

SEND_BUFFER = 65536
# what one read of a socket brings at most (Twisted reads 64 KiB at a time)
READ = 65536
REQUEST = (
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"X-Amz-Target: IoTSecuredTunneling.ListTunnels\r\n\r\n{}"
)


class TurnClock(Clock):
    """
    A L{Clock} that, like a reactor's turn, runs only the calls due when
    C{advance} is called: one scheduled meanwhile with C{callLater(0)}
    waits for the next C{advance}, where L{Clock} would run it at once.
    """

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        self._sortCalls()
        for call in [call for call in self.calls if call.getTime() <= self.seconds()]:
            if call in self.calls:  # not cancelled by an earlier one
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


class SendBufferTransport(StringTransport):
    """
    A transport that, like a socket's, pauses its producer once more than
    L{SEND_BUFFER} bytes wait to be sent, and resumes it when they are read.
    """

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.io.getvalue()) > SEND_BUFFER and not getattr(self, "_full", False):
            self._full = True
            self.producer.pauseProducing()

    def drain(self) -> int:
        """The client reads everything; the producer is resumed. Bytes read."""
        read = len(self.value())
        self.clear()
        if getattr(self, "_full", False):
            self._full = False
            self.producer.resumeProducing()
        return read


class BoundedChannelTests(SynchronousTestCase):
    """A L{BoundedHTTPChannel} serving the management API."""

    def connect(self) -> tuple[Any, SendBufferTransport, Clock]:
        clock = TurnClock()
        site = server.Site(ManagementAPI(Broker(clock)), reactor=clock)
        site.protocol = BoundedHTTPChannel  # type: ignore[assignment]
        site.requestFactory = SizeLimitedRequest
        channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
        transport = SendBufferTransport()
        channel.makeConnection(transport)
        return channel, transport, clock

    def test_pipelining_bounded(self) -> None:
        """
        50,000 pipelined requests from a client that reads no answer: once
        its send buffer is full the service stops parsing and reading, with
        the buffer near its mark, most requests never read, and never more
        than L{MAX_UNPARSED} and one read held unparsed.
        """
        channel, transport, clock = self.connect()
        stream = REQUEST * 50000
        sent = 0
        for _ in range(100_000):
            if transport.producerState == "producing" and sent < len(stream):
                channel.dataReceived(stream[sent:sent + READ])
                sent += READ
            elif not clock.getDelayedCalls():
                break
            self.assertLessEqual(channel.unparsed, MAX_UNPARSED + READ)
            clock.advance(0)
        self.assertEqual(transport.producerState, "paused")
        self.assertLess(len(transport.value()), 2 * SEND_BUFFER)
        self.assertLess(sent, len(stream) // 10)
        answered = transport.value().count(b"HTTP/1.1 200 OK")
        # what was read but not yet answered waits, unparsed, for the client
        self.assertLess(answered, sent // len(REQUEST))
        self.assertGreater(channel.unparsed, 0)

    def test_every_pipelined_request_answered(self) -> None:
        channel, transport, clock = self.connect()
        count = 2000
        stream = REQUEST * count
        received = b""
        sent = 0
        for _ in range(100_000):
            if transport.producerState == "producing" and sent < len(stream):
                channel.dataReceived(stream[sent:sent + READ])
                sent += READ
            elif transport.value():
                received += transport.value()
                transport.drain()
            elif not clock.getDelayedCalls():
                break
            clock.advance(0)
        received += transport.value()
        self.assertGreaterEqual(sent, len(stream))
        self.assertEqual(received.count(b"HTTP/1.1 200 OK"), count)
        self.assertEqual(channel.unparsed, 0)

    def test_long_request_line(self) -> None:
        channel, transport, _ = self.connect()
        channel.dataReceived(b"POST /" + b"a" * 100_000 + b" HTTP/1.1\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 414 URI Too Long\r\n"))
        self.assertTrue(transport.disconnecting)

    def test_large_header(self) -> None:
        for headers in (b"access-token: " + b"t" * 17_000 + b"\r\n",
                        b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 100) for i in range(200))):
            channel, transport, _ = self.connect()
            channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\n" + headers)
            self.assertTrue(
                transport.value().startswith(b"HTTP/1.1 431 Request Header Fields Too Large"),
                transport.value()[:80],
            )
            self.assertTrue(transport.disconnecting)

    def test_header_deadline(self) -> None:
        """One byte a second keeps Twisted's idle timer going, not the deadline."""
        channel, transport, clock = self.connect()
        for byte in b"POST / HTTP/1.1\r\nHost: xxxxxxxxxxxx":
            if transport.disconnecting:
                break
            channel.dataReceived(bytes([byte]))
            clock.advance(1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 Request Timeout"))
        self.assertTrue(transport.disconnecting)
        self.assertAlmostEqual(clock.seconds(), HEADER_DEADLINE, delta=1)

    def test_deadline_per_request(self) -> None:
        """A kept-alive connection may idle between requests; each request has its deadline."""
        channel, transport, clock = self.connect()
        channel.dataReceived(REQUEST)
        self.assertIn(b"200 OK", transport.value())
        transport.clear()
        clock.advance(HEADER_DEADLINE * 5)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(REQUEST)
        self.assertIn(b"200 OK", transport.value())
        self.assertFalse(transport.disconnecting)


def numbered(i: int, body: bytes = b"") -> bytes:
    """A request for C{/i}, with C{body}."""
    return b"POST /%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (i, len(body), body)


ANSWER = re.compile(rb"/\d+:\d+;")


class Echo(Resource):
    """
    Answers each request with its path and its body's length, then the
    body, now or C{delay} seconds later.
    """

    isLeaf = True

    def __init__(self, clock: Clock, delay: float | None = None) -> None:
        super().__init__()
        self.clock, self.delay = clock, delay

    def render_POST(self, request: Any) -> Any:
        body = request.content.read()
        answer = b"%s:%d;%s" % (request.path, len(body), body)
        if self.delay is None:
            return answer

        def finish() -> None:
            request.write(answer)
            request.finish()

        self.clock.callLater(self.delay, finish)
        return server.NOT_DONE_YET


class PipelinedInputTests(SynchronousTestCase):
    """How much unparsed input a L{BoundedHTTPChannel} holds and when it parses it."""

    def connect(self, delay: float | None = None) -> tuple[Any, SendBufferTransport, Clock]:
        clock = TurnClock()
        site = server.Site(Echo(clock, delay), reactor=clock)
        site.protocol = BoundedHTTPChannel  # type: ignore[assignment]
        channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
        transport = SendBufferTransport()
        channel.makeConnection(transport)
        return channel, transport, clock

    def answers(self, transport: StringTransport) -> list[bytes]:
        return ANSWER.findall(transport.value())

    def test_one_request_per_turn(self) -> None:
        """Ten requests in one read: one answered now, one more on each later turn, in order."""
        channel, transport, clock = self.connect()
        channel.dataReceived(b"".join(numbered(i) for i in range(10)))
        for turn in range(10):
            self.assertEqual(self.answers(transport), [b"/%d:0;" % i for i in range(turn + 1)])
            clock.advance(0)
        self.assertEqual(len(self.answers(transport)), 10)
        self.assertEqual(channel.unparsed, 0)
        self.assertFalse(clock.getDelayedCalls()[1:])  # the idle timer only

    def test_reading_stops_and_resumes(self) -> None:
        """
        Reading stops once a request is being answered and L{MAX_UNPARSED}
        bytes wait, and starts again once the backlog parsed is below it.
        """
        channel, transport, clock = self.connect(delay=1)
        request = numbered(7, b"x" * 100)
        held = -(-MAX_UNPARSED // len(request))  # this many requests reach the mark
        channel.dataReceived(request * held)  # one being answered, the others below the mark
        self.assertEqual(channel.unparsed, len(request) * (held - 1))
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(request)
        self.assertEqual(channel.unparsed, len(request) * held)
        self.assertEqual(transport.producerState, "paused")
        clock.advance(1)  # the first answer: the next request is parsed on the next turn
        self.assertEqual(len(self.answers(transport)), 1)
        self.assertEqual(transport.producerState, "paused")
        clock.advance(0)
        self.assertEqual(channel.unparsed, len(request) * (held - 1))
        self.assertEqual(transport.producerState, "producing")
        for _ in range(held):
            clock.advance(1)
            clock.advance(0)
        self.assertEqual(self.answers(transport), [b"/7:100;"] * (held + 1))
        self.assertEqual(channel.unparsed, 0)
        self.assertEqual(transport.producerState, "producing")

    def test_large_body_read_whole(self) -> None:
        """A body longer than L{MAX_UNPARSED} keeps being read: nothing to answer yet."""
        channel, transport, _ = self.connect()
        request = numbered(1, b"b" * (4 * MAX_UNPARSED))
        for at in range(0, len(request), 1000):
            self.assertEqual(transport.producerState, "producing")
            channel.dataReceived(request[at:at + 1000])
        self.assertEqual(self.answers(transport), [b"/1:%d;" % (4 * MAX_UNPARSED)])

    def test_partial_line_read_on(self) -> None:
        """
        A header line as long as L{MAX_UNPARSED}, not yet ended: the parser
        needs more, so reading goes on (here to a 431 once it is too long).
        """
        channel, transport, _ = self.connect()
        channel.dataReceived(b"POST /1 HTTP/1.1\r\n")
        channel.dataReceived(b"X: " + b"a" * (MAX_UNPARSED - 3))
        self.assertEqual(channel.unparsed, MAX_UNPARSED)
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(b"a" * 10)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "), transport.value()[:40])

    def test_unsent_answers_stop_parsing(self) -> None:
        """With the send buffer full, nothing more is parsed until it drains."""
        channel, transport, clock = self.connect()
        channel.dataReceived(numbered(0, b"y" * SEND_BUFFER) + numbered(1) + numbered(2))
        self.assertEqual(transport.producerState, "paused")
        clock.advance(0)
        clock.advance(0)
        self.assertEqual(self.answers(transport), [b"/0:%d;" % SEND_BUFFER])
        transport.drain()
        self.assertEqual(transport.producerState, "producing")
        clock.advance(0)
        self.assertEqual(self.answers(transport), [b"/1:0;"])
        clock.advance(0)
        self.assertEqual(self.answers(transport), [b"/1:0;", b"/2:0;"])

    def test_no_deadline_while_answering(self) -> None:
        """
        A slow answer, its buffer full and drained meanwhile, with the next
        request held: no 408 is written into it; the next one is answered.
        """
        channel, transport, clock = self.connect(delay=HEADER_DEADLINE * 3)
        channel.dataReceived(numbered(0) + numbered(1))
        transport.write(b"-" * (SEND_BUFFER + 1))  # something else fills the buffer
        transport.drain()
        clock.advance(0)
        clock.advance(HEADER_DEADLINE * 2)
        self.assertFalse(transport.disconnecting)
        clock.advance(HEADER_DEADLINE)
        clock.advance(0)
        clock.advance(HEADER_DEADLINE * 3)
        self.assertEqual(self.answers(transport), [b"/0:0;", b"/1:0;"])
        self.assertNotIn(b"408", transport.value())

    def test_pipelined_in_order(self) -> None:
        """
        Requests of many sizes pipelined in reads of many lengths, answered
        now and later: every answer comes, in order, and what is held never
        passes L{MAX_UNPARSED} and one read.
        """
        count = 300
        stream = b"".join(numbered(i, b"z" * (i * 37 % 3000)) for i in range(count))
        expected = [b"/%d:%d;" % (i, i * 37 % 3000) for i in range(count)]
        for delay in (None, 0.5):
            for read in (7, 1000, 65536):
                channel, transport, clock = self.connect(delay)
                answers: list[bytes] = []
                sent = 0
                for _ in range(len(stream)):
                    if transport.producerState == "producing" and sent < len(stream):
                        channel.dataReceived(stream[sent:sent + read])
                        sent += read
                    elif transport.value():
                        answers += self.answers(transport)
                        transport.drain()
                    elif len(answers) < count:
                        clock.advance(delay or 0)
                    else:
                        break
                    self.assertLessEqual(channel.unparsed, MAX_UNPARSED + read)
                self.assertEqual(answers, expected, (delay, read))
