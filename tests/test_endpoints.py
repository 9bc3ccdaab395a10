"""
Tests for L{lpxy.proxy.endpoints.tunnel_client_endpoint}: which way the
local proxy goes to the service (directly, through an HTTP or HTTPS web
proxy, around it for C{NO_PROXY}), and C{TCP_NODELAY} on the way
(L{lpxy.proxy.endpoints.NoDelayEndpoint}), and TLS that sends each write
at once (L{lpxy.proxy.endpoints.TLSEndpoint}).

The tests run on a L{MemoryReactorClock} with a resolver that knows a few
names and hand connections L{StringTransport}s.
"""

from __future__ import annotations

from base64 import b64encode
from pathlib import Path

from attrs import evolve
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from lpxy.proxy.config import ProxyConfig, TunnelEndpoint, WebProxy
from lpxy.proxy.endpoints import (
    NoDelayEndpoint,
    TLSEndpoint,
    WebProxyError,
    tunnel_client_endpoint,
)
from tests.support.apps import Client, ClientFactory
from tests.support.certs import make_test_pki
from tests.support.memorynet import ImmediateEndpoint, Resolver, TCPStringTransport

TOKEN = "access-token-that-must-never-show"
PASSWORD = "proxy-password-that-must-never-show"


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
        self.resolver = Resolver(
            {
                "tunnel.example.com": ["192.0.2.7"],
                "v6.example.com": ["2001:db8::7"],
                "proxy.example.com": ["198.51.100.3"],
            }
        )
        self.reactor.installNameResolver(self.resolver)
        self.client = ClientFactory(b"ping")

    def connect(self, endpoint) -> tuple[Deferred, tuple, TCPStringTransport]:
        """
        Start connecting with C{endpoint}, complete the TCP connection it
        asked for and return the connect Deferred, the reactor's record of
        the attempt (host, port, ...) and the TCP transport.
        """
        d = endpoint.connect(self.client)
        [attempt] = self.reactor.tcpClients
        host, port, factory = attempt[:3]
        transport = TCPStringTransport()
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


class NoDelayEndpointTests(SynchronousTestCase):
    """
    L{NoDelayEndpoint} on its own.
    """

    def test_non_tcp_transport(self) -> None:
        """
        A transport without C{TCP_NODELAY} is left alone, with a warning.
        """

        with capturedLogs() as events:
            d = NoDelayEndpoint(ImmediateEndpoint(StringTransport())).connect(ClientFactory())
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


class TLSEndpointTests(SynchronousTestCase):
    """
    L{TLSEndpoint} on its own, against a TLS server in memory.
    """

    def test_write_encrypted_at_once(self) -> None:
        """
        Once the handshake is done, a write of the protocol above reaches
        the connection below as a TLS record within the call, with no
        reactor turn between.
        """
        directory = FilePath(self.mktemp())
        directory.makedirs()
        pki = make_test_pki(Path(directory.path))
        below = StringTransport()
        options = optionsForClientTLS("localhost", pki.ca_certificate())
        d = TLSEndpoint(options, ImmediateEndpoint(below)).connect(
            Factory.forProtocol(Protocol)
        )
        client = self.successResultOf(d)
        server_side = StringTransport()
        received: list[bytes] = []

        class Server(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        server = TLSMemoryBIOFactory(
            pki.server_context_factory(), False, Factory.forProtocol(Server)
        ).buildProtocol(None)
        server.makeConnection(server_side)

        def pump() -> None:
            while below.value() or server_side.value():
                to_server, to_client = below.value(), server_side.value()
                below.clear()
                server_side.clear()
                if to_server:
                    server.dataReceived(to_server)
                if to_client:
                    client.transport.dataReceived(to_client)

        pump()
        client.transport.write(b"hello")
        self.assertTrue(below.value().startswith(b"\x17"), "an application data record")
        pump()
        self.assertEqual(b"".join(received), b"hello")
