# -*- test-case-name: tests.test_proxy_service -*-
"""
The local proxy as a service: the tunnel connection, the listeners, the end.

L{LocalProxyService} is a C{MultiService} owning a C{ClientService} for the
WebSocket (design.md, "Connecting and reconnecting"). Its
C{prepareConnection} waits for L{TunnelProtocol.ready}: a connection counts
only once the handshake is done and, in V2/V3, SERVICE_IDS has settled the
services (and, for a source, the listeners are up). L{ProxyConnector} is the
glue, like magic-wormhole's C{RendezvousConnector}: it hears the tunnel
protocol's events, feeds the L{Session}, carries out the session's
decisions on relays and listeners, and says when the proxy is done.

Exit statuses (L{LocalProxyService.whenDone}):
 - 0 (L{EXIT_CLOSED}): the service closed the tunnel (Close 1000:
   CloseTunnel, expiry, replacement);
 - 1 (L{EXIT_CONFIG}): the tunnel does not fit the configuration (its
   services do not match the map, a port cannot be listened on);
 - 2 (L{EXIT_REJECTED}): the handshake was refused with a 4xx status;
 - 3 (L{EXIT_GAVE_UP}): the connection retries are spent, or a protocol
   error with C{reconnect_on_data_error} false.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any, cast

from automat import NoTransition
from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from lpxy import __version__
from lpxy.frames import WIRE_FRAME_LIMIT, Message, ProtocolError
from lpxy.proxy.config import ProxyConfig
from lpxy.proxy.destination import AppConnector
from lpxy.proxy.relay import LocalRelay, TunnelFlow
from lpxy.proxy.session import (
    Channel,
    ProtocolViolation,
    ServiceBinding,
    ServiceMismatch,
    Session,
)
from lpxy.proxy.settings import unused_settings
from lpxy.proxy.source import SourceListeners
from lpxy.proxy.tunnel import CloseOutcome, TunnelFactory, TunnelProtocol, describe_rejection
from lpxy.wire import CLOSE_NORMAL

__all__ = [
    "EXIT_CLOSED",
    "EXIT_CONFIG",
    "EXIT_GAVE_UP",
    "EXIT_REJECTED",
    "WIRE_FRAME_LIMIT",
    "LocalProxyService",
    "ProxyConnector",
    "TunnelConnectionFailed",
]

EXIT_CLOSED = 0
EXIT_CONFIG = 1
EXIT_REJECTED = 2
EXIT_GAVE_UP = 3

USER_AGENT = f"lpxy/{__version__}"


class TunnelConnectionFailed(Exception):
    """The tunnel connection ended before it was ready; the message says why."""


class _Gate(Protocol):
    """
    Stands between a transport and the protocol C{ClientService} built.

    C{ClientService} (Twisted 26.10) has no transition for a connection lost
    while C{prepareConnection} is pending or after it failed: its
    disconnection notice then raises C{NoTransition} out of
    C{connectionLost}, which the reactor would log as a traceback. Our
    C{prepareConnection} fails exactly when a connection closes during the
    WebSocket handshake (a 4xx, a dropped upgrade), so this gate swallows
    that one exception after the protocol has heard of the loss.
    """

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.wrapped.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.wrapped.dataReceived(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        try:
            self.wrapped.connectionLost(reason)
        except NoTransition:
            pass


class _GateFactory(Factory):
    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def doStart(self) -> None:
        self._wrapped.doStart()

    def doStop(self) -> None:
        self._wrapped.doStop()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        built = self._wrapped.buildProtocol(addr)
        return None if built is None else _Gate(built)


class _GatedEndpoint:
    """
    Wraps an endpoint so every connection goes through a L{_Gate}, and
    names the failure of an attempt that never connected.
    """

    _log = Logger()

    def __init__(
        self, endpoint: Any, description: str, failed: Callable[[str], object]
    ) -> None:
        self._endpoint = endpoint
        self._description = description
        self._report = failed

    def connect(self, factory: Any) -> Deferred[Any]:
        connecting: Deferred[Any] = self._endpoint.connect(_GateFactory(factory))
        return connecting.addCallbacks(lambda gate: gate.wrapped, self._failed)

    def _failed(self, reason: Failure) -> Failure:
        if not reason.check(CancelledError):
            self._log.warn(
                "Could not connect to {endpoint}: {error}",
                endpoint=self._description,
                error=reason.getErrorMessage(),
            )
            # Before ClientService hears of it: a spent budget stops the
            # service now, so that it never schedules a retry.
            self._report(reason.getErrorMessage())
        return reason

    def __repr__(self) -> str:
        return f"<tunnel endpoint {self._description}>"


class _RoutineDrops:
    """
    Autobahn's logger for a tunnel protocol, with its "dropping connection"
    warning told at info.

    Autobahn warns whenever it drops a connection that did not close
    cleanly: a refused handshake, our own abort after a protocol error or a
    dead connection. Each of those has its line from L{ProxyConnector} at
    the level it deserves, so Autobahn's is a routine detail; every other
    Autobahn warning keeps its level.
    """

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def warn(self, *args: Any, **kwargs: Any) -> None:
        text = args[0] if args else kwargs.get("format", "")
        if isinstance(text, str) and text.startswith("dropping connection to peer"):
            self._wrapped.info(*args, **kwargs)
        else:
            self._wrapped.warn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


class _ProxyTunnelProtocol(TunnelProtocol):
    log = _RoutineDrops(TunnelProtocol.log)


class ProxyConnector:
    """
    Joins the tunnel protocol, the session, the relays and the listeners.

    It is the L{TunnelEvents} of the tunnel factory, the L{SessionActions}
    of the session and the L{RelaySink} of every relay.

    @ivar finished: called with an exit status when the proxy must end.
    """

    _log = Logger()

    def __init__(self, config: ProxyConfig, reactor: Any, clock: Any) -> None:
        self._config = config
        self._reactor = reactor
        self._clock = clock
        settings = config.settings
        self._settings = settings
        keys = list(
            config.source_ports if config.mode == "source" else config.destination_apps
        )
        self.session = Session(
            config.mode,
            keys,
            self,
            subprotocol=settings.websocket.subprotocol,
            client_type=config.destination_client_type,
            max_connections=settings.tcp.max_active_connections,
            max_services=settings.websocket.max_services,
            from_config_dir=config.mappings_from_config_dir or not keys,
            trace=config.verbosity >= 6,
        )
        self.flow = TunnelFlow()
        self._gone: list[Deferred[None]] = []
        self.protocol: TunnelProtocol | None = None
        self.listeners: SourceListeners | None = None
        self.apps: AppConnector | None = None
        if config.mode == "source":
            self.listeners = SourceListeners(
                reactor, config.listen_address, config.source_ports, self.accept
            )
        else:
            self.apps = AppConnector(
                reactor,
                retry_count=settings.tcp.connection_retry_count,
                retry_delay=settings.tcp.connection_retry_delay_ms / 1000.0,
                clock=clock,
            )
        self.stopping = False
        self.ending = False
        # Set by the service: called with the exit status when the proxy must
        # end; and with the reason of a lost connection or failed attempt,
        # answering whether a retry follows.
        self.finished: Callable[[int], object] | None = None
        self.reconnected: Callable[[str], bool] | None = None
        self.attempt_failed: Callable[[str], bool] | None = None

    def _end(self, status: int) -> None:
        self.ending = True
        if self.finished is not None:
            self.finished(status)

    # -- TunnelEvents ----------------------------------------------------

    def ws_open(self, protocol: TunnelProtocol) -> None:
        self.protocol = protocol
        self.flow.attach(protocol)
        self._log.info(
            "Connected to {endpoint} as {mode}: channel id {channel_id}, "
            "subprotocol {subprotocol}",
            endpoint=self._config.endpoint.origin(),
            mode=self._config.mode,
            channel_id=protocol.channel_id,
            subprotocol=protocol.factory.subprotocol,
        )
        self.session.connected()

    def ws_records(self, protocol: TunnelProtocol, messages: list[Message]) -> None:
        received = self.session.received
        try:
            for message in messages:
                received(message)
        except ProtocolViolation as e:
            self._protocol_error(protocol, str(e))
        except ServiceMismatch as e:
            self._log.error("{error}", error=str(e))
            protocol.abort()
            self._end(EXIT_CONFIG)

    def ws_error(self, protocol: TunnelProtocol, error: ProtocolError) -> None:
        self._protocol_error(protocol, str(error))

    def _protocol_error(self, protocol: TunnelProtocol, text: str) -> None:
        if self._settings.websocket.reconnect_on_data_error:
            self._log.warn(
                "Protocol error from the tunneling service: {error}; reconnecting",
                error=text,
            )
        else:
            self._log.error(
                "Protocol error from the tunneling service: {error}; stopping "
                "(websocket.reconnect_on_data_error is false)",
                error=text,
            )
            self._end(EXIT_GAVE_UP)
        protocol.abort()

    def ws_close(self, protocol: TunnelProtocol, outcome: CloseOutcome) -> None:
        was_ready = protocol.ready.called
        if self.protocol is protocol:
            self.protocol = None
            self.flow.detach()
            self.session.disconnected()
        gone, self._gone = self._gone, []
        for waiter in gone:
            waiter.callback(None)
        if not (self.stopping or self.ending):
            self._decide(protocol, outcome, was_ready)
        if not protocol.ready.called:
            # Decided first: failing this tells ClientService, whose retry
            # budget may then end the proxy with its own status.
            protocol.ready.errback(Failure(TunnelConnectionFailed(self._why(outcome))))
            protocol.ready.addErrback(lambda _: None)

    def _decide(self, protocol: TunnelProtocol, outcome: CloseOutcome, was_ready: bool) -> None:
        delay = self._settings.websocket.retry_delay_ms / 1000.0
        if outcome.http_status is not None and 400 <= outcome.http_status < 500:
            self._log.error(
                "The tunneling service refused the connection: {meaning}; not retrying",
                meaning=describe_rejection(outcome.http_status, protocol.rejection_body),
            )
            self._end(EXIT_REJECTED)
        elif outcome.opened and outcome.code == CLOSE_NORMAL and not outcome.by_us:
            self._log.info(
                "The tunneling service closed the tunnel ({reason})",
                reason=outcome.reason or "no reason given",
            )
            self._end(EXIT_CLOSED)
        elif was_ready:
            why = self._why(outcome)
            if self.reconnected is not None and not self.reconnected(why):
                return
            self._log.warn(
                "Lost the tunnel connection ({reason}); reconnecting in {delay}s",
                reason=why,
                delay=delay,
            )
        else:
            why = self._why(outcome)
            if self.attempt_failed is not None and not self.attempt_failed(why):
                return
            self._log.warn(
                "Could not connect to the tunneling service ({reason}); "
                "retrying in {delay}s",
                reason=why,
                delay=delay,
            )

    @staticmethod
    def _why(outcome: CloseOutcome) -> str:
        if outcome.dead:
            return "no pong in two ping periods"
        if outcome.http_status is not None:
            return f"HTTP status {outcome.http_status}"
        if outcome.code is not None:
            return f"close code {outcome.code}: {outcome.reason or ''}".rstrip(": ")
        return outcome.reason or "connection lost"

    # -- readiness -------------------------------------------------------

    def _mark_ready(self) -> None:
        protocol = self.protocol
        if protocol is not None and not protocol.ready.called:
            protocol.ready.callback(None)

    # -- SessionActions --------------------------------------------------

    def send(self, message: Message) -> None:
        if self.protocol is not None:
            self.protocol.send_message(message)

    def deliver(self, channel: Channel, data: bytes) -> None:
        relay = channel.peer
        if relay is not None:
            relay.deliver(data)  # type: ignore[attr-defined]

    def open_local(self, channel: Channel) -> None:
        assert self.apps is not None
        target = self._config.destination_apps.get(channel.binding.key or "")
        relay = self._relay(channel)
        if target is None:
            self._log.error(
                "No local application for service {service_id!r}",
                service_id=channel.binding.service_id,
            )
            relay.give_up()
            self.session.local_closed(channel)
            return
        self.apps.connect(relay, target, lambda: self.session.local_closed(channel))

    def close_local(self, channel: Channel) -> None:
        relay = channel.peer
        if relay is not None:
            relay.close()  # type: ignore[attr-defined]

    def services_ready(self, bindings: Sequence[ServiceBinding]) -> None:
        listeners = self.listeners
        if listeners is None or listeners.started:
            self._mark_ready()
            return
        listeners.start(bindings).addCallbacks(
            lambda _: self._mark_ready(), self._listen_failed
        )

    def _listen_failed(self, reason: Failure) -> None:
        self._log.error("Cannot listen: {error}", error=reason.getErrorMessage())
        if self.protocol is not None:
            self.protocol.abort()
        self._end(EXIT_CONFIG)

    # -- RelaySink -------------------------------------------------------

    def send_data(self, channel: Channel, payload: bytes | memoryview) -> None:
        protocol = self.protocol
        if protocol is not None:
            protocol.send_data(channel.header, payload)

    def local_closed(self, channel: Channel) -> None:
        self.session.local_closed(channel)

    # -- source ----------------------------------------------------------

    def accept(self, binding: ServiceBinding, addr: IAddress) -> Protocol | None:
        """A local client connected to the port of C{binding}."""
        if self.protocol is None or not self.session.ready or self.stopping:
            self._log.info(
                "Refusing a client of service {service_id!r}: the tunnel is not connected",
                service_id=binding.service_id,
            )
            return None
        channel = self.session.open_channel(binding)
        if channel is None:
            return None
        host = getattr(addr, "host", None)
        port = getattr(addr, "port", None)
        relay = self._relay(channel)
        if host is not None:
            relay.peer_description = f"{host}:{port}"
        return relay

    def _relay(self, channel: Channel) -> LocalRelay:
        settings = self._settings
        return LocalRelay(
            channel,
            self,
            self.flow,
            self._clock,
            max_payload_size=settings.message.max_payload_size,
            buffer_limit=settings.tcp.write_buffer_size,
        )

    # -- stopping --------------------------------------------------------

    def shutdown(self) -> Deferred[None]:
        """
        Close every stream and the WebSocket, cleanly, and stop listening.

        @return: fires once the WebSocket is gone: after the service's answer
            to our Close (RFC 6455 wants the server to close TCP first), or
            Autobahn's close handshake timeout.
        """
        self.stopping = True
        self.session.reset_all()
        gone: Deferred[None] = succeed(None)
        if self.protocol is not None:
            gone = Deferred()
            self._gone.append(gone)
            self.protocol.close(CLOSE_NORMAL, "local proxy stopping")
        if self.listeners is not None:
            self.listeners.stop()
        return gone


class LocalProxyService(MultiService):
    """
    The local proxy: a tunnel connection kept up by a C{ClientService},
    plus the listeners (source) or application connections (destination).

    @param config: the validated configuration.
    @param reactor: the reactor (the global one by default).
    @param endpoint: the tunnel endpoint (by default
        L{lpxy.proxy.endpoints.tunnel_client_endpoint}); for tests.
    @param clock: the time source (the reactor by default); for tests.
    """

    _log = Logger()

    def __init__(
        self,
        config: ProxyConfig,
        reactor: Any = None,
        *,
        endpoint: Any = None,
        clock: Any = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._config = config
        if endpoint is None:
            from lpxy.proxy.endpoints import tunnel_client_endpoint

            endpoint = tunnel_client_endpoint(reactor, config)
        self.client_token = config.client_token or str(uuid.uuid4())
        settings = config.settings.websocket
        self.connector = ProxyConnector(config, reactor, self._clock)
        self.connector.finished = self._finish
        self.connector.reconnected = self._lost
        self.connector.attempt_failed = self._attempt_failed
        self.factory = TunnelFactory(
            config.endpoint.url(config.mode),
            self.connector,
            access_token=config.access_token,
            client_token=self.client_token,
            subprotocol=settings.subprotocol,
            user_agent=USER_AGENT,
            clock=self._clock,
            ping_period_ms=settings.ping_period_ms,
            max_frame_size=WIRE_FRAME_LIMIT,
            trace=config.verbosity >= 6,
        )
        self.factory.protocol = _ProxyTunnelProtocol
        if settings.max_frame_size != WIRE_FRAME_LIMIT:
            self._log.info(
                "websocket.max_frame_size {size} is not used: WebSocket messages"
                " are limited to {limit} bytes by the protocol",
                size=settings.max_frame_size,
                limit=WIRE_FRAME_LIMIT,
            )
        for key, value, why in unused_settings(config.settings):
            self._log.info("{key} {value} is not used: {why}", key=key, value=value, why=why)
        delay = max(0, settings.retry_delay_ms) / 1000.0
        endpoint_name = config.endpoint.origin()
        self._retries = settings.connect_retry_count
        # Failed attempts since the last usable connection, a lost connection
        # counting as the first. We count them ourselves, before
        # ClientService hears of each failure, so that the last one stops
        # it before it schedules (and logs) a retry that will never come.
        self._failures = 0
        self.client = ClientService(
            cast(Any, _GatedEndpoint(endpoint, endpoint_name, self._endpoint_failed)),
            cast(Any, self.factory),
            retryPolicy=lambda attempt: delay,
            clock=self._clock,
            prepareConnection=self._prepare,
        )
        self.client.setServiceParent(self)
        self._done: Deferred[int] = Deferred()
        self._status: int | None = None

    def whenDone(self) -> Deferred[int]:
        """Fires with the exit status when the proxy ends on its own."""
        return self._done

    def _prepare(self, protocol: TunnelProtocol) -> Deferred[None]:
        # ClientService's prepareConnection: the connector fires ready once
        # the tunnel is usable.
        return protocol.ready.addCallback(self._usable)

    def _usable(self, result: None) -> None:
        self._failures = 0

    def _endpoint_failed(self, error: str) -> None:
        if not self.connector.stopping:
            self._attempt_failed(error)

    def _attempt_failed(self, error: str) -> bool:
        """
        An attempt failed: give up if the budget is spent, else say that a
        retry follows.
        """
        if self._status is not None:
            return False
        self._failures += 1
        if 0 <= self._retries < self._failures:
            self._log.error(
                "Giving up: could not connect to the tunneling service after "
                "{retries} retries ({error})",
                retries=self._retries,
                error=error,
            )
            self._finish(EXIT_GAVE_UP)
            return False
        return True

    def _lost(self, reason: str) -> bool:
        """A usable connection was lost: say whether a reconnection follows."""
        self._failures = 1
        if self._retries == 0:
            self._log.error(
                "Lost the tunnel connection ({reason}); not reconnecting: "
                "websocket.connect_retry_count is 0",
                reason=reason,
            )
            self._finish(EXIT_GAVE_UP)
            return False
        return True

    def _finish(self, status: int) -> None:
        if self._status is not None:
            return
        self._status = status
        self.connector.ending = True
        # At once, from the connection's own events and never from inside
        # ClientService's state machine (which refuses re-entrant stops):
        # ClientService hears of the failure or loss after us, and, stopped,
        # schedules no retry.
        stopped = self.client.stopService() if self.client.running else succeed(None)
        self._clock.callLater(0, self._report, stopped, status)

    def _report(self, stopped: Deferred[None], status: int) -> None:
        self.connector.shutdown()
        stopped.addBoth(lambda _: self._done.callback(status))

    def stopService(self) -> Deferred[None]:
        # The WebSocket goes first: its loss reaches us before ClientService,
        # which, stopped from there, schedules no retry.
        gone = self.connector.shutdown()
        return gone.addCallback(lambda _: MultiService.stopService(self))
