# -*- test-case-name: tests.test_wire -*-
"""
The wire rules both products obey (protocol.md sections 1, 4 and 6).

The local proxy and the tunnel service each check these from their side;
this module is their one home: the subprotocols and the protocol version
each names, the client-token rule, the WebSocket close codes, and which
record types name a stream and who may send which, what a service id and
a stream or connection id may be, and how many services a proxy serves.
Constants and plain functions only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from lpxy._proto.Message_pb2 import Message

__all__ = [
    "AWS_MAX_SERVICES",
    "CLIENT_TOKEN_CHARACTERS",
    "CLIENT_TOKEN_MAX_LENGTH",
    "CLIENT_TOKEN_MIN_LENGTH",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_NORMAL",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_UNSUPPORTED_DATA",
    "DEFAULT_MAX_SERVICES",
    "KNOWN_TYPES",
    "MAX_CONNECTION_ID",
    "MAX_STREAM_ID",
    "NEWEST_SUBPROTOCOL",
    "SERVICE_ID_CHARACTERS",
    "SERVICE_ID_MAX_LENGTH",
    "SERVICE_ID_PATTERN",
    "SERVICE_ONLY_TYPES",
    "SOURCE_ONLY_TYPES",
    "STREAM_TYPES",
    "SUBPROTOCOLS",
    "SUBPROTOCOL_VERSIONS",
    "choose_subprotocol",
    "is_valid_client_token",
    "is_valid_connection_id",
    "is_valid_service_id",
    "is_valid_stream_id",
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


# --- service ids ---------------------------------------------------------------

SERVICE_ID_MAX_LENGTH = 128
SERVICE_ID_CHARACTERS = "a-zA-Z0-9:_-"
"""
The characters a service id may hold, as a regular expression class: AWS's
rule for OpenTunnel's C{destinationConfig.services} (botocore's
C{iotsecuretunneling} model: C{[a-zA-Z0-9:_-]+}, 1 to 128), so every id a
tunnel can carry. The reference proxy's command-line maps are narrower (no
C{:}).
"""

SERVICE_ID_PATTERN = re.compile(f"[{SERVICE_ID_CHARACTERS}]{{1,{SERVICE_ID_MAX_LENGTH}}}")
"""AWS's service id rule as a whole-string pattern (its text is AWS's)."""

AWS_MAX_SERVICES = 3
"""The most services AWS lets one tunnel have."""

DEFAULT_MAX_SERVICES = 3 * AWS_MAX_SERVICES
"""
The most services a proxy serves (listens for, or accepts starts of) by
default: room beyond AWS's limit for a self-hosted service, while a
service announcing thousands cannot make a source open thousands of ports.
"""


def is_valid_service_id(service_id: str) -> bool:
    """
    Whether C{service_id} may name a service of a tunnel: 1 to 128 ASCII
    letters, digits, C{:}, C{_} and C{-}.
    """
    return SERVICE_ID_PATTERN.fullmatch(service_id) is not None


# --- stream and connection ids ---------------------------------------------------

MAX_STREAM_ID = 2**31 - 1
"""The largest stream id (C{int32} on the wire); a stream id is 1 or more."""
MAX_CONNECTION_ID = 2**32 - 1
"""The largest connection id (C{uint32} on the wire); 0 means none (V1, V2)."""


def is_valid_stream_id(stream_id: int) -> bool:
    """Whether C{stream_id} may name a stream: 1 to L{MAX_STREAM_ID}."""
    return 1 <= stream_id <= MAX_STREAM_ID


def is_valid_connection_id(connection_id: int) -> bool:
    """
    Whether C{connection_id} may name a V3 connection: 1 to
    L{MAX_CONNECTION_ID} (a start or reset of one connection needs one).
    """
    return 1 <= connection_id <= MAX_CONNECTION_ID


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
