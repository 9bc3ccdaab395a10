"""
Tests for L{lpxy.tunnelservice.http.BoundedHTTPChannel}: pipelined requests
against a client that reads nothing, 414/431, and the header deadline, on a
L{StringTransport} and a L{Clock}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server

from lpxy.tunnelservice.api import ManagementAPI, SizeLimitedRequest
from lpxy.tunnelservice.broker import Broker
from lpxy.tunnelservice.http import HEADER_DEADLINE, BoundedHTTPChannel

SEND_BUFFER = 65536
REQUEST = (
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"X-Amz-Target: IoTSecuredTunneling.ListTunnels\r\n\r\n{}"
)


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
        clock = Clock()
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
        its send buffer is full the service stops reading and answering,
        with the buffer near its mark and most requests never read.
        """
        channel, transport, _ = self.connect()
        stream = REQUEST * 50000
        sent = 0
        while transport.producerState == "producing" and sent < len(stream):
            channel.dataReceived(stream[sent:sent + 65536])
            sent += 65536
        self.assertEqual(transport.producerState, "paused")
        self.assertLess(len(transport.value()), 2 * SEND_BUFFER)
        self.assertLess(sent, len(stream) // 10)
        answered = transport.value().count(b"HTTP/1.1 200 OK")
        # what was read but not yet answered waits, unparsed, for the client
        self.assertLess(answered, sent // len(REQUEST))

    def test_every_pipelined_request_answered(self) -> None:
        channel, transport, _ = self.connect()
        count = 2000
        stream = REQUEST * count
        received = b""
        sent = 0
        while sent < len(stream):
            if transport.producerState == "producing":
                channel.dataReceived(stream[sent:sent + 65536])
                sent += 65536
            else:
                received += transport.value()
                transport.drain()
        while transport.value():
            received += transport.value()
            transport.drain()
        self.assertEqual(received.count(b"HTTP/1.1 200 OK"), count)

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
