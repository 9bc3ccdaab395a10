# -*- test-case-name: tests.test_handshake -*-
"""
What a tunnel end's WebSocket upgrade request must carry, checked without
a socket.

C{GET /tunnel?local-proxy-mode=source|destination}: the request must name
the mode once, offer at least one of the subprotocols
C{aws.iot.securetunneling-3.0/2.0/1.0} (the newest offered is chosen), carry
the access token in the C{access-token} header or the C{awsiot-tunnel-token}
cookie (exactly one), and may carry a C{client-token}. A malformed request is
answered 400, a missing token 401, with the reason as a plain-text body
(L{refusal}); whether the token is good is the broker's to say.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from http.cookies import CookieError, SimpleCookie

import attrs
from twisted.web.http import RESPONSES

from lpxy.tunnelservice.store import DESTINATION, SOURCE
from lpxy.tunnelservice.tokens import HandshakeRefused
from lpxy.wire import (
    CLIENT_TOKEN_MAX_LENGTH,
    CLIENT_TOKEN_MIN_LENGTH,
    SUBPROTOCOLS,
    choose_subprotocol,
    is_valid_client_token,
)

__all__ = ["TOKEN_COOKIE", "Upgrade", "read_upgrade", "refusal"]

TOKEN_COOKIE = "awsiot-tunnel-token"


@attrs.frozen
class Upgrade:
    """A well-formed upgrade request: which end, which subprotocol, which tokens."""

    mode: str
    subprotocol: str
    access_token: str = attrs.field(repr=False)
    client_token: str | None = attrs.field(repr=False)


def read_upgrade(
    path: str,
    params: Mapping[str, Sequence[str]],
    protocols: Iterable[str],
    headers: Mapping[str, str],
) -> Upgrade:
    """
    Check an upgrade request (its path, query parameters, offered
    subprotocols and headers, names in lower case).

    @raise HandshakeRefused: with the status and reason to answer.
    """
    if path != "/tunnel":
        raise HandshakeRefused(400, f"Invalid request path {path!r}: use /tunnel")
    modes = params.get("local-proxy-mode", [])
    if len(modes) != 1 or modes[0] not in (SOURCE, DESTINATION):
        raise HandshakeRefused(
            400, "Missing or invalid local-proxy-mode: use source or destination"
        )
    chosen = choose_subprotocol(protocols)
    if chosen is None:
        raise HandshakeRefused(
            400,
            "No supported subprotocol: offer one of " + ", ".join(reversed(SUBPROTOCOLS)),
        )
    client_token = headers.get("client-token")
    if client_token is not None and not is_valid_client_token(client_token):
        raise HandshakeRefused(
            400,
            f"Invalid client-token: use {CLIENT_TOKEN_MIN_LENGTH} to {CLIENT_TOKEN_MAX_LENGTH}"
            " of a-z, A-Z, 0-9 and -",
        )
    header_token = headers.get("access-token")
    cookie_token = _cookie_token(headers.get("cookie"))
    if header_token is not None and cookie_token is not None:
        raise HandshakeRefused(
            400,
            "Give the access token either in the access-token header "
            f"or in the {TOKEN_COOKIE} cookie, not both",
        )
    token = header_token if header_token is not None else cookie_token
    if not token:
        raise HandshakeRefused(401, "Missing access token")
    return Upgrade(modes[0], chosen, token, client_token)


def _cookie_token(header: str | None) -> str | None:
    if header is None:
        return None
    values = []
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == TOKEN_COOKIE:
            values.append(value)
    if not values:
        return None
    if len(values) > 1:
        raise HandshakeRefused(400, f"More than one {TOKEN_COOKIE} cookie")
    try:
        cookie: SimpleCookie = SimpleCookie()
        cookie.load(f"{TOKEN_COOKIE}={values[0]}")
        return cookie[TOKEN_COOKIE].value
    except (CookieError, KeyError):
        raise HandshakeRefused(400, f"Malformed {TOKEN_COOKIE} cookie") from None


def refusal(code: int, reason: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """
    The whole HTTP answer refusing a handshake, with the reason as a
    plain-text body (clients show the body, not the status line).
    """
    body = (reason + "\n").encode("utf-8")
    phrase = RESPONSES.get(code, b"Error").decode("latin-1")
    lines = [
        f"HTTP/1.1 {code} {phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    for name, value in headers:
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
