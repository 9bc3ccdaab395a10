# -*- test-case-name: tests.test_source -*-
"""
The source side: one listening port per service of the tunnel.

The listeners start once, after the first WebSocket session settled the
services, and stay for the life of the proxy (protocol.md section 6: lpxy
keeps them across reconnects). Ports the command line names can be bound
before that (L{SourceListeners.bind}), so that a port that cannot be
listened on fails the proxy before it spends its access token. Every accepted socket is handed to an
C{accept} callable, which returns the protocol to carry it or L{None} to
close it at once (while the tunnel is down, or when the service has too
many connections).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger

from lpxy.proxy.channel import ServiceBinding
from lpxy.writethrough import write_through

__all__ = ["LISTEN_BACKLOG", "ServiceListenerFactory", "SourceListeners", "bind_error"]

LISTEN_BACKLOG = 511
"""
Connections the kernel queues for each port before they are accepted (as
nginx and Redis ask; Linux caps it at C{net.core.somaxconn}): a burst of
hundreds of clients waits there instead of being refused, where Twisted's
default of 50 overflows.
"""

Accept = Callable[[ServiceBinding, IAddress], "Protocol | None"]


class ServiceListenerFactory(ServerFactory):
    """
    Builds the protocol of each client accepted for one service; a port
    bound before its service is known (C{binding} L{None}) closes its
    clients at once.
    """

    # The port logs its own start and stop, naming the port.
    noisy = False

    def __init__(self, binding: ServiceBinding | None, accept: Accept) -> None:
        self.binding = binding
        self._accept = accept

    def buildProtocol(self, addr: IAddress) -> Protocol | None:  # type: ignore[override]
        if self.binding is None:
            return None
        return self._accept(self.binding, addr)


def bind_error(error: CannotListenError) -> str:
    """What the reference says when it cannot listen: C{Could not bind to address: ...}."""
    reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
    host = error.interface or "0.0.0.0"
    shown = f"[{host}]" if ":" in host else host
    return f"Could not bind to address: {shown}:{error.port} -- {reason}"


class SourceListeners:
    """
    The listening ports of a source proxy, one per service.

    @param reactor: provides C{IReactorTCP}.
    @param address: the address to listen on (C{-b} or the setting
        C{default_bind_address}).
    @param ports: the configured port per map key.
    @param accept: decides each accepted client's fate.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        address: str,
        ports: Mapping[str, int],
        accept: Accept,
    ) -> None:
        # Writes to local clients go to their sockets at once.
        self._reactor = write_through(reactor)
        self._address = address
        self._ports = dict(ports)
        self._accept = accept
        self._listening: dict[str, Any] = {}
        # Ports bound before the services were known, by map key.
        self._bound: dict[str, tuple[Any, ServiceListenerFactory]] = {}
        self.started = False

    def port_for(self, service_id: str) -> int | None:
        """The port the service with C{service_id} listens on, once it does."""
        port = self._listening.get(service_id)
        return None if port is None else int(port.getHost().port)

    def _endpoint(self, port: int) -> Any:
        if isIPv6Address(self._address.strip("[]")):
            return TCP6ServerEndpoint(
                self._reactor, port, LISTEN_BACKLOG, interface=self._address.strip("[]")
            )
        return TCP4ServerEndpoint(self._reactor, port, LISTEN_BACKLOG, interface=self._address)

    def bind(self) -> None:
        """
        Listen now on every configured port, before the tunnel is
        connected; L{start} gives each to its service. Clients arriving
        before that are closed at once.

        @raise CannotListenError: a port cannot be listened on; L{stop}
            closes those that did open.
        """
        address = self._address.strip("[]")
        for key, port in self._ports.items():
            factory = ServiceListenerFactory(None, self._accept)
            listening = self._reactor.listenTCP(
                port, factory, backlog=LISTEN_BACKLOG, interface=address
            )
            self._bound[key] = (listening, factory)

    @inlineCallbacks
    def start(self, bindings: Sequence[ServiceBinding]) -> Any:
        """
        Listen for every service; fires with C{{service_id: port}}, or fails
        with the first error (after closing what did open).
        """
        self.started = True
        try:
            for binding in bindings:
                bound = self._bound.pop(binding.key, None) if binding.key is not None else None
                if bound is not None:
                    listening, bound_factory = bound
                    bound_factory.binding = binding
                else:
                    port = self._ports.get(binding.key, 0) if binding.key is not None else 0
                    factory = ServiceListenerFactory(binding, self._accept)
                    listening = yield self._endpoint(port).listen(factory)
                self._listening[binding.service_id] = listening
                self._log.info(
                    "Listening for new connection on port {port}"
                    " (service {service_id!r}, address {address})",
                    address=self._address,
                    port=listening.getHost().port,
                    service_id=binding.service_id,
                )
        except BaseException:
            yield self.stop()
            raise
        # Bound for a service the tunnel does not have.
        yield self._stop_bound()
        return {sid: self.port_for(sid) for sid in self._listening}

    def stop(self) -> Deferred[Any]:
        """Stop listening."""
        listening, self._listening = self._listening, {}
        ports = [*listening.values(), *(port for port, _ in self._bound.values())]
        self._bound = {}
        return DeferredList([maybeDeferred(port.stopListening) for port in ports])

    def _stop_bound(self) -> Deferred[Any]:
        bound, self._bound = self._bound, {}
        return DeferredList([maybeDeferred(port.stopListening) for port, _ in bound.values()])
