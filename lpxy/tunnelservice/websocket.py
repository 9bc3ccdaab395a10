# -*- test-case-name: tests.test_websocket_service -*-
"""
The data plane: one WebSocket per tunnel end, records relayed between them.

Handshake (C{GET /tunnel?local-proxy-mode=source|destination}): the request
must name the mode once, offer at least one of the subprotocols
C{aws.iot.securetunneling-3.0/2.0/1.0} (the newest offered is chosen), carry
the access token in the C{access-token} header or the C{awsiot-tunnel-token}
cookie (exactly one), and may carry a C{client-token}. A malformed request is
answered 400, a token the broker refuses 401 (or 400 for a mode mismatch),
with the reason as a plain-text body. On success the 101 carries a
C{channel-id} header, and 2.0/3.0 peers first receive SERVICE_IDS.

Relaying: the payloads of binary messages form a record stream. It is cut
into records with L{RecordDecoder.feed_raw}; each record is parsed only to
check what a client may send and to follow which streams are open (the
rules, the ledger and the pairing of the two ends are in
L{lpxy.tunnelservice.policy}). Records go to the partner, through the
pairing, unchanged and in order, in as few messages as possible, none over
L{WIRE_FRAME_LIMIT}; when a whole incoming message is whole records it is sent
on as it is. Without a partner, DATA is dropped and starts are answered with
a reset. When a partner goes away, the peer left gets a STREAM_RESET for
each stream still open.

Flow control invariants:
  - Each peer's transport has the partner's reading as its streaming
    producer: when our write buffer passes Twisted's high-water mark the
    partner's transport stops reading, and resumes once ours drains. So at
    most one read's worth of records plus a transport buffer is held per
    direction, whatever the peers' speeds.
  - Nothing else buffers: the decoder keeps at most one incomplete record.
  - When a pairing ends (partner gone, replaced, closed) both registrations
    are removed and the peer left is resumed, so it never stays paused.

Liveness: a peer whose TCP connection died silently (half-open) would stay
CONNECTED for ever, so every peer is watched. Any bytes from it count as a
sign of life. After C{ping_interval} seconds of silence the service pings
it (proxies answer pings); once nothing at all has arrived for
C{idle_timeout} seconds the connection is dropped, which disconnects its end
and resets the partner's streams. While the service itself is not reading
from a peer (flow control), that peer's silence is not held against it.
"""

from __future__ import annotations

from http.cookies import CookieError, SimpleCookie
from typing import Any, Protocol

from autobahn.twisted.websocket import (
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from zope.interface import implementer  # type: ignore[import-untyped]

from lpxy._ws import (
    ANYTHING,
    Clock,
    Keepalive,
    cancel_autobahn_timers,
    quiet_autobahn_log,
)
from lpxy.frames import (
    WIRE_FRAME_LIMIT,
    Message,
    ProtocolError,
    RecordDecoder,
    encode,
    encode_body,
    pack_records,
)
from lpxy.tunnelservice.broker import (
    Attachment,
    Broker,
    HandshakeRefused,
)
from lpxy.tunnelservice.policy import (
    Pairing,
    RecordRules,
    TunnelEnd,
    Violation,
    refusals,
)
from lpxy.tunnelservice.store import DESTINATION, SOURCE
from lpxy.wire import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED_DATA,
    SUBPROTOCOLS,
    choose_subprotocol,
    is_valid_client_token,
    subprotocol_version,
)

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_PING_INTERVAL",
    "ConnectionRegistry",
    "TunnelServerFactory",
    "TunnelServerProtocol",
]

TOKEN_COOKIE = "awsiot-tunnel-token"

DEFAULT_PING_INTERVAL = 30.0
DEFAULT_IDLE_TIMEOUT = 90.0


class ConnectionRegistry(Protocol):
    """Where the factory's connections are kept (the service's L{Connections})."""

    def add(self, connection: Any) -> None:
        """A connection is open."""

    def discard(self, connection: Any) -> None:
        """A connection is gone."""


@implementer(IPushProducer)
class _ReadingOf:
    """The reading side of a tunnel end, registered as the producer of its partner's transport."""

    def __init__(self, end: TunnelEnd) -> None:
        self._end = end

    def pauseProducing(self) -> None:
        self._end.pause_reading()

    def resumeProducing(self) -> None:
        self._end.resume_reading()

    def stopProducing(self) -> None:
        # The partner's transport is gone; the broker tells us separately.
        pass


class TunnelServerProtocol(WebSocketServerProtocol):
    """
    One tunnel end's WebSocket: handshake rules, checks and relaying, and
    the liveness watch that pings a silent peer and drops a dead one.
    """

    _log = Logger()  # autobahn owns .log
    log = quiet_autobahn_log()
    factory: TunnelServerFactory
    transport: Any

    _attachment: Attachment | None = None
    """Set while the broker counts this connection as its end's."""
    _info: Attachment | None = None
    """The attachment this connection had, for logging after it is let go."""
    _pairing: Pairing | None = None
    _rules: RecordRules | None = None
    _version = 0
    _reading_paused = False
    _keepalive: Keepalive | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._decoder = RecordDecoder()
        self._bytes_in = 0
        self._bytes_out = 0
        # twisted.web's channel registered itself as the producer of this
        # transport before the WebSocket resource took it over.
        self.transport.unregisterProducer()
        self.factory.connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self._keepalive is not None:
            self._keepalive.heard()
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_keepalive()
        super().connectionLost(reason)
        self.factory.connections.discard(self)

    def _end_fields(self) -> dict[str, str | None]:
        """The log fields naming the tunnel end this connection serves (or served)."""
        info = self._info
        return {
            "mode": info.mode if info else None,
            "tunnel_id": info.tunnel_id if info else None,
            "channel_id": info.channel_id if info else None,
        }

    # Liveness

    def _start_keepalive(self) -> None:
        factory = self.factory
        self._keepalive = Keepalive(
            factory.clock, interval=factory.ping_interval, timeout=factory.idle_timeout,
            send_ping=self._ping, on_dead=self._silent, life=ANYTHING,
        )
        if self._reading_paused:
            self._keepalive.pause()
        self._keepalive.start()

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.stop()

    def _ping(self, payload: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.sendPing(payload)
        else:
            self._stop_keepalive()  # closing: the watch is over

    def _silent(self, silent: float) -> None:
        if self.state != self.STATE_OPEN:
            return
        self._log.warn(
            "Dropping {mode} of tunnel {tunnel_id}, channel {channel_id}, from "
            "{peer}: nothing received for {silent:.0f} seconds",
            **self._end_fields(), peer=self.peer, silent=silent,
        )
        self.wasClean = False
        self.wasNotCleanReason = "peer silent"
        self.dropConnection(abort=True)

    # Handshake

    def onConnect(self, request: ConnectionRequest) -> tuple[str, dict[str, str]]:
        # Autobahn turns any other exception into a bare 500 and loses it.
        try:
            return self._on_connect(request)
        except ConnectionDeny as deny:
            self._log.info(
                "Refused tunnel handshake from {peer}: {status} {reason}",
                peer=self.peer, status=deny.code, reason=deny.reason,
            )
            raise
        except BaseException:
            self._log.failure("Error in tunnel handshake from {peer}", peer=self.peer)
            raise

    def _on_connect(self, request: ConnectionRequest) -> tuple[str, dict[str, str]]:
        if request.path != "/tunnel":
            raise ConnectionDeny(400, f"Invalid request path {request.path!r}: use /tunnel")
        modes = request.params.get("local-proxy-mode", [])
        if len(modes) != 1 or modes[0] not in (SOURCE, DESTINATION):
            raise ConnectionDeny(
                400, "Missing or invalid local-proxy-mode: use source or destination"
            )
        mode = modes[0]
        chosen = choose_subprotocol(request.protocols)
        if chosen is None:
            raise ConnectionDeny(
                400,
                "No supported subprotocol: offer one of " + ", ".join(reversed(SUBPROTOCOLS)),
            )
        client_token = request.headers.get("client-token")
        if client_token is not None and not is_valid_client_token(client_token):
            raise ConnectionDeny(400, "Invalid client-token: use 32 to 128 of a-z, A-Z, 0-9 and -")
        header_token = request.headers.get("access-token")
        cookie_token = self._cookie_token(request.headers.get("cookie"))
        if header_token is not None and cookie_token is not None:
            raise ConnectionDeny(
                400,
                "Give the access token either in the access-token header "
                f"or in the {TOKEN_COOKIE} cookie, not both",
            )
        token = header_token if header_token is not None else cookie_token
        if not token:
            raise ConnectionDeny(401, "Missing access token")
        try:
            attachment = self.factory.broker.connect(mode, token, client_token, self)
        except HandshakeRefused as refused:
            raise ConnectionDeny(refused.status, refused.reason) from None
        self._attachment = self._info = attachment
        self._rules = RecordRules(attachment.mode, attachment.services)
        self._version = subprotocol_version(chosen)
        self._subprotocol = chosen
        return chosen, {"channel-id": attachment.channel_id}

    def _cookie_token(self, header: str | None) -> str | None:
        if header is None:
            return None
        values = []
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == TOKEN_COOKIE:
                values.append(value)
        if not values:
            return None
        if len(values) > 1:
            raise ConnectionDeny(400, f"More than one {TOKEN_COOKIE} cookie")
        try:
            cookie: SimpleCookie = SimpleCookie()
            cookie.load(f"{TOKEN_COOKIE}={values[0]}")
            return cookie[TOKEN_COOKIE].value
        except (CookieError, KeyError):
            raise ConnectionDeny(400, f"Malformed {TOKEN_COOKIE} cookie") from None

    def sendHttpErrorResponse(
        self, code: int, reason: str, responseHeaders: Any = None
    ) -> None:
        # Autobahn puts the reason in the status line only; clients show the body.
        body = (reason + "\n").encode("utf-8")
        phrase = RESPONSES.get(code, b"Error").decode("latin-1")
        lines = [
            f"HTTP/1.1 {code} {phrase}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        for name, value in responseHeaders or ():
            lines.append(f"{name}: {value}")
        self.sendData(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body)

    def onOpen(self) -> None:
        try:
            self._start_keepalive()
            attachment = self._info
            assert attachment is not None
            self._log.info(
                "Peer connected: {mode} of tunnel {tunnel_id}, channel {channel_id}, "
                "from {peer}, {subprotocol}",
                **self._end_fields(), peer=self.peer, subprotocol=self._subprotocol,
            )
            if self._version >= 2:
                self.send_records(encode(Message(
                    type=Message.SERVICE_IDS,
                    availableServiceIds=list(attachment.services),
                )))
        except BaseException:
            self._log.failure("Error opening tunnel connection from {peer}", peer=self.peer)
            if self._attachment is not None:
                self.factory.broker.disconnect(self._attachment)
            self.close(CLOSE_INTERNAL_ERROR, "internal error")

    # What the broker asks of a peer (IPeer)

    def close(self, code: int, reason: str) -> None:
        """Close this connection; the broker has already let it go."""
        if self._attachment is not None:
            self._attachment = None
            self._log.info(
                "Closing {mode} of tunnel {tunnel_id}, channel {channel_id}: "
                "{code} {reason}",
                **self._end_fields(), code=code, reason=reason,
            )
        self._leave_pairing()
        if self.state == self.STATE_OPEN:
            # sendClose allows only 1000 and 3000-4999; we also need 1001, 1002, 1008.
            self.sendCloseFrame(
                code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False
            )
        elif self.state != self.STATE_CLOSED:
            self.dropConnection(abort=False)

    def partner_joined(self, partner: TunnelServerProtocol) -> None:
        pairing = self._pairing
        if pairing is not None:
            if pairing.partner_of(self) is partner:
                # The broker tells both ends: the pairing made when the
                # partner was told has introduced itself already.
                return
            pairing.dissolve()
        Pairing(self, partner)

    def partner_left(self, partner: TunnelServerProtocol) -> None:
        pairing = self._pairing
        if pairing is not None and pairing.partner_of(self) is partner:
            pairing.left(partner)

    def _leave_pairing(self) -> None:
        if self._pairing is not None:
            self._pairing.dissolve()
        else:
            self._unwire()

    # What a pairing asks of a tunnel end (TunnelEnd)

    @property
    def accepting_records(self) -> bool:
        """Whether records can be sent to this peer now."""
        return bool(self.state == self.STATE_OPEN)

    def send_records(self, data: bytes) -> None:
        """Send whole records to this peer, as one binary message."""
        self._bytes_out += len(data)
        self.sendMessage(data, isBinary=True)

    def paired(self, pairing: Pairing) -> None:
        """Relay through C{pairing}; the partner's reading yields to this transport."""
        self._pairing = pairing
        self.transport.unregisterProducer()
        self.transport.registerProducer(_ReadingOf(pairing.partner_of(self)), True)

    def parted(self) -> None:
        """No partner any more: nothing yields to this transport, and it is read again."""
        self._pairing = None
        self._unwire()

    def _unwire(self) -> None:
        if self.transport is not None:
            self.transport.unregisterProducer()
        self.resume_reading()

    # Flow control

    @property
    def reading_paused(self) -> bool:
        """Whether the service has stopped reading from this peer (flow control)."""
        return self._reading_paused

    def pause_reading(self) -> None:
        """Stop reading from this peer until L{resume_reading}."""
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pauseProducing()
            if self._keepalive is not None:
                # What it sends waits in the kernel: not silence.
                self._keepalive.pause()

    def resume_reading(self) -> None:
        """Read from this peer again."""
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resumeProducing()
            if self._keepalive is not None:
                self._keepalive.resume()

    # Relaying

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._attachment is None:
            return  # closing: nothing more is relayed
        try:
            if not isBinary:
                raise Violation(CLOSE_UNSUPPORTED_DATA, "text messages are not allowed")
            self._relay(payload)
        except Violation as violation:
            self._violated(violation.code, violation.reason)
        except ProtocolError as e:
            self._violated(CLOSE_PROTOCOL_ERROR, str(e))

    def _violated(self, code: int, reason: str) -> None:
        attachment = self._attachment
        assert attachment is not None
        self._log.warn(
            "Closing {mode} of tunnel {tunnel_id}, channel {channel_id}, from {peer}: "
            "{code} {reason}",
            **self._end_fields(), peer=self.peer, code=code, reason=reason,
        )
        self.factory.broker.disconnect(attachment)
        self.close(code, reason)

    def _relay(self, payload: bytes) -> None:
        rules = self._rules
        assert rules is not None
        self._bytes_in += len(payload)
        whole = self._decoder.pending == 0
        bodies = self._decoder.feed_raw(payload)
        whole = whole and self._decoder.pending == 0
        if not bodies:
            return
        controls = rules.check(bodies)
        pairing = self._pairing
        if pairing is not None and pairing.relay(
            self, controls, [payload] if whole else pack_records((encode_body(b),) for b in bodies)
        ):
            return
        # Without a partner, a start is answered with its reset at once.
        replies = refusals(controls)
        if replies:
            self.send_records(b"".join(encode(m) for m in replies))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        cancel_autobahn_timers(self)
        self._stop_keepalive()
        attachment, self._attachment = self._attachment, None
        if attachment is not None:
            self.factory.broker.disconnect(attachment)
        self._leave_pairing()
        if self._info is not None:
            self._log.info(
                "Peer disconnected: {mode} of tunnel {tunnel_id}, channel {channel_id}, "
                "from {peer} ({code} {reason}; {bytes_in} bytes in, {bytes_out} out)",
                **self._end_fields(), peer=self.peer, code=code, reason=reason,
                bytes_in=self._bytes_in, bytes_out=self._bytes_out,
            )


class TunnelServerFactory(WebSocketServerFactory):
    """
    Builds L{TunnelServerProtocol}s for one L{Broker}.

    @param broker: decides which handshakes succeed and pairs the peers.
    @param connections: where the open connections are kept.
    @param reactor: for Autobahn's timers (tests pass their own).
    @param clock: the time source of the liveness checks (the reactor unless given).
    @param ping_interval: seconds of silence after which a peer is pinged.
    @param idle_timeout: seconds of silence after which a peer is dropped.
    """

    protocol = TunnelServerProtocol  # type: ignore[assignment]
    log = quiet_autobahn_log()

    def __init__(
        self,
        broker: Broker,
        connections: ConnectionRegistry,
        reactor: Any = None,
        clock: Clock | None = None,
        ping_interval: float = DEFAULT_PING_INTERVAL,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        if not 0 < ping_interval < idle_timeout:
            raise ValueError("need 0 < ping_interval < idle_timeout")
        super().__init__(server="lpxy-tunnelservice", reactor=reactor)
        self.broker = broker
        self.clock: Clock = clock if clock is not None else self.reactor
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self.connections = connections
        self.setProtocolOptions(
            maxFramePayloadSize=WIRE_FRAME_LIMIT,
            maxMessagePayloadSize=WIRE_FRAME_LIMIT,
            autoFragmentSize=0,
            utf8validateIncoming=False,
            failByDrop=False,
            # Our own liveness check instead, which counts any bytes as
            # life and spares a peer we are not reading from.
            autoPingInterval=0,
            # twisted.web has read the whole request before the WebSocket
            # takes over, so the opening handshake cannot stall.
            openHandshakeTimeout=0,
            tcpNoDelay=True,
            perMessageCompressionAccept=lambda offers: None,
        )
