"""
Tests for L{tests.support.certs}, the test PKI other TLS tests build on.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography import x509
from OpenSSL.crypto import X509, X509Store, X509StoreContext, X509StoreContextError
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import (
    HostnameEndpoint,
    SSL4ServerEndpoint,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.trial.unittest import TestCase

from tests.support.apps import AppFactory, ClientFactory
from tests.support.certs import TestPKI, make_test_pki, subject_hash


def _verify(store: X509Store, cert_path: Path) -> None:
    cert = X509.from_cryptography(x509.load_pem_x509_certificate(cert_path.read_bytes()))
    X509StoreContext(store, cert).verify_certificate()


class PKIFilesTests(TestCase):
    """
    The files L{make_test_pki} writes.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        self.pki = make_test_pki(self.directory, ("localhost", "127.0.0.1", "::1"))

    def test_hashed_directory(self) -> None:
        """
        C{ca_dir} holds the CA under its subject hash, so OpenSSL finds it
        there by lookup and verifies the server certificate.
        """
        [entry] = list(self.pki.ca_dir.iterdir())
        self.assertEqual(entry.name, subject_hash(self.pki.ca_cert_path.read_bytes()) + ".0")
        store = X509Store()
        store.load_locations(None, self.pki.ca_dir)
        _verify(store, self.pki.server_cert_path)

    def test_bundle(self) -> None:
        """
        C{ca_cert_path} verifies the server certificate as a CA file.
        """
        store = X509Store()
        store.load_locations(self.pki.ca_cert_path)
        _verify(store, self.pki.server_cert_path)

    def test_untrusted(self) -> None:
        """
        Another PKI's CA does not verify this server certificate.
        """
        other_directory = Path(self.mktemp())
        other_directory.mkdir()
        other = make_test_pki(other_directory)
        store = X509Store()
        store.load_locations(other.ca_cert_path)
        self.assertRaises(
            X509StoreContextError, _verify, store, self.pki.server_cert_path
        )

    def test_subject_alternative_names(self) -> None:
        """
        Host names become DNS names and IP literals IP addresses.
        """
        cert = x509.load_pem_x509_certificate(self.pki.server_cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        self.assertEqual(self.pki.hostnames, ("localhost", "127.0.0.1", "::1"))

    def test_no_hostnames(self) -> None:
        """
        A certificate for nothing is refused.
        """
        self.assertRaises(ValueError, make_test_pki, Path(self.mktemp()), ())

    def test_endpoint_string_quotes_paths(self) -> None:
        """
        Colons in the paths are escaped for C{serverFromString}.
        """
        directory = Path(self.mktemp() + "a:b")
        directory.mkdir()
        pki = make_test_pki(directory)
        description = pki.server_endpoint_string(1234, "::1")
        self.assertIn("a\\:b", description)
        self.assertTrue(description.startswith("ssl:1234:"))
        self.assertTrue(description.endswith(":interface=\\:\\:1"))


class LoopbackServerTests(TestCase):
    """
    The server helpers give a working TLS server on loopback.
    """

    @inlineCallbacks
    def _round_trip(self, server: IStreamServerEndpoint, pki: TestPKI):
        factory = AppFactory()
        port = yield server.listen(factory)
        self.addCleanup(port.stopListening)
        client = wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=pki.ca_certificate()),
            HostnameEndpoint(reactor, "127.0.0.1", port.getHost().port),
        )
        protocol = yield client.connect(ClientFactory(b"hello over tls"))
        answer = yield protocol.answer
        self.assertEqual(answer, b"hello over tls")
        yield protocol.closed
        yield factory.all_closed()
        [server] = factory.accepted
        self.assertEqual(server.server_name, b"localhost")

    def _pki(self) -> TestPKI:
        directory = Path(self.mktemp())
        directory.mkdir()
        return make_test_pki(directory)

    def test_endpoint_string(self):
        """
        C{server_endpoint_string} listens with the server certificate.
        """
        pki = self._pki()
        return self._round_trip(
            serverFromString(reactor, pki.server_endpoint_string()), pki
        )

    def test_context_factory(self):
        """
        C{server_context_factory} serves the server certificate.
        """
        pki = self._pki()
        return self._round_trip(
            SSL4ServerEndpoint(
                reactor, 0, pki.server_context_factory(), interface="127.0.0.1"
            ),
            pki,
        )
