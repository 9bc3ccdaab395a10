"""
L{HostileService}: a tunneling service on a loopback port that says
whatever the test tells it, for checking that nothing a service sends makes
the local proxy print a traceback.

    service = await start_hostile(self, subprotocol=None)
    service.on_open = lambda connection: connection.send_records([...])

It speaks just enough RFC 6455 by hand (no Autobahn, so it can break the
rules): it answers the upgrade with a 101 carrying the subprotocol it was
given (the one offered by default, none, or any other), then sends what the
test asks (records, raw WebSocket payloads, text) and keeps the records each
proxy sends. It answers pings and closes; it never masks.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from lpxy.frames import Message, RecordDecoder, encode
from tests.support.wsframes import BINARY, CLOSE, PING, PONG, TEXT, accept_response, frame

__all__ = ["OFFERED", "HostileConnection", "HostileService", "start_hostile"]

OFFERED = "offered"
"""Answer with the subprotocol the proxy offered."""


class HostileConnection(Protocol):
    """One proxy's WebSocket, as the hostile service sees it."""

    factory: HostileService

    def __init__(self) -> None:
        self.request = b""
        self.headers: dict[str, str] = {}
        self.received: list[Message] = []
        self._upgraded = False
        self._buffer = b""
        self._decoder = RecordDecoder()
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._upgraded:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.request, self._buffer = self._buffer[: end + 4], self._buffer[end + 4 :]
            self._upgraded = True
            self._answer()
        self._read_frames()

    def _answer(self) -> None:
        for line in self.request.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        chosen = self.factory.subprotocol
        if chosen == OFFERED:
            chosen = self.headers.get("sec-websocket-protocol")
        self.transport.write(accept_response(self.request, chosen))
        if self.factory.on_open is not None:
            self.factory.on_open(self)

    def _read_frames(self) -> None:
        while len(self._buffer) >= 2:
            data = self._buffer
            opcode, size, offset = data[0] & 0x0F, data[1] & 0x7F, 2
            if size == 126:
                if len(data) < 4:
                    return
                (size,) = struct.unpack_from(">H", data, 2)
                offset = 4
            elif size == 127:
                if len(data) < 10:
                    return
                (size,) = struct.unpack_from(">Q", data, 2)
                offset = 10
            masked = bool(data[1] & 0x80)
            mask = data[offset : offset + 4] if masked else b""
            offset += 4 if masked else 0
            if len(data) < offset + size:
                return
            payload = data[offset : offset + size]
            self._buffer = data[offset + size :]
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            self._frame(opcode, payload)

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode in (BINARY, 0):
            self.received.extend(self._decoder.feed(payload))
        elif opcode == PING:
            self.transport.write(frame(PONG, payload))
        elif opcode == CLOSE:
            self.transport.write(frame(CLOSE, payload[:2]))
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.connections_lost += 1
        self.closed.callback(None)

    # -- what the test sends -------------------------------------------------

    def send_records(self, messages: Iterable[Message]) -> None:
        """Send C{messages} as records, all in one binary message."""
        self.send_payload(b"".join(encode(m) for m in messages))

    def send_payload(self, payload: bytes, opcode: int = BINARY) -> None:
        """Send one WebSocket message (binary unless told) holding C{payload}."""
        self.transport.write(frame(opcode, payload))

    def send_raw(self, data: bytes) -> None:
        """Write C{data} as it is: frames made by hand, or not frames at all."""
        self.transport.write(data)

    def send_text(self, text: str) -> None:
        """Send a text message."""
        self.send_payload(text.encode(), TEXT)


class HostileService(Factory):
    """
    Builds a L{HostileConnection} for each proxy that connects.

    @ivar subprotocol: what the 101 names: L{OFFERED}, L{None} (no
        C{Sec-WebSocket-Protocol}) or any text.
    @ivar on_open: called with each connection once its 101 is sent.
    """

    protocol = HostileConnection
    noisy = False

    def __init__(self, subprotocol: str | None = OFFERED) -> None:
        self.subprotocol = subprotocol
        self.on_open: Callable[[HostileConnection], object] | None = None
        self.connections: list[HostileConnection] = []
        self.connections_lost = 0
        self.port = 0
        self._waiting: list[tuple[int, Deferred[HostileConnection]]] = []

    def buildProtocol(self, addr: Any) -> HostileConnection:
        connection = HostileConnection()
        connection.factory = self
        self.connections.append(connection)
        waiting, self._waiting = self._waiting, []
        for count, d in waiting:
            self._check(count, d)
        return connection

    def _check(self, count: int, d: Deferred[HostileConnection]) -> None:
        if len(self.connections) >= count:
            d.callback(self.connections[count - 1])
        else:
            self._waiting.append((count, d))

    def connection(self, count: int = 1) -> Deferred[HostileConnection]:
        """Fires with the C{count}th connection once it is made."""
        d: Deferred[HostileConnection] = Deferred()
        self._check(count, d)
        return d


async def start_hostile(case: TestCase, subprotocol: str | None = OFFERED) -> HostileService:
    """
    Listen on 127.0.0.1 port 0 for C{case}; a cleanup stops listening and
    closes what is still connected.
    """
    service = HostileService(subprotocol)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(service)
    service.port = port.getHost().port

    async def stop() -> None:
        await port.stopListening()
        for connection in service.connections:
            if not connection.closed.called:
                connection.transport.abortConnection()
                await connection.closed

    case.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    return service
