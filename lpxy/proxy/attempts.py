# -*- test-case-name: tests.test_proxy_service,tests.test_reference_phrases -*-
"""
Each attempt to connect to the tunneling service, as C{ClientService}
makes them: the endpoint that tells a failed attempt in the reference's
words and reports it before C{ClientService} schedules a retry
(L{GuardedEndpoint}), the guard against the C{NoTransition} it raises when
a connection is lost before it was prepared, and the tunnel protocol whose
routine Autobahn lines are told at debug (L{ProxyTunnelProtocol}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from automat import NoTransition
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from lpxy.proxy.tunnel import TunnelProtocol

__all__ = ["GuardedEndpoint", "ProxyTunnelProtocol", "connect_failure"]


class _NoTransitionGuard(Protocol):
    """
    Stands between a transport and the protocol C{ClientService} built,
    and swallows the C{NoTransition} C{ClientService} raises when that
    connection is lost before it was prepared.

    Works around Twisted's C{ClientService} (its state machine in
    C{twisted/application/_client_service.py}, Twisted 26.10): it has no
    transition for C{_clientDisconnected} in its Connecting state
    (C{prepareConnection} pending) or its Waiting state (after
    C{prepareConnection} failed), so the disconnection notice raises
    C{NoTransition} out of C{connectionLost}, which the reactor would log as
    a traceback. Our C{prepareConnection} fails exactly when a connection
    closes during the WebSocket handshake (a 4xx, a dropped upgrade); the
    guard swallows that one exception after the protocol has heard of the
    loss.
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


class _NoTransitionGuardFactory(Factory):
    """Builds the wrapped factory's protocols, each inside a L{_NoTransitionGuard}."""

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def doStart(self) -> None:
        self._wrapped.doStart()

    def doStop(self) -> None:
        self._wrapped.doStop()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        built = self._wrapped.buildProtocol(addr)
        return None if built is None else _NoTransitionGuard(built)


def connect_failure(reason: Failure, host: str) -> str:
    """
    The reference's words for a connection to the tunneling service that
    failed before TCP connected: C{Could not connect to proxy server:
    Connection refused}, C{Could not resolve DNS hostname of proxy host:
    <host> - <why>}.
    """
    if reason.check(DNSLookupError):
        return f"Could not resolve DNS hostname of proxy host: {host} - {reason.getErrorMessage()}"
    if reason.check(ConnectionRefusedError):
        return "Could not connect to proxy server: Connection refused"
    return f"Could not connect to proxy server: {reason.getErrorMessage()}"


class GuardedEndpoint:
    """
    Wraps an endpoint so every connection goes through a
    L{_NoTransitionGuard}, and logs and reports an attempt that never
    connected before C{ClientService} hears of it.

    C{ClientService} (Twisted 26.10) schedules and logs its next attempt
    ("Scheduling retry") as soon as one fails, with no hook before that:
    reporting the failure first lets a spent retry budget stop it in time.
    """

    _log = Logger()

    def __init__(
        self, endpoint: Any, description: str, failed: Callable[[str], object], host: str = ""
    ) -> None:
        self._endpoint = endpoint
        self._description = description
        self._host = host
        self._report = failed

    def connect(self, factory: Any) -> Deferred[Any]:
        self._log.info(
            "Attempting to establish web socket connection with endpoint {endpoint}",
            endpoint=self._description,
        )
        connecting: Deferred[Any] = self._endpoint.connect(_NoTransitionGuardFactory(factory))
        return connecting.addCallbacks(lambda gate: gate.wrapped, self._failed)

    def _failed(self, reason: Failure) -> Failure:
        if not reason.check(CancelledError, ConnectingCancelledError):
            self._log.warn(
                "{what} ({endpoint}: {error})",
                what=connect_failure(reason, self._host),
                endpoint=self._description,
                error=reason.getErrorMessage(),
            )
            # Before ClientService hears of it: a spent budget stops the
            # service now, so that it never schedules a retry.
            self._report(reason.getErrorMessage())
        return reason

    def __repr__(self) -> str:
        return f"<tunnel endpoint {self._description}>"


class _RoutineAutobahnLinesAsDebug:
    """
    Autobahn's logger for a tunnel protocol, with its "dropping
    connection", "failing WebSocket connection" and "failing WebSocket
    opening handshake" lines told at debug.

    Works around Autobahn's C{WebSocketProtocol.dropConnection},
    C{_fail_connection} and C{failHandshake}
    (C{autobahn/websocket/protocol.py}), which speak up whenever they drop
    a connection that did not close cleanly (a refused handshake, our own
    abort after a protocol error or a dead connection) or fail one (a
    message over the size limit). Each of those has its line from
    L{ProxyConnector}, in the reference's words where it has some, so
    Autobahn's is a routine detail; every other Autobahn line keeps its
    level.
    """

    _ROUTINE = (
        "dropping connection to peer",
        "failing WebSocket connection",
        "failing WebSocket opening handshake",
    )
    # Twisted's own logger: txaio's drops debug lines below its own level.
    _debug = Logger(namespace="autobahn")

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def _routine(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        text = args[0] if args else kwargs.get("format", "")
        return isinstance(text, str) and text.startswith(self._ROUTINE)

    def warn(self, *args: Any, **kwargs: Any) -> None:
        if self._routine(args, kwargs):
            self._debug.debug(*args, **kwargs)
        else:
            self._wrapped.warn(*args, **kwargs)

    def info(self, *args: Any, **kwargs: Any) -> None:
        if self._routine(args, kwargs):
            self._debug.debug(*args, **kwargs)
        else:
            self._wrapped.info(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


class ProxyTunnelProtocol(TunnelProtocol):
    """A tunnel protocol whose routine Autobahn lines are told at debug."""

    log = _RoutineAutobahnLinesAsDebug(TunnelProtocol.log)
