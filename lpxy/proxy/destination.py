# -*- test-case-name: tests.test_destination -*-
"""
The destination side: connect each started stream or connection to its
local application.

Connecting never blocks the reactor: each attempt is an endpoint
C{connect}, retried C{tcp.connection_retry_count} times (-1: for ever)
every C{tcp.connection_retry_delay_ms}, while every other stream keeps
flowing. What the tunnel delivers meanwhile waits in the relay (bounded,
see L{lpxy.proxy.relay}). When the last attempt fails the relay gives up
and the caller's C{failed} callback sends the reset. Closing the channel
meanwhile cancels the attempt or the pending retry, leaving no delayed call
behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from lpxy.proxy.addresses import authority
from lpxy.proxy.config import LocalTarget, TcpTarget, UnixTarget
from lpxy.proxy.relay import LocalRelay
from lpxy.writethrough import write_through

__all__ = ["AppConnector", "describe_target"]


def describe_target(target: LocalTarget) -> str:
    """C{host:port} or the socket path, for logs."""
    if isinstance(target, TcpTarget):
        return authority(target.host, target.port)
    return target.path


class _OnceFactory(Factory):
    """Hands out the relay for the first connection only."""

    # One per stream: "Starting factory" and "Stopping factory" at info for
    # each would drown the stream's own open and close lines.
    noisy = False

    def __init__(self, relay: LocalRelay) -> None:
        self._relay: LocalRelay | None = relay

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        relay, self._relay = self._relay, None
        return relay if relay is not None else Protocol()


class _Attempt:
    _log = Logger()

    def __init__(
        self,
        owner: AppConnector,
        relay: LocalRelay,
        target: LocalTarget,
        failed: Callable[[], None],
    ) -> None:
        self._owner = owner
        self._relay = relay
        self._target = target
        self._failed = failed
        self._tries = 0
        self._pending: Any = None
        self._retry: Any = None
        self._cancelled = False
        relay.abandon = self.cancel
        relay.peer_description = describe_target(target)

    def start(self) -> None:
        if not self._tries:
            self._log.info(
                "Attempting to establish tcp socket connection to: {target}",
                target=describe_target(self._target),
            )
        self._tries += 1
        self._retry = None
        endpoint = self._owner.endpoint_for(self._target)
        self._pending = endpoint.connect(_OnceFactory(self._relay))
        self._pending.addCallbacks(self._connected, self._failure)

    def _connected(self, _protocol: object) -> None:
        self._pending = None
        self._relay.abandon = None
        transport: Any = self._relay.transport
        peer = transport.getPeer() if transport is not None else None
        if isinstance(self._target, UnixTarget):
            self._log.info("Connected to Unix socket: {path}", path=self._target.path)
        elif peer is not None:
            self._log.info(
                "Connected to {host}, port: {port}",
                host=getattr(peer, "host", "?"),
                port=getattr(peer, "port", "?"),
            )

    def _failure(self, reason: Failure) -> None:
        self._pending = None
        if self._cancelled:
            return
        retries = self._owner.retry_count
        where = describe_target(self._target)
        if retries < 0 or self._tries <= retries:
            self._log.warn(
                "Cannot connect to {target} for service {service_id!r} "
                "(attempt {tries}): {error}; retrying in {delay}s",
                target=where,
                service_id=self._relay.channel.wire_service_id,
                tries=self._tries,
                error=reason.getErrorMessage(),
                delay=self._owner.retry_delay,
            )
            self._retry = self._owner.clock.callLater(self._owner.retry_delay, self.start)
            return
        self._log.error(
            "Giving up connecting to {target} for service {service_id!r} after "
            "{tries} attempts: {error}",
            target=where,
            service_id=self._relay.channel.wire_service_id,
            tries=self._tries,
            error=reason.getErrorMessage(),
        )
        self._relay.abandon = None
        self._relay.give_up()
        self._failed()

    def cancel(self) -> None:
        self._cancelled = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.addErrback(lambda _: None)
            pending.cancel()


class AppConnector:
    """
    Connects relays to local applications with retries.

    @param reactor: provides C{IReactorTCP}, C{IReactorUNIX} and
        C{IReactorTime} (the last may be overridden by C{clock}).
    @param retry_count: retries after the first failure; -1 for ever.
    @param retry_delay: seconds between attempts.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        retry_count: int = 5,
        retry_delay: float = 2.5,
        clock: Any = None,
    ) -> None:
        self._reactor = reactor
        # Writes to local applications go to their sockets at once.
        self._tcp_reactor = write_through(reactor)
        self.retry_count = retry_count
        self.retry_delay = retry_delay
        self.clock = clock if clock is not None else reactor

    def endpoint_for(self, target: LocalTarget) -> Any:
        """The client endpoint reaching C{target}."""
        if isinstance(target, TcpTarget):
            # An address needs no name resolution (HostnameEndpoint would
            # still go through the resolver's thread pool).
            if isIPAddress(target.host):
                return TCP4ClientEndpoint(self._tcp_reactor, target.host, target.port)
            if isIPv6Address(target.host):
                return TCP6ClientEndpoint(self._tcp_reactor, target.host, target.port)
            return HostnameEndpoint(self._tcp_reactor, target.host, target.port)
        return UNIXClientEndpoint(self._reactor, target.path)

    def connect(self, relay: LocalRelay, target: LocalTarget, failed: Callable[[], None]) -> None:
        """
        Connect C{relay} to C{target}; call C{failed} if that never works.
        Closing the relay before it connects (L{LocalRelay.close}) cancels.
        """
        _Attempt(self, relay, target, failed).start()
