# -*- test-case-name: tests.test_proxy_service -*-
"""
The local proxy as a service: the tunnel connection kept up, the retry
budget, the end.

L{LocalProxyService} is a C{MultiService} owning a C{ClientService} for the
WebSocket (design.md, "Connecting and reconnecting"). Its
C{prepareConnection} waits for L{TunnelProtocol.ready}: a connection counts
only once the handshake is done and, in V2/V3, SERVICE_IDS has settled the
services (and, for a source, the listeners are up). Its
L{lpxy.proxy.connector.ProxyConnector} carries the connection's events to
the session and tells the service of losses, failed attempts and the end;
the service counts the failures against C{websocket.connect_retry_count}
and fires L{LocalProxyService.whenDone} with the exit status (see
L{lpxy.proxy.connector} for the statuses).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from twisted.application.internet import ClientService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from lpxy import __version__
from lpxy.frames import WIRE_FRAME_LIMIT
from lpxy.proxy.attempts import GuardedEndpoint, ProxyTunnelProtocol
from lpxy.proxy.config import ProxyConfig
from lpxy.proxy.connector import (
    EXIT_CLOSED,
    EXIT_CONFIG,
    EXIT_GAVE_UP,
    EXIT_REJECTED,
    ProxyConnector,
    TunnelConnectionFailed,
)
from lpxy.proxy.metrics import ProxyCollector
from lpxy.proxy.settings import unused_settings
from lpxy.proxy.source import bind_error
from lpxy.proxy.statedir import kept_client_token
from lpxy.proxy.stats import StatsSignal, format_summary, snapshot
from lpxy.proxy.tunnel import TunnelFactory, TunnelProtocol

if TYPE_CHECKING:
    from lpxy.metrics import MetricsPort

__all__ = [
    "EXIT_CLOSED",
    "EXIT_CONFIG",
    "EXIT_GAVE_UP",
    "EXIT_REJECTED",
    "WIRE_FRAME_LIMIT",
    "LocalProxyService",
    "TunnelConnectionFailed",
]

USER_AGENT = f"lpxy/{__version__}"


class LocalProxyService(MultiService):
    """
    The local proxy: a tunnel connection kept up by a C{ClientService},
    plus the listeners (source) or application connections (destination)
    of its L{ProxyConnector}, whose
    L{lpxy.proxy.connector.ConnectorListener} it is.

    @param config: the validated configuration.
    @param reactor: the reactor (the global one by default).
    @param endpoint: the tunnel endpoint (by default
        L{lpxy.proxy.endpoints.tunnel_client_endpoint}); for tests.
    @param clock: the time source (the reactor by default); for tests.
    @param open_stdio: with C{--stdio}, gives the connection its transport
        (the process's standard input and output by default); for tests.
    """

    _log = Logger()

    def __init__(
        self,
        config: ProxyConfig,
        reactor: Any = None,
        *,
        endpoint: Any = None,
        clock: Any = None,
        open_stdio: Any = None,
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
        self.client_token = self._client_token(config)
        settings = config.settings.websocket
        self.connector = ProxyConnector(config, reactor, self._clock, self, open_stdio)
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
        self.factory.protocol = ProxyTunnelProtocol
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
        self._delay = delay
        # The next attempt follows at once (the service said 1001).
        self._at_once = False
        self.client = ClientService(
            cast(Any, GuardedEndpoint(
                endpoint, endpoint_name, self._endpoint_failed, config.endpoint.host
            )),
            cast(Any, self.factory),
            retryPolicy=self._retry_delay,
            clock=self._clock,
            prepareConnection=self._prepare,
        )
        self.client.setServiceParent(self)
        StatsSignal(self.log_summary, reactor).setServiceParent(self)
        self.metrics: MetricsPort | None = None
        if config.metrics is not None:
            # twisted.web comes with lpxy.metrics: imported only for --metrics.
            from lpxy.metrics import MetricsPort, metrics_site

            self.metrics = MetricsPort(config.metrics, metrics_site([self.collector()]), reactor)
            self.metrics.setServiceParent(self)
        self._done: Deferred[int] = Deferred()
        self._status: int | None = None
        self._announced = False
        self._bind_tried = False
        self._bind_failed = False

    @staticmethod
    def _client_token(config: ProxyConfig) -> str:
        """C{-i}, else the one kept in the state directory, else a new one."""
        if config.client_token is not None:
            return config.client_token
        if config.state_dir is None:
            return str(uuid.uuid4())
        return kept_client_token(
            Path(config.state_dir), config.access_token, lambda: str(uuid.uuid4())
        )

    def collector(self) -> ProxyCollector:
        """A Prometheus collector of this proxy's metrics."""
        connector = self.connector
        return ProxyCollector(
            connector.counts,
            lambda: connector.relays,
            lambda: None if connector.protocol is None else connector.protocol.last_rtt,
        )

    def _announce(self) -> None:
        if not self._announced:
            self._announced = True
            self._log.info("Starting proxy in {mode} mode", mode=self._config.mode)

    def privilegedStartService(self) -> None:
        # twistd calls this before it drops privileges (--uid), so a port
        # below 1024 can be bound here.
        self._announce()
        self._bind_first()
        super().privilegedStartService()

    def startService(self) -> None:
        self._announce()
        if not self._bind_tried:
            self._bind_first()
        if self._bind_failed:
            Service.startService(self)
            self.finished(EXIT_CONFIG)
            return
        super().startService()

    def _bind_first(self) -> None:
        # A source binds the ports its command line names before the first
        # connection: a busy or privileged port then ends the proxy at once,
        # its access token unspent.
        self._bind_tried = True
        if self.metrics is not None:
            from lpxy.metrics import MetricsListenError

            try:
                self.metrics.listen()
            except MetricsListenError as e:
                self._log.error("{error}", error=str(e))
                self._bind_failed = True
                return
        listeners = self.connector.listeners
        if listeners is None or self._config.mappings_from_config_dir:
            return
        try:
            listeners.bind()
        except CannotListenError as e:
            self._log.error("{text}", text=bind_error(e))
            self._bind_failed = True

    def log_summary(self) -> None:
        """Log one summary of the tunnel (what SIGUSR2 asks for)."""
        stats = snapshot(self.connector, self._clock.seconds())
        self._log.info(
            "{summary}",
            summary=format_summary(stats),
            connected_since=stats.connected_since,
            reconnects=stats.reconnects,
            open_streams=len(stats.streams),
        )

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
        if not self.connector.ending:
            self.attempt_failed(error)

    def attempt_failed(self, error: str) -> bool:
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
            self.finished(EXIT_GAVE_UP)
            return False
        return True

    def _retry_delay(self, attempt: int) -> float:
        if self._at_once:
            self._at_once = False
            return 0.0
        return self._delay

    def connection_lost(self, reason: str, at_once: bool = False) -> bool:
        """
        A usable connection was lost: say whether a reconnection follows,
        without the retry delay when C{at_once} (only the first: if it fails,
        the next waits as usual).
        """
        self._failures = 1
        self._at_once = at_once
        if self._retries == 0:
            self._log.error(
                "Lost the tunnel connection ({reason}); not reconnecting: "
                "websocket.connect_retry_count is 0",
                reason=reason,
            )
            self.finished(EXIT_GAVE_UP)
            return False
        return True

    def finished(self, status: int) -> None:
        """The proxy must end with C{status}: stop, then fire L{whenDone}."""
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
        stopped.addBoth(lambda _: self.connector.local_done())
        stopped.addBoth(lambda _: self._done.callback(status))

    def stopService(self) -> Deferred[None]:
        # The WebSocket goes first: its loss reaches us before ClientService,
        # which, stopped from there, schedules no retry.
        gone = self.connector.shutdown()
        gone.addCallback(lambda _: self.connector.local_done())
        return gone.addCallback(lambda _: MultiService.stopService(self))
