# -*- test-case-name: tests.test_websocket_service -*-
"""
The data plane: one WebSocket per tunnel end, records relayed between them.

Handshake: the request is checked as L{lpxy.tunnelservice.handshake} says,
then the broker takes the token, or refuses it with 401 (or 400 for a mode
mismatch). On success the 101 carries a C{channel-id} header, and 2.0/3.0
peers first receive SERVICE_IDS.

Relaying: the payloads of binary messages form a record stream, cut into
records with L{RecordDecoder.feed_raw} and checked by the rules of
L{lpxy.tunnelservice.policy}. Records go through the pairing to the partner
unchanged and in order, in as few messages as possible, none over
L{WIRE_FRAME_LIMIT}; a message of whole records goes on as it is. Without a
partner, DATA is dropped and starts are answered with a reset; a peer whose
partner leaves gets a STREAM_RESET for each stream still open.

Flow control: L{lpxy.tunnelservice.flow} says what holds a peer's reading.

Liveness: a half-open peer would stay CONNECTED for ever, so each is watched
by a L{Keepalive}: any bytes count as life, silence is pinged after
C{ping_interval} seconds and dropped after C{idle_timeout} (resetting the
partner's streams); silence while the service is not reading does not count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import FrameHeader
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from lpxy._ws import (
    ANYTHING,
    Keepalive,
    QuietHotPath,
    ReadingPauses,
    cancel_autobahn_timers,
    quiet_autobahn_log,
)
from lpxy.frames import (
    Message,
    ProtocolError,
    RecordDecoder,
    encode,
    encode_body,
    pack_records,
)
from lpxy.tunnelservice.bandwidth import ReadPacer
from lpxy.tunnelservice.broker import Attachment
from lpxy.tunnelservice.flow import BANDWIDTH, PARTNER_BEHIND, OutputWatch
from lpxy.tunnelservice.handshake import Upgrade, read_upgrade, refusal
from lpxy.tunnelservice.inbound import ClientFrames
from lpxy.tunnelservice.policy import Pairing, RecordRules, Violation, refusals
from lpxy.tunnelservice.store import DESTINATION, SOURCE
from lpxy.tunnelservice.tokens import HandshakeRefused
from lpxy.wire import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED_DATA,
    subprotocol_version,
)

if TYPE_CHECKING:
    from lpxy.tunnelservice.dataplane import TunnelServerFactory

__all__ = ["TunnelServerProtocol"]

STORE_LOOKUP = "store lookup"
"""Why a peer's reading is paused while the store reads its token's tunnel."""


class TunnelServerProtocol(QuietHotPath, WebSocketServerProtocol):  # type: ignore[misc]
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
    _keepalive: Keepalive | None = None
    _output: OutputWatch | None = None
    _pacer: ReadPacer | None = None
    _refused: tuple[str | None, str | None] = (None, None)
    """The tunnel and mode of a refused handshake, where known, for its log line."""
    _lost = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._decoder = RecordDecoder()
        limit = self.factory.maxMessagePayloadSize
        self._frames = ClientFrames(self, self.factory.maxFramePayloadSize, limit)
        self._bytes_in = 0
        self._bytes_out = 0
        self._pausers = ReadingPauses(self._stop_reading, self._read_again)
        # twisted.web's channel registered itself as the producer of this
        # transport before the WebSocket resource took it over.
        self.transport.unregisterProducer()
        self._output = OutputWatch(self, self.factory.output_mark)
        self.transport.registerProducer(self._output, True)
        self.factory.connections.add(self)

    def _closeConnection(self, abort: bool = False) -> None:
        # A transport with a producer waits for it before it closes.
        if self.transport is not None:
            self.transport.unregisterProducer()
        super()._closeConnection(abort)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Every byte Autobahn writes (messages, pongs, closes) passes here.
        super().sendData(data, sync, chopsize)
        if self._output is not None:
            self._output.wrote(len(data))

    def dataReceived(self, data: bytes) -> None:
        if self._keepalive is not None:
            self._keepalive.heard()
        super().dataReceived(data)
        if self._pacer is not None:
            self._pacer.read(len(data))

    # Reading frames (lpxy.tunnelservice.inbound instead of Autobahn's reader)

    def processData(self) -> bool:
        # Autobahn's consumeData calls this, while open or closing, with
        # what it has buffered; all of it is read at once.
        data, self.data = self.data, b""
        self._frames.feed(data)
        return False

    def frame_message(self, payload: bytes, binary: bool) -> bool:
        """A whole message arrived: relay it (L{ClientFrames}' sink)."""
        if self.state == self.STATE_OPEN:
            self.trafficStats.incomingWebSocketMessages += 1
        self.onMessage(payload, binary)
        return bool(self.state != self.STATE_CLOSED)

    def frame_control(self, opcode: int, payload: bytes, rsv: int, mask: bytes | None) -> bool:
        """A ping, pong or close arrived: Autobahn answers it."""
        self.current_frame = FrameHeader(opcode, True, rsv, len(payload), mask)  # type: ignore[arg-type]
        self.control_frame_data = [payload]
        self.processControlFrame()
        self.current_frame = None  # type: ignore[assignment]
        return bool(self.state != self.STATE_CLOSED)

    def frame_violation(self, reason: str) -> bool:
        """The peer broke RFC 6455: Autobahn fails the connection (1002)."""
        self._protocol_violation(reason)
        return bool(self.state != self.STATE_CLOSED)

    def frame_too_big(self, size: int, limit: int, reason: str) -> bool:
        """A frame or message over the wire's limit: Autobahn fails the connection (1009)."""
        self._max_message_size_exceeded(size, limit, reason)
        return bool(self.state != self.STATE_CLOSED)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._pacer is not None:
            self._pacer.stop()
        self._stop_keepalive()
        super().connectionLost(reason)
        self.factory.connections.discard(self)

    def _end_fields(self) -> dict[str, str | None]:
        """The log fields naming the tunnel end this connection serves (or served)."""
        return {k: getattr(self._info, k, None) for k in ("mode", "tunnel_id", "channel_id")}

    # Liveness

    def _start_keepalive(self) -> None:
        factory = self.factory
        self._keepalive = Keepalive(
            factory.clock, interval=factory.ping_interval, timeout=factory.idle_timeout,
            send_ping=self._ping, on_dead=self._silent, life=ANYTHING,
        )
        if self._pausers:
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

    def onConnect(  # type: ignore[override]  # Autobahn waits for a Deferred too
        self, request: ConnectionRequest
    ) -> tuple[str, dict[str, str]] | Deferred[tuple[str, dict[str, str]]]:
        # Autobahn turns any other exception into a bare 500 and loses it.
        try:
            upgrade = self._read_upgrade(request)
            refreshed = self.factory.broker.refresh(upgrade.access_token)
            if refreshed.called:  # the store knows at once (no other node writes)
                return self._admit(upgrade)
        except BaseException:
            self._handshake_failed(Failure())
            raise
        # Another node may have opened, rotated or closed the token's tunnel:
        # the store reads it first, and nothing is read from the peer meanwhile.
        self.pause_reading(STORE_LOOKUP)

        def admit(_: object) -> tuple[str, dict[str, str]]:
            self.resume_reading(STORE_LOOKUP)
            if self._lost:
                raise ConnectionDeny(400, "Connection closed during the handshake")
            return self._admit(upgrade)

        return refreshed.addCallback(admit).addErrback(self._handshake_failed)

    def _handshake_failed(self, failure: Failure) -> Failure:
        """Log why a handshake failed (a refusal, or an error) and pass it on."""
        if self._lost:
            return failure
        deny = failure.value
        if isinstance(deny, ConnectionDeny):
            self.factory.refusals[deny.code] += 1
            tunnel_id, mode = self._refused
            self._log.info(
                "Refused tunnel handshake from {peer}: {status} {reason}"
                + ("" if tunnel_id is None else " (tunnel {tunnel_id})")
                + ("" if mode is None else " ({mode})"),
                peer=self.peer, status=deny.code, reason=deny.reason,
                tunnel_id=tunnel_id, mode=mode,
            )
        else:
            self._log.failure("Error in tunnel handshake from {peer}", failure, peer=self.peer)
        return failure

    def _read_upgrade(self, request: ConnectionRequest) -> Upgrade:
        try:
            return read_upgrade(
                request.path, request.params, request.protocols, request.headers
            )
        except HandshakeRefused as refused:
            modes = request.params.get("local-proxy-mode", [])
            if len(modes) == 1 and modes[0] in (SOURCE, DESTINATION):
                self._refused = (None, modes[0])
            raise ConnectionDeny(refused.status, refused.reason) from None

    def _admit(self, upgrade: Upgrade) -> tuple[str, dict[str, str]]:
        try:
            attachment = self.factory.broker.connect(
                upgrade.mode, upgrade.access_token, upgrade.client_token, self
            )
        except HandshakeRefused as refused:
            # The token stays out of the log; the tunnel and mode it was for do not.
            self._refused = (refused.tunnel_id, upgrade.mode)
            raise ConnectionDeny(refused.status, refused.reason) from None
        self._attachment = self._info = attachment
        self._rules = RecordRules(attachment.mode, attachment.services)
        rates = self.factory.tunnel_rates
        if rates is not None:
            self._pacer = rates.pacer(
                attachment.tunnel_id,
                pause=lambda: self.pause_reading(BANDWIDTH),
                resume=lambda: self.resume_reading(BANDWIDTH),
            )
        self._version = subprotocol_version(upgrade.subprotocol)
        self._subprotocol = upgrade.subprotocol
        return upgrade.subprotocol, {"channel-id": attachment.channel_id}

    def sendHttpErrorResponse(self, code: int, reason: str, responseHeaders: Any = None) -> None:
        # Autobahn puts the reason in the status line only.
        self.sendData(refusal(code, reason, responseHeaders or ()))

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
                ids = Message(type=Message.SERVICE_IDS, availableServiceIds=attachment.services)
                self.send_records(encode(ids))
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
                "Closing {mode} of tunnel {tunnel_id}, channel {channel_id}: {code} {reason}",
                **self._end_fields(), code=code, reason=reason,
            )
        self._leave_pairing()
        if self.state == self.STATE_OPEN:
            # sendClose allows only 1000 and 3000-4999; we also need 1001, 1002, 1008.
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)
        elif self.state != self.STATE_CLOSED:
            self.dropConnection(abort=False)

    def partner_joined(self, partner: TunnelServerProtocol) -> None:
        pairing = self._pairing
        if pairing is not None:
            if pairing.partner_of(self) is partner:
                return  # made when the broker told the partner, which came first
            pairing.dissolve()
        Pairing(self, partner)

    def partner_left(self, partner: TunnelServerProtocol) -> None:
        pairing = self._pairing
        if pairing is not None and pairing.partner_of(self) is partner:
            pairing.left(partner)

    def _leave_pairing(self) -> None:
        if self._pairing is not None:
            self._pairing.dissolve()

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
        if self._output is not None and self._output.full:
            cast(TunnelServerProtocol, pairing.partner_of(self)).pause_reading(PARTNER_BEHIND)

    def parted(self) -> None:
        """No partner any more: no partner's buffer holds this peer's reading."""
        self._pairing = None
        self.resume_reading(PARTNER_BEHIND)

    @property
    def partner(self) -> TunnelServerProtocol | None:
        """The other end while paired."""
        if self._pairing is None:
            return None
        return cast(TunnelServerProtocol, self._pairing.partner_of(self))

    # Flow control

    def pause_reading(self, reason: str = PARTNER_BEHIND) -> None:
        """Stop reading from this peer until L{resume_reading} for each reason given."""
        if self.transport is not None:
            self._pausers.add(reason)

    def resume_reading(self, reason: str = PARTNER_BEHIND) -> None:
        """C{reason} no longer holds; read from this peer again if no other does."""
        if self.transport is not None:
            self._pausers.discard(reason)

    def _stop_reading(self) -> None:
        self.transport.pauseProducing()
        if self._keepalive is not None:
            # What it sends waits in the kernel: not silence.
            self._keepalive.pause()

    def _read_again(self) -> None:
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
