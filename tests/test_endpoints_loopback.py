"""
L{lpxy.proxy.endpoints.tunnel_client_endpoint} end to end on loopback:
through the test web proxy (L{tests.support.webproxy}), plain and under
TLS, to echo servers, plain and under TLS, and directly to an IPv6 literal.
"""

from __future__ import annotations

import socket
from base64 import b64encode
from pathlib import Path

from attrs import evolve
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.trial.unittest import SkipTest, TestCase

from lpxy.proxy.config import ProxyConfig, TunnelEndpoint, WebProxy
from lpxy.proxy.endpoints import WebProxyError, tunnel_client_endpoint
from tests.support.apps import AppFactory, ClientFactory
from tests.support.certs import TestPKI, make_test_pki
from tests.support.sockets import tcp_socket, unused_port
from tests.support.webproxy import ConnectProxyFactory

PASSWORD = "proxy-password-that-must-never-show"


def _config(**changes) -> ProxyConfig:
    config = ProxyConfig(
        mode="source",
        access_token="access-token",
        endpoint=TunnelEndpoint("tunnel.example.com", 443, True),
        source_ports={"": 5555},
    )
    return evolve(config, **changes)


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
