# -*- test-case-name: tests.test_tunnelservice_process -*-
"""
The tunnel service as a Twisted service: ports serving both planes.

Every port runs one twisted.web site: C{POST /} is the management API,
C{GET /tunnel} the WebSocket data plane and C{GET /health} a load
balancer's check. Each port is a L{StreamServerEndpointService} child of
the L{TunnelService}. Every connection, HTTP or WebSocket, is kept in one
L{Connections} registry, so that stopping the service can close them all
(tunnel peers with 1001) and finish only when they are gone.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.address import UNIXAddress
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer  # type: ignore[import-untyped]

from lpxy._ws import Clock, set_no_delay
from lpxy.metrics import MetricsPort, metrics_site
from lpxy.tunnelservice.admission import (
    DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
    Admission,
    default_max_connections,
)
from lpxy.tunnelservice.api import DEFAULT_MAX_REQUEST_SIZE, ManagementAPI, SizeLimitedRequest
from lpxy.tunnelservice.auth import SignatureVerifier
from lpxy.tunnelservice.bandwidth import TunnelRates
from lpxy.tunnelservice.broker import Broker, Limits
from lpxy.tunnelservice.dataplane import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_PING_INTERVAL,
    TunnelServerFactory,
)
from lpxy.tunnelservice.http import BoundedHTTPChannel
from lpxy.tunnelservice.metrics import ServiceCollector
from lpxy.tunnelservice.ratelog import RateLimitedLog
from lpxy.tunnelservice.store import ITunnelStore
from lpxy.tunnelservice.throttle import Throttle
from lpxy.tunnelservice.websocket import TunnelServerProtocol
from lpxy.wire import CLOSE_GOING_AWAY
from lpxy.writethrough import write_through

__all__ = ["Connections", "OpenAPIRefused", "TunnelService"]

_HTTP_IDLE_TIMEOUT = 120
_BOTH, _API, _TUNNELS = "API and tunnels", "API", "tunnels"
# Refused connections are logged at most once in this many seconds.
REFUSAL_LOG_INTERVAL = 10.0


class Connections:
    """
    The open connections of a service, HTTP and WebSocket alike, so that
    stopping it can close them all and know when they are gone.

    With an L{Admission}, it also decides whether a new connection may stay:
    the count is kept per transport, so it follows a connection from its
    HTTP channel to the WebSocket that takes it over, and is released when
    the last of them is discarded with its transport.

    @param admission: the connection limits (none unless given).
    @param refused: called with the reason of each refusal.
    """

    def __init__(
        self,
        admission: Admission | None = None,
        refused: Callable[[str], None] | None = None,
    ) -> None:
        self._open: set[Any] = set()
        self._idle: list[defer.Deferred[None]] = []
        self._admission = admission
        self._refused = refused

    def __iter__(self) -> Iterator[Any]:
        """The open connections, as they are now."""
        return iter(list(self._open))

    def admit(self, transport: Any) -> bool:
        """
        Whether a connection just accepted on C{transport} may stay; if
        not, the caller closes it before reading anything.
        """
        if self._admission is None:
            return True
        peer = transport.getPeer()
        address = str(getattr(peer, "host", peer))
        reason = self._admission.admit(transport, address)
        if reason is None:
            return True
        if self._refused is not None:
            self._refused(reason)
        return False

    def add(self, connection: Any) -> None:
        """Track a connection (a protocol with a transport)."""
        self._open.add(connection)

    def discard(self, connection: Any) -> None:
        """A connection is gone (or no longer ours)."""
        self._open.discard(connection)
        if self._admission is not None and connection.transport is not None:
            # A channel handing its transport to a WebSocket has none left.
            self._admission.release(connection.transport)
        if not self._open:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def close_all(self) -> defer.Deferred[None]:
        """
        Close every connection, tunnel peers with 1001; fire once none is left.
        """
        for connection in self:
            if isinstance(connection, TunnelServerProtocol):
                connection.close(CLOSE_GOING_AWAY, "service shutting down")
            elif connection.transport is not None:
                # An HTTP channel is its transport's producer, and the
                # transport's loseConnection would wait for it to unregister;
                # the channel's own loseConnection unregisters first.
                connection.loseConnection()
        if not self._open:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d


class _PlainError(Resource):
    isLeaf = True

    def __init__(self, status: int, text: str) -> None:
        super().__init__()
        self._status = status
        self._text = text

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self._status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        # A refused WebSocket client waits for the close, not for keep-alive.
        request.setHeader(b"connection", b"close")
        request.channel.persistent = False
        return (self._text + "\n").encode("utf-8")


class _Health(Resource):
    """
    C{GET /health}: 200 while the node serves, for a load balancer's checks
    (a stopping node has stopped listening, so its checks fail).
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"ok\n"


class _TunnelResource(WebSocketResource):
    """Autobahn's resource, letting go of the HTTP channel it takes over."""

    def __init__(self, factory: TunnelServerFactory) -> None:
        super().__init__(factory)
        self._connections = factory.connections

    def render(self, request: Request) -> Any:
        channel = request.channel
        # Once the WebSocket has the transport, the channel never sees
        # traffic again: its timeout would fire at a transport of None, and
        # it would never report its connection lost.
        channel.setTimeout(None)
        try:
            return super().render(request)
        finally:
            if channel.transport is None:
                self._connections.discard(channel)


class _Root(Resource):
    """
    C{/} is the API and C{/tunnel} the data plane (each where this port
    serves it), anything else a 400.
    """

    def __init__(self, api: Resource | None, tunnel: Any) -> None:
        super().__init__()
        self._api = api
        self._tunnel = tunnel
        if api is None:
            text = "Invalid request path: this port serves tunnels only, on GET /tunnel"
        elif tunnel is None:
            text = "Invalid request path: this port serves the API only, on POST /"
        else:
            text = "Invalid request path: the API is POST / and tunnels are GET /tunnel"
        self._wrong_path = _PlainError(400, text)
        self._health = _Health()

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if path == b"health" and not request.postpath:
            return self._health
        if path == b"" and not request.postpath and self._api is not None:
            return self._api
        if path == b"tunnel" and self._tunnel is not None:
            return self._tunnel
        return self._wrong_path


class _Channel(BoundedHTTPChannel):
    """An HTTP connection that the service keeps track of, with Nagle off."""

    site: _Site

    _admitted = False

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if not self.site.connections.admit(transport):
            # Over a connection limit: closed before anything is read.
            transport.abortConnection()
            return
        self._admitted = True
        set_no_delay(self.transport)
        super().connectionMade()
        self.site.connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self._admitted:
            super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._admitted:
            return
        super().connectionLost(reason)
        self.site.connections.discard(self)


class _Site(Site):
    protocol = _Channel  # type: ignore[assignment]

    def __init__(self, resource: Resource, connections: Connections, reactor: Any) -> None:
        # An idle API connection is closed after this; boto3 reconnects.
        super().__init__(resource, timeout=_HTTP_IDLE_TIMEOUT, reactor=reactor)
        self.connections = connections


class OpenAPIRefused(Exception):
    """An API without credentials on a port reachable beyond this machine."""


def _is_local(address: Any) -> bool:
    """Whether only this machine can reach a listening address."""
    if isinstance(address, UNIXAddress):
        return True
    try:
        return ipaddress.ip_address(getattr(address, "host", "")).is_loopback
    except ValueError:
        return False


@implementer(IStreamServerEndpoint)
class _Reported:
    """
    An endpoint whose listening the service hears of: C{listened} gets each
    port (and may refuse it by raising); a failure after the start has
    passed goes to C{failed_later}, since it can no longer fail the start.
    """

    def __init__(
        self,
        endpoint: Any,
        listened: Callable[[Any], Any],
        failed_later: Callable[[Failure], None],
    ) -> None:
        self._endpoint = endpoint
        self._listened = listened
        self._failed_later = failed_later

    def listen(self, factory: Factory) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self._endpoint.listen(factory)
        d.addCallback(self._listened)
        if not d.called:
            d.addErrback(self._failed_later)
        return d


class _Port(StreamServerEndpointService):
    """
    One port of the service. As with C{strports.service}, a port that cannot
    listen when the service starts fails the start.
    """

    _raiseSynchronously = True

    def stopService(self) -> defer.Deferred[None]:
        if self._waitingForPort is None:
            # Never asked to listen: an earlier port failed the start.
            return defer.succeed(None)
        return super().stopService()


class TunnelService(MultiService):
    """
    The tunnel service: a broker and the ports that serve it.

    @param reactor: the reactor to listen with.
    @param endpoints: server endpoint strings (or endpoint objects) serving
        both the API and the data plane.
    @param api_endpoints: endpoints serving the management API only.
    @param api_rate: API requests a second each caller may make (no limit
        unless given).
    @param data_endpoints: endpoints serving the data plane only.
    @param limits: the broker's limits.
    @param max_request_size: the largest API request body accepted.
    @param clock: the time source of the broker and of the peers' liveness
        checks (the reactor unless given).
    @param ping_interval: seconds of silence after which a peer is pinged.
    @param idle_timeout: seconds without anything from a peer after which
        it is dropped.
    @param store: where the broker keeps tunnels (in memory unless given);
        stopping the service closes it.
    @param verifier: checks API request signatures; without one the API is
        open, and then only on loopback unless C{insecure_open_api}.
    @param insecure_open_api: allow an open API on a port reachable beyond
        this machine.
    @param tunnel_rate: bytes a second each tunnel may carry, all streams
        and both directions together (no limit unless given).
    @param max_connections: connections open at once on all ports
        (L{default_max_connections} unless given).
    @param max_connections_per_address: connections open at once from one
        client address.
    @param node: this node's name among several sharing a store (see
        L{lpxy.tunnelservice.cluster}).
    @param metrics: a server endpoint serving Prometheus metrics at
        C{/metrics} (none unless given).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        endpoints: Sequence[Any],
        limits: Limits | None = None,
        max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
        clock: Clock | None = None,
        ping_interval: float = DEFAULT_PING_INTERVAL,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        store: ITunnelStore | None = None,
        verifier: SignatureVerifier | None = None,
        insecure_open_api: bool = False,
        api_endpoints: Sequence[Any] = (),
        data_endpoints: Sequence[Any] = (),
        api_rate: float | None = None,
        tunnel_rate: float | None = None,
        max_connections: int | None = None,
        max_connections_per_address: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
        node: str | None = None,
        metrics: Any = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._open_api = verifier is None
        self._insecure_open_api = insecure_open_api
        self.broker = Broker(
            clock if clock is not None else reactor, store=store, limits=limits, node=node
        )
        self.store = self.broker.store
        self.admission = Admission(
            default_max_connections() if max_connections is None else max_connections,
            max_connections_per_address,
        )
        self._refusals = RateLimitedLog(
            clock if clock is not None else reactor, REFUSAL_LOG_INTERVAL, self._log_refusals
        )
        self.connections = Connections(self.admission, self._refusals.event)
        self.websocket_factory = TunnelServerFactory(
            self.broker, reactor=reactor, connections=self.connections, clock=clock,
            ping_interval=ping_interval, idle_timeout=idle_timeout,
            tunnel_rates=None if tunnel_rate is None else TunnelRates(
                clock if clock is not None else reactor, tunnel_rate
            ),
        )

        class _Request(SizeLimitedRequest):
            max_size = max_request_size

        def site(api: Resource | None, tunnel: Any) -> _Site:
            made = _Site(_Root(api, tunnel), self.connections, reactor)
            made.requestFactory = _Request
            made.displayTracebacks = False
            made.noisy = False
            return made

        throttle = None
        if api_rate is not None:
            throttle = Throttle(clock if clock is not None else reactor, rate=api_rate)
        api = ManagementAPI(self.broker, verifier, throttle)
        tunnel = _TunnelResource(self.websocket_factory)
        self.factory = site(api, tunnel)
        sites = [(self.factory, _BOTH, endpoints)]
        if api_endpoints:
            sites.append((site(api, None), _API, api_endpoints))
        if data_endpoints:
            sites.append((site(None, tunnel), _TUNNELS, data_endpoints))
        for factory, role, role_endpoints in sites:
            for endpoint in role_endpoints:
                if isinstance(endpoint, str):
                    # Relayed records go to the peers' sockets at once.
                    endpoint = serverFromString(write_through(reactor), endpoint)
                reported = _Reported(
                    endpoint, functools.partial(self._listened, role=role), self._failed_later
                )
                _Port(reported, factory).setServiceParent(self)
        self.metrics: MetricsPort | None = None
        if metrics is not None:
            collector = ServiceCollector(self.broker, self.websocket_factory, api)
            self.metrics = MetricsPort(metrics, metrics_site([collector]), reactor)
            self.metrics.setServiceParent(self)
        self._started_listening = False

    def privilegedStartService(self) -> None:
        self._start_listening()
        try:
            super().privilegedStartService()
        except Exception as e:
            self._cannot_listen(e)

    def startService(self) -> None:
        self._start_listening()
        try:
            super().startService()
        except Exception as e:
            self._cannot_listen(e)
        # Under twistd, the root service takes over SIGTERM and SIGINT when
        # the reactor runs, before this.
        self._reactor.callWhenRunning(self._log.info, "Tunnel service ready")

    def _start_listening(self) -> None:
        if self._started_listening:
            return
        self._started_listening = True
        if self._open_api:
            self._log.warn(
                "The management API is open: no --credentials were given, so anyone "
                "who reaches its port can open, close and rotate tunnels."
            )

    def _log_refusals(self, count: int, reason: str) -> None:
        self._log.warn(
            "Refused {count} connection(s) at once (the latest: {reason})",
            count=count, reason=reason,
        )

    def _cannot_listen(self, error: Exception) -> None:
        # Fail the start, so that twistd exits 1, with one line.
        self._log.critical("Tunnel service cannot listen: {error}", error=str(error))
        raise SystemExit(f"tunnelservice: {error}")

    def _failed_later(self, failure: Failure) -> None:
        self._log.failure("Tunnel service could not listen", failure)
        if self._reactor.running:
            self._reactor.stop()

    def _listened(self, port: Any, role: str) -> Any:
        address = port.getHost()
        where = {"host": getattr(address, "host", ""), "port": getattr(address, "port", None)}
        open_api = self._open_api and role != _TUNNELS
        if open_api and not self._insecure_open_api and not _is_local(address):
            port.stopListening()
            raise OpenAPIRefused(
                f"port {where['host']}:{where['port']} is reachable beyond this machine "
                "and the API has no --credentials: give --credentials FILE, listen on "
                "loopback, or accept an open API with --insecure-open-api"
            )
        self._log.info("Tunnel service listening on {host} port {port}{role}",
                       role="" if role == _BOTH else f" ({role} only)", **where)
        if open_api and not _is_local(address):
            self._log.warn(
                "Port {host}:{port} is reachable beyond this machine and the API is open "
                "(--insecure-open-api): anyone who reaches it can open and close tunnels.",
                **where,
            )
        return port

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """
        Stop listening, close every connection (peers with 1001), wait for
        them, then for the store to write what is pending.
        """
        yield super().stopService()
        self._refusals.stop()
        self.broker.stop()
        yield self.connections.close_all()
        yield self.store.close()
