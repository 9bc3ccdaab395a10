# -*- test-case-name: tests.test_session -*-
"""
The tunnel's protocol state, with no I/O.

A L{Session} knows which services the tunnel carries, which stream of each
service is active, and which connections that stream holds. It is told what
arrived (L{Session.received}) and what happened locally
(L{Session.open_channel}, L{Session.local_closed}) and answers through a
small injected L{SessionActions} object: records to send, bytes to deliver,
local sockets to open or close. protocol.md section 4 is the rule book.

One L{Session} lives as long as the proxy; L{Session.connected} and
L{Session.disconnected} bracket each WebSocket session. Stream and
connection ids restart at 1 after a reconnect; the service map resolved from
the first SERVICE_IDS is kept.

Wire formats: 1 (no serviceId, no connectionId), 2 (serviceId, one
connection per stream), 3 (serviceId and connectionId, many connections per
stream). A source speaks the format of its subprotocol unless
C{-y V1|V2} lowers it; a destination starts from its subprotocol and, per
service, follows the first start it gets in a WebSocket session
(connectionId 0 means a V1/V2 source).

Without C{-y}, a source learns an older destination from its first DATA
(L{older_destination}): an old peer knows only its version's fields, so a
V1 destination answers without the service id and a V2 one with connection
id 0, where a V3 one repeats both. The source then speaks that format for
the rest of the tunnel (reconnections included), logged once: the active
stream's first connection carries on under the older ids, and connections
the old peer could not tell apart from it are closed.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Literal

from attrs import define, field
from twisted.logger import Logger

from lpxy.frames import Message, data_header
from lpxy.proxy.channel import (
    Channel,
    ProtocolViolation,
    ServiceBinding,
    ServiceMismatch,
    SessionActions,
    shown_id,
)
from lpxy.proxy.service_ids import ServiceMap
from lpxy.wire import (
    DEFAULT_MAX_SERVICES,
    MAX_STREAM_ID,
    NEWEST_SUBPROTOCOL,
    SERVICE_ID_CHARACTERS,
    SERVICE_ID_MAX_LENGTH,
    is_valid_connection_id,
    is_valid_service_id,
    is_valid_stream_id,
    subprotocol_version,
)

__all__ = ["Session", "older_destination"]

_T = Message.Type
DATA = Message.DATA
STREAM_START = Message.STREAM_START
STREAM_RESET = Message.STREAM_RESET
SESSION_RESET = Message.SESSION_RESET
SERVICE_IDS = Message.SERVICE_IDS
CONNECTION_START = Message.CONNECTION_START
CONNECTION_RESET = Message.CONNECTION_RESET
def older_destination(message: Message, wire_id: str, fmt: int) -> int | None:
    """
    The older version a destination's DATA for an active stream shows, if
    any: 1 when it lacks the service id the source sent (C{wire_id}), 2
    when it lacks the connection id a source speaking C{fmt} 3 sent.
    L{None} when it repeats what was sent.
    """
    if wire_id and not message.serviceId:
        return 1
    if fmt >= 3 and message.connectionId == 0:
        return 2
    return None


@define(eq=False)
class _Service:
    binding: ServiceBinding
    wire_id: str
    stream_id: int = 0
    last_stream_id: int = 0
    next_connection_id: int = 1
    channels: dict[int, Channel] = field(factory=dict)
    format: int = 3
    learned: bool = False

    def connection_key(self, message: Message) -> int:
        """The key in C{channels} of the connection C{message} names (V1/V2: 0)."""
        return message.connectionId if self.format >= 3 else 0


class Session:
    """
    The decisions of one local proxy about streams and connections.

    @param mode: C{"source"} or C{"destination"}.
    @param keys: the keys of the local map (C{""} alone for an unnamed
        single mapping; empty when the map comes from a config dir that
        named nothing).
    @param actions: where decisions go.
    @param subprotocol: the subprotocol offered (and required back).
    @param client_type: a source's C{-y V1|V2}, or L{None}.
    @param max_connections: the most simultaneous connections of one
        service (V3).
    @param max_services: the most services of the tunnel's SERVICE_IDS
        served (the first ones); a named map raises it to its own size.
    @param from_config_dir: the map came from C{--config-dir} files.
    @param trace: log every record (verbosity 6 and up).
    @param stdio: C{--stdio}'s service id: the one service served, which
        the tunnel must announce among its own.
    """

    _log = Logger()

    def __init__(
        self,
        mode: Literal["source", "destination"],
        keys: Collection[str],
        actions: SessionActions,
        *,
        subprotocol: str = NEWEST_SUBPROTOCOL,
        client_type: str | None = None,
        max_connections: int = 128,
        max_services: int = DEFAULT_MAX_SERVICES,
        from_config_dir: bool = False,
        trace: bool = False,
        stdio: str | None = None,
    ) -> None:
        self.mode = mode
        self._keys = list(keys)
        self._actions = actions
        self.version = subprotocol_version(subprotocol)
        fmt = self.version
        if mode == "source" and client_type in ("V1", "V2"):
            fmt = min(fmt, int(client_type[1]))
        self.format = fmt
        # The destination's version is learned from its replies, unless -y
        # gave it or there is nothing older to learn.
        self._learning = mode == "source" and client_type is None and fmt > 1
        self._max_connections = max(1, max_connections)
        named = bool(keys) and self._keys != [""] and not from_config_dir
        self._map = ServiceMap(
            mode,
            tuple(self._keys),
            fmt,
            from_config_dir,
            max(1, max_services, len(self._keys) if named else 0),
            stdio,
        )
        self._trace = trace
        self._bindings: list[ServiceBinding] | None = None
        self._services: dict[str, _Service] = {}
        self.connected_now = False
        self._ids_seen = False

    # -- WebSocket session bracket ---------------------------------------

    @property
    def ready(self) -> bool:
        """The service map is settled for the current WebSocket session."""
        return self.connected_now and (self.version == 1 or self._ids_seen)

    @property
    def bindings(self) -> Sequence[ServiceBinding]:
        """The services as resolved (empty before the first resolution)."""
        return list(self._bindings or ())

    def connected(self) -> None:
        """A WebSocket session began; in V1 the map is settled at once."""
        self.connected_now = True
        self._ids_seen = False
        for service in self._services.values():
            service.last_stream_id = 0
            service.next_connection_id = 1
            service.format = self.format
            service.learned = False
        if self.version == 1:
            if self._bindings is None:
                keys = self._keys or [""]
                self._install([ServiceBinding(keys[0], "")])
            self._actions.services_ready(self.bindings)

    def disconnected(self) -> None:
        """The WebSocket session ended: every stream is dead."""
        self.connected_now = False
        self._ids_seen = False
        self.reset_all()

    def reset_all(self) -> None:
        """Close every local connection of every service, sending nothing."""
        for service in self._services.values():
            self._end_stream(service)

    # -- local events ----------------------------------------------------

    def open_channel(self, binding: ServiceBinding) -> Channel | None:
        """
        Source: a local client was accepted for the service C{binding}
        (one of those given to L{SessionActions.services_ready}). Starts a
        stream (or, in V3, adds a connection to the active one) and returns
        its channel, or L{None} when the client must be refused (not
        connected, unknown service, too many connections).
        """
        service = self._services.get(binding.service_id)
        if service is None or service.binding != binding or not self.ready or self.mode != "source":
            return None
        if service.format < 3:
            if service.stream_id:
                self._log.info(
                    "A new client on service {service_id!r} replaces the "
                    "active stream {stream_id}",
                    service_id=service.wire_id,
                    stream_id=service.stream_id,
                )
                self._end_stream(service)
            return self._start_stream(service, 0)
        if len(service.channels) >= self._max_connections:
            self._log.warn(
                "Refusing a client of service {service_id!r}: "
                "{count} connections are active (tcp.max_active_connections)",
                service_id=service.wire_id,
                count=len(service.channels),
            )
            return None
        connection_id = service.next_connection_id
        service.next_connection_id += 1
        if not service.stream_id:
            return self._start_stream(service, connection_id)
        channel = self._new_channel(service, connection_id)
        self._send(CONNECTION_START, service, connection_id)
        return channel

    def local_closed(self, channel: Channel) -> None:
        """
        A local socket closed or failed to connect: tell the peer, unless
        the session had already closed the channel.
        """
        if not channel.open:
            return
        channel.open = False
        service = self._services.get(channel.binding.service_id)
        if (
            service is None
            or service.stream_id != channel.stream_id
            or service.channels.get(channel.connection_id) is not channel
        ):
            return
        del service.channels[channel.connection_id]
        if service.format >= 3 and channel.connection_id:
            self._send(CONNECTION_RESET, service, channel.connection_id)
        else:
            self._send(STREAM_RESET, service, 0)
            self._end_stream(service)

    # -- received records --------------------------------------------------

    def received(self, message: Message) -> None:
        """
        Act on one record from the tunnel.

        @raise ProtocolViolation: for a record of type UNKNOWN or of an
            unknown type not marked ignorable.
        @raise ServiceMismatch: when SERVICE_IDS cannot fit the local map.
        """
        kind = message.type
        if kind == DATA:
            self._data(message)
        elif kind == STREAM_START:
            self._stream_start(message)
        elif kind == STREAM_RESET:
            self._stream_reset(message)
        elif kind == CONNECTION_START:
            self._connection_start(message)
        elif kind == CONNECTION_RESET:
            self._connection_reset(message)
        elif kind == SESSION_RESET:
            self._log.info("The service reset the session: closing every stream")
            self.reset_all()
        elif kind == SERVICE_IDS:
            self._service_ids(message.availableServiceIds)
        elif kind == Message.UNKNOWN:
            raise ProtocolViolation("received a record of type UNKNOWN (0)")
        elif message.ignorable:
            self._log.debug("Ignoring a record of unknown type {type}", type=int(kind))
        else:
            raise ProtocolViolation(
                f"received a record of unknown type {int(kind)} not marked ignorable"
            )

    def _data(self, message: Message) -> None:
        service = self._active(message)
        if self._learning and service is not None:
            self._learn_destination(service, message)
        if service is None:
            if self._trace:
                self._log.debug(
                    "Dropping DATA for stale stream {stream_id} of {service_id}",
                    stream_id=message.streamId,
                    service_id=shown_id(message.serviceId),
                )
            return
        channel = service.channels.get(service.connection_key(message))
        if channel is None:
            if self._trace:
                self._log.debug(
                    "Dropping DATA for unknown connection {connection_id} of {service_id}",
                    connection_id=message.connectionId,
                    service_id=shown_id(message.serviceId),
                )
            return
        if self._trace:
            self._log.debug(
                "DATA {size} bytes for {service_id!r} stream {stream_id} "
                "connection {connection_id}",
                size=len(message.payload),
                service_id=service.wire_id,
                stream_id=channel.stream_id,
                connection_id=channel.connection_id,
            )
        self._actions.deliver(channel, message.payload)

    def _learn_destination(self, service: _Service, message: Message) -> None:
        """A source's first DATA from the destination tells its version."""
        self._learning = False
        older = older_destination(message, service.wire_id, service.format)
        if older is None:
            return
        self._log.info(
            "The destination answers as a V{version} peer ({why}): speaking V{version}"
            " for the rest of the tunnel (-y V{version} says so from the start)",
            version=older,
            why="no service id" if older == 1 else "no connection ids",
        )
        self.format = older
        for each in self._services.values():
            each.format = min(each.format, older)
            if older == 1:
                each.wire_id = ""
            self._keep_first_connection(each)

    def _keep_first_connection(self, service: _Service) -> None:
        """
        Re-key the active stream for a V1/V2 peer: its first connection
        carries on under connection id 0, the others end (the old peer
        merged them into that one).
        """
        if not service.channels:
            return
        (_, channel), *others = sorted(service.channels.items())
        service.channels = {0: channel}
        channel.connection_id = 0
        channel.wire_service_id = service.wire_id
        channel.header = data_header(service.wire_id, service.stream_id, 0)
        for connection_id, other in others:
            self._log.warn(
                "Closing connection {connection_id} of service {service_id!r}: the older"
                " destination carries one connection per stream",
                connection_id=connection_id,
                service_id=service.binding.service_id,
            )
            other.open = False
            self._actions.close_local(other)

    def _stream_start(self, message: Message) -> None:
        if self.mode != "destination":
            self._log.warn("Ignoring a STREAM_START sent to a source")
            return
        if not self.ready:
            self._log.warn("Ignoring a STREAM_START that came before SERVICE_IDS")
            return
        stream_id = message.streamId
        service = self._lookup(message.serviceId)
        why = None
        if message.serviceId and not is_valid_service_id(message.serviceId):
            why = f"not a service id (1 to {SERVICE_ID_MAX_LENGTH} of [{SERVICE_ID_CHARACTERS}])"
        elif service is None:
            why = "service not served"
        elif not is_valid_stream_id(stream_id):
            why = "invalid stream id"
        if why is not None or service is None:
            self._log.warn(
                "Ignoring a STREAM_START with stream id {stream_id} for service "
                "{service_id}: {why}",
                stream_id=stream_id,
                service_id=shown_id(message.serviceId),
                why=why,
            )
            return
        if stream_id == service.stream_id:
            return
        if service.stream_id:
            self._log.info(
                "Stream {new} of service {service_id!r} replaces stream {old}",
                new=stream_id,
                old=service.stream_id,
                service_id=service.wire_id,
            )
            self._end_stream(service)
        if not service.learned:
            service.learned = True
            if message.connectionId == 0:
                service.format = min(service.format, 2)
                if self.format >= 3:
                    self._log.info(
                        "Service {service_id}: the source speaks V2 (no connection ids)",
                        service_id=shown_id(message.serviceId),
                    )
            elif service.format < 3:
                # A V3 source may offer an older subprotocol and still number
                # its connections (the reference's websocket.subprotocol
                # setting changes only the header); it drops replies that
                # lack its connection id.
                service.format = 3
                self._log.info(
                    "Service {service_id}: the source numbers its connections "
                    "(V3) although the subprotocol is older; answering in V3",
                    service_id=shown_id(message.serviceId),
                )
        service.wire_id = message.serviceId
        service.stream_id = stream_id
        connection_id = service.connection_key(message)
        channel = self._new_channel(service, connection_id)
        self._actions.open_local(channel)

    def _connection_start(self, message: Message) -> None:
        if self.mode != "destination":
            self._log.warn("Ignoring a CONNECTION_START sent to a source")
            return
        service = self._active(message)
        if service is None or service.format < 3 or not is_valid_connection_id(
            message.connectionId
        ):
            self._log.warn(
                "Ignoring a CONNECTION_START for stream {stream_id} connection "
                "{connection_id} of {service_id}: {why}",
                stream_id=message.streamId,
                connection_id=message.connectionId,
                service_id=shown_id(message.serviceId),
                why=("no such active stream" if service is None
                     else "the stream has no connection ids (V1, V2)" if service.format < 3
                     else "invalid connection id"),
            )
            return
        connection_id = message.connectionId
        if connection_id in service.channels or len(service.channels) >= self._max_connections:
            self._log.warn(
                "Refusing connection {connection_id} of {service_id!r}: {why}",
                connection_id=connection_id,
                service_id=service.wire_id,
                why=("already active" if connection_id in service.channels
                     else "too many active connections"),
            )
            self._send(CONNECTION_RESET, service, connection_id)
            return
        channel = self._new_channel(service, connection_id)
        self._actions.open_local(channel)

    def _stream_reset(self, message: Message) -> None:
        service = self._active(message)
        if service is None:
            self._log.debug(
                "Ignoring STREAM_RESET for inactive stream {stream_id} of {service_id}",
                stream_id=message.streamId,
                service_id=shown_id(message.serviceId),
            )
            return
        self._log.info(
            "The peer reset stream {stream_id} of service {service_id!r}",
            stream_id=service.stream_id,
            service_id=service.wire_id,
        )
        self._end_stream(service)

    def _connection_reset(self, message: Message) -> None:
        service = self._active(message)
        if service is None:
            return
        channel = service.channels.pop(service.connection_key(message), None)
        if channel is None:
            return
        channel.open = False
        self._actions.close_local(channel)

    # -- SERVICE_IDS ---------------------------------------------------------

    def _service_ids(self, received: Iterable[str]) -> None:
        if self._ids_seen or not self.connected_now or self.version == 1:
            self._log.debug("Ignoring a repeated SERVICE_IDS")
            return
        ids = self._map.served_ids(received)
        if self._bindings is None:
            self._install(self._map.bindings(ids))
        else:
            expected = sorted(b.service_id for b in self._bindings)
            fresh = self._map.bindings(ids)
            if sorted(b.service_id for b in fresh) != expected:
                raise ServiceMismatch(
                    f"after reconnecting, the tunnel announced services {ids}, "
                    f"not {expected}"
                )
        self._ids_seen = True
        self._log.info(
            "The tunnel announced services {service_ids}", service_ids=ids
        )
        self._actions.services_ready(self.bindings)


    def _install(self, bindings: list[ServiceBinding]) -> None:
        self._bindings = bindings
        self._services = {}
        for binding in bindings:
            service = _Service(binding, binding.service_id, format=self.format)
            self._services[binding.service_id] = service

    # -- helpers ---------------------------------------------------------------

    def _lookup(self, service_id: str) -> _Service | None:
        service = self._services.get(service_id)
        if service is None and (self.format == 1 or service_id == "") and len(self._services) == 1:
            # A V1 peer names no service; a V1 proxy ignores the names.
            service = next(iter(self._services.values()))
        return service

    def _active(self, message: Message) -> _Service | None:
        """The service of C{message} if the stream it names is its active one."""
        service = self._lookup(message.serviceId)
        if service is not None and service.stream_id and service.stream_id == message.streamId:
            return service
        return None

    def _start_stream(self, service: _Service, connection_id: int) -> Channel:
        stream_id = service.last_stream_id + 1
        if stream_id > MAX_STREAM_ID:
            stream_id = 1
        service.last_stream_id = service.stream_id = stream_id
        channel = self._new_channel(service, connection_id)
        self._send(STREAM_START, service, connection_id)
        return channel

    def _new_channel(self, service: _Service, connection_id: int) -> Channel:
        channel = Channel(
            service.binding,
            service.wire_id,
            service.stream_id,
            connection_id,
            data_header(service.wire_id, service.stream_id, connection_id),
        )
        service.channels[connection_id] = channel
        return channel

    def _end_stream(self, service: _Service) -> None:
        service.stream_id = 0
        channels, service.channels = service.channels, {}
        for channel in channels.values():
            channel.open = False
            self._actions.close_local(channel)

    def _send(self, kind: _T, service: _Service, connection_id: int) -> None:
        message = Message(
            type=kind,
            streamId=service.stream_id,
            serviceId=service.wire_id,
            connectionId=connection_id,
        )
        if self._trace:
            self._log.debug(
                "Sending {type} for {service_id!r} stream {stream_id} connection {connection_id}",
                type=Message.Type.Name(kind),
                service_id=service.wire_id,
                stream_id=service.stream_id,
                connection_id=connection_id,
            )
        self._actions.send(message)
