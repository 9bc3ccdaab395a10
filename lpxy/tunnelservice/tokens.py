# -*- test-case-name: tests.test_tokens,tests.test_broker -*-
"""
The data plane's token rules, as AWS applies them: which handshake an
end's tokens admit.

  - An access token without a client token is spent by its first successful
    handshake. A handshake that sets a client token may reconnect later with
    the same client token; any other client token (or none) is refused.
  - A token admits only the end (source or destination) it was made for,
    and only while its tunnel is open.
Only SHA-256 digests of tokens are kept, and they are compared in constant
time. No token appears in a log line, a repr or an exception message.

An access token is C{<routing key>.<secret>}. The routing key is the same
for both of a tunnel's tokens and for every rotated token (it is derived
from the tunnel id), and it is not secret: a load balancer in front of
several nodes hashes on it, so that both ends of a tunnel meet on one node
(HAProxy's C{field(1,.)} of the C{access-token} header or the
C{awsiot-tunnel-token} cookie). Proxies treat the whole token as opaque.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from lpxy.tunnelservice.store import OPEN, EndRecord, TunnelRecord

__all__ = [
    "CLIENT_TOKEN_MISMATCH",
    "CLOSED_TUNNEL",
    "MODE_MISMATCH",
    "ROUTING_KEY_LENGTH",
    "SPENT_TOKEN",
    "UNKNOWN_TOKEN",
    "HandshakeRefused",
    "admit",
    "digest",
    "new_token",
    "routing_key",
    "token_routing_key",
]

SPENT_TOKEN = (
    "Invalid access token: The access token was previously used and cannot be used again"
)
CLIENT_TOKEN_MISMATCH = (
    "Invalid client token: The provided client token does not match the client "
    "token that was previously set."
)
UNKNOWN_TOKEN = "Invalid access token: The access token is not valid"
CLOSED_TUNNEL = "Invalid access token: The tunnel is closed"
MODE_MISMATCH = "Invalid local-proxy-mode: it does not match the access token"


class HandshakeRefused(Exception):
    """
    A data-plane handshake is refused.

    @ivar status: the HTTP status to answer with (401 or 400).
    @ivar reason: the text for the response body.
    @ivar tunnel_id: the tunnel the access token belongs to, where known.
    """

    def __init__(self, status: int, reason: str, tunnel_id: str | None = None) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.tunnel_id = tunnel_id


def digest(token: str) -> bytes:
    """What is kept of a token: its SHA-256 digest."""
    return hashlib.sha256(token.encode("utf-8")).digest()


ROUTING_KEY_LENGTH = 16
"""Characters of a token's routing key (96 bits, URL-safe base64)."""
_SEPARATOR = "."


def routing_key(tunnel_id: str) -> str:
    """
    The routing key of tunnel C{tunnel_id}'s access tokens: a digest of the
    tunnel id, so that it survives rotation and restarts without being
    stored, and does not spell the tunnel id out.
    """
    raw = hashlib.sha256(b"lpxy tunnel route\0" + tunnel_id.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(raw[: ROUTING_KEY_LENGTH * 3 // 4]).decode("ascii")


def token_routing_key(token: str) -> str | None:
    """The routing key an access token carries, or L{None} when it has none."""
    key, separator, _ = token.partition(_SEPARATOR)
    if not separator or len(key) != ROUTING_KEY_LENGTH:
        return None
    return key


def new_token(tunnel_id: str) -> str:
    """A fresh access token for tunnel C{tunnel_id}: its routing key and a secret."""
    return routing_key(tunnel_id) + _SEPARATOR + secrets.token_urlsafe(48)


def admit(
    found: tuple[TunnelRecord, str] | None,
    token_hash: bytes,
    mode: str,
    client_token: str | None,
) -> tuple[TunnelRecord, EndRecord]:
    """
    The tunnel and end a handshake for end C{mode} is admitted to, spending
    the access token as the rules say.

    @param found: what the store found for C{token_hash}: the tunnel and
        the end whose token it is, or L{None}.
    @param token_hash: the digest of the handshake's access token.
    @raise HandshakeRefused: with the status and reason to answer.
    """
    if found is None:
        raise HandshakeRefused(401, UNKNOWN_TOKEN)
    record, token_mode = found
    end = record.end(token_mode)
    if not hmac.compare_digest(end.token_hash, token_hash):
        raise HandshakeRefused(401, UNKNOWN_TOKEN)
    tunnel_id = record.tunnel_id
    if record.status != OPEN:
        raise HandshakeRefused(401, CLOSED_TUNNEL, tunnel_id)
    if mode != token_mode:
        raise HandshakeRefused(400, MODE_MISMATCH, tunnel_id)
    if end.client_token_hash is not None:
        if client_token is None or not hmac.compare_digest(
            end.client_token_hash, digest(client_token)
        ):
            raise HandshakeRefused(401, CLIENT_TOKEN_MISMATCH, tunnel_id)
    elif end.spent:
        raise HandshakeRefused(401, SPENT_TOKEN, tunnel_id)
    else:
        end.spent = True
        if client_token is not None:
            end.client_token_hash = digest(client_token)
    return record, end
