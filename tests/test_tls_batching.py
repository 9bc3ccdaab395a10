"""
Tests for L{lpxy.proxy.tls_batching}: a client L{BatchingTLSProtocol} and a
Twisted TLS server joined in memory (C{StringTransport}s pumped by hand),
with a test CA.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from lpxy.proxy.tls_batching import BatchingTLSFactory, BatchingTLSProtocol
from tests.support.certs import make_test_pki


class _Recorder(Protocol):
    """Keeps every C{dataReceived} as it came, and how the connection ended."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received.append(bytes(data))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason


class _CountingTransport(StringTransport):
    """A C{StringTransport} that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class _Pair:
    """A batching TLS client and a plain Twisted TLS server, in memory."""

    def __init__(self, test: TestCase) -> None:
        directory = Path(test.mktemp())
        directory.mkdir()
        pki = make_test_pki(directory, ("localhost",))
        self.clock = Clock()
        self.client_app = _Recorder()
        self.server_app = _Recorder()
        client_factory = BatchingTLSFactory(
            optionsForClientTLS("localhost", trustRoot=pki.ca_certificate()),
            True,
            Factory.forProtocol(lambda: self.client_app),
            clock=self.clock,
        )
        server_factory = TLSMemoryBIOFactory(
            pki.server_context_factory(),
            False,
            Factory.forProtocol(lambda: self.server_app),
            clock=self.clock,
        )
        self.client = client_factory.buildProtocol(None)
        self.server = server_factory.buildProtocol(None)
        self.client_wire = _CountingTransport()
        self.server_wire = _CountingTransport()
        self.client.makeConnection(self.client_wire)
        self.server.makeConnection(self.server_wire)
        self.pump()

    def pump(self) -> None:
        """Move bytes both ways until neither side has more to say."""
        for _ in range(100):
            self.clock.advance(0)
            to_server = self.client_wire.value()
            to_client = self.server_wire.value()
            if not to_server and not to_client:
                return
            self.client_wire.clear()
            self.server_wire.clear()
            if to_server:
                self.server.dataReceived(to_server)
            if to_client:
                self.client.dataReceived(to_client)
        raise AssertionError("the TLS pair never went quiet")


class BatchingTLSTests(TestCase):
    """Whole writes out at once, one delivery per read in, the rest as Twisted's."""

    def setUp(self) -> None:
        self.pair = _Pair(self)

    def test_isBatching(self) -> None:
        """The factory builds L{BatchingTLSProtocol}s that take any buffer."""
        self.assertIsInstance(self.pair.client, BatchingTLSProtocol)
        self.assertTrue(self.pair.client.accepts_buffers)

    def test_bigWriteOneTransportWrite(self) -> None:
        """
        A write of 128 KiB is encrypted at once and written to the TCP
        transport in one piece, and arrives whole.
        """
        data = os.urandom(131072)
        self.pair.client_wire.writes = 0
        self.pair.client.write(data)
        self.assertEqual(self.pair.client_wire.writes, 1)
        self.assertGreater(len(self.pair.client_wire.value()), len(data))
        self.pair.pump()
        self.assertEqual(b"".join(self.pair.server_app.received), data)

    def test_bytearrayTakenAsIs(self) -> None:
        """A C{bytearray} write is sent as its bytes."""
        data = bytearray(os.urandom(16384 * 3 + 5))
        self.pair.client.write(data)
        self.pair.pump()
        self.assertEqual(b"".join(self.pair.server_app.received), bytes(data))

    def test_smallWriteAtOnce(self) -> None:
        """A small write is encrypted and written within the call, nothing gathered."""
        self.pair.client_wire.writes = 0
        self.pair.client.write(b"one ")
        self.assertEqual(self.pair.client_wire.writes, 1)
        self.pair.client.write(b"two")
        self.assertEqual(self.pair.client_wire.writes, 2)
        self.pair.pump()
        self.assertEqual(b"".join(self.pair.server_app.received), b"one two")

    def test_oneDeliveryPerRead(self) -> None:
        """
        Everything one TCP read decrypts to (eight records here) reaches the
        protocol above in one C{dataReceived}.
        """
        data = os.urandom(131072)
        self.pair.server.write(data)
        self.pair.clock.advance(0)
        wire = self.pair.server_wire.value()
        self.pair.server_wire.clear()
        self.pair.client.dataReceived(wire)
        self.assertEqual(self.pair.client_app.received, [data])

    def test_partialRecordKept(self) -> None:
        """A read that ends inside a record delivers the whole records before it."""
        data = os.urandom(40000)
        self.pair.server.write(data)
        self.pair.clock.advance(0)
        wire = self.pair.server_wire.value()
        self.pair.server_wire.clear()
        self.pair.client.dataReceived(wire[:20000])
        self.assertEqual(self.pair.client_app.received, [data[:16384]])
        self.pair.client.dataReceived(wire[20000:])
        self.assertEqual(b"".join(self.pair.client_app.received), data)

    def test_dataBeforeCloseNotify(self) -> None:
        """
        Data that arrives in the same read as the peer's close_notify is
        delivered before the connection ends.
        """
        data = os.urandom(50000)
        self.pair.server.write(data)
        self.pair.server.loseConnection()
        self.pair.clock.advance(0)
        wire = self.pair.server_wire.value()
        self.pair.server_wire.clear()
        self.pair.client.dataReceived(wire)
        self.assertEqual(self.pair.client_app.received, [data])
        self.assertTrue(self.pair.client_wire.disconnecting)

    def test_writeSequence(self) -> None:
        """C{writeSequence} joins and writes, in order."""
        self.pair.client.writeSequence([b"a" * 20000, b"b"])
        self.pair.pump()
        self.assertEqual(b"".join(self.pair.server_app.received), b"a" * 20000 + b"b")
