# -*- test-case-name: tests.test_tunnelservice_process -*-
"""
The tunnel service as a Twisted service: ports serving both planes.

Every port runs one twisted.web site: C{POST /} is the management API and
C{GET /tunnel} the WebSocket data plane. Every connection, HTTP or
WebSocket, is kept in one L{Connections} set, so that stopping the service
can close them all (tunnel peers with 1001) and finish only when they are
gone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.address import UNIXAddress
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from lpxy._ws import Clock, set_no_delay
from lpxy.tunnelservice.api import DEFAULT_MAX_REQUEST_SIZE, ManagementAPI, SizeLimitedRequest
from lpxy.tunnelservice.auth import SignatureVerifier
from lpxy.tunnelservice.broker import Broker, Limits
from lpxy.tunnelservice.store import ITunnelStore
from lpxy.tunnelservice.websocket import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_PING_INTERVAL,
    Connections,
    TunnelServerFactory,
)

__all__ = ["OpenAPIRefused", "TunnelService"]

_HTTP_IDLE_TIMEOUT = 120


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
    """C{/} is the API, C{/tunnel} the data plane, anything else a 400."""

    def __init__(self, api: Resource, tunnel: Any) -> None:
        super().__init__()
        self._api = api
        self._tunnel = tunnel
        self._wrong_path = _PlainError(
            400, "Invalid request path: the API is POST / and tunnels are GET /tunnel"
        )

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if path == b"" and not request.postpath:
            return self._api
        if path == b"tunnel":
            return self._tunnel
        return self._wrong_path


class _Channel(HTTPChannel):
    """An HTTP connection that the service keeps track of, with Nagle off."""

    site: _Site

    def connectionMade(self) -> None:
        set_no_delay(self.transport)
        super().connectionMade()
        self.site.connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.site.connections.discard(self)


class _Site(Site):
    protocol = _Channel  # type: ignore[assignment]

    def __init__(self, resource: Resource, connections: Connections) -> None:
        # An idle API connection is closed after this; boto3 reconnects.
        super().__init__(resource, timeout=_HTTP_IDLE_TIMEOUT)
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


class TunnelService(MultiService):
    """
    The tunnel service: a broker and the ports that serve it.

    @param reactor: the reactor to listen with.
    @param endpoints: server endpoint strings (or endpoint objects).
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
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._open_api = verifier is None
        self._insecure_open_api = insecure_open_api
        self._endpoints = [
            serverFromString(reactor, e) if isinstance(e, str) else e for e in endpoints
        ]
        self.broker = Broker(
            clock if clock is not None else reactor, store=store, limits=limits
        )
        self.store = self.broker.store
        self.connections = Connections()
        self.websocket_factory = TunnelServerFactory(
            self.broker, reactor=reactor, connections=self.connections, clock=clock,
            ping_interval=ping_interval, idle_timeout=idle_timeout,
        )

        class _Request(SizeLimitedRequest):
            max_size = max_request_size

        site = _Site(
            _Root(ManagementAPI(self.broker, verifier), _TunnelResource(self.websocket_factory)),
            self.connections,
        )
        site.requestFactory = _Request
        site.displayTracebacks = False
        site.noisy = False
        self.factory = site
        self.ports: list[Any] = []
        self._started_listening = False
        self._synchronous = False
        self._outcome: Any = None
        self._waiting: list[defer.Deferred[list[IListeningPort]]] = []

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if not self._started_listening:
            self._listen()
        # Under twistd, the root service takes over SIGTERM and SIGINT when
        # the reactor runs, before this.
        self._reactor.callWhenRunning(self._log.info, "Tunnel service ready")

    def _listen(self) -> None:
        if self._open_api:
            self._log.warn(
                "The management API is open: no --credentials were given, so anyone "
                "who reaches its port can open, close and rotate tunnels."
            )
        self._started_listening = True
        self._synchronous = True
        d = defer.gatherResults(
            [e.listen(self.factory).addCallback(self._listened) for e in self._endpoints],
            consumeErrors=True,
        )
        d.addBoth(self._listen_done)
        self._synchronous = False
        if isinstance(self._outcome, Failure):
            # Fail the start, so that twistd exits 1, with one line.
            self._log.critical(
                "Tunnel service cannot listen: {error}", error=self._outcome.getErrorMessage()
            )
            raise SystemExit(f"tunnelservice: {self._outcome.getErrorMessage()}")

    def _listen_done(self, outcome: Any) -> None:
        if isinstance(outcome, Failure) and isinstance(outcome.value, defer.FirstError):
            outcome = outcome.value.subFailure
        self._outcome = outcome
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)
        if isinstance(outcome, Failure) and not self._synchronous:
            self._log.failure("Tunnel service could not listen", outcome)
            if self._reactor.running:
                self._reactor.stop()

    def _listened(self, port: Any) -> Any:
        address = port.getHost()
        where = {"host": getattr(address, "host", ""), "port": getattr(address, "port", None)}
        if self._open_api and not self._insecure_open_api and not _is_local(address):
            port.stopListening()
            raise OpenAPIRefused(
                f"port {where['host']}:{where['port']} is reachable beyond this machine "
                "and the API has no --credentials: give --credentials FILE, listen on "
                "loopback, or accept an open API with --insecure-open-api"
            )
        self.ports.append(port)
        self._log.info("Tunnel service listening on {host} port {port}", **where)
        if self._open_api and not _is_local(address):
            self._log.warn(
                "Port {host}:{port} is reachable beyond this machine and the API is open "
                "(--insecure-open-api): anyone who reaches it can open and close tunnels.",
                **where,
            )
        return port

    def when_listening(self) -> defer.Deferred[list[IListeningPort]]:
        """Fire with the listening ports once every endpoint listens."""
        if self._outcome is None:
            d: defer.Deferred[list[IListeningPort]] = defer.Deferred()
            self._waiting.append(d)
            return d
        if isinstance(self._outcome, Failure):
            return defer.fail(self._outcome)
        return defer.succeed(self._outcome)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """
        Stop listening, close every connection (peers with 1001), wait for
        them, then for the store to write what is pending.
        """
        yield super().stopService()
        ports, self.ports = self.ports, []
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
        self.broker.stop()
        yield self.connections.close_all()
        yield self.store.close()
