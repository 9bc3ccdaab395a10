# -*- test-case-name: tests.test_wire -*-
"""
The wire rules both products obey (protocol.md sections 1, 4 and 6).

The local proxy and the tunnel service each check these from their side;
this module is their one home: the subprotocols and the protocol version
each names, the client-token rule, the WebSocket close codes, and which
record types name a stream and who may send which. Constants and plain
functions only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from lpxy._proto.Message_pb2 import Message

__all__ = [
    "CLIENT_TOKEN_CHARACTERS",
    "CLIENT_TOKEN_MAX_LENGTH",
    "CLIENT_TOKEN_MIN_LENGTH",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_NORMAL",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_UNSUPPORTED_DATA",
    "KNOWN_TYPES",
    "NEWEST_SUBPROTOCOL",
    "SERVICE_ONLY_TYPES",
    "SOURCE_ONLY_TYPES",
    "STREAM_TYPES",
    "SUBPROTOCOLS",
    "SUBPROTOCOL_VERSIONS",
    "choose_subprotocol",
    "is_valid_client_token",
    "subprotocol_version",
]

# --- subprotocols ----------------------------------------------------------------

SUBPROTOCOL_VERSIONS: Mapping[str, int] = {
    "aws.iot.securetunneling-1.0": 1,
    "aws.iot.securetunneling-2.0": 2,
    "aws.iot.securetunneling-3.0": 3,
}
"""Each WebSocket subprotocol and the protocol version (record format) it names."""

SUBPROTOCOLS: tuple[str, ...] = tuple(SUBPROTOCOL_VERSIONS)
"""The subprotocols, oldest first."""

NEWEST_SUBPROTOCOL = SUBPROTOCOLS[-1]


def subprotocol_version(subprotocol: str) -> int:
    """
    The protocol version (1, 2 or 3) C{subprotocol} names; the newest for
    a name that is none of L{SUBPROTOCOLS}.
    """
    return SUBPROTOCOL_VERSIONS.get(subprotocol, SUBPROTOCOL_VERSIONS[NEWEST_SUBPROTOCOL])


def choose_subprotocol(offered: Iterable[str]) -> str | None:
    """The newest of L{SUBPROTOCOLS} among C{offered}; L{None} when it has none."""
    offered = set(offered)
    return next((name for name in reversed(SUBPROTOCOLS) if name in offered), None)


# --- client token ----------------------------------------------------------------

CLIENT_TOKEN_MIN_LENGTH = 32
CLIENT_TOKEN_MAX_LENGTH = 128
CLIENT_TOKEN_CHARACTERS = "a-zA-Z0-9-"
"""The characters a client token may hold, as a regular expression class."""

_CLIENT_TOKEN = re.compile(
    f"[{CLIENT_TOKEN_CHARACTERS}]{{{CLIENT_TOKEN_MIN_LENGTH},{CLIENT_TOKEN_MAX_LENGTH}}}"
)


def is_valid_client_token(token: str) -> bool:
    """
    Whether C{token} may be a C{client-token}: 32 to 128 ASCII letters,
    digits and dashes.
    """
    return _CLIENT_TOKEN.fullmatch(token) is not None


# --- close codes (RFC 6455 section 7.4.1) ----------------------------------------

CLOSE_NORMAL = 1000
"""The tunnel was closed (CloseTunnel, expiry, a replaced or rotated end), or a proxy stops."""
CLOSE_GOING_AWAY = 1001
"""The tunnel service is shutting down."""
CLOSE_PROTOCOL_ERROR = 1002
"""The record stream is broken (a bad length, a body that does not parse, an unknown type)."""
CLOSE_UNSUPPORTED_DATA = 1003
"""A text message, where only binary ones carry records."""
CLOSE_POLICY_VIOLATION = 1008
"""A record a client may not send (see L{SERVICE_ONLY_TYPES}, L{SOURCE_ONLY_TYPES})."""
CLOSE_INTERNAL_ERROR = 1011
"""The tunnel service failed to open the connection."""

# --- record types ----------------------------------------------------------------

KNOWN_TYPES: frozenset[int] = frozenset(Message.Type.values()) - {Message.UNKNOWN}
"""
The record types of the schema. A record of any other type is skipped when
marked C{ignorable} and breaks the session otherwise; type UNKNOWN (0) always
breaks it.
"""

STREAM_TYPES: frozenset[int] = frozenset({
    Message.DATA,
    Message.STREAM_START,
    Message.STREAM_RESET,
    Message.CONNECTION_START,
    Message.CONNECTION_RESET,
})
"""The record types that name a stream: their stream id must be 1 or more."""

SERVICE_ONLY_TYPES: frozenset[int] = frozenset({Message.SESSION_RESET, Message.SERVICE_IDS})
"""The record types only the tunnel service sends, never a proxy."""

SOURCE_ONLY_TYPES: frozenset[int] = frozenset({Message.STREAM_START, Message.CONNECTION_START})
"""The record types only a source proxy sends (a destination never starts anything)."""
