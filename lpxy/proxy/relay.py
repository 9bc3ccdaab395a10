# -*- test-case-name: tests.test_relay -*-
"""
The local TCP side of one tunnelled connection, and the flow control that
binds every local connection to the one WebSocket.

Invariants (design.md, "Data flow and flow control"):

 1. Tunnel to local. Every L{LocalRelay} registers itself as the streaming
    producer of its own local transport, so Twisted tells it when that
    transport's send buffer passes its high-water mark (C{pauseProducing})
    and when it drains (C{resumeProducing}). A relay whose buffer is over
    the mark is a I{pauser} of the WebSocket: L{TunnelFlow} stops reading
    the WebSocket while its set of pausers is non-empty and reads again when
    the set empties. This is head-of-line blocking across streams, as in the
    reference proxy: one slow local reader stalls every stream of the
    tunnel, because the records of all streams arrive interleaved on one
    TCP connection and cannot be read past. In exchange, memory per local
    connection is bounded by the transport's buffer plus what one read from
    the WebSocket can carry.

 2. Local to tunnel. L{TunnelFlow} is the streaming producer of the
    WebSocket's transport, whose high-water mark is raised to a few
    messages (C{TunnelFactory.write_buffer}, four of the largest), so the
    full and drained edges come once per several messages, not once per
    message (hysteresis: paused above the mark, resumed once empty). While
    that buffer is
    full, a relay that reads from its local socket forwards that read and
    then stops reading (it is I{held}) until the buffer drains; relays that
    read nothing are never touched, so an edge costs nothing per idle
    connection and the drained edge resumes only the held relays. What
    waits for the WebSocket is thus bounded by the high-water mark plus
    (connections x one read), and a quiet connection (a round trip beside a
    bulk stream) is never paused behind the bulk one: fairness between
    streams is that of the one queue every read joins in turn.

 3. A destination relay whose application is not connected yet keeps what
    arrives for it, up to C{buffer_limit} bytes; beyond that it is a pauser
    of the WebSocket (invariant 1) until it connects or gives up.

 4. A relay is a pauser only while the tunnel can still send it data: its
    close (the channel ended: nothing more will be delivered, what it holds
    only drains), removal (connection lost, producer stopped) or
    abandonment always removes its pause, so a finished or dead connection
    never keeps the WebSocket stalled, not even the next WebSocket after a
    reconnect. Pause and resume are idempotent on both sides. A closing
    relay also stops being its transport's producer before it calls
    C{loseConnection}, which otherwise waits for that (the local
    application would never see end-of-file).

 5. Nothing is copied on the way out but the one join of a WebSocket
    message: local reads are cut at C{max_payload_size} with memoryview
    slices and handed to the tunnel with the channel's pre-serialized
    header. A local transport reads (and holds unsent) up to the largest
    multiple of C{max_payload_size} within C{buffer_limit}, never less than
    Twisted's default: each read fills whole records, and the bounds above
    stay per connection.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from lpxy._ws import Clock, ReadingPauses, set_no_delay
from lpxy.proxy.channel import Channel

__all__ = ["LocalRelay", "RelaySink", "TunnelFlow", "WebSocketSide"]


class WebSocketSide(TypingProtocol):
    """What L{TunnelFlow} needs from the current tunnel connection."""

    def pause_reading(self) -> None:
        """Stop reading from the service."""

    def resume_reading(self) -> None:
        """Read from the service again."""

    def register_write_producer(self, producer: Any) -> None:
        """Make C{producer} the streaming producer of the WebSocket transport."""


class RelaySink(TypingProtocol):
    """Where a relay sends what its local socket says."""

    def send_data(self, channel: Channel, payload: bytes | memoryview) -> None:
        """Send one DATA record (payload at most C{max_payload_size})."""

    def local_closed(self, channel: Channel) -> None:
        """The local socket closed (or never connected) on its own."""


@implementer(IPushProducer)
class TunnelFlow:
    """
    Backpressure between the WebSocket and every local connection (see the
    module docstring for the invariants).
    """

    _log = Logger()

    def __init__(self) -> None:
        self._ws: WebSocketSide | None = None
        self._pausers = ReadingPauses(self._pause_ws, self._resume_ws)
        self._relays: set[LocalRelay] = set()
        # Relays that read while the WebSocket was full, paused until it drains.
        self._held: set[LocalRelay] = set()
        self.ws_full = False

    @property
    def reading_paused(self) -> bool:
        """Whether the WebSocket is not being read."""
        return bool(self._pausers)

    @property
    def relays(self) -> frozenset[LocalRelay]:
        """The local connections alive now."""
        return frozenset(self._relays)

    @property
    def held(self) -> frozenset[LocalRelay]:
        """The relays not reading until the WebSocket's buffer drains."""
        return frozenset(self._held)

    def attach(self, ws: WebSocketSide) -> None:
        """A new WebSocket connection carries the tunnel."""
        self._ws = ws
        self._release()
        ws.register_write_producer(self)
        if self._pausers:
            ws.pause_reading()

    def detach(self) -> None:
        """The WebSocket connection is gone."""
        self._ws = None
        self._release()

    # IPushProducer, for the WebSocket's transport

    def pauseProducing(self) -> None:
        """
        The WebSocket's send buffer is full: each relay stops reading after
        its next read (L{hold}); nothing is done for relays that read nothing.
        """
        self.ws_full = True

    def resumeProducing(self) -> None:
        """The WebSocket's send buffer drained: the held relays read again."""
        self._release()

    def stopProducing(self) -> None:
        """The WebSocket's transport is going away."""
        self._release()

    def hold(self, relay: LocalRelay) -> None:
        """C{relay} read while the WebSocket is full: it reads no more until it drains."""
        self._held.add(relay)
        relay.pause_local()

    def _release(self) -> None:
        self.ws_full = False
        if self._held:
            held, self._held = self._held, set()
            for relay in held:
                relay.resume_local()

    # pausers of the WebSocket's reading

    def add_pauser(self, pauser: Hashable) -> None:
        """C{pauser} cannot take more data: stop reading the WebSocket."""
        self._pausers.add(pauser)

    def remove_pauser(self, pauser: Hashable) -> None:
        """C{pauser} can take data again; read when nobody objects."""
        self._pausers.discard(pauser)

    def _pause_ws(self) -> None:
        if self._ws is not None:
            self._ws.pause_reading()

    def _resume_ws(self) -> None:
        if self._ws is not None:
            self._ws.resume_reading()

    # relays

    def add_relay(self, relay: LocalRelay) -> None:
        """A local connection is up (it reads until its first read meets a full WebSocket)."""
        self._relays.add(relay)

    def remove_relay(self, relay: LocalRelay) -> None:
        """A local connection is gone, and with it any pause it held."""
        self._relays.discard(relay)
        self._held.discard(relay)
        self.remove_pauser(relay)


@implementer(IPushProducer)
class LocalRelay(Protocol):
    """
    One local TCP (or Unix) connection carried by a tunnel channel.

    As an C{IPushProducer} registered on its own transport it learns when
    that transport's buffer is full, and makes itself a pauser of the
    WebSocket meanwhile (module docstring, invariant 1).

    @ivar bytes_in: bytes delivered from the tunnel to the local socket.
    @ivar bytes_out: bytes read from the local socket into the tunnel.
    @ivar abandon: called when the channel is closed before the local
        connection exists (a destination cancels its connection attempt).
    """

    _log = Logger()

    def __init__(
        self,
        channel: Channel,
        sink: RelaySink,
        flow: TunnelFlow,
        clock: Clock,
        *,
        max_payload_size: int = 64512,
        buffer_limit: int = 131076,
        peer_description: str | None = None,
    ) -> None:
        self.channel = channel
        self._sink = sink
        self._flow = flow
        self._clock = clock
        self._max = max_payload_size
        self._limit = buffer_limit
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._closing = False
        self._paused_local = False
        self._gone = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = clock.seconds()
        self.peer_description = peer_description
        self.abandon: Callable[[], None] | None = None

    # -- local connection --------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        set_no_delay(transport)
        # Twisted reads (and buffers writes up to) C{bufferSize} bytes, 64
        # KiB by default: a read then makes one full record and a sliver.
        # Reading whole records' worth, up to the buffer limit, fills each
        # WebSocket message instead (module docstring, invariant 5).
        size = self._limit - self._limit % self._max
        if size > getattr(transport, "bufferSize", size):
            transport.bufferSize = size
        if self.peer_description is None:
            self.peer_description = str(transport.getPeer())
        transport.registerProducer(self, True)
        self._flow.add_relay(self)
        if self._pending:
            pending, self._pending, self._pending_size = self._pending, [], 0
            transport.writeSequence(pending)
        self._flow.remove_pauser(self)
        if self._closing:
            self._end_local(transport)
            return
        self._log.info(
            "Stream open: service {service_id!r} stream {stream_id} connection "
            "{connection_id}, local peer {peer}",
            service_id=self.channel.wire_service_id,
            stream_id=self.channel.stream_id,
            connection_id=self.channel.connection_id,
            peer=self.peer_description,
        )

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        size = len(data)
        self.bytes_out += size
        limit = self._max
        if size <= limit:
            self._sink.send_data(self.channel, data)
        else:
            view = memoryview(data)
            send = self._sink.send_data
            channel = self.channel
            for offset in range(0, size, limit):
                send(channel, view[offset : offset + limit])
        if self._flow.ws_full:
            self._flow.hold(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._gone = True
        self._flow.remove_relay(self)
        if not self._closing:
            self._closing = True
            self._sink.local_closed(self.channel)
        self._log.info("Disconnected from: {peer}", peer=self._peer_address())
        self._log.info(
            "Stream closed: service {service_id!r} stream {stream_id} connection "
            "{connection_id}, local peer {peer}: {bytes_out} bytes sent, "
            "{bytes_in} bytes received in {duration:.3f}s",
            service_id=self.channel.wire_service_id,
            stream_id=self.channel.stream_id,
            connection_id=self.channel.connection_id,
            peer=self.peer_description,
            bytes_out=self.bytes_out,
            bytes_in=self.bytes_in,
            duration=self._clock.seconds() - self.started,
        )

    def _peer_address(self) -> str:
        """The local socket's other end, C{ip:port} (or the socket's path)."""
        transport: Any = self.transport
        try:
            peer = transport.getPeer()
        except (AttributeError, NotImplementedError):
            peer = None
        host = getattr(peer, "host", None)
        if host is not None:
            return f"{host}:{getattr(peer, 'port', '?')}"
        name = getattr(peer, "name", None)
        return str(name) if name else str(self.peer_description)

    # -- from the tunnel ---------------------------------------------------

    def deliver(self, data: bytes) -> None:
        """Write bytes that came through the tunnel to the local socket."""
        self.bytes_in += len(data)
        transport: Any = self.transport
        if transport is not None:
            transport.write(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > self._limit:
            self._flow.add_pauser(self)

    @property
    def pending_size(self) -> int:
        """Bytes kept for a local connection that is not up yet."""
        return self._pending_size

    def close(self) -> None:
        """
        The peer ended this channel: close the local socket once what was
        delivered is written (C{loseConnection} flushes first).
        """
        if self._closing:
            return
        self._closing = True
        self._flow.remove_relay(self)
        transport: Any = self.transport
        if transport is not None:
            self._end_local(transport)
        else:
            self.give_up()

    def _end_local(self, transport: Any) -> None:
        """
        Close the local socket once its buffer is written.

        C{loseConnection} waits for a registered producer to unregister: a
        transport that paused its producer (buffer over the mark) and then
        drains resumes the producer instead of closing, and the local
        application never sees end-of-file. A closing relay produces
        nothing more, so it lets go of the transport first.
        """
        transport.unregisterProducer()
        transport.loseConnection()

    def give_up(self) -> None:
        """The local connection will never exist: drop what was kept."""
        self._pending, self._pending_size = [], 0
        self._gone = True
        self._flow.remove_pauser(self)
        if self.abandon is not None:
            abandon, self.abandon = self.abandon, None
            abandon()

    # -- flow control ------------------------------------------------------

    def pause_local(self) -> None:
        """The WebSocket is full: stop reading the local socket."""
        if self._paused_local or self._closing:
            return
        self._paused_local = True
        transport: Any = self.transport
        if transport is not None:
            transport.pauseProducing()

    def resume_local(self) -> None:
        """The WebSocket drained: read the local socket again."""
        if not self._paused_local:
            return
        self._paused_local = False
        transport: Any = self.transport
        if transport is not None and not (self._gone or self._closing):
            transport.resumeProducing()

    def pauseProducing(self) -> None:
        """The local socket's send buffer is full."""
        if not (self._gone or self._closing):
            self._flow.add_pauser(self)

    def resumeProducing(self) -> None:
        """The local socket's send buffer drained."""
        self._flow.remove_pauser(self)

    def stopProducing(self) -> None:
        """The local socket is going away."""
        self._flow.remove_pauser(self)
