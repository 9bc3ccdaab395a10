# -*- test-case-name: tests.test_tunnel -*-
"""
The WebSocket to the tunneling service: handshake, records in and out, ping.

L{TunnelProtocol} is thin, as magic-wormhole's C{WSClient} is: it parses
and emits, and forwards every event to a L{TunnelEvents} object (the proxy's
connector) which decides. Records arrive through a L{RecordDecoder}
(records span and share WebSocket messages). Records to send are queued and
written together: everything queued in one reactor turn goes out as few
binary messages as the frame limit allows, each holding whole records, one
C{transport.write} per message.

Keepalive (protocol.md section 5): a ping right after the handshake and then
every C{ping_period_ms}, its payload the time in milliseconds as ASCII
digits; a pong whose payload is not one of ours is ignored; when no pong
came back for two periods the connection is dead and is dropped (time
spent with reading paused by flow control does not count: no pong can be
read then). Pings from the service are answered by Autobahn.

A close of our own (L{TunnelProtocol.close}: stopping, the end of
C{--stdio}) sends its Close frame only once the socket has taken what was
written before: Autobahn's close handshake timer starts when the Close is
queued and, on expiry, drops the connection with whatever is still unsent,
which on a slow uplink would cut off the streams' last bytes. The wait ends
on the transport's drained edge (its streaming producer resumed), which
L{lpxy._ws.pause_if_unsent} makes sure comes whatever the socket holds; when
it holds nothing, the Close goes at once. (Under TLS, Twisted may keep up to
64 KB of small writes for the next reactor turn, ahead of the Close in
order: Autobahn's timer covers those.) While bytes leave, the wait goes on;
once a whole L{DRAIN_STALL} passed with none taken, the peer counts as gone
and the connection is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from attrs import frozen
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from lpxy._ws import (
    PONGS,
    Clock,
    ClockTimer,
    Keepalive,
    QuietHotPath,
    cancel_autobahn_timers,
    pause_if_unsent,
    quiet_autobahn_log,
    raise_buffer_size,
    set_no_delay,
    unsent_bytes,
)
from lpxy.frames import (
    WIRE_FRAME_LIMIT,
    Message,
    ProtocolError,
    RecordDecoder,
    data_record_parts,
    encode,
    group_records,
)
from lpxy.proxy.tls import tls_failure
from lpxy.proxy.ws_frames import BinaryFrameReader, binary_frame
from lpxy.wire import CLOSE_NORMAL

__all__ = [
    "CloseOutcome",
    "TunnelEvents",
    "TunnelFactory",
    "TunnelProtocol",
    "describe_rejection",
]


DRAIN_STALL = 10.0
"""
A close of ours gives up once this many seconds passed without a byte taken
by the socket (seen when they end: between one and two of them after the
last byte taken).
"""


@frozen
class CloseOutcome:
    """
    How a tunnel connection ended.

    @ivar opened: the WebSocket handshake had completed.
    @ivar code: the close code the service sent, if any.
    @ivar reason: the close reason or Autobahn's description of the failure.
    @ivar http_status: the HTTP status of a refused handshake (not 101).
    @ivar by_us: we closed it (stopping, or after a protocol error).
    @ivar dead: no pong came back in two ping periods.
    @ivar tls_failure: why the TLS handshake failed, if it did (see
        L{lpxy.proxy.tls.tls_failure}).
    """

    opened: bool
    code: int | None = None
    reason: str | None = None
    http_status: int | None = None
    by_us: bool = False
    dead: bool = False
    tls_failure: str | None = None


def describe_rejection(status: int, body: str = "") -> str:
    """One line saying what a refused handshake's status means."""
    meanings = {
        400: "bad request: wrong mode for this token, or a malformed request",
        401: "unauthorized: the access token is wrong, spent or rotated, "
             "or the client token does not match",
        403: "forbidden: the access token is not accepted",
        404: "not found: wrong endpoint path",
        429: "too many requests",
    }
    meaning = meanings.get(status, "the service refused the connection")
    detail = " ".join(body.split())[:200]
    return f"{status} {meaning}" + (f" ({detail})" if detail else "")


@implementer(IPushProducer)
class _SendEdges:
    """
    The streaming producer of the WebSocket's transport: it passes the send
    buffer's full and drained edges on to the tunnel's producer (the flow
    control's L{lpxy.proxy.relay.TunnelFlow}), keeps whether the buffer is
    full, and tells a waiting close of ours when it drained.
    """

    def __init__(self) -> None:
        self.producer: Any = None
        self.full = False
        self.on_drained: Callable[[], None] | None = None

    def pauseProducing(self) -> None:
        self.full = True
        if self.producer is not None:
            self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.full = False
        if self.producer is not None:
            self.producer.resumeProducing()
        if self.on_drained is not None:
            self.on_drained()

    def stopProducing(self) -> None:
        if self.producer is not None:
            self.producer.stopProducing()


class TunnelEvents(Protocol):
    """What the proxy's connector is told about its tunnel connection."""

    def ws_open(self, protocol: TunnelProtocol) -> None:
        """The handshake completed with the expected subprotocol."""

    def ws_records(self, protocol: TunnelProtocol, messages: list[Message]) -> None:
        """Whole records arrived, in order."""

    def ws_error(self, protocol: TunnelProtocol, error: ProtocolError) -> None:
        """The record stream from the service is broken."""

    def ws_close(self, protocol: TunnelProtocol, outcome: CloseOutcome) -> None:
        """The connection ended (whether or not it had opened)."""


class TunnelProtocol(QuietHotPath, WebSocketClientProtocol):  # type: ignore[misc]
    """
    One WebSocket connection to the tunneling service.

    @ivar channel_id: the C{channel-id} header of the 101 answer.
    @ivar ready: fired by the connector once the connection is usable (the
        handshake done and, in V2/V3, the services settled); the proxy's
        C{ClientService} waits on it (C{prepareConnection}). Cancelling it
        drops the connection.
    @ivar last_rtt: the round trip of the last ping answered, in seconds.
    """

    _log = Logger()  # Autobahn owns .log
    log = quiet_autobahn_log()
    factory: TunnelFactory
    channel_id: str | None = None
    last_rtt: float | None = None

    def __init__(self) -> None:
        super().__init__()
        self._opened = False
        self._by_us = False
        self._refused: str | None = None
        self._dead = False
        self._decoder = RecordDecoder()
        self._reader: BinaryFrameReader | None = None
        self._queue: list[tuple[bytes | memoryview, ...]] = []
        self._queued = 0
        self._flush_call: Any = None
        self._keepalive: Keepalive | None = None
        self._lost: Failure | None = None
        self._edges: _SendEdges | None = None
        # A close of ours waiting for the send buffer to drain: its code
        # and reason, its give-up timer, and the bytes left when it was set.
        self._closing: tuple[int, str] | None = None
        self._drain_call: Any = None
        self._drain_left = 0
        self.ready: Deferred[None] = Deferred(lambda _: self.abort())

    # -- Autobahn callbacks ----------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        set_no_delay(self.transport)
        # A few messages fit before the buffer counts as full (relay.py,
        # invariant 2): one full/drained edge per several messages.
        raise_buffer_size(self.transport, self.factory.write_buffer)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Autobahn tells onClose only its own words for an unclean end; a
        # failed certificate or name check is in the reason.
        self._lost = reason
        super().connectionLost(reason)

    def onConnect(self, response: Any) -> None:
        expected = self.factory.subprotocol
        self.channel_id = response.headers.get("channel-id")
        if response.protocol != expected:
            # Failed here rather than raised: Autobahn logs an exception
            # from onConnect with its traceback, then opens anyway.
            self._by_us = True
            self._refused = (
                f"the service answered without subprotocol {expected!r} "
                f"(got {response.protocol!r})"
            )
            self.failHandshake(self._refused)

    def onOpen(self) -> None:
        if self.state == self.STATE_CLOSED:
            return  # the handshake was failed in onConnect
        self._opened = True
        self._reader = BinaryFrameReader(self.factory.max_frame_size)
        period = self.factory.ping_period
        if period > 0:
            self._keepalive = Keepalive(
                self.factory.clock, interval=period, timeout=2 * period,
                send_ping=self.sendPing, on_dead=self._dead_peer, life=PONGS,
            )
            self._keepalive.start()
        self.factory.events.ws_open(self)

    def dataReceived(self, data: bytes) -> None:
        # Plain binary frames are read here (lpxy.proxy.ws_frames), the
        # rest by Autobahn: what it has begun, it finishes.
        reader = self._reader
        if reader is None or (reader.between_frames and not self._autobahn_idle()):
            self._dataReceived(data)
            return
        pieces, rest = reader.feed(data)
        self.trafficStats.incomingOctetsWireLevel += len(data) - len(rest)
        if pieces:
            self._records(pieces)
        if rest and self.state != self.STATE_CLOSED:
            self._dataReceived(rest)

    def _autobahn_idle(self) -> bool:
        """Whether Autobahn is open and between messages, holding no bytes."""
        return (
            self.state == self.STATE_OPEN
            and self.current_frame is None
            and not self.inside_message
            and not self.data
        )

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self._log.warn("Ignoring a text message from the tunneling service")
            return
        self._records((payload,))

    def _records(self, payloads: Sequence[bytes | memoryview]) -> None:
        messages: list[Message] = []
        feed = self._decoder.feed
        try:
            for payload in payloads:
                messages.extend(feed(payload))
        except ProtocolError as e:
            if messages:
                self.factory.events.ws_records(self, messages)
            self.factory.events.ws_error(self, e)
            return
        if messages:
            self.factory.events.ws_records(self, messages)

    def onPong(self, payload: bytes) -> None:
        rtt = self._keepalive.pong(payload) if self._keepalive is not None else None
        if rtt is None:
            self._log.debug("Ignoring a pong that answers no ping of ours")
            return
        self.last_rtt = rtt
        if self.factory.trace:
            self._log.debug("Pong after {rtt:.3f}s", rtt=rtt)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        cancel_autobahn_timers(self)
        if self._keepalive is not None:
            self._keepalive.stop()
        self._keepalive = None
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._stop_drain_wait()
        self._queue = []
        status = None
        if not self._opened:
            status = self._http_status()
        outcome = CloseOutcome(
            opened=self._opened,
            code=code if wasClean else None,
            reason=self._refused or reason or getattr(self, "wasNotCleanReason", None),
            http_status=status,
            by_us=self._by_us,
            dead=self._dead,
            tls_failure=None if self._opened else tls_failure(self._lost, self.factory.host),
        )
        self.factory.events.ws_close(self, outcome)

    def _http_status(self) -> int | None:
        line = getattr(self, "http_status_line", None)
        if not line:
            return None
        parts = line.split()
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            return None
        return None if status == 101 else status

    @property
    def status_line(self) -> str:
        """The status line of a refused handshake (C{HTTP/1.1 401 Unauthorized})."""
        line = getattr(self, "http_status_line", None) or ""
        return " ".join(str(line).split())[:200]

    @property
    def rejection_body(self) -> str:
        """The text after the headers of a refused handshake, if any."""
        data = getattr(self, "data", b"") or b""
        end = data.find(b"\r\n\r\n")
        body = data[end + 4 :] if end >= 0 else b""
        return body[:400].decode("utf-8", "replace")

    # -- keepalive -------------------------------------------------------

    def _dead_peer(self, silence: float) -> None:
        self._log.warn(
            "No pong from the tunneling service in {seconds:.0f}s: "
            "the connection is dead",
            seconds=2 * self.factory.ping_period,
        )
        self._dead = True
        self._by_us = True
        self.dropConnection(abort=True)

    # -- sending ---------------------------------------------------------

    def send_message(self, message: Message) -> None:
        """Queue a control record."""
        record = encode(message)
        self._enqueue(len(record), (record,))

    def send_data(self, header: bytes, payload: bytes | memoryview) -> None:
        """
        Queue a DATA record made of a channel's serialized C{header} (a
        C{Message} of type DATA without payload) and C{payload} (at most
        C{max_payload_size} bytes; not copied here). The record's bytes are
        exactly what protobuf serializes for the whole message: the payload
        goes between the header's fields 1-3 and its fields 5-7.
        """
        size = len(payload)
        before, after = data_record_parts(header, size)
        if not size:
            self._enqueue(len(before), (before,))
        else:
            self._enqueue(len(before) + size + len(after), (before, payload, after))

    def _enqueue(self, size: int, pieces: tuple[bytes | memoryview, ...]) -> None:
        if self.state != self.STATE_OPEN or self._closing is not None:
            return
        self._queue.append(pieces)
        self._queued += size
        if self._queued >= self.factory.max_frame_size:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self.factory.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Write everything queued, whole records packed into messages."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        queue, self._queue, self._queued = self._queue, [], 0
        if not queue or self.state != self.STATE_OPEN:
            return
        # Frames built here, each copied once (lpxy.proxy.ws_frames), not
        # by sendMessage; the TLS layer below takes the buffer as it is.
        as_is = getattr(self.transport, "accepts_buffers", False)
        stats = self.trafficStats
        for size, pieces in group_records(queue, self.factory.max_frame_size):
            frame = binary_frame(pieces, size)
            stats.outgoingWebSocketMessages += 1
            stats.outgoingWebSocketFrames += 1
            stats.outgoingOctetsAppLevel += size
            stats.outgoingOctetsWebSocketLevel += size
            data: Any = frame if as_is else bytes(frame)
            self.sendData(data)

    # -- control ---------------------------------------------------------

    def close(self, code: int = CLOSE_NORMAL, reason: str = "local proxy closing") -> None:
        """
        Close the WebSocket from our side, once what was written before has
        left (module docstring). Records queued after this are not sent.
        """
        self._by_us = True
        self.flush()
        if self.state == self.STATE_OPEN:
            if self._closing is None:
                self._closing = (code, reason)
                self._close_when_drained()
        elif self.state != self.STATE_CLOSED:
            self.dropConnection(abort=True)

    def _close_when_drained(self) -> None:
        edges = self._send_edges()
        if not edges.full:
            pause_if_unsent(self.transport)
        if not edges.full:
            self._send_close()  # the socket holds nothing
            return
        edges.on_drained = self._send_close
        self._drain_left = unsent_bytes(self.transport) or 0
        self._drain_call = self.factory.clock.callLater(
            self.factory.drain_stall, self._drain_stalled
        )

    def _send_close(self) -> None:
        self._stop_drain_wait()
        if self.state == self.STATE_OPEN and self._closing is not None:
            self.sendClose(*self._closing)

    def _drain_stalled(self) -> None:
        self._drain_call = None
        if self.state != self.STATE_OPEN or self._closing is None:
            return
        # No edge tells of bytes taken short of the last: one look a period.
        left = unsent_bytes(self.transport) or 0
        if left < self._drain_left:
            self._drain_left = left
            self._drain_call = self.factory.clock.callLater(
                self.factory.drain_stall, self._drain_stalled
            )
            return
        self._log.warn(
            "The tunneling service took none of the last {left} bytes to send "
            "in {seconds:.0f}s: dropping the connection",
            left=left,
            seconds=self.factory.drain_stall,
        )
        self._stop_drain_wait()
        self.dropConnection(abort=True)

    def _stop_drain_wait(self) -> None:
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        if self._edges is not None:
            self._edges.on_drained = None

    def abort(self) -> None:
        """Drop the connection at once (after a protocol error, or cancelled)."""
        self._by_us = True
        if self.state != self.STATE_CLOSED:
            self.dropConnection(abort=True)

    def pause_reading(self) -> None:
        """Stop reading from the service."""
        if self._keepalive is not None:
            self._keepalive.pause()
        cast(Any, self.transport).pauseProducing()

    def resume_reading(self) -> None:
        """Read from the service again."""
        if self._keepalive is not None:
            self._keepalive.resume()
        cast(Any, self.transport).resumeProducing()

    def register_write_producer(self, producer: IPushProducer) -> None:
        """Have C{producer} paused while the WebSocket's send buffer is full."""
        self._send_edges().producer = producer

    def _send_edges(self) -> _SendEdges:
        if self._edges is None:
            self._edges = _SendEdges()
            cast(Any, self.transport).registerProducer(self._edges, True)
        return self._edges


class TunnelFactory(WebSocketClientFactory):
    """
    Builds L{TunnelProtocol}s carrying the handshake of protocol.md section 1.

    The tokens go into headers and nowhere else: not in the repr, not in
    any log line of ours.
    """

    protocol = TunnelProtocol  # type: ignore[assignment]
    log = quiet_autobahn_log()
    # No "Starting factory" / "Stopping factory" on every (re)connection:
    # the connector says in the reference's words what each attempt does.
    noisy = False

    def __init__(
        self,
        url: str,
        events: TunnelEvents,
        *,
        access_token: str,
        client_token: str | None,
        subprotocol: str,
        user_agent: str,
        clock: Clock,
        ping_period_ms: int = 20000,
        max_frame_size: int = WIRE_FRAME_LIMIT,
        open_handshake_timeout: float = 30.0,
        trace: bool = False,
        write_buffer: int = 4 * WIRE_FRAME_LIMIT,
        drain_stall: float = DRAIN_STALL,
    ) -> None:
        headers = {"access-token": access_token}
        if client_token:
            headers["client-token"] = client_token
        super().__init__(
            url,
            protocols=[subprotocol],
            useragent=user_agent,
            headers=headers,
            reactor=clock,
        )
        self.events = events
        self.subprotocol = subprotocol
        self.clock = clock
        self.ping_period = ping_period_ms / 1000.0
        self.max_frame_size = max_frame_size
        self.trace = trace
        self.write_buffer = write_buffer
        self.drain_stall = drain_stall
        self._batched_timer = ClockTimer(clock)
        self.setProtocolOptions(
            maxFramePayloadSize=max_frame_size,
            maxMessagePayloadSize=max_frame_size,
            utf8validateIncoming=False,
            openHandshakeTimeout=open_handshake_timeout,
            closeHandshakeTimeout=2,
            autoPingInterval=0,
            tcpNoDelay=True,
        )

    def __repr__(self) -> str:
        return f"<TunnelFactory {self.url}>"

