# -*- test-case-name: tests.test_metrics -*-
"""
The optional Prometheus endpoint (C{--metrics ENDPOINT}) of the local proxy
and of the tunnel service: C{GET /metrics} on a Twisted server endpoint,
in the text format Prometheus scrapes (or OpenMetrics, when asked).

Each process (and each service in a test's process) has its own
C{CollectorRegistry}, never C{prometheus_client}'s global one. Its
collectors read counts the services keep as plain numbers anyway, when
scraped: nothing on the relay's path knows that metrics exist. They are
read on the reactor thread, where the counts change, so the page is
rendered there too (C{prometheus_client}'s own Twisted resource renders on
a thread pool, where it would race the reactor).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

__all__ = ["MetricsListenError", "MetricsPort", "check_endpoint", "metrics_site"]

EXAMPLE = "tcp:9100:interface=127.0.0.1"


def check_endpoint(description: str, option: str = "--metrics") -> str:
    """
    C{description} if it is a server endpoint Twisted can listen on.

    @raise ValueError: naming C{option}, the problem and an example.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, description)
    except Exception as e:
        raise ValueError(
            f"{option} {description!r}: {e or type(e).__name__}; expected a server"
            f" endpoint such as {EXAMPLE}"
        ) from None
    return description


class _Exposition(Resource):
    """C{/metrics}: the registry's samples, rendered on the reactor thread."""

    isLeaf = True

    def __init__(self, registry: Any) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        from prometheus_client.exposition import choose_encoder

        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", content_type.encode("ascii"))
        body: bytes = encoder(self._registry)
        return body


class _QuietSite(Site):
    """A site that writes no access line: a scrape every few seconds is noise."""

    def log(self, request: Any) -> None:
        pass


def metrics_site(collectors: Iterable[Any]) -> Site:
    """
    A web site serving C{collectors} (C{prometheus_client} collectors) at
    C{/metrics}, from a registry of their own.
    """
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=True)
    for collector in collectors:
        registry.register(collector)
    root = Resource()
    exposition: Any = _Exposition(registry)
    root.putChild(b"metrics", exposition)
    site = _QuietSite(root)
    site.noisy = False
    site.displayTracebacks = False
    return site


class MetricsListenError(Exception):
    """The metrics endpoint could not listen; the message says where and why."""


class MetricsPort(Service):
    """
    Serves a metrics site on one endpoint while running.

    L{listen} starts listening at once (the proxy binds before connecting,
    the tunnel service before privileges are dropped); starting the
    service listens if that was not done yet.

    @param endpoint: a server endpoint string or endpoint.
    @param site: what to serve (L{metrics_site}).
    @param reactor: to build the endpoint from a string.
    """

    _log = Logger()

    def __init__(self, endpoint: Any, site: Site, reactor: Any = None) -> None:
        self.description = endpoint if isinstance(endpoint, str) else repr(endpoint)
        if isinstance(endpoint, str):
            from twisted.internet.endpoints import serverFromString

            if reactor is None:
                from twisted.internet import reactor
            endpoint = serverFromString(reactor, endpoint)
        self._endpoint = endpoint
        self._site = site
        self._listening: Deferred[Any] | None = None
        self._error: MetricsListenError | None = None
        self.port: Any = None

    def listen(self) -> None:
        """
        Listen now, unless done already.

        @raise MetricsListenError: when listening failed at once.
        """
        if self._listening is None:
            self._listening = self._endpoint.listen(self._site)
            self._listening.addCallbacks(self._listened, self._failed)
        if self._error is not None:
            raise self._error

    def _listened(self, port: Any) -> None:
        self.port = port
        address = port.getHost()
        self._log.info(
            "Serving metrics on {host} port {port} at /metrics",
            host=getattr(address, "host", address), port=getattr(address, "port", ""),
        )

    def _failed(self, reason: Failure) -> None:
        self._error = MetricsListenError(
            f"--metrics {self.description}: cannot listen: {reason.getErrorMessage()}"
        )
        if self.running:
            self._log.error("{error}", error=str(self._error))

    def privilegedStartService(self) -> None:
        self.listen()
        super().privilegedStartService()

    def startService(self) -> None:
        self.listen()
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        self._listening = self._error = None
        if port is not None:
            stopped: Deferred[None] = port.stopListening()
            return stopped
        return None
