# -*- test-case-name: tests.test_tls -*-
"""
TLS client options for the connection to the tunneling service (and to an
C{https://} web proxy).

Verification is Twisted's own (L{optionsForClientTLS}: peer certificate
required, host name or IP address checked with service_identity, SNI for
DNS names); lpxy only widens the trust to the system store plus the
C{-c/--capath} location, and builds the deliberately blind options of
C{-k/--no-ssl-host-verify}.
"""

from __future__ import annotations

import os
import re
from ipaddress import ip_address
from typing import cast

from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.exceptions import CertificateError
from twisted.internet._sslverify import IOpenSSLTrustRoot  # the trustRoot type
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

_log = Logger()

MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2

# c_rehash / openssl rehash names: 8 hex digits, ".", a number (".r0" for CRLs).
_HASHED_NAME = re.compile(r"^[0-9a-f]{8}\.r?[0-9]+$")


class CAPathError(ValueError):
    """
    The C{--capath} location is neither a directory nor a file of PEM CA
    certificates.
    """


@implementer(IOpenSSLTrustRoot)
class PlatformTrustWith:
    """
    Trust the platform's certificate authorities and also those at one
    extra location: a PEM bundle file, or a directory of certificates
    named by subject hash (C{c_rehash} output), which OpenSSL searches when
    it verifies.

    Twisted's L{IOpenSSLTrustRoot} offers either the platform or a fixed
    set of certificates; OpenSSL itself can hold both, so this adds the
    extra location to the context after L{platformTrust} has done its part.
    """

    def __init__(self, capath: str) -> None:
        self._cafile: str | None = None
        self._capath: str | None = None
        if os.path.isdir(capath):
            self._capath = capath
        elif os.path.isfile(capath):
            self._cafile = capath
        else:
            raise CAPathError(
                f"--capath {capath}: no such directory or file "
                "(expected a hashed CA directory or a PEM bundle)"
            )
        self._platform = platformTrust()
        # Load once now so that a bad bundle is reported at start-up, not as
        # a failure of every connection attempt.
        try:
            self._load(SSL.Context(SSL.TLS_CLIENT_METHOD))
        except SSL.Error as e:
            raise CAPathError(
                f"--capath {capath}: not a PEM file of CA certificates ({e})"
            ) from None
        if self._capath is not None and not any(
            _HASHED_NAME.match(name) for name in os.listdir(capath)
        ):
            _log.warn(
                "--capath {capath} holds no certificate named by subject hash"
                " (like 1a2b3c4d.0); OpenSSL will find none there. Run"
                " 'openssl rehash {capath}' or give a PEM bundle file.",
                capath=capath,
            )

    def _load(self, context: SSL.Context) -> None:
        context.load_verify_locations(self._cafile, self._capath)

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        self._platform._addCACertsToContext(context)
        self._load(context)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """
    A client connection creator that checks nothing about the server but
    still sends SNI (the service routes on it).
    """

    def __init__(self, host: str) -> None:
        self._options = CertificateOptions(verify=False, raiseMinimumTo=MINIMUM_TLS_VERSION)
        self._server_name = None if _is_ip_literal(host) else host.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


def client_tls_options(
    host: str, capath: str | None, verify: bool
) -> IOpenSSLClientConnectionCreator:
    """
    TLS client options for connecting to C{host} (a DNS name or a bare IP
    literal, no brackets).

    @param capath: C{-c/--capath}: a directory of hashed CA certificates or
        a PEM bundle file, trusted in addition to the system's store; or
        L{None} for the system store alone.
    @param verify: L{False} for C{-k}: no certificate or name check at all
        (a warning is logged).

    @raise CAPathError: C{capath} is given, C{verify} is true, and it is
        neither a directory nor a readable PEM file of certificates.
    """
    if not verify:
        _log.warn(
            "TLS verification of {host} is DISABLED (-k/--no-ssl-host-verify):"
            " any certificate is accepted, so anyone on the network path can"
            " read and change the tunnel's traffic.",
            host=host,
        )
        return cast(IOpenSSLClientConnectionCreator, _UnverifiedClientTLS(host))
    trust = platformTrust() if capath is None else PlatformTrustWith(capath)
    return optionsForClientTLS(
        host,
        trustRoot=cast(IOpenSSLTrustRoot, trust),
        extraCertificateOptions={"raiseMinimumTo": MINIMUM_TLS_VERSION},
    )


def _is_ip_literal(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def tls_failure(reason: Failure | None, host: str) -> str | None:
    """
    Why a connection's TLS handshake with C{host} failed, for the
    reference's C{Could not perform SSL handshake with proxy server: ...}
    line: C{certificate verify failed}, then what was checked and where to
    look (C{-c/--capath}); L{None} when C{reason} is no TLS failure.
    """
    if reason is None:
        return None
    shown = host.strip("[]")
    if reason.check(VerificationError, CertificateError):
        kind = "address" if _is_ip_literal(shown) else "name"
        return (
            f"certificate verify failed (the service's certificate does not hold the"
            f" {kind} {shown!r} this proxy connected to); connect by a name or address"
            f" the certificate holds (-e), and check that -c/--capath gives the"
            f" certificate authority that signed it"
        )
    if not reason.check(SSL.Error):
        return None
    args = getattr(reason.value, "args", ())
    errors = args[0] if args else []
    texts = [
        f"{error[2]} ({error[0]})" if isinstance(error, tuple) and len(error) == 3 else str(error)
        for error in (errors if isinstance(errors, list) else [errors])
    ]
    text = "; ".join(texts) or "TLS handshake failed"
    if "certificate verify failed" in text:
        text += (
            f": the certificate of {shown!r} is not signed by a certificate authority"
            f" this proxy trusts; give that authority with -c/--capath"
        )
    return text
