# -*- test-case-name: tests.test_endpoints -*-
"""
How the local proxy reaches the tunneling service: the client endpoint
that C{ClientService} connects with.

Layers, innermost first::

    NoDelayEndpoint(HostnameEndpoint(service or web proxy))
    [TLSEndpoint(web proxy TLS options, ...)]          https:// web proxy
    [HTTPConnectEndpoint(..., service host, port)]     through a web proxy
    [TLSEndpoint(service TLS options, ...)]            wss:// (the usual)

C{TCP_NODELAY} is set on the real TCP connection, the innermost layer:
under TLS the WebSocket's transport is Twisted's TLS protocol, where a
no-delay request never reaches the socket, and every small message then
waits for the peer's delayed ACK (about 40 ms).

Under TLS each write is encrypted and sent at once (L{TLSEndpoint}), and
the TCP connection below sends what it can at once (L{lpxy.writethrough}):
the WebSocket writes each frame whole and the tunnel joins records into
messages itself, so nothing is left for a lower layer to join.
"""

from __future__ import annotations

import re
from base64 import b64encode
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet.address import HostnameAddress
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from lpxy._ws import Clock, DelayedCall, set_no_delay
from lpxy.proxy.addresses import authority, no_proxy_matches
from lpxy.proxy.config import ProxyConfig
from lpxy.proxy.tls import client_tls_options
from lpxy.proxy.tls_batching import BatchingTLSFactory
from lpxy.writethrough import write_through

_log = Logger()

#: Seconds a web proxy may take to answer CONNECT.
CONNECT_TIMEOUT = 30.0
#: The most a web proxy's answer head may hold, in bytes.
MAX_ANSWER_HEAD = 16 * 1024

_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?\r?$")


# What this module uses of Twisted's interfaces, spelled as typing protocols
# so that mypy can check the calls (it does not see through zope interfaces).


class _Endpoint(TypingProtocol):
    def connect(self, protocolFactory: Any) -> Deferred[Any]: ...


class _Protocol(TypingProtocol):
    def makeConnection(self, transport: Any) -> None: ...
    def dataReceived(self, data: bytes) -> None: ...
    def connectionLost(self, reason: Failure) -> None: ...


class _ProtocolFactory(TypingProtocol):
    def buildProtocol(self, addr: Any) -> _Protocol | None: ...
    def doStart(self) -> None: ...
    def doStop(self) -> None: ...


class _Transport(TypingProtocol):
    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...


class WebProxyError(ConnectError):
    """
    The web proxy did not open a tunnel.
    """

    MESSAGE = "The web proxy did not open a tunnel"


@implementer(IStreamClientEndpoint)
class NoDelayEndpoint:
    """
    Sets C{TCP_NODELAY} on each TCP connection that the wrapped endpoint
    makes.

    The wrapped endpoint must connect the protocol directly to a TCP
    transport (a L{HostnameEndpoint}, say); TLS and CONNECT go outside.
    The option is set when the wrapped endpoint's Deferred fires, which
    L{HostnameEndpoint} does from within C{connectionMade}: what the
    protocol wrote there (a TLS ClientHello, a CONNECT request) left as the
    connection's first segment, which Nagle never holds back (nothing is
    unacknowledged yet).
    """

    def __init__(self, wrapped: IStreamClientEndpoint) -> None:
        self._wrapped = cast(_Endpoint, wrapped)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Connect with the wrapped endpoint, then switch Nagle off.
        """
        return self._wrapped.connect(protocolFactory).addCallback(self._no_delay)

    @staticmethod
    def _no_delay(protocol: IProtocol) -> IProtocol:
        transport = getattr(protocol, "transport", None)
        if not set_no_delay(transport):
            _log.warn(
                "Cannot set TCP_NODELAY: {transport!r} is not a TCP transport",
                transport=transport,
            )
        return protocol


@implementer(IStreamClientEndpoint)
class TLSEndpoint:
    """
    TLS on each connection the wrapped endpoint makes, as Twisted's
    C{wrapClientTLS} puts it there, but with each write encrypted and
    handed to the connection at once. Twisted's default TLS transport holds
    writes back to the next reactor turn to join small ones: a delayed call
    and one more turn of the loop for every WebSocket message, which is
    already one whole write. The TLS protocol is
    L{lpxy.proxy.tls_batching.BatchingTLSProtocol}: one OpenSSL call and one
    write below per write, one delivery up per read.

    @param options: the TLS client options (L{client_tls_options}).
    """

    def __init__(self, options: Any, wrapped: IStreamClientEndpoint) -> None:
        self._options = options
        self._wrapped = cast(_Endpoint, wrapped)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """Connect with the wrapped endpoint, TLS between it and the protocol."""
        tls = BatchingTLSFactory(self._options, True, protocolFactory)
        return self._wrapped.connect(tls).addCallback(lambda protocol: protocol.wrappedProtocol)


@implementer(IStreamClientEndpoint)
class HTTPConnectEndpoint:
    """
    Reaches C{host}:C{port} through an HTTP web proxy: on a connection to
    the proxy, made by C{proxy}, sends C{CONNECT host:port HTTP/1.1}; on
    any 2xx answer the connection belongs to the protocol being connected,
    which then talks (through the proxy) to C{host}:C{port}.

    Any other answer, the proxy closing first, or no answer within
    C{timeout} seconds fails the connection attempt with a
    L{WebProxyError}, once the connection to the proxy is closed.  The
    credentials go to the proxy as C{Basic} C{Proxy-Authorization}; they
    appear in no message.
    """

    def __init__(
        self,
        clock: IReactorTime,
        proxy: IStreamClientEndpoint,
        host: str,
        port: int,
        *,
        proxy_name: str,
        username: str | None = None,
        password: str | None = None,
        timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._clock = cast(Clock, clock)
        self._proxy = cast(_Endpoint, proxy)
        self._proxy_name = proxy_name
        self._target = authority(host, port)
        self._address = HostnameAddress(host.encode("utf-8"), port)
        self._timeout = timeout
        head = [f"CONNECT {self._target} HTTP/1.1", f"Host: {self._target}"]
        if username is not None or password is not None:
            secret = f"{username or ''}:{password or ''}".encode()
            head.append("Proxy-Authorization: Basic " + b64encode(secret).decode("ascii"))
        self._request = ("\r\n".join(head) + "\r\n\r\n").encode("utf-8")

    def __repr__(self) -> str:
        return f"<HTTPConnectEndpoint {self._target} via {self._proxy_name}>"

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Connect to the proxy, ask for the tunnel, and fire with the
        protocol C{protocolFactory} built once the tunnel is open.
        """
        factory = _ConnectFactory(self, protocolFactory)
        connected = self._proxy.connect(factory)

        def tunnel(protocol: IProtocol) -> Deferred[IProtocol]:
            return cast(_ConnectProtocol, protocol).tunnel

        def unreachable(reason: Failure) -> Failure:
            # Say that it was the proxy that could not be reached.
            if reason.check(CancelledError):
                return reason
            return Failure(self._error("cannot reach it: " + reason.getErrorMessage()))

        return connected.addCallbacks(tunnel, unreachable)

    def _error(self, text: str) -> WebProxyError:
        # ConnectError adds the final full stop.
        text = text.rstrip(".")
        return WebProxyError(string=f"{self._proxy_name}, CONNECT {self._target}: {text}")


class _ConnectFactory(Factory):
    # Builds the protocol that asks for the tunnel; passes start and stop
    # on to the factory of the protocol that will use it.

    def __init__(self, endpoint: HTTPConnectEndpoint, wrapped: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.wrapped = cast(_ProtocolFactory, wrapped)

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: object) -> _ConnectProtocol:
        return _ConnectProtocol(self.endpoint, self.wrapped)


class _ConnectProtocol(Protocol):
    """
    Asks the web proxy for the tunnel, then passes everything between the
    transport and the protocol that uses the tunnel.

    A refusal aborts the connection and fails C{tunnel} once it is closed,
    so that nothing of a failed attempt is left when its caller hears.
    """

    def __init__(self, endpoint: HTTPConnectEndpoint, wrapped: _ProtocolFactory) -> None:
        self._endpoint = endpoint
        self._factory = wrapped
        self.tunnel: Deferred[IProtocol] = Deferred(self._cancel)
        self._head = b""
        self._user: _Protocol | None = None
        self._failure: WebProxyError | None = None
        self._timer: DelayedCall | None = None

    @property
    def _transport(self) -> _Transport:
        return cast(_Transport, self.transport)

    def connectionMade(self) -> None:
        self._timer = self._endpoint._clock.callLater(
            self._endpoint._timeout, self._timed_out
        )
        self._transport.write(self._endpoint._request)

    def dataReceived(self, data: bytes) -> None:
        if self._user is not None:
            self._user.dataReceived(data)
            return
        if self._failure is not None or self.tunnel.called:
            return  # refused or cancelled: the connection is closing
        self._head += data
        end = _END_OF_HEAD.search(self._head)
        if end is None:
            if len(self._head) > MAX_ANSWER_HEAD:
                self._fail(f"answer head longer than {MAX_ANSWER_HEAD} bytes")
            return
        head, rest = self._head[: end.start()], self._head[end.end() :]
        self._head = b""
        self._answered(head.split(b"\n", 1)[0], rest)

    def _answered(self, status_line: bytes, rest: bytes) -> None:
        match = _STATUS_LINE.match(status_line)
        if match is None:
            self._fail("not an HTTP answer: " + _printable(status_line))
            return
        status = int(match.group(1))
        reason = _printable(match.group(2) or b"")
        if not 200 <= status < 300:
            hint = ""
            if status == 407:
                hint = " (proxy credentials missing or refused)"
            self._fail(f"refused with {status} {reason}".rstrip() + hint)
            return
        self._stop_timer()
        user = self._factory.buildProtocol(self._endpoint._address)
        if user is None:
            self._fail("the connecting factory built no protocol")
            return
        _log.debug(
            "{proxy} opened a tunnel to {target}",
            proxy=self._endpoint._proxy_name,
            target=self._endpoint._target,
        )
        self._user = user
        user.makeConnection(self.transport)
        self.tunnel.callback(cast(IProtocol, user))
        if rest:
            user.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if self._user is not None:
            self._user.connectionLost(reason)
        elif not self.tunnel.called:
            error = self._failure or self._endpoint._error(
                "connection closed before an answer: " + reason.getErrorMessage()
            )
            self.tunnel.errback(error)

    def _fail(self, text: str) -> None:
        self._stop_timer()
        if self._failure is None:
            self._failure = self._endpoint._error(text)
            self._transport.abortConnection()

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(f"no answer within {self._endpoint._timeout:g} seconds")

    def _cancel(self, tunnel: Deferred[IProtocol]) -> None:
        # Deferred.cancel fires CancelledError itself after this.
        self._stop_timer()
        self._transport.abortConnection()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            timer, self._timer = self._timer, None
            timer.cancel()


def _printable(text: bytes, limit: int = 100) -> str:
    # What a proxy says goes into logs: keep it short and plain.
    shown = "".join(
        c if c.isprintable() else "?" for c in text[:limit].decode("latin-1")
    )
    return shown + ("..." if len(text) > limit else "")


def tcp_endpoint(reactor: Any, host: str, port: int) -> IStreamClientEndpoint:
    """
    A TCP client endpoint to C{host} (name, IPv4 or bare IPv6 literal) with
    C{TCP_NODELAY} on, its writes (TLS records, under TLS) sent at once
    (L{lpxy.writethrough}).
    """
    tcp = cast(IStreamClientEndpoint, HostnameEndpoint(write_through(reactor), host, port))
    return cast(IStreamClientEndpoint, NoDelayEndpoint(tcp))


def tunnel_client_endpoint(reactor: Any, config: ProxyConfig) -> IStreamClientEndpoint:
    """
    The endpoint to connect to the tunneling service with, as C{config}
    says: directly or through its web proxy (unless C{NO_PROXY} names the
    service host), under TLS (verified as L{client_tls_options} says, for
    an C{https://} web proxy too) unless the endpoint is C{ws://}.

    @param reactor: provides L{IReactorTCP}, L{IReactorTime} and
        L{IReactorPluggableNameResolver}.
    @raise lpxy.proxy.tls.CAPathError: for an unusable C{--capath}.
    """
    target = config.endpoint
    web_proxy = config.web_proxy
    # Config resolution already drops the proxy then; a config built some
    # other way (tests, benchmarks) gets the same rule here.
    if web_proxy is not None and no_proxy_matches(target.host, target.port, config.no_proxy):
        _log.info(
            "Connecting to {host} directly: NO_PROXY names it", host=target.host
        )
        web_proxy = None
    endpoint: IStreamClientEndpoint
    if web_proxy is None:
        endpoint = tcp_endpoint(reactor, target.host, target.port)
    else:
        proxy_name = "web proxy " + authority(web_proxy.host, web_proxy.port)
        endpoint = tcp_endpoint(reactor, web_proxy.host, web_proxy.port)
        if web_proxy.tls:
            endpoint = cast(IStreamClientEndpoint, TLSEndpoint(
                client_tls_options(web_proxy.host, config.capath, config.verify_ssl),
                endpoint,
            ))
        _log.info(
            "Connecting to {target} through {proxy} (https: {tls},"
            " credentials: {credentials})",
            target=authority(target.host, target.port),
            proxy=proxy_name,
            tls=web_proxy.tls,
            credentials=web_proxy.username is not None or web_proxy.password is not None,
        )
        endpoint = cast(
            IStreamClientEndpoint,
            HTTPConnectEndpoint(
                reactor,
                endpoint,
                target.host,
                target.port,
                proxy_name=proxy_name,
                username=web_proxy.username,
                password=web_proxy.password,
            ),
        )
    if target.tls:
        endpoint = cast(IStreamClientEndpoint, TLSEndpoint(
            client_tls_options(target.host, config.capath, config.verify_ssl), endpoint
        ))
    return endpoint
