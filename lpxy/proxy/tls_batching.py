# -*- test-case-name: tests.test_tls_batching -*-
"""
TLS under the proxy's WebSocket, one call per message instead of per record.

Twisted's TLS protocol cuts every write into 16 KiB slices (a copy each),
reads the send BIO and writes the TCP transport after each slice, and hands
every 16 KiB record it decrypts to the protocol above as its own
C{dataReceived}. A WebSocket message of the tunnel is up to 128 KiB, so
each took eight of each: eight passes through the frame reader and the
record decoder on the way in, eight BIO reads and TCP writes on the way out.

L{BatchingTLSProtocol} keeps Twisted's protocol (handshake, shutdown,
producers, errors) and changes only that:

  - each write goes to OpenSSL at once (as L{lpxy.proxy.endpoints.TLSEndpoint}
    wants: no gathering of small writes to the next reactor turn), as views
    of the caller's buffer (no slices copied; a C{bytearray} is taken as it
    is), and what OpenSSL made of it is read from the send BIO and written
    to the TCP transport in one piece;
  - everything one TCP read decrypts to is handed up in one
    C{dataReceived} (bounded by the TCP read size). Above it,
    L{lpxy.proxy.ws_frames.BinaryFrameReader} reads the frames in place;
    Autobahn's own reader slices its whole buffer again after each frame, so
    big reads are for a reader like that one.

It relies on C{TLSMemoryBIOProtocol}'s C{_write}, C{_flushSendBIO} and
C{_flushReceiveBIO} (Twisted 26.10), which it overrides with the same
contracts.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

__all__ = ["BatchingTLSFactory", "BatchingTLSProtocol"]

_RECORD_OVERHEAD = 256
"""More than a TLS record adds to its plaintext (header, tag, padding)."""
_RECORD = 16384
_READ = 2 * _RECORD  # OpenSSL hands out at most one record per read


class BatchingTLSProtocol(TLSMemoryBIOProtocol):
    """
    Twisted's client TLS protocol with whole writes, each at once, and one
    delivery per read (module docstring).

    @cvar accepts_buffers: writes may be any bytes-like object (a
        C{bytearray} is encrypted from where it is, never copied to bytes).
    """

    accepts_buffers = True

    def _write(self, data: Any) -> None:
        if self._lostTLSConnection:
            return
        view = memoryview(data).cast("B")
        size = len(view)
        sent = 0
        send = self._tlsConnection.send
        try:
            while sent < size:
                sent += send(view[sent:])
        except WantReadError:
            self._bufferedWrite(bytes(view[sent:]))
        except Error:
            self._tlsShutdownFinished(Failure())
            return
        if sent:
            self._flush_send_bio(sent)

    def _flushSendBIO(self) -> None:
        self._flush_send_bio(_RECORD)

    def _flush_send_bio(self, plaintext: int) -> None:
        """Write what OpenSSL made of C{plaintext} bytes to the transport at once."""
        size = plaintext + (plaintext // _RECORD + 1) * _RECORD_OVERHEAD
        read = self._tlsConnection.bio_read
        try:
            out = read(size)
        except WantReadError:
            return  # nothing made
        if len(out) == size:
            pieces = [out]
            try:
                while True:
                    out = read(size)
                    pieces.append(out)
                    if len(out) < size:
                        break
            except WantReadError:
                pass
            out = b"".join(pieces)
        transport: Any = self.transport
        transport.write(out)

    def _flushReceiveBIO(self) -> None:
        received: list[bytes] = []
        recv = self._tlsConnection.recv
        while not self._lostTLSConnection:
            try:
                received.append(recv(_READ))
            except WantReadError:
                break
            except ZeroReturnError:
                self._deliver(received)
                # TLS has shut down: no more data comes this way.
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._deliver(received)
                self._tlsShutdownFinished(Failure())
        self._deliver(received)
        # The records read may call for an answer (a handshake message).
        self._flushSendBIO()

    def _deliver(self, received: list[bytes]) -> None:
        if not received:
            return
        data = received[0] if len(received) == 1 else b"".join(received)
        received.clear()
        if not self._aborted:
            protocol: Any = self.wrappedProtocol
            protocol.dataReceived(data)


class BatchingTLSFactory(TLSMemoryBIOFactory):
    """A TLS client factory whose connections are L{BatchingTLSProtocol}s."""

    protocol = BatchingTLSProtocol
