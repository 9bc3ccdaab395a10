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

Flow control invariants:
  - Each peer's transport has, for the life of its connection, an
    L{_OutputWatch} as its streaming producer. When the transport's write
    buffer passes Twisted's high-water mark the partner's reading stops,
    and resumes once the buffer drains. So at most one read's worth of
    records (and one message Autobahn had half read) plus a transport
    buffer is held per direction, whatever the peers' speeds.
  - The service's own answers count too: a peer that sends pings or
    STREAM_STARTs without a partner and never reads makes pongs and resets
    pile up in its own buffer. Once more than C{output_mark} bytes were
    written to a peer since its buffer passed the high-water mark, the
    service stops reading that peer until the buffer drains. Relayed data
    alone never gets there (its partner was paused first), so honest
    peers never wait on their own output, which would deadlock a peer
    whose application answers what it reads (an echo server).
  - A peer's reading is paused while any reason holds (its partner's
    buffer, its own, its tunnel's bandwidth): a set of pausers.
  - Nothing else buffers: the decoder keeps at most one incomplete record.
  - When a pairing ends (partner gone, replaced, closed) each end's reading
    is no longer held by the other's buffer, so neither stays paused for it.
  - What is buffered for a peer goes with its transport when it leaves.

Liveness: a half-open peer would stay CONNECTED for ever, so each is watched
by a L{Keepalive}: any bytes count as life, silence is pinged after
C{ping_interval} seconds and dropped after C{idle_timeout} (resetting the
partner's streams); silence while the service is not reading does not count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from lpxy._ws import ANYTHING, Clock, Keepalive, cancel_autobahn_timers, quiet_autobahn_log
from lpxy.frames import (
    WIRE_FRAME_LIMIT,
    Message,
    ProtocolError,
    RecordDecoder,
    encode,
    encode_body,
    pack_records,
)
from lpxy.tunnelservice.broker import Attachment, Broker, HandshakeRefused
from lpxy.tunnelservice.handshake import read_upgrade, refusal
from lpxy.tunnelservice.policy import Pairing, RecordRules, Violation, refusals
from lpxy.wire import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED_DATA,
    subprotocol_version,
)

if TYPE_CHECKING:
    from lpxy.tunnelservice.service import Connections

__all__ = [
    "DEFAULT_IDLE_TIMEOUT", "DEFAULT_PING_INTERVAL", "TunnelServerFactory", "TunnelServerProtocol",
]

DEFAULT_PING_INTERVAL = 30.0
DEFAULT_IDLE_TIMEOUT = 90.0
DEFAULT_OUTPUT_MARK = 512 * 1024
"""
Bytes the service may write to a peer after its transport's buffer passed
Twisted's high-water mark before it stops reading that peer: far above what
a partner's last read and one half-read message add (about 192 KB), so only
the service's own answers to a peer that does not read get there.
"""

# Why a peer's reading is paused (a set of pausers, see the module docstring).
PARTNER_BEHIND = "partner's output"
OWN_OUTPUT = "own output"


@implementer(IPushProducer)
class _OutputWatch:
    """
    The producer of one peer's transport: Twisted pauses it when the
    transport's buffer passes the high-water mark and resumes it once the
    buffer is empty. While paused, the partner is not read, and once more
    than C{mark} bytes were written to the peer the peer itself is not read.
    """

    def __init__(self, peer: TunnelServerProtocol, mark: int) -> None:
        self._peer = peer
        self._mark = mark
        self.full = False
        self._written = 0

    def wrote(self, size: int) -> None:
        """C{size} bytes were written to the peer's transport."""
        if self.full:
            self._written += size
            if self._written > self._mark:
                self._peer.pause_reading(OWN_OUTPUT)

    def pauseProducing(self) -> None:
        # Twisted says so again on every write while the buffer is full.
        if self.full:
            return
        self.full = True
        self._written = 0
        partner = self._peer.partner
        if partner is not None:
            partner.pause_reading(PARTNER_BEHIND)

    def resumeProducing(self) -> None:
        self.full = False
        self._peer.resume_reading(OWN_OUTPUT)
        partner = self._peer.partner
        if partner is not None:
            partner.resume_reading(PARTNER_BEHIND)

    def stopProducing(self) -> None:
        # The transport is gone; the broker tells the partner separately.
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
    _keepalive: Keepalive | None = None
    _output: _OutputWatch | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._decoder = RecordDecoder()
        self._bytes_in = 0
        self._bytes_out = 0
        self._pausers: set[str] = set()
        # twisted.web's channel registered itself as the producer of this
        # transport before the WebSocket resource took it over.
        self.transport.unregisterProducer()
        self._output = _OutputWatch(self, self.factory.output_mark)
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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
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
        try:
            upgrade = read_upgrade(request.path, request.params, request.protocols, request.headers)
            attachment = self.factory.broker.connect(
                upgrade.mode, upgrade.access_token, upgrade.client_token, self
            )
        except HandshakeRefused as refused:
            raise ConnectionDeny(refused.status, refused.reason) from None
        self._attachment = self._info = attachment
        self._rules = RecordRules(attachment.mode, attachment.services)
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
        if self.transport is None or reason in self._pausers:
            return
        self._pausers.add(reason)
        if len(self._pausers) == 1:
            self.transport.pauseProducing()
            if self._keepalive is not None:
                # What it sends waits in the kernel: not silence.
                self._keepalive.pause()

    def resume_reading(self, reason: str = PARTNER_BEHIND) -> None:
        """C{reason} no longer holds; read from this peer again if no other does."""
        if self.transport is None or reason not in self._pausers:
            return
        self._pausers.discard(reason)
        if not self._pausers:
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
    @param output_mark: bytes written to a peer after its transport's buffer
        passed the high-water mark before the peer is not read any more.
    """

    protocol = TunnelServerProtocol  # type: ignore[assignment]
    log = quiet_autobahn_log()

    def __init__(
        self,
        broker: Broker,
        connections: Connections,
        reactor: Any = None,
        clock: Clock | None = None,
        ping_interval: float = DEFAULT_PING_INTERVAL,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        output_mark: int = DEFAULT_OUTPUT_MARK,
    ) -> None:
        if not 0 < ping_interval < idle_timeout:
            raise ValueError("need 0 < ping_interval < idle_timeout")
        super().__init__(server="lpxy-tunnelservice", reactor=reactor)
        self.broker = broker
        self.clock: Clock = clock if clock is not None else self.reactor
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self.output_mark = output_mark
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
