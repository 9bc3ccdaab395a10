# -*- test-case-name: tests.test_addresses -*-
"""
Addresses the local proxy is given: the tunnel endpoint (C{-e}, C{-r}),
service mappings (C{-s}, C{-d}), and the web proxy (C{https_proxy},
C{NO_PROXY}); their types, their parsers, and L{authority} to write a
C{host:port}.

Parsers raise L{AddressError} with a message saying what is expected (the
caller prefixes the option's name) and, where the reference proxy refuses
the same value with a fixed text, that text as its C{reason}.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal
from urllib.parse import unquote, urlsplit

from attrs import field, frozen

from lpxy.proxy import option_errors as reference
from lpxy.proxy.settings import ProxySettings
from lpxy.wire import SERVICE_ID_MAX_LENGTH

Mode = Literal["source", "destination"]

DEFAULT_PORT = 443
DEFAULT_WEB_PROXY_PORT = 3128
MAX_HOST = 253
MAX_REGION = 64


class AddressError(ValueError):
    """
    A value that is not an address of the kind asked for. C{reason} is the
    reference proxy's text for the same mistake, L{None} where it has none.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


def reason_of(e: ValueError) -> str | None:
    """The reference's text for the mistake C{e} reports, if it has one."""
    return e.reason if isinstance(e, AddressError) else None


def authority(host: str, port: int) -> str:
    """
    C{host:port} as an HTTP request target and C{Host} value, with an
    IPv6 literal in brackets.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@frozen
class TunnelEndpoint:
    """Where the tunneling service's data plane is."""

    host: str
    port: int = 443
    tls: bool = True

    def origin(self) -> str:
        """C{wss://host:port} (or C{ws://}): the endpoint as logs name it."""
        scheme = "wss" if self.tls else "ws"
        return f"{scheme}://{authority(self.host, self.port)}"

    def url(self, mode: Mode) -> str:
        """The WebSocket URL for C{mode}."""
        return f"{self.origin()}/tunnel?local-proxy-mode={mode}"


@frozen
class TcpTarget:
    """A local application reachable over TCP (destination side)."""

    host: str
    port: int


@frozen
class UnixTarget:
    """A local application listening on a Unix socket (destination side)."""

    path: str


LocalTarget = TcpTarget | UnixTarget


@frozen
class WebProxy:
    """An HTTP(S) web proxy to CONNECT through (C{https_proxy})."""

    host: str
    port: int = 3128
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)


# --- endpoints ---------------------------------------------------------------

_HOST = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
# What the reference accepts in an endpoint or bind address, before
# parsing it.
_REFERENCE_ADDRESS = re.compile(r"[a-zA-Z0-9.:\[\]-]+\Z")
# The largest port number the reference reads before calling it too large
# rather than out of range (a C int).
_REFERENCE_INT_MAX = 2**31 - 1
_REGION = re.compile(r"[a-z0-9-]+\Z")
_ENDPOINT_FORM = "expected HOST[:PORT], [IPV6]:PORT, wss://HOST[:PORT] or ws://HOST[:PORT]"


def _port(text: str) -> int:
    message = f"port {text!r} is not 1..65535"
    if not text:
        raise AddressError(message, reference.PORT_EMPTY)
    if not _DIGITS.match(text):
        raise AddressError(message, reference.PORT_DIGITS)
    if int(text) > _REFERENCE_INT_MAX:
        raise AddressError(message, reference.PORT_TOO_LARGE)
    if not 1 <= int(text) <= 65535:
        raise AddressError(message, reference.PORT_RANGE)
    return int(text)


def _host(text: str) -> str:
    host = text.lower()
    if len(host) > MAX_HOST:
        raise ValueError(f"host name longer than {MAX_HOST} characters")
    if _HOST.match(host):
        return host
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"bad host name {text!r}") from None


def _host_and_port(text: str, default: int | None) -> tuple[str, int]:
    """
    C{host:port}, C{[v6]:port}, C{host} or a bare IPv6 address (with the
    C{default} port, if there is one).
    """
    if text.startswith("["):
        match = re.match(r"\[([0-9a-fA-F:.]+)\](?::(.*))?\Z", text)
        if match is None:
            raise ValueError("unbalanced [ ]")
        address = str(ipaddress.IPv6Address(match.group(1)))
        if match.group(2) is None:
            if default is None:
                raise ValueError("no port")
            return address, default
        return address, _port(match.group(2))
    if text.count(":") > 1:
        address = str(ipaddress.IPv6Address(text))
        if default is None:
            raise ValueError("no port")
        return address, default
    host, colon, port = text.partition(":")
    if not colon:
        if default is None:
            raise ValueError("no port")
        return _host(host), default
    return _host(host), _port(port)


def parse_endpoint(text: str) -> TunnelEndpoint:
    """
    Parse C{-e}: C{host[:port]} (TLS, port 443 by default), C{[v6]:port},
    or a C{wss://} or C{ws://} URL (C{ws} is plain text).

    @raise ValueError: naming the valid forms.
    """
    try:
        lowered = text.lower()
        if lowered.startswith(("wss://", "ws://")):
            parts = urlsplit(text)
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError("a URL without path or query")
            if "@" in parts.netloc:
                raise ValueError("no user name")
            tls = parts.scheme.lower() == "wss"
            host, port = _host_and_port(parts.netloc, 443 if tls else 80)
            return TunnelEndpoint(host, port, tls)
        if not text:
            raise ValueError("empty")
        host, port = _host_and_port(text, DEFAULT_PORT)
        return TunnelEndpoint(host, port, True)
    except ValueError:
        raise AddressError(f"{_ENDPOINT_FORM}, got {text!r}", _endpoint_reason(text)) from None


def _endpoint_reason(text: str) -> str:
    """The reference's text for a C{-e} lpxy cannot use."""
    if not text:
        return reference.ENDPOINT_EMPTY
    if len(text) > MAX_HOST:
        return reference.ENDPOINT_LENGTH
    if not _REFERENCE_ADDRESS.match(text):
        return reference.ENDPOINT_CHARACTERS
    return reference.endpoint_invalid(text)


def region_endpoint(region: str, settings: ProxySettings) -> TunnelEndpoint:
    """
    The endpoint of C{region}: C{region_endpoint_overrides} first, then
    C{endpoint_format}.

    @raise ValueError: the region or the host it gives is malformed.
    """
    if len(region) > MAX_REGION or not _REGION.match(region):
        if not region:
            reason = reference.REGION_EMPTY
        elif len(region) > MAX_REGION:
            reason = reference.REGION_LENGTH
        else:
            reason = reference.REGION_FORMAT
        raise AddressError(
            f"expected lower-case letters, digits and '-' (at most {MAX_REGION}),"
            f" e.g. us-east-1, got {region!r}",
            reason,
        )
    host = settings.region_endpoint_overrides.get(region)
    if host is None:
        host = settings.endpoint_format % (region,)
    try:
        return parse_endpoint(host)
    except ValueError as e:
        raise ValueError(f"region {region} gives a bad endpoint: {e}") from None


# --- mappings ----------------------------------------------------------------

# The reference's rule for ids in -s, -d and --config-dir: AWS's
# (lpxy.wire) without its ':'.
_SERVICE_ID = re.compile(r"[a-zA-Z0-9_-]+\Z")
SOURCE_FORM = "PORT or ID=PORT[,ID=PORT...], e.g. 5555 or SSH1=5555,HTTP1=8080"
DESTINATION_FORM = (
    "PORT, HOST:PORT, [IPV6]:PORT or a Unix socket path, or ID=that[,ID=that...],"
    " e.g. 22 or SSH1=22,HTTP1=host:80"
)


def service_id(text: str) -> str:
    """
    Check a service id: 1 to 128 of C{[a-zA-Z0-9_-]}.

    @raise ValueError: it is not.
    """
    if len(text) > SERVICE_ID_MAX_LENGTH or not _SERVICE_ID.match(text):
        raise AddressError(
            f"service id {text!r} is not 1 to {SERVICE_ID_MAX_LENGTH} of [a-zA-Z0-9_-]",
            reference.SERVICE_ID_LENGTH if len(text) > SERVICE_ID_MAX_LENGTH
            else reference.SERVICE_ID_CHARACTERS,
        )
    return text


def _map_items(text: str) -> dict[str, str]:
    items = [item.strip() for item in text.split(",")]
    items = [item for item in items if item]
    if not items:
        raise ValueError("empty mapping")
    mapping: dict[str, str] = {}
    for item in items:
        name, equals, endpoint = item.partition("=")
        if not equals:
            if len(items) > 1:
                raise AddressError(
                    f"{item!r} needs an ID= when there are several",
                    reference.MAPPINGS_FORMAT,
                )
            endpoint, name = item, ""
        else:
            name, endpoint = name.strip(), endpoint.strip()
            if not name or not endpoint:
                problem = (
                    f"{item!r} has no endpoint" if name
                    else f"service id '' is not 1 to {SERVICE_ID_MAX_LENGTH} of [a-zA-Z0-9_-]"
                )
                raise AddressError(problem, reference.mapping_item_format(item))
            service_id(name)
        if name in mapping:
            raise ValueError(f"service id {name!r} given twice")
        mapping[name] = endpoint
    return mapping


def source_port(text: str) -> int:
    """
    A source listening port, 1..65535.

    @raise ValueError: it is not.
    """
    return _port(text)


def destination_target(text: str, default_host: str) -> LocalTarget:
    """
    A destination application: C{PORT} (on C{default_host}), C{HOST:PORT},
    C{[IPV6]:PORT} or a Unix socket path (anything holding a C{/}).

    @raise ValueError: it is none of those.
    """
    if _DIGITS.match(text):
        return TcpTarget(default_host, _port(text))
    if "/" in text:
        if "\0" in text:
            raise ValueError("a path without NUL")
        return UnixTarget(text)
    try:
        return TcpTarget(*_host_and_port(text, None))
    except ValueError as e:
        raise AddressError(
            f"bad endpoint {text!r} ({e})", _destination_reason(text, e)
        ) from None


def _destination_reason(text: str, e: ValueError) -> str | None:
    """
    The reference's text for a C{HOST:PORT} lpxy cannot use: it checks the
    characters and length first, then the port.
    """
    if len(text) > MAX_HOST:
        return reference.BIND_ADDRESS_LENGTH
    if not _REFERENCE_ADDRESS.match(text):
        return reference.BIND_ADDRESS_CHARACTERS
    return reason_of(e)


def parse_source_map(text: str) -> dict[str, int]:
    """
    Parse C{-s}: C{5555} or C{SSH1=5555,HTTP1=8080}.

    @raise ValueError: naming the problem and the valid form.
    """
    try:
        return {name: source_port(port) for name, port in _map_items(text).items()}
    except ValueError as e:
        raise AddressError(f"{e}: expected {SOURCE_FORM}", reason_of(e)) from None


def parse_destination_map(text: str, default_host: str) -> dict[str, LocalTarget]:
    """
    Parse C{-d}: C{22}, C{host:22}, a Unix socket path, C{[::1]:22}, or
    C{SSH1=22,HTTP1=host:80}.

    @raise ValueError: naming the problem and the valid form.
    """
    try:
        return {
            name: destination_target(endpoint, default_host)
            for name, endpoint in _map_items(text).items()
        }
    except ValueError as e:
        raise AddressError(f"{e}: expected {DESTINATION_FORM}", reason_of(e)) from None


# --- web proxy -----------------------------------------------------------------

WEB_PROXY_FORM = "expected [http|https]://[USER:PASSWORD@]HOST[:PORT]"


def parse_web_proxy(text: str) -> WebProxy:
    """
    Parse C{https_proxy}: C{[http|https]://[user:pass@]host[:port]}; no
    scheme means http, the port defaults to 3128, user info is
    percent-decoded.

    @raise ValueError: naming the valid form (never the value, which may
        hold a password).
    """
    scheme, separator, rest = text.partition("://")
    if not separator:
        scheme, rest = "http", text
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported scheme {scheme!r}: {WEB_PROXY_FORM}")
    rest = rest[:-1] if rest.endswith("/") else rest
    userinfo, at, hostport = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user)
        password = unquote(secret) if colon else None
    try:
        if "/" in hostport or not hostport:
            raise ValueError("bad host")
        host, port = _host_and_port(hostport, DEFAULT_WEB_PROXY_PORT)
    except ValueError:
        raise ValueError(WEB_PROXY_FORM) from None
    return WebProxy(host, port, scheme == "https", username, password)


def parse_no_proxy(text: str) -> tuple[str, ...]:
    """The entries of C{NO_PROXY}: lower-cased, blanks dropped."""
    return tuple(entry.strip().lower() for entry in text.split(",") if entry.strip())


def no_proxy_matches(host: str, port: int, entries: tuple[str, ...]) -> bool:
    """
    Whether C{host:port} bypasses the web proxy: C{*}; a domain and its
    subdomains (with or without a leading dot); C{name:port}; an IP address
    or network (C{10.0.0.0/8}).
    """
    host = host.lower().strip("[]")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = (
            ipaddress.ip_address(host)
        )
    except ValueError:
        address = None
    for entry in entries:
        if entry == "*":
            return True
        name, wanted = entry, None
        match = re.match(r"\[?([^\]]*)\]?:([0-9]+)\Z", entry)
        if match and (entry.startswith("[") or entry.count(":") == 1):
            name, wanted = match.group(1), int(match.group(2))
        if wanted is not None and wanted != port:
            continue
        name = name.strip("[]")
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = name.lstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False
