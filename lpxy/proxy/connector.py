# -*- test-case-name: tests.test_connector -*-
"""
What the session asks of the I/O layer, carried out: L{ProxyConnector}.

Like magic-wormhole's C{RendezvousConnector}, the connector is the glue
between the tunnel protocol, the L{Session}, the relays and the listeners:
it hears the tunnel protocol's events (L{TunnelEvents}), feeds the session,
carries out the session's decisions (L{SessionActions}) on the relay of
each channel and on the listeners, and tells its L{ConnectorListener} (the
service) when a connection was lost or an attempt failed, and when the
proxy must end, with which exit status:

 - 0 (L{EXIT_CLOSED}): the service closed the tunnel (Close 1000:
   CloseTunnel, expiry, replacement);
 - 1 (L{EXIT_CONFIG}): the tunnel does not fit the configuration (its
   services do not match the map, a port cannot be listened on);
 - 2 (L{EXIT_REJECTED}): the handshake was refused with a 4xx status;
 - 3 (L{EXIT_GAVE_UP}): the connection retries are spent, or a protocol
   error with C{reconnect_on_data_error} false, or (C{--stdio}) the tunnel
   connection ended while the stream over standard input and output was
   open.

With C{--stdio} (L{lpxy.proxy.stdio}) the source listens nowhere: once the
tunnel is ready it starts one stream of that service on standard input and
output, and the proxy ends (status 0) when that stream does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure

from lpxy.frames import Message, ProtocolError
from lpxy.proxy.channel import (
    Channel,
    ProtocolViolation,
    ServiceBinding,
    ServiceMismatch,
    shown_id,
)
from lpxy.proxy.config import ProxyConfig
from lpxy.proxy.destination import AppConnector
from lpxy.proxy.metrics import TunnelCounts
from lpxy.proxy.relay import LocalRelay, TunnelFlow
from lpxy.proxy.session import Session
from lpxy.proxy.source import SourceListeners, bind_error
from lpxy.proxy.stdio import OpenStdio, StdioRelay, StdioSource, standard_io
from lpxy.proxy.tunnel import CloseOutcome, TunnelProtocol, describe_rejection
from lpxy.wire import CLOSE_GOING_AWAY, CLOSE_NORMAL

__all__ = [
    "EXIT_CLOSED",
    "EXIT_CONFIG",
    "EXIT_GAVE_UP",
    "EXIT_REJECTED",
    "ConnectorListener",
    "ProxyConnector",
    "TunnelConnectionFailed",
]

EXIT_CLOSED = 0
EXIT_CONFIG = 1
EXIT_REJECTED = 2
EXIT_GAVE_UP = 3


def _session_id(channel_id: str | None) -> str:
    """The C{channel-id} header as logged: as it is, unless it is odd or long."""
    value = channel_id or ""
    if len(value) <= 128 and value.isprintable():
        return value
    return shown_id(value)


class TunnelConnectionFailed(Exception):
    """The tunnel connection ended before it was ready; the message says why."""


class ConnectorListener(Protocol):
    """What a L{ProxyConnector} tells the service that owns it."""

    def finished(self, status: int) -> None:
        """The proxy must end, with exit status C{status}."""

    def connection_lost(self, reason: str, at_once: bool = False) -> bool:
        """
        A usable connection was lost; return whether a reconnection follows
        (C{at_once}: without the retry delay, the service having said it is
        going away).
        """

    def attempt_failed(self, reason: str) -> bool:
        """An attempt ended before the tunnel was usable; return whether a retry follows."""


class ProxyConnector:
    """
    Joins the tunnel protocol, the session, the relays and the listeners.

    It is the L{TunnelEvents} of the tunnel factory, the L{SessionActions}
    of the session and the L{RelaySink} of every relay, and keeps the relay
    of each channel the session opened.

    @param config: the validated configuration.
    @param reactor: listens (source) and connects to applications
        (destination).
    @param clock: the time source of relays and application retries.
    @param listener: told of lost connections, failed attempts and the end.
    @param open_stdio: with C{--stdio}, gives the connection's relay its
        transport (the process's standard input and output by default).
    @ivar ending: the proxy is stopping or has an exit status: a lost
        connection is no longer judged, and no local client is accepted.
    @ivar counts: the tunnel's history in numbers, for the metrics and the
        SIGUSR2 summary.
    """

    _log = Logger()

    def __init__(
        self,
        config: ProxyConfig,
        reactor: Any,
        clock: Any,
        listener: ConnectorListener,
        open_stdio: OpenStdio | None = None,
    ) -> None:
        self._config = config
        self._reactor = reactor
        self._clock = clock
        self._listener = listener
        settings = config.settings
        self._settings = settings
        keys = list(
            config.source_ports if config.mode == "source" else config.destination_apps
        )
        if config.stdio_service is not None:
            keys = [config.stdio_service]
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
            stdio=config.stdio_service,
        )
        self.flow = TunnelFlow()
        self.counts = TunnelCounts()
        self._relays: dict[Channel, LocalRelay] = {}
        self._gone: list[Deferred[None]] = []
        # The protocol error that made us drop each connection, until it is gone.
        self._faults: dict[TunnelProtocol, str] = {}
        self.protocol: TunnelProtocol | None = None
        self.listeners: SourceListeners | None = None
        self.apps: AppConnector | None = None
        self.stdio: StdioSource | None = None
        if config.stdio_service is not None:
            self.stdio = StdioSource(
                config.stdio_service, open_stdio or standard_io(reactor), clock
            )
        elif config.mode == "source":
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
        self.ending = False

    def _end(self, status: int) -> None:
        self.ending = True
        self._listener.finished(status)

    # -- TunnelEvents ----------------------------------------------------

    def ws_open(self, protocol: TunnelProtocol) -> None:
        self.protocol = protocol
        self.flow.attach(protocol)
        self._log.info(
            "Web socket session ID: {channel_id}", channel_id=_session_id(protocol.channel_id)
        )
        self._log.info(
            "Successfully established websocket connection with proxy server: {endpoint}",
            endpoint=self._config.endpoint.origin(),
        )
        self._log.info(
            "Connected as {mode} with subprotocol {subprotocol}",
            mode=self._config.mode,
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
            # Told once the connection is gone, with what follows.
            self._faults[protocol] = text
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
        fault = self._faults.pop(protocol, None)
        if self.stdio is not None and self.stdio.active and not self.ending:
            # A reconnection cannot resume the stream.
            self._log.error(
                "The tunnel connection ended ({reason}) while the stream over"
                " standard input and output was open: the stream is cut; exiting",
                reason=f"protocol error: {fault}" if fault else self._why(outcome),
            )
            self._end(EXIT_GAVE_UP)
        if self.protocol is protocol:
            self.protocol = None
            self.counts.disconnected()
            self.flow.detach()
            self.session.disconnected()
        gone, self._gone = self._gone, []
        for waiter in gone:
            waiter.callback(None)
        if outcome.opened and outcome.code is not None and not outcome.by_us:
            self._log.info(
                "Web socket close received. Code: {code}; Reason: {reason}",
                code=outcome.code,
                reason=outcome.reason or "",
            )
        if not self.ending:
            self._decide(protocol, outcome, was_ready, fault)
        if not protocol.ready.called:
            # Decided first: failing this tells ClientService, whose retry
            # budget may then end the proxy with its own status.
            protocol.ready.errback(Failure(TunnelConnectionFailed(self._why(outcome))))
            protocol.ready.addErrback(lambda _: None)

    def _decide(
        self, protocol: TunnelProtocol, outcome: CloseOutcome, was_ready: bool, fault: str | None
    ) -> None:
        delay = self._settings.websocket.retry_delay_ms / 1000.0
        rejected = 'Proxy server rejected web socket upgrade request: ({status_line}) "{body}"'
        status_line = protocol.status_line
        body = " ".join(protocol.rejection_body.split())[:200]
        if outcome.http_status is not None:
            self.counts.refused(outcome.http_status)
        if outcome.http_status is not None and not 400 <= outcome.http_status < 500:
            self._log.error(rejected, status_line=status_line, body=body)
        elif outcome.tls_failure is not None:
            self._log.error(
                "Could not perform SSL handshake with proxy server: {why}",
                why=outcome.tls_failure,
            )
        if outcome.http_status is not None and 400 <= outcome.http_status < 500:
            self._log.error(
                rejected + "; the tunneling service refused the connection: {meaning};"
                " not retrying",
                status_line=status_line,
                body=body,
                meaning=describe_rejection(outcome.http_status),
            )
            self._end(EXIT_REJECTED)
        elif outcome.opened and outcome.code == CLOSE_NORMAL and not outcome.by_us:
            self._log.info(
                "The tunneling service closed the tunnel ({reason})",
                reason=outcome.reason or "no reason given",
            )
            self._end(EXIT_CLOSED)
        elif fault is not None:
            why = f"protocol error: {fault}"
            retry = self._listener.connection_lost if was_ready else self._listener.attempt_failed
            if not retry(why):
                return
            self._log.warn(
                "Protocol error from the tunneling service: {error}; reconnecting in {delay}s",
                error=fault,
                delay=delay,
            )
        elif was_ready:
            why = self._why(outcome)
            # 1001: the service node is stopping; a load balancer sends the
            # reconnection to another node, so waiting would only add delay.
            at_once = outcome.opened and outcome.code == CLOSE_GOING_AWAY and not outcome.by_us
            if not self._listener.connection_lost(why, at_once=at_once):
                return
            self._log.warn(
                "Lost the tunnel connection ({reason}); reconnecting in {delay}s",
                reason=why,
                delay=0 if at_once else delay,
            )
        else:
            why = self._why(outcome)
            if not self._listener.attempt_failed(why):
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
        if outcome.tls_failure is not None:
            return outcome.tls_failure
        if outcome.code is not None:
            return f"close code {outcome.code}: {outcome.reason or ''}".rstrip(": ")
        return outcome.reason or "connection lost"

    # -- readiness -------------------------------------------------------

    def _mark_ready(self) -> None:
        protocol = self.protocol
        if protocol is not None and not protocol.ready.called:
            self.counts.connected(self._clock.seconds())
            protocol.ready.callback(None)

    # -- SessionActions --------------------------------------------------

    def send(self, message: Message) -> None:
        if self.protocol is not None:
            self.protocol.send_message(message)

    def deliver(self, channel: Channel, data: bytes) -> None:
        relay = self._relays.get(channel)
        if relay is not None:
            relay.deliver(data)

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
            self.local_closed(channel)
            return
        self.apps.connect(relay, target, lambda: self.local_closed(channel))

    def close_local(self, channel: Channel) -> None:
        # The session has closed the channel: it sends it nothing more.
        relay = self._relays.pop(channel, None)
        if relay is not None:
            relay.close()
            self._ended(relay, "tunnel")

    def services_ready(self, bindings: Sequence[ServiceBinding]) -> None:
        if self.stdio is not None:
            self._mark_ready()
            if not self.stdio.started:
                self._start_stdio(self.stdio, bindings)
            return
        listeners = self.listeners
        if listeners is None or listeners.started:
            self._mark_ready()
            return
        listeners.start(bindings).addCallbacks(
            lambda _: self._mark_ready(), self._listen_failed
        )

    def _listen_failed(self, reason: Failure) -> None:
        error = reason.value
        if isinstance(error, CannotListenError):
            self._log.error("{text}", text=bind_error(error))
        else:
            self._log.error("Cannot listen: {error}", error=reason.getErrorMessage())
        if self.protocol is not None:
            self.protocol.abort()
        self._end(EXIT_CONFIG)

    def _start_stdio(self, stdio: StdioSource, bindings: Sequence[ServiceBinding]) -> None:
        binding = stdio.binding(bindings)
        channel = None if binding is None else self.session.open_channel(binding)
        if channel is None:
            self._log.error(
                "--stdio {service_id}: the tunnel cannot start a stream of that service",
                service_id=stdio.service_id,
            )
            if self.protocol is not None:
                self.protocol.abort()
            self._end(EXIT_CONFIG)
            return
        relay = self._relay(channel, StdioRelay)
        assert isinstance(relay, StdioRelay)
        relay.ended.addCallback(self._stdio_ended)
        self._log.info(
            "Carrying service {service_id!r} over standard input and output",
            service_id=stdio.service_id,
        )
        stdio.start(relay)

    def _stdio_ended(self, result: None) -> None:
        if not self.ending:
            self._log.info("The stream over standard input and output ended")
            self._end(EXIT_CLOSED)

    def local_done(self) -> Deferred[None]:
        """
        Fires once the local side can be left: with C{--stdio}, when standard
        output is flushed and closed (or gave up taking data); at once
        otherwise.
        """
        return succeed(None) if self.stdio is None else self.stdio.closed()

    # -- RelaySink -------------------------------------------------------

    def send_data(self, channel: Channel, payload: bytes | memoryview) -> None:
        protocol = self.protocol
        if protocol is not None:
            protocol.send_data(channel.header, payload)

    def local_closed(self, channel: Channel) -> None:
        relay = self._relays.pop(channel, None)
        if relay is not None:
            self._ended(relay, "local")
        self.session.local_closed(channel)

    def _ended(self, relay: LocalRelay, by: str) -> None:
        # A relay that left _relays carries nothing more: its bytes are final.
        self.counts.stream_ended(
            relay.channel.wire_service_id, by, relay.bytes_out, relay.bytes_in
        )

    @property
    def relays(self) -> Iterable[LocalRelay]:
        """The relay of every channel open now."""
        return self._relays.values()

    # -- source ----------------------------------------------------------

    def accept(self, binding: ServiceBinding, addr: IAddress) -> LocalRelay | None:
        """A local client connected to the port of C{binding}."""
        if self.protocol is None or not self.session.ready or self.ending:
            self._log.info(
                "Refusing a client of service {service_id!r}: the tunnel is not connected",
                service_id=binding.service_id,
            )
            return None
        host = getattr(addr, "host", None)
        port = getattr(addr, "port", None)
        assert self.listeners is not None
        self._log.info(
            "Accepted tcp connection on port {local} from {host}:{port}",
            local=self.listeners.port_for(binding.service_id),
            host=host,
            port=port,
        )
        channel = self.session.open_channel(binding)
        if channel is None:
            return None
        relay = self._relay(channel)
        if host is not None:
            relay.peer_description = f"{host}:{port}"
        return relay

    def _relay(self, channel: Channel, kind: type[LocalRelay] = LocalRelay) -> LocalRelay:
        settings = self._settings
        relay = kind(
            channel,
            self,
            self.flow,
            self._clock,
            max_payload_size=settings.message.max_payload_size,
            buffer_limit=settings.tcp.write_buffer_size,
        )
        self._relays[channel] = relay
        self.counts.stream_opened(channel.wire_service_id)
        return relay

    # -- stopping --------------------------------------------------------

    def shutdown(self) -> Deferred[None]:
        """
        Close every stream and the WebSocket, cleanly, and stop listening.

        @return: fires once the WebSocket is gone: after the service's answer
            to our Close (RFC 6455 wants the server to close TCP first), or
            Autobahn's close handshake timeout.
        """
        self.ending = True
        self.session.reset_all()
        gone: Deferred[None] = succeed(None)
        if self.protocol is not None:
            gone = Deferred()
            self._gone.append(gone)
            self.protocol.close(CLOSE_NORMAL, "local proxy stopping")
        if self.listeners is not None:
            self.listeners.stop()
        return gone
