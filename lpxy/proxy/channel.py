# -*- test-case-name: tests.test_session -*-
"""
What the tunnel's session and the I/O around it share: a service as the
proxy serves it (L{ServiceBinding}), a local connection's place in the
tunnel (L{Channel}), what a session asks of the I/O (L{SessionActions}),
the errors that end a WebSocket session, and how a log line shows a
service id from the wire (L{shown_id}).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from attrs import define, field, frozen

from lpxy.frames import Message

__all__ = [
    "Channel",
    "ProtocolViolation",
    "ServiceBinding",
    "ServiceMismatch",
    "SessionActions",
    "SessionError",
    "shown_id",
]

_SHOWN_ID_LENGTH = 40


def shown_id(service_id: str) -> str:
    """
    A service id from the wire as a log line shows it: quoted, escaped,
    and cut short (naming its length) when it is long, for a hostile
    service may send ids of thousands of characters.
    """
    if len(service_id) <= _SHOWN_ID_LENGTH:
        return repr(service_id)
    return f"{service_id[:_SHOWN_ID_LENGTH]!r}... ({len(service_id)} characters)"


class SessionError(Exception):
    """The tunnel cannot go on as it is; the message says why."""


class ProtocolViolation(SessionError):
    """
    The peer broke the protocol in a way that ends the WebSocket session:
    a message of type UNKNOWN (0) or an unknown type not marked ignorable.
    """


class ServiceMismatch(SessionError):
    """
    The services the tunnel announced do not fit the local map (a named map
    that does not name exactly the announced ids, or a destination whose
    config-dir lacks an announced id). Reconnecting does not help.
    """


@frozen
class ServiceBinding:
    """
    One service of the tunnel as the proxy serves it.

    @ivar key: the key of the local map (C{source_ports} or
        C{destination_apps}) this service uses; C{""} for the unnamed single
        mapping, L{None} for an announced id no map knows (a source then
        listens on a random port).
    @ivar service_id: the tunnel's service id (C{""} when the tunnel
        announced none, or in V1).
    """

    key: str | None
    service_id: str


@define(eq=False)
class Channel:
    """
    One local connection's place in the tunnel: the ids its records carry.

    A channel is current until the session closes it (C{open} false); a
    replaced or reset channel never gets data again, and closing it locally
    sends nothing.
    """

    binding: ServiceBinding
    wire_service_id: str
    stream_id: int
    connection_id: int
    header: bytes = field(repr=False)
    open: bool = True


class SessionActions(Protocol):
    """What a L{Session} asks of the I/O around it."""

    def send(self, message: Message) -> None:
        """Send a control record to the tunnel."""

    def deliver(self, channel: Channel, data: bytes) -> None:
        """Write C{data} to C{channel}'s local socket."""

    def open_local(self, channel: Channel) -> None:
        """Destination: connect C{channel} to its local application."""

    def close_local(self, channel: Channel) -> None:
        """Close C{channel}'s local socket once what was delivered is flushed."""

    def services_ready(self, bindings: Sequence[ServiceBinding]) -> None:
        """The service map is settled for this WebSocket session."""
