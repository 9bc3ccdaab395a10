"""
Tests for L{lpxy.proxy.tls}: a real TLS server on loopback, presenting a
certificate of a test CA the system does not trust.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import (
    HostnameEndpoint,
    SSL4ServerEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import VerificationError
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import TestCase

from lpxy.proxy.config import ProxyConfig, TunnelEndpoint
from lpxy.proxy.endpoints import tunnel_client_endpoint
from lpxy.proxy.tls import CAPathError, client_tls_options
from tests.support.apps import AppFactory, ClientFactory
from tests.support.certs import TestPKI, make_test_pki


class _Loopback:
    """
    One TLS echo server on 127.0.0.1 and the means to reach it.
    """

    def __init__(self, test: TestCase, pki: TestPKI) -> None:
        self.test = test
        self.pki = pki
        self.server = AppFactory()

    @inlineCallbacks
    def start(self):
        endpoint = SSL4ServerEndpoint(
            reactor, 0, self.pki.server_context_factory(), interface="127.0.0.1"
        )
        self.port = yield endpoint.listen(self.server)
        self.test.addCleanup(self.port.stopListening)

    @inlineCallbacks
    def ping(self, creator: IOpenSSLClientConnectionCreator):
        """
        Connect with C{creator}, send a message; return what came back, or
        raise what ended the connection.  Either way wait until both ends
        have closed.
        """
        client = ClientFactory()
        endpoint = wrapClientTLS(
            creator, HostnameEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        )
        protocol = yield endpoint.connect(client)
        try:
            answer = yield protocol.answer
        finally:
            yield protocol.closed
            yield self.server.all_closed()
        return answer


def _pki(test: TestCase, hostnames: tuple[str, ...] = ("localhost", "127.0.0.1")) -> TestPKI:
    directory = Path(test.mktemp())
    directory.mkdir()
    return make_test_pki(directory, hostnames)


class VerifiedTests(TestCase):
    """
    With verification on, the server must chain to the system trust or to
    C{--capath}, and name the host.
    """

    @inlineCallbacks
    def setUp(self):
        self.pki = _pki(self)
        self.loopback = _Loopback(self, self.pki)
        yield self.loopback.start()

    @inlineCallbacks
    def test_untrusted_refused(self):
        """
        A CA found neither in the system store nor at C{--capath} is refused.
        """
        with self.assertRaises(SSL.Error) as caught:
            yield self.loopback.ping(client_tls_options("localhost", None, True))
        self.assertIn("certificate verify failed", str(caught.exception))

    @inlineCallbacks
    def test_capath_hashed_directory(self):
        """
        A hashed CA directory as C{--capath} is trusted.
        """
        answer = yield self.loopback.ping(
            client_tls_options("localhost", str(self.pki.ca_dir), True)
        )
        self.assertEqual(answer, b"ping")

    @inlineCallbacks
    def test_capath_bundle_file(self):
        """
        A PEM bundle file as C{--capath} is trusted.
        """
        answer = yield self.loopback.ping(
            client_tls_options("localhost", str(self.pki.ca_cert_path), True)
        )
        self.assertEqual(answer, b"ping")

    @inlineCallbacks
    def test_other_ca_refused(self):
        """
        A C{--capath} holding some other CA does not make the server trusted.
        """
        other = _pki(self)
        with self.assertRaises(SSL.Error):
            yield self.loopback.ping(
                client_tls_options("localhost", str(other.ca_dir), True)
            )

    @inlineCallbacks
    def test_sni(self):
        """
        The host name goes to the server as SNI.
        """
        yield self.loopback.ping(
            client_tls_options("localhost", str(self.pki.ca_dir), True)
        )
        [server] = self.loopback.server.accepted
        self.assertEqual(server.server_name, b"localhost")

    @inlineCallbacks
    def test_name_mismatch_refused(self):
        """
        A trusted certificate for other names is refused.
        """
        with self.assertRaises(VerificationError):
            yield self.loopback.ping(
                client_tls_options("tunnel.example.com", str(self.pki.ca_dir), True)
            )

    @inlineCallbacks
    def test_ip_literal_matches_ip_san(self):
        """
        An IP literal host is checked against the certificate's IP
        addresses (and, as RFC 6066 asks, sent no SNI).
        """
        answer = yield self.loopback.ping(
            client_tls_options("127.0.0.1", str(self.pki.ca_dir), True)
        )
        self.assertEqual(answer, b"ping")
        [server] = self.loopback.server.accepted
        self.assertIsNone(server.server_name)


class PlatformTrustTests(TestCase):
    """
    The system trust store stays trusted when C{--capath} is given.  The
    test makes the test CA "the system's" through C{SSL_CERT_FILE}, which
    OpenSSL's default verify paths honour.
    """

    @inlineCallbacks
    def setUp(self):
        self.pki = _pki(self)
        self.loopback = _Loopback(self, self.pki)
        yield self.loopback.start()
        self._set_env("SSL_CERT_FILE", str(self.pki.ca_cert_path))
        self._set_env("SSL_CERT_DIR", self.mktemp())

    def _set_env(self, name: str, value: str) -> None:
        old = os.environ.get(name)
        os.environ[name] = value
        if old is None:
            self.addCleanup(os.environ.pop, name)
        else:
            self.addCleanup(os.environ.__setitem__, name, old)

    @inlineCallbacks
    def test_system_store(self):
        """
        Without C{--capath} the system store is used.
        """
        answer = yield self.loopback.ping(client_tls_options("localhost", None, True))
        self.assertEqual(answer, b"ping")

    @inlineCallbacks
    def test_system_store_and_capath(self):
        """
        With a C{--capath} of some other CA, the system store still counts.
        """
        other = _pki(self)
        answer = yield self.loopback.ping(
            client_tls_options("localhost", str(other.ca_dir), True)
        )
        self.assertEqual(answer, b"ping")


class IPAddressTests(TestCase):
    """
    An IP literal must be in the certificate as an IP address.
    """

    @inlineCallbacks
    def test_dns_san_only_refused(self):
        """
        A certificate naming only C{localhost} does not do for C{127.0.0.1},
        even though that is where the connection went.
        """
        pki = _pki(self, ("localhost",))
        loopback = _Loopback(self, pki)
        yield loopback.start()
        with self.assertRaises(VerificationError):
            yield loopback.ping(client_tls_options("127.0.0.1", str(pki.ca_dir), True))


class NoVerifyTests(TestCase):
    """
    C{-k}: nothing is checked, and the user is told so.
    """

    @inlineCallbacks
    def setUp(self):
        self.loopback = _Loopback(self, _pki(self))
        yield self.loopback.start()

    @inlineCallbacks
    def test_untrusted_accepted_with_warning(self):
        """
        An untrusted server under another name is accepted, SNI is still
        sent, and a warning naming the host is logged.
        """
        with capturedLogs() as events:
            creator = client_tls_options("tunnel.example.com", None, False)
        answer = yield self.loopback.ping(creator)
        self.assertEqual(answer, b"ping")
        [server] = self.loopback.server.accepted
        self.assertEqual(server.server_name, b"tunnel.example.com")
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["host"], "tunnel.example.com")
        self.assertIn("DISABLED", event["log_format"])

    @inlineCallbacks
    def test_ip_literal_no_sni(self):
        """
        An IP literal is not sent as SNI.
        """
        answer = yield self.loopback.ping(client_tls_options("127.0.0.1", None, False))
        self.assertEqual(answer, b"ping")
        [server] = self.loopback.server.accepted
        self.assertIsNone(server.server_name)

    @inlineCallbacks
    def test_capath_ignored(self):
        """
        Under C{-k} a missing C{--capath} does not matter: nothing is
        verified against it, and the untrusted server is reached (while
        with verification the same path is refused).
        """
        missing = self.mktemp()
        self.assertRaises(CAPathError, client_tls_options, "localhost", missing, True)
        with capturedLogs() as events:
            creator = client_tls_options("localhost", missing, False)
        answer = yield self.loopback.ping(creator)
        self.assertEqual(answer, b"ping")
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn])


class TunnelEndpointTests(TestCase):
    """
    The service endpoint as the proxy builds it (L{tunnel_client_endpoint},
    direct C{wss://}) against the loopback server.
    """

    @inlineCallbacks
    def setUp(self):
        self.pki = _pki(self)
        self.loopback = _Loopback(self, self.pki)
        yield self.loopback.start()

    def config(self, capath: str | None, verify: bool = True) -> ProxyConfig:
        return ProxyConfig(
            mode="destination",
            access_token="not-a-real-token",
            endpoint=TunnelEndpoint("localhost", self.loopback.port.getHost().port),
            capath=capath,
            verify_ssl=verify,
        )

    @inlineCallbacks
    def ping(self, config: ProxyConfig):
        """
        Connect, have a message echoed, return the TCP socket's
        C{TCP_NODELAY}; raise what ended the connection instead.
        """
        # "localhost" may resolve to ::1 first, where nothing listens; the
        # endpoint then goes on to 127.0.0.1.
        protocol = yield tunnel_client_endpoint(reactor, config).connect(ClientFactory())
        try:
            yield protocol.answer
            tls_transport = protocol.transport
            sock = tls_transport.transport.getHandle()
            no_delay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            yield protocol.closed
            yield self.loopback.server.all_closed()
        return no_delay

    @inlineCallbacks
    def test_refused_without_trust(self):
        """
        Without C{--capath} the test CA is not trusted.
        """
        with self.assertRaises(SSL.Error):
            yield self.ping(self.config(None))

    @inlineCallbacks
    def test_tcp_nodelay_under_tls(self):
        """
        Accepted with C{--capath}; the socket beneath the TLS layer has
        C{TCP_NODELAY} set.
        """
        no_delay = yield self.ping(self.config(str(self.pki.ca_dir)))
        self.assertTrue(no_delay)

    @inlineCallbacks
    def test_no_verify(self):
        """
        C{-k} connects to the untrusted server, saying so in the log.
        """
        with capturedLogs() as events:
            config = self.config(None, verify=False)
            endpoint = tunnel_client_endpoint(reactor, config)
        self.assertIn("DISABLED", events[-1]["log_format"])
        protocol = yield endpoint.connect(ClientFactory())
        answer = yield protocol.answer
        yield protocol.closed
        yield self.loopback.server.all_closed()
        self.assertEqual(answer, b"ping")


class CAPathTests(TestCase):
    """
    A C{--capath} that cannot work is reported when the options are made.
    """

    def test_missing(self):
        """
        A path that does not exist is an error naming the option and path.
        """
        path = self.mktemp()
        error = self.assertRaises(CAPathError, client_tls_options, "h", path, True)
        self.assertIn("--capath " + path, str(error))

    def test_not_pem(self):
        """
        A file with no PEM certificate in it is an error.
        """
        path = Path(self.mktemp())
        path.write_text("this is not a certificate\n")
        error = self.assertRaises(CAPathError, client_tls_options, "h", str(path), True)
        self.assertIn("not a PEM file", str(error))

    def test_unhashed_directory_warns(self):
        """
        A directory with no hash-named file in it (PEM files not yet
        rehashed) gives a warning saying what to do.
        """
        pki = _pki(self)
        plain = Path(self.mktemp())
        plain.mkdir()
        (plain / "ca.pem").write_bytes(pki.ca_cert_path.read_bytes())
        with capturedLogs() as events:
            client_tls_options("localhost", str(plain), True)
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertIn("openssl rehash", event["log_format"])

    def test_hashed_directory_silent(self):
        """
        A proper hashed directory gives no warning.
        """
        pki = _pki(self)
        with capturedLogs() as events:
            client_tls_options("localhost", str(pki.ca_dir), True)
        self.assertEqual(list(events), [])

