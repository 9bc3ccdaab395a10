"""
A throw-away public key infrastructure for TLS tests.

L{make_test_pki} writes a fresh certificate authority and a server
certificate it signed into a directory, in the forms the local proxy's
C{--capath} accepts (a PEM bundle file and a hashed CA directory, as
C{c_rehash} makes), and gives the server side to C{twisted.internet.ssl}.
Nothing here is trusted by the system, so a client that does not load the
test CA refuses the server.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from pathlib import Path

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL.crypto import X509
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate

_VALIDITY = datetime.timedelta(days=30)
_CLOCK_SKEW = datetime.timedelta(days=1)


@frozen
class TestPKI:
    """
    Files of a test certificate authority and of one server certificate.

    @ivar ca_cert_path: the CA certificate, PEM (usable as a bundle file).
    @ivar ca_dir: a directory holding only the CA certificate, named
        C{<subject hash>.0} as OpenSSL looks it up.
    @ivar server_key_path: the server's private key, PEM.
    @ivar server_cert_path: the server's certificate, PEM.
    @ivar hostnames: the names and addresses the server certificate is for.
    """

    ca_cert_path: Path
    ca_dir: Path
    server_key_path: Path
    server_cert_path: Path
    hostnames: tuple[str, ...]

    def server_context_factory(self) -> CertificateOptions:
        """
        TLS options for a server presenting the server certificate, for
        C{SSL4ServerEndpoint}, C{listenSSL} or C{TLSMemoryBIOFactory}.
        """
        pem = self.server_key_path.read_bytes() + self.server_cert_path.read_bytes()
        options: CertificateOptions = PrivateCertificate.loadPEM(pem).options()
        return options

    def server_endpoint_string(self, port: int = 0, interface: str = "127.0.0.1") -> str:
        """
        A C{serverFromString} description of a TLS server presenting the
        server certificate on C{interface}, port C{port}.
        """
        return ":".join(
            [
                "ssl",
                str(port),
                "privateKey=" + quoteStringArgument(str(self.server_key_path)),
                "certKey=" + quoteStringArgument(str(self.server_cert_path)),
                "interface=" + quoteStringArgument(interface),
            ]
        )

    def ca_certificate(self) -> Certificate:
        """
        The CA as a Twisted certificate, e.g. for
        C{optionsForClientTLS(host, trustRoot=pki.ca_certificate())}.
        """
        return Certificate.loadPEM(self.ca_cert_path.read_bytes())


def subject_hash(pem: bytes) -> str:
    """
    The OpenSSL subject name hash of a PEM certificate, as C{c_rehash}
    names files (eight lower-case hex digits).
    """
    cert = x509.load_pem_x509_certificate(pem)
    return f"{X509.from_cryptography(cert).subject_name_hash():08x}"


def make_test_pki(
    directory: Path, hostnames: Iterable[str] = ("localhost", "127.0.0.1")
) -> TestPKI:
    """
    Create a CA and a server certificate for C{hostnames} (DNS names or IP
    literals, each put in the matching subjectAltName form) under
    C{directory}, which must exist.
    """
    names = tuple(hostnames)
    if not names:
        raise ValueError("make_test_pki needs at least one host name")
    now = datetime.datetime.now(datetime.timezone.utc)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lpxy tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"lpxy test CA {directory.name}"),
        ]
    )
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]),
            ca_name,
            server_key.public_key(),
            now,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ca_cert_path = directory / "ca.pem"
    ca_cert_path.write_bytes(ca_pem)
    ca_dir = directory / "ca-hashed"
    ca_dir.mkdir()
    (ca_dir / f"{subject_hash(ca_pem)}.0").write_bytes(ca_pem)
    server_key_path = directory / "server.key"
    server_key_path.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_cert_path = directory / "server.pem"
    server_cert_path.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return TestPKI(
        ca_cert_path=ca_cert_path,
        ca_dir=ca_dir,
        server_key_path=server_key_path,
        server_cert_path=server_cert_path,
        hostnames=names,
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _VALIDITY)
    )


def _usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
