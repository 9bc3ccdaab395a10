"""
Tests for L{lpxy.proxy.endpoints}: which way the local proxy goes to the
service (directly, through an HTTP or HTTPS web proxy), the CONNECT
exchange, and C{TCP_NODELAY}.

Unit tests run on a L{MemoryReactorClock} with a resolver that knows a few
names and hand connections L{StringTransport}s; the end-to-end tests at
the bottom run a small CONNECT proxy and echo servers on loopback.
"""

from __future__ import annotations

import socket
from base64 import b64encode
from ipaddress import ip_address
from pathlib import Path

from attrs import evolve
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail, inlineCallbacks, succeed
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
)
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IHostnameResolver, ITCPTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from lpxy.proxy.config import ProxyConfig, TunnelEndpoint, WebProxy
from lpxy.proxy.endpoints import (
    CONNECT_TIMEOUT,
    MAX_ANSWER_HEAD,
    HTTPConnectEndpoint,
    NoDelayEndpoint,
    WebProxyError,
    authority,
    tunnel_client_endpoint,
)
from tests.support.apps import AppFactory, Client, ClientFactory
from tests.support.certs import TestPKI, make_test_pki
from tests.support.sockets import tcp_socket, unused_port
from tests.support.webproxy import ConnectProxyFactory

TOKEN = "access-token-that-must-never-show"
PASSWORD = "proxy-password-that-must-never-show"


@implementer(IHostnameResolver)
class _Resolver:
    """
    Resolves a few names to fixed addresses, and IP literals to
    themselves.
    """

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.asked: list[str] = []

    def resolveHostName(
        self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"
    ):
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        try:
            ip_address(hostName)
            found = [hostName]
        except ValueError:
            found = self.names.get(hostName, [])
        for text in found:
            kind = IPv6Address if ":" in text else IPv4Address
            receiver.addressResolved(kind("TCP", text, portNumber))
        receiver.resolutionComplete()


@implementer(ITCPTransport)
class _TCPStringTransport(StringTransport):
    """
    A L{StringTransport} that, like a TCP transport, takes C{TCP_NODELAY}.
    """

    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.no_delay


class _Immediate:
    """
    An endpoint that connects at once to C{transport}.
    """

    def __init__(self, transport: StringTransport) -> None:
        self.transport = transport
        self.factory = None
        self.protocol = None

    def connect(self, factory):
        self.factory = factory
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


def _config(**changes) -> ProxyConfig:
    config = ProxyConfig(
        mode="source",
        access_token=TOKEN,
        endpoint=TunnelEndpoint("tunnel.example.com", 443, True),
        source_ports={"": 5555},
    )
    return evolve(config, **changes)


class _MemoryCase(SynchronousTestCase):
    """
    A memory reactor resolving C{tunnel.example.com}, C{v6.example.com}
    and C{proxy.example.com}.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = _Resolver(
            {
                "tunnel.example.com": ["192.0.2.7"],
                "v6.example.com": ["2001:db8::7"],
                "proxy.example.com": ["198.51.100.3"],
            }
        )
        self.reactor.installNameResolver(self.resolver)
        self.client = ClientFactory(b"ping")

    def connect(self, endpoint) -> tuple[Deferred, tuple, _TCPStringTransport]:
        """
        Start connecting with C{endpoint}, complete the TCP connection it
        asked for and return the connect Deferred, the reactor's record of
        the attempt (host, port, ...) and the TCP transport.
        """
        d = endpoint.connect(self.client)
        [attempt] = self.reactor.tcpClients
        host, port, factory = attempt[:3]
        transport = _TCPStringTransport()
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return d, attempt, transport

    def tearDown(self) -> None:
        # Nothing may stay scheduled: no timer outlives its connection.
        self.assertEqual(self.reactor.getDelayedCalls(), [])


def _is_client_hello(data: bytes) -> bool:
    # A TLS handshake record whose first message is a ClientHello.
    return data[:1] == b"\x16" and data[5:6] == b"\x01"


class DirectTests(_MemoryCase):
    """
    Without a web proxy the endpoint connects to the service itself.
    """

    def test_plain(self) -> None:
        """
        C{ws://}: plain TCP to the host and port, the protocol connected at
        once and C{TCP_NODELAY} set.
        """
        endpoint = tunnel_client_endpoint(
            self.reactor, _config(endpoint=TunnelEndpoint("tunnel.example.com", 8080, False))
        )
        d, attempt, transport = self.connect(endpoint)
        self.assertEqual(attempt[:2], ("192.0.2.7", 8080))
        protocol = self.successResultOf(d)
        self.assertIsInstance(protocol, Client)
        self.assertEqual(transport.value(), b"ping")
        self.assertTrue(transport.no_delay)

    def test_tls(self) -> None:
        """
        C{wss://}: TLS to the host, with the host name as SNI, and
        C{TCP_NODELAY} on the TCP transport beneath the TLS layer.
        """
        endpoint = tunnel_client_endpoint(self.reactor, _config())
        d, attempt, transport = self.connect(endpoint)
        self.assertEqual(attempt[:2], ("192.0.2.7", 443))
        self.assertIsInstance(self.successResultOf(d), Client)
        hello = transport.value()
        self.assertTrue(_is_client_hello(hello))
        self.assertIn(b"tunnel.example.com", hello)
        self.assertNotIn(b"ping", hello)
        self.assertTrue(transport.no_delay)

    def test_ipv6_literal(self) -> None:
        """
        An IPv6 literal host is connected to as such.
        """
        endpoint = tunnel_client_endpoint(
            self.reactor, _config(endpoint=TunnelEndpoint("2001:db8::1", 443, True))
        )
        d, attempt, transport = self.connect(endpoint)
        self.assertEqual(attempt[:2], ("2001:db8::1", 443))
        self.successResultOf(d)
        self.assertTrue(_is_client_hello(transport.value()))
        self.assertTrue(transport.no_delay)

    def test_ipv6_name(self) -> None:
        """
        A name that resolves to an IPv6 address is reached over IPv6.
        """
        endpoint = tunnel_client_endpoint(
            self.reactor, _config(endpoint=TunnelEndpoint("v6.example.com", 443, True))
        )
        d, attempt, transport = self.connect(endpoint)
        self.assertEqual(attempt[:2], ("2001:db8::7", 443))
        self.assertIn(b"v6.example.com", transport.value())
        self.successResultOf(d)


class WebProxyTests(_MemoryCase):
    """
    With a web proxy the endpoint connects to the proxy and asks it for a
    tunnel with CONNECT.
    """

    def test_connect_request(self) -> None:
        """
        Without credentials: exactly the request line and C{Host}; nothing
        else goes until the proxy answers.
        """
        endpoint = tunnel_client_endpoint(
            self.reactor, _config(web_proxy=WebProxy("proxy.example.com", 3128))
        )
        d, attempt, transport = self.connect(endpoint)
        self.assertEqual(attempt[:2], ("198.51.100.3", 3128))
        self.assertEqual(
            transport.value(),
            b"CONNECT tunnel.example.com:443 HTTP/1.1\r\n"
            b"Host: tunnel.example.com:443\r\n"
            b"\r\n",
        )
        self.assertNoResult(d)
        self.assertTrue(transport.no_delay)
        transport.clear()
        transport.protocol.dataReceived(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.assertIsInstance(self.successResultOf(d), Client)
        hello = transport.value()
        self.assertTrue(_is_client_hello(hello))
        self.assertIn(b"tunnel.example.com", hello)

    def test_credentials(self) -> None:
        """
        With credentials: C{Proxy-Authorization: Basic} of C{user:password}
        in UTF-8.
        """
        endpoint = tunnel_client_endpoint(
            self.reactor,
            _config(
                web_proxy=WebProxy("proxy.example.com", 8080, False, "us\u00e9r", PASSWORD)
            ),
        )
        d, attempt, transport = self.connect(endpoint)
        self.assertEqual(attempt[:2], ("198.51.100.3", 8080))
        secret = b64encode(("us\u00e9r:" + PASSWORD).encode("utf-8"))
        self.assertEqual(
            transport.value(),
            b"CONNECT tunnel.example.com:443 HTTP/1.1\r\n"
            b"Host: tunnel.example.com:443\r\n"
            b"Proxy-Authorization: Basic " + secret + b"\r\n"
            b"\r\n",
        )
        transport.protocol.dataReceived(b"HTTP/1.0 200 OK\r\n\r\n")
        self.successResultOf(d)

    def test_ipv6_target(self) -> None:
        """
        An IPv6 service address is bracketed in the request.
        """
        endpoint = tunnel_client_endpoint(
            self.reactor,
            _config(
                endpoint=TunnelEndpoint("2001:db8::1", 443, True),
                web_proxy=WebProxy("proxy.example.com", 3128),
            ),
        )
        d, _, transport = self.connect(endpoint)
        self.assertEqual(
            transport.value(),
            b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\r\n",
        )
        transport.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.successResultOf(d)

    def test_ipv6_proxy(self) -> None:
        """
        A web proxy at an IPv6 address is reached over IPv6.
        """
        endpoint = tunnel_client_endpoint(
            self.reactor, _config(web_proxy=WebProxy("2001:db8::3128", 3128))
        )
        d, attempt, transport = self.connect(endpoint)
        self.assertEqual(attempt[:2], ("2001:db8::3128", 3128))
        transport.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.successResultOf(d)

    def test_plain_service(self) -> None:
        """
        To a C{ws://} service the tunnel carries the protocol's bytes
        as they are.
        """
        endpoint = tunnel_client_endpoint(
            self.reactor,
            _config(
                endpoint=TunnelEndpoint("tunnel.example.com", 80, False),
                web_proxy=WebProxy("proxy.example.com", 3128),
            ),
        )
        d, _, transport = self.connect(endpoint)
        transport.clear()
        transport.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertIsInstance(self.successResultOf(d), Client)
        self.assertEqual(transport.value(), b"ping")

    def test_https_proxy(self) -> None:
        """
        An C{https://} web proxy gets TLS first (SNI its own name); the
        CONNECT request is not sent in the clear.
        """
        endpoint = tunnel_client_endpoint(
            self.reactor, _config(web_proxy=WebProxy("proxy.example.com", 3129, True))
        )
        d, attempt, transport = self.connect(endpoint)
        self.assertEqual(attempt[:2], ("198.51.100.3", 3129))
        hello = transport.value()
        self.assertTrue(_is_client_hello(hello))
        self.assertIn(b"proxy.example.com", hello)
        self.assertNotIn(b"CONNECT", hello)
        self.assertTrue(transport.no_delay)
        self.assertNoResult(d)
        transport.protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, WebProxyError)

    def test_no_proxy_bypass(self) -> None:
        """
        A service host that C{NO_PROXY} names is reached directly.
        """
        with capturedLogs() as events:
            endpoint = tunnel_client_endpoint(
                self.reactor,
                _config(
                    web_proxy=WebProxy("proxy.example.com", 3128),
                    no_proxy=("localhost", ".example.com"),
                ),
            )
        d, attempt, transport = self.connect(endpoint)
        self.assertEqual(attempt[:2], ("192.0.2.7", 443))
        self.assertTrue(_is_client_hello(transport.value()))
        self.successResultOf(d)
        self.assertIn("NO_PROXY", events[0]["log_format"])

    def test_no_proxy_other(self) -> None:
        """
        C{NO_PROXY} entries for other hosts leave the proxy in use.
        """
        endpoint = tunnel_client_endpoint(
            self.reactor,
            _config(
                web_proxy=WebProxy("proxy.example.com", 3128),
                no_proxy=("localhost", "other.example.com"),
            ),
        )
        d, attempt, transport = self.connect(endpoint)
        self.assertEqual(attempt[:2], ("198.51.100.3", 3128))
        transport.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.successResultOf(d)

    def test_log_keeps_secrets(self) -> None:
        """
        What is logged about the route names neither the password nor the
        token.
        """
        with capturedLogs() as events:
            tunnel_client_endpoint(
                self.reactor,
                _config(web_proxy=WebProxy("proxy.example.com", 3128, False, "u", PASSWORD)),
            )
        self.assertTrue(events)
        for event in events:
            text = repr(event)
            self.assertNotIn(PASSWORD, text)
            self.assertNotIn(TOKEN, text)


class ConnectExchangeTests(SynchronousTestCase):
    """
    L{HTTPConnectEndpoint} over a fake proxy endpoint: the answers a proxy
    may give.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.proxy_transport = _TCPStringTransport()
        self.proxy = _Immediate(self.proxy_transport)
        self.endpoint = HTTPConnectEndpoint(
            self.clock,
            self.proxy,
            "tunnel.example.com",
            443,
            proxy_name="web proxy proxy.example.com:3128",
            username="user",
            password=PASSWORD,
        )

    def start(self) -> Deferred:
        d = self.endpoint.connect(ClientFactory(b"hello"))
        self.assertTrue(self.proxy_transport.value().startswith(b"CONNECT "))
        self.proxy_transport.clear()
        return d

    def answer(self, data: bytes) -> None:
        self.proxy.protocol.dataReceived(data)

    def lose(self) -> None:
        self.proxy.protocol.connectionLost(Failure(ConnectionDone()))

    def assertCleanFailure(self, d: Deferred, *fragments: str) -> WebProxyError:
        """
        The proxy connection was aborted; once it is lost C{d} fails with a
        L{WebProxyError} whose message holds C{fragments} and no secret.
        """
        self.assertTrue(self.proxy_transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertNoResult(d)
        self.lose()
        error = self.failureResultOf(d, WebProxyError).value
        message = str(error)
        self.assertIn("web proxy proxy.example.com:3128", message)
        self.assertIn("CONNECT tunnel.example.com:443", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        for secret in (PASSWORD, b64encode(b"user:" + PASSWORD.encode()).decode()):
            self.assertNotIn(secret, message)
            self.assertNotIn(secret, repr(error))
        return error

    def test_2xx(self) -> None:
        """
        Any 2xx opens the tunnel.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertIsInstance(self.successResultOf(d), Client)
        self.assertEqual(self.proxy_transport.value(), b"hello")

    def test_answer_in_pieces(self) -> None:
        """
        The answer may come a byte at a time, with headers, and bytes after
        it belong to the tunnel.
        """
        d = self.start()
        answer = b"HTTP/1.1 200 Connection established\r\nVia: 1.1 squid\r\n\r\nhello"
        for i in range(len(answer)):
            self.answer(answer[i : i + 1])
        protocol = self.successResultOf(d)
        self.assertEqual(self.successResultOf(protocol.answer), b"hello")

    def test_bare_newlines(self) -> None:
        """
        A proxy ending lines with a bare LF is understood.
        """
        d = self.start()
        self.answer(b"HTTP/1.0 200 OK\nServer: old\n\n")
        self.successResultOf(d)

    def test_data_and_close_pass_through(self) -> None:
        """
        Once open, data and the end of the connection reach the protocol.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 200 OK\r\n\r\n")
        protocol = self.successResultOf(d)
        self.answer(b"hel")
        self.assertNoResult(protocol.answer)
        self.answer(b"lo")
        self.assertEqual(self.successResultOf(protocol.answer), b"hello")
        self.lose()
        self.successResultOf(protocol.closed)

    def test_close_before_open_reaches_protocol(self) -> None:
        """
        A tunnel that closes before the protocol got its answer reports
        the loss to the protocol, not to the connect Deferred.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 200 OK\r\n\r\n")
        protocol = self.successResultOf(d)
        self.lose()
        self.failureResultOf(protocol.answer, ConnectionDone)

    def test_407(self) -> None:
        """
        407: credentials missing or refused, said so, nothing secret shown.
        """
        d = self.start()
        self.answer(
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b'Proxy-Authenticate: Basic realm="proxy"\r\n\r\n'
        )
        self.assertCleanFailure(d, "407 Proxy Authentication Required", "credentials")

    def test_500(self) -> None:
        """
        A server error names the status.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
        self.assertCleanFailure(d, "refused with 500 Internal Server Error")

    def test_status_without_reason(self) -> None:
        """
        A status line with no reason phrase is understood.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 403\r\n\r\n")
        self.assertCleanFailure(d, "refused with 403")

    def test_closed_before_answer(self) -> None:
        """
        The proxy closing before it answers fails the attempt.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 200 Conn")
        self.lose()
        error = self.failureResultOf(d, WebProxyError).value
        self.assertIn("closed before an answer: Connection was closed cleanly.", str(error))
        self.assertNotIn("..", str(error))
        self.assertIn("CONNECT tunnel.example.com:443", str(error))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_not_http(self) -> None:
        """
        Something that is not HTTP is refused, and what it said is shown
        only as printable text.
        """
        d = self.start()
        self.answer(b"SSH-2.0-OpenSSH_9.6\x1b[31m\r\n\r\n")
        error = self.assertCleanFailure(d, "not an HTTP answer")
        self.assertNotIn("\x1b", str(error))

    def test_head_too_long(self) -> None:
        """
        An answer head that never ends is cut off.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 200 OK\r\n")
        self.answer(b"X-Filler: " + b"x" * MAX_ANSWER_HEAD + b"\r\n")
        self.assertCleanFailure(d, "longer than")

    def test_data_after_failure_ignored(self) -> None:
        """
        Bytes arriving after a refusal (a body) are dropped.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 502 Bad Gateway\r\n\r\n<html>")
        self.answer(b"more body")
        self.assertCleanFailure(d, "502 Bad Gateway")

    def test_timeout(self) -> None:
        """
        No answer in time fails the attempt and aborts the connection.
        """
        d = self.start()
        self.clock.advance(CONNECT_TIMEOUT - 1)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertCleanFailure(d, "no answer within 30 seconds")

    def test_cancel(self) -> None:
        """
        Cancelling while the proxy has not answered aborts the connection
        and stops the timer.
        """
        d = self.start()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.proxy_transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.lose()

    def test_proxy_unreachable(self) -> None:
        """
        Failing to reach the proxy is a L{WebProxyError} that says so and
        why.
        """

        class Refusing:
            def connect(self, factory):
                return fail(ConnectionRefusedError("Connection refused"))

        endpoint = HTTPConnectEndpoint(
            self.clock,
            Refusing(),
            "tunnel.example.com",
            443,
            proxy_name="web proxy proxy.example.com:3128",
        )
        error = self.failureResultOf(endpoint.connect(ClientFactory()), WebProxyError)
        self.assertIn("web proxy proxy.example.com:3128", str(error.value))
        self.assertIn("cannot reach it: Connection was refused", str(error.value))

    def test_cancel_while_reaching_proxy(self) -> None:
        """
        Cancelling before the proxy is reached stays a cancellation.
        """

        class Pending:
            def connect(self, factory):
                return Deferred()

        endpoint = HTTPConnectEndpoint(
            self.clock, Pending(), "tunnel.example.com", 443, proxy_name="web proxy p:1"
        )
        d = endpoint.connect(ClientFactory())
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_repr_keeps_secrets(self) -> None:
        """
        The endpoint's repr says where it goes, not with what password.
        """
        text = repr(self.endpoint)
        self.assertIn("tunnel.example.com:443", text)
        self.assertNotIn(PASSWORD, text)

    def test_factory_start_stop(self) -> None:
        """
        The connecting factory's start and stop reach the protocol's
        factory.
        """
        events: list[str] = []

        class Recording(ClientFactory):
            def startFactory(self) -> None:
                events.append("start")

            def stopFactory(self) -> None:
                events.append("stop")

        d = self.endpoint.connect(Recording())
        self.proxy.factory.doStart()
        self.proxy.factory.doStop()
        self.assertEqual(events, ["start", "stop"])
        self.lose()
        self.failureResultOf(d, WebProxyError)


class NoDelayEndpointTests(SynchronousTestCase):
    """
    L{NoDelayEndpoint} on its own.
    """

    def test_non_tcp_transport(self) -> None:
        """
        A transport without C{TCP_NODELAY} is left alone, with a warning.
        """

        with capturedLogs() as events:
            d = NoDelayEndpoint(_Immediate(StringTransport())).connect(ClientFactory())
        self.assertIsInstance(self.successResultOf(d), Client)
        [event] = events
        self.assertIn("TCP_NODELAY", event["log_format"])

    def test_failure_passes(self) -> None:
        """
        A failed connection attempt fails as it did.
        """

        class Refusing:
            def connect(self, factory):
                return fail(ConnectionRefusedError())

        d = NoDelayEndpoint(Refusing()).connect(ClientFactory())
        self.failureResultOf(d, ConnectionRefusedError)


class AuthorityTests(SynchronousTestCase):
    """
    L{authority}: C{host:port} for HTTP.
    """

    def test_authority(self) -> None:
        self.assertEqual(authority("h.example", 3), "h.example:3")
        self.assertEqual(authority("::1", 3), "[::1]:3")


# End to end, on loopback.


class EndToEndTests(TestCase):
    """
    Through a real (fake) CONNECT proxy to real echo servers on loopback.
    """

    @inlineCallbacks
    def setUp(self):
        directory = Path(self.mktemp())
        directory.mkdir()
        self.pki: TestPKI = make_test_pki(directory)
        self.plain_echo = AppFactory()
        self.tls_echo = AppFactory()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            self.plain_echo
        )
        self.addCleanup(port.stopListening)
        self.plain_port = port.getHost().port
        port = yield SSL4ServerEndpoint(
            reactor, 0, self.pki.server_context_factory(), interface="127.0.0.1"
        ).listen(self.tls_echo)
        self.addCleanup(port.stopListening)
        self.tls_port = port.getHost().port

    @inlineCallbacks
    def listen_proxy(self, authorization=None, tls=False):
        proxy = ConnectProxyFactory(authorization)
        port = yield Deferred.fromCoroutine(proxy.listen(self, self.pki if tls else None))
        return proxy, port

    @inlineCallbacks
    def ping(self, config: ProxyConfig, *servers):
        """
        Connect as C{config} says, send a message and return the protocol
        once it has its answer (or raise); then wait until every
        connection, at C{servers} too, has closed.
        """
        client = ClientFactory(b"through the proxy")
        protocol = yield tunnel_client_endpoint(reactor, config).connect(client)
        try:
            answer = yield protocol.answer
            self.assertEqual(answer, b"through the proxy")
            no_delay = tcp_socket(protocol.transport).getsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY
            )
        finally:
            yield protocol.closed
            for server in servers:
                yield server.all_closed()
        return no_delay

    def config(self, tls: bool, web_proxy: WebProxy | None) -> ProxyConfig:
        port = self.tls_port if tls else self.plain_port
        return _config(
            endpoint=TunnelEndpoint("127.0.0.1", port, tls),
            capath=str(self.pki.ca_dir),
            web_proxy=web_proxy,
        )

    @inlineCallbacks
    def test_http_proxy_plain_service(self):
        """
        CONNECT through an HTTP proxy to a plain service.
        """
        proxy, proxy_port = yield self.listen_proxy()
        no_delay = yield self.ping(
            self.config(False, WebProxy("127.0.0.1", proxy_port)), proxy, self.plain_echo
        )
        self.assertTrue(no_delay)
        self.assertEqual(
            [request.head for request in proxy.requests],
            [f"CONNECT 127.0.0.1:{self.plain_port} HTTP/1.1\r\n"
             f"Host: 127.0.0.1:{self.plain_port}".encode()],
        )

    @inlineCallbacks
    def test_http_proxy_tls_service(self):
        """
        The service's TLS runs inside the tunnel, verified against
        C{--capath}, with C{TCP_NODELAY} on the socket beneath.
        """
        proxy, proxy_port = yield self.listen_proxy()
        no_delay = yield self.ping(
            self.config(True, WebProxy("127.0.0.1", proxy_port)), proxy, self.tls_echo
        )
        self.assertTrue(no_delay)
        [server] = self.tls_echo.accepted
        self.assertIsNone(server.server_name)  # an IP literal: no SNI

    @inlineCallbacks
    def test_https_proxy_tls_service(self):
        """
        TLS to the proxy, then TLS to the service inside it.
        """
        proxy, proxy_port = yield self.listen_proxy(tls=True)
        no_delay = yield self.ping(
            self.config(True, WebProxy("127.0.0.1", proxy_port, True)), proxy, self.tls_echo
        )
        self.assertTrue(no_delay)
        self.assertEqual(len(proxy.requests), 1)

    @inlineCallbacks
    def test_credentials(self):
        """
        A proxy that demands credentials accepts the right ones.
        """
        proxy, proxy_port = yield self.listen_proxy(
            authorization="Basic " + b64encode(b"user:" + PASSWORD.encode()).decode()
        )
        yield self.ping(
            self.config(True, WebProxy("127.0.0.1", proxy_port, False, "user", PASSWORD)),
            proxy,
            self.tls_echo,
        )

    @inlineCallbacks
    def test_credentials_refused(self):
        """
        Wrong credentials: the connect fails with the proxy's 407.
        """
        proxy, proxy_port = yield self.listen_proxy(authorization="Basic c29tZTpvdGhlcg==")
        endpoint = tunnel_client_endpoint(
            reactor,
            self.config(True, WebProxy("127.0.0.1", proxy_port, False, "user", PASSWORD)),
        )
        with self.assertRaises(WebProxyError) as caught:
            yield endpoint.connect(ClientFactory())
        self.assertIn("407", str(caught.exception))
        self.assertNotIn(PASSWORD, str(caught.exception))
        yield proxy.all_closed()

    @inlineCallbacks
    def test_proxy_down(self):
        """
        Nothing listening at the proxy's address: the attempt fails,
        naming the proxy.
        """
        proxy_port = unused_port()
        endpoint = tunnel_client_endpoint(
            reactor, self.config(True, WebProxy("127.0.0.1", proxy_port))
        )
        with self.assertRaises(WebProxyError) as caught:
            yield endpoint.connect(ClientFactory())
        self.assertIn(f"web proxy 127.0.0.1:{proxy_port}", str(caught.exception))
        self.assertIn("cannot reach it", str(caught.exception))

    @inlineCallbacks
    def test_untrusted_https_proxy(self):
        """
        An C{https://} proxy is verified like the service: without the CA
        the attempt fails, before any CONNECT is sent.
        """
        proxy, proxy_port = yield self.listen_proxy(tls=True)
        config = evolve(
            self.config(True, WebProxy("127.0.0.1", proxy_port, True)), capath=None
        )
        with self.assertRaises(WebProxyError) as caught:
            yield tunnel_client_endpoint(reactor, config).connect(ClientFactory())
        self.assertIn("certificate verify failed", str(caught.exception))
        self.assertEqual(proxy.requests, [])
        yield proxy.all_closed()

    @inlineCallbacks
    def test_ipv6_direct_tls(self):
        """
        Directly to an IPv6 literal over TLS, the certificate's IPv6
        address checked.
        """
        if not _ipv6_loopback():
            raise SkipTest("no IPv6 loopback on this machine")
        directory = Path(self.mktemp())
        directory.mkdir()
        pki = make_test_pki(directory, ("::1",))
        echo = AppFactory()
        port = yield SSL4ServerEndpoint(
            reactor, 0, pki.server_context_factory(), interface="::1"
        ).listen(echo)
        self.addCleanup(port.stopListening)
        config = _config(
            endpoint=TunnelEndpoint("::1", port.getHost().port, True),
            capath=str(pki.ca_cert_path),
        )
        no_delay = yield self.ping(config, echo)
        self.assertTrue(no_delay)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True
